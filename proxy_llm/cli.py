"""Command line: serve (the default), export, stats, verify.

``main(argv) -> int``; exit codes: 0 ok, 1 runtime failure (e.g. the port is taken), 2 bad
usage or configuration (one line on stderr, no traceback, before anything listens).

Shutdown order (SIGTERM, SIGINT, or SIGHUP unless it was ignored at start): stop accepting; let
exchanges in flight finish for up to ``shutdown_timeout`` seconds; cut what is left (each
records itself as ``shutdown``); take no new exchange (a request on a kept-alive connection is
no longer answered) and let the last refusals end; drain the recorder; sync and close the
files; exit 0. A second signal skips the wait: exchanges are cut at once and the recorder gets
a short best-effort flush (``RECORDER_HURRIED`` seconds), also when it comes while the recorder
is already closing.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import __version__
from .config import LOG_LEVELS, Config, ConfigError, data_dir_error, load, parse_listen

log = logging.getLogger("proxy_llm")

SUBCOMMANDS = ("export", "stats", "verify")
INTERNAL_ERROR = 3  # the exit status of a subcommand that failed on a bug
CONFIG_DEFAULT = "config.json"
# Seconds the recorder gets to drain and close at shutdown, and what is left of them after a
# second stop signal, also one that comes while it closes (see storage.Recorder.close).
RECORDER_CLOSE = 30.0
RECORDER_HURRIED = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy_llm",
        description="A recording proxy for LLM APIs. Serves by default; subcommands: "
                    "export, stats, verify (see 'proxy_llm <command> --help').",
    )
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file (default: ./config.json; $PROXY_LLM_CONFIG)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (port 0 picks a free port)")
    parser.add_argument("--data-dir", metavar="DIR", help="where records are written")
    parser.add_argument("--log-level", metavar="LEVEL", help=", ".join(LOG_LEVELS))
    parser.add_argument("--workers", metavar="N", type=int, help="worker processes sharing the port (default 1)")
    parser.add_argument("--version", action="version", version="proxy_llm " + __version__)
    return parser


def config_path(args: argparse.Namespace) -> str:
    """The config file to read; ``--config ''`` and ``--data-dir ''`` (an unset variable in a
    script?) are errors, not a quiet fall back to the default file or the configured dir."""
    for flag, value in (("--config", args.config), ("--data-dir", getattr(args, "data_dir", None))):
        if value == "":
            raise ConfigError("%s: an empty path" % flag)
    return args.config or os.environ.get("PROXY_LLM_CONFIG") or CONFIG_DEFAULT


def load_config(args: argparse.Namespace) -> Config:
    path = config_path(args)
    overrides = {"listen": args.listen, "log_level": args.log_level, "workers": args.workers,
                 "data_dir": os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else None}
    return load(path, overrides=overrides)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print("proxy_llm: %s" % exc, file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if config.workers > 1:
        return serve_workers(config)
    return serve(config)


def subcommand_parser(name: str) -> Tuple[Any, argparse.ArgumentParser]:
    """The module of subcommand ``name`` and its argument parser."""
    import importlib

    module = importlib.import_module("proxy_llm." + name)
    parser = argparse.ArgumentParser(prog="proxy_llm " + name)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file whose data_dir is the default --data-dir (default: ./config.json; "
                             "$PROXY_LLM_CONFIG)")
    module.add_arguments(parser)
    return module, parser


def run_subcommand(name: str, argv: List[str]) -> int:
    module, parser = subcommand_parser(name)
    args = parser.parse_args(argv)
    # Without a config file, $PROXY_LLM_DATA_DIR still overrides the default, as load() has it
    # override a file's data_dir.
    default_dir = os.path.expanduser(os.environ.get("PROXY_LLM_DATA_DIR") or "./data")
    try:
        path = config_path(args)
    except ConfigError as exc:
        print("proxy_llm: %s" % exc, file=sys.stderr)
        return 2
    if getattr(args, "data_dir", None):
        args.data_dir = os.path.expanduser(args.data_dir)  # (no shell expands "--data-dir=~/x")
    if os.path.exists(path) or args.config or os.environ.get("PROXY_LLM_CONFIG"):  # (a file named: it must be there)
        try:
            default_dir = load(path).data_dir
        except ConfigError as exc:
            if getattr(args, "data_dir", None) is None:
                print("proxy_llm: %s" % exc, file=sys.stderr)
                return 2
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not UTF-8, or a field holding a lone surrogate, is printed escaped
        # rather than stopping the command half-way.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        return int(module.run(args, default_dir))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # a bug: not to be read as an exit status of the command (verify's 1, problems)
        traceback.print_exc()
        sys.stderr.write("proxy_llm %s failed: this is a bug in proxy_llm (exit status %d)\n" % (name, INTERNAL_ERROR))
        return INTERNAL_ERROR


KEY_FILE = ".proxy_llm_key"
KEY_SIZE = 32


def prepare_data_dir(data_dir: str) -> bytes:
    """Make the data dir (0700) if needed and return its fingerprint key. Raises OSError or
    ValueError (a NUL in the name) when the dir cannot be used: also when a file cannot be
    made in it (no permission, a read-only file system), which the key, once stored, never
    showed (the proxy served, every record lost, ``fail_closed`` too). A full disk is no
    reason not to start: an empty file is made, and recording resumes when space returns."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".proxy_llm_probe.", dir=data_dir)  # (a name of its own: none left blocks)
    os.close(fd)
    os.unlink(probe)
    return fingerprint_key(data_dir)


