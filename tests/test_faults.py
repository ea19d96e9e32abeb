"""Faults and limits, in-process on real sockets: aborts, resets, stalls, timeouts, full disks.

Every exchange that ends badly must still be recorded with what was relayed and how it ended;
the proxy answers for itself only before the upstream's headers were sent, in the provider's
error shape.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from typing import Dict, Tuple
from unittest import mock

from proxy_llm import storage, upstream
from proxy_llm.handler import ClientClock, ProxyHandler
from tests import support
from tests.support import (read_until, read_to_eof, chunk_event, DEADLINE, Reply, header, provider, request, sse_reply, wait_until)

CHAT_BODY = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
PLAIN_BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}'
CHAT_REPLY = (b'{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}')


class Endless(list):
    """A streamed body that never ends (until the upstream stops)."""

    def __init__(self, part: bytes, stop: threading.Event):
        super().__init__()
        self.part = part
        self.stop = stop

    def __iter__(self):
        while not self.stop.is_set():
            yield self.part


def content_of(rec) -> str:
    return rec["response_body"]["choices"][0]["message"]["content"]


def open_stream(port: int, body: bytes = CHAT_BODY, path: str = "/v1/chat/completions",
                rcvbuf: int = 0) -> socket.socket:
    """A client socket that has sent one request; ``rcvbuf``: a small receive buffer (set before
    connecting, so that the window stays small), for a client slow to read."""
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(DEADLINE)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), len(body), body))
    except BaseException:
        sock.close()
        raise
    return sock


class FaultTestCase(support.ProxyTestCase):
    def default_reply(self):
        return Reply(200, [("Content-Type", "application/json")], CHAT_REPLY)


class ClientAbortTest(FaultTestCase):
    def test_client_gone_while_upstream_is_silent_closes_upstream_within_a_second(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies.append(sse_reply([chunk_event("first"), gate] + [chunk_event("later")] * 50))
        proxy = self.start_proxy()
        sock = open_stream(proxy.port)
        read_until(sock, b"first")
        sock.close()
        # The relay is blocked reading the silent upstream: only the watchdog can end it, by
        # shutting the upstream socket down.
        self.assertTrue(proxy.server.wait_idle(1.0), "exchange still in flight a second after the client left")
        gate.set()  # the upstream speaks again and finds its connection closed
        self.assertTrue(self.upstream.closed_by_peer.wait(DEADLINE))
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "client_aborted")
        self.assertEqual(rec["status_code"], 200)
        self.assertEqual(content_of(rec), "first")
        [line] = proxy.stream_lines()
        self.assertEqual(len(line["events"]), 1)

    def test_a_request_whose_client_left_while_it_connected_is_not_sent(self):
        # The watchdog saw the client go, but only a shutdown was looked for once connected:
        # the call went out, nobody to read it, and its record said completed (an audit's finding).
        from proxy_llm import handler
        entered, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)
        real = handler.connect

        def slow_connect(conn):  # (a TLS handshake, an egress proxy's CONNECT, a full accept queue)
            entered.set()
            gate.wait(DEADLINE)
            real(conn)
        self.replies.append(Reply(200, [("Content-Type", "application/json")], CHAT_REPLY))
        proxy = self.start_proxy()
        with mock.patch.object(handler, "connect", slow_connect):
            sock = open_stream(proxy.port, PLAIN_BODY)
            self.assertTrue(entered.wait(DEADLINE))
            sock.close()
            wait_until(lambda: [ex.client_gone for ex in proxy.server.in_flight()] == [True], what="the watchdog")
            gate.set()
            self.assertTrue(proxy.server.wait_idle(DEADLINE))
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["status_code"]), ("client_aborted", None))
        self.assertEqual(self.upstream.requests.qsize(), 0)  # never sent
        status, _, body = request(proxy.url, body=PLAIN_BODY)  # (its connection, kept, serves the next)
        self.assertEqual((status, body), (200, CHAT_REPLY))

    def test_client_gone_before_upstream_headers_closes_upstream_within_a_second(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        # A slow non-streamed completion: the upstream thinks for a long time before answering.
        self.replies.append(Reply(200, [("Content-Type", "application/json")], CHAT_REPLY))
        self.replies.append(Reply(200, [("Content-Type", "application/json")], CHAT_REPLY, delay_headers=gate))
        proxy = self.start_proxy()
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)  # warm a pooled connection
        self.upstream.next_request()
        sock = open_stream(proxy.port, PLAIN_BODY)
        self.upstream.next_request()  # the upstream has the request and is thinking
        sock.close()
        self.assertTrue(proxy.server.wait_idle(1.0), "exchange still waiting on the upstream after the client left")
        recs = proxy.records()
        self.assertEqual(recs[-1]["ended"], "client_aborted")
        self.assertIsNone(recs[-1]["status_code"])
        self.assertEqual(self.upstream.requests.qsize(), 0)  # not retried on another connection

    def test_client_gone_while_upstream_is_streaming_closes_upstream(self):
        self.replies.append(Reply(200, [("Content-Type", "text/event-stream")],
                                  Endless(chunk_event("tick") * 20, self.upstream.stop_event)))
        proxy = self.start_proxy()
        sock = open_stream(proxy.port)
        read_until(sock, b"tick")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST: the proxy's next write fails
        self.assertTrue(self.upstream.closed_by_peer.wait(DEADLINE))
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "client_aborted")
        self.assertTrue(content_of(rec).startswith("ticktick"))
        self.assertGreater(rec["response_bytes"], 0)

    def test_a_client_reset_while_its_body_is_read_is_a_bad_request_not_a_bug(self):
        # The reset reached the handler's catch-all for bugs: a 500 and an "internal error" log.
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + PLAIN_BODY[:10])
        wait_until(lambda: proxy.server.inflight, what="the request's exchange")  # its head is parsed
        with self.assertLogs("proxy_llm", "DEBUG") as logs:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # RST
            [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"]), (400, "client_aborted"))  # (the 400 never arrived)
        self.assertIn("connection failed", rec["error"]["message"])
        self.assertFalse([line for line in logs.output if "internal error" in line], logs.output)
        self.assertTrue(self.upstream.requests.empty())
        # What arrived before the reset is in the record (a buffered read would have dropped it).
        self.assertEqual((rec["request_bytes"], rec["request_body"]), (10, PLAIN_BODY[:10].decode()))

    def test_a_body_the_client_stops_sending_is_recorded_as_far_as_it_came(self):
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + PLAIN_BODY[:10])
        sock.sendall(PLAIN_BODY[10:20])
        sock.shutdown(socket.SHUT_WR)  # the end of input: 20 of 1,000 bytes
        self.assertIn(b" 400 ", sock.recv(65536))
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"]), (400, "client_aborted"))  # it left mid-body
        self.assertIn("ended after 20 of 1000 bytes", rec["error"]["message"])
        self.assertEqual((rec["request_bytes"], rec["request_body"]), (20, PLAIN_BODY[:20].decode()))
        self.assertTrue(self.upstream.requests.empty())


class RawUpstream:
    """An upstream speaking raw bytes: ``script(connection, request)`` (both counted from 0)
    gives what to send for each request read (bytes, or a list of bytes and Events to wait for),
    and "close" to close instead (or after the parts before it, in a list). Requests land in
    ``requests`` as (connection, head + body)."""

    def __init__(self, test, script):
        self.script = script
        self.requests: "queue.Queue[tuple]" = queue.Queue()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()
        test.addCleanup(self.close)

    def close(self):
        # close() alone does not wake a thread blocked in accept(): the socket would listen on,
        # and a later test's server given the same port would find its clients answered here.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.accepting.join(DEADLINE)
        self.sock.close()

    def _accept(self):
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()
            n += 1

    def _serve(self, conn, index):
        try:
            self._answer(conn, index)
        except OSError:  # the proxy cut it (a test's point, often)
            pass

    def _answer(self, conn, index):
        buf, k = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                length = int(m.group(1)) if m else 0
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.requests.put((index, head + b"\r\n\r\n" + buf[:length]))
                buf = buf[length:]
                answer = self.script(index, k)
                k += 1
                if answer == "close":
                    return
                for part in answer if isinstance(answer, list) else [answer]:
                    if isinstance(part, threading.Event):
                        part.wait(DEADLINE)
                    elif part == "close":  # after what came before it
                        return
                    else:
                        conn.sendall(part)


def _json_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _close_wait(port: int) -> int:
    """Sockets on this host in CLOSE_WAIT (the peer closed, this end not yet) to 127.0.0.1:port."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if row[2] == "0100007F:%04X" % port and row[3] == "08")


