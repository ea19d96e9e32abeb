"""What an operator reads at log_level INFO: a WARNING per upstream failure, an INFO notice per
provider key refused, each rate-limited per (provider, kind), no secret in any of them, and
nothing at all for an exchange that went well.

The proxy runs as a real subprocess at INFO against every way an upstream fails (refused, a
name that does not resolve, an untrusted certificate, an egress proxy's 407 and 403, no head in
time, a reset mid-stream, a silent stream, a stream without its end, unreadable heads) with
credentials in the clients' headers and query, the providers' keys and the egress proxies'
URLs; in-process tests drive the rate limiter's clock instead of sleeping.
"""

from __future__ import annotations

import base64
import http.client
import os
import random
import re
import shutil
import socket
import ssl
import tempfile
import threading
import unittest
from unittest import mock

from proxy_llm import notices
from proxy_llm.storage import RateLimitedLog
from tests import support
from tests.support import (EgressProxy, FakeUpstream, ProxyProcess, Reply, base_config, chunk_event,
                           json_reply, provider, request, sse_reply)
from tests.test_faults import RawUpstream
from tests.test_tls import FIXTURE


class FakeClock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dead_url() -> str:
    """The URL of a port nothing listens on (connections to it are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return "http://127.0.0.1:%d" % port


def anthropic_401() -> Reply:
    return json_reply({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}, 401)


class WhereTest(unittest.TestCase):
    def test_an_ipv6_provider_and_proxy_are_named_in_brackets(self):
        provider = mock.Mock(base_url="https://[fd00::5]/v1", proxy="http://user:pw@[::1]:3128")
        self.assertEqual(notices.where(provider), "[fd00::5]:443 via the egress proxy [::1]:3128")
        provider = mock.Mock(base_url="http://api.example.test:8080", proxy="")
        self.assertEqual(notices.where(provider), "api.example.test:8080")


class NoticeCase(support.ProxyTestCase):
    """An in-process proxy whose notices go through a rate limiter on a clock the test moves."""

    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        patcher = mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL, self.clock))
        patcher.start()
        self.addCleanup(patcher.stop)

    def lines(self, logs):
        return [r.levelname + " " + r.getMessage() for r in logs.records]


class UpstreamFailureLineTest(NoticeCase):
    def test_one_line_per_interval_then_the_count_of_those_left_out(self):
        down = dead_url()
        proxy = self.start_proxy([provider("openai", "openai", down, "", ["gpt-*"])])
        port = down.rsplit(":", 1)[1]
        with self.assertLogs("proxy_llm.upstream", "INFO") as logs:
            for _ in range(4):
                self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 502)
                self.clock.now += 1.0
            self.clock.now += 8.0  # 12 s after the first line
            self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 502)
            proxy.flush()
        first, second = self.lines(logs)
        self.assertRegex(first, r"\AWARNING upstream openai \(127\.0\.0\.1:%s\) unreachable: ConnectionRefusedError: "
                                r"\[Errno \d+\] .+ \(upstream_unavailable\)\Z" % port)
        self.assertEqual(second, first + " (and 3 more in the last 12 s)")

    def test_a_provider_key_refused_is_told_once_in_a_while_other_4xx_and_2xx_never(self):
        self.check_key_refused_told(record=True)

    def test_a_provider_key_refused_is_told_with_recording_off_too(self):
        # (Its answer is read for the token metrics all the same: record.Encoder.count.)
        self.check_key_refused_told(record=False)

    def check_key_refused_told(self, record: bool):
        self.replies += [
            anthropic_401(),
            anthropic_401(),
            json_reply({"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}}, 403),
            json_reply({"error": {"message": "no such model", "type": "invalid_request_error"}}, 404),
            json_reply({"error": {"message": "slow down", "type": "rate_limit_error"}}, 429),
            json_reply({"error": {"message": "bad", "type": "invalid_request_error"}}, 400),
        ]
        url = self.upstream.url
        proxy = self.start_proxy([provider("openai", "openai", url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", url, "sk-ant-api03-" + "k" * 40, ["claude-*"]),
                                  provider("gemini", "gemini", url, "", ["gemini-*"])], record=record)
        with self.assertLogs("proxy_llm.upstream", "INFO") as logs:
            notices.log.info("(start)")  # (assertLogs wants one line at least)
            for path, body, status in (("/v1/messages", {"model": "claude-x"}, 401),
                                       ("/v1/messages", {"model": "claude-x"}, 401),
                                       ("/v1beta/models/gemini-2.0-flash:generateContent", {"contents": []}, 403),
                                       ("/v1/chat/completions", {"model": "gpt-4o"}, 404),
                                       ("/v1/chat/completions", {"model": "gpt-4o"}, 429),
                                       ("/v1/chat/completions", {"model": "gpt-4o"}, 400),
                                       ("/v1/chat/completions", {"model": "gpt-4o"}, 200)):
                self.assertEqual(request(proxy.url, path=path, body=body)[0], status)
            proxy.flush()
            self.clock.now += 10.0
            self.replies.append(anthropic_401())
            self.assertEqual(request(proxy.url, path="/v1/messages", body={"model": "claude-x"})[0], 401)
            proxy.flush()
        self.assertEqual(self.lines(logs), [
            "INFO (start)",
            "INFO provider anthropic answered 401 (authentication_error): check its api_key",
            "INFO provider gemini answered 403 (PERMISSION_DENIED): it has no api_key: check the key its clients send",
            "INFO provider anthropic answered 401 (authentication_error): check its api_key "
            "(and 1 more in the last 10 s)"])

    def test_an_error_type_that_is_not_a_plain_word_or_holds_a_secret_is_not_named(self):
        key = "sk-ant-api03-" + "s" * 40
        self.replies += [json_reply({"type": "error", "error": {"type": "bad key " + key, "message": key}}, 401),
                         json_reply({"error": {"message": "x", "type": "Bearer_clientsecretvalue"}}, 403)]
        url = self.upstream.url
        proxy = self.start_proxy([provider("openai", "openai", url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", url, key, ["claude-*"])])
        with self.assertLogs("proxy_llm.upstream", "INFO") as logs:
            self.assertEqual(request(proxy.url, path="/v1/messages", body={"model": "claude-x"})[0], 401)
            self.assertEqual(request(proxy.url, body={"model": "gpt-4o"}, headers={
                "Authorization": "Bearer clientsecretvalue", "Content-Type": "application/json"})[0], 403)
            proxy.flush()
        self.assertEqual(self.lines(logs), [
            "INFO provider anthropic answered 401 (http_401): check its api_key",
            "INFO provider openai answered 403 (http_403): it has no api_key: check the key its clients send"])

    def test_the_proxys_own_401_is_not_a_provider_refusing_its_key(self):
        proxy = self.start_proxy(proxy_keys=["pk-" + "p" * 30])
        with self.assertLogs("proxy_llm", "INFO") as logs:
            notices.log.info("(start)")
            self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 401)
            proxy.flush()
        self.assertEqual(self.lines(logs), ["INFO (start)"])
        self.assertEqual(self.upstream.requests.qsize(), 0)

    def test_fail_closed_refusals_are_told(self):
        proxy = self.start_proxy(on_record_error="fail_closed")
        with mock.patch.object(proxy.server.recorder, "queue_full", return_value=True):
            with self.assertLogs("proxy_llm.upstream", "INFO") as logs:
                for _ in range(3):
                    self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 503)
        self.assertEqual(self.lines(logs), [
            "WARNING refusing exchanges for openai with 503: recording is failing and on_record_error is "
            "fail_closed (proxy_unavailable)"])


class SuccessNeverReachesNoticesTest(support.ProxyTestCase):
    """The notices are called from failure branches only: with every function of the module
    replaced by one that fails the test, successful exchanges (plain, streamed) and the
    upstream's own 4xx and 5xx answers but 401 and 403 go through as ever."""

    def test_no_notice_call_for_exchanges_that_went_well(self):
        def called(*args, **kwargs):
            raise AssertionError("a notice on a successful exchange")

        patches = [mock.patch.object(notices, name, called)
                   for name in ("upstream_failed", "key_refused", "refusing", "where", "reason", "redact")]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)
        self.replies += [sse_reply([chunk_event("Hel"), chunk_event("lo", "stop"), b"data: [DONE]\n\n"]),
                         json_reply({"error": {"message": "slow down", "type": "rate_limit_error"}}, 429),
                         json_reply({"error": {"message": "oops", "type": "server_error"}}, 500)]
        proxy = self.start_proxy()
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o", "stream": True})[0], 200)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 429)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 500)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 200)
        self.assertEqual([r["ended"] for r in proxy.records()], ["completed"] * 4)


