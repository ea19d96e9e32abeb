"""HTTPS upstreams, on real sockets: the path of every real deployment (TLS to the provider).

The fake upstream serves TLS with a self-signed certificate for 127.0.0.1 and localhost
(tests/tls_upstream.pem, test-only, valid until 2126). The proxy's pools trust it the
way a host trusts its CA bundle: a default context (certificate and host name checked) that
also loads that file. Without it the certificate must be refused.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading

from tests import support
from tests.support import DEADLINE, chunk_event, read_to_eof, read_until, sse_reply
from tests.test_faults import CHAT_BODY, CHAT_REPLY, PLAIN_BODY, content_of, open_stream

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tls_upstream.pem")


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class TlsUpstreamCase(support.ProxyTestCase):
    """A fake upstream serving TLS with the test certificate (see the module docstring)."""

    def setUp(self):
        super().setUp()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(FIXTURE)
        self.upstream = support.FakeUpstream(self.reply, tls=context).start()
        self.addCleanup(self.upstream.stop)
        self.upstream.server.handle_error = lambda request, address: None

    def default_reply(self):
        return support.Reply(200, [("Content-Type", "application/json")], CHAT_REPLY)

    def start_tls_proxy(self, trusted: bool = True, **extra):
        self.assertTrue(self.upstream.url.startswith("https://"))
        proxy = self.start_proxy(**extra)
        if trusted:  # before the first connection: contexts are used when connections are made
            for pool in proxy.server.pools.values():
                pool.ssl_context = ssl.create_default_context(cafile=FIXTURE)
        return proxy


class TlsUpstreamTest(TlsUpstreamCase):
    def test_a_request_and_a_stream_over_one_tls_connection(self):
        proxy = self.start_tls_proxy()
        status, _, body = support.request(proxy.url, body=PLAIN_BODY)
        self.assertEqual((status, body), (200, CHAT_REPLY))
        self.assertTrue(proxy.server.wait_idle(DEADLINE))  # its connection is back in the pool
        self.replies.append(sse_reply([chunk_event("Hel"), chunk_event("lo", "stop"), b"data: [DONE]\n\n"]))
        sock = open_stream(proxy.port, CHAT_BODY)
        data = read_until(sock, b"\r\n0\r\n\r\n")
        sock.close()
        self.assertIn(b"data: [DONE]", data)
        self.assertEqual(self.upstream.connections, 1, "the TLS connection was not reused")
        recs = proxy.records()
        self.assertEqual([r["ended"] for r in recs], ["completed", "completed"])
        self.assertEqual([content_of(r) for r in recs], ["Hello!", "Hello"])

    def test_bytes_past_an_answer_in_its_tls_record_never_reach_the_next_client(self):
        # Decrypted with the answer, past what http.client read, they waited in the SSL object,
        # where poll cannot see them: the pooled connection was reused, and the next client got
        # them as its answer (an audit's finding). Over TCP the pool's check already caught it.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(FIXTURE)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        injected = _answer(b'{"answer":"INJECTED"}')
        connections = []

        def serve():
            while True:
                try:
                    raw, _ = listener.accept()
                except OSError:
                    return
                conn = context.wrap_socket(raw, server_side=True)
                connections.append(conn)
                threading.Thread(target=answer, args=(conn, len(connections) == 1), daemon=True).start()

        def answer(conn, first):
            with conn:
                while True:
                    try:
                        head = read_until(conn, b"\r\n\r\n")
                    except (OSError, AssertionError):
                        return
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                    body = head.split(b"\r\n\r\n", 1)[1]
                    while len(body) < length:
                        body += conn.recv(65536)
                    if first:  # one write, one TLS record: the answer, padding, another answer
                        conn.sendall(_answer(b'{"answer":"real first"}') + b" " * 9000 + injected)
                        first = False
                    else:
                        conn.sendall(_answer(b'{"answer":"real second"}'))
        threading.Thread(target=serve, daemon=True).start()
        proxy = self.start_proxy([support.provider("openai", "openai", "https://127.0.0.1:%d" % listener.getsockname()[1],
                                                   "", ["gpt-*"])])
        for pool in proxy.server.pools.values():
            pool.ssl_context = ssl.create_default_context(cafile=FIXTURE)
        self.assertEqual(support.request(proxy.url, body=PLAIN_BODY)[2], b'{"answer":"real first"}')
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        self.assertEqual(support.request(proxy.url, body=PLAIN_BODY)[2], b'{"answer":"real second"}')
        self.assertEqual(len(connections), 2)

    def test_a_silent_tls_upstream_is_cut_by_the_watchdog(self):
        self.replies.append(sse_reply([chunk_event("Hel"), "HANG"]))
        proxy = self.start_tls_proxy(stream_idle_timeout=0.3)
        sock = open_stream(proxy.port, CHAT_BODY)
        data = read_until(sock, b"Hel") + read_to_eof(sock)
        sock.close()
        self.assertNotIn(b"\r\n0\r\n\r\n", data)
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["error"]["type"]), ("timeout", "timeout"))
        self.assertEqual(content_of(rec), "Hel")

    def test_a_providers_ca_file_is_trusted(self):
        """A provider's ca_file (a corporate CA that inspects TLS, a private one) is the bundle
        its connections trust: the fake upstream's certificate, which the system's bundle
        refuses (test_an_untrusted_certificate_is_refused), is taken, with no context set by
        hand. Another provider, without one, still trusts the system's bundle only."""
        proxy = self.start_tls_proxy(trusted=False, providers=[
            support.provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
            dict(support.provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"]), ca_file=FIXTURE)])
        status, _, body = support.request(proxy.url, path="/v1/messages", body=b'{"model":"claude-x"}')
        self.assertEqual((status, body), (200, CHAT_REPLY))
        status, _, body = support.request(proxy.url, body=PLAIN_BODY)
        self.assertEqual(status, 502, body)
        self.assertIn(b"certificate verify failed", body)

    def test_an_untrusted_certificate_is_refused(self):
        proxy = self.start_tls_proxy(trusted=False)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        self.assertEqual(resp.status, 502, body)
        self.assertIn(b"upstream openai unreachable", body)
        self.assertIn(b"certificate verify failed", body)
        self.assertTrue(self.upstream.requests.empty(), "a request reached an unverified upstream")
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "upstream_error")
