"""Providers reached through an HTTP egress proxy (``upstream_proxy``, a provider's ``proxy``).

A real forward proxy (``support.EgressProxy``) on 127.0.0.1: https providers through its
CONNECT tunnel (TLS to the fake upstream inside it, tests/tls_upstream.pem trusted by
``ca_file``), http ones in absolute form. Its credentials go to it alone, and to no file or
log line.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from proxy_llm import config
from proxy_llm.config import ConfigError
from tests import support
from tests.support import DEADLINE, chunk_event, sse_reply
from tests.test_faults import CHAT_BODY, CHAT_REPLY, PLAIN_BODY, content_of
from tests.test_tls import FIXTURE, TlsUpstreamCase

PASSWORD = "pr0xy-Passw0rd-7f3a91"
WRONG = "wr0ng-Passw0rd-c2d4e8"
STREAM = [chunk_event("Hel"), chunk_event("lo", "stop"), b"data: [DONE]\n\n"]


def token(credentials: str) -> str:
    return base64.b64encode(credentials.encode()).decode()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def exchange(proxy, body: bytes, path: str = "/v1/chat/completions"):
    """(status, headers but the record id, body) of one request, as a client reads them."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert proxy.server.wait_idle(DEADLINE)  # the upstream connection is back in its pool
    return resp.status, [(k, v) for k, v in resp.getheaders() if k != "X-Proxy-Record-Id"], data


def openai(name, url, models, **extra):
    return dict(support.provider(name, "openai", url, "", models), **extra)


class Egress:
    """A started ``support.EgressProxy``, stopped at cleanup."""

    def start_egress(self, **kwargs) -> support.EgressProxy:
        egress = support.EgressProxy(**kwargs).start()
        self.addCleanup(egress.stop)
        return egress


