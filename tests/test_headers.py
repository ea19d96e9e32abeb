"""The fast header parser gives exactly the standard library's result, for any header block."""

from __future__ import annotations

import email.parser
import http.client
import io
import random
import unittest

from http.server import BaseHTTPRequestHandler

from proxy_llm import headers
from proxy_llm.handler import ProxyHandler


def stdlib(raw: bytes, _class=http.client.HTTPMessage):
    lines = http.client._read_headers(io.BytesIO(raw))
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))


def rest_after_stdlib(raw: bytes) -> bytes:
    fp = io.BytesIO(raw)
    http.client._read_headers(fp)
    return fp.read()


def readers(raw: bytes):
    """The block as a plain stream (read by lines) and as buffered readers of several sizes
    (the whole-block path when the block is in the buffer, the line path when it is not)."""
    yield "BytesIO", io.BytesIO(raw)
    for size in (1, 7, 64, 8192):
        yield "BufferedReader(%d)" % size, io.BufferedReader(io.BytesIO(raw), size)


def state(msg):
    return type(msg), list(msg._headers), msg.get_payload(), [type(d) for d in msg.defects], msg.items()


CASES = [
    b"Host: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"A: 1\r\nA: 2\r\nB:\r\nC:   spaced  \r\nD:\ttab\r\n\r\n",
    b"X-Latin: caf\xe9\r\nX-Utf8: \xe6\x97\xa5\xe6\x9c\xac\r\n\r\n",
    b"Folded: one\r\n two\r\n\r\n",                       # obs-fold
    b"No colon here\r\nA: 1\r\n\r\n",
    b"Space Before : x\r\n\r\n",
    b"From someone\r\nA: 1\r\n\r\n",
    b"X-Nel: a\x85b\r\n\r\n",                             # NEL splits lines for str.splitlines
    b"X-Vt: a\x0bb\r\nX-Ff: \x0c\r\n\r\n",
    b"X-Cr: a\rb\r\n\r\n",
    b"X-Lf-Only: a\nB: 2\n\n",
    b"A: 1\r\nB: 2\r\n",                                  # no blank line: the stream ended
    b"\r\n",
    b"",
    b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\n\r\n",
    b":empty-name\r\n\r\n",
    b"A: 1\r\n\r\nbody after",
]


class ParseHeadersTest(unittest.TestCase):
    def test_known_cases_match_the_standard_library(self):
        for raw in CASES + [b"A: 1\r\n" * 99 + b"\r\nbody", b"A: " + b"x" * 65500 + b"\r\n\r\n"]:
            for kind, fp in readers(raw):
                with self.subTest(raw=raw[:80], reader=kind):
                    self.assertEqual(state(headers.parse_headers(fp)), state(stdlib(raw)))
                    self.assertEqual(fp.read(), rest_after_stdlib(raw), "what is left to read differs")

    def test_random_blocks_match_the_standard_library(self):
        rnd = random.Random(11)
        alphabet = b"aZ09-_:; \t\r\n\x0b\x0c\x1c\x85\xe9\x00!~\"(,"
        for _ in range(3000):
            lines = []
            for _ in range(rnd.randint(0, 6)):
                if rnd.random() < 0.7:
                    name = bytes(rnd.choice(b"abcXYZ-_09") for _ in range(rnd.randint(1, 8)))
                    value = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
                    lines.append(name + b":" + value + rnd.choice([b"\r\n", b"\n"]))
                else:
                    lines.append(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) + b"\r\n")
            raw = b"".join(lines) + rnd.choice([b"\r\n", b"\n", b""]) + rnd.choice([b"", b"{}", b"body\r\n\r\nA: 1\r\n\r\n"])
            for kind, fp in readers(raw):
                with self.subTest(raw=raw, reader=kind):
                    try:
                        expected = state(stdlib(raw))
                    except http.client.HTTPException as exc:
                        with self.assertRaises(type(exc)):
                            headers.parse_headers(fp)
                        continue
                    self.assertEqual(state(headers.parse_headers(fp)), expected)
                    self.assertEqual(fp.read(), rest_after_stdlib(raw), "what is left to read differs")

    def test_limits_are_the_standard_librarys(self):
        for kind, fp in readers(b"A: " + b"x" * 70000 + b"\r\n\r\n"):
            with self.subTest(reader=kind), self.assertRaises(http.client.LineTooLong):
                headers.parse_headers(fp)
        for n in (100, 101):  # 99 fields and the blank line are the most the standard library takes
            for kind, fp in readers(b"A: 1\r\n" * n + b"\r\n"):
                with self.subTest(fields=n, reader=kind), self.assertRaises(http.client.HTTPException):
                    headers.parse_headers(fp)

    def test_read_lines_is_the_standard_librarys_read_headers(self):
        # headers._read_lines stands in for http.client._read_headers on a standard library
        # without it (3.8 before its security releases): the same lines, the same rest left to
        # read, the same errors past the limits.
        blocks = CASES + [b"A: 1\r\n" * 99 + b"\r\nbody", b"A: 1\r\n" * 100 + b"\r\n", b"A: 1\r\n" * 101,
                          b"A: " + b"x" * (http.client._MAXLINE - 5) + b"\r\n\r\n",
                          b"A: " + b"x" * (http.client._MAXLINE - 4) + b"\r\n\r\n", b"A: 1\r\nB: 2"]
        rnd = random.Random(5)
        for _ in range(300):
            blocks.append(b"".join(rnd.choice([b"A: 1\r\n", b"B:\n", b"\r\n", b"\n", b"x\r", b"C: \x85\r\n"])
                                   for _ in range(rnd.randint(0, 8))))
        for raw in blocks:
            for (kind, fp), (_, mine) in zip(readers(raw), readers(raw)):
                with self.subTest(raw=raw[:80], reader=kind):
                    try:
                        expected = http.client._read_headers(fp)
                    except http.client.HTTPException as exc:
                        with self.assertRaises(type(exc)) as caught:
                            headers._read_lines(mine)
                        self.assertEqual(str(caught.exception), str(exc))
                        continue
                    self.assertEqual(headers._read_lines(mine), expected)
                    self.assertEqual(mine.read(), fp.read(), "what is left to read differs")

    def test_install_and_uninstall(self):
        original = http.client.parse_headers
        self.addCleanup(setattr, http.client, "parse_headers", original)
        self.assertTrue(headers.install())
        self.assertIs(http.client.parse_headers, headers.parse_headers)
        headers.uninstall()
        self.assertIs(http.client.parse_headers, headers._ORIGINAL)