def fingerprint_key(data_dir: str) -> bytes:
    """The per-data-dir key of the redaction fingerprints: ``KEY_SIZE`` random bytes in
    ``KEY_FILE`` (0600), made once.

    It is written whole to a temporary file, synced, then linked into place, so no process ever
    reads it half-written (workers starting together, or a crash between creating the file and
    writing it, once left an empty key: every fingerprint an HMAC with an empty key, and the
    workers' fingerprints different). When two processes make it at once, the one linked first
    is the key of both. A file shorter than the key (damaged) is replaced, with a warning:
    fingerprints change from then on. Raises OSError when the data dir cannot be used; when
    only the key cannot be stored, fingerprints change per run (a warning says so).
    """
    path = os.path.join(data_dir, KEY_FILE)
    for _ in range(5):
        try:
            with open(path, "rb") as f:
                key = f.read()
        except FileNotFoundError:
            key = None
        if key is not None and len(key) >= KEY_SIZE:
            return key
        damaged = key is not None
        if damaged:
            log.warning("the fingerprint key in the data dir is damaged (%d bytes); making a new one: "
                        "fingerprints differ from those of earlier records", len(key))
        key = os.urandom(KEY_SIZE)
        try:
            if _store_key(data_dir, path, key, replace=damaged) and not damaged:
                return key  # linked: it was not there, and a key in place is never replaced
            # Another process linked its key first, or this one replaced a damaged file (and
            # another may have too): read what is there now.
        except OSError as exc:
            log.warning("cannot store the fingerprint key in the data dir (%s); fingerprints change per run",
                        exc.strerror or exc)
            return key
    raise OSError("the fingerprint key file keeps changing")


