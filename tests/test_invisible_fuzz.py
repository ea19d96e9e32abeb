"""A seeded differential test of the first promise: the client cannot tell the proxy is there.

A raw-socket upstream answers each request with a response drawn from a seed (statuses across
1xx-5xx, a 103 before the final one, odd header casing and order, repeated and long headers,
obs-text, Content-Length, chunked with extensions and trailers, close-delimited, gzip in
transfer or content coding, SSE streams cut at random bytes, empty bodies, HEAD). The same
seeded request (methods, odd headers, random bytes, JSON with big numbers and duplicate keys,
chunked bodies, ``Expect: 100-continue``) goes once straight to the upstream and once through an
in-process proxy, both from raw sockets, and the two are compared: what the client received
(status lines, header fields in order, body bytes with the framing taken off) and what the
upstream received. A stream's upstream waits, before each piece it sends, until the client has
every byte sent before it: a proxy that held a piece back stalls the exchange and is reported.

The differences README "What the client sees: nothing" documents are taken out by
``ALLOWED`` below, each with its reason; any other is a failure naming the seed and the
exchange. ``PROXY_LLM_FUZZ_SEEDS`` runs more seeds locally: a count (``200``: seeds 0-199) or a
range (``1000-1100``).
"""

from __future__ import annotations

import gzip
import logging
import os
import queue
import random
import socket
import threading
import unittest
import zlib
from typing import List, Optional, Tuple

from tests.support import DEADLINE, InProcessProxy, base_config, provider

# The seeds run by default: a fixed list, so that every run is the same.
SEEDS = list(range(12))
EXCHANGES_PER_SEED = 10
# How long an upstream waits for the client to have a piece before it sends the next: a piece
# the proxy holds back is waited for this long, then reported.
GATE = 3.0
# A client waiting longer than this for a byte reports the exchange (a stream's upstream waits
# GATE at most per piece, and a proxy reading past a body's end holds it until the close).
CLIENT_TIMEOUT = 10.0
MAX_FAILURES = 8  # seeds stop being run past this many failed exchanges

# -- the differences README "What the client sees: nothing" documents ---------------------
# Hop-by-hop fields (RFC 9110 7.6.1): dropped both ways, as are those Connection names.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade"))
ALLOWED = {
    "response: hop-by-hop fields": "dropped (RFC 9110 7.6.1); the proxy frames the body itself",
    "response: X-Proxy-Record-Id": "the one header the proxy adds",
    "response: Content-Length of a body without a length": "beside Transfer-Encoding it is none (RFC 9112 6.3): dropped",
    "response: framing": "chunk sizes, extensions and the HTTP version are the connection's",
    "response: transfer codings": "gzip/deflate transfer codings are hop-by-hop: decoded by the proxy",
    "response: timing of a small body of known length": "up to 256 KiB, sent with the head once all in "
                                                         "(not waited on piece by piece here)",
    "response: trailer fields": "the chunked framing's, dropped with it (http.client reads and discards them)",
    "request: hop-by-hop fields": "dropped (RFC 9110 7.6.1)",
    "request: Expect": "answered by the proxy itself (100 Continue when it reads the body)",
    "request: Content-Length": "set by the proxy from the body it read (chunked requests too), last",
    "request: Accept-Encoding": "narrowed to gzip, deflate, identity, last",
    "request: trailer fields": "a chunked request goes on with a Content-Length: no trailer section",
}


def _narrowed(value: Optional[str]) -> Optional[str]:
    """Accept-Encoding as README says the upstream gets it (independently of the proxy's code)."""
    if value is None:
        return None
    kept = [p.strip() for p in value.split(",") if p.strip()
            and p.split(";")[0].strip().lower() in ("gzip", "deflate", "identity")]
    return ", ".join(kept) if kept else "identity"


# -- the wire, both sides ---------------------------------------------------------------------