def parsed(raw: bytes, parse, lenient: bool = False) -> tuple:
    """Run ``parse`` (a parse_request) on a handler holding the request ``raw``, socket-less
    (``lenient``: its header block read by the standard library's own message class, as a
    plain ``BaseHTTPRequestHandler`` reads it)."""
    h = ProxyHandler.__new__(ProxyHandler)
    if lenient:
        h.MessageClass = http.client.HTTPMessage
    h.rfile = io.BufferedReader(io.BytesIO(raw), 8192)
    h.wfile = io.BytesIO()
    h.client_address = ("127.0.0.1", 0)
    h.raw_requestline = h.rfile.readline(65537)
    ok = parse(h)
    left = h.rfile.read()  # before anything asks for h.headers, which the fast path builds late
    msg = getattr(h, "headers", None)
    fields = h.header_fields() if msg is not None else None
    if fields is not None:
        assert fields == msg.items(), (fields, msg.items())
    return (ok, h.command, getattr(h, "path", None), h.request_version, h.close_connection,
            getattr(h, "requestline", None), state(msg) if msg is not None else None,
            h.wfile.getvalue(), left)


REQUESTS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /v1/models HTTP/1.0\r\n\r\n",
    b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nConnection: Close\r\n\r\n",
    b"POST /v1/messages?beta=true HTTP/1.1\r\nExpect: 100-continue\r\n\r\n{}",
    b"POST /v1/messages HTTP/1.0\r\nExpect: 100-continue\r\n\r\n",
    b"POST //evil.example/v1/x HTTP/1.1\r\n\r\n",
    b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\nHost: x\n\n",
    b"post /v1/chat/completions HTTP/1.1\r\n\r\n",
    b"POST  /v1/chat/completions HTTP/1.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/2.0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.10\r\n\r\n",
    b"POST /v1/chat/completions http/1.1\r\n\r\n",
    b"POST /v1/caf\xe9 HTTP/1.1\r\n\r\n",
    b"GET /\r\n",
    b"POST /a HTTP/1.1\r\n" + b"A: 1\r\n" * 100 + b"\r\n",
    b"POST /a HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\nExpect: nothing\r\nExpect: 100-continue\r\n\r\n",
    b"GET /a HTTP/1.0\r\nCONNECTION: Keep-Alive\r\n\r\n",
    b"POST /a HTTP/1.1\r\nA: " + b"x" * 70000 + b"\r\n\r\n",
]


