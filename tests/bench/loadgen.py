"""The load generator: raw keep-alive HTTP/1.1 over asyncio, one process per segment.

A hand-written response parser on ``asyncio.Protocol`` (Content-Length and
chunked bodies), so the client spends a few tens of microseconds per request.

* ``closed_loop``: fixed concurrency, each connection sends its next request when
  the previous answer is complete (saturation, added latency at concurrency 1).
* ``open_loop``: fixed rate; request ``i`` is *intended* at ``t0 + i / rate`` and
  its latency is measured from that instant, so a slow target cannot slow the
  arrival rate down and hide its queueing (coordinated omission).
* ``streams``: N concurrent streams; per stream TTFT and, per frame, the one-way
  delay from the mock's send time (``~seq;monotonic~`` marker in the content)
  to arrival here; lost and reordered frames are counted.

Every result carries the ``X-Proxy-Record-Id`` values seen, and optionally the
full request/response bodies, for the record check.
"""
from __future__ import annotations

import asyncio
import gc
import re
import socket
import time

MARKER = re.compile(rb"~(\d+);(\d+\.\d+)~")

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _EOF = range(7)


class ConnError(Exception):
    """The connection failed or closed before the response was complete."""


class Response:
    __slots__ = ("status", "record_id", "t_start", "t_headers", "t_first", "t_end",
                 "body", "frames", "nbytes", "headers", "close")

    def __init__(self, t_start: float, keep_body: bool, frames: bool) -> None:
        self.status = 0
        self.record_id = None
        self.t_start = t_start
        self.t_headers = 0.0
        self.t_first = 0.0
        self.t_end = 0.0
        self.body = bytearray() if (keep_body or frames) else None
        self.frames = [] if frames else None   # (seq, sent_at, received_at)
        self.nbytes = 0
        self.headers = None
        self.close = False


class ClientConn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()
        self.resp = None
        self.fut = None
        self.state = _HEAD
        self.remaining = 0
        self.scan = 0
        self.closed = False
        self.keep_headers = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        fut = self.fut
        if fut is not None and not fut.done():
            if self.state == _EOF and self.resp is not None:
                self._finish(time.monotonic())
            else:
                fut.set_exception(ConnError(repr(exc) if exc else "closed"))
        self.fut = None

    def request(self, raw: bytes, keep_body: bool = False, frames: bool = False,
                keep_headers: bool = False, t_start: float = 0.0):
        """Send ``raw`` (a complete HTTP request); returns a future of ``Response``."""
        if self.closed:
            raise ConnError("closed")
        loop = asyncio.get_event_loop()
        self.fut = fut = loop.create_future()
        self.resp = Response(t_start or time.monotonic(), keep_body, frames)
        self.keep_headers = keep_headers
        self.state = _HEAD
        self.scan = 0
        self.transport.write(raw)
        return fut

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        if self.resp is not None:
            self._parse(now)

    def _body(self, data, now: float) -> None:
        r = self.resp
        if not r.nbytes:
            r.t_first = now
        r.nbytes += len(data)
        if r.body is not None:
            r.body += data
            if r.frames is not None:
                last = self.scan
                for m in MARKER.finditer(r.body, self.scan):
                    r.frames.append((int(m.group(1)), float(m.group(2)), now))
                    last = m.end()
                self.scan = last

    def _finish(self, now: float) -> None:
        r = self.resp
        r.t_end = now
        self.resp = None
        fut = self.fut
        self.fut = None
        self.state = _HEAD
        if fut is not None and not fut.done():
            fut.set_result(r)
        if r.close:
            self.transport.close()
            self.closed = True

    def _parse(self, now: float) -> None:
        buf = self.buf
        while self.resp is not None:
            state = self.state
            if state == _HEAD:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                head = bytes(buf[:i])
                del buf[:i + 4]
                r = self.resp
                r.t_headers = now
                lines = head.split(b"\r\n")
                r.status = int(lines[0].split(b" ", 2)[1])
                length = None
                chunked = False
                hdrs = {} if self.keep_headers else None
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    value = value.strip()
                    if hdrs is not None:
                        hdrs[name.decode("latin-1")] = value.decode("latin-1")
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                    elif name == b"x-proxy-record-id":
                        r.record_id = value.decode("ascii", "replace")
                    elif name == b"connection":
                        r.close = value.lower() == b"close"
                r.headers = hdrs
                if chunked:
                    self.state = _CHUNK_SIZE
                elif length is not None:
                    if length == 0:
                        self._finish(now)
                        continue
                    self.state = _BODY
                    self.remaining = length
                else:
                    self.state = _EOF
                    r.close = True
            elif state == _BODY or state == _CHUNK_DATA or state == _EOF:
                if not buf:
                    return
                if state == _EOF:
                    n = len(buf)
                else:
                    n = min(len(buf), self.remaining)
                self._body(bytes(buf[:n]), now)
                del buf[:n]
                if state == _EOF:
                    return
                self.remaining -= n
                if self.remaining == 0:
                    if state == _BODY:
                        self._finish(now)
                    else:
                        self.state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[:i + 2]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = _CHUNK_SIZE
            else:  # _TRAILER
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                del buf[:i + 2]
                if i == 0:
                    self._finish(now)