class TunnelTest(Egress, TlsUpstreamCase):
    """https providers through a CONNECT tunnel."""

    def test_requests_and_a_stream_through_one_tunnel_as_if_direct(self):
        egress = self.start_egress(credentials="alice:" + PASSWORD)
        proxy = self.start_proxy(providers=[
            openai("openai", self.upstream.url, ["gpt-*"], ca_file=FIXTURE, proxy=egress.url_with("alice:" + PASSWORD)),
            openai("direct", self.upstream.url, ["direct-*"], ca_file=FIXTURE)])
        tunnelled = [exchange(proxy, PLAIN_BODY)]
        self.replies.append(sse_reply(STREAM))
        tunnelled.append(exchange(proxy, CHAT_BODY))
        tunnelled.append(exchange(proxy, PLAIN_BODY))
        direct = [exchange(proxy, PLAIN_BODY.replace(b"gpt-4o", b"direct-4o"))]
        self.replies.append(sse_reply(STREAM))
        direct.append(exchange(proxy, CHAT_BODY.replace(b"gpt-4o", b"direct-4o")))
        self.assertEqual(tunnelled[:2], direct, "the client saw a difference")
        self.assertEqual([(t[0], t[2]) for t in tunnelled], [(200, CHAT_REPLY), (200, b"".join(STREAM)),
                                                             (200, CHAT_REPLY)])
        # One tunnel for the three: kept alive and pooled as a direct connection is.
        self.assertEqual(egress.tunnels, 1)
        self.assertEqual(egress.seen, [("CONNECT", "127.0.0.1:%d" % self.upstream.port,
                                        "Basic " + token("alice:" + PASSWORD))])
        for _ in range(5):
            req = self.upstream.next_request()
            self.assertIsNone(req.header("Proxy-Authorization"))
            self.assertEqual(req.header("Host"), "127.0.0.1:%d" % self.upstream.port)
        recs = proxy.records()
        self.assertEqual([(r["provider"], r["ended"]) for r in recs],
                         [("openai", "completed")] * 3 + [("direct", "completed")] * 2)
        self.assertEqual(content_of(recs[1]), "Hello")
        for path in support.all_files(proxy.data_dir):
            data = read(path)
            for secret in (PASSWORD, token("alice:" + PASSWORD)):
                self.assertNotIn(secret.encode(), data, path)

    def test_a_refused_tunnel_is_a_502_in_the_providers_shape(self):
        """407 (wrong credentials), 403 (a policy), 502 (the proxy cannot reach the provider):
        the client gets its provider's error shape naming the proxy and its answer, recorded
        once; nothing reaches the upstream."""
        cases = [("407 Proxy Authentication Required", dict(credentials="alice:" + PASSWORD)),
                 ("403 Forbidden", dict(refuse=403)), ("502 Bad Gateway", dict(refuse=502))]
        for answer, kwargs in cases:
            with self.subTest(answer=answer):
                egress = self.start_egress(**kwargs)
                url = egress.url_with("alice:" + WRONG)
                proxy = self.start_proxy(data_dir=os.path.join(self.tmp, answer[:3]), providers=[
                    openai("openai", self.upstream.url, ["gpt-*"], ca_file=FIXTURE, proxy=url),
                    dict(support.provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"]),
                         ca_file=FIXTURE, proxy=url)])
                message = "upstream %%s unreachable: the egress proxy 127.0.0.1:%d refused the tunnel: %s" % (
                    egress.port, answer)
                status, _, body = exchange(proxy, PLAIN_BODY)
                self.assertEqual(status, 502)
                self.assertEqual(json.loads(body)["error"]["message"], message % "openai")
                self.assertEqual(json.loads(body)["error"]["type"], "server_error")
                status, _, body = exchange(proxy, b'{"model":"claude-x","max_tokens":1}', "/v1/messages")
                self.assertEqual((status, json.loads(body)["type"]), (502, "error"))
                self.assertEqual(json.loads(body)["error"], {"type": "api_error", "message": message % "anthropic"})
                recs = proxy.records()
                self.assertEqual([(r["ended"], r["error"]["type"], r["error"]["message"]) for r in recs],
                                 [("upstream_error", "upstream_unavailable", message % p) for p in ("openai", "anthropic")])
                self.assertTrue(self.upstream.requests.empty(), "a request went past a refusing proxy")
                self.assertEqual([s[0] for s in egress.seen], ["CONNECT", "CONNECT"])

    def test_the_certificate_is_checked_against_the_provider_through_the_global_proxy(self):
        """upstream_proxy carries a provider that is not on loopback; the proxy resolves its
        name (the host may have no DNS of its own), and TLS inside the tunnel is checked
        against that name, not the proxy's: tests/tls_upstream.pem is for 127.0.0.1 only."""
        egress = self.start_egress(hosts={"api.provider.test": "127.0.0.1"})
        url = "https://api.provider.test:%d" % self.upstream.port
        proxy = self.start_proxy(providers=[openai("openai", url, ["gpt-*"], ca_file=FIXTURE)],
                                 upstream_proxy=egress.url)
        status, _, body = exchange(proxy, PLAIN_BODY)
        self.assertEqual(status, 502, body)
        message = json.loads(body)["error"]["message"]
        self.assertTrue(message.startswith("upstream openai unreachable via the egress proxy 127.0.0.1:%d: "
                                           % egress.port), message)
        self.assertIn("certificate verify failed", message)
        self.assertIn("api.provider.test", message)
        self.assertEqual(egress.seen, [("CONNECT", "api.provider.test:%d" % self.upstream.port, None)])
        self.assertTrue(self.upstream.requests.empty())

    def test_a_proxy_that_does_not_answer_connect_is_a_timeout(self):
        """connect_timeout bounds the CONNECT's answer too: a proxy that takes the connection
        and says nothing gives a 504, recorded as a timeout."""
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # (never accepted: the connection is made, nothing is ever answered)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        proxy = self.start_proxy(providers=[openai("openai", self.upstream.url, ["gpt-*"], ca_file=FIXTURE, proxy=url)],
                                 connect_timeout=0.3)
        status, _, body = exchange(proxy, PLAIN_BODY)
        self.assertEqual(status, 504, body)
        self.assertEqual(json.loads(body)["error"]["message"],
                         "upstream openai did not answer in time via the egress proxy 127.0.0.1:%d"
                         % silent.getsockname()[1])
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "timeout")


    def test_a_proxy_that_dribbles_its_connect_answer_is_cut_at_connect_timeout(self):
        """connect_timeout bounds the whole CONNECT exchange, not each read of its answer: a
        proxy that sends its answer a byte every 50 ms (each well within the timeout, 22 s in
        all) gives a 504 once the timeout has passed. It held the request to the end before."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        answer = b"HTTP/1.1 200 Connection established\r\nX-Pad: " + b"x" * 400 + b"\r\n\r\n"
        stop = threading.Event()
        self.addCleanup(stop.set)
        sent = queue.Queue()

        def dribble():
            conn, _ = listener.accept()
            n = 0
            with conn:
                conn.recv(65536)  # (the CONNECT head, in one write)
                while n < len(answer) and not stop.wait(0.05):
                    try:
                        conn.sendall(answer[n:n + 1])
                    except OSError:  # the proxy gave up on it
                        break
                    n += 1
            sent.put(n)

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        self.addCleanup(thread.join, DEADLINE)
        url = "http://alice:%s@127.0.0.1:%d" % (PASSWORD, listener.getsockname()[1])
        proxy = self.start_proxy(providers=[openai("openai", self.upstream.url, ["gpt-*"], ca_file=FIXTURE, proxy=url)],
                                 connect_timeout=0.5)
        started = time.monotonic()
        status, _, body = exchange(proxy, PLAIN_BODY)
        elapsed = time.monotonic() - started
        self.assertEqual(status, 504, body)
        self.assertEqual(json.loads(body)["error"], {
            "message": "upstream openai did not answer in time via the egress proxy 127.0.0.1:%d"
                       % listener.getsockname()[1], "type": "timeout", "param": None, "code": "upstream_timeout"})
        self.assertLess(elapsed, 5.0, "the dribbling proxy held the request")
        # The proxy was still sending when it was cut, after several bytes (each read got one
        # within the timeout: a timeout per read never passed).
        n = sent.get(timeout=DEADLINE)
        self.assertTrue(3 <= n < len(answer), n)
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["status_code"], rec["error"]["type"]),
                         ("timeout", 504, "upstream_timeout"))


class ForwardTest(Egress, support.ProxyTestCase):
    """http providers through the proxy, in absolute form; loopback providers past it."""

    def test_an_http_provider_through_the_global_proxy_in_absolute_form(self):
        egress = self.start_egress(credentials="alice:" + PASSWORD, hosts={"api.provider.test": "127.0.0.1"})
        url = "http://api.provider.test:%d/base" % self.upstream.port
        proxy = self.start_proxy(providers=[openai("openai", url, ["gpt-*"])],
                                 upstream_proxy=egress.url_with("alice:" + PASSWORD))
        self.replies.append(support.json_reply({"id": "a"}))
        self.replies.append(sse_reply(STREAM))
        self.assertEqual(exchange(proxy, PLAIN_BODY)[2], b'{"id": "a"}')
        self.assertEqual(exchange(proxy, CHAT_BODY)[2], b"".join(STREAM))
        target = "http://api.provider.test:%d/base/v1/chat/completions" % self.upstream.port
        self.assertEqual(egress.seen, [("POST", target, "Basic " + token("alice:" + PASSWORD))] * 2)
        for _ in range(2):
            req = self.upstream.next_request()
            self.assertEqual((req.target, req.header("Host")), ("/base/v1/chat/completions",
                                                                "api.provider.test:%d" % self.upstream.port))
            self.assertIsNone(req.header("Proxy-Authorization"))
        self.assertEqual([r["ended"] for r in proxy.records()], ["completed", "completed"])

    def test_a_407_to_an_absolute_form_request_is_a_502(self):
        egress = self.start_egress(credentials="alice:" + PASSWORD)
        proxy = self.start_proxy(providers=[openai("openai", self.upstream.url, ["gpt-*"],
                                                   proxy=egress.url_with("alice:" + WRONG))])
        status, _, body = exchange(proxy, PLAIN_BODY)
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["message"], "upstream openai unreachable: the egress proxy "
                         "127.0.0.1:%d refused the request: 407 Proxy Authentication Required" % egress.port)
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["status_code"]), ("upstream_error", 502))
        self.assertTrue(self.upstream.requests.empty())

    def test_loopback_providers_bypass_the_global_proxy(self):
        """A provider on this machine is reached directly, whatever upstream_proxy says (no
        egress proxy reaches this host's loopback); one that names the proxy itself is not."""
        egress = self.start_egress()
        port = self.upstream.port
        proxy = self.start_proxy(providers=[
            openai("ip", "http://127.0.0.1:%d" % port, ["gpt-*"]),
            openai("name", "http://localhost:%d" % port, ["local-*"]),
            openai("own", "http://127.0.0.1:%d" % port, ["own-*"], proxy=egress.url)], upstream_proxy=egress.url)
        self.assertEqual(exchange(proxy, PLAIN_BODY)[0], 200)
        self.assertEqual(exchange(proxy, PLAIN_BODY.replace(b"gpt-4o", b"local-1"))[0], 200)
        self.assertEqual(egress.seen, [])
        self.assertEqual(exchange(proxy, PLAIN_BODY.replace(b"gpt-4o", b"own-1"))[0], 200)
        self.assertEqual(egress.seen, [("POST", "http://127.0.0.1:%d/v1/chat/completions" % port, None)])


    def test_a_provider_no_proxy_names_goes_direct_and_another_through_the_proxy(self):
        """no_proxy with ports: ``0.0.0.0:<port>`` keeps the provider at that address and port
        off the proxy (a connection to 0.0.0.0 reaches this host's 127.0.0.1 on Linux and
        macOS, and 0.0.0.0 is no loopback address: only no_proxy keeps it off), while
        ``API.provider.test:1`` names another port of the other provider's host, which goes
        through the proxy. Such entries were refused at start before."""
        egress = self.start_egress(hosts={"api.provider.test": "127.0.0.1"})
        port = self.upstream.port
        proxy = self.start_proxy(providers=[
            openai("direct", "http://0.0.0.0:%d" % port, ["gpt-*"]),
            openai("proxied", "http://api.provider.test:%d" % port, ["other-*"])],
            upstream_proxy=egress.url, no_proxy="API.provider.test:1, 0.0.0.0:%d" % port)
        self.assertEqual(exchange(proxy, PLAIN_BODY)[0], 200)
        self.assertEqual(exchange(proxy, PLAIN_BODY.replace(b"gpt-4o", b"other-1"))[0], 200)
        self.assertEqual(egress.seen, [("POST", "http://api.provider.test:%d/v1/chat/completions" % port, None)])
        self.assertEqual([self.upstream.next_request().header("Host") for _ in range(2)],
                         ["0.0.0.0:%d" % port, "api.provider.test:%d" % port])
        self.assertEqual([(r["provider"], r["ended"]) for r in proxy.records()],
                         [("direct", "completed"), ("proxied", "completed")])


class SecretTest(Egress, support.ProxyTestCase):
    def test_the_proxy_password_is_in_no_file_log_line_or_page(self):
        """The proxy as a subprocess at DEBUG: a tunnel, a refused tunnel, an absolute-form
        request, and a client that put the password in its path (scrubbed as a provider key
        is); the password and its Basic token are in no record, no log line, neither /health
        nor /metrics."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(FIXTURE)
        tls = support.FakeUpstream(lambda req: support.json_reply({"ok": True}), tls=context).start()
        self.addCleanup(tls.stop)
        tls.server.handle_error = lambda request, address: None
        egress = self.start_egress(credentials="alice:" + PASSWORD, hosts={"api.provider.test": "127.0.0.1"})
        cfg = support.base_config([
            openai("openai", tls.url, ["gpt-*"], ca_file=FIXTURE, proxy=egress.url_with("alice:" + PASSWORD)),
            openai("wrong", tls.url, ["wrong-*"], ca_file=FIXTURE, proxy=egress.url_with("alice:" + WRONG)),
            openai("plain", "http://api.provider.test:%d" % self.upstream.port, ["plain-*"])],
            self.data_dir, log_level="DEBUG", upstream_proxy="${CORP_PROXY}")
        proc = support.ProxyProcess(cfg, env={"CORP_PROXY": egress.url_with("alice:" + PASSWORD)})
        self.addCleanup(proc.cleanup)
        statuses = []
        for model in ("gpt-4o", "wrong-1", "plain-1"):
            statuses.append(support.request(proc.url, body={"model": model, "messages": []})[0])
        self.assertEqual(statuses, [200, 502, 200])
        support.request(proc.url, path="/v1/%s/chat/completions" % PASSWORD, body={"model": "plain-1"})
        pages = [support.request(proc.url, "GET", page)[2] for page in ("/health", "/metrics")]
        self.assertEqual(proc.stop(), 0)
        log = proc.log_text()
        self.assertIn("provider openai: through the egress proxy 127.0.0.1:%d (a CONNECT tunnel)" % egress.port, log)
        recs = support.read_records(self.data_dir)
        self.assertEqual(len(recs), 4)
        self.assertIn("refused the tunnel: 407", json.dumps(recs))
        files = [(p, read(p)) for p in support.all_files(self.data_dir)]
        for secret in (PASSWORD, WRONG, token("alice:" + PASSWORD), token("alice:" + WRONG)):
            self.assertNotIn(secret, log)
            for path, data in files:
                self.assertNotIn(secret.encode(), data, path)
            for page in pages:
                self.assertNotIn(secret.encode(), page)


    def test_a_proxy_that_echoes_its_credentials_in_a_refusal(self):
        """A proxy whose refusal's reason phrase holds the Proxy-Authorization it got and the
        user name in it (407 to a tunnel and to an absolute-form request, its token cut by the
        100 characters a message keeps; 403 to a tunnel): the client's error body, the records
        and the log at DEBUG hold no credential, nor a part of one (the proxy's phrase went
        into the message as it came, and the record's scrub did not find a token cut short).
        A user name without a password is the credential (a token as the user name): it was
        not scrubbed."""
        user_token = "tok3n-as-user-9b8c7d6e5f"
        pad = "Proxy Authentication Required, " + "x" * 42 + " "  # (100 characters end 20 into the token)
        egress = self.start_egress(credentials="alice:" + PASSWORD, reflect=pad)
        forbidding = self.start_egress(refuse=403, reflect="Forbidden for ")
        cfg = support.base_config([
            openai("tunnel", "https://127.0.0.1:9", ["gpt-*"], ca_file=FIXTURE, proxy=egress.url_with("alice:" + WRONG)),
            openai("forward", "http://api.provider.test:9", ["plain-*"], proxy=egress.url_with("alice:" + WRONG)),
            openai("user", "https://127.0.0.1:9", ["user-*"], ca_file=FIXTURE, proxy=forbidding.url_with(user_token)),
            openai("policy", "https://127.0.0.1:9", ["policy-*"], ca_file=FIXTURE,
                   proxy=forbidding.url_with("alice:" + PASSWORD))],
            self.data_dir, log_level="DEBUG")
        proc = support.ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        bodies = []
        for model in ("gpt-4o", "plain-1", "user-1", "policy-1"):
            status, _, body = support.request(proc.url, body={"model": model, "messages": []})
            self.assertEqual(status, 502, body)
            bodies.append(body)
        self.assertEqual(proc.stop(), 0)
        messages = [json.loads(b)["error"]["message"] for b in bodies]
        cut = (pad + "Basic [REDACTED] user alice")[:100]
        self.assertEqual(messages[:2], [
            "upstream tunnel unreachable: the egress proxy 127.0.0.1:%d refused the tunnel: 407 %s" % (egress.port, cut),
            "upstream forward unreachable: the egress proxy 127.0.0.1:%d refused the request: 407 %s" % (egress.port, cut)])
        self.assertEqual(messages[2:], [
            "upstream %s unreachable: the egress proxy 127.0.0.1:%d refused the tunnel: 403 Forbidden for Basic "
            "[REDACTED] user %s" % (name, forbidding.port, user) for name, user in (("user", "[REDACTED]"),
                                                                                   ("policy", "alice"))])
        log = proc.log_text()
        files = [(p, read(p)) for p in support.all_files(self.data_dir)]
        self.assertEqual(len(support.read_records(self.data_dir)), 4)
        for secret in (PASSWORD, WRONG, token("alice:" + PASSWORD), token("alice:" + WRONG), user_token,
                       token(user_token + ":")):
            for part in (secret, secret[:12]):
                self.assertNotIn(part, log)
                for path, data in files:
                    self.assertNotIn(part.encode(), data, path)
                for body in bodies:
                    self.assertNotIn(part.encode(), body)


# (no_proxy, a provider's base_url, reached directly): the conventions of curl and Go's
# httpproxy. Case-insensitive; a name matches itself and its subdomains on label boundaries
# (with or without a leading . or *.); a port, the provider's port only (its scheme's
# default when its URL has none); addresses and networks compared as addresses, and only with
# addresses (no name is resolved); IPv6 bare or in brackets.
NO_PROXY_CASES = [
    ("*", "https://api.openai.com", True),
    ("example.com", "https://example.com", True),
    ("example.com", "https://api.example.com", True),
    ("example.com", "https://a.b.example.com:8443", True),
    ("example.com", "https://badexample.com", False),
    ("example.com", "https://example.com.evil.test", False),
    ("api.example.com", "https://example.com", False),
    ("EXAMPLE.Com", "https://api.example.COM", True),
    (".example.com", "https://example.com", True),
    (".example.com", "https://api.example.com", True),
    ("*.example.com", "https://api.example.com", True),
    ("*.example.com", "https://example.com", True),
    ("example.com.", "https://api.example.com", True),
    ("example.com:8443", "https://example.com:8443", True),
    ("example.com:8443", "https://example.com", False),
    ("example.com:443", "https://example.com", True),
    ("example.com:443", "http://example.com", False),
    ("example.com:80", "http://example.com", True),
    (".example.com:8443", "https://api.example.com:8443", True),
    (".example.com:8443", "https://api.example.com:443", False),
    ("*.example.com:8443", "https://api.example.com:8443", True),
    ("127.0.0.1", "http://127.0.0.1:9", True),  # (loopback anyway)
    ("192.168.1.10", "http://192.168.1.10:8000", True),
    ("192.168.1.10", "http://192.168.1.100:8000", False),
    ("1.10", "http://192.168.1.10:8000", False),  # (a name: never an address's suffix)
    ("192.168.1.10:8000", "http://192.168.1.10:8000", True),
    ("192.168.1.10:8000", "http://192.168.1.10:8001", False),
    ("192.168.1.10", "http://gpu.example.com", False),  # (no name is resolved)
    ("10.0.0.0/8", "http://10.1.2.3:8000", True),
    ("10.0.0.0/8", "http://11.1.2.3:8000", False),
    ("10.1.2.3/8", "http://10.200.0.1", True),
    ("10.0.0.0/8", "http://ten.example.com", False),
    ("2001:db8::1", "http://[2001:db8::1]:8000", True),
    ("[2001:DB8::1]", "http://[2001:db8:0:0::1]:8000", True),
    ("[2001:db8::1]:8080", "http://[2001:db8::1]:8080", True),
    ("[2001:db8::1]:8080", "http://[2001:db8::1]:8081", False),
    ("2001:db8::/32", "http://[2001:db8:5::7]", True),
    ("2001:db8::/32", "http://[2001:db9::7]", False),
    ("10.0.0.0/8", "http://[::ffff:a00:1]", True),  # (an IPv4-mapped address is the IPv4 one)
    ("::ffff:10.0.0.1", "http://10.0.0.1", True),
    ("", "http://[::ffff:127.0.0.1]:9", True),  # (loopback)
    ("bücher.example", "https://xn--bcher-kva.example", True),
    ("a.test, , .,b.test:8443", "https://b.test:8443", True),
    ("", "https://api.openai.com", False),
]

NO_PROXY_ERRORS = [
    ("host:", '"host:": not a port (1 to 65535)'),
    ("host:0", '"host:0": not a port'),
    ("host:99999", '"host:99999": not a port'),
    ("host:http", '"host:http": not a port'),
    (":8080", '":8080": no host'),
    ("a*.example.com", '"a*.example.com": a * stands alone (every host) or begins a name (*.example.com)'),
    ("*:443", '"*:443": a * stands alone'),
    ("[::1", '"[::1": not an IPv6 entry ([::1] or [::1]:8080)'),
    ("[gpu]:80", '"[gpu]:80": not an IPv6 entry'),
    ("10.0.0.0/33", '"10.0.0.0/33": an entry with a / is not a network (10.0.0.0/8, fd00::/8)'),
    ("10.0.0.0/8:80", '"10.0.0.0/8:80": an entry with a / is not a network'),
    ("<local>", '"<local>": not a host name'),
    ("a..b", '"a..b": not a host name'),
]


class NoProxyTest(unittest.TestCase):
    def load(self, no_proxy, base_url):
        """The proxy of a provider at ``base_url`` under ``upstream_proxy`` and ``no_proxy``."""
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"providers": [openai("p", base_url, [])], "upstream_proxy": "http://proxy.corp:3128",
                       "no_proxy": no_proxy}, f)
        self.addCleanup(os.unlink, path)
        self.path = path
        return config.load(path, env={})

    def test_matching(self):
        for no_proxy, url, direct in NO_PROXY_CASES:
            for value in (no_proxy, no_proxy.split(",")):  # (a string, or a list)
                with self.subTest(no_proxy=value, url=url):
                    self.assertEqual(self.load(value, url).providers[0].proxy,
                                     "" if direct else "http://proxy.corp:3128")

    def test_entries_are_kept_in_their_normal_form(self):
        cfg = self.load(" Example.COM:8443,*.b.test,.c.test.,[2001:DB8::1]:8080,[2001:db8::1],10.1.2.3/8,*,bücher.example",
                        "https://api.openai.com")
        self.assertEqual(cfg.no_proxy, ("example.com:8443", "b.test", "c.test", "[2001:db8::1]:8080", "2001:db8::1",
                                        "10.0.0.0/8", "*", "xn--bcher-kva.example"))

    def test_an_entry_that_cannot_match_stops_start_up_naming_it(self):
        for entry, expected in NO_PROXY_ERRORS:
            with self.subTest(entry=entry), self.assertRaises(ConfigError) as cm:
                self.load("ok.test," + entry, "https://api.openai.com")
            self.assertTrue(str(cm.exception).startswith("%s: no_proxy: %s" % (self.path, expected)),
                            str(cm.exception))


class EgressConfigTest(unittest.TestCase):
    def load(self, env=None, **cfg):
        cfg.setdefault("providers", [openai("openai", "https://api.openai.com", ["gpt-*"])])
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        self.addCleanup(os.unlink, path)
        self.path = path
        return config.load(path, env=env or {})

    def test_which_providers_go_through_the_proxy(self):
        corp = "http://alice:%s@proxy.corp:3128" % PASSWORD
        urls = (("openai", "https://api.openai.com"), ("ip", "http://127.0.0.1:9"), ("ip2", "http://127.8.0.1:9"),
                ("v6", "http://[::1]:9"), ("name", "http://localhost:9"), ("sub", "http://llm.localhost:9"),
                ("internal", "https://llm.corp.example"), ("net", "http://10.1.2.3:8000"),
                ("suffix", "https://gpu.lab.internal"))
        providers = [openai(name, url, []) for name, url in urls] + [
            openai("own", "http://127.0.0.1:9", [], proxy="http://other:8080"),
             openai("none", "https://api.anthropic.com", [], proxy=""),
             openai("null", "https://api.anthropic.com", [], proxy=None)]
        cfg = self.load(providers=providers, upstream_proxy="${HTTPS_PROXY:-}", no_proxy="${NO_PROXY:-}",
                        env={"HTTPS_PROXY": corp, "NO_PROXY": "corp.example, 10.0.0.0/8,*.internal"})
        self.assertEqual({p.name: p.proxy for p in cfg.providers},
                         {"openai": corp, "ip": "", "ip2": "", "v6": "", "name": "", "sub": "", "internal": "",
                          "net": "", "suffix": "", "own": "http://other:8080", "none": "", "null": corp})
        self.assertEqual(cfg.no_proxy, ("corp.example", "10.0.0.0/8", "internal"))
        self.assertNotIn(PASSWORD, repr(cfg))
        self.assertEqual(self.load(providers=providers, no_proxy=["*"], upstream_proxy=corp).providers[0].proxy, "")
        cfg = self.load(env={"PROXY_LLM_UPSTREAM_PROXY": corp}, upstream_proxy="http://ignored:1")
        self.assertEqual((cfg.upstream_proxy, cfg.providers[0].proxy), (corp, corp))
        self.assertEqual(self.load().providers[0].proxy, "")

    def test_bad_proxies_are_refused_without_the_password(self):
        cases = [
            ({"upstream_proxy": "https://alice:%s@proxy:3128" % PASSWORD}, "upstream_proxy: https:// proxies are not "
             "supported: give an http:// proxy (https providers are tunnelled through it with CONNECT, so TLS still "
             "runs end to end)"),
            ({"upstream_proxy": "socks5h://alice:%s@proxy:1080" % PASSWORD}, "upstream_proxy: socks5h:// proxies"),
            ({"upstream_proxy": "alice:%s@proxy:3128" % PASSWORD}, "upstream_proxy: not a proxy URL (expected "
             "http://[user:password@]host:port)"),
            ({"upstream_proxy": "http://alice:%s@proxy:3128/path" % PASSWORD}, "upstream_proxy: not a proxy URL"),
            ({"upstream_proxy": "http://alice:%s@proxy:99999" % PASSWORD}, "upstream_proxy: not a proxy URL (bad host"),
            ({"upstream_proxy": "http://alice:%s@proxy:0" % PASSWORD}, "upstream_proxy: not a proxy URL (bad port)"),
            ({"upstream_proxy": "http://alice:%s @proxy" % PASSWORD}, "upstream_proxy: not a proxy URL (visible"),
            ({"upstream_proxy": 3128}, "upstream_proxy: must be a string"),
            ({"no_proxy": [1]}, "no_proxy: must be a list of strings"),
            ({"no_proxy": "10.0.0.0/33"}, "no_proxy: \"10.0.0.0/33\": an entry with a / is not a network"),
            ({"providers": [openai("openai", "https://api.openai.com", [], proxy="socks5://a:%s@h:1" % PASSWORD)]},
             "providers[0].proxy: socks5:// proxies are not supported"),
        ]
        for cfg, expected in cases:
            with self.subTest(cfg=cfg), self.assertRaises(ConfigError) as cm:
                self.load(**cfg)
            self.assertTrue(str(cm.exception).startswith("%s: %s" % (self.path, expected)), str(cm.exception))
            self.assertNotIn(PASSWORD, str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            self.load(env={"PROXY_LLM_UPSTREAM_PROXY": "socks5://alice:%s@h:1" % PASSWORD})
        self.assertTrue(str(cm.exception).startswith("$PROXY_LLM_UPSTREAM_PROXY: upstream_proxy: socks5:// proxies"))
        self.assertNotIn(PASSWORD, str(cm.exception))

    def test_start_up_refuses_a_socks_proxy_in_one_line_without_the_password(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, tmp)
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(support.base_config([openai("openai", "https://api.openai.com", [])], tmp,
                                          upstream_proxy="socks5://alice:%s@proxy:1080" % PASSWORD), f)
        env = dict(os.environ, PYTHONPATH=support.ROOT)
        done = subprocess.run([sys.executable, "-m", "proxy_llm", "--config", path, "--log-level", "DEBUG"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=DEADLINE)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stdout.decode(), "proxy_llm: %s: upstream_proxy: socks5:// proxies are not supported: "
                         "give an http:// proxy (https providers are tunnelled through it with CONNECT, so TLS still "
                         "runs end to end)\n" % path)


if __name__ == "__main__":
    unittest.main()