class Reader:
    """A raw socket read as it comes; ``on_data`` is called after every receive."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self.fill():
                raise EOFError("connection closed mid-line: %r" % self.buf[-100:])
        i = self.buf.index(b"\n") + 1
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def some(self, n: int) -> bytes:
        """Up to n bytes, at least one (waits for them)."""
        if not self.buf and not self.fill():
            raise EOFError("connection closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def exact(self, n: int) -> bytes:
        parts = []
        while n:
            part = self.some(n)
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


def read_fields(r: Reader) -> List[Tuple[str, str]]:
    fields = []
    while True:
        line = r.line()
        if line in (b"\r\n", b"\n"):
            return fields
        name, _, value = line.rstrip(b"\r\n").decode("latin-1").partition(":")
        fields.append((name, value.strip(" \t")))


def codings_of(fields: List[Tuple[str, str]]) -> List[str]:
    return [c.strip(" \t").lower() for n, v in fields if n.lower() == "transfer-encoding"
            for c in v.split(",") if c.strip(" \t")]


def value_of(fields: List[Tuple[str, str]], name: str) -> Optional[str]:
    for n, v in fields:
        if n.lower() == name:
            return v
    return None


def read_chunked(r: Reader, sink) -> List[Tuple[str, str]]:
    """A chunked body's data into ``sink`` as it comes; returns its trailer fields."""
    while True:
        size = int(r.line().split(b";")[0].strip(), 16)
        if size == 0:
            return read_fields(r)
        while size:
            part = r.some(size)
            sink(part)
            size -= len(part)
        assert r.exact(2) == b"\r\n", "chunk not followed by CRLF"


class Untransfer:
    """A body's transfer codings (gzip or deflate, at most one here) taken off as it comes."""

    def __init__(self, codings: List[str]):
        assert len(codings) <= 1, codings
        self.z = None
        if codings:
            self.z = zlib.decompressobj(47 if codings[0] in ("gzip", "x-gzip") else 15)

    def feed(self, data: bytes) -> bytes:
        return self.z.decompress(data) if self.z is not None else data

    def end(self) -> bytes:
        if self.z is None:
            return b""
        out = self.z.flush()
        if not self.z.eof:
            raise zlib.error("the transfer-coded body was cut short")
        return out


class Progress:
    """What a client has received so far, for an upstream to wait on: heads, then body bytes
    (framing and transfer codings aside)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.heads = 0
        self.body = 0

    def add(self, heads: int = 0, body: int = 0) -> None:
        with self.cond:
            self.heads += heads
            self.body += body
            self.cond.notify_all()

    def wait(self, heads: int, body: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.heads >= heads and self.body >= body, timeout)


class Received:
    """One request as the upstream read it."""

    def __init__(self, method, target, fields, body, trailers, expect_sent):
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.trailers = trailers
        self.expect_sent = expect_sent


class Answer:
    """A response the upstream sends: ``steps`` of (wire bytes, (heads, body) the client must
    have before the next step or None); ``close``: the connection ends after it."""

    def __init__(self, steps, close: bool):
        self.steps = steps
        self.close = close


class RawUpstream:
    """An HTTP/1.1 upstream on raw sockets: reads requests (Content-Length or chunked, answering
    Expect), answers each with ``self.answer(received)``, keeps connections alive unless told."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received: "queue.Queue[Received]" = queue.Queue()
        self.answer = None  # set per exchange: Received -> Answer
        self.progress: Optional[Progress] = None
        self.stalls: List[str] = []
        self.conns: List[socket.socket] = []
        self.lock = threading.Lock()  # guards conns
        self.stopped = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        r = Reader(conn)
        try:
            while not self.stopped:
                try:
                    line = r.line()
                except EOFError:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                fields = read_fields(r)
                expect = (value_of(fields, "expect") or "").lower() == "100-continue"
                if expect:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                trailers: List[Tuple[str, str]] = []
                parts: List[bytes] = []
                if codings_of(fields):
                    trailers = read_chunked(r, parts.append)
                elif value_of(fields, "content-length") is not None:
                    parts.append(r.exact(int(value_of(fields, "content-length"))))
                rec = Received(method, target, fields, b"".join(parts), trailers, expect)
                self.received.put(rec)
                answer = self.answer(rec)
                for data, need in answer.steps:
                    conn.sendall(data)
                    if need is not None and not self.progress.wait(need[0], need[1], GATE):
                        self.stalls.append("the client did not get %d head(s) and %d body bytes before the "
                                           "upstream's next piece" % need)
                if answer.close:
                    return
        except OSError:
            return
        finally:
            conn.close()


