"""The upstream connection: the same request bytes as http.client's own calls, in fewer sends."""

from __future__ import annotations

import gzip
import http.client
import io
import random
import socket
import threading
import unittest
import zlib
from unittest import mock

from proxy_llm import headers, upstream


class _CountingSocket:
    """A connected socket that counts ``sendall`` calls (http.client sends with sendall)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sends = []

    def sendall(self, data) -> None:
        self.sends.append(bytes(data))
        self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Sink:
    """A listening socket on port 0 that reads each accepted connection to its end."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]

    def receive(self, send) -> bytes:
        """Run ``send(port)`` (which connects once and closes) and return every byte received."""
        got = []

        def accept():
            conn, _ = self.listener.accept()
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got.append(data)

        t = threading.Thread(target=accept)
        t.start()
        send(self.port)
        t.join(10)
        return b"".join(got)

    def close(self) -> None:
        self.listener.close()


def _stdlib_request(port, headers, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders(body or None)
    conn.close()


def _our_request(port, headers, body, counted):
    conn = upstream.Connection("127.0.0.1", port, timeout=10)
    conn.connect()
    conn.sock = _CountingSocket(conn.sock)
    counted.append(conn.sock)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True, skip_accept_encoding=True)
    conn.put_headers(headers)
    conn.send_request_body(body)
    conn.close()


class AuthorityTest(unittest.TestCase):
    def test_an_ipv6_host_is_bracketed_wherever_a_host_is_named(self):
        # Written out five times before (the pool's Host header, CONNECT, the egress proxy's
        # name, the proxy's own origin, its listen address): now all of them call this.
        cases = [
            (("api.example.test", None), "api.example.test"),
            (("api.example.test", 8443), "api.example.test:8443"),
            (("127.0.0.1", 80), "127.0.0.1:80"),
            (("::1", None), "[::1]"),
            (("::1", 8080), "[::1]:8080"),
            (("fe80::1%eth0", 3128), "[fe80::1%eth0]:3128"),
        ]
        for args, want in cases:
            with self.subTest(args=args):
                self.assertEqual(upstream.authority(*args), want)
        self.assertEqual(upstream.UpstreamPool("http://[::1]:8080/v1").host_header, "[::1]:8080")
        self.assertEqual(upstream.UpstreamPool("https://[::1]/v1").host_header, "[::1]")
        self.assertEqual(upstream.UpstreamPool("https://[::1]:443/v1").host_header, "[::1]")
        self.assertEqual(upstream.EgressProxy("http://u:p@[::1]:3128").name, "[::1]:3128")