class ParseRequestTest(unittest.TestCase):
    def setUp(self) -> None:
        # As build_server does: a request line left to the standard library has its header
        # block read by headers.parse_headers (strictly, for the handler's StrictMessage).
        original = http.client.parse_headers
        self.addCleanup(setattr, http.client, "parse_headers", original)
        self.assertTrue(headers.install())

    def test_a_line_left_to_the_standard_library_is_refused_without_the_strict_reader(self):
        headers.uninstall()
        ok, *_, answer, left = parsed(b"POST  /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
                                      ProxyHandler.parse_request)
        self.assertFalse(ok)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])

    """ProxyHandler.parse_request (a fast path for plain request lines) gives the standard
    library's results: command, path, version, keep-alive, headers, answers, bytes left."""

    def test_known_requests(self):
        for raw in REQUESTS:
            with self.subTest(raw=raw[:80]):
                self.assertEqual(parsed(raw, ProxyHandler.parse_request),
                                 parsed(raw, BaseHTTPRequestHandler.parse_request))

    def test_lines_that_are_not_field_lines_are_refused(self):
        # The standard library stops at such a line and drops every field after it, framing
        # included: the body below would be read as a second request (smuggled). RFC 9112 5:
        # no whitespace before the colon, no obs-fold in a request.
        body = b"GET /v1/models?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        for bad in (b"X Foo: a", b"Junk", b"X-\xffa: 1", b"Transfer-Encoding : chunked", b"Content-Length : 5",
                    b"Folded: a\r\n b", b"A: x\x00y", b"A: x\ry"):
            raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + bad +
                   b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            with self.subTest(line=bad):
                self.assertEqual(parsed(raw, BaseHTTPRequestHandler.parse_request, lenient=True)[0], True)  # what it did
                ok, *_, answer, left = parsed(raw, ProxyHandler.parse_request)
                self.assertFalse(ok)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])
                self.assertIn(b"Connection: close", answer)
                # The same behind a request line left to the standard library (two blanks, a
                # tab, HTTP/1.10): its block was read leniently, and the body smuggled.
                for line in (b"POST  /v1/chat/completions HTTP/1.1", b"POST\t/v1/chat/completions HTTP/1.1",
                             b"POST /v1/chat/completions HTTP/1.10"):
                    other = raw.replace(b"POST /v1/chat/completions HTTP/1.1", line, 1)
                    ok, *_, answer, left = parsed(other, ProxyHandler.parse_request)
                    self.assertFalse(ok, line)
                    self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:60])
                    self.assertIn(b"Bad header line", answer)

    def test_a_value_keeps_the_bytes_the_email_parser_splits_lines_at(self):
        # NEL is byte 0x85, the second byte of UTF-8 "\u00c5"; VT and FF are values' bytes too.
        value = "Ren\u00c5 \x0b\x0c".encode("utf-8")
        raw = b"POST /a HTTP/1.1\r\nX-Title: " + value + b"\r\nContent-Length: 2\r\n\r\n{}"
        ok, _, _, _, _, _, state, _, left = parsed(raw, ProxyHandler.parse_request)
        self.assertTrue(ok)
        self.assertEqual(state[1], [("X-Title", value.decode("iso-8859-1")), ("Content-Length", "2")])
        self.assertEqual(left, b"{}")

    def test_random_request_lines(self):
        rnd = random.Random(3)
        parts = [b"GET", b"POST", b"DELETE", b"get", b"", b" ", b"/v1/x", b"//h/x", b"/a?b=c", b"*",
                 b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/1", b"\t", b"\xe9", b"http://h/p"]
        for _ in range(1500):
            line = b"".join(rnd.choice(parts) + rnd.choice([b" ", b"", b"  "]) for _ in range(rnd.randint(1, 4)))
            raw = line + rnd.choice([b"\r\n", b"\n"]) + rnd.choice([b"", b"Connection: close\r\n", b"Expect: 100-continue\r\n"]) + b"\r\nrest"
            if not line:
                continue  # an empty line first: a deliberate difference (the test below)
            with self.subTest(raw=raw):
                self.assertEqual(parsed(raw, ProxyHandler.parse_request),
                                 parsed(raw, BaseHTTPRequestHandler.parse_request))

    def test_an_empty_line_before_the_request_line_is_skipped(self):
        # RFC 9112 2.2; the standard library returns False (and the connection closes).
        for blank in (b"\r\n", b"\n"):
            for raw in REQUESTS[:3]:
                with self.subTest(blank=blank, raw=raw[:40]):
                    self.assertFalse(parsed(blank + raw, BaseHTTPRequestHandler.parse_request)[0])
                    got = parsed(blank + raw, ProxyHandler.parse_request)
                    want = parsed(raw, BaseHTTPRequestHandler.parse_request)
                    self.assertTrue(got[0])
                    self.assertEqual(got[1:], want[1:])
            ok, *_, answer, left = parsed(blank, ProxyHandler.parse_request)  # then the end
            self.assertEqual((ok, answer, left), (False, b"", b""))
        # Several (two stray CRLFs dropped the request, unanswered: an audit's finding), up to
        # EMPTY_LINES_MAX; past them, a 400, not a silent close.
        got = parsed(b"\r\n\n" * 8 + REQUESTS[0], ProxyHandler.parse_request)
        self.assertTrue(got[0])
        self.assertEqual(got[1:], parsed(REQUESTS[0], BaseHTTPRequestHandler.parse_request)[1:])
        ok, *_, answer, left = parsed(b"\r\n" * 17 + REQUESTS[0], ProxyHandler.parse_request)
        self.assertFalse(ok)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])


if __name__ == "__main__":
    unittest.main()
