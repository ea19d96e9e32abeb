"""Security: who may use the proxy, where it may connect, what may touch the disk, what may leak.

The canary test runs the real entry point as a subprocess at DEBUG level and looks for every
credential it was given in every output: records, stream files, rotated and compressed files,
the log, the proxy's own error bodies and /metrics.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import unittest
import urllib.parse
from unittest import mock

from proxy_llm import reader, record, storage, wire
from proxy_llm.cli import KEY_FILE
from tests.test_wire import _strings  # (every string in a JSON value, at any depth)
from tests import support
from tests.support import (raw_exchange, DEADLINE, ROOT, FakeUpstream, InProcessProxy, ProxyProcess, Reply, all_files, base_config, header, provider, request)

PLAIN_BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}'
SAFE_NAME = re.compile(r"^session_[A-Za-z0-9._-]{1,64}$")


def inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.realpath(path).startswith(root + os.sep)




class SecurityTestCase(support.ProxyTestCase):
    def start_proxy(self, providers=None, **extra) -> InProcessProxy:
        return super().start_proxy(providers or [provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                                                 provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"])], **extra)


class ListenTest(SecurityTestCase):
    def write_config(self, cfg) -> str:
        path = os.path.join(self.tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def test_non_loopback_listen_without_proxy_keys_exits_2(self):
        path = self.write_config(base_config([provider("openai", "openai", self.upstream.url)], self.data_dir,
                                             listen="0.0.0.0:0"))
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-m", "proxy_llm", "--config", path], env=env, cwd=self.tmp,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE)
        self.assertEqual(done.returncode, 2)
        err = done.stderr.decode()
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("proxy_keys", err)
        self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(self.data_dir))  # refused before anything was created

    def test_non_loopback_listen_with_proxy_keys_requires_a_key_never_forwarded(self):
        proxy_key = "pk-%032x" % random.Random(7).getrandbits(128)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir,
                          listen="0.0.0.0:0", proxy_keys=[proxy_key])
        proc = ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        url = "http://127.0.0.1:%d" % proc.port
        status, _, body = request(url, body=PLAIN_BODY)
        self.assertEqual((status, json.loads(body)["error"]["type"]), (401, "invalid_request_error"))
        status, _, _ = request(url, body=PLAIN_BODY, headers={"Authorization": "Bearer wrong-" + proxy_key})
        self.assertEqual(status, 401)
        self.assertEqual(self.upstream.requests.qsize(), 0)
        status, _, _ = request(url, body=PLAIN_BODY, headers={"Authorization": "Bearer " + proxy_key})
        self.assertEqual(status, 200)
        seen = self.upstream.next_request()
        self.assertIsNone(seen.header("Authorization"))
        status, _, _ = request(url, body=PLAIN_BODY, headers={"X-Proxy-Key": proxy_key,
                                                               "Authorization": "Bearer sk-client-provider-key"})
        self.assertEqual(status, 200)
        seen = self.upstream.next_request()
        self.assertIsNone(seen.header("X-Proxy-Key"))
        self.assertEqual(seen.header("Authorization"), "Bearer sk-client-provider-key")
        self.assertEqual(proc.stop(), 0)
        for path in all_files(self.data_dir):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                self.assertNotIn(proxy_key.encode(), f.read(), path)
        self.assertNotIn(proxy_key, proc.log_text())

    def test_proxy_keys_are_compared_in_constant_time(self):
        proxy = self.start_proxy(proxy_keys=["pk-secret-0123456789"])
        import hmac
        calls = []
        real = hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)
        with mock.patch("proxy_llm.handler.hmac.compare_digest", spy):
            status, _, _ = request(proxy.url, body=PLAIN_BODY, headers={"X-Proxy-Key": "pk-secret-0123456789"})
        self.assertEqual(status, 200)
        self.assertIn((b"pk-secret-0123456789", b"pk-secret-0123456789"), calls)

    def test_an_sdk_may_present_the_proxy_key_as_its_own_key(self):
        # Each SDK puts its key in its own header (Anthropic's x-api-key, Azure's api-key,
        # Gemini's x-goog-api-key): the proxy key is taken from any of them, and that header is
        # not forwarded, while a provider key the client sends in another one still is.
        key = "pk-sdk-%032x" % random.Random(11).getrandbits(128)
        gemini_path = "/v1beta/models/gemini-2.0-flash:generateContent"
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"]),
                                  provider("gemini", "gemini", self.upstream.url, "", ["gemini-*"])],
                                 proxy_keys=[key])
        cases = (
            ("/v1/messages", {"model": "claude-x", "max_tokens": 1, "messages": []}, "x-api-key",
             ("Authorization", "Bearer client-own-token")),
            ("/v1/chat/completions", {"model": "gpt-4o", "messages": []}, "api-key",
             ("Authorization", "Bearer sk-client-own-key")),
            (gemini_path, {"contents": []}, "x-goog-api-key", ("X-Other", "kept")),
            ("/v1/messages", {"model": "claude-x", "max_tokens": 1, "messages": []}, "Authorization",
             ("x-api-key", "client-own-key")),
        )
        for path, body, name, (other, other_value) in cases:
            with self.subTest(header=name):
                presented = "Bearer " + key if name == "Authorization" else key
                status, _, answer = request(proxy.url, path=path, body=body,
                                            headers={name: "wrong-" + key, other: other_value})
                self.assertEqual(status, 401, answer)
                status, _, answer = request(proxy.url, path=path, body=body,
                                            headers={name: presented, other: other_value})
                self.assertEqual(status, 200, answer)
                seen = self.upstream.next_request()
                self.assertEqual(seen.path, path)
                self.assertIsNone(seen.header(name))
                self.assertEqual(seen.header(other), other_value)
        # The key in two headers: the second went on to the provider (an audit's finding).
        for path, body, headers in (("/v1/messages", {"model": "claude-x", "max_tokens": 1, "messages": []},
                                     {"x-api-key": key, "Authorization": "Bearer " + key}),
                                    (gemini_path, {"contents": []}, {"X-Proxy-Key": key, "x-goog-api-key": key})):
            with self.subTest(headers=sorted(headers)):
                self.assertEqual(request(proxy.url, path=path, body=body, headers=headers)[0], 200)
                seen = self.upstream.next_request()
                self.assertEqual([h for h in headers if seen.header(h) is not None], [])
                self.assertNotIn(key, repr(seen.headers))
        self.assertEqual(self.upstream.requests.qsize(), 0)  # no refused request was forwarded
        proxy.stop()
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(key.encode(), f.read(), path)


def _fixture(folder: str, name: str) -> bytes:
    with open(os.path.join(support.FIXTURES, folder, name), "rb") as f:
        return f.read()


class SdkProxyKeyTest(SecurityTestCase):
    """Each official SDK, given the proxy key as its own key, gets through, and the upstream
    sees the provider key of config.json in its place (skips the SDKs not installed)."""

    KEYS = {"openai": "sk-provider-openai-0123456789", "azure": "azure-provider-key-0123456789",
            "anthropic": "sk-ant-provider-0123456789", "gemini": "AIza-provider-gemini-0123456789"}
    PROXY_KEY = "pk-sdk-client-0123456789abcdef"

    def setUp(self):
        super().setUp()
        answers = {"/v1/chat/completions": _fixture("openai_chat", "body_tool_calls.json"),
                   "/openai/deployments/dep/chat/completions": _fixture("openai_chat", "body_tool_calls.json"),
                   "/v1/messages": _fixture("anthropic_messages", "body_tool_use.json"),
                   "/v1/models/gemini-2.0-flash:generateContent": _fixture("gemini", "body_cached.json")}
        self.upstream.handler = lambda req: Reply(200, [("Content-Type", "application/json")],
                                                  answers[req.path.split("?")[0]])
        url = self.upstream.url
        self.proxy = self.start_proxy([provider("openai", "openai", url, self.KEYS["openai"], ["gpt-*"]),
                                       provider("azure", "azure", url, self.KEYS["azure"], ["*"]),
                                       provider("anthropic", "anthropic", url, self.KEYS["anthropic"], ["claude-*"]),
                                       provider("gemini", "gemini", url, self.KEYS["gemini"], ["gemini-*"])],
                                      proxy_keys=[self.PROXY_KEY])

    def sdk(self, name: str):
        try:
            if name == "google.genai":
                from google import genai
                return genai
            return __import__(name)
        except ImportError:
            self.skipTest("%s is not installed" % name)

    def seen(self, header_name: str, provider_type: str) -> None:
        seen = self.upstream.next_request()
        for name in wire.CREDENTIAL_HEADERS:
            value = seen.header(name)
            self.assertNotIn(self.PROXY_KEY, value or "", name)
        self.assertIn(self.KEYS[provider_type], seen.header(header_name) or "")

    def test_openai(self):
        openai = self.sdk("openai")
        client = openai.OpenAI(api_key=self.PROXY_KEY, base_url=self.proxy.url + "/v1", max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
        self.seen("authorization", "openai")

    def test_azure_openai(self):
        openai = self.sdk("openai")
        client = openai.AzureOpenAI(api_key=self.PROXY_KEY, azure_endpoint=self.proxy.url, api_version="2024-10-21",
                                    max_retries=0)
        client.chat.completions.create(model="dep", messages=[{"role": "user", "content": "Hi"}])
        self.seen("api-key", "azure")

    def test_anthropic(self):
        anthropic = self.sdk("anthropic")
        client = anthropic.Anthropic(api_key=self.PROXY_KEY, base_url=self.proxy.url, max_retries=0)
        client.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
        self.seen("x-api-key", "anthropic")

    def test_google_genai(self):
        genai = self.sdk("google.genai")
        client = genai.Client(api_key=self.PROXY_KEY, http_options={"base_url": self.proxy.url})
        client.models.generate_content(model="gemini-2.0-flash", contents="Hi")
        self.seen("x-goog-api-key", "gemini")

    def test_google_genai_upload(self):
        # The SDK sends an upload's chunks to the URL the start was answered with, with none of
        # the client's headers: no key, as Google's upload URL is a capability of its own.
        genai = self.sdk("google.genai")
        uploads = support.ResumableUploads()
        answer = self.upstream.handler
        self.upstream.handler = lambda req: uploads(req) if req.path.startswith("/upload/") else answer(req)
        client = genai.Client(api_key=self.PROXY_KEY, http_options={"base_url": self.proxy.url})
        data = os.urandom(1000)
        made = client.files.upload(file=io.BytesIO(data), config={"mime_type": "application/octet-stream"})
        self.assertEqual(uploads.files[made.name], data)
        self.seen("x-goog-api-key", "gemini")
        chunk = self.upstream.next_request()  # let in by the pass its URL carries, which goes no further
        self.assertIn("upload_id=", chunk.query)
        self.assertNotIn(wire.UPLOAD_PASS, chunk.query)
        self.assertEqual(chunk.header("x-goog-api-key"), self.KEYS["gemini"])
        self.proxy.stop()
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(wire.UPLOAD_PASS.encode(), f.read(), path)


class UpstreamOnlyTest(SecurityTestCase):
    def setUp(self):
        super().setUp()
        self.evil = FakeUpstream().start()
        self.addCleanup(self.evil.stop)
        self.evil_host = "127.0.0.1:%d" % self.evil.port

    def test_no_request_is_smuggled_past_a_bad_header_line_or_a_local_endpoint(self):
        # Each once let the body below reach the upstream as a request of its own: the standard
        # library's parser dropped every field after a line it could not read (Content-Length
        # with them), and /health and /metrics answered without reading the body.
        smuggled = b"GET /v1/models?smuggled=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        framing = b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled
        proxy = self.start_proxy()
        for raw in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX Foo: a\r\n" + framing,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nJunk\r\n" + framing,
                    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding : chunked\r\n" + framing,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n"
                    + framing,
                    b"GET /health HTTP/1.1\r\nHost: x\r\n" + framing,
                    b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + framing,
                    # A request line the proxy leaves to the standard library (two blanks, a
                    # tab, HTTP/1.10) had its header block read leniently (an audit's finding).
                    b"POST  /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX Foo: a\r\n" + framing,
                    b"POST\t/v1/chat/completions HTTP/1.1\r\nHost: x\r\nJunk\r\n" + framing,
                    b"POST /v1/chat/completions HTTP/1.10\r\nHost: x\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n"
                    + framing,
                    b"POST /v1/chat/completions  HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n" + framing,
                    # Two Content-Length to a local endpoint: the first was read, "0".
                    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" + framing,
                    b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n" + framing):
            with self.subTest(raw=raw[:60]):
                data = raw_exchange(proxy.port, raw)
                self.assertEqual(data.count(b"HTTP/1.1 "), 1, data[:200])  # one answer, then the close
        proxy.flush()
        seen = []
        while not self.upstream.requests.empty():
            seen.append(self.upstream.requests.get().path)
        self.assertFalse([p for p in seen if "smuggled" in p], seen)

    def test_host_and_framing_the_rfc_asks_a_server_to_refuse(self):
        # RFC 9112 3.2 and 6.1: an HTTP/1.1 request with no Host, any with two (which a server in
        # front or behind may read as two origins), and an HTTP/1.0 one with a Transfer-Encoding
        # were forwarded (an audit's finding). Each is now a 400 in the provider's shape, with a
        # record, and the connection closed; the same requests framed as the RFC asks go on.
        body = b'{"model":"gpt-4o","messages":[]}'
        chunked = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        sized = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        proxy = self.start_proxy()
        cases = (
            (b"POST /v1/chat/completions HTTP/1.1\r\n" + sized, 400, "Host"),
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + sized, 400, "Host"),
            (b"POST /v1/chat/completions HTTP/1.0\r\nHost: a\r\nhost: a\r\n" + sized, 400, "Host"),
            (b"POST  /v1/chat/completions HTTP/1.1\r\n" + sized, 400, "Host"),  # (the standard library's parse)
            (b"POST /v1/chat/completions HTTP/1.0\r\nHost: a\r\n" + chunked, 400, "HTTP/1.0"),
            (b"POST /v1/chat/completions HTTP/1.0\r\n" + sized, 200, None),  # (1.0 needs no Host)
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + chunked, 200, None),
        )
        for raw, status, says in cases:
            with self.subTest(raw=raw[:70]):
                data = raw_exchange(proxy.port, raw + b"GET /v1/models?second=1 HTTP/1.1\r\nHost: a\r\n"
                                                b"Connection: close\r\n\r\n")
                head, _, answer = data.partition(b"\r\n\r\n")
                self.assertRegex(head, rb"^HTTP/1\.[01] %d " % status)
                if says is not None:
                    answers = re.findall(rb"HTTP/1\.[01] \d{3} ", data)
                    self.assertEqual(len(answers), 1, data[:300])  # one answer, then the close
                    self.assertIn(b"connection: close", head.lower())
                    error = json.loads(answer)["error"]
                    self.assertEqual(error["type"], "invalid_request_error")
                    self.assertIn(says, error["message"])
        # On a kept-alive connection, a request the standard library parses is counted anew, not
        # given the Host count of the request before it.
        data = raw_exchange(proxy.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n" + sized
                            + b"POST  /v1/chat/completions HTTP/1.1\r\n" + sized)
        self.assertEqual([int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)], [200, 400])
        recs = proxy.records()
        self.assertEqual([r["status_code"] for r in recs if r["endpoint"] == "/v1/chat/completions"],
                         [400, 400, 400, 400, 400, 200, 200, 200, 400])
        seen = []
        while not self.upstream.requests.empty():
            seen.append(self.upstream.requests.get())
        self.assertEqual([r.body for r in seen if r.path == "/v1/chat/completions"], [body, body, body])
        # After a refusal the connection closed unread; HTTP/1.0's closes too, 1.1's goes on.
        self.assertEqual(len([r for r in seen if "second" in r.query]), 1)

    def test_targets_that_are_not_plain_paths_are_refused(self):
        # Appended to a base URL with a provider key, a dot segment reaches whatever path the
        # upstream makes of it; a byte outside visible ASCII was a 500 (or a 502) after routing.
        proxy = self.start_proxy()
        for target in (b"/v1/../../internal/admin", b"/v1/%2e%2e/%2E%2e/internal", b"/v1/./chat/completions",
                       b"/v1/chat/caf\xc3\xa9", b"/v1/chat/\x7f", b"/v1/chat/completions#frag",
                       b"http://h/v1/chat/\xff",
                       # What a server decodes to, or takes for, a separator (an audit's finding):
                       b"/v1/..%2fadmin", b"/v1/%2e%2e%2Fadmin", b"/v1/..%5cadmin", b"/v1/..\\..\\admin",
                       b"/v1/..;/..;/admin"):
            with self.subTest(target=target):
                data = raw_exchange(proxy.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                    % (target, len(PLAIN_BODY), PLAIN_BODY))
                head, _, body = data.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head[:60])
                self.assertIn("invalid request target", json.loads(body)["error"]["message"])
        proxy.flush()
        self.assertTrue(self.upstream.requests.empty())

    def test_client_cannot_choose_the_host(self):
        proxy = self.start_proxy()
        attempts = [
            b"POST http://%s/v1/chat/completions HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (self.evil_host.encode(), self.evil_host.encode(), len(PLAIN_BODY), PLAIN_BODY),
            b"POST //%s/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (self.evil_host.encode(), len(PLAIN_BODY), PLAIN_BODY),
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (self.evil_host.encode(), self.evil_host.encode()),
            b"GET /v1/../..//%s/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % self.evil_host.encode(),
        ]
        for raw in attempts:
            data = raw_exchange(proxy.port, raw)
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertIn(b"HTTP/1.1 ", head[:9])
            if not head.startswith(b"HTTP/1.1 200"):
                self.assertIn(b"application/json", head)
                self.assertIn("error", json.loads(body))
        # Host header tricks: forwarded to the configured upstream with its own Host.
        request(proxy.url, body=PLAIN_BODY, headers={"Host": self.evil_host, "X-Forwarded-Host": self.evil_host,
                                                     "Content-Type": "application/json"})
        proxy.flush()
        seen = []
        while not self.upstream.requests.empty():
            seen.append(self.upstream.requests.get())
        self.assertTrue(seen)
        for req in seen:
            self.assertEqual(req.header("Host"), "127.0.0.1:%d" % self.upstream.port)
        self.assertEqual(self.evil.connections, 0)
        self.assertEqual(self.evil.requests.qsize(), 0)

    def test_redirects_are_passed_to_the_client_not_followed(self):
        location = "http://%s/v1/chat/completions" % self.evil_host
        self.replies.append(Reply(307, [("Location", location), ("Content-Type", "application/json")], b"{}"))
        proxy = self.start_proxy()
        status, headers, _ = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual((status, header(headers, "Location")), (307, location))
        [rec] = proxy.records()
        self.assertEqual(rec["status_code"], 307)
        self.assertEqual(self.evil.connections, 0)


def random_ids(rng: random.Random, n: int):
    alphabet = ("abc", "../", "/", "\\", "\0", ".", "..", " ", "é", "日本", "\u202e", "\ufeff", "\U0001F600",
                "\udc80", "%2e%2e%2f", "session_", "\n", "\t", "CON", "*", "?", ":")
    out = ["../../etc/x", "/etc/passwd", "..", ".", "", "\0", "x" * 10240, "a/b", "C:\\windows", "~root"]
    while len(out) < n:
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return out


class SessionIdTest(SecurityTestCase):
    def test_session_file_id_over_thousands_of_hostile_ids(self):
        rng = random.Random(1234)
        ids = random_ids(rng, 5000)
        seen = {}
        for sid in ids:
            name = record.session_file_id(sid)
            self.assertRegex(name, r"^[A-Za-z0-9._-]{1,64}$")
            self.assertNotIn(name, (".", ".."))
            self.assertTrue(inside(self.data_dir, os.path.join(self.data_dir, "session_" + name)))
            self.assertEqual(record.session_file_id(sid), name)  # stable
            self.assertEqual(storage.safe_sid(name), name)  # the recorder keeps it as is
            seen.setdefault(name, set()).add(sid)
        self.assertFalse({k: v for k, v in seen.items() if len(v) > 1})  # no collisions

    def test_hostile_ids_through_the_real_recorder(self):
        ids = random_ids(random.Random(99), 300)  # each new session costs file and directory fsyncs

        def encode(sid):
            line = json.dumps({"session_id": sid}).encode() + b"\n"
            return [(storage.RECORDS, record.session_file_id(sid), line), (storage.STREAMS, record.session_file_id(sid), line)]
        rec = storage.Recorder(self.data_dir, encode, fsync="never")
        rec.start()
        for sid in ids:
            self.assertTrue(rec.submit(sid))
        self.assertTrue(rec.flush(60.0))
        rec.close(DEADLINE)
        self.assertEqual(rec.written_total(), len(ids))
        self.assertEqual(rec.dropped_total(), 0)
        got = []
        for path in all_files(self.data_dir):
            self.assertTrue(inside(self.data_dir, path), path)
            with open(path, "rb") as f:
                got.extend(json.loads(line)["session_id"] for line in f)
        for name in os.listdir(self.data_dir):
            self.assertTrue(SAFE_NAME.match(name) or name == "streams", name)
        self.assertEqual(sorted(got), sorted(ids * 2))

    def test_hostile_ids_through_the_proxy(self):
        rng = random.Random(4321)
        proxy = self.start_proxy()
        sent = []
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        # Header values: bytes the HTTP parser keeps (latin-1, no CR/LF or NUL, which a request
        # is refused for, RFC 9110 5.5; not blank at the ends).
        header_alphabet = ["a", "/", "..", "\\", "é", "\x7f", "%", "*", " ", "\t", "\xff"]
        for n in range(150):
            sid = "".join(rng.choice(header_alphabet) for _ in range(rng.randint(1, 30))).strip(" \t") or "x"
            if n == 0:
                sid = "../../etc/x"
            elif n == 1:
                sid = "y" * 10240
            conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY,
                         headers={"X-Session-Id": sid, "Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().read()[:1], b"{")
            sent.append(sid)
        # metadata.user_id in the body: any JSON string, lone surrogates and NULs included.
        for sid in random_ids(random.Random(5), 150):
            if not sid:
                continue
            body = json.dumps({"model": "claude-x", "metadata": {"user_id": sid}, "messages": []}).encode()
            conn.request("POST", "/v1/messages", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            self.assertEqual(resp.status, 200)
            sent.append(sid)
        conn.close()
        recs = proxy.records()
        # (A lone surrogate is the replacement character in a record: reader.lone_surrogates_replaced.)
        loadable = [sid.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for sid in sent]
        self.assertEqual(sorted(r["session_id"] for r in recs), sorted(loadable))
        for path in all_files(self.data_dir):
            self.assertTrue(inside(self.data_dir, path), path)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "etc")))
        self.assertEqual(proxy.server.recorder.dropped_total(), 0)


class MetricLabelsTest(SecurityTestCase):
    def test_labels_never_carry_raw_client_input(self):
        rng = random.Random(77)
        proxy = self.start_proxy()
        tokens = []
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        for n in range(150):
            token = "tok%08x" % rng.getrandbits(32)
            tokens.append(token)
            kind = n % 5
            if kind == 0:
                path, body = "/v1/chat/completions", {"model": "gpt-" + token}
            elif kind == 1:
                path, body = "/v1/chat/completions", {"model": token}
            elif kind == 2:
                path, body = "/v1/" + token, {"model": "gpt-4o"}
            elif kind == 3:
                path, body = "/v1beta/models/%s:%s" % (token, rng.choice(["generateContent", token])), {}
            else:
                path, body = "/v1/messages?x=" + token, {"model": "claude-" + token}
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
        proxy.flush()
        text = request(proxy.url, method="GET", path="/metrics", headers={})[2].decode()
        series = set()
        for line in text.splitlines():
            if line.startswith("#") or "{" not in line:
                continue
            labels = line[line.index("{"):line.rindex("}") + 1]
            self.assertFalse(any(t in labels for t in tokens), line)
            series.add(re.sub(r',?le="[^"]*"', "", line.split(" ")[0]))
        self.assertLess(len(series), 40, sorted(series))


class KeyInPathTest(SecurityTestCase):
    """A client whose base URL holds its key (a segment of the path), or that put it after the
    method: the key reached a /metrics label and the DEBUG log line."""

    def test_a_key_in_the_path_reaches_no_metrics_label_no_log_line_and_no_record(self):
        rng = random.Random()
        keys = {name: "pathkey-%s-%024x" % (name, rng.getrandbits(96)) for name in ("goog", "query", "bearer", "pct")}
        keys["pct"] = keys["pct"].replace("-", "+", 1) + "/x"  # written percent-encoded in the path
        shaped = "AIzaSy" + "".join(rng.choice("abcdefghijkLMNOP0123456789_-") for _ in range(33))
        unknown = "unknown-%024x" % rng.getrandbits(96)
        gemini = "/v1beta/models/gemini-2.0-flash:generateContent"
        sent = [  # (path, headers): the secrets of the exchange are those of its headers and its query
            ("/v1beta/%s/models/gemini-2.0-flash:generateContent" % keys["goog"], {"x-goog-api-key": keys["goog"]}),
            ("%s/%s?key=%s" % (gemini, keys["query"], keys["query"]), {}),
            ("/v1/%s/chat/completions" % keys["bearer"], {"Authorization": "Bearer " + keys["bearer"]}),
            ("/v1/%s/chat/completions" % urllib.parse.quote(keys["pct"], safe=""),
             {"Authorization": "Bearer " + keys["pct"]}),
            # No secret of the exchange: a value shaped like a key, or like a ?key= parameter.
            ("%s/%s" % (gemini, shaped), {}),
            ("%s%%3Fkey%%3D%s" % (gemini, unknown), {}),
        ]
        providers = [provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                     provider("gemini", "gemini", self.upstream.url, "", ["gemini-*"])]
        proxy = self.start_proxy(providers)
        with self.assertLogs("proxy_llm.handler", "DEBUG") as logs:
            for path, headers in sent:
                status, _, _ = request(proxy.url, path=path, body={"model": "gpt-4o", "contents": []},
                                       headers=dict(headers, **{"Content-Type": "application/json"}))
                self.assertEqual(status, 200, path)
            proxy.flush()  # every exchange finished (its line logged) and recorded
        metrics = request(proxy.url, method="GET", path="/metrics", headers={})[2].decode()
        self.assertIn('endpoint="other"', metrics)
        logged = "\n".join(logs.output)
        for secret in list(keys.values()) + [shaped, unknown]:
            for where, text in (("metrics", metrics), ("log", logged)):
                self.assertNotIn(secret, text, where)
                self.assertNotIn(secret[8:], text, where)
        self.assertEqual(logged.count(" -> "), len(sent), logged)
        self.assertEqual(logged.count("[REDACTED]"), len(sent), logged)
        recs = proxy.records()
        self.assertEqual(len(recs), len(sent))
        files = b""
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                files += f.read()
        # In a record, every one is redacted from the path: a secret of the exchange (also
        # percent-encoded, under its header's fingerprint), and, though no header nor query
        # carried them, the value shaped like a key and the ?key= parameter's value.
        for secret in list(keys.values()) + [shaped, unknown]:
            self.assertNotIn(secret[8:].encode(), files)
        self.assertEqual([r["endpoint"].count("[REDACTED:") for r in recs], [1] * len(sent), [r["endpoint"] for r in recs])
        for rec in recs:  # a key in a header and in the path, percent-encoded or not: one fingerprint
            auth = rec["request_headers"].get("authorization")
            if auth:
                self.assertEqual(rec["endpoint"], "/v1/%s/chat/completions" % auth[len("Bearer "):])


class KeyCutInNotFoundTest(SecurityTestCase):
    def test_a_key_the_404s_message_would_cut_is_not_left_in_part(self):
        # A request of an API no provider serves gets a 404 naming its path, cut at 200
        # characters: a key that the cut went through left its start in the record's answer
        # (the scrub of the whole line finds the key whole, not its start).
        key = "sk-proj-" + "".join(random.Random().choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(40))
        path = "/v1/models/%s/%s" % ("x" * 170, key)
        self.assertLess(path.index(key), 200)
        self.assertGreater(path.index(key) + len(key), 200)  # (the cut goes through it)
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])])
        status, _, answer = request(proxy.url, method="GET", path=path,
                                    headers={"anthropic-version": "2023-06-01", "x-api-key": "client-key-1234"})
        self.assertEqual(status, 404)
        self.assertNotIn(key[:12].encode(), answer)
        proxy.flush()
        [rec] = proxy.records()
        self.assertEqual(rec["status_code"], 404)
        line = json.dumps(rec)
        self.assertNotIn(key[:12], line)
        self.assertIn("no provider configured", line)


class KeyInPathProcessTest(unittest.TestCase):
    """End to end: keys that only the path carries (a base URL set wrong), through the real
    entry point at DEBUG, an upstream that quotes the path it got, and the subcommands that
    read the records: the data dir, the log, /metrics, export, stats and verify hold none."""

    def test_a_key_only_the_path_holds_reaches_no_file_log_line_export_or_stats(self):
        rng = random.Random()
        goog = "AIzaSy" + "".join(rng.choice("abcdefghijkLMNOP0123456789_-") for _ in range(33))
        oai = "sk-proj-%032x" % rng.getrandbits(128)
        param = "param-%024x" % rng.getrandbits(96)
        header = "sk-header-%024x" % rng.getrandbits(96)
        tmp = tempfile.mkdtemp(prefix="proxy_llm_pathkey_")
        self.addCleanup(shutil.rmtree, tmp, True)
        data_dir = os.path.join(tmp, "data")

        def quote_the_path(req):
            body = json.dumps({"error": {"message": "no such path: " + req.target, "type": "invalid_request_error"}})
            return Reply(404, [("Content-Type", "application/json")], body.encode())
        upstream = FakeUpstream(quote_the_path).start()
        self.addCleanup(upstream.stop)
        proc = ProxyProcess(base_config([provider("openai", "openai", upstream.url, "", ["gpt-*"]),
                                         provider("gemini", "gemini", upstream.url, "", ["gemini-*"])], data_dir),
                            args=["--log-level", "DEBUG"])
        self.addCleanup(proc.cleanup)
        url = "http://127.0.0.1:%d" % proc.port
        sent = [
            ("/%s/v1beta/models/gemini-2.0-flash:generateContent" % goog, {}),  # not under /v1: the proxy's 404
            ("/v1beta/models/%s:generateContent" % goog, {}),  # the model's place: the session's too
            ("/v1/%s/chat/completions" % oai, {}),
            ("/v1/chat/completions;key=" + param, {}),
            ("/v1/%%73%s/chat/completions" % header[1:], {"Authorization": "Bearer " + header}),
        ]
        for path, headers in sent:
            status, _, answer = request(url, path=path, body={"model": "gpt-4o", "contents": []},
                                        headers=dict(headers, **{"Content-Type": "application/json"}))
            self.assertEqual(status, 404, answer)
        metrics = request(url, method="GET", path="/metrics", headers={})[2]
        self.assertEqual(proc.stop(), 0)
        outputs = {"log": proc.log_text().encode("utf-8"), "metrics": metrics}
        for path in all_files(data_dir):
            with open(path, "rb") as f:
                outputs[path] = f.read()
        outputs["file names"] = "\n".join(all_files(data_dir)).encode()
        env = dict(os.environ, PYTHONPATH=ROOT)
        for args in (["export", "--format", "records"], ["stats"], ["stats", "--json"], ["verify"]):
            done = subprocess.run([sys.executable, "-m", "proxy_llm"] + args + ["--data-dir", data_dir], cwd=tmp,
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
            self.assertEqual(done.returncode, 0, done.stderr)
            outputs[" ".join(args)] = done.stdout
            outputs[" ".join(args) + " (stderr)"] = done.stderr
        recorded = len(sent) - 1
        self.assertEqual(outputs["log"].count(b" -> "), recorded, outputs["log"])
        self.assertEqual(len(outputs["export --format records"].splitlines()), recorded)
        for where, data in outputs.items():
            for secret in (goog, oai, param, header):
                self.assertNotIn(secret[8:].encode(), data, where)
        recs = support.read_records(data_dir)
        self.assertEqual([r["endpoint"].count("[REDACTED:") for r in recs], [1] * recorded, [r["endpoint"] for r in recs])
        self.assertTrue(all("[REDACTED:" in r["error"]["message"] for r in recs), [r["error"] for r in recs])


class KeyInSessionTest(SecurityTestCase):
    def test_a_session_id_that_holds_a_secret_names_no_file_after_it(self):
        # A key in the model's place of a Gemini path (the session is the model's when nothing
        # else names one) named the session's directory and files after it.
        rng = random.Random()
        keys = ["sessionkey-%d-%024x" % (n, rng.getrandbits(96)) for n in range(3)]
        providers = [provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                     provider("gemini", "gemini", self.upstream.url, "", ["gemini-*"])]
        proxy = self.start_proxy(providers)
        for path, headers in (("/v1beta/models/%s:generateContent" % keys[0], {"x-goog-api-key": keys[0]}),
                              ("/v1beta/models/%s:generateContent?key=%s" % (keys[1], keys[1]), {}),
                              ("/v1/chat/completions", {"Authorization": "Bearer " + keys[2],
                                                        "X-Session-Id": "run-" + keys[2]})):
            status, _, _ = request(proxy.url, path=path, body={"model": "gpt-4o", "contents": []},
                                   headers=dict(headers, **{"Content-Type": "application/json"}))
            self.assertEqual(status, 200, path)
        recs = proxy.records()
        self.assertEqual(len(recs), 3)
        names = "\n".join(all_files(self.data_dir))
        for key in keys:
            self.assertNotIn(key[8:], names)
        self.assertEqual([r["session_id"].count("[REDACTED:") for r in recs], [1, 1, 1], [r["session_id"] for r in recs])
        self.assertEqual(len({r["session_id"] for r in recs}), 3)  # each its own session still

    def test_a_line_without_a_secret_is_finished_as_the_same_object(self):
        # The recorder checks the session id for a secret only when the scrub changed its line:
        # free for the common record, so this must hold for every kind of clean line.
        plain = ["sk-secret-0123456789", "sk-sla/sh-0123456789"]
        # (With only plain secrets, the escaped forms are searched for only where _finished's
        # one search for escapes finds some: each kind is here.)
        for secrets in (plain + ['has"quote-0123'], plain):
            pairs = wire.scrub_pairs(secrets, b"k" * 32)
            for line in (b'{"a":"plain text"}\n', b'{"a":"\\u0041 \\/ \\n \\ud83d\\ude00"}\n',
                         b'{"a":"\\u0073k-other"}\n', b'{"a":1234567890}\n'):
                with self.subTest(line=line, secrets=len(secrets)):
                    self.assertIs(record._finished(line, pairs), line)
            for line in (b'{"a":"sk-secret-0123456789"}\n', b'{"a":"\\u0073k-secret-0123456789"}\n',
                         b'{"a":"\\ud83d"}\n', b'{"a":"\\uDE00 \\n"}\n', b'{"a":"sk-sla\\/sh-0123456789"}\n',
                         b'{"a":"\\n\\"sk-secret-0123456789\\""}\n', b'{"a":"\\u00e9","b":"sk-secret-0123456789"}\n'):
                with self.subTest(line=line, secrets=len(secrets)):
                    self.assertIsNot(record._finished(line, pairs), line)


class DecodedCredentialTest(SecurityTestCase):
    def test_a_basic_password_and_cookie_values_echoed_by_the_upstream_reach_no_file(self):
        # The headers were redacted whole, but what an upstream may echo of them alone, the
        # password a Basic credential encodes and the value of a cookie, was not scrubbed.
        rng = random.Random()
        password = "pw-%024x" % rng.getrandbits(96)
        pair = "someone:" + password
        cookies = ["cookieval-%024x" % rng.getrandbits(96), "quoted-%024x" % rng.getrandbits(96)]
        echoed = [pair, password] + cookies
        text = "you sent " + " and ".join(echoed)
        event = json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
        self.replies += [
            Reply(401, [("Content-Type", "application/json")],
                  json.dumps({"error": {"message": text, "type": "invalid_request_error"}}).encode()),
            support.sse_reply([b"data: " + event.encode() + b"\n\n", b"data: [DONE]\n\n"]),
        ]
        proxy = self.start_proxy()
        headers = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode(),
                   "Cookie": 'sid=%s; pref="%s"; lang=en' % tuple(cookies), "Content-Type": "application/json"}
        for body in ({"model": "gpt-4o"}, {"model": "gpt-4o", "stream": True}):
            request(proxy.url, body=body, headers=headers)
        recs = proxy.records()
        self.assertEqual([r["status_code"] for r in recs], [401, 200])
        self.assertEqual(len(proxy.stream_lines()), 1)
        self.assertEqual(recs[0]["error"]["message"].count("[REDACTED:"), len(echoed))
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                data = f.read()
            for secret in echoed:
                self.assertNotIn(secret[8:].encode(), data, path)


    def test_a_key_sent_as_a_basic_user_name_without_password_echoed_alone_reaches_no_file(self):
        # Basic "<key>:" (a key as the user name, no password): only "<key>:" was scrubbed, and
        # the key the upstream echoed alone stayed in the record.
        key = "sk-%048x" % random.Random().getrandbits(192)
        self.replies += [Reply(401, [("Content-Type", "application/json"), ("X-Echo", key)], json.dumps(
            {"error": {"message": "Incorrect API key provided: " + key, "type": "invalid_request_error"}}).encode())]
        proxy = self.start_proxy()
        request(proxy.url, body={"model": "gpt-4o"}, headers={
            "Authorization": "Basic " + base64.b64encode((key + ":").encode()).decode(), "Content-Type": "application/json"})
        [rec] = proxy.records()
        self.assertEqual(rec["error"]["message"].count("[REDACTED:"), 1)
        self.assertIn("[REDACTED:", rec["response_headers"]["x-echo"])
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(key[3:].encode(), f.read(), path)

    def test_the_token_of_another_authorization_scheme_echoed_alone_reaches_no_file(self):
        # "Authorization: Key <token>" (fal.ai's form), "Api-Key <token>": the header was
        # redacted, but the token echoed alone in the answer and a header stayed.
        rng = random.Random()
        for scheme in ("Key", "Api-Key"):
            with self.subTest(scheme=scheme):
                token = "tok-%024x" % rng.getrandbits(96)
                self.replies += [Reply(200, [("Content-Type", "application/json"), ("X-Echo", token)],
                                       json.dumps({"choices": [{"index": 0, "message": {
                                           "role": "assistant", "content": "your key " + token}}]}).encode())]
                data_dir = os.path.join(self.tmp, scheme)
                proxy = self.start_proxy(data_dir=data_dir)
                request(proxy.url, body={"model": "gpt-4o"}, headers={
                    "Authorization": "%s %s" % (scheme, token), "Content-Type": "application/json"})
                [rec] = proxy.records()
                self.assertIn("[REDACTED:", rec["response_body"]["choices"][0]["message"]["content"])
                self.assertIn("[REDACTED:", rec["response_headers"]["x-echo"])
                files = all_files(data_dir)
                self.assertTrue(files)
                for path in files:
                    with open(path, "rb") as f:
                        self.assertNotIn(token[4:].encode(), f.read(), path)


class SplitAcrossEventsTest(SecurityTestCase):
    def test_a_key_the_events_spell_in_pieces_reaches_no_file(self):
        # A model quoting a key (an agent read a .env) streams it a token at a time: no event
        # held it whole, so the streams line kept every piece, and a reader joining the
        # events' text, as the record's body joins it, got the key back.
        rng = random.Random()
        client_key = "sk-proj-%048x" % rng.getrandbits(192)
        provider_key = "sk-ant-api03-%048x" % rng.getrandbits(192)
        said = "Your key is %s, keep it safe." % client_key
        openai_events = [support.chunk_event(said[i:i + 4]) for i in range(0, len(said), 4)]
        openai_events += [support.chunk_event("", "stop"), b"data: [DONE]\n\n"]
        arguments = json.dumps({"path": ".env", "content": "ANTHROPIC_API_KEY=%s\n" % provider_key})

        def anthropic(name, data):
            return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data, separators=(",", ":")).encode())
        anthropic_events = [
            anthropic("message_start", {"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
            anthropic("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "write_file", "input": {}}})]
        for i in range(0, len(arguments), 5):
            anthropic_events.append(anthropic("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": arguments[i:i + 5]}}))
            anthropic_events.append(anthropic("ping", {"type": "ping"}))
        anthropic_events += [
            anthropic("content_block_stop", {"type": "content_block_stop", "index": 0}),
            anthropic("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                        "usage": {"output_tokens": 40}}),
            anthropic("message_stop", {"type": "message_stop"})]
        self.replies += [support.sse_reply(openai_events), support.sse_reply(anthropic_events)]
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", self.upstream.url, provider_key, ["claude-*"])])
        request(proxy.url, body={"model": "gpt-4o", "stream": True},
                headers={"Authorization": "Bearer " + client_key, "Content-Type": "application/json"})
        request(proxy.url, path="/v1/messages", body={"model": "claude-x", "max_tokens": 100, "stream": True},
                headers={"x-api-key": "client-side", "anthropic-version": "2023-06-01", "Content-Type": "application/json"})
        recs = proxy.records()
        self.assertEqual([(r["status_code"], r["ended"]) for r in recs], [(200, "completed")] * 2)
        self.assertIn("[REDACTED:", recs[0]["response_body"]["choices"][0]["message"]["content"])
        lines = {line["id"]: line for line in proxy.stream_lines()}
        joined = {}
        for rec, count in zip(recs, (len(openai_events), len(anthropic_events))):
            events = lines[rec["id"]]["events"]
            self.assertEqual(len(events), count)
            datas = [json.loads(e["data"]) for e in events if e["data"] != "[DONE]"]
            joined[rec["provider"]] = "".join(
                [c["delta"].get("content") or "" for d in datas for c in d.get("choices", ())]
                + [d["delta"].get("partial_json", "") for d in datas if d.get("type") == "content_block_delta"])
        self.assertEqual(joined["openai"], said.replace(client_key, recs[0]["request_headers"]["authorization"][7:]))
        with open(os.path.join(self.data_dir, KEY_FILE), "rb") as f:
            fingerprint_key = f.read()
        self.assertEqual(json.loads(joined["anthropic"])["content"],
                         "ANTHROPIC_API_KEY=%s\n" % wire.redacted(provider_key, fingerprint_key))
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                data = f.read()
            for key in (client_key, provider_key):
                self.assertNotIn(key[12:24].encode(), data, path)


class GatewayKeyTest(SecurityTestCase):
    def test_a_gateways_key_is_forwarded_but_reaches_no_file(self):
        # A base_url may be a gateway in front of the provider (Azure API Management, Cloudflare
        # AI Gateway, Helicone, Portkey), which takes its own key in a header of its own: those
        # were recorded in clear. They go on to the gateway as they came.
        rng = random.Random()
        keys = {"Ocp-Apim-Subscription-Key": "%032x" % rng.getrandbits(128),
                "cf-aig-authorization": "Bearer cfaig-%024x" % rng.getrandbits(96),
                "Helicone-Auth": "Bearer sk-helicone-%024x" % rng.getrandbits(96),
                "x-portkey-api-key": "pk-%024x" % rng.getrandbits(96)}
        values = [v.split()[-1] for v in keys.values()]
        text = "you sent " + " and ".join(values)
        self.replies.append(support.json_reply({"id": "x", "choices": [{"index": 0, "message": {"content": text}}]}))
        proxy = self.start_proxy()
        headers = dict(keys, **{"Content-Type": "application/json"})
        status, _, answer = request(proxy.url, body={"model": "gpt-4o"}, headers=headers)
        self.assertEqual(status, 200)
        self.assertIn(text.encode(), answer)  # (the client gets the answer as it came)
        got = self.upstream.requests.get(timeout=DEADLINE)
        for name, value in keys.items():
            self.assertEqual(header(got.headers, name), value, name)
        rec = proxy.records()[0]
        for name in keys:
            self.assertIn("[REDACTED:", rec["request_headers"][name.lower()], name)
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"].count("[REDACTED:"), len(values))
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                data = f.read()
            for secret in values:
                self.assertNotIn(secret[6:].encode(), data, path)


class SecondQuestionMarkTest(SecurityTestCase):
    def test_a_key_after_a_second_question_mark_reaches_no_file(self):
        # A client that appends "?key=" to a URL with a query already: the key was taken for the
        # value of the parameter before it, kept in clear in "query" and not scrubbed from an echo.
        key = "AIzaQmark-%024x" % random.Random().getrandbits(96)
        self.replies.append(Reply(400, [("Content-Type", "application/json")], json.dumps(
            {"error": {"code": 400, "message": "API key not valid: " + key, "status": "INVALID_ARGUMENT"}}).encode()))
        proxy = self.start_proxy([provider("gemini", "gemini", self.upstream.url, "", ["gemini-*"])])
        status, _, answer = request(proxy.url, path="/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse?key="
                                    + key, body={"contents": []}, headers={"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertIn(key.encode(), answer)  # relayed as it came
        self.assertEqual(self.upstream.next_request().query, "alt=sse?key=" + key)  # forwarded as it came
        recs = proxy.records()
        self.assertEqual(len(recs), 1)
        self.assertRegex(recs[0]["query"], r"^alt=sse\?key=\[REDACTED:[0-9a-f]{8}\]$")
        self.assertIn("[REDACTED:", recs[0]["error"]["message"])
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(key[8:].encode(), f.read(), path)


class CutThroughKeyTest(SecurityTestCase):
    def test_a_body_cut_at_capture_max_body_through_a_key_keeps_no_start_of_it(self):
        # The cut left the key's first characters at the end of the part kept, where no scrub
        # found them: the client's key in its request, an upstream echoing it, plain, escaped,
        # or in a stream.
        cap = 256
        key = "~cut-key-%024x" % random.Random().getrandbits(96)  # "~": in no other part of a record
        escaped = "".join("\\u%04x" % ord(c) for c in key)

        def straddling(form, cut_at, head, tail):
            return head + "x" * (cap - cut_at - len(head)) + form + tail

        request_body = straddling(key, 12, '{"model":"gpt-4o","messages":[{"role":"user","content":"', '"}]}')
        event = straddling(key, 7, 'data: {"choices":[{"index":0,"delta":{"content":"', '"}}]}\n\n')
        self.replies += [
            Reply(401, [("Content-Type", "application/json")],
                  straddling(key, 20, '{"error":{"message":"', '"}}').encode()),
            Reply(401, [("Content-Type", "application/json")],
                  straddling(escaped, 40, '{"error":{"message":"', '"}}').encode()),
            support.sse_reply([event[:100].encode(), event[100:].encode(), b"data: [DONE]\n\n"]),
        ]
        proxy = self.start_proxy(capture_max_body=cap)
        headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
        for n in range(3):
            body = request_body if n < 2 else request_body.replace('"messages"', '"stream":true,"messages"')
            status, _, answer = request(proxy.url, body=body.encode(), headers=headers)
            self.assertEqual(self.upstream.next_request().body, body.encode())  # forwarded whole
            self.assertIn(key[:20].encode() if n != 1 else escaped[:20].encode(), answer)  # relayed whole
        recs = proxy.records()
        self.assertEqual([sorted(r["truncated"]) for r in recs], [["request", "response"]] * 3)
        self.assertEqual([r["truncated"]["response"]["kept"] for r in recs], [cap] * 3)
        self.assertEqual(len(proxy.stream_lines()), 1)
        for path in all_files(self.data_dir):
            if os.path.basename(path) == KEY_FILE:  # 32 random bytes: a "~" one run in eight
                continue
            with open(path, "rb") as f:
                self.assertNotIn(b"~", f.read(), path)


class EndedThroughKeyTest(SecurityTestCase):
    def test_a_body_ended_early_through_a_key_keeps_no_start_of_it(self):
        # Only a body cut at capture_max_body lost the start of a key the cut went through: an
        # answer whose connection was reset in the middle of its echo of the key, or a request
        # whose client left in the middle of it, kept its first characters in the record.
        key = "sk-proj-%048x" % random.Random().getrandbits(192)
        echo = b'{"error":{"message":"Incorrect API key provided: ' + key.encode() + b'","type":"invalid_request_error"}}'
        self.replies.append(Reply(401, [("Content-Type", "application/json")], [echo[:echo.index(key.encode()) + 30], "RESET"]))
        proxy = self.start_proxy()
        with self.assertLogs("proxy_llm.upstream", "WARNING"):  # (the reset, told)
            with self.assertRaises((http.client.HTTPException, OSError)):
                request(proxy.url, body={"model": "gpt-4o"}, headers={"Authorization": "Bearer " + key,
                                                                      "Content-Type": "application/json"})
            sent = b'{"model":"gpt-4o","messages":[{"role":"user","content":"my .env: OPENAI_API_KEY=' + key[:30].encode()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (key.encode(), len(sent) + 100, sent))
                sock.shutdown(socket.SHUT_WR)
                support.read_to_eof(sock)
            recs = proxy.records()
        self.assertEqual([r["ended"] for r in recs], ["upstream_error", "client_aborted"])
        self.assertTrue(recs[0]["response_body"].endswith("provided: "), recs[0]["response_body"])
        self.assertTrue(recs[1]["request_body"].endswith("OPENAI_API_KEY="), recs[1]["request_body"])
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(key[:12].encode(), f.read(), path)


class EscapedEchoTest(SecurityTestCase):
    """An upstream that echoes the provider key JSON-escaped (\\u0073..., \\/): a reader of the
    record, of its streams line or of an export would decode it back to the key."""

    KEY = "sk-proj-ESCAPEDkey/0123456789abcd"

    def test_escaped_echoes_of_the_key_reach_no_file_and_no_export(self):
        key = self.KEY

        def uesc(text, upper=False):
            return "".join(("\\u%04X" if upper else "\\u%04x") % ord(c) for c in text)
        data = json.dumps({"choices": [{"index": 0, "delta": {"content": "key " + uesc(key)}}]})
        self.replies += [
            Reply(401, [("Content-Type", "application/json")],
                  ('{"error":{"message":"Incorrect API key provided: %s","type":"invalid_request_error"}}'
                   % uesc(key)).encode()),
            Reply(401, [("Content-Type", "application/json")],
                  ('{"error":{"message":"Incorrect API key provided: %s"}}' % key.replace("/", "\\/")).encode()),
            support.sse_reply([b"data: " + data.encode() + b"\n\n",
                               ('data: {"choices":[{"index":0,"delta":{"content":" and %s%s"},"finish_reason":"stop"}]}\n\n'
                                % (key[:4], uesc(key[4:], upper=True))).encode(), b"data: [DONE]\n\n"]),
            Reply(200, [("Content-Type", "application/json")], json.dumps({
                "id": "c1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": None, "tool_calls": [{
                        "id": "t1", "type": "function", "function": {
                            "name": "save", "arguments": '{"key":"%s"}' % uesc(key)}}]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()),
        ]
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, key, ["gpt-*"])])
        for body in ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},) * 2 + (
                {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "save it"}]}):
            status, _, _ = request(proxy.url, body=body)
            self.assertIn(status, (200, 401))
        self.assertEqual(self.upstream.next_request().header("Authorization"), "Bearer " + key)
        recs = proxy.records()
        self.assertEqual(len(recs), 4)
        self.assertEqual(len(proxy.stream_lines()), 1)
        redaction = "[REDACTED:"
        self.assertIn(redaction, recs[0]["error"]["message"])
        self.assertIn(redaction, recs[1]["response_body"]["error"]["message"])
        outputs = {}
        for path in all_files(self.data_dir):
            if path.endswith(".jsonl"):
                with open(path, "rb") as f:
                    outputs[path] = f.read()
        env = dict(os.environ, PYTHONPATH=ROOT)
        for fmt in ("records", "openai-chat", "sharegpt"):
            done = subprocess.run([sys.executable, "-m", "proxy_llm", "export", "--data-dir", self.data_dir,
                                   "--format", fmt], env=env, cwd=self.tmp, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=DEADLINE * 3)
            self.assertEqual(done.returncode, 0, done.stderr)
            outputs["export " + fmt] = done.stdout
        self.assertIn(b"REDACTED", outputs["export records"])
        forms = [key, key[8:], key.replace("/", "\\/"), "\\u0073\\u006b", "\\u0073\\u006B", "\\u0053\\u0045"]
        for where, data in outputs.items():
            for line in data.splitlines():
                for form in forms:
                    self.assertNotIn(form.encode(), line, where)
                for text in _strings(json.loads(line)):
                    self.assertNotIn(key[8:], text, where)


class CanaryTest(unittest.TestCase):
    """Every credential the proxy sees, in every place it can write, must be absent."""

    def test_no_secret_reaches_any_output(self):
        rng = random.Random()
        canary = {name: "canary-%s-%024x" % (name, rng.getrandbits(96)) for name in
                  ("auth", "auth2", "xapikey", "apikey", "goog", "proxyauth", "cookie", "query", "provider")}
        tmp = tempfile.mkdtemp(prefix="proxy_llm_canary_")
        self.addCleanup(shutil.rmtree, tmp, True)
        data_dir = os.path.join(tmp, "data")
        received = []

        def echo(req):
            received.append(req)
            seen = "; ".join("%s: %s" % kv for kv in req.headers) + " target=" + req.target
            if req.json().get("stream"):
                event = json.dumps({"choices": [{"index": 0, "delta": {"content": seen}}]})
                return Reply(200, [("Content-Type", "text/event-stream"), ("X-Echo", seen)],
                             [b"data: " + event.encode() + b"\n\n", b"data: [DONE]\n\n"])
            body = json.dumps({"error": {"message": "Incorrect API key provided: " + seen, "type": "invalid_request_error"}})
            return Reply(401, [("Content-Type", "application/json"), ("X-Echo", seen)], body.encode())
        upstream = FakeUpstream(echo).start()
        self.addCleanup(upstream.stop)
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_url = "http://127.0.0.1:%d" % dead.getsockname()[1]
        dead.close()
        cfg = base_config([provider("openai", "openai", upstream.url, "", ["gpt-*"]),
                           provider("anthropic", "anthropic", upstream.url, canary["provider"], ["claude-*"]),
                           provider("gemini", "gemini", dead_url, "", ["gemini-*"]),
                           # Keyless, for the credentials of their APIs to flow (an openai provider
                           # gets neither Anthropic's nor Gemini's).
                           provider("anthropic-pass", "anthropic", upstream.url, "", ["sonnet-pass-*"]),
                           provider("gemini-pass", "gemini", upstream.url, "", ["gemma-pass-*"])],
                          data_dir, max_file_size=1024, compress_rotated=True, fsync="always", max_request_body=4096)
        proc = ProxyProcess(cfg, args=["--log-level", "DEBUG"])
        self.addCleanup(proc.cleanup)
        url = "http://127.0.0.1:%d" % proc.port
        creds = {"Authorization": "Bearer " + canary["auth"], "x-api-key": canary["xapikey"], "api-key": canary["apikey"],
                 "x-goog-api-key": canary["goog"], "Proxy-Authorization": "Basic " + canary["proxyauth"],
                 "Cookie": "session=" + canary["cookie"], "Content-Type": "application/json"}
        query = "?key=" + canary["query"]
        proxy_bodies = []  # answers the proxy wrote itself
        relayed = []
        for n in range(4):
            relayed.append(request(url, path="/v1/chat/completions" + query, body={"model": "gpt-4o"}, headers=creds))
            relayed.append(request(url, path="/v1/chat/completions" + query, body={"model": "gpt-4o", "stream": True},
                                   headers=creds))
        relayed.append(request(url, path="/v1/messages" + query, body={"model": "claude-x"}, headers=creds))
        relayed.append(request(url, path="/v1/messages" + query, body={"model": "sonnet-pass-1"}, headers=creds))
        relayed.append(request(url, path="/v1beta/models/gemma-pass-1:generateContent" + query, body={"contents": []},
                               headers=creds))
        other = dict(creds, Authorization="Bearer " + canary["auth2"])
        relayed.append(request(url, path="/v1/chat/completions", body={"model": "gpt-4o"}, headers=other))
        for path, body in (("/v1beta/models/gemini-2.0-flash:generateContent" + query, {"contents": []}),  # 502
                           ("/nowhere" + query, {}),  # 404
                           ("/v1/chat/completions" + query, {"model": "gpt-4o", "pad": "x" * 5000})):  # 413
            status, headers, answer = request(url, path=path, body=body, headers=creds)
            self.assertGreaterEqual(status, 400)
            proxy_bodies.append(answer)
        bad = raw_exchange(proc.port, b"POST /v1/chat/completions" + query.encode() + b" HTTP/1.1\r\nAuthorization: Bearer "
                           + canary["auth"].encode() + b"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        proxy_bodies.append(bad)
        metrics = request(url, method="GET", path="/metrics", headers={})[2]
        health = request(url, method="GET", path="/health", headers={})[2]
        self.assertEqual(proc.stop(), 0)

        # The canaries did flow: the upstream got them and echoed them (relayed verbatim).
        echoed = b"".join(body for _, _, body in relayed)
        for name in ("auth", "xapikey", "apikey", "goog", "cookie", "query", "provider"):
            self.assertIn(canary[name].encode(), echoed, name)
        for req in received:  # but no provider got another API's credential
            seen = "; ".join("%s: %s" % kv for kv in req.headers) + " target=" + req.target
            foreign = {"/v1/chat/": ("xapikey", "goog", "query"), "/v1/messa": ("goog", "query"),
                       "/v1beta/m": ("xapikey", "apikey")}[req.path[:9]]
            for name in foreign:
                self.assertNotIn(canary[name], seen, "%s reached %s" % (name, req.path))

        outputs = {"log": proc.log_text().encode("utf-8"), "metrics": metrics, "health": health}
        for n, body in enumerate(proxy_bodies):
            outputs["proxy answer %d" % n] = body
        files = all_files(data_dir)
        self.assertTrue(any(p.endswith(".jsonl.gz") for p in files), files)  # rotated and compressed
        self.assertTrue(any(os.sep + "streams" + os.sep in p for p in files))
        for path in files:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                outputs[path] = f.read()
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        for d, _, _ in os.walk(data_dir):
            self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700, d)
        self.assertIn(b"DEBUG", outputs["log"])
        # The operator's lines (proxy_llm.notices) are in the log searched: the unreachable
        # provider's WARNING, and the 401s (whose bodies echo every credential) told at INFO.
        self.assertRegex(outputs["log"], rb"WARNING proxy_llm\.upstream: upstream gemini \(127\.0\.0\.1:\d+\) "
                                         rb"unreachable: ConnectionRefusedError: ")
        for name, advice in (("openai", b"it has no api_key"), ("anthropic", b"check its api_key")):
            self.assertRegex(outputs["log"], rb"INFO proxy_llm\.upstream: provider %s answered 401 \(\w+\): %s" % (
                name.encode(), advice))
        for where, data in outputs.items():
            for name, secret in canary.items():
                self.assertNotIn(secret.encode(), data, "%s leaked into %s" % (name, where))
                self.assertNotIn(secret[8:].encode(), data, "part of %s leaked into %s" % (name, where))

        stats = reader.ReadStats()
        recs = list(reader.iter_records(data_dir, stats))
        self.assertTrue(stats.ok, stats.summary())
        self.assertEqual(len(recs), 15)  # 12 relayed, 502, 413, 400 (the 404 is not under /v1)
        auth = [r["request_headers"].get("authorization") for r in recs if r["endpoint"] == "/v1/chat/completions"
                and r["status_code"] != 413]
        fingerprints = {v for v in auth if v}
        self.assertEqual(len(fingerprints), 2, fingerprints)  # two keys, two fingerprints; same key, same one
        for value in fingerprints:
            self.assertRegex(value, r"^Bearer \[REDACTED:[0-9a-f]{8}\]$")
        # Every record of a request sent with the full set of credentials (all but the raw 400,
        # whose record may come first in its file: records are written as exchanges end).
        full = [r for r in recs if "x-api-key" in r["request_headers"]]
        self.assertEqual(len(full), 14, [(r["endpoint"], r["status_code"]) for r in recs])
        for rec in full:
            if rec["query"]:
                self.assertRegex(rec["query"], r"^key=\[REDACTED:[0-9a-f]{8}\]$")
            for name in ("x-api-key", "api-key", "x-goog-api-key", "proxy-authorization", "cookie"):
                self.assertIn("[REDACTED:", rec["request_headers"][name])
        self.assertEqual(sum(1 for r in full if r["query"]), 13)  # all but "other"


if __name__ == "__main__":
    unittest.main()