class FailureLinesProcessTest(unittest.TestCase):
    """The real entry point at INFO: each way an upstream fails gives its one line, twice
    driven, with no credential, nor any part of one, anywhere in the log."""

    def setUp(self):
        rng = random.Random()
        self.canary = {name: "canary%s%024x" % (name, rng.getrandbits(96)) for name in
                       ("auth", "xapikey", "apikey", "goog", "cookie", "proxyauth", "query", "provider", "provider2",
                        "egresspw", "egresstoken")}
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_notices_")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def upstream(self):
        release = threading.Event()
        self.addCleanup(release.set)
        # The reset waits until the client has the stream's head: a reset before the proxy read
        # the upstream's head would be a failure to answer, not a broken stream.
        self.reset_gate = threading.Event()
        self.addCleanup(self.reset_gate.set)

        def answer(req):
            model = req.json().get("model", "")
            if model == "slow-head":
                return Reply(200, [("Content-Type", "application/json")], b"{}", delay_headers=release)
            if model == "reset-stream":
                return sse_reply([chunk_event("Hel"), self.reset_gate, "RESET"])
            if model == "silent-stream":
                return sse_reply([chunk_event("Hel"), release])
            if model == "unended-stream":
                return sse_reply([chunk_event("Hel")])  # no finish_reason, no [DONE]
            if model == "switching":
                return Reply(101, [], b"")
            if model == "missing":
                return json_reply({"error": {"message": "no such model", "type": "invalid_request_error"}}, 404)
            if model.startswith("claude"):
                # An upstream that echoes what it got, as a bad key's error may.
                seen = "; ".join("%s: %s" % kv for kv in req.headers)
                return json_reply({"type": "error", "error": {"type": "authentication_error", "message": seen}}, 401)
            return json_reply({"id": "x", "choices": [{"index": 0, "message": {"content": "ok"},
                                                       "finish_reason": "stop"}]})
        upstream = FakeUpstream(answer).start()
        self.addCleanup(upstream.stop)
        upstream.server.handle_error = lambda request, address: None
        return upstream

    def test_every_failure_kind_logs_one_line_and_no_secret(self):
        c = self.canary
        upstream = self.upstream()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(FIXTURE)
        untrusted = FakeUpstream(tls=context).start()  # no ca_file: its certificate is refused
        self.addCleanup(untrusted.stop)
        untrusted.server.handle_error = lambda request, address: None
        garbage = RawUpstream(self, lambda i, k: b"NOT HTTP\r\n\r\n")
        closer = RawUpstream(self, lambda i, k: "close")
        # Egress proxies that echo the credentials they got in their refusal's reason phrase.
        wants_other = EgressProxy(credentials="alice:other", reflect="bad credentials ").start()
        self.addCleanup(wants_other.stop)
        forbids = EgressProxy(refuse=403, reflect="denied ").start()
        self.addCleanup(forbids.stop)
        down = dead_url()
        providers = [
            provider("refused", "openai", down, c["provider"], ["refused-*"]),
            provider("nodns", "openai", "https://no-such-host.invalid", c["provider"], ["nodns-*"]),
            provider("untrusted", "openai", untrusted.url, c["provider"], ["untrusted-*"]),
            dict(provider("egress407", "openai", "https://api.example.test", c["provider"], ["egress407-*"]),
                 proxy=wants_other.url_with("alice:" + c["egresspw"])),
            dict(provider("egress403", "openai", "https://api.example.test", c["provider"], ["egress403-*"]),
                 proxy=forbids.url_with(c["egresstoken"])),
            provider("garbage", "openai", garbage.url, c["provider"], ["garbage-*"]),
            provider("closer", "openai", closer.url, c["provider"], ["closer-*"]),
            provider("flaky", "openai", upstream.url, c["provider"],
                     ["slow-head", "reset-stream", "silent-stream", "unended-stream", "switching", "missing", "fine"]),
            provider("anthropic", "anthropic", upstream.url, c["provider2"], ["claude-*"]),
        ]
        cfg = base_config(providers, os.path.join(self.tmp, "data"), response_header_timeout=0.5,
                          stream_idle_timeout=0.5, connect_timeout=5)
        proc = ProxyProcess(cfg)  # log_level INFO, the default
        self.addCleanup(proc.cleanup)
        creds = {"Authorization": "Bearer " + c["auth"], "x-api-key": c["xapikey"], "api-key": c["apikey"],
                 "x-goog-api-key": c["goog"], "Proxy-Authorization": "Basic " + c["proxyauth"],
                 "Cookie": "session=" + c["cookie"], "Content-Type": "application/json"}
        path = "/v1/chat/completions?key=" + c["query"]
        expected = {  # model -> status
            "refused-1": 502, "nodns-1": 502, "untrusted-1": 502, "egress407-1": 502, "egress403-1": 502,
            "garbage-1": 502, "closer-1": 502, "slow-head": 504, "switching": 502, "missing": 404, "fine": 200,
        }
        for _ in range(2):  # the second of each is left out (rate-limited)
            for model, status in expected.items():
                self.assertEqual(request(proc.url, path=path, body={"model": model}, headers=creds)[0], status, model)
            for model in ("reset-stream", "silent-stream", "unended-stream"):
                self.reset_gate.clear()
                conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=support.DEADLINE)
                try:
                    conn.request("POST", path, body=('{"model":"%s","stream":true}' % model).encode(), headers=creds)
                    resp = conn.getresponse()
                    self.assertEqual(resp.status, 200, model)
                    self.reset_gate.set()
                    resp.read()
                except http.client.IncompleteRead:
                    pass  # a stream cut short is cut short for the client too
                finally:
                    conn.close()
            self.assertEqual(request(proc.url, path="/v1/messages?key=" + c["query"], body={"model": "claude-x"},
                                     headers=creds)[0], 401)
        self.assertEqual(proc.stop(), 0)
        log = proc.log_text()

        wanted = [
            r"WARNING refused \(127\.0\.0\.1:\d+\) unreachable: ConnectionRefusedError: \[Errno \d+\] .+ \(upstream_unavailable\)",
            r"WARNING nodns \(no-such-host\.invalid:443\) unreachable: gaierror: \[Errno -?\d+\] .+ \(upstream_unavailable\)",
            r"WARNING untrusted \(127\.0\.0\.1:\d+\) unreachable: SSLCertVerificationError: .*CERTIFICATE_VERIFY_FAILED.* "
            r"\(upstream_unavailable\)",
            r"WARNING egress407 \(api\.example\.test:443 via the egress proxy 127\.0\.0\.1:%d\) unreachable: EgressProxyError: "
            r"the egress proxy 127\.0\.0\.1:%d refused the tunnel: 407 .+ \(upstream_unavailable\)" % (
                wants_other.port, wants_other.port),
            r"WARNING egress403 \(api\.example\.test:443 via the egress proxy 127\.0\.0\.1:%d\) unreachable: EgressProxyError: "
            r"the egress proxy 127\.0\.0\.1:%d refused the tunnel: 403 .+ \(upstream_unavailable\)" % (forbids.port, forbids.port),
            r"WARNING garbage \(127\.0\.0\.1:\d+\) sent a response head the proxy cannot read: BadStatusLine "
            r"\(upstream_protocol_error\)",
            r"WARNING closer \(127\.0\.0\.1:\d+\) closed the connection before answering: RemoteDisconnected: .+ "
            r"\(upstream_unavailable\)",
            r"WARNING flaky \(127\.0\.0\.1:%d\) sent no response head within response_header_timeout \(0\.5 s\) "
            r"\(upstream_timeout\)" % upstream.port,
            r"WARNING flaky \(127\.0\.0\.1:%d\) switched protocols \(101\) .+ \(upstream_protocol_error\)" % upstream.port,
            r"WARNING flaky \(127\.0\.0\.1:%d\) stream broke: \w+(: .+)? \(upstream_error\)" % upstream.port,
            r"WARNING flaky \(127\.0\.0\.1:%d\) stream idle for more than 0\.5 s \(timeout\)" % upstream.port,
            r"WARNING flaky \(127\.0\.0\.1:%d\) stream ended without its terminal event \(upstream_eof\)" % upstream.port,
            r"INFO provider anthropic answered 401 \(authentication_error\): check its api_key",
        ]
        # Each line as it came; the second of each, held back, at stop (RateLimitedLog.flush).
        served, stop, stopping = log.partition(" INFO proxy_llm: shutting down")
        self.assertTrue(stop, log)
        for part in (served, stopping):
            got = [m.group(1) + " " + m.group(2) for m in
                   re.finditer(r" (WARNING|INFO) proxy_llm\.upstream: (?:upstream )?(.*)", part)]
            self.assertEqual(len(got), len(wanted), "\n".join(got))
            for pattern in wanted:
                matching = [line for line in got if re.fullmatch(pattern, line)]
                self.assertEqual(len(matching), 1, "%s in:\n%s" % (pattern, "\n".join(got)))
        # Nothing else at INFO or above but start and stop: no line for the 2xx, nor the 404.
        others = [line for line in log.splitlines() if " proxy_llm.upstream: " not in line]
        for line in others:
            self.assertRegex(line, r" INFO proxy_llm: (proxy_llm .* listening on|provider egress40[37]: through "
                                   r"the egress proxy|shutting down|stopped)")

        secrets = dict(c)
        secrets["egress basic"] = base64.b64encode(("alice:" + c["egresspw"]).encode()).decode()
        secrets["egress token basic"] = base64.b64encode((c["egresstoken"] + ":").encode()).decode()
        for name, secret in secrets.items():
            self.assertNotIn(secret, log, name)
            self.assertNotIn(secret[8:], log, "part of " + name)
        self.assertIn("[REDACTED]", log)  # the egress proxies' echoes, which the lines quote


if __name__ == "__main__":
    unittest.main()