class PooledConnectionTest(FaultTestCase):
    def start_raw(self, script):
        raw = RawUpstream(self, script)
        return raw, self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])

    def test_a_post_the_upstream_read_is_not_sent_again_when_its_connection_closes(self):
        # A reused connection that the upstream closes after reading a POST (a worker that died
        # on it) was retried on a new one: the call ran twice, and the client never knew.
        raw, proxy = self.start_raw(lambda conn, k: _json_answer(b'{"n":1}') if (conn, k) == (0, 0)
                                    else "close" if conn == 0 else _json_answer(b'{"n":2}'))
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))  # its connection is back in the pool
        status, _, body = request(proxy.url, body=b'{"model":"gpt-4o","messages":[],"tag":"once"}')
        self.assertEqual(status, 502, body)
        sent = [raw.requests.get_nowait() for _ in range(raw.requests.qsize())]
        self.assertEqual(sum(b'"once"' in r for _, r in sent), 1, "the POST was sent again")
        self.assertEqual(proxy.records()[-1]["ended"], "upstream_error")

    def test_an_idempotent_request_or_one_with_an_idempotency_key_is_sent_again(self):
        for method, headers in (("GET", {}), ("POST", {"Idempotency-Key": "k-1"})):
            with self.subTest(method=method):
                raw, proxy = self.start_raw(lambda conn, k: _json_answer(b'{"n":1}') if k == 0 else "close")
                self.assertEqual(request(proxy.url, method=method, body=PLAIN_BODY)[0], 200)
                self.assertTrue(proxy.server.wait_idle(DEADLINE))
                status, _, body = request(proxy.url, method=method, body=PLAIN_BODY,
                                          headers=dict(headers, **{"Content-Type": "application/json"}))
                self.assertEqual((status, body), (200, b'{"n":1}'))  # on a new connection

    def test_bytes_after_a_response_never_reach_the_next_client(self):
        # An upstream sending more than its Content-Length: the connection went back to the
        # pool, and a reuse within half a second skipped the check, so the next client (any
        # client) read the surplus as its answer.
        later = threading.Event()
        self.addCleanup(later.set)
        surplus = _json_answer(b'{"meant":"for nobody"}')
        raw, proxy = self.start_raw(lambda conn, k: [_json_answer(b'{"n":1}'), later, surplus] if conn == 0
                                    else _json_answer(b'{"n":2}'))
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[2], b'{"n":1}')
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        [(pooled, _)] = proxy.server.pools["openai"]._idle
        later.set()  # the surplus comes once the answer was read: into the pooled socket
        wait_until(lambda: upstream._readable(pooled.sock), what="the surplus in the pooled socket")
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[2], b'{"n":2}')


    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counts descriptors in /proc")
    def test_idle_connections_the_upstream_closed_are_let_go_of_by_the_watchdog(self):
        # Each was kept, its descriptor held, until the provider's next request came to take
        # it: up to max_idle descriptors per provider for as long as none came.
        n = 6
        hold, gone = threading.Event(), threading.Event()
        self.addCleanup(gone.set)
        self.addCleanup(hold.set)

        def script(conn, k):
            # The last connection stays open; the others close once the test says so.
            return [hold, _json_answer(b'{"n":1}')] + ([] if conn == n - 1 else [gone, "close"])

        raw, proxy = self.start_raw(script)
        proxy.server._stop_watch.set()  # its passes are this test's: watch_once() below
        proxy.server._watchdog.join(DEADLINE)
        clients = [threading.Thread(target=request, args=(proxy.url,), kwargs={"body": PLAIN_BODY}) for _ in range(n)]
        for t in clients:
            t.start()
        wait_until(lambda: raw.requests.qsize() == n, what="every request at the upstream")
        hold.set()
        for t in clients:
            t.join(DEADLINE)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        pool = proxy.server.pools["openai"]
        pooled = [conn for conn, _ in pool._idle]
        self.assertEqual(len(pooled), n)
        gone.set()
        wait_until(lambda: sum(upstream._readable(c.sock) for c in pooled) == n - 1, what="the upstream's closes")
        port = int(raw.url.rsplit(":", 1)[1])
        self.assertEqual(_close_wait(port), n - 1)  # the proxy's ends of them, still open
        live = [c for c in pooled if not upstream._readable(c.sock)]
        proxy.server.watch_once()
        self.assertEqual([conn for conn, _ in pool._idle], live)  # the live one stays
        self.assertEqual(sum(c.sock is None for c in pooled), n - 1)
        self.assertEqual(_close_wait(port), 0)
        status, _, body = request(proxy.url, body=PLAIN_BODY)  # and serves the next request
        self.assertEqual((status, body), (200, b'{"n":1}'))
        self.assertEqual([raw.requests.get_nowait()[0] for _ in range(n + 1)][-1], n - 1)


class KnownLengthStreamTest(FaultTestCase):
    def test_events_of_a_stream_with_a_content_length_go_on_as_they_come(self):
        # A body of a known length up to 256 KB went in one write with its head, once read
        # whole: a text/event-stream with a Content-Length (a buffering gateway's, a replay
        # server's) reached the client all at once at its end, its head too (an audit's finding).
        events = [b"data: {\"n\":%d}\n\n" % n for n in range(2)] + [b"data: [DONE]\n\n"]
        gates = [threading.Event() for _ in events[1:]]
        for gate in gates:
            self.addCleanup(gate.set)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
                % sum(map(len, events)))
        raw = RawUpstream(self, lambda conn, k: [head + events[0], gates[0], events[1], gates[1], events[2]])
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","stream":true}',
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()  # (the head, before the body's end)
        self.assertEqual((resp.status, resp.length), (200, sum(map(len, events))))
        for event, gate in zip(events, gates + [None]):
            self.assertEqual(resp.read(len(event)), event)  # each before the next is sent
            if gate is not None:
                gate.set()
        self.assertEqual(resp.read(), b"")
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["stream_events"]), ("completed", 3))


class UnreadableHeadTest(FaultTestCase):
    def test_a_head_past_the_standard_librarys_limits_is_named_as_such(self):
        # It was "upstream ... unreachable: HTTPException", for an upstream that had answered.
        many = b"HTTP/1.1 200 OK\r\n" + b"X-Many: v\r\n" * 150 + b"\r\n"
        raw = RawUpstream(self, lambda conn, k: many)
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        status, _, body = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual(status, 502)
        error = json.loads(body)["error"]
        self.assertIn("response head the proxy cannot read (HTTPException)", error["message"])
        self.assertEqual(error["code"], "upstream_protocol_error")  # it answered: not "unavailable"
        self.assertEqual(proxy.server.metrics.upstream_errors.value("openai", "protocol"), 1)
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["error"]["type"]), (502, "upstream_protocol_error"))


class InterimResponseTest(FaultTestCase):
    def test_informational_heads_are_passed_on_and_the_final_response_follows(self):
        # A 103 was taken for the response: the client got it and never the final one.
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        answer = _json_answer(b'{"n":1}')
        raw = RawUpstream(self, lambda conn, k: [b"HTTP/1.1 100 Continue\r\n\r\n", early,
                                                 b"HTTP/1.1 102 Processing\r\n\r\n", answer])
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(PLAIN_BODY), PLAIN_BODY))
        data = read_until(sock, b'{"n":1}')
        heads = [block.split(b"\r\n")[0] for block in data.split(b"\r\n\r\n")[:-1]]
        self.assertEqual(heads, [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 102 Processing", b"HTTP/1.1 200 OK"])
        self.assertTrue(data.startswith(early), data)
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"], rec["response_body"]), (200, "completed", {"n": 1}))

    def test_an_early_hint_reaches_the_client_before_the_final_response_is_sent(self):
        # A 103 waited for the final head and went with it: Early Hints came no earlier than the
        # answer they are to come before. The upstream sends the final head only once the client
        # has the 103.
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        hinted = threading.Event()
        raw = RawUpstream(self, lambda conn, k: [early, hinted, _json_answer(b'{"n":1}')])
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(PLAIN_BODY), PLAIN_BODY))
        sock.settimeout(5.0)  # (the 103 comes at once, or after the upstream's answer: never)
        try:
            data = read_until(sock, b"\r\n\r\n")
        except socket.timeout:
            self.fail("the 103 did not reach the client before the upstream's final response")
        finally:
            hinted.set()
        self.assertEqual(data, early)
        sock.settimeout(DEADLINE)
        data = read_until(sock, b'{"n":1}', data)
        self.assertIn(b"\r\n\r\nHTTP/1.1 200 OK\r\n", data)
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"], rec["response_body"]), (200, "completed", {"n": 1}))

    def test_a_connection_closed_after_an_early_hint_is_not_retried(self):
        # The upstream answered (a 103 the client has): a close after it is the upstream's
        # failure, not a stale pooled connection to retry, which sent the client a second 103.
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        raw = RawUpstream(self, lambda conn, k: _json_answer(b'{"n":1}') if conn == 0 and k == 0 else
                          ([early, "close"] if conn == 0 else [early, _json_answer(b'{"n":2}')]))
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        self.assertIn(b'{"n":1}', _post(proxy.port))
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_to_eof(sock)
        self.assertEqual(data.count(b"HTTP/1.1 103 "), 1, data)
        self.assertIn(b"\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n", data)