async def connect(host: str, port: int) -> ClientConn:
    loop = asyncio.get_event_loop()
    _, proto = await loop.create_connection(ClientConn, host, port)
    return proto


def build_request(host: str, port: int, path: str, body: bytes, headers=None) -> bytes:
    """A complete keep-alive POST request as bytes."""
    lines = ["POST %s HTTP/1.1" % path, "Host: %s:%d" % (host, port),
             "Content-Type: application/json", "Content-Length: %d" % len(body)]
    for k, v in (headers or {}).items():
        lines.append("%s: %s" % (k, v))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Tally:
    """What a segment saw; merged across rounds."""

    def __init__(self) -> None:
        self.lat = []          # seconds, successful requests
        self.ok = 0
        self.errors = 0        # connection failures or non-200
        self.elapsed = 0.0     # seconds of load
        self.record_ids = []
        self.no_record_id = 0
        self.exchanges = []    # (request raw body, Response) when kept
        self.ttft = []
        self.frame_delay = []
        self.frames_lost = 0
        self.frames_reordered = 0
        self.streams_ok = 0
        self.streams_lost = 0
        self.max_open = 0
        self.error_samples = []
        self.round_rps = []    # one entry per segment merged in (robust median across rounds)
        self.round_pct = []    # (p50, p90, p99) per segment when lat is not kept (tests/bench/wrk.py)
        self.round_drain = []  # seconds per segment until the target went quiet (run.settle)
        self.unnamed_ok = 0    # successful answers whose record id was not seen (wrk)
        self.unnamed_answered = 0

    def merge(self, other: "Tally") -> None:
        for k, v in other.__dict__.items():
            if isinstance(v, list):
                getattr(self, k).extend(v)
            elif k == "max_open":
                self.max_open = max(self.max_open, v)
            else:
                setattr(self, k, getattr(self, k) + v)
        del self.error_samples[5:]

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def _note(self, r: Response, keep: bool, body: bytes) -> None:
        if r.status == 200:
            self.ok += 1
            self.lat.append(r.t_end - r.t_start)
            if r.record_id:
                self.record_ids.append(r.record_id)
            else:
                self.no_record_id += 1
        else:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append("HTTP %d %s" % (r.status, bytes(r.body or b"")[:200]))
        if keep:
            self.exchanges.append((body, r))

    def _fail(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(repr(exc))


async def _closed_loop(host, port, reqs, concurrency, duration, max_requests, keep):
    """reqs: list of (raw request, body); each connection cycles through them."""
    tally = Tally()
    deadline = time.monotonic() + duration
    budget = [max_requests if max_requests else 1 << 60]

    async def worker(k: int) -> None:
        conn = None
        i = k
        failures = 0
        while budget[0] > 0 and time.monotonic() < deadline and failures < 50:
            budget[0] -= 1
            raw, body = reqs[i % len(reqs)]
            i += 1
            try:
                if conn is None or conn.closed:
                    conn = await connect(host, port)
                r = await conn.request(raw, keep_body=keep, keep_headers=keep)
            except (OSError, ConnError) as exc:
                tally._fail(exc)
                failures += 1
                conn = None
                continue
            tally._note(r, keep, body)
        if conn is not None and not conn.closed:
            conn.transport.close()

    t0 = time.monotonic()
    await asyncio.gather(*[worker(k) for k in range(concurrency)])
    tally.elapsed = time.monotonic() - t0
    tally.round_rps.append(tally.rps)
    return tally


async def _open_loop(host, port, reqs, rate, duration):
    tally = Tally()
    n = max(1, int(rate * duration))
    idle = []
    for _ in range(4):
        idle.append(await connect(host, port))
    pending = set()

    async def wait(conn, fut, body):
        try:
            r = await fut
        except (OSError, ConnError) as exc:
            tally._fail(exc)
            return
        tally._note(r, False, body)
        if not conn.closed:
            idle.append(conn)

    async def fresh(raw, body, intended):
        try:
            conn = await connect(host, port)
            r = await conn.request(raw, t_start=intended)
        except (OSError, ConnError) as exc:
            tally._fail(exc)
            return
        tally._note(r, False, body)
        if not conn.closed:
            idle.append(conn)

    t0 = time.monotonic() + 0.01
    for i in range(n):
        intended = t0 + i / rate
        delay = intended - time.monotonic()
        if delay > 0.004:
            await asyncio.sleep(delay - 0.003)
        # Spin the last ~3 ms: the event loop's timers are millisecond-grained and
        # a late wake-up would count against whichever target happens to be measured.
        while time.monotonic() < intended:
            pass
        raw, body = reqs[i % len(reqs)]
        conn = None
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
            conn = None
        if conn is not None:
            # Send now, inline: no event-loop turn between the intended time and the write.
            task = asyncio.ensure_future(wait(conn, conn.request(raw, t_start=intended), body))
        else:
            task = asyncio.ensure_future(fresh(raw, body, intended))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(list(pending), timeout=30)
    tally.elapsed = time.monotonic() - t0
    for c in idle:
        c.transport.close()
    return tally


async def _open_loop_multi(targets, rate, duration, spin=0.0005):
    """Open loop at ``rate`` per target, all targets at once, phase-shifted.

    Target k's request i is intended at t0 + i / rate + k / (rate * len(targets)): every
    target sees the same fixed rate with idle gaps, and whatever else the machine does in
    the meantime hits all of them alike (interleaving per request, not per segment).
    targets: list of (host, port, reqs).  Returns one Tally per target.
    """
    m = len(targets)
    tallies = [Tally() for _ in targets]
    idle = [[] for _ in targets]
    for k, (host, port, _) in enumerate(targets):
        for _ in range(2):
            idle[k].append(await connect(host, port))
    pending = set()

    async def wait(k, conn, fut, body):
        try:
            r = await fut
        except (OSError, ConnError) as exc:
            tallies[k]._fail(exc)
            return
        tallies[k]._note(r, False, body)
        if not conn.closed:
            idle[k].append(conn)

    async def fresh(k, raw, body, intended):
        host, port, _ = targets[k]
        try:
            conn = await connect(host, port)
            r = await conn.request(raw, t_start=intended)
        except (OSError, ConnError) as exc:
            tallies[k]._fail(exc)
            return
        tallies[k]._note(r, False, body)
        if not conn.closed:
            idle[k].append(conn)

    n = max(1, int(rate * duration))
    t0 = time.monotonic() + 0.01
    for j in range(n * m):
        i, k = divmod(j, m)
        intended = t0 + i / rate + k / (rate * m)
        delay = intended - time.monotonic()
        if delay > spin + 0.001:
            await asyncio.sleep(delay - spin - 0.001)
        # A short spin: the event loop's timers are millisecond-grained; a longer one would
        # take CPU from the targets.  Lateness left over is the same for every target.
        while time.monotonic() < intended:
            pass
        reqs = targets[k][2]
        raw, body = reqs[i % len(reqs)]
        conn = None
        while idle[k]:
            conn = idle[k].pop()
            if not conn.closed:
                break
            conn = None
        if conn is not None:
            task = asyncio.ensure_future(wait(k, conn, conn.request(raw, t_start=intended), body))
        else:
            task = asyncio.ensure_future(fresh(k, raw, body, intended))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(list(pending), timeout=30)
    elapsed = time.monotonic() - t0
    for k in range(m):
        tallies[k].elapsed = elapsed
        for c in idle[k]:
            c.transport.close()
    return tallies


async def _streams(host, port, raw, body, n, chunks, timeout, ramp, connect_limit=256):
    """Stream k starts at t0 + k * ramp / n: frames then arrive evenly spread, so that
    a burst of simultaneous frames does not queue in this client and blur the delays."""
    tally = Tally()
    sem = asyncio.Semaphore(connect_limit)
    open_now = [0]
    t0 = time.monotonic()

    async def one(k: int) -> None:
        delay = t0 + k * ramp / n - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with sem:
                conn = await connect(host, port)
            t_start = time.monotonic()
            fut = conn.request(raw, frames=True)
            open_now[0] += 1
            tally.max_open = max(tally.max_open, open_now[0])
            try:
                r = await asyncio.wait_for(fut, timeout)
            finally:
                open_now[0] -= 1
                conn.transport.close()
        except (OSError, ConnError, asyncio.TimeoutError) as exc:
            tally._fail(exc)
            tally.streams_lost += 1
            return
        tally._note(r, False, body)
        if r.status != 200:
            tally.streams_lost += 1
            return
        seqs = [f[0] for f in r.frames]
        expected = list(range(chunks))
        if seqs != expected:
            tally.frames_lost += len(set(expected) - set(seqs))
            tally.frames_reordered += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        if r.frames:
            tally.ttft.append(r.frames[0][2] - t_start)
            tally.frame_delay.extend(recv - sent for _, sent, recv in r.frames)
        tally.streams_ok += 1

    await asyncio.gather(*[one(k) for k in range(n)])
    tally.elapsed = time.monotonic() - t0
    return tally


def _run(coro) -> Tally:
    # No cyclic GC while measuring: a full collection over thousands of live streams pauses
    # this client for tens of milliseconds, which would show up as the target's delay.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return asyncio.run(coro)
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def closed_loop(host, port, reqs, concurrency, duration, max_requests=0, keep=False) -> Tally:
    return _run(_closed_loop(host, port, reqs, concurrency, duration, max_requests, keep))


def open_loop(host, port, reqs, rate, duration) -> Tally:
    return _run(_open_loop(host, port, reqs, rate, duration))


def open_loop_multi(targets, rate, duration) -> list:
    return _run(_open_loop_multi(targets, rate, duration))


def streams(host, port, raw, body, n, chunks, timeout, ramp=0.0) -> Tally:
    return _run(_streams(host, port, raw, body, n, chunks, timeout, ramp))


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]