class Got:
    """What a client received: the heads (status, phrase, fields), the body and its trailers."""

    def __init__(self):
        self.heads: List[Tuple[int, bytes, List[Tuple[str, str]]]] = []
        self.body = b""
        self.trailers: List[Tuple[str, str]] = []
        self.codings: List[str] = []


def client_exchange(port: int, req: "Req", progress: Progress) -> Got:
    """Send ``req`` on a new raw connection and read the answer to its end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r = Reader(sock)
    got = Got()
    try:
        sock.sendall(req.head)
        if req.expect:
            # The body after a 100 Continue (another interim or a final status: no body).
            line = r.line()
            read_fields(r)
            assert line.split(b" ")[1] == b"100", "expected 100 Continue, got %r" % line
        if req.wire_body:
            sock.sendall(req.wire_body)
        while True:
            line = r.line()
            version, _, rest = line.rstrip(b"\r\n").partition(b" ")
            status, _, phrase = rest.partition(b" ")
            fields = read_fields(r)
            got.heads.append((int(status), phrase, fields))
            progress.add(heads=1)
            if not (100 <= int(status) < 200):
                break
        parts: List[bytes] = []
        status = int(status)
        codings = codings_of(fields)
        got.codings = [c for c in codings if c != "chunked"]
        if req.method == "HEAD" or status in (204, 304):
            got.codings = []  # (no body: nothing coded)
        untransfer = Untransfer(got.codings)

        def sink(data: bytes) -> None:
            data = untransfer.feed(data)
            parts.append(data)
            progress.add(body=len(data))

        if req.method == "HEAD" or status in (204, 304):
            pass
        elif codings and codings[-1] == "chunked":
            got.trailers = read_chunked(r, sink)
        elif codings or value_of(fields, "content-length") is None:
            while r.buf or r.fill():
                sink(r.some(65536))
        else:
            n = int(value_of(fields, "content-length"))
            while n:
                part = r.some(n)
                sink(part)
                n -= len(part)
        parts.append(untransfer.end())
        got.body = b"".join(parts)
        return got
    finally:
        sock.close()


# -- the seeded exchanges ---------------------------------------------------------------------

NAMES = ["X-Fuzz-Alpha", "x-fuzz-beta", "X-FUZZ-GAMMA", "User-Agent", "accept", "Content-Type",
         "OpenAI-Beta", "x-stainless-lang", "Cache-Control", "Accept-Language", "If-None-Match", "cookie"]
RESP_NAMES = ["Content-Type", "x-request-id", "openai-processing-ms", "X-RateLimit-Remaining-Requests",
              "cache-control", "ETag", "Server", "Date", "x-Mixed-CASE-header", "CF-RAY", "Vary", "Link",
              "Set-Cookie", "Access-Control-Allow-Origin", "request-id"]
UTF8_TEXT = "héllo wörld ✓ 日本語 🎉 «quote»"


def casing(rng: random.Random, name: str) -> str:
    pick = rng.random()
    if pick < 0.5:
        return name
    if pick < 0.7:
        return name.lower()
    if pick < 0.8:
        return name.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def header_value(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.5:
        return "v%d" % rng.randrange(10 ** 6)
    if pick < 0.7:  # obs-text: bytes 0x80-0xff, as latin-1
        return "caf" + "".join(chr(rng.randrange(0x80, 0x100)) for _ in range(rng.randrange(1, 6))) + "!"
    if pick < 0.8:
        return "x" * rng.randrange(1000, 8000)
    if pick < 0.9:
        return "a=1; b=\"two, three\"; q=0.5"
    return ""


def random_body(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))  # invalid UTF-8 too
    if pick < 0.6:
        return (b'{"model":"gpt-4o","n":123456789012345678901234567890,"x":1,"x":2,'
                b'"f":1.0e400,"s":"\\ud800","t":"' + UTF8_TEXT.encode() + b'","stream":false}')
    if pick < 0.8:
        return b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "seed": %d}' % rng.randrange(10 ** 9)
    return b""


class Req:
    def __init__(self, method, target, fields, body, chunked, expect, trailers):
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.chunked = chunked
        self.expect = expect
        self.trailers = trailers
        self.cuts: List[int] = []  # where a chunked body's chunks end
        self.head = b""
        self.wire_body = b""

    def build(self, host: str) -> None:
        """The bytes sent, for a client addressing ``host``."""
        lines = ["%s %s HTTP/1.1" % (self.method, self.target), "Host: " + host]
        lines += ["%s: %s" % kv for kv in self.fields]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: %d" % len(self.body))
        if self.expect:
            lines.append("Expect: 100-continue")
        self.head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.chunked:
            self.wire_body = chunked_bytes(self.body, self.cuts, self.trailers)
        else:
            self.wire_body = self.body


def chunked_bytes(body: bytes, cuts: List[int], trailers: List[Tuple[str, str]]) -> bytes:
    out, last = [], 0
    for i, p in enumerate(sorted(set(c for c in cuts if 0 < c < len(body))) + [len(body)]):
        if p > last:
            ext = b";ext=%d" % i if i % 2 else b""
            out.append(b"%x%s\r\n%s\r\n" % (p - last, ext, body[last:p]))
            last = p
    out.append(b"0\r\n" + "".join("%s: %s\r\n" % kv for kv in trailers).encode("latin-1") + b"\r\n")
    return b"".join(out)


def make_request(rng: random.Random, tag: str) -> Req:
    method = rng.choice(["POST", "POST", "POST", "GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"])
    target = "/v1/fuzz/%s/%s" % (tag, rng.choice(["chat/completions", "x", "a%20b", "deep/er/path"]))
    if rng.random() < 0.4:
        target += "?" + rng.choice(["alt=sse", "a=1&b=2&a=3", "q=%E2%9C%93", "empty=", ""])
    fields = []
    for _ in range(rng.randrange(0, 8)):
        fields.append((casing(rng, rng.choice(NAMES)), header_value(rng)))
    if rng.random() < 0.3:
        fields.insert(rng.randrange(len(fields) + 1), (casing(rng, "Accept-Encoding"),
                                                      rng.choice(["gzip, br", "br", "gzip;q=1.0, deflate, zstd", "identity"])))
    if rng.random() < 0.2:  # a hop-by-hop field named by Connection
        fields += [("Connection", "X-Hop-Req"), ("X-Hop-Req", "drop me"), ("Keep-Alive", "timeout=5")]
    if rng.random() < 0.1:
        fields.append((casing(rng, "TE"), "trailers"))
    body = random_body(rng) if method in ("POST", "PUT", "PATCH") or rng.random() < 0.1 else b""
    chunked = bool(body) and rng.random() < 0.35
    expect = bool(body) and rng.random() < 0.3
    trailers = [("X-Req-Trailer", "t%d" % rng.randrange(100))] if chunked and rng.random() < 0.5 else []
    req = Req(method, target, fields, body, chunked, expect, trailers)
    req.cuts = [rng.randrange(1, len(body) + 1) for _ in range(rng.randrange(0, 4))] if body else []
    return req


def sse_bytes(rng: random.Random) -> bytes:
    eol = rng.choice([b"\n", b"\r\n", b"\r"])
    events = []
    for i in range(rng.randrange(2, 8)):
        lines = []
        if rng.random() < 0.3:
            lines.append(b": keepalive")
        if rng.random() < 0.4:
            lines.append(b"event: delta")
        text = "".join(rng.choice(UTF8_TEXT) for _ in range(rng.randrange(1, 20)))
        lines.append(b'data: {"i":%d,"text":"%s"}' % (i, text.encode()))
        events.append(eol.join(lines) + eol + eol)
    events.append(b"data: [DONE]" + eol + eol)
    return b"".join(events)


class Spec:
    """A drawn response: status, phrase, fields, body, framing, interim heads, stream pieces."""

    def __init__(self, rng: random.Random):
        self.interim: List[Tuple[int, str, List[Tuple[str, str]]]] = []
        if rng.random() < 0.15:
            self.interim.append((103, "Early Hints", [("Link", "</style.css>; rel=preload; as=style"),
                                                      ("link", "</app.js>; rel=preload; as=script")]))
        if rng.random() < 0.05:
            self.interim.append((102, "Processing", []))
        self.status = rng.choice([200, 200, 200, 201, 202, 204, 206, 299, 301, 304, 400, 401, 403, 404,
                                  409, 422, 429, 499, 500, 502, 503, 529, 599])
        self.phrase = rng.choice(["", "OK", "Custom Reason", "  Spaced  Out  ", "R\xe9sum\xe9", None])
        self.version = "HTTP/1.1"
        fields = []
        for _ in range(rng.randrange(0, 60 if rng.random() < 0.1 else 10)):
            fields.append((casing(rng, rng.choice(RESP_NAMES)), header_value(rng)))
        for name in ("Set-Cookie", "Link", "Vary"):
            if rng.random() < 0.3:
                for k in range(rng.randrange(2, 4)):
                    fields.insert(rng.randrange(len(fields) + 1), (casing(rng, name), "%s-%d; v=%s" % (name, k, header_value(rng)[:40])))
        if self.status == 429:
            fields.append(("Retry-After", str(rng.randrange(1, 60))))
        if self.status == 401:
            fields.append(("WWW-Authenticate", 'Bearer realm="api", error="invalid_token"'))
        if self.status in (301, 302):
            fields.append(("Location", "https://elsewhere.example/v1/x"))
        if rng.random() < 0.2:
            fields += [("Connection", "x-hop-resp"), ("X-Hop-Resp", "drop me")]
        kind = rng.choice(["length", "length", "chunked", "close", "gzip-te", "gzip-ce", "sse", "sse", "empty"])
        if self.status == 500 and rng.random() < 0.5:
            kind = "html"
        self.kind = kind
        self.body = b""
        self.framing = "length"
        self.pieces: List[bytes] = []
        self.ext = rng.random() < 0.5
        self.trailers = [("X-Trailer", "t%d" % rng.randrange(100))] if rng.random() < 0.4 else []
        if kind == "length":
            self.body = random_body(rng) or b"{}"
            if rng.random() < 0.1:
                self.body = bytes(rng.randrange(256) for _ in range(300 * 1024))  # past SMALL_BODY
        elif kind == "html":
            fields.append(("Content-Type", "text/html; charset=utf-8"))
            self.body = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1>" \
                        b"<p>" + UTF8_TEXT.encode() + b"</p></body></html>\n"
        elif kind == "chunked":
            self.body = random_body(rng) or b"x"
            self.framing = "chunked"
        elif kind == "close":
            self.body = random_body(rng) or b"until the close"
            self.framing = "close"
            if rng.random() < 0.5:
                self.version = "HTTP/1.0"
        elif kind == "gzip-te":
            self.body = random_body(rng) or b"zipped"
            self.framing = rng.choice(["gzip, chunked", "deflate, chunked", "gzip"])
        elif kind == "gzip-ce":
            fields.append((casing(rng, "Content-Encoding"), "gzip"))
            self.body = gzip.compress(random_body(rng) or b"zipped", mtime=0)
            self.framing = rng.choice(["length", "chunked"])
        elif kind == "sse":
            fields = [(casing(rng, "Content-Type"), "text/event-stream; charset=utf-8"),
                      ("Cache-Control", "no-cache")] + fields
            self.body = sse_bytes(rng)
            self.framing = rng.choice(["chunked", "chunked", "close", "gzip, chunked"])
            # Cut anywhere: mid-line, mid-UTF-8 sequence, between CR and LF.
            cuts = sorted(set(rng.randrange(1, len(self.body)) for _ in range(rng.randrange(2, 10))))
            self.pieces = [self.body[a:b] for a, b in zip([0] + cuts, cuts + [len(self.body)])]
        elif kind == "empty":
            self.framing = rng.choice(["length", "chunked"])
        self.fields = fields
        self.head_lower = rng.random() < 0.1

    def answer(self, method: str) -> Answer:
        steps = []
        heads = 0
        for status, phrase, fields in self.interim:
            steps.append((head_bytes("HTTP/1.1", status, phrase, fields), None))
            heads += 1
            steps.append((b"", (heads, 0)))  # the interim head reaches the client before the final
        no_body = method == "HEAD" or self.status in (204, 304)
        fields = list(self.fields)
        close = False
        framing = self.framing
        if no_body and self.status in (204, 304):
            framing = "length" if self.status == 304 else "none"
        if framing == "length":
            fields.append(("Content-Length", str(len(self.body))))
        elif framing == "chunked":
            fields.append(("Transfer-Encoding", "chunked"))
        elif framing == "close":
            close = True
            if self.version == "HTTP/1.1" and not no_body:
                fields.append(("Connection", "close"))
        elif framing in ("gzip", "gzip, chunked", "deflate, chunked"):
            fields.append(("Transfer-Encoding", framing))
            close = framing == "gzip"
        version = self.version if framing == "close" else "HTTP/1.1"
        head = head_bytes(version, self.status, self.phrase, fields)
        heads += 1
        if no_body:
            steps.append((head, None))
            return Answer(steps, close)
        coded = self.body
        if framing.startswith("gzip"):
            coded = gzip.compress(self.body, mtime=0)
        elif framing.startswith("deflate"):
            coded = zlib.compress(self.body)
        if self.pieces and framing in ("chunked", "close", "gzip, chunked"):
            steps.append((head, (heads, 0)))
            sent = 0
            z = zlib.compressobj(9, zlib.DEFLATED, 31) if framing.startswith("gzip") else None
            for i, piece in enumerate(self.pieces):
                sent += len(piece)
                if z is not None:  # each piece flushed: it decodes whole on its own
                    piece = z.compress(piece) + z.flush(zlib.Z_SYNC_FLUSH)
                data = b"%x%s\r\n%s\r\n" % (len(piece), b";n=%d" % i if self.ext else b"", piece) \
                    if framing != "close" else piece
                steps.append((data, (heads, sent)))
            if z is not None:  # the gzip trailer
                tail = z.flush()
                steps.append((b"%x\r\n%s\r\n" % (len(tail), tail), None))
            if framing != "close":
                steps.append((last_chunk(self.trailers), None))
            return Answer(steps, close)
        if framing.endswith("chunked"):
            cuts = [len(coded) // 3, len(coded) // 2]
            steps.append((head + chunked_framed(coded, cuts, self.ext, self.trailers), None))
        else:
            steps.append((head + coded, None))
        return Answer(steps, close)


def head_bytes(version: str, status: int, phrase: Optional[str], fields) -> bytes:
    line = "%s %d" % (version, status) + ("" if phrase is None else " " + phrase)
    return (line + "\r\n" + "".join("%s: %s\r\n" % kv for kv in fields) + "\r\n").encode("latin-1")


def chunked_framed(data: bytes, cuts: List[int], ext: bool, trailers) -> bytes:
    out, last = [], 0
    for i, p in enumerate(sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]):
        if p > last:
            out.append(b"%x%s\r\n%s\r\n" % (p - last, b"; name=\"v\"" if ext else b"", data[last:p]))
            last = p
    return b"".join(out) + last_chunk(trailers)


def last_chunk(trailers) -> bytes:
    return b"0\r\n" + "".join("%s: %s\r\n" % kv for kv in trailers).encode("latin-1") + b"\r\n"


# -- the comparison ---------------------------------------------------------------------------

def _without(fields, drop) -> List[Tuple[str, str]]:
    named = {t.strip().lower() for n, v in fields if n.lower() == "connection" for t in v.split(",")}
    return [(n, v) for n, v in fields if n.lower() not in drop and n.lower() not in named]


def compare_responses(direct: Got, proxied: Got, method: str) -> List[str]:
    diffs = []
    if len(direct.heads) != len(proxied.heads):
        diffs.append("heads: direct %r, proxied %r" % ([h[:2] for h in direct.heads], [h[:2] for h in proxied.heads]))
        return diffs
    for i, ((s1, p1, f1), (s2, p2, f2)) in enumerate(zip(direct.heads, proxied.heads)):
        if s1 != s2:
            diffs.append("head %d status: direct %d, proxied %d" % (i, s1, s2))
        if p1 != p2:
            diffs.append("head %d reason phrase: direct %r, proxied %r" % (i, p1, p2))
        drop = set(HOP_BY_HOP) | {"x-proxy-record-id"}
        final = i == len(direct.heads) - 1
        if final and codings_of(f1):
            # ALLOWED["response: Content-Length of a body without a length"]: beside a
            # Transfer-Encoding it is no length (RFC 9112 6.3), and the proxy drops it.
            drop.add("content-length")
        e1, e2 = _without(f1, drop), _without(f2, drop)
        if e1 != e2:
            diffs.append("head %d fields: direct %r, proxied %r" % (i, e1, e2))
        if final and len([1 for n, _ in f2 if n.lower() == "x-proxy-record-id"]) != 1:
            diffs.append("final head without one X-Proxy-Record-Id")
    if direct.body != proxied.body:
        diffs.append("body: direct %d bytes %r..., proxied %d bytes %r..." % (
            len(direct.body), direct.body[:60], len(proxied.body), proxied.body[:60]))
    if direct.trailers and not proxied.trailers:
        pass  # ALLOWED["response: trailer fields"]
    elif direct.trailers != proxied.trailers:
        diffs.append("trailers: direct %r, proxied %r" % (direct.trailers, proxied.trailers))
    return diffs


def compare_requests(direct: Received, proxied: Received, req: Req) -> List[str]:
    diffs = []
    if (direct.method, direct.target) != (proxied.method, proxied.target):
        diffs.append("request line: direct %s %s, proxied %s %s" % (direct.method, direct.target,
                                                                   proxied.method, proxied.target))
    drop = set(HOP_BY_HOP) | {"expect", "content-length", "accept-encoding"}
    e1, e2 = _without(direct.fields, drop), _without(proxied.fields, drop)
    if e1 != e2:
        diffs.append("request fields: direct %r, proxied %r" % (e1, e2))
    ae = _narrowed(value_of(direct.fields, "accept-encoding"))
    if value_of(proxied.fields, "accept-encoding") != ae:
        diffs.append("Accept-Encoding: %r, expected %r" % (value_of(proxied.fields, "accept-encoding"), ae))
    cl = value_of(proxied.fields, "content-length")
    if cl is not None and int(cl) != len(proxied.body):
        diffs.append("Content-Length %s for a body of %d" % (cl, len(proxied.body)))
    if cl is None and (req.body or req.method in ("POST", "PUT", "PATCH")):
        diffs.append("no Content-Length on a request with a body")
    if direct.body != proxied.body:
        diffs.append("request body: direct %d bytes, proxied %d bytes" % (len(direct.body), len(proxied.body)))
    if proxied.trailers:  # (ALLOWED["request: trailer fields"]: none, rather than others)
        diffs.append("request trailers %r" % proxied.trailers)
    return diffs


def seeds() -> List[int]:
    spec = os.environ.get("PROXY_LLM_FUZZ_SEEDS", "")
    if not spec:
        return SEEDS
    if "-" in spec:
        a, b = spec.split("-", 1)
        return list(range(int(a), int(b)))
    return list(range(int(spec)))


class InvisibleFuzzTest(unittest.TestCase):
    """The client, and the upstream, cannot tell the proxy is there, but for ALLOWED."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.tmp = tempfile.mkdtemp(prefix="proxy_llm_fuzz_")
        cls.upstream = RawUpstream()
        url = "http://127.0.0.1:%d" % cls.upstream.port
        providers = [provider("openai", "openai", url), provider("anthropic", "anthropic", url),
                     provider("gemini", "gemini", url)]
        # The fuzzed streams end without a dialect's terminal event, which the proxy logs: quiet.
        cls.log = logging.getLogger("proxy_llm")
        cls.log_level = cls.log.level
        cls.log.setLevel(logging.ERROR)
        cls.proxy = InProcessProxy(base_config(providers, os.path.join(cls.tmp, "data"))).__enter__()

    @classmethod
    def tearDownClass(cls):
        import shutil
        cls.proxy.stop()
        cls.upstream.stop()
        cls.log.setLevel(cls.log_level)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_one(self, port: int, req: Req, spec: Spec) -> Tuple[Got, Received, List[str]]:
        """One exchange; a client that cannot read its answer, or an upstream never asked, is
        an AssertionError saying so."""
        up = self.upstream
        up.stalls = []
        up.progress = progress = Progress()
        up.answer = lambda rec: spec.answer(rec.method)
        req.build("127.0.0.1:%d" % port)
        try:
            got = client_exchange(port, req, progress)
        except (OSError, EOFError, ValueError, AssertionError, zlib.error) as exc:
            raise AssertionError("the client could not read the answer: %s: %s" % (type(exc).__name__, exc))
        try:
            rec = up.received.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError("the upstream got no request") from None
        return got, rec, list(up.stalls)

    def drain(self) -> None:
        """After a failed exchange: forget a request the upstream got for it."""
        while True:
            try:
                self.upstream.received.get_nowait()
            except queue.Empty:
                return

    def test_seeds(self):
        failures = []
        for seed in seeds():
            rng = random.Random(seed)
            if len(failures) >= MAX_FAILURES:  # (each may have waited CLIENT_TIMEOUT)
                failures.append("... stopped after %d failures" % MAX_FAILURES)
                break
            for i in range(EXCHANGES_PER_SEED):
                tag = "s%d-%d" % (seed, i)
                req = make_request(rng, tag)
                spec = Spec(rng)
                where = "seed %d exchange %d (%s %s -> %d %s/%s)" % (seed, i, req.method, req.target,
                                                                      spec.status, spec.kind, spec.framing)
                direct, d_rec, d_stalls = self.run_one(self.upstream.port, req, spec)
                self.assertEqual(d_stalls, [], "the harness itself, direct: " + where)
                try:
                    proxied, p_rec, p_stalls = self.run_one(self.proxy.port, req, spec)
                except AssertionError as exc:
                    failures.append(where + ":\n    " + str(exc))
                    self.drain()
                    continue
                diffs = ["stream: " + s for s in p_stalls]
                diffs += compare_responses(direct, proxied, req.method)
                diffs += compare_requests(d_rec, p_rec, req)
                if diffs:
                    failures.append(where + ":\n    " + "\n    ".join(d[:600] for d in diffs))
        self.assertEqual(failures, [], "\n".join(failures))


if __name__ == "__main__":
    unittest.main()