def _post(port: int, body: bytes = PLAIN_BODY, path: str = "/v1/chat/completions", extra: bytes = b"",
          version: bytes = b"1.1") -> bytes:
    """Everything a raw client gets for one request that closes its connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        sock.sendall(b"POST %s HTTP/%s\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), version, extra, len(body), body))
        return read_to_eof(sock)
    finally:
        sock.close()


def _dechunk(data: bytes) -> bytes:
    """A whole chunked body (the last chunk included, no trailers) without its framing."""
    out = []
    while True:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if not n:
            if data != b"\r\n":
                raise AssertionError("not a whole chunked body: %r" % data[:80])
            return b"".join(out)
        out.append(data[:n])
        if data[n:n + 2] != b"\r\n":
            raise AssertionError("a chunk without its CRLF")
        data = data[n + 2:]


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


class ReasonPhraseTest(FaultTestCase):
    def test_the_reason_phrase_reaches_the_client_as_the_upstream_sent_it(self):
        # http.client strips the phrase ("OK  " came as "OK"): the status line was not the upstream's.
        cases = [(b"200 OK  ", b"200 OK  "), (b"429  Too   Many Requests ", b"429  Too   Many Requests "),
                 (b"200 \tOK\t", b"200 \tOK\t"), (b"418 caf\xe9 \x85\xa0", b"418 caf\xe9 \x85\xa0"),
                 (b"200 ", b"200 "), (b"599 Mine ", b"599 Mine ")]
        for sent, expected in cases:
            with self.subTest(sent=sent):
                raw = RawUpstream(self, lambda conn, k: b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\n{}" % sent)
                proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
                data = _post(proxy.port)
                self.assertTrue(data.startswith(b"HTTP/1.1 %s\r\n" % expected), data[:80])
                self.assertTrue(data.endswith(b"\r\n\r\n{}"), data)

    def test_a_phrase_that_would_break_the_status_line_is_replaced_by_the_standard_one(self):
        # A status line must stay one line: CR, LF and other controls never reach the client.
        cases = [(b"200 O\x00K", b"200 OK"), (b"404 Not\rFound", b"404 Not Found"),
                 (b"503 Busy\x7f", b"503 Service Unavailable"), (b"200 \x1bX ", b"200 OK"),
                 (b"599 odd\x0b", b"599 ")]
        for sent, expected in cases:
            with self.subTest(sent=sent):
                raw = RawUpstream(self, lambda conn, k: b"HTTP/1.1 %s\r\nX-A: b\r\nContent-Length: 2\r\n\r\n{}" % sent)
                proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
                data = _post(proxy.port)
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                self.assertEqual(lines[0], b"HTTP/1.1 %s" % expected)
                self.assertIn(b"X-A: b", lines)
                self.assertEqual(body, b"{}")
                self.assertEqual(proxy.records()[-1]["ended"], "completed")

    def test_a_status_line_that_is_not_one_to_http_is_a_502_not_a_plain_status(self):
        # Read with str.split() and int(), "HTTP/1.1\x1c404 Gone" and "HTTP/1.1 +404" reached the
        # client as a clean "404": a status line no HTTP client would have read so.
        for sent in (b"HTTP/1.1\x1c404 Gone", b"HTTP/1.1 404\x1fGone", b"HTTP/1.1 +404 Gone", b"HTTP/1.1 0404 Gone"):
            with self.subTest(sent=sent):
                raw = RawUpstream(self, lambda conn, k: b"%s\r\nContent-Length: 2\r\n\r\n{}" % sent)
                proxy = self.start_proxy([provider("anthropic", "anthropic", raw.url, "", ["claude-*"])])
                data = _post(proxy.port, b'{"model": "claude-x"}', "/v1/messages")
                head, _, body = data.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head[:80])
                self.assertEqual(json.loads(body)["type"], "error")
                rec = proxy.records()[-1]
                self.assertEqual((rec["status_code"], rec["ended"], rec["error"]["type"]),
                                 (502, "upstream_error", "upstream_protocol_error"))
                self.assertEqual(proxy.server.metrics.upstream_errors.value("anthropic", "protocol"), 1)

    def test_informational_phrases_are_passed_on_as_sent_too(self):
        early = b"HTTP/1.1 103 Early  Hints \r\nLink: </a.css>; rel=preload\r\n\r\n"
        raw = RawUpstream(self, lambda conn, k: [early, b"HTTP/1.1 102 Pro\x00cessing\r\n\r\n",
                                                 b"HTTP/1.1 200 Fine \r\nContent-Length: 2\r\n\r\n{}"])
        proxy = self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"])])
        data = _post(proxy.port)
        self.assertTrue(data.startswith(early + b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 Fine \r\n"), data)


_SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00"


class SwitchingProtocolsTest(FaultTestCase):
    """RFC 9110 15.2.2: a server must not switch to a protocol the client did not ask for. The
    proxy forwards no Upgrade, so a 101 is never one it asked for: the upstream broke the
    protocol, and the client gets a 502 in its provider's shape (a 101 relayed on its own, as it
    was, left the client on an HTTP connection whose upstream had left HTTP)."""

    def start_raw(self):
        # The first connection switches; any other answers as HTTP.
        raw = RawUpstream(self, lambda conn, k: _SWITCH if conn == 0 else _json_answer(b'{"n":2}'))
        return raw, self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"]),
                                      provider("anthropic", "anthropic", raw.url, "", ["claude-*"])])

    def test_an_unasked_for_101_is_a_502_in_the_providers_shape_and_recorded(self):
        raw, proxy = self.start_raw()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        body = b'{"model":"claude-x","messages":[]}'
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = read_until(sock, b"\r\n\r\n")
        head, _, rest = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
        error = json.loads(rest)
        self.assertEqual((error["type"], error["error"]["type"]), ("error", "api_error"))
        self.assertIn("101", error["error"]["message"])
        # The client's connection is still good HTTP: the next request is answered, upstream on
        # a new connection (the one that switched is never pooled).
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(PLAIN_BODY), PLAIN_BODY))
        self.assertTrue(read_until(sock, b'{"n":2}').startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual([raw.requests.get(timeout=DEADLINE)[0] for _ in range(2)], [0, 1])
        first, second = proxy.records()
        self.assertEqual((first["status_code"], first["ended"], first["error"]["type"]),
                         (502, "upstream_error", "upstream_protocol_error"))
        self.assertIn("101", first["error"]["message"])
        self.assertEqual(first["response_body"], error)
        self.assertEqual((second["status_code"], second["ended"]), (200, "completed"))
        self.assertEqual(proxy.server.metrics.upstream_errors.value("anthropic", "protocol"), 1)

    def test_a_101_to_a_client_that_asked_for_an_upgrade_is_a_502_too(self):
        # Upgrade is hop-by-hop and the proxy relays HTTP only: an h2c upgrade is forwarded
        # without it (a WebSocket handshake gets 426, UpgradeTest), so the upstream was not
        # asked either, and what follows its 101 is not HTTP the proxy could relay.
        raw, proxy = self.start_raw()
        data = _post(proxy.port, extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 502 "), data[:80])
        self.assertEqual(json.loads(data.partition(b"\r\n\r\n")[2])["error"]["type"], "server_error")
        _, sent = raw.requests.get(timeout=DEADLINE)
        self.assertNotIn(b"upgrade", sent.lower().partition(b"\r\n\r\n")[0])
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"]), (502, "upstream_error"))


def _sse(text: str) -> bytes:
    return chunk_event(text)


class TransferCodingTest(FaultTestCase):
    """Transfer codings are hop-by-hop (RFC 9112 7): the proxy is the recipient of the
    upstream's, takes them off, and frames the decoded body to the client as any other (the
    gzip bytes went on, re-chunked, with no header to say how they were coded)."""

    def start_raw(self, script):
        raw = RawUpstream(self, script)
        return raw, self.start_proxy([provider("openai", "openai", raw.url, "", ["gpt-*"]),
                                      provider("gemini", "gemini", raw.url, "", ["gemini-*"])])

    def test_gzip_before_chunked_is_decoded_and_the_body_chunked_as_usual(self):
        packed = gzip.compress(CHAT_REPLY)
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                  + _chunked(packed[:10], packed[10:25], packed[25:]))
        raw, proxy = self.start_raw(lambda conn, k: answer)
        data = _post(proxy.port)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", head + b"\r\n")
        self.assertNotIn(b"gzip", head.lower())
        self.assertEqual(_dechunk(body), CHAT_REPLY)
        # An HTTP/1.0 client: the decoded body, to the close.
        data = _post(proxy.port, version=b"1.0")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, CHAT_REPLY)
        first, second = proxy.records()
        for rec in (first, second):
            self.assertEqual((rec["ended"], rec["response_bytes"]), ("completed", len(CHAT_REPLY)))
            self.assertEqual(rec["response_body"], json.loads(CHAT_REPLY))
            self.assertIsNone(rec.get("decode_error"))
            # The upstream's head as it came (README, response_headers): the coding is that hop's.
            self.assertEqual(rec["response_headers"]["transfer-encoding"], "gzip, chunked")

    def test_codings_on_several_lines_are_one_list(self):
        # Transfer-Encoding: gzip, then Transfer-Encoding: chunked: only the first line was read
        # (as the standard library reads it), and the gzip'd chunks were taken for the body.
        packed = gzip.compress(CHAT_REPLY)
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n"
                  b"X-Other: 1\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(packed[:10], packed[10:]))
        raw, proxy = self.start_raw(lambda conn, k: answer)
        head, _, body = _post(proxy.port).partition(b"\r\n\r\n")
        self.assertNotIn(b"gzip", head.lower())
        self.assertEqual(_dechunk(body), CHAT_REPLY)
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["response_body"]), ("completed", json.loads(CHAT_REPLY)))
        # chunked on two lines is chunked twice: a coding the proxy cannot take off.
        twice = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"abc")
        raw, proxy = self.start_raw(lambda conn, k: twice)
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 502)

    def test_other_decodable_codings(self):
        zlibbed = zlib.compress(CHAT_REPLY)
        raw_deflate = zlib.compressobj(wbits=-15)
        raw_deflate = raw_deflate.compress(CHAT_REPLY) + raw_deflate.flush()
        twice = zlib.compress(gzip.compress(CHAT_REPLY))
        members = gzip.compress(CHAT_REPLY[:30]) + gzip.compress(CHAT_REPLY[30:])
        cases = [
            ("deflate, chunked", _chunked(zlibbed), CHAT_REPLY),
            # Without the zlib header (as some servers send it), its first byte alone first.
            ("deflate, chunked", _chunked(raw_deflate[:1], raw_deflate[1:]), CHAT_REPLY),
            ("X-Gzip, Chunked", _chunked(gzip.compress(CHAT_REPLY)), CHAT_REPLY),
            ("gzip , identity, deflate ,chunked", _chunked(twice), CHAT_REPLY),
            ("gzip, chunked", _chunked(members), CHAT_REPLY),  # two gzip members, one after the other
            ("gzip, chunked", _chunked(gzip.compress(b"")), b""),
            ("gzip, chunked", _chunked(), b""),  # no body at all: nothing to decode
        ]
        for coding, body, expected in cases:
            with self.subTest(coding=coding, body=body[:20]):
                answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%s" % (coding.encode(), body)
                raw, proxy = self.start_raw(lambda conn, k: answer)
                data = _post(proxy.port)
                self.assertEqual(_dechunk(data.partition(b"\r\n\r\n")[2]), expected)
                rec = proxy.records()[-1]
                self.assertEqual((rec["ended"], rec["response_bytes"]), ("completed", len(expected)))

    def test_a_body_in_transfer_codings_without_chunked_ends_at_the_close(self):
        # RFC 9112 6.3: chunked not last, the body is read to the close, Content-Length aside.
        packed = gzip.compress(CHAT_REPLY)
        answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
                  + packed)
        raw, proxy = self.start_raw(lambda conn, k: [answer, "close"])
        data = _post(proxy.port)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertNotIn(b"content-length", head.lower())
        self.assertEqual(_dechunk(body), CHAT_REPLY)
        self.assertEqual(proxy.records()[-1]["response_body"], json.loads(CHAT_REPLY))

    def test_a_gzipped_stream_is_relayed_decoded_as_it_arrives(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        z = zlib.compressobj(wbits=31)
        first = z.compress(_sse("Hel")) + z.flush(zlib.Z_SYNC_FLUSH)
        second = z.compress(_sse("lo") + b"data: [DONE]\n\n") + z.flush()
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        raw, proxy = self.start_raw(lambda conn, k: [head + b"%x\r\n%s\r\n" % (len(first), first), gate,
                                                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second)])
        sock = open_stream(proxy.port)
        self.addCleanup(sock.close)
        data = read_until(sock, _sse("Hel"))  # before the upstream sends the rest
        gate.set()
        data = read_until(sock, b"\r\n0\r\n\r\n", data)
        self.assertEqual(_dechunk(data.partition(b"\r\n\r\n")[2]), _sse("Hel") + _sse("lo") + b"data: [DONE]\n\n")
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], content_of(rec)), ("completed", "Hello"))
        self.assertEqual(len(proxy.stream_lines()[0]["events"]), 3)

    def test_an_unknown_transfer_coding_is_a_502_in_the_providers_shape(self):
        for coding in (b"br, chunked", b"compress", b"chunked, chunked", b"gzip, x-custom, chunked"):
            with self.subTest(coding=coding):
                answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%s" % (coding, _chunked(b"abc"))
                raw, proxy = self.start_raw(lambda conn, k: answer)
                status, _, body = request(proxy.url, path="/v1beta/models/gemini-2.0-flash:generateContent",
                                          body={"contents": []})
                error = json.loads(body)["error"]
                self.assertEqual((status, error["status"]), (502, "UNAVAILABLE"))
                self.assertIn("transfer coding", error["message"])
                rec = proxy.records()[-1]
                self.assertEqual((rec["status_code"], rec["ended"], rec["error"]["type"]),
                                 (502, "upstream_error", "upstream_protocol_error"))
                self.assertEqual(proxy.server.metrics.upstream_errors.value("gemini", "protocol"), 1)
        # Without a body to decode (HEAD, 204, 304), the coding does not matter.
        raw, proxy = self.start_raw(lambda conn, k: b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: br, chunked\r\n\r\n")
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 204)

    def test_a_body_its_coding_does_not_decode_is_cut_as_a_broken_stream(self):
        packed = gzip.compress(CHAT_REPLY)
        cases = [("corrupt", packed[:20] + b"\xff" * 8 + packed[28:]), ("cut short", packed[:-6])]
        for name, body in cases:
            with self.subTest(name):
                answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + _chunked(body)
                raw, proxy = self.start_raw(lambda conn, k: answer)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
                self.addCleanup(conn.close)
                conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
                resp = conn.getresponse()
                self.assertEqual(resp.status, 200)
                with self.assertRaises(http.client.IncompleteRead):  # no last chunk: the client sees the cut
                    resp.read()
                rec = proxy.records()[-1]
                self.assertEqual((rec["ended"], rec["error"]["type"]), ("upstream_error", "upstream_error"))
                self.assertIn("gzip", rec["error"]["message"])


class _Racing:
    """An exchange whose handler clears ``client_sock`` right after the watchdog first reads it
    (the race of an exchange ending during a watchdog pass)."""

    def __init__(self, sock, upstream_sock):
        self._sock = sock
        self.upstream_sock = upstream_sock
        self.client_gone = False
        self.cancelled = False
        self.t0 = time.perf_counter()
        self.upstream_deadline = 0.0
        self.upstream_late = False

    @property
    def client_sock(self):
        sock, self._sock = self._sock, None
        return sock


class WatchdogTest(FaultTestCase):
    def test_an_exchange_ending_during_a_pass_does_not_break_the_watchdog(self):
        proxy = self.start_proxy()
        client, peer = socket.socketpair()
        up_ours, up_theirs = socket.socketpair()
        for s in (client, peer, up_ours, up_theirs):
            self.addCleanup(s.close)
        peer.close()  # the client left
        ex = _Racing(client, up_ours)
        proxy.server.track(ex)
        self.addCleanup(proxy.server.untrack, ex)
        proxy.server.watch_once()
        self.assertTrue(ex.client_gone)
        up_theirs.settimeout(DEADLINE)
        self.assertEqual(up_theirs.recv(1), b"", "the upstream connection was not shut down")

    def test_a_client_wait_that_ends_during_a_pass_is_not_cut(self):
        proxy = self.start_proxy()
        server = proxy.server
        server._stop_watch.set()  # this test makes the passes itself
        server._watchdog.join(DEADLINE)
        pairs = [socket.socketpair() for _ in range(2)]
        for pair in pairs:
            for s in pair:
                self.addCleanup(s.close)
                s.settimeout(DEADLINE)
        waiting, late = (ClientClock(ours, 60.0) for ours, _ in pairs)
        for clock in (waiting, late):
            clock.due = time.perf_counter() - 1.0  # both past their deadline at the pass's first look
            server.watch_client(clock)
            self.addCleanup(server.unwatch_client, clock)
        lock = server.conn_lock
        taken = []

        class Handover:
            """conn_lock; the second time a pass takes it, ``waiting``'s read has returned and a
            new one begun (the race of a wait ending during a pass)."""

            def __enter__(self):
                taken.append(1)
                if len(taken) == 2:
                    waiting.due = time.perf_counter() + 60.0
                return lock.__enter__()

            def __exit__(self, *exc):
                return lock.__exit__(*exc)

        server.conn_lock = Handover()
        server.watch_once()
        server.conn_lock = lock
        self.assertEqual(len(taken), 2)
        self.assertEqual((waiting.late, late.late), (False, True))
        pairs[0][1].sendall(b"x")
        self.assertEqual(pairs[0][0].recv(1), b"x", "a connection within its limit was cut")
        self.assertEqual(pairs[1][0].recv(1), b"", "the late connection was not cut")  # SHUT_RD: the end

    def test_the_watchdog_survives_a_failing_pass(self):
        proxy = self.start_proxy()
        calls = []
        survived = threading.Event()

        def failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in one pass")
            survived.set()
        proxy.server.watch_once = failing_once
        with self.assertLogs("proxy_llm.server", "ERROR"):
            self.assertTrue(survived.wait(DEADLINE), "no watchdog pass after a failing one")


class UpstreamFaultTest(FaultTestCase):
    def test_an_answer_sent_before_the_body_was_read_reaches_the_client(self):
        # A server that refuses a big body without reading it (Go's net/http reads 256 KB
        # before it closes; auth middleware; a 413) answers and closes: the proxy's send of the
        # body then fails, and it answered 502 upstream_unavailable instead of the provider's
        # answer, which a client reading while it sends gets (an audit's finding, with curl).
        answer = b'{"error":{"message":"body too large","type":"invalid_request_error"}}'
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the body fills it at once)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        heads = queue.Queue()

        def refuse():
            conn, _ = listener.accept()
            with conn:
                head = read_until(conn, b"\r\n\r\n")
                heads.put(head)
                conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                conn.shutdown(socket.SHUT_WR)
            # (closed with the body unread: a reset, which fails the proxy's send)
        thread = threading.Thread(target=refuse, daemon=True)
        thread.start()
        proxy = self.start_proxy([provider("openai", "openai", "http://127.0.0.1:%d" % listener.getsockname()[1],
                                           "", ["gpt-*"])], capture_max_body=1 << 20)
        body = b'{"model":"gpt-4o","input":"%s"}' % (b"x" * (12 << 20))
        status, headers, data = request(proxy.url, body=body)
        self.assertEqual((status, data), (413, answer))
        self.assertEqual(header(headers, "Content-Type"), "application/json")
        thread.join(DEADLINE)
        self.assertTrue(heads.get_nowait().startswith(b"POST /v1/chat/completions"))
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"], rec["request_bytes"]), (413, "completed", len(body)))
        self.assertEqual(rec["error"]["type"], "invalid_request_error")
        self.assertEqual(len(proxy.server.pools["openai"]._idle), 0)  # (its connection is not kept)

    def test_upstream_reset_mid_stream(self):
        self.replies.append(sse_reply([chunk_event("Hel"), chunk_event("lo"), "RESET"]))
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=CHAT_BODY)
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        with self.assertRaises(http.client.IncompleteRead):  # no last chunk: the client sees the cut
            resp.read()
        conn.close()
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "upstream_error")
        self.assertEqual(rec["error"]["type"], "upstream_error")
        self.assertEqual(content_of(rec), "Hello")
        self.assertEqual(len(proxy.stream_lines()[0]["events"]), 2)
        self.assertEqual(proxy.server.metrics.upstream_errors.value("openai", "upstream_error"), 1)

    def test_upstream_stalls_mid_stream(self):
        self.replies.append(sse_reply([chunk_event("Hel"), "HANG"]))
        proxy = self.start_proxy(stream_idle_timeout=0.3)
        sock = open_stream(proxy.port)
        started = time.monotonic()
        data = read_until(sock, b"Hel") + read_to_eof(sock)
        sock.close()
        self.assertLess(time.monotonic() - started, 0.3 + 5.0)
        self.assertNotIn(b"\r\n0\r\n\r\n", data)  # the stream is cut, not completed
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "timeout")
        self.assertEqual(rec["error"]["type"], "timeout")
        self.assertIn("idle", rec["error"]["message"])
        self.assertEqual(content_of(rec), "Hel")

    def test_a_stall_in_a_body_of_known_length_is_a_timeout(self):
        # Content-Length promises more than is sent: the small-body path (one read) stalls.
        self.replies.append(Reply(200, [("Content-Type", "application/json"), ("Content-Length", "200")],
                                  [b'{"id":"chatcmpl-1","choices":[', "HANG"], chunked=False))
        proxy = self.start_proxy(stream_idle_timeout=0.3)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
        with self.assertRaises((http.client.HTTPException, OSError)):  # headers and body never come
            conn.getresponse().read()
        conn.close()
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["error"]["type"]), ("timeout", "timeout"))
        self.assertIn("stalled", rec["error"]["message"])
        self.assertEqual(proxy.server.metrics.upstream_errors.value("openai", "timeout"), 1)

    def test_a_stall_in_a_close_delimited_body_is_a_timeout_not_an_end(self):
        # No length and no chunks: the body ends when the upstream closes. The watchdog's cut
        # also reads as an end of file, which must not be taken for the upstream's.
        self.replies.append(Reply(200, [("Content-Type", "text/event-stream")], [chunk_event("Hel"), "HANG"],
                                  close_delimited=True))
        proxy = self.start_proxy(stream_idle_timeout=0.3)
        sock = open_stream(proxy.port)
        data = read_until(sock, b"Hel") + read_to_eof(sock)
        sock.close()
        self.assertNotIn(b"\r\n0\r\n\r\n", data)  # cut, not completed
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["error"]["type"]), ("timeout", "timeout"))
        self.assertIn("idle", rec["error"]["message"])

    def test_a_client_slow_to_read_is_not_taken_for_a_silent_upstream(self):
        # The upstream sends 16 MB at once; the client reads nothing for longer than
        # stream_idle_timeout. All that time the relay is blocked writing to the client, not
        # waiting for the upstream: the upstream's limit must not run.
        self.replies.append(sse_reply([chunk_event("x" * (256 * 1024))] * 64 + [b"data: [DONE]\n\n"]))
        proxy = self.start_proxy(stream_idle_timeout=0.3, capture_max_body=64 * 1024 * 1024)
        sock = open_stream(proxy.port, rcvbuf=4096)
        self.addCleanup(sock.close)
        first = read_until(sock, b"\r\n\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 200"), first[:100])
        threading.Event().wait(1.0)  # a client not reading: past the limit, over several watchdog passes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        parts, tail = [first], b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # 16 MB: no rescan of what came before
            more = sock.recv(1 << 20)
            self.assertTrue(more, "the stream was cut: %r" % tail)
            parts.append(more)
            tail = (tail + more)[-64:]
        self.assertIn(b"data: [DONE]", b"".join(parts[-3:]))
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "completed")
        self.assertEqual(len(content_of(rec)), 64 * 256 * 1024)

    def test_a_late_response_head_on_a_reused_connection_is_not_sent_again(self):
        # A stale pooled connection is retried once on a fresh one; an upstream that was cut
        # for being late must not be: the retry would run the LLM call twice.
        gate = threading.Event()
        self.addCleanup(gate.set)
        proxy = self.start_proxy(response_header_timeout=0.3)
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))  # its connection is back in the pool
        self.replies.append(Reply(200, [("Content-Type", "application/json")], CHAT_REPLY, delay_headers=gate))
        status, _, body = request(proxy.url, body=b'{"model":"gpt-4o","messages":[],"tag":"late"}')
        self.assertEqual(status, 504, body)
        self.assertEqual(self.upstream.connections, 1, "the late request did not reuse the pooled connection")
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        bodies = []
        while not self.upstream.requests.empty():
            bodies.append(self.upstream.requests.get_nowait().body)
        self.assertEqual(sum(b'"late"' in b for b in bodies), 1, "the late request was sent again")
        self.assertEqual([r["ended"] for r in proxy.records()], ["completed", "timeout", "completed"])

    def test_a_retry_after_a_stale_connection_takes_a_new_one(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies += [Reply(200, [("Content-Type", "application/json")], CHAT_REPLY, delay_headers=gate)] * 2
        proxy = self.start_proxy()
        statuses: "queue.Queue[int]" = queue.Queue()
        clients = [threading.Thread(target=lambda: statuses.put(request(proxy.url, body=PLAIN_BODY)[0]))
                   for _ in range(2)]
        for client in clients:
            client.start()
        for _ in clients:
            self.upstream.next_request()  # both in flight, on two upstream connections
        gate.set()
        for client in clients:
            client.join(DEADLINE)
        self.assertEqual([statuses.get_nowait() for _ in clients], [200, 200])
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        pooled = [conn for conn, _ in proxy.server.pools["openai"]._idle]
        self.assertEqual(len(pooled), 2)
        for conn in pooled:
            conn.sock.shutdown(socket.SHUT_RDWR)  # both stale, as a peer's close or a cut leaves them
        with mock.patch.object(upstream, "_readable", lambda sock: False):  # reused unchecked
            status, _, body = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream.connections, 3)

    def test_a_connection_cut_after_its_last_read_is_not_pooled(self):
        # The watchdog's cut (a client gone, a time limit, a shutdown) can land after the relay
        # read the last byte and before it lets go of the socket: that socket is shut down.
        let_go = ProxyHandler.let_go

        def cut_then_let_go(handler, ex):
            if ex.upstream_sock is not None:
                ex.client_gone = True  # as the watchdog does it: the reason first, then the cut
                handler.server.cut_upstream(ex)
            let_go(handler, ex)

        with mock.patch.object(ProxyHandler, "let_go", cut_then_let_go):
            proxy = self.start_proxy()
            self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
            self.assertTrue(proxy.server.wait_idle(DEADLINE))
        self.assertEqual(list(proxy.server.pools["openai"]._idle), [], "a cut connection was pooled")
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)

    def test_upstream_sockets_have_no_timeout_once_connected(self):
        # The limits are the watchdog's: a socket timeout would add a poll and a GIL hand-off
        # to every send and receive.
        proxy = self.start_proxy()
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))  # the connection is back in the pool
        idle = list(proxy.server.pools["openai"]._idle)
        self.assertEqual(len(idle), 1)
        self.assertIsNone(idle[0][0].sock.gettimeout())

    def test_errors_before_headers_are_in_the_provider_shape(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies.append(Reply(200, [], b"{}", delay_headers=gate))
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_url = "http://127.0.0.1:%d" % dead.getsockname()[1]
        dead.close()
        proxy = self.start_proxy([provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"]),
                                  provider("gemini", "gemini", dead_url, "", ["gemini-*"])],
                                 response_header_timeout=0.3)
        status, headers, body = request(proxy.url, path="/v1/messages", body={"model": "claude-x", "stream": True})
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body), {"type": "error", "error": {"type": "timeout_error",
                                                                       "message": json.loads(body)["error"]["message"]}})
        status, _, body = request(proxy.url, path="/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                                  body={"contents": []})
        self.assertEqual((status, json.loads(body)["error"]["status"]), (502, "UNAVAILABLE"))
        recs = proxy.records()
        self.assertEqual([(r["ended"], r["status_code"]) for r in recs], [("timeout", 504), ("upstream_error", 502)])
        self.assertEqual(recs[0]["id"], header(headers, "X-Proxy-Record-Id"))
        self.assertEqual(recs[0]["error"]["type"], "upstream_timeout")

    def test_no_total_timeout_on_a_long_stream_unless_configured(self):
        gates = [threading.Event() for _ in range(6)]
        self.addCleanup(lambda: [g.set() for g in gates])
        parts = []
        for n, gate in enumerate(gates):
            parts += [chunk_event("w%d " % n), gate]
        self.replies.append(sse_reply(parts + [chunk_event("", "stop"), b"data: [DONE]\n\n"]))
        # Every gap is shorter than each timeout; the whole stream is longer than all of them.
        proxy = self.start_proxy(stream_idle_timeout=0.4, client_idle_timeout=0.4, client_header_timeout=0.4)
        sock = open_stream(proxy.port)
        started = time.monotonic()
        read_until(sock, b"w0")
        pace = threading.Event()
        for gate in gates:
            pace.wait(0.15)  # pacing the fake upstream, not synchronisation
            gate.set()
        data = read_until(sock, b"\r\n0\r\n\r\n")
        self.assertGreater(time.monotonic() - started, 0.8)
        self.assertIn(b"[DONE]", data)
        sock.close()
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "completed")
        self.assertEqual(content_of(rec), "w0 w1 w2 w3 w4 w5 ")

    def test_total_timeout_cuts_a_stream_when_configured(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies.append(sse_reply([chunk_event("part"), gate, chunk_event("never")]))
        proxy = self.start_proxy(total_timeout=0.5)
        sock = open_stream(proxy.port)
        data = read_until(sock, b"part") + read_to_eof(sock)
        sock.close()
        self.assertNotIn(b"never", data)
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "timeout")
        self.assertIn("total_timeout", rec["error"]["message"])
        self.assertEqual(content_of(rec), "part")

    def test_total_timeout_before_the_head_is_a_timeout_not_an_upstream_failure(self):
        # The cut's reset reached the "upstream closed the connection" branch: a 502 and an
        # upstream_error record, for a limit of the proxy's own.
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies.append(Reply(200, [("Content-Type", "application/json")], CHAT_REPLY, delay_headers=gate))
        proxy = self.start_proxy(total_timeout=0.5, response_header_timeout=30)
        status, _, body = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual((status, json.loads(body)["error"]["type"]), (504, "timeout"))
        [rec] = proxy.records()
        self.assertEqual((rec["ended"], rec["status_code"], rec["error"]["type"]), ("timeout", 504, "upstream_timeout"))
        self.assertIn("total_timeout", rec["error"]["message"])
        self.assertEqual(proxy.server.metrics.upstream_errors.value("openai", "timeout"), 1)
        self.assertEqual(proxy.server.metrics.upstream_errors.value("openai", "connection"), 0)

    def test_error_answers_to_stream_requests_pass_through_verbatim(self):
        html = b"<html><body><h1>503 Service Unavailable</h1></body></html>"
        self.replies.append(Reply(503, [("Content-Type", "text/html")], [html[:20], html[20:]]))  # chunked
        limit = b'{"error":{"message":"Rate limit reached","type":"rate_limit_error"}}'
        self.replies.append(Reply(429, [("Content-Type", "application/json"), ("Retry-After", "20")], limit))
        proxy = self.start_proxy()
        status, headers, body = request(proxy.url, body=CHAT_BODY)
        self.assertEqual((status, body, header(headers, "Content-Type")), (503, html, "text/html"))
        status, headers, body = request(proxy.url, body=CHAT_BODY)
        self.assertEqual((status, body, header(headers, "Retry-After")), (429, limit, "20"))
        recs = proxy.records()
        self.assertEqual(recs[0]["response_body"], html.decode())
        self.assertEqual(recs[0]["error"]["type"], "http_503")
        self.assertEqual(recs[1]["response_body"], json.loads(limit))
        self.assertEqual(recs[1]["response_headers"]["retry-after"], "20")
        self.assertEqual([r["ended"] for r in recs], ["completed", "completed"])
        self.assertEqual(proxy.stream_lines(), [])


class LimitsTest(FaultTestCase):
    def test_capture_max_body_keeps_a_prefix_size_and_hash_client_gets_everything(self):
        big_request = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"q" * 5000 + b'"}]}'
        big_reply = b'{"id":"x","choices":[{"index":0,"message":{"content":"' + b"a" * 6000 + b'"}}]}'
        events = [chunk_event("s" * 500) for _ in range(10)] + [chunk_event("", "stop"), b"data: [DONE]\n\n"]
        self.replies.append(Reply(200, [("Content-Type", "application/json")], big_reply))  # Content-Length
        self.replies.append(Reply(200, [("Content-Type", "application/json")], [big_reply[:3000], big_reply[3000:]]))
        self.replies.append(sse_reply(events))
        proxy = self.start_proxy(capture_max_body=1000)
        for _ in range(2):
            status, _, body = request(proxy.url, body=big_request)
            self.assertEqual((status, body), (200, big_reply))
            self.assertEqual(self.upstream.next_request().body, big_request)
        status, _, body = request(proxy.url, body=b'{"model":"gpt-4o","stream":true}')
        self.assertEqual(body, b"".join(events))
        recs = proxy.records()
        for rec in recs[:2]:
            self.assertEqual(rec["truncated"]["request"], {"size": len(big_request), "kept": 1000,
                                                           "sha256": hashlib.sha256(big_request).hexdigest()})
            self.assertEqual(rec["truncated"]["response"], {"size": len(big_reply), "kept": 1000,
                                                            "sha256": hashlib.sha256(big_reply).hexdigest()})
            self.assertEqual(rec["request_body"], big_request[:1000].decode())  # a prefix is not JSON: a string
            self.assertEqual(rec["response_body"], big_reply[:1000].decode())
            self.assertEqual(rec["request_bytes"], len(big_request))
        streamed = recs[2]
        whole = b"".join(events)
        self.assertEqual(streamed["truncated"], {"response": {"size": len(whole), "kept": 1000,
                                                              "sha256": hashlib.sha256(whole).hexdigest()}})
        self.assertNotIn("request", streamed["truncated"])
        self.assertEqual(streamed["response_bytes"], len(whole))
        line = proxy.stream_lines()[0]
        self.assertLess(len(line["events"]), len(events))  # only the kept prefix is decoded

    def test_oversized_header_parts_are_answered_in_json(self):
        proxy = self.start_proxy()
        cases = [
            (b"POST /v1/chat/completions HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
            (b"POST /v1/chat/completions HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
            (b"POST /v1/" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
            (b"GARBAGE\r\n\r\n", 400),
        ]
        for raw, status in cases:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
            sock.sendall(raw)
            data = read_to_eof(sock)
            sock.close()
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d" % status), head[:100])
            self.assertIn(b"Content-Type: application/json", head)
            self.assertIn("error", json.loads(body))
        self.assertEqual(self.upstream.requests.qsize(), 0)

    def test_header_deadline_stops_a_client_dribbling_header_bytes(self):
        proxy = self.start_proxy(client_header_timeout=0.5, client_idle_timeout=5.0)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ")
        closed = False
        pace = threading.Event()
        while time.monotonic() - started < 4.0:
            pace.wait(0.1)  # one byte every 0.1 s: never idle for client_idle_timeout
            try:
                sock.sendall(b"a")
            except OSError:
                closed = True
                break
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            finally:
                sock.setblocking(True)
        elapsed = time.monotonic() - started
        sock.close()
        self.assertTrue(closed, "the connection outlived client_header_timeout")
        self.assertLess(elapsed, 2.5)
        self.assertEqual(self.upstream.requests.qsize(), 0)

    def test_a_new_connection_that_sends_nothing_is_closed_after_client_header_timeout(self):
        # It was kept for client_idle_timeout (4 times as long by default), a thread and a place
        # under max_connections each: here the idle timeout outlasts the socket's own deadline.
        proxy = self.start_proxy(client_header_timeout=0.3, client_idle_timeout=DEADLINE * 3)
        silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(3)]
        for sock in silent:
            self.assertEqual(read_to_eof(sock), b"")  # closed by the proxy, with nothing said
            sock.close()
        wait_until(lambda: proxy.server.connections == 0, what="their threads and places let go")
        self.assertEqual(self.upstream.requests.qsize(), 0)

    def test_idle_keep_alive_wait_is_not_cut_by_the_header_deadline(self):
        proxy = self.start_proxy(client_header_timeout=0.2, client_idle_timeout=5.0)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
        self.assertEqual(conn.getresponse().read(), CHAT_REPLY)
        threading.Event().wait(0.5)  # idle longer than the header deadline, shorter than the idle timeout
        conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
        self.assertEqual(conn.getresponse().read(), CHAT_REPLY)
        conn.close()
        self.assertEqual(self.upstream.connections, 1)

    def test_a_body_that_stops_arriving_times_out(self):
        proxy = self.start_proxy(client_idle_timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":")
        data = read_to_eof(sock)
        sock.close()
        # 408, as servers answer a body that stops (it was a 400: a soak audit's finding); the
        # SDKs retry it.
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data[:100])
        answer = json.loads(data.partition(b"\r\n\r\n")[2])
        self.assertEqual((answer["type"], answer["error"]["type"]), ("error", "timeout_error"))
        self.assertEqual(self.upstream.requests.qsize(), 0)
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"], rec["error"]["type"]), (408, "refused", "request_timeout"))
        self.assertEqual(rec["request_body"], '{"model":')

    def test_an_idle_keep_alive_connection_is_closed_after_client_idle_timeout(self):
        proxy = self.start_proxy(client_idle_timeout=0.3)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(PLAIN_BODY), PLAIN_BODY))
        started = time.monotonic()
        data = read_to_eof(sock)  # the answer, then the close of the idle connection
        elapsed = time.monotonic() - started
        sock.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:100])
        self.assertTrue(data.endswith(CHAT_REPLY))
        self.assertGreater(elapsed, 0.3)
        wait_until(lambda: proxy.server.connections == 0, what="the connection let go")
        self.assertEqual(proxy.server.clients, set())

    def endless_stream_to_a_small_window(self):
        """(proxy, client socket): an endless stream of 64 KB events relayed, client_idle_timeout
        0.5 s, to a client with a 4 KB receive buffer that has read the head only."""
        stop = threading.Event()
        self.addCleanup(stop.set)
        part = chunk_event("x" * (64 * 1024))
        self.replies.append(Reply(200, [("Content-Type", "text/event-stream")], Endless(part, stop)))
        proxy = self.start_proxy(client_idle_timeout=0.5, stream_idle_timeout=60.0)
        sock = open_stream(proxy.port, rcvbuf=4096)
        self.addCleanup(sock.close)
        self.assertTrue(read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 200"))
        return proxy, sock

    def test_a_client_that_stops_reading_is_let_go_after_client_idle_timeout(self):
        # The relay is blocked writing to a client that reads nothing: the write is bounded by
        # client_idle_timeout, and the exchange is recorded as the client's abort.
        proxy, sock = self.endless_stream_to_a_small_window()
        started = time.monotonic()
        wait_until(lambda: proxy.server.connections == 0, what="the connection let go")
        self.assertGreater(time.monotonic() - started, 0.3)
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "client_aborted")
        self.assertEqual(proxy.server.clients, set())

    def test_a_client_reading_slowly_but_steadily_is_not_let_go(self):
        # client_idle_timeout bounded each write: a client that read 32 KB a second never
        # paused for 0.5 s, but a 64 KB write to it took 2 s, and it was cut as idle, its
        # record client_aborted (an audit's finding).
        proxy, sock = self.endless_stream_to_a_small_window()
        pace = threading.Event()  # (never set: the pace of a slow reader)
        end = time.monotonic() + 3.0  # six times client_idle_timeout
        got = 0
        while time.monotonic() < end:
            data = sock.recv(3200)
            self.assertTrue(data, "cut after %d bytes" % got)
            got += len(data)
            pace.wait(0.1)
        [clock] = list(proxy.server.clients)
        self.assertFalse(clock.late)
        sock.close()  # then it goes, as ever
        wait_until(lambda: proxy.server.connections == 0, what="the connection let go")
        self.assertEqual(proxy.records()[0]["ended"], "client_aborted")

    def test_client_sockets_have_no_timeout(self):
        # The limits are the watchdog's, as for upstream sockets.
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=PLAIN_BODY)
        self.assertEqual(conn.getresponse().read(), CHAT_REPLY)
        [clock] = list(proxy.server.clients)
        self.assertIsNone(clock.sock.gettimeout())
        # Waiting for the next request, under client_idle_timeout.
        wait_until(lambda: clock.due, what="the wait for the next request")
        self.assertTrue(0 < clock.due - time.perf_counter() <= proxy.server.config.client_idle_timeout)

    def test_connections_past_max_connections_get_503(self):
        proxy = self.start_proxy(max_connections=3)
        idle = [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(3)]
        wait_until(lambda: proxy.server.connections == 3, what="3 connections counted")
        extra = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        # (On the reserve for /health and /metrics, so answered once its request is read: see
        # the test below.)
        extra.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(PLAIN_BODY), PLAIN_BODY))
        resp = http.client.HTTPResponse(extra)
        resp.begin()
        self.assertEqual(resp.status, 503)
        self.assertEqual(json.loads(resp.read())["error"]["type"], "proxy_unavailable")
        self.assertEqual(resp.getheader("Retry-After"), "1")
        extra.close()
        idle.pop().close()
        wait_until(lambda: proxy.server.connections < 3, what="a connection slot freed")
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        for sock in idle:
            sock.close()
        wait_until(lambda: proxy.server.connections == 0, what="all connections released")

    def test_health_and_metrics_are_answered_when_the_connection_cap_is_full(self):
        # A probe of a busy proxy was refused like any other connection: its orchestrator took
        # the proxy for dead and restarted it, losing every exchange in flight.
        proxy = self.start_proxy(max_connections=3)
        held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(3)]
        self.addCleanup(lambda: [sock.close() for sock in held])
        wait_until(lambda: proxy.server.connections == 3, what="the cap full")

        def ask(raw: bytes) -> http.client.HTTPResponse:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
            self.addCleanup(sock.close)
            sock.sendall(raw)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            return resp

        resp = ask(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((resp.status, resp.getheader("Connection")), (200, "close"))
        health = json.loads(resp.read())
        self.assertEqual((health["status"], health["connections"]), ("ok", 3))
        resp = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(resp.status, 200)
        self.assertIn(b"\nproxy_llm_open_connections 3\n", resp.read())
        # Anything else on a reserve connection: the cap's answer, nothing forwarded.
        resp = ask(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(PLAIN_BODY), PLAIN_BODY))
        self.assertEqual((resp.status, resp.getheader("Retry-After")), (503, "1"))
        self.assertEqual(json.loads(resp.read())["error"]["type"], "proxy_unavailable")
        wait_until(lambda: proxy.server.reserved == 0, what="the reserve let go")
        # The reserve is bounded: with it held too, a probe gets the cap's 503 at once.
        reserve = proxy.server.health_reserve
        held += [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(reserve)]
        wait_until(lambda: proxy.server.reserved == reserve, what="the reserve full")
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        resp = http.client.HTTPResponse(sock)  # answered before the request is sent
        resp.begin()
        self.assertEqual(resp.status, 503)
        self.assertEqual(json.loads(resp.read())["error"]["type"], "proxy_unavailable")
        self.assertEqual((proxy.server.connections, proxy.server.reserved), (3, reserve))
        for sock in held:
            sock.close()
        wait_until(lambda: (proxy.server.connections, proxy.server.reserved) == (0, 0), what="all let go")
        self.assertEqual(self.upstream.requests.qsize(), 0)


    def test_refused_connections_are_counted_and_the_reserve_is_shown(self):
        # A connection the cap refused was counted nowhere, and the reserve's use was not shown.
        proxy = self.start_proxy(max_connections=2)
        held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(2)]
        self.addCleanup(lambda: [sock.close() for sock in held])
        wait_until(lambda: proxy.server.connections == 2, what="the cap full")

        def ask(raw: bytes) -> Tuple[int, bytes]:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
            self.addCleanup(sock.close)
            sock.sendall(raw)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            return resp.status, resp.read()

        def scrape() -> Dict[str, str]:
            status, page = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status, 200)
            return dict(line.split(" ", 1) for line in page.decode().splitlines() if not line.startswith("#"))

        page = scrape()  # (itself on the reserve)
        self.assertEqual((page["proxy_llm_connections_refused_total"], page["proxy_llm_reserve_connections"]),
                         ("0", "1"))
        for _ in range(2):  # on the reserve, another path: refused
            self.assertEqual(ask(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")[0],
                             503)
        reserve = proxy.server.health_reserve
        wait_until(lambda: proxy.server.reserved == 0, what="the reserve let go")
        on_reserve = [socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) for _ in range(reserve)]
        self.addCleanup(lambda: [sock.close() for sock in on_reserve])
        wait_until(lambda: proxy.server.reserved == reserve, what="the reserve full")
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)  # refused at once
        self.addCleanup(sock.close)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        self.assertEqual(resp.status, 503)
        on_reserve.pop().close()
        wait_until(lambda: proxy.server.reserved == reserve - 1, what="a reserve connection let go")
        page = scrape()
        self.assertEqual((page["proxy_llm_connections_refused_total"], page["proxy_llm_reserve_connections"]),
                         ("3", str(reserve)))
        self.assertEqual(self.upstream.requests.qsize(), 0)


class FaultyOps(storage.FileOps):
    """``os`` calls that fail with ``error`` (an errno) while it is set."""

    def __init__(self) -> None:
        self.error = 0

    def _check(self) -> None:
        if self.error:
            raise OSError(self.error, os.strerror(self.error))

    def open(self, path, flags, mode=0o777):
        self._check()
        return os.open(path, flags, mode)

    def write(self, fd, data):
        self._check()
        return os.write(fd, data)

    def writev(self, fd, buffers):
        self._check()
        return os.writev(fd, buffers)

    def makedirs(self, path, mode=0o777, exist_ok=False):
        self._check()
        os.makedirs(path, mode, exist_ok)


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    d = tempfile.mkdtemp(prefix="proxy_llm_mnt_")
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).returncode == 0
        if ok:
            subprocess.run(["umount", d], check=True)
        return ok
    finally:
        os.rmdir(d)


CAN_MOUNT = can_mount()


class DataDirTestCase(FaultTestCase):
    def metric(self, name: str) -> float:
        text = request(self.proxy.url, method="GET", path="/metrics", headers={})[2].decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError("no metric " + name)

    def health(self):
        status, _, body = request(self.proxy.url, method="GET", path="/health", headers={})
        return status, json.loads(body)

    def big_replies(self, n: int) -> None:
        # Records bigger than a page, so a full tmpfs cannot take them in a file's slack.
        body = b'{"id":"x","choices":[{"index":0,"message":{"content":"' + b"z" * 9000 + b'"}}]}'
        self.replies.extend(Reply(200, [("Content-Type", "application/json")], body) for _ in range(n))


class DataDirFaultTest(DataDirTestCase):
    """Faults injected at the recorder's file-system boundary (runs everywhere)."""

    def test_fail_open_keeps_proxying_counts_drops_and_resumes(self):
        proxy = self.start_proxy()
        ops = FaultyOps()
        proxy.server.recorder.ops = ops
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        proxy.flush()
        ops.error = errno.ENOSPC
        for _ in range(3):
            self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        proxy.flush()
        self.assertEqual(self.metric("proxy_llm_records_dropped_total"), 3)
        status, health = self.health()
        self.assertEqual((status, health["status"]), (200, "degraded"))
        self.assertIn("ENOSPC", health["last_record_error"])
        ops.error = 0
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        self.assertEqual(len(proxy.records()), 2)
        self.assertEqual(self.health()[1]["status"], "ok")
        self.assertEqual(self.metric("proxy_llm_records_written_total"), 2)

    def test_stream_lines_the_disk_refuses_are_counted(self):
        # They were counted in the exit log only: /health and /metrics showed no loss.
        class StreamsFail(FaultyOps):
            def open(self, path, flags, mode=0o777):
                self.error = errno.ENOSPC if os.sep + "streams" in path else 0
                return super().open(path, flags, mode)

        proxy = self.start_proxy()
        proxy.server.recorder.ops = StreamsFail()
        self.replies.append(sse_reply([chunk_event("hi"), chunk_event("", "stop"), b"data: [DONE]\n\n"]))
        self.assertEqual(request(proxy.url, body=b'{"model":"gpt-4o","stream":true,"messages":[]}')[0], 200)
        proxy.flush()
        self.assertEqual(self.metric("proxy_llm_stream_lines_dropped_total"), 1)
        self.assertEqual(self.metric("proxy_llm_records_dropped_total"), 0)
        self.assertEqual(self.health()[1]["stream_lines_dropped"], 1)
        [rec] = proxy.records()
        self.assertEqual(rec["stream_events"], 3)

    def test_fail_closed_answers_503_until_the_dir_is_writable(self):
        proxy = self.start_proxy(on_record_error="fail_closed", fsync_interval=0.05)
        ops = FaultyOps()
        proxy.server.recorder.ops = ops
        ops.error = errno.EROFS
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)  # the failure is found on this record
        proxy.flush()
        status, headers, body = request(proxy.url, path="/v1/messages", body={"model": "claude-x"})
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["error"]["type"], "overloaded_error")
        self.assertEqual(header(headers, "Retry-After"), "1")
        self.assertEqual(self.health()[0], 503)
        ops.error = 0
        wait_until(lambda: not proxy.server.recorder.degraded, what="the idle probe to see the dir writable")
        status, _, body = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.upstream.requests.qsize(), 2)


