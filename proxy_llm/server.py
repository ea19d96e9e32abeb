"""The HTTP server: a ThreadingHTTPServer that is also the proxy's dependency container.

Handlers reach shared state through ``self.server``: the configuration, one upstream pool per
provider, the recorder (None when recording is off), the metrics and the set of exchanges in
flight. A watchdog thread looks at the exchanges in flight every ``WATCH_INTERVAL`` seconds: a
client that went away gets its upstream connection closed then, instead of at the next write,
and so does an exchange whose upstream is silent for longer than its time limit
(``response_header_timeout`` before the response head, ``stream_idle_timeout`` between reads of
the body, ``total_timeout``). It also lets go of client connections past their limits
(``client_header_timeout``, ``client_idle_timeout``; see ``handler.ClientClock``), and of the
idle upstream connections the upstream closed (``UpstreamPool.prune``). Sockets
block, on both sides: a socket timeout would cost a ``poll`` and a GIL hand-off per send and
receive (see ``upstream.connect``), so the limits are kept here, to within ``WATCH_INTERVAL``.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import socket
import socketserver
import struct
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Set, Tuple

try:  # (the bytes a socket has not sent yet: Linux, and most Unix systems)
    import fcntl
    import termios
    _OUTQ = termios.TIOCOUTQ
except (ImportError, AttributeError):
    fcntl = None
    _OUTQ = None

from . import __version__
from .config import Config
from .errors import CONNECTION_LIMIT_ANSWER
from .metrics import ProxyMetrics
from .record import bounded_memo
from .storage import Recorder
from .upstream import EgressProxy, UpstreamPool, abort
from .wire import upload_secret

log = logging.getLogger("proxy_llm.server")

WATCH_INTERVAL = 0.25


def _let_go(clock, how: int) -> None:
    """Mark a client's wait late and shut its socket (``how``), which ends the wait; the
    handler reads why from the clock. Under ``conn_lock``."""
    clock.late = True
    try:
        clock.sock.shutdown(how)
    except OSError:
        pass


def _overdue(clock, now: float) -> bool:
    """Whether ``clock``'s wait is past its ``due`` (and past the time the watchdog gave a
    write to a client still reading it: :func:`_still_reading`)."""
    due = clock.due
    return bool(due) and now > due and not (clock.more_for == due and now <= clock.more_until)


def _unsent(sock) -> Optional[int]:
    """The bytes written to ``sock`` that the peer has not taken yet; None where unknown."""
    if _OUTQ is None:
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):  # (a socket let go of meanwhile)
        return None


def _look(clock, due: float) -> Tuple[Optional[Tuple[float, int]], Optional[int]]:
    """Store ``(due, the socket's unsent bytes)`` as ``clock.probe``, and return the probe it
    replaces and those bytes (None, and nothing stored, where they cannot be known)."""
    unsent = _unsent(clock.sock)
    probe = clock.probe
    if unsent is not None:
        clock.probe = (due, unsent)
    return probe, unsent


def _still_reading(clock, due: float, now: float) -> bool:
    """Whether the client of a write past its ``due`` has taken bytes since the watchdog last
    looked (the socket's unsent bytes went down); if so, the write gets ``idle`` more (half of
    it after a first look), given as ``more_until`` for this write only (``more_for``: its
    ``due``), so that a later wait never inherits it. The kernel wakes a blocked send only once
    much of its buffer is free: a client reading a few KB a second makes no send return for
    longer than client_idle_timeout, though it never stops reading."""
    probe, unsent = _look(clock, due)
    if unsent is None:
        return False
    known = probe is not None and probe[0] == due
    if known and unsent >= probe[1]:
        return False  # nothing taken since the last look
    clock.more_until = now + (clock.idle if known else clock.idle / 2)
    clock.more_for = due
    return True


ACCEPT_WAIT = 0.5  # seconds an accept waits for a connection poll said was there (server_bind)


class ProxyServer(ThreadingHTTPServer):
    # Threads of idle keep-alive clients must not keep the process alive at exit; exchanges in
    # flight are tracked and drained explicitly instead (see cli.serve).
    daemon_threads = True
    block_on_close = False
    # The default backlog of 5 drops connections under bursts.
    request_queue_size = 1024
    allow_reuse_address = True
    # Connections taken past max_connections for /health and /metrics only (handled by
    # ``reserve_handler_class``: one request, then closed; anything else gets the cap's 503).
    # Without them a busy proxy refused its load balancer's or orchestrator's probe like any
    # other connection, and was restarted as dead, losing every exchange in flight. Bounded
    # like the cap: a thread each, under client_header_timeout and client_idle_timeout; past
    # them, the cap's 503 as before.
    health_reserve = 8

    def __init__(self, config: Config, handler_class, recorder: Optional[Recorder] = None,
                 reuse_port: bool = False, worker: int = 0, reserve_handler_class=None, uploads=None,
                 tally: Optional[Recorder] = None):
        host, port = config.host_port
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.reuse_port = reuse_port
        self.config = config
        self.recorder = recorder
        # record: false: a Recorder with no files, whose thread reads each answer for the token
        # metrics (record.Encoder.count); None when recording (the recorder counts them).
        self.tally = tally
        # Where an exchange that ended goes (handler.record_exchange), and the bytes of its
        # (request, response) kept for it: recording off keeps the answer only.
        self.counts = recorder if recorder is not None else tally
        self.capture_limits = (config.capture_max_body if recorder is not None else -1,
                               config.capture_max_body if self.counts is not None else -1)
        # The record.UploadSessions its encoder reads (None: nothing is recorded): the handler
        # gives it the session of each Gemini upload whose URL it hands a client.
        self.uploads = uploads
        # With proxy_keys set, the key of the pass an upload URL the proxy hands out carries
        # (handler.UPLOAD_PASS): from the proxy keys, so that every worker reads the same.
        self.upload_secret = upload_secret(config.proxy_keys) if config.proxy_keys else None
        self.worker = worker
        self.started = time.time()
        self.pools: Dict[str, UpstreamPool] = {
            p.name: UpstreamPool(p.base_url, config.connect_timeout, ca_file=p.ca_file, proxy=p.proxy)
            for p in config.providers
        }
        # A plain lock (cheaper to take than a Condition's) protects inflight, connections,
        # reserved and _idle_waiters; _idle, on the same lock, is notified only when someone waits for it.
        self._state_lock = threading.Lock()
        self._idle = threading.Condition(self._state_lock)
        self._idle_waiters = 0
        self.inflight: Set[object] = set()
        self.connections = 0
        self.reserve_handler_class = reserve_handler_class  # None: no reserve
        self.reserved = 0  # connections on the reserve (see health_reserve)
        self.draining = threading.Event()
        self.taking = True  # exchanges may begin (under _state_lock; see stop_taking)
        # What /health and /metrics both show of the recording, read the same way by each.
        counts = self.counts
        self.readings: Dict[str, Callable[[], int]] = {
            "records_written": lambda: recorder.written_total() if recorder else 0,
            "records_dropped": lambda: recorder.dropped_total() if recorder else 0,
            "stream_lines_dropped": lambda: recorder.stream_dropped_total() if recorder else 0,
            "record_queue_depth": lambda: counts.queue.qsize() if counts else 0,
            "record_queue_bytes": lambda: counts.queue.bytes if counts else 0,
            "token_counts_dropped": lambda: tally.dropped_total() if tally else 0,
        }
        read = self.readings
        self.metrics = ProxyMetrics(
            inflight=lambda: len(self.inflight),
            written=read["records_written"],
            dropped=read["records_dropped"],
            stream_dropped=read["stream_lines_dropped"],
            queue_depth=read["record_queue_depth"],
            queue_bytes=read["record_queue_bytes"],
            uncounted=read["token_counts_dropped"],
            connections=lambda: self.connections,
            reserved=lambda: self.reserved,
            worker=worker,
            pid=os.getpid(),
        )
        self._stop_watch = threading.Event()  # before the bind: a failed bind calls server_close()
        super().__init__((host, port), handler_class)
        # Held while a handler lets go of its upstream connection (before pooling it) and while
        # the watchdog or a shutdown cuts one: a connection already back in the pool, perhaps
        # serving another exchange, is never cut by mistake.
        self.conn_lock = threading.Lock()
        self.clients: Set[object] = set()  # the ClientClock of each connection (under conn_lock)
        self.model_routes = bounded_memo()  # model -> (provider, glob) or no match: the glob walk once per model
        # Kept out of log lines: provider keys, and the egress proxies' passwords (see held_secrets()).
        self.provider_keys: List[str] = held_secrets(config)
        self._watchdog = threading.Thread(target=self._watch, name="proxy_llm-watchdog", daemon=True)
        self._watchdog.start()

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that stalls for
        # 30 s on air-gapped hosts; the name is never used, so bind without it.
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        socketserver.TCPServer.server_bind(self)
        # serve_forever accepts once poll says a connection waits; one that is gone by then
        # (the kernel may drop it from the queue) left accept blocked until the next client
        # came, and shutdown() waiting on it: a stop hung on an idle proxy. With a timeout,
        # such an accept gives up (an OSError socketserver passes over) and the loop goes on.
        # (A timeout, not non-blocking: accept then makes the client's socket blocking on
        # every platform, where some pass O_NONBLOCK on from the listener.)
        self.socket.settimeout(ACCEPT_WAIT)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    # -- connections ---------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        with self._state_lock:
            if self.connections < self.config.max_connections:
                self.connections += 1
                target = self.process_request_thread
            elif self.reserved < self.health_reserve and self.reserve_handler_class is not None:
                self.reserved += 1
                target = self.process_reserve_thread
            else:
                target = None
        if target is None:
            # One thread per connection: past the cap, answer at once instead of queueing.
            self.metrics.refused.inc()
            try:
                request.sendall(CONNECTION_LIMIT_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request, counted=False)
            return
        # ThreadingMixIn.process_request, with a name that says whose thread it is.
        thread = threading.Thread(target=target, args=(request, client_address), name="proxy_llm-conn", daemon=True)
        thread.start()

    def process_reserve_thread(self, request, client_address) -> None:
        """``process_request_thread`` for a connection on the reserve (see health_reserve)."""
        try:
            self.reserve_handler_class(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request, counted=False)
            with self._state_lock:
                self.reserved -= 1

    def shutdown_request(self, request, counted: bool = True) -> None:  # type: ignore[override]
        if counted:
            with self._state_lock:
                self.connections -= 1
        super().shutdown_request(request)

    def watch_client(self, clock) -> None:
        """Keep the time limits of a client connection (see handler.ClientClock)."""
        with self.conn_lock:
            self.clients.add(clock)

    def unwatch_client(self, clock) -> None:
        """The connection is done: from now on its socket may be closed (and its descriptor
        reused), so the watchdog must not touch it."""
        with self.conn_lock:
            self.clients.discard(clock)
            clock.sock = None

    # -- exchanges -----------------------------------------------------------------------

    def track(self, exchange) -> bool:
        """Count an exchange in flight; False, and not counted, once :meth:`stop_taking` ran."""
        with self._state_lock:
            if not self.taking:
                return False
            self.inflight.add(exchange)
            return True

    def stop_taking(self) -> None:
        """No exchange begins from now on (the end of the drain: the recorder is about to
        close, and an exchange begun later could not be recorded). Those tracked before end as
        usual: ``wait_idle`` waits for them."""
        with self._state_lock:
            self.taking = False

    def untrack(self, exchange) -> None:
        with self._state_lock:
            self.inflight.discard(exchange)
            if not self.inflight and self._idle_waiters:
                self._idle.notify_all()

    def wait_idle(self, timeout: float, interrupted: Optional[threading.Event] = None) -> bool:
        """Wait until no exchange is in flight. False on timeout or when ``interrupted`` is set."""
        deadline = time.monotonic() + timeout
        with self._state_lock:
            self._idle_waiters += 1
            try:
                while self.inflight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (interrupted is not None and interrupted.is_set()):
                        return False
                    self._idle.wait(min(remaining, 0.1))
            finally:
                self._idle_waiters -= 1
        return True

    def in_flight(self) -> list:
        """The exchanges in flight now (a copy: handlers add and drop theirs meanwhile)."""
        with self._state_lock:
            return list(self.inflight)

    def cancel_inflight(self) -> int:
        """Cut every exchange in flight; each records itself as ``shutdown``."""
        exchanges = self.in_flight()
        for ex in exchanges:
            ex.cancelled = True
            self.cut_upstream(ex)
        self.cut_waiting_clients()
        return len(exchanges)

    def cut_waiting_clients(self) -> int:
        """Let go of every client a handler is waiting on now (a body that stops coming, a
        client that stops reading, an idle keep-alive connection): cutting the upstream does
        not unblock those, and only client_idle_timeout would. Their reads and writes fail
        from then on, and their exchanges end, recorded. At shutdown only (after
        cancel_inflight, and again while the cut exchanges end: a handler may start a wait
        just after a pass)."""
        n = 0
        with self.conn_lock:
            for clock in self.clients:
                if clock.due and clock.sock is not None and not clock.late:
                    clock.stopped = True  # (what then fails on it is recorded as shutdown)
                    _let_go(clock, socket.SHUT_RDWR)
                    n += 1
        return n

    def cut_upstream(self, ex) -> None:
        """Unblock the handler reading ``ex``'s upstream (it then reads why from ``ex``)."""
        with self.conn_lock:
            abort(ex.upstream_sock)

    def _watch(self) -> None:
        while not self._stop_watch.wait(WATCH_INTERVAL):
            try:
                self.watch_once()
            except Exception:  # the watchdog must outlive any bug in one pass
                log.exception("watchdog pass failed")

    def watch_once(self) -> None:
        """One pass: let go of clients past their time limits; cut the upstream of exchanges
        whose upstream is late or whose client left; apply total_timeout."""
        poll = getattr(select, "poll", None)
        now = time.perf_counter()
        with self.conn_lock:
            clocks = list(self.clients)
        late = [clock for clock in clocks if _overdue(clock, now) and not clock.late]
        if late:
            with self.conn_lock:
                for clock in late:
                    # Again under the lock: the wait seen late may have ended, and another begun.
                    due = clock.due
                    if clock.sock is not None and _overdue(clock, now):
                        if clock.how == socket.SHUT_RDWR and _still_reading(clock, due, now):
                            continue  # a slow reader, not an idle one
                        _let_go(clock, clock.how)
        for clock in clocks:
            # A write half-way to its due: how much is unsent, for _still_reading to compare.
            due = clock.due
            if due and clock.how == socket.SHUT_RDWR and now > due - clock.idle / 2 and (
                    clock.probe is None or clock.probe[0] != due):
                _look(clock, due)
        exchanges = self.in_flight()
        for ex in exchanges:
            deadline = ex.upstream_deadline
            if deadline and now > deadline and not ex.upstream_late:
                ex.upstream_late = True
                self.cut_upstream(ex)
        # The handler clears client_sock when its exchange ends, on its own thread: read it
        # once per exchange, and work on that socket object from here on.
        watched = [(ex, sock) for ex, sock in ((ex, getattr(ex, "client_sock", None)) for ex in exchanges)
                   if sock is not None]
        if watched and poll is not None:
            poller = poll()
            by_fd = {}
            for ex, sock in watched:
                try:
                    fd = sock.fileno()
                except OSError:
                    continue
                if fd < 0:  # closed since
                    continue
                by_fd[fd] = (ex, sock)
                poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            try:
                ready = poller.poll(0)
            except OSError:
                ready = []
            for fd, _events in ready:
                ex, sock = by_fd[fd]
                if _client_gone(sock):
                    ex.client_gone = True
                    self.cut_upstream(ex)
        self._check_total_timeout([ex for ex, _ in watched])
        for pool in self.pools.values():
            pool.prune()

    def _check_total_timeout(self, exchanges) -> None:
        limit = self.config.total_timeout
        if not limit:
            return
        now = time.perf_counter()
        for ex in exchanges:
            if now - ex.t0 > limit and not ex.cancelled:
                ex.timed_out = True
                self.cut_upstream(ex)

    def health(self) -> dict:
        """``/health``. Its recording figures are :attr:`readings`, as /metrics has them: the
        queue's depth and bytes are those of the exchanges waiting for the writer, or, with
        ``record: false``, for their token counts (``self.counts``)."""
        rec = self.recorder
        status = "ok"
        if self.draining.is_set():
            status = "draining"
        elif rec is not None and rec.degraded:
            status = "degraded"
        health = {
            "status": status,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "worker": self.worker,
            "pid": os.getpid(),
            "recording": rec is not None,
        }
        for name, read in self.readings.items():
            health[name] = read()
        health["last_record_error"] = rec.last_error if rec else ""
        health["inflight"] = len(self.inflight)
        health["connections"] = self.connections
        return health

    def server_close(self) -> None:
        self._stop_watch.set()
        super().server_close()
        for pool in self.pools.values():
            pool.close()


FULL_GC_EVERY = 100  # young collections before a full one (the default is 10); see tune_gc


def tune_gc() -> None:
    """Keep the cyclic garbage collector's pauses away from open streams.

    The proxy's objects die by reference counting: under load the collector finds next to no
    garbage, so its cost is pure pause, and a full collection walks every live object with all
    threads stopped. With 2,000 streams open that is ~130,000 objects and ~60 ms during which
    no frame moves (measured on the bench's streams scenario; a young collection is ~1-5 ms).
    So: what exists once the server is built (modules, configuration) is frozen out of every
    collection, and a full collection waits for 100 young ones instead of 10 (the 25 % growth
    rule still applies). Young collections, which find the short-lived cycles, are unchanged.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


def held_secrets(config: Config) -> List[str]:
    """What the proxy itself holds that no file or log line may show: every provider key, and
    of each egress proxy with credentials its password and Basic token (``EgressProxy``:
    sent only to the proxy, so only a proxy or an upstream that echoes them puts them in an
    answer). Scrubbed from records (the encoder's ``provider_keys``) and from log lines."""
    out = [p.api_key for p in config.providers if p.api_key]
    for url in dict.fromkeys(p.proxy for p in config.providers if p.proxy):
        out.extend(s for s in EgressProxy(url).secrets if s not in out)
    return out


def _client_gone(sock: socket.socket) -> bool:
    """True if the peer closed or reset the connection (pipelined bytes are not a close)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True