class ConnectionTest(unittest.TestCase):
    HEADERS = [("Host", "api.example"), ("Content-Type", "application/json"), ("X-Latin", "caf\xe9"),
               ("Folded", "one\r\n two"), ("A", ""), ("A", "again"), ("Content-Length", "0")]

    def setUp(self):
        self.sink = _Sink()
        self.addCleanup(self.sink.close)

    def test_same_bytes_as_putheader_and_endheaders_in_one_send(self):
        for size in (0, 1, 2000, upstream.COALESCE_MAX, upstream.COALESCE_MAX + 1):
            body = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
            body = body[:size]
            headers = self.HEADERS[:-1] + [("Content-Length", str(size))]
            with self.subTest(size=size):
                expected = self.sink.receive(lambda port: _stdlib_request(port, headers, body))
                counted = []
                got = self.sink.receive(lambda port: _our_request(port, headers, body, counted))
                self.assertEqual(got, expected)
                self.assertTrue(got.endswith(b"\r\n\r\n" + body))
                sends = counted[0].sends
                self.assertEqual(len(sends), 2 if size > upstream.COALESCE_MAX else 1, [len(s) for s in sends])

    def test_put_headers_refuses_what_putheader_refuses(self):
        bad = [("X-Injected", "a\r\nEvil: 1"), ("X-Cr", "a\rb"), ("X-Lf", "a\nb"), ("Bad:Name", "v"),
               ("Bad Name\r\n", "v"), ("", "v"), ("X-Wide", "\u65e5"), ("N\xe9", "v")]
        for name, value in bad:
            with self.subTest(name=name, value=value):
                stdlib = http.client.HTTPConnection("127.0.0.1", self.sink.port)
                stdlib.putrequest("GET", "/")
                with self.assertRaises(Exception) as theirs:
                    stdlib.putheader(name, value)
                ours = upstream.Connection("127.0.0.1", self.sink.port)
                ours.putrequest("GET", "/")
                with self.assertRaises(type(theirs.exception)):
                    ours.put_headers([("Ok", "1"), (name, value)])

    def test_random_headers_match_putheader(self):
        rnd = random.Random(5)
        alphabet = "aZ09-_:; \t\r\n\x0b\xe9!~\"(,"
        for _ in range(2000):
            headers = [("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6))),
                        "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10))))
                       for _ in range(rnd.randint(1, 4))]
            with self.subTest(headers=headers):
                stdlib = http.client.HTTPConnection("127.0.0.1", self.sink.port)
                stdlib.putrequest("GET", "/")
                ours = upstream.Connection("127.0.0.1", self.sink.port)
                ours.putrequest("GET", "/")
                try:
                    for name, value in headers:
                        stdlib.putheader(name, value)
                except Exception as exc:
                    with self.assertRaises(type(exc)):
                        ours.put_headers(headers)
                    continue
                ours.put_headers(headers)
                self.assertEqual(b"\r\n".join(ours._buffer), b"\r\n".join(stdlib._buffer))


class _Trickle(io.RawIOBase):
    """Bytes handed out at most ``step`` at a time, as a socket may."""

    def __init__(self, data: bytes, step: int):
        super().__init__()
        self.data = memoryview(data)
        self.step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.step, len(self.data))
        buf[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


class _FakeSock:
    def __init__(self, data: bytes, step: int):
        self.data = data
        self.step = step

    def makefile(self, mode):
        return io.BufferedReader(_Trickle(self.data, self.step), 8192)


def _begin(cls, raw: bytes, method: str, step: int):
    """The attributes ``begin`` sets, the headers, and what it left unread (or its error)."""
    resp = cls(_FakeSock(raw, step), method=method)
    try:
        resp.begin()
    except Exception as exc:
        return ("error", type(exc), str(exc))
    return (resp.status, resp.code, resp.reason, resp.version, resp.chunked, resp.chunk_left, resp.length,
            resp.will_close, resp.headers.items(), resp.headers.get_payload(), type(resp.headers), resp.fp.read())


class ResponseBeginTest(unittest.TestCase):
    """upstream.Response.begin against http.client.HTTPResponse.begin on the same bytes."""

    def setUp(self):
        # The standard library's own header parser, whether or not a server in this process
        # installed the faster one.
        patcher = mock.patch.object(http.client, "parse_headers", headers._ORIGINAL)
        patcher.start()
        self.addCleanup(patcher.stop)

    HEADS = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 5\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: upgrade\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nKeep-Alive: \r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nbody",
        b"HTTP/1.1 200 OK\r\ncontent-length:  4 \r\n\r\nbody",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nno headers, close-delimited",
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 429  Too   Many Requests \r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 \x85caf\xe9\xa0\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\n{}",
        b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1\t200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"<html>Bad Gateway</html>",
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: v\r\n" * 150 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 70000 + b"\r\n\r\n",
    ]

    def assertSame(self, raw: bytes, method: str = "POST") -> None:
        for step in (1 << 20, 7, 1):
            with self.subTest(raw=raw[:80], method=method, step=step):
                self.assertEqual(_begin(upstream.Response, raw, method, step),
                                 _begin(http.client.HTTPResponse, raw, method, step))

    def test_known_heads_match_the_standard_library(self):
        for raw in self.HEADS:
            for method in ("POST", "HEAD"):
                self.assertSame(raw, method)

    def test_random_heads_match_the_standard_library(self):
        rnd = random.Random(7)
        statuses = ["200 OK", "204 No Content", "304", "404 Not Found", "100 Continue", "503  Busy "]
        names = ["Content-Length", "content-length", "Transfer-Encoding", "Connection", "Keep-Alive",
                 "Proxy-Connection", "Content-Type", "X-Other"]
        values = ["chunked", "close", "keep-alive", "0", "12", "-1", "x", "", " 3", "Close, Upgrade", "caf\xe9"]
        lengths = ["0", "12", "", " 3", "4 "]  # (any other is refused: test_framing_the_standard_begin_misreads)
        # (Any other is a coding for the proxy to take off, the body then read to the close:
        # test_transfer_codings_other_than_chunked.)
        codings = ["chunked", "Chunked", "identity", ""]
        for _ in range(600):
            lines = ["HTTP/1.%d %s" % (rnd.randint(0, 1), rnd.choice(statuses))]
            for _ in range(rnd.randint(0, 5)):
                name = rnd.choice(names)
                if name.lower() in ("transfer-encoding", "content-length") and any(
                        line.lower().startswith(name.lower()) for line in lines):
                    continue  # (lines of either are one list here, the first alone there: test_faults,
                    # test_framing_the_standard_begin_misreads)
                choices = {"content-length": lengths, "transfer-encoding": codings}.get(name.lower(), values)
                lines.append("%s: %s" % (name, rnd.choice(choices)))
            raw = ("\r\n".join(lines) + "\r\n\r\n" + "x" * rnd.randint(0, 20)).encode("latin-1")
            self.assertSame(raw, rnd.choice(("POST", "GET", "HEAD")))

    def test_framing_the_standard_begin_misreads(self):
        # Heads whose framing the standard begin reads as "to the close" (so a keep-alive
        # upstream's answer stalled until stream_idle_timeout), or whose fields it loses.
        chunked = (200, 200, "OK", 11, True, None)
        cases = [
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked \r\n\r\n2\r\n{}\r\n0\r\n\r\n", chunked, b"2\r\n{}"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", chunked, b"2\r\n{}"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n{}", (200, 200, "OK", 11, False, http.client._UNKNOWN, 2),
             b"{}"),
            (b"HTTP/1.1 200 OK\r\nX-Request-Id : r1\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n\r\n{}",
             (200, 200, "OK", 11, False, http.client._UNKNOWN, 2), b"{}"),
            (b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\n{}",
             (200, 200, "OK", 11, False, http.client._UNKNOWN, 2), b"{}"),
        ]
        for raw, attrs, rest in cases:
            for step in (1 << 20, 7, 1):
                with self.subTest(raw=raw[:60], step=step):
                    got = _begin(upstream.Response, raw, "POST", step)
                    self.assertEqual(got[:len(attrs)], attrs)
                    self.assertTrue(got[-1].startswith(rest), got[-1])
        got = _begin(upstream.Response, cases[3][0], "POST", 1 << 20)
        self.assertEqual(got[8], [("X-Request-Id", "r1"), ("Set-Cookie", "a=1"), ("Content-Length", "2")])
        self.assertEqual(_begin(upstream.Response, cases[4][0], "POST", 1 << 20)[8], [("Content-Length", "2")])
        # A bare CR in a value is a space (RFC 9112 2.2): the email parser ended the block there,
        # Content-Length and all (the client waited for a close), or made a field of the rest.
        for step in (1 << 20, 7, 1):
            with self.subTest(bare_cr=step):
                got = _begin(upstream.Response, b"HTTP/1.1 200 OK\r\nX-Val: a\rb\r\nX-B: c\rX-Injected: 1\r\n"
                             b"X-Ratelimit-Remaining: 42\r\nContent-Length: 2\r\n\r\n{}", "POST", step)
                self.assertEqual((got[6], got[8]), (2, [("X-Val", "a b"), ("X-B", "c X-Injected: 1"),
                                                        ("X-Ratelimit-Remaining", "42"), ("Content-Length", "2")]))
                self.assertTrue(got[-1].startswith(b"{}"), got[-1])
        # Lines of one value each are one list (RFC 9112 6.3): the same value again is that value.
        got = _begin(upstream.Response, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}",
                     "POST", 1 << 20)
        self.assertEqual(got[6], 2)
        for bad in (b"-4", b"4x", b"2, 3", b"\xb2", b"", b",", b"+2", b"0_2", b"2\r\nContent-Length: 5"):
            raw = b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\nbody" % bad
            with self.subTest(length=bad):
                got = _begin(upstream.Response, raw, "POST", 1 << 20)
                if bad:
                    self.assertEqual(got, ("error", http.client.HTTPException, "invalid Content-Length"))
                else:  # no value at all: no length, as the standard begin has it
                    self.assertEqual(got, _begin(http.client.HTTPResponse, raw, "POST", 1 << 20))
        # Without a body to frame, the length does not matter.
        for raw, method in ((b"HTTP/1.1 204 No Content\r\nContent-Length: x\r\n\r\n", "POST"),
                            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "HEAD")):
            self.assertEqual(_begin(upstream.Response, raw, method, 1 << 20)[6], 0)

    def test_transfer_codings_other_than_chunked(self):
        # Taken off by the proxy (handler: relay), and without chunked last the body is read to
        # the close (RFC 9112 6.3), Content-Length or not: the standard begin read
        # "Transfer-Encoding: gzip" by its Content-Length, and "gzip, chunked" to the close.
        cases = [
            (b"Transfer-Encoding: gzip, chunked", "POST", ("gzip",), True, None),
            (b"Transfer-Encoding: X-Gzip , Identity,deflate,  chunked", "POST", ("x-gzip", "deflate"), True, None),
            (b"Transfer-Encoding: gzip\r\nContent-Length: 5", "POST", ("gzip",), False, None),
            (b"Transfer-Encoding: br", "POST", ("br",), False, None),  # (the handler refuses it)
            (b"Transfer-Encoding: chunked, gzip", "POST", ("chunked", "gzip"), False, None),
            (b"Transfer-Encoding: identity\r\nContent-Length: 5", "POST", (), False, 5),
            (b"Transfer-Encoding: chunked", "POST", (), True, None),
            (b"Content-Length: 5", "POST", (), False, 5),
            (b"Transfer-Encoding: gzip, chunked", "HEAD", (), True, 0),  # no body: nothing to decode
            (b"Transfer-Encoding: gzip\r\nContent-Length: 5", "HEAD", (), False, 0),
        ]
        for fields, method, codings, chunked, length in cases:
            raw = b"HTTP/1.1 200 OK\r\n%s\r\n\r\nbody!" % fields
            for step in (1 << 20, 7, 1):
                with self.subTest(fields=fields, method=method, step=step):
                    resp = upstream.Response(_FakeSock(raw, step), method=method)
                    resp.begin()
                    self.assertEqual((resp.codings, resp.chunked, resp.length), (codings, chunked, length))
                    self.assertEqual(resp.will_close, length is None and not chunked)
        resp = upstream.Response(_FakeSock(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n", 7), method="GET")
        resp.begin()
        self.assertEqual((resp.codings, resp.length), ((), 0))

    def test_a_status_line_apart_by_what_is_not_http_white_space_is_refused(self):
        # RFC 9112 4: words apart by SP (a recipient may take HTAB, VT, FF and bare CR too), a
        # status of three digits. The standard parser splits on str.split()'s white space (\x1c
        # to \x1f, \x85, \xa0) and reads the status with int(): each of these was a plain 200.
        refused = [b"HTTP/1.1\x1c200 OK", b"HTTP/1.1 \x1f200 OK", b"\x1cHTTP/1.1 200 OK", b"HTTP/1.1\x85200 OK",
                   b"HTTP/1.1 200\x1cOK", b"HTTP/1.1 200\xa0OK", b"HTTP/1.\x1d200 OK", b"HTTP/1.1 +200 OK",
                   b"HTTP/1.1 2_00 OK", b"HTTP/1.1 0200 OK"]
        for line in refused:
            raw = line + b"\r\nContent-Length: 0\r\n\r\n"
            for step in (1 << 20, 7, 1):
                with self.subTest(line=line, step=step):
                    self.assertEqual(_begin(upstream.Response, raw, "POST", step)[:2], ("error", http.client.BadStatusLine))
                    self.assertEqual(_begin(http.client.HTTPResponse, raw, "POST", step)[0], 200)
        # The leniency RFC 9112 allows stays, and a phrase holding such a byte is the standard one.
        kept = [(b" HTTP/1.1\t200\x0bFine", "OK"), (b"HTTP/1.1\r200\x0cFine", "OK"), (b"HTTP/1.1  200  Fine", " Fine"),
                (b"HTTP/1.1 200 O\x1cK", "OK"), (b"HTTP/1.1 200 \x85Fine\xa0", "\x85Fine\xa0")]
        for line, phrase in kept:
            with self.subTest(line=line):
                resp = upstream.Response(_FakeSock(line + b"\r\nContent-Length: 0\r\n\r\n", 7), method="POST")
                resp.begin()
                self.assertEqual((resp.status, resp.phrase), (200, phrase))

    def test_the_reason_phrase_is_kept_as_sent(self):
        # For the status line the proxy writes: reason (as the standard begin has it) is stripped.
        cases = [
            (b"HTTP/1.1 200 OK  \r\n", "OK", "OK  "),
            (b"HTTP/1.1 429  Too   Many Requests \r\n", "Too   Many Requests", " Too   Many Requests "),
            (b"HTTP/1.1 200 \tOK\t\r\n", "OK", "\tOK\t"),
            (b"HTTP/1.1 200 \x85caf\xe9\xa0\r\n", "caf\xe9", "\x85caf\xe9\xa0"),
            (b"HTTP/1.1 200\r\n", "", ""),
            (b"HTTP/1.1 200 \r\n", "", ""),
            (b"HTTP/1.1 200 Fine \n", "Fine", "Fine "),  # (the standard begin's reading, from here on)
            (b"HTTP/1.1\t200 Fine \r\n", "Fine", "Fine "),
            (b"HTTP/1.1 200\tFine \r\n", "Fine", "Fine "),
            (b"HTTP/1.2 200 Fine \r\n", "Fine", "Fine "),
            # A phrase no status line may hold: the standard one (none for a status without one).
            (b"HTTP/1.1 200 O\x00K\r\n", "O\x00K", "OK"),
            (b"HTTP/1.1 404 Not\rFound\r\n", "Not\rFound", "Not Found"),
            (b"HTTP/1.1 503 Busy\x7f\r\n", "Busy\x7f", "Service Unavailable"),
            (b"HTTP/1.1 200 \x1bX\r\n", "\x1bX", "OK"),
            (b"HTTP/1.1 599 odd\x0b\r\n", "odd", ""),
            (b"HTTP/1.1 200\x0bFine\r\n", "Fine", "OK"),
        ]
        for line, reason, phrase in cases:
            raw = line + b"Content-Length: 0\r\n\r\n"
            for step in (1 << 20, 7, 1):
                with self.subTest(line=line, step=step):
                    resp = upstream.Response(_FakeSock(raw, step), method="POST")
                    resp.begin()
                    self.assertEqual((resp.reason, resp.phrase), (reason, phrase))
                    self.assertEqual(resp.reason, _begin(http.client.HTTPResponse, raw, "POST", step)[2])
        raw = (b"HTTP/1.1 103 Early  Hints \r\nLink: </a>\r\n\r\nHTTP/1.1 102 B\x00\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        for step in (1 << 20, 7, 1):
            resp = upstream.Response(_FakeSock(raw, step), method="POST")
            resp.begin()
            self.assertEqual(resp.interim, [(103, "Early  Hints ", [("Link", "</a>")]), (102, "Processing", [])])

    def test_a_plain_head_takes_the_short_way(self):
        raw = self.HEADS[0]
        with mock.patch.object(http.client.HTTPResponse, "begin", side_effect=AssertionError("standard begin")):
            got = _begin(upstream.Response, raw, "POST", 1 << 20)
        self.assertEqual(got[:8], (200, 200, "OK", 11, False, http.client._UNKNOWN, 2, False))
        self.assertEqual(got[-1], b"{}")

    def test_connections_use_it(self):
        for cls in (upstream.Connection, upstream.SecureConnection):
            conn = cls("127.0.0.1", 1)
            conn.on_interim = seen = []
            resp = conn.response_class(_FakeSock(b"HTTP/1.1 200 OK\r\n\r\n", 1), method="GET")
            self.assertIsInstance(resp, upstream.Response)
            self.assertIs(resp.on_interim, seen)  # (the handler's, for 103s as they come)


def _pieces(data: bytes, step: int):
    """A body's ``read1``, handing out at most ``step`` bytes a call, and the sizes asked for."""
    asked = []

    def read1(n):
        asked.append(n)
        piece = data[:min(n, step)]
        del data[:len(piece)]
        return bytes(piece)

    data = bytearray(data)
    return read1, asked


def _read_all(read1, n: int = 65536):
    out = []
    while True:
        piece = read1(n)
        if not piece:
            return out
        out.append(piece)


class DecodedTest(unittest.TestCase):
    """upstream.decoded: a body's transfer codings taken off as it arrives."""

    TEXT = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(3000))

    def deflated(self, wbits: int, data: bytes = TEXT) -> bytes:
        z = zlib.compressobj(wbits=wbits)
        return z.compress(data) + z.flush()

    def test_every_coding_at_any_pace(self):
        cases = [
            (("gzip",), gzip.compress(self.TEXT)),
            (("x-gzip",), gzip.compress(self.TEXT)),
            (("deflate",), self.deflated(15)),
            (("deflate",), self.deflated(-15)),  # raw deflate, as some servers send it
            (("gzip",), gzip.compress(self.TEXT[:100]) + gzip.compress(self.TEXT[100:])),  # two members
            (("gzip", "deflate"), self.deflated(15, gzip.compress(self.TEXT))),  # gzip, then deflate
            (("deflate", "gzip"), gzip.compress(self.deflated(-15))),
            (("gzip",), zlib.compress(self.TEXT)),  # the zlib format under the gzip name, taken as record takes it
            (("gzip",), gzip.compress(b"")),
            (("gzip",), b""),  # no body at all
            (("deflate",), b""),
        ]
        for codings, body in cases:
            for step in (1, 2, 7, 1000, 1 << 20):
                with self.subTest(codings=codings, body=body[:10], step=step):
                    read1, _ = _pieces(body, step)
                    out = _read_all(upstream.decoded(read1, codings))
                    self.assertEqual(b"".join(out), self.TEXT if len(body) > 20 else b"")
                    self.assertTrue(all(out), "an empty piece before the end")

    def test_each_read_is_bounded(self):
        # 16 MiB of zeros is 16 KiB of gzip: no read gives more than asked for.
        zeros = gzip.compress(bytes(16 << 20))
        read1, asked = _pieces(zeros, 1 << 20)
        decode = upstream.decoded(read1, ("gzip",))
        total = 0
        while True:
            piece = decode(65536)
            if not piece:
                break
            self.assertLessEqual(len(piece), 65536)
            total += len(piece)
        self.assertEqual(total, 16 << 20)
        self.assertEqual(set(asked), {65536})

    def test_a_flushed_piece_comes_out_before_the_rest_is_read(self):
        z = zlib.compressobj(wbits=31)
        first = z.compress(b"data: 1\n\n") + z.flush(zlib.Z_SYNC_FLUSH)
        rest = z.compress(b"data: 2\n\n") + z.flush()
        pieces = [first, rest]
        decode = upstream.decoded(lambda n: pieces.pop(0) if pieces else b"", ("gzip",))
        self.assertEqual(decode(65536), b"data: 1\n\n")
        self.assertEqual(pieces, [rest])  # not read yet
        self.assertEqual(decode(65536), b"data: 2\n\n")
        self.assertEqual(decode(65536), b"")

    def test_what_does_not_decode_is_an_error(self):
        packed = gzip.compress(self.TEXT)
        cases = [
            (("gzip",), packed[:-4], "cut short"),
            (("gzip",), packed[:5], "cut short"),
            (("gzip",), packed[:40] + b"\xff" * 30 + packed[70:], "does not decode"),
            (("gzip",), b"not gzip at all", "does not decode"),
            (("gzip",), packed + b"trailing", "does not decode"),
            (("deflate",), self.deflated(15) + b"x", "after the end"),
            (("deflate",), self.deflated(15)[:-2], "cut short"),
            (("deflate",), b"x", "cut short"),
        ]
        for codings, body, message in cases:
            for step in (1, 7, 1 << 20):
                with self.subTest(body=body[-10:], step=step):
                    read1, _ = _pieces(body, step)
                    with self.assertRaisesRegex(upstream.TransferCodingError, message):
                        _read_all(upstream.decoded(read1, codings))
        self.assertTrue(issubclass(upstream.TransferCodingError, http.client.HTTPException))


if __name__ == "__main__":
    unittest.main()
