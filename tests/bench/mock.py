"""A fast mock LLM upstream for the benchmark: OpenAI chat and Anthropic messages.

Design: one asyncio event loop per process, a hand-written HTTP/1.1 parser on
``asyncio.Protocol`` (no streams layer), and several processes sharing one port
with ``SO_REUSEPORT`` so the kernel spreads connections over them.  It has to be
much cheaper per request than the proxy under test, or the benchmark measures
the mock.

Behaviour is chosen per request by headers (``X-Mock-*``) or by the same names
in the query string (``?mock-latency=5``):

=================  =====================================================  =======
header             meaning                                                default
=================  =====================================================  =======
X-Mock-Latency     ms from the end of the request to the response headers 0
X-Mock-TTFT        ms from the end of the request to the first frame      latency
X-Mock-Chunks      number of content frames in a stream                   5
X-Mock-Interval    ms between frames                                      0
X-Mock-Size        bytes of content in a non-streamed response            64
X-Mock-Frame-Size  padding bytes per streamed frame                       16
X-Mock-Stream      "1"/"0": force streaming on or off                     body
X-Mock-Tag         text put at the start of the content (verification)    ""
X-Mock-Headers     "real": a non-streamed answer carries the provider's   few
                   own headers too (see ``PROVIDER_HEADERS``)
=================  =====================================================  =======

Streaming is on when the body holds ``"stream": true`` (or the header says so).
``/v1/chat/completions`` (any path ending in ``chat/completions``) answers in
OpenAI's shape, any path ending in ``messages`` in Anthropic's.

Frames are pre-built (a prefix and a suffix per dialect); only a marker
``~<seq>;<send time>~`` is formatted at send time.  Frame ``i`` is due at
``t0 + ttft + i * interval`` (t0 = request fully received), scheduled by
deadline with ``loop.call_at`` so that lateness does not accumulate.  The send
time is ``time.monotonic()``: on Linux CLOCK_MONOTONIC is system-wide, so the
client in another process can compute a one-way delay per frame.

Run: ``python -m tests.bench.mock --listen 127.0.0.1:0 --procs 2``; prints
``listening on http://127.0.0.1:PORT`` on stdout.  SIGTERM stops all processes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from urllib.parse import parse_qsl

# --- pre-built response pieces -------------------------------------------------

_FILLER = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "

_OPENAI_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-bench","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"',
    b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":22,'
    b'"total_tokens":33}}',
)
_ANTHROPIC_BODY = (
    b'{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench",'
    b'"content":[{"type":"text","text":"',
    b'"}],"stop_reason":"end_turn","stop_sequence":null,'
    b'"usage":{"input_tokens":11,"output_tokens":22}}',
)

# What the providers answer with besides the body: their documented request-id and rate-limit
# headers, behind Cloudflare (OpenAI also sets two cookies). Values with a {field} change from
# one response to the next, as in real traffic (a count, the date, a milliseconds figure).
_CLOUDFLARE = [("Server", "cloudflare"), ("CF-RAY", "8f{n:014x}-SJC"), ("CF-Cache-Status", "DYNAMIC"),
               ("Strict-Transport-Security", "max-age=31536000; includeSubDomains; preload"),
               ("X-Content-Type-Options", "nosniff"), ("Alt-Svc", 'h3=":443"; ma=86400')]
PROVIDER_HEADERS = {
    "openai": [("Date", "{date}"), ("access-control-expose-headers", "X-Request-ID"),
               ("openai-organization", "user-bench"), ("openai-processing-ms", "{ms}"), ("openai-project", "proj_bench"),
               ("openai-version", "2020-10-01"), ("x-envoy-upstream-service-time", "{ms}"),
               ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "30000000"),
               ("x-ratelimit-remaining-requests", "{left}"), ("x-ratelimit-remaining-tokens", "{left}0"),
               ("x-ratelimit-reset-requests", "{ms}ms"), ("x-ratelimit-reset-tokens", "0s"),
               ("x-request-id", "req_{n:032x}"),
               ("set-cookie", "__cf_bm={n:x}; path=/; HttpOnly; Secure; SameSite=None"),
               ("set-cookie", "_cfuvid={n:x}; path=/; HttpOnly; Secure; SameSite=None")] + _CLOUDFLARE,
    "anthropic": [("Date", "{date}"), ("anthropic-ratelimit-requests-limit", "4000"),
                  ("anthropic-ratelimit-requests-remaining", "{left}"),
                  ("anthropic-ratelimit-requests-reset", "2026-12-06T07:00:{s:02d}Z"),
                  ("anthropic-ratelimit-input-tokens-limit", "400000"),
                  ("anthropic-ratelimit-input-tokens-remaining", "{left}0"),
                  ("anthropic-ratelimit-output-tokens-limit", "80000"),
                  ("anthropic-ratelimit-output-tokens-remaining", "{left}"),
                  ("request-id", "req_{n:024x}"), ("anthropic-organization-id", "org-bench"),
                  ("via", "1.1 google")] + _CLOUDFLARE,
}
_PROVIDER_BLOCKS = {family: "".join("%s: %s\r\n" % pair for pair in pairs)
                    for family, pairs in PROVIDER_HEADERS.items()}
_counter = [0]


def provider_headers(family: str, n: int, now: float) -> bytes:
    """The provider's headers for response number ``n``, as bytes ending in CRLF."""
    return _PROVIDER_BLOCKS[family].format(
        n=7919 * n, ms=200 + n % 900, left=9999 - n % 5000, s=n % 60,
        date=time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))).encode("latin-1")