@unittest.skipUnless(CAN_MOUNT, "needs root and tmpfs mounts")
class RealFullDiskTest(DataDirTestCase):
    """A real 1 MiB tmpfs: filled up, then remounted read-only."""

    def setUp(self):
        super().setUp()
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", self.mnt], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mnt])

    def fill(self) -> str:
        path = os.path.join(self.mnt, "filler")
        with open(path, "wb", buffering=0) as f:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError as exc:
                    self.assertEqual(exc.errno, errno.ENOSPC)
        return path

    def test_a_data_dir_that_cannot_be_written_stops_start_up(self):
        # It was taken: the key already stored (or not storable, a warning), the proxy served
        # with every record lost, fail_closed too (an audit's finding). The README says exit 2.
        data_dir = os.path.join(self.mnt, "data")
        os.mkdir(data_dir, 0o700)
        subprocess.run(["mount", "-o", "remount,ro", self.mnt], check=True)
        self.addCleanup(subprocess.run, ["mount", "-o", "remount,rw", self.mnt])
        for workers in ("1", "2"):
            with self.subTest(workers=workers):
                out = subprocess.run([sys.executable, "-m", "proxy_llm", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
                                      "--workers", workers], cwd=support.ROOT, capture_output=True, timeout=DEADLINE,
                                     env=dict(os.environ, PYTHONPATH=support.ROOT))
                self.assertEqual((out.returncode, out.stderr.decode()),
                                 (2, "proxy_llm: --data-dir: cannot use %s: Read-only file system\n" % data_dir))
        self.assertEqual(os.listdir(data_dir), [])

    def test_full_disk_fail_open_then_space_returns(self):
        proxy = self.start_proxy(data_dir=os.path.join(self.mnt, "data"))
        self.big_replies(6)
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        proxy.flush()
        filler = self.fill()
        for _ in range(3):
            status, _, body = request(proxy.url, body=PLAIN_BODY)
            self.assertEqual((status, len(body)), (200, len(self.replies[0].body)))
        proxy.flush()
        self.assertEqual(self.metric("proxy_llm_records_dropped_total"), 3)
        self.assertEqual(self.health()[1]["status"], "degraded")
        self.assertIn("ENOSPC", self.health()[1]["last_record_error"])
        os.unlink(filler)
        self.assertEqual(request(proxy.url, body=PLAIN_BODY)[0], 200)
        self.assertEqual(len(proxy.records()), 2)
        self.assertEqual(self.health()[1]["status"], "ok")

    def test_read_only_data_dir_fail_open_then_writable_again(self):
        data_dir = os.path.join(self.mnt, "data")
        os.mkdir(data_dir, 0o700)
        proxy = self.start_proxy(data_dir=data_dir, fsync_interval=0.05)
        # (Linux refuses to remount read-only while files are open for writing: none is yet.)
        subprocess.run(["mount", "-o", "remount,ro", self.mnt], check=True)
        for sid in ("a", "b", "a"):
            headers = {"X-Session-Id": sid, "Content-Type": "application/json"}
            status, _, body = request(proxy.url, body=PLAIN_BODY, headers=headers)
            self.assertEqual(status, 200, body)  # (the answer says why, should it fail: it once did, unexplained)
        proxy.flush()
        self.assertEqual(self.metric("proxy_llm_records_dropped_total"), 3)
        self.assertEqual(self.health()[1]["status"], "degraded")
        self.assertIn("EROFS", self.health()[1]["last_record_error"])
        subprocess.run(["mount", "-o", "remount,rw", self.mnt], check=True)
        wait_until(lambda: not proxy.server.recorder.degraded, what="the idle probe to see the dir writable")
        status, _, body = request(proxy.url, body=PLAIN_BODY)
        self.assertEqual(status, 200, body)
        self.assertEqual(len(proxy.records()), 1)
        self.assertEqual(self.health()[1]["status"], "ok")


if __name__ == "__main__":
    unittest.main()