def _store_key(data_dir: str, path: str, key: bytes, replace: bool) -> bool:
    """Put ``key`` at ``path`` whole; False if another process put its own there first."""
    fd, tmp = tempfile.mkstemp(prefix=KEY_FILE + ".", suffix=".tmp", dir=data_dir)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the key exists: never two keys
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: the next best
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def build_server(config: Config, worker: int = 0, reuse_port: bool = False, key: Optional[bytes] = None):
    """Create the recorder and the server (listening, not yet serving). ``key``: the
    fingerprint key (the workers' parent made it), else it is read or made here."""
    from . import headers
    from .handler import ProxyHandler, ReserveHandler
    from .record import Encoder, captured_bytes
    from .server import ProxyServer, held_secrets
    from .storage import ASSIST_SHARE, Recorder

    headers.install()  # the same header blocks, parsed faster (see proxy_llm/headers.py)
    recorder = tally = None
    server_box = []

    def on_result(ex, ended, tokens_used):
        server_box[0].metrics.recorded(ended, ex.provider.name if ex.provider is not None else "none",
                                       ex.model_label, tokens_used)

    if config.record:
        try:
            key = prepare_data_dir(config.data_dir) if key is None else key
        except (OSError, ValueError) as exc:  # a file in the way, no permission, a NUL in the name
            raise data_dir_error(config, getattr(exc, "strerror", None) or str(exc)) from None
        encoder = Encoder(key, config.session_header, config.max_sse_event,
                          provider_keys=held_secrets(config), on_result=on_result)
        recorder = Recorder(config.data_dir, encoder.encode, queue_size=config.queue_size,
                            queue_max_bytes=config.queue_max_bytes, size_of=captured_bytes, fsync=config.fsync,
                            fsync_interval=config.fsync_interval, max_file_size=config.max_file_size,
                            rotate_daily=config.rotate_daily, compress_rotated=config.compress_rotated,
                            file_suffix="_w%d" % worker if config.workers > 1 else "",
                            share=(worker, config.workers),
                            assist_above=max(1, config.queue_size // ASSIST_SHARE))
    else:
        # Recording off still counts: how each exchange ended and the tokens its answer reports,
        # read off the request threads as a record's are (the answer kept in memory until then,
        # up to capture_max_body), and nothing written.
        encoder = Encoder(os.urandom(32), config.session_header, config.max_sse_event,
                          provider_keys=held_secrets(config), on_result=on_result)
        tally = Recorder(None, encoder.count, queue_size=config.queue_size, queue_max_bytes=config.queue_max_bytes,
                         size_of=captured_bytes, fsync="never",
                         assist_above=max(1, config.queue_size // ASSIST_SHARE))
    server = ProxyServer(config, ProxyHandler, recorder, reuse_port=reuse_port, worker=worker,
                         reserve_handler_class=ReserveHandler,
                         uploads=encoder.uploads if recorder is not None else None, tally=tally)
    server_box.append(server)
    (recorder or tally).start()
    return server


def stop_signals() -> Tuple[int, ...]:
    """The signals that stop the proxy: SIGTERM, SIGINT and SIGHUP.

    SIGHUP is what a closing terminal or a dropped ssh session sends: its default action killed
    the process with no drain (the exchanges in flight unrecorded, the records queued lost, the
    files not synced). It is one only when it was not ignored at start: ``nohup`` (and a
    daemon's launcher) start a process with SIGHUP ignored so that it outlives its terminal,
    and the proxy goes on ignoring it then."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None or signal.getsignal(hup) == signal.SIG_IGN:
        return (signal.SIGTERM, signal.SIGINT)
    return (signal.SIGTERM, signal.SIGINT, hup)


def stop_count(signums: List[int]) -> int:
    """How many stops the signals ``signums`` ask for (1 "drain", 2 "hurry"): one per SIGTERM or
    SIGINT; SIGHUPs are one stop in all, the first, and never the second. A closing terminal
    sends SIGHUP twice (the shell passes its own on to its jobs, then the kernel signals the
    foreground group as the shell exits): one request to stop, which must not skip the drain.
    A SIGTERM or SIGINT after a SIGHUP is a second stop (an ssh session dropped, then the
    operator's ``kill``: until 2026-12-07 the SIGHUP then counted for nothing)."""
    hup = getattr(signal, "SIGHUP", None)
    others = 0
    for signum in signums:
        if signum != hup:
            others += 1
    return others + (1 if signums and signums[0] == hup else 0)


class _Stops:
    """How many times the process was told to stop: 1 is "drain", 2 is "hurry" (see
    :func:`stop_count`). Lock-free (a signal handler only appends to ``received``).

    A worker of ``--workers`` is told by its own signals and by the parent, which writes a byte
    down the worker's pipe for every signal it gets (and closes it by dying). The larger count
    wins: a terminal's Ctrl-C, and systemd stopping a control group, signal every process of the
    group at once, so a worker gets the signal itself and from the parent, and the two are one
    request to stop, not two.
    """

    def __init__(self, pipe: Optional[int] = None):
        self.received: List[int] = []
        self.pipe = pipe
        self.piped = 0

    def count(self) -> int:
        if self.pipe is not None:
            try:
                data = os.read(self.pipe, 64)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:
                # An end of input: the parent is gone; stop (once) rather than serve unwatched.
                self.piped += len(data) if data else max(0, 1 - self.piped)
                if not data:
                    os.close(self.pipe)
                    self.pipe = None
        return max(stop_count(self.received), self.piped)


class _StopView:
    """``is_set()`` once :class:`_Stops` counts ``n`` (an Event-like view)."""

    def __init__(self, stops: _Stops, n: int):
        self.stops = stops
        self.n = n

    def is_set(self) -> bool:
        return self.stops.count() >= self.n


def serve(config: Config, worker: int = 0, reuse_port: bool = False, parent_pipe: Optional[int] = None,
          on_ready: Optional[Callable[[], None]] = None, key: Optional[bytes] = None,
          signals: Optional[Tuple[int, ...]] = None) -> int:
    """Serve until told to stop, then stop in order (see the module's docstring). ``signals``:
    the stop signals (a worker's, which its parent chose: see :func:`stop_signals`)."""
    stops = _Stops(parent_pipe)
    received = stops.received
    stop = _StopView(stops, 1)
    hurry = _StopView(stops, 2)

    def on_signal(signum, frame):
        # No lock may be taken here (so no Event.set()): a second signal can run this handler
        # again inside the first call, and Event.set() re-entered on its own non-reentrant lock
        # deadlocks the process (seen with SIGTERM then SIGINT in quick succession).
        received.append(signum)

    # Before the server and its recorder are built: a stop that comes while they start is
    # counted, and they are stopped in order once started. (It killed the process with the
    # writer and the compressor at work, or raised KeyboardInterrupt through the start.)
    for sig in signals if signals is not None else stop_signals():
        signal.signal(sig, on_signal)
    try:
        server = build_server(config, worker, reuse_port, key)
    except ConfigError as exc:
        print("proxy_llm: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    from .server import tune_gc
    from .upstream import authority

    tune_gc()
    log.info("proxy_llm %s listening on http://%s (worker %d, recording %s, data dir %s)", __version__,
             authority(*server.server_address[:2]),
             worker, "on" if server.recorder is not None else "off", config.data_dir)
    if worker == 0:  # (once: the workers' pools are alike)
        for name, pool in server.pools.items():
            if pool.proxy is not None:  # (its name: host and port, never the credentials)
                log.info("provider %s: through the egress proxy %s (%s)", name, pool.proxy.name,
                         "a CONNECT tunnel" if pool.scheme == "https" else "absolute-form requests")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="proxy_llm-accept")
    thread.start()
    if on_ready is not None:
        on_ready()
    while not stop.is_set():
        time.sleep(0.1)  # the handler cannot wake an Event (see on_signal)
    server.draining.set()  # (first: once the line says so, a new request is refused)
    log.info("shutting down: %d exchanges in flight", len(server.inflight))
    server.shutdown()
    thread.join()
    try:
        server.socket.close()
    except OSError:
        pass
    if not server.wait_idle(config.shutdown_timeout, interrupted=hurry):
        cut = server.cancel_inflight()
        log.warning("cut %d exchanges still in flight", cut)
    # Then no exchange begins: one begun while the recorder closes could not be recorded (a
    # request on a kept-alive connection was answered 503 then, and its record dropped). Those
    # begun since the wait (503 refusals) end first, their clients let go of if they hold them
    # up (a client not reading).
    server.stop_taking()
    deadline = time.monotonic() + 2.0
    while not server.wait_idle(0.05) and time.monotonic() < deadline:
        server.cut_waiting_clients()  # a handler that began a wait on its client since
    if server.inflight:  # handlers that did not end in time (see record_unfinished)
        from .handler import record_unfinished

        left = record_unfinished(server)
        if left:
            log.warning("recorded %d exchanges whose handlers did not end in time (connecting to an upstream?) "
                        "as shutdown", left)
    if server.recorder is not None:
        server.recorder.close(timeout=RECORDER_CLOSE, hurry=hurry.is_set, hurry_timeout=RECORDER_HURRIED)
    if server.tally is not None:  # (counts, gone with the process: no long wait for them)
        server.tally.close(timeout=RECORDER_HURRIED)
    server.server_close()
    from . import notices

    notices.RATELOG.flush()  # (the upstreams' last lines held back, if any)
    log.info("stopped")
    return 0


def _probe_port(family: int, host: str, port: int) -> int:
    """Bind ``(host, port)`` as one process serving alone does (``SO_REUSEADDR``, no
    ``SO_REUSEPORT``) and let go at once; the port, 0 resolved. Raises OSError (address in use)
    when something listens there: the workers' own ``SO_REUSEPORT`` sockets would otherwise
    join those of another ``--workers`` proxy of the same user on that port, and the two would
    share its connections without a word."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return probe.getsockname()[1]
    finally:
        probe.close()


def _exit_code(status: int) -> int:
    """os.waitstatus_to_exitcode (Python 3.9): the exit status, or minus the signal that killed
    the process (``status >> 8``, the fall-back once used on 3.8, made a kill -9 an exit 0)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# A worker of --workers that dies while serving is replaced at once; if it died before within
# RESTART_WINDOW seconds, after RESTART_BACKOFF seconds, doubled for each such death; its
# RESTART_LIMIT-th death within the window stops the proxy (exit 1). A worker that crashes soon
# after every start (a bug its first requests trigger, memory the OOM killer takes back at once)
# was replaced in a tight loop for ever, each time losing what it had in flight.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF = 0.5


class _Restarts:
    """The recent deaths of each worker number of ``--workers``, and what they call for."""

    def __init__(self) -> None:
        self.deaths: Dict[int, List[float]] = {}  # worker number -> time.monotonic() of each

    def delay(self, worker: int, now: float) -> Optional[float]:
        """Seconds to wait before replacing ``worker``, which died while serving at ``now``;
        None: it died RESTART_LIMIT times within RESTART_WINDOW, give up."""
        recent = [t for t in self.deaths.get(worker, ()) if now - t < RESTART_WINDOW]
        recent.append(now)
        self.deaths[worker] = recent
        if len(recent) >= RESTART_LIMIT:
            return None
        return 0.0 if len(recent) == 1 else RESTART_BACKOFF * 2 ** (len(recent) - 2)


def serve_workers(config: Config) -> int:
    """Run ``workers`` processes on one port with SO_REUSEPORT (the kernel spreads connections).

    The parent binds the port first (resolving port 0) and holds it without listening, so the
    workers all bind the same port; it forwards the stop signals (SIGTERM, SIGINT, SIGHUP: see
    :func:`stop_signals`) to them and exits 0 when all did.
    A worker that exits before it listens stops the others (exit 1 or 2, as it did); one that
    exits while serving is replaced (exit 1 at the end), after a backoff if it died recently,
    and one that keeps dying stops the others (exit 1; see RESTART_LIMIT).
    """
    host, port = parse_listen(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    if not reuse_port or not hasattr(os, "fork"):
        log.error("--workers %d needs fork() and SO_REUSEPORT, which this system lacks; use --workers 1",
                  config.workers)
        return 2
    key = None
    if config.record:
        try:  # the key made once, here, and handed to every worker: one key for all
            key = prepare_data_dir(config.data_dir)
        except (OSError, ValueError) as exc:  # said once, as one process says it (build_server)
            print("proxy_llm: %s" % data_dir_error(config, getattr(exc, "strerror", None) or str(exc)), file=sys.stderr)
            return 2
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        port = _probe_port(family, host, port)
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    port = holder.getsockname()[1]
    from dataclasses import replace

    from .upstream import authority

    config = replace(config, listen=authority(host, port))
    gc.freeze()  # what the workers inherit is never walked by their collectors
    children = {}  # worker pid -> worker number
    pipes = {}  # worker pid -> the end of its pipe the parent writes a byte to per signal
    ready = set()  # the numbers of the workers that said they listen
    served = set()  # the numbers that have listened once: a replacement's start is no first start
    ready_read, ready_write = os.pipe()  # a worker writes its number there once it listens
    os.set_blocking(ready_read, False)
    stopping = []
    signals = stop_signals()  # (before any is handled: SIGHUP's disposition at start)

    def forward(signum, frame):
        # Down the pipes, not as signals (see _Stops). (os.write of one byte to a pipe with
        # room never blocks; a worker gone leaves a broken pipe, ignored.) One byte per stop
        # counted: a SIGHUP again is none (see stop_count).
        before = stop_count(stopping)
        stopping.append(signum)
        if stop_count(stopping) == before:
            return
        for pid, fd in list(pipes.items()):
            try:
                os.write(fd, b"x")
            except OSError:
                pass

    def start(worker: int) -> None:
        read_end, write_end = os.pipe()
        # No stop signal between the fork and the worker's pipe in ``pipes`` (it would not be
        # passed on to that worker, and the parent would wait for it for ever); the stops that
        # came before (between a worker's death and its replacement) are passed on below.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    # Until serve() counts them: the parent passes every stop on down the pipe.
                    for sig in signals:
                        signal.signal(sig, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                    holder.close()
                    os.close(write_end)
                    os.close(ready_read)
                    for fd in pipes.values():  # the other workers' pipes
                        os.close(fd)
                    os.set_blocking(read_end, False)

                    def listening():
                        os.write(ready_write, bytes([worker]))
                        os.close(ready_write)

                    code = serve(config, worker=worker, reuse_port=reuse_port, parent_pipe=read_end,
                                 on_ready=listening, key=key, signals=signals)
                except Exception:
                    traceback.print_exc()
                finally:
                    logging.shutdown()
                    os._exit(code)
            os.close(read_end)
            ready.discard(worker)
            children[pid] = worker
            pipes[pid] = write_end
            if stopping:  # a stop that came before its pipe was in ``pipes`` (a replacement's)
                os.write(write_end, b"x" * min(stop_count(stopping), 2))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def read_ready() -> None:
        while True:
            try:
                data = os.read(ready_read, 256)
            except BlockingIOError:
                return
            if not data:
                return
            ready.update(data)
            served.update(data)

    for sig in signals:
        signal.signal(sig, forward)
    for worker in range(config.workers):
        start(worker)
    restarts = _Restarts()
    due: Dict[int, float] = {}  # worker number -> time.monotonic() its replacement starts at
    status = 0
    while children or due:
        if stopping:
            due.clear()  # a stop during a backoff: no replacement
        now = time.monotonic()
        for worker in [w for w, t in due.items() if t <= now]:
            del due[worker]
            start(worker)
        if not children and not due:
            break
        pid = 0
        if children:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG if due else 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
        if pid == 0:  # a replacement waits: look again at its time, or 0.1 s on for a stop
            time.sleep(min(0.1, max(0.0, min(due.values()) - time.monotonic())))
            continue
        worker = children.pop(pid, None)
        if worker is None:
            continue
        os.close(pipes.pop(pid))
        exit_code = _exit_code(code)
        if exit_code != 0:
            status = max(status, 1)
        if stopping:
            continue
        read_ready()
        if worker in ready or worker in served:
            # Killed (the OOM killer?) or crashed while serving, or a replacement before it
            # listened (killed again while it imported: the first start of its number proved the
            # port and the data dir): what it wrote stays in its files; a new worker with its
            # number starts new ones.
            delay = restarts.delay(worker, time.monotonic())
            if delay is None:
                log.error("worker %d exited (%s) while serving %d times within %d s; giving up: stopping the other "
                          "workers", worker, exit_code, RESTART_LIMIT, RESTART_WINDOW)
                status = 1
                forward(signal.SIGTERM, None)
            elif delay:
                log.error("worker %d exited (%s) before shutdown; starting a new worker %d in %g s", worker, exit_code,
                          worker, delay)
                due[worker] = time.monotonic() + delay
            else:
                log.error("worker %d exited (%s) before shutdown; starting a new worker %d", worker, exit_code, worker)
                start(worker)
        else:
            # It could not start: neither could another one. Stop the rest and say why.
            log.error("worker %d exited (%s) before it could serve; stopping the other workers", worker, exit_code)
            status = exit_code if exit_code in (1, 2) else 1
            forward(signal.SIGTERM, None)
    os.close(ready_read)
    os.close(ready_write)
    holder.close()
    return status