_OA_CHUNK = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-bench",'
_OPENAI_STREAM = {
    "head": _OA_CHUNK + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n',
    "prefix": _OA_CHUNK + b'"choices":[{"index":0,"delta":{"content":"',
    "suffix": b'"},"finish_reason":null}]}\n\n',
    "tail": _OA_CHUNK + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    + _OA_CHUNK + b'"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}\n\n'
    b"data: [DONE]\n\n",
}
_ANTHROPIC_STREAM = {
    "head": b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench",'
    b'"type":"message","role":"assistant","model":"claude-bench","content":[],"stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":11,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    "prefix": b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"',
    "suffix": b'"}}\n\n',
    "tail": b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":22}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
}

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_NOT_FOUND = b'{"error":{"type":"not_found","message":"mock: unknown path"}}'

_filler_cache = {}  # size -> bytes; per process, bounded by the sizes the bench uses


def filler(size: int) -> bytes:
    """``size`` bytes of JSON-safe ASCII text (cached)."""
    b = _filler_cache.get(size)
    if b is None:
        b = (_FILLER * (size // len(_FILLER) + 1))[:size]
        if len(_filler_cache) < 256:
            _filler_cache[size] = b
    return b


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_escape_tag(tag: str) -> bytes:
    # The tag comes from a header (latin-1 on the wire); keep it JSON-safe.
    out = []
    for ch in tag:
        if ch in '"\\' or ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out).encode("utf-8")


class MockProtocol(asyncio.Protocol):
    """One client connection; requests are handled one at a time (pipelining is queued)."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.close_after = False
        self.loop = asyncio.get_event_loop()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    # --- request parsing ---------------------------------------------------

    def _process(self) -> None:
        while not self.busy and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self.transport.close()
                return
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if "chunked" in headers.get("transfer-encoding", "").lower():
                parsed = _parse_chunked(buf, start)
                if parsed is None:
                    return
                body, consumed = parsed
                del buf[:consumed]
            else:
                length = int(headers.get("content-length") or 0)
                if len(buf) < start + length:
                    return
                body = bytes(buf[start:start + length])
                del buf[:start + length]
            if headers.get("connection", "").lower() == "close":
                self.close_after = True
            self.busy = True
            self._handle(method, target, headers, body)

    def _done(self) -> None:
        self.busy = False
        if self.close_after:
            self.transport.close()
            self.closed = True
            return
        if self.buf:
            self._process()

    # --- behaviour ---------------------------------------------------------

    def _handle(self, method: str, target: str, headers: dict, body: bytes) -> None:
        t0 = time.monotonic()
        path, _, query = target.partition("?")
        opts = {}
        if query:
            for k, v in parse_qsl(query):
                if k.startswith("mock-"):
                    opts[k[5:]] = v
        for k, v in headers.items():
            if k.startswith("x-mock-"):
                opts[k[7:]] = v
        if path.endswith("chat/completions"):
            body_parts, stream_parts, family = _OPENAI_BODY, _OPENAI_STREAM, "openai"
        elif path.endswith("/messages"):
            body_parts, stream_parts, family = _ANTHROPIC_BODY, _ANTHROPIC_STREAM, "anthropic"
        elif path in ("/health", "/healthz"):
            self._write_full(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            return
        else:
            self._write_full(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(_NOT_FOUND), _NOT_FOUND)
            )
            return
        stream_opt = opts.get("stream")
        if stream_opt is not None:
            stream = stream_opt not in ("0", "false", "")
        else:
            stream = b'"stream":true' in body or b'"stream": true' in body
        latency = float(opts.get("latency") or 0) / 1000.0
        tag = _json_escape_tag(opts.get("tag", ""))
        if not stream:
            content = tag + filler(int(opts.get("size") or 64))
            payload = body_parts[0] + content + body_parts[1]
            extra = b""
            if opts.get("headers") == "real":
                _counter[0] += 1
                extra = provider_headers(family, _counter[0], time.time())
            data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
                len(payload), extra, payload)
            if latency <= 0:
                self._write_full(data)
            else:
                self.loop.call_at(t0 + latency, self._write_full, data)
            return
        ttft = max(latency, float(opts.get("ttft") or 0) / 1000.0)
        st = _Stream(self, stream_parts, t0, ttft,
                     int(opts.get("chunks") or 5),
                     float(opts.get("interval") or 0) / 1000.0,
                     filler(int(opts.get("frame-size") or 16)), tag)
        if ttft > latency:
            if latency <= 0:
                self.transport.write(_STREAM_HEAD)
            else:
                self.loop.call_at(t0 + latency, self._write_head)
            self.loop.call_at(t0 + ttft, st.send, 0)
        else:
            st.head_pending = True
            if ttft <= 0:
                st.send(0)
            else:
                self.loop.call_at(t0 + ttft, st.send, 0)

    def _write_head(self) -> None:
        if not self.closed:
            self.transport.write(_STREAM_HEAD)

    def _write_full(self, data: bytes) -> None:
        if self.closed:
            return
        self.transport.write(data)
        self._done()


class _Stream:
    """One streamed response, frame by frame, each due at t0 + ttft + i * interval."""

    __slots__ = ("proto", "parts", "t0", "ttft", "chunks", "interval", "pad", "tag", "head_pending")

    def __init__(self, proto, parts, t0, ttft, chunks, interval, pad, tag) -> None:
        self.proto = proto
        self.parts = parts
        self.t0 = t0
        self.ttft = ttft
        self.chunks = max(1, chunks)
        self.interval = interval
        self.pad = pad
        self.tag = tag
        self.head_pending = False

    def send(self, i: int) -> None:
        proto = self.proto
        if proto.closed:
            return
        parts = self.parts
        pieces = []
        if i == 0:
            if self.head_pending:
                pieces.append(_STREAM_HEAD)
            pieces.append(_chunk(parts["head"]))
            content = self.tag + b"~%06d;%.6f~" % (i, time.monotonic()) + self.pad
        else:
            content = b"~%06d;%.6f~" % (i, time.monotonic()) + self.pad
        frame = parts["prefix"] + content + parts["suffix"]
        last = i + 1 >= self.chunks
        if last:
            frame += parts["tail"]
        pieces.append(_chunk(frame))
        if last:
            pieces.append(b"0\r\n\r\n")
        proto.transport.write(b"".join(pieces))
        if last:
            proto._done()
        else:
            proto.loop.call_at(self.t0 + self.ttft + (i + 1) * self.interval, self.send, i + 1)


def _parse_chunked(buf: bytearray, pos: int):
    """Decode a complete chunked body from ``buf[pos:]``; None if incomplete."""
    out = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            # trailers, then an empty line
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                empty = eol == pos
                pos = eol + 2
                if empty:
                    return b"".join(out), pos
        if len(buf) < pos + size + 2:
            return None
        out.append(bytes(buf[pos:pos + size]))
        pos += size + 2


# --- process management ------------------------------------------------------

def _listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _serve(sock: socket.socket, parent_pid: int) -> None:
    async def main() -> None:
        loop = asyncio.get_event_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(MockProtocol, sock=sock, backlog=4096)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            # A child exits by itself when its parent is gone (no orphans).
            if parent_pid and os.getppid() != parent_pid:
                break
        server.close()

    asyncio.run(main())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.mock", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    first = _listen_socket(host, int(port))
    port = first.getsockname()[1]
    children = []
    me = os.getpid()
    for _ in range(max(0, args.procs - 1)):
        pid = os.fork()
        if pid == 0:
            first.close()
            try:
                _serve(_listen_socket(host, port), me)
            finally:
                os._exit(0)
        children.append(pid)
    sys.stdout.write("listening on http://%s:%d\n" % (host, port))
    sys.stdout.flush()
    try:
        _serve(first, 0)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
