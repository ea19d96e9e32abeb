"""The recorder: a bounded queue, one writer thread, append-only JSONL files.

Shape (after ``logging.handlers.QueueListener``): request threads call :meth:`Recorder.submit`,
which only does ``put_nowait`` and never blocks or raises; a full queue drops the item and counts
it. One writer thread takes items off the queue in batches, turns each into lines with the
``encode`` callable it was given (all JSON work happens there, off the request threads, unless
the writer falls behind by ``assist_above`` records: then the submitting thread encodes its own
item, see ``Recorder.submit``), groups the lines per file and appends each group with one system
call (group commit: small lines joined, big ones handed to ``os.writev`` as they are, see
``_write_lines``). Only the writer thread touches the disk.

Durability contract (also in the README):

* A record is queued when its exchange ends (after the client has the whole response) and
  reaches the OS (the page cache) when the writer thread writes its batch: normally within
  milliseconds, later when the writer falls behind (a slow disk, many new files); the queue depth
  is in ``/health`` and ``/metrics``. A process crash (``kill -9``) loses what is still queued and
  nothing that was written (``records_written`` counts written records only).
* It reaches the disk at the next fsync: after every batch with ``fsync: always``, at most
  ``fsync_interval`` seconds later with ``fsync: interval`` (the default), or when the OS decides
  with ``fsync: never``. Power loss can lose what was not yet synced.
* A new file's directory, a new session directory's entry in the data dir, and a sealed
  (rotated) file, are synced with the next sync (one commit for every rotation since the last
  sync, see ``_seal``; each directory once for every entry made in it, see ``_directory``; after
  the batch with ``fsync: never``); files are synced when closed, and at shutdown.
* A write that fails half-way is cut back (``ftruncate``) to the last whole line, so a file
  holds whole lines, except at most one torn last line after a crash in the middle of a write.
* Every start opens new files (``O_EXCL``); a name that exists gets a ``-N`` suffix (see
  ``_create``).

Files are created 0600 in directories created 0700. A record that cannot be written (disk full,
read-only, permission) is counted in ``dropped`` and the recorder reports ``degraded`` until a
write succeeds again; it retries on every batch and probes while idle. If a failed write cannot
be cut back, that file is abandoned (a later write starts a new file) so a torn fragment is never
followed by more lines.

Every file-system call goes through a :class:`FileOps` object (``os`` by default), the one
boundary where tests count writes and syncs and inject faults.

This module imports nothing from the package.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import queue
import re
import threading
import time
import zlib
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # (not POSIX: no advisory locks, see compress_file)
    fcntl = None  # type: ignore

log = logging.getLogger("proxy_llm.storage")

RECORDS = "records"
STREAMS = "streams"

# encode(item) -> [(kind, session_file_id, line_bytes_with_newline), ...]
Encoder = Callable[[object], List[Tuple[str, str, bytes]]]

_STOP = object()
MAX_OPEN_FILES = 128   # record and streams files kept open at most (the least recently written closed first)
# Files remembered at most, open or closed: a session that comes back appends to its file.
# Past it the least recently written one is forgotten (closed if open) and that session, if it
# comes back, starts a new file, as after a rotation. A proxy in front of agents sees a new
# session id for every task; remembering all of them made the table, and the writer's walks
# over it (every sync, every file opened), grow for as long as the proxy ran.
MAX_KNOWN_FILES = 4096
BATCH_MAX = 512
GATHER_WINDOW = 0.002  # seconds the writer waits after a lone record for others to join it
GATHER_BELOW = 16      # ...unless this many are queued already
GATHER_MORE = 32       # under load, it waits on for this many (see Recorder._gather)...
GATHER_MAX = 0.010     # ...for this long at most (seconds)
GATHER_BYTES = 256 * 1024  # ...and not once the queued records hold this many body bytes
SEALED_MAX = 32        # sealed files (open descriptors) waiting for the next sync at most
NAME_TRIES = 10000     # names tried past the one expected free before a file cannot be created
PACE_SLICE = 0.001     # seconds of encoding after which the writer rests as long (see _encode_all)
JOIN_MAX = 64 * 1024   # bytes: lines are joined into one piece up to this size (see _write_lines)
try:
    IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))  # buffers per writev
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16
CATCH_UP_BELOW = BATCH_MAX  # queued records past which the writer stops resting...
CATCH_UP_SLICE = 0.004      # ...and offers the GIL only after this long (the default switch interval is 5 ms)
ASSIST_SHARE = 4  # past queue_size // ASSIST_SHARE queued records, request threads encode their own (see submit)
# The file-name form of a session id: the one rule, which the encoder (record.session_file_id)
# and the reader (reader.session_file_id) use too. The recorder applies it again to every line
# it is given, so that no encoder can make it write outside the data dir.
_SAFE_SID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
# The names Recorder._create gives its files, and the only ones the readers take (a file a user
# put in a session directory is not records): <stem>[-N][_w<K>].jsonl, gzip'd <name>.gz, where
# the stem is session_<sid>_<YYYYMMDD_HHMMSS> for a record file (in session_<sid>/) and
# session_<sid>_<YYYYMMDD> for a streams file (in streams/); <sid> as safe_sid makes it, -N
# (N >= 1) when the name was taken, _w<K> for worker K of --workers (cli.build_server).
_NAME_END = r"(?:-[1-9][0-9]*)?(?:_w(?:0|[1-9][0-9]*))?\.jsonl(?:\.gz)?\Z"
_RECORD_NAME = re.compile(r"session_([A-Za-z0-9._-]{1,64})_[0-9]{8}_[0-9]{6}" + _NAME_END)
_STREAM_NAME = re.compile(r"session_([A-Za-z0-9._-]{1,64})_[0-9]{8}" + _NAME_END)
_WORKER_OF = re.compile(r"_w(0|[1-9][0-9]*)\.jsonl\Z")  # the _w<K> of a plain file's name
# Bytes gzip'd between two looks at the stop flag (see _compress_locked), read into one buffer per
# file: 1 MiB reads, a new bytes object each, fragmented the C heap alongside the request threads
# (RSS rose ~2-3 MB a minute for as long as files were compressed; a soak audit's finding).
COPY_CHUNK = 64 * 1024
STOP_GRACE = 2.0  # seconds close waits for the writer or the compressor past its deadline (one chunk, a fsync)
HURRY_POLL = 0.05  # seconds between two looks at close's ``hurry`` (a second stop signal) while it waits


class FileOps:
    """The recorder's file-system calls; the default is the ``os`` module's."""

    open = staticmethod(os.open)
    write = staticmethod(os.write)
    # One system call for several buffers (POSIX); None where the os module has none.
    writev = staticmethod(os.writev) if hasattr(os, "writev") else None
    fsync = staticmethod(os.fsync)
    ftruncate = staticmethod(os.ftruncate)
    close = staticmethod(os.close)
    makedirs = staticmethod(os.makedirs)


def safe_sid(sid: str) -> str:
    """``sid`` if it is a safe file-name part (``[A-Za-z0-9._-]{1,64}``, not ``.`` or ``..``),
    else ``h`` + 16 hex chars of its SHA-256."""
    if isinstance(sid, str) and _SAFE_SID.match(sid) and sid not in (".", ".."):
        return sid
    raw = sid.encode("utf-8", "surrogatepass") if isinstance(sid, str) else repr(sid).encode()
    return "h" + hashlib.sha256(raw).hexdigest()[:16]


def is_record_file_name(name: str) -> bool:
    """Whether ``name`` is a name the recorder gives a record file (plain or gzip'd)."""
    match = _RECORD_NAME.match(name)
    return match is not None and match.group(1) not in (".", "..")


def is_stream_file_name(name: str) -> bool:
    """Whether ``name`` is a name the recorder gives a file of ``streams/`` (plain or gzip'd)."""
    match = _STREAM_NAME.match(name)
    return match is not None and match.group(1) not in (".", "..")


class _File:
    __slots__ = ("path", "fd", "size", "day", "dirty", "lines", "ident")

    def __init__(self, path: str, fd: int, day: str, ident: Tuple[int, int]):
        self.path = path
        self.fd: Optional[int] = fd
        self.size = 0
        self.day = day
        self.dirty = False
        self.lines = 0
        self.ident = ident  # (device, inode), as _hold found it

    def replaced(self) -> bool:
        """The file is no longer at its path: removed or renamed by hand (to free space, or by
        a log rotator). Lines appended to it, open, would be lost with it; reopened, closed, it
        would be missing."""
        try:
            return _ident(os.stat(self.path)) != self.ident
        except OSError:
            return True


def _ident(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def _fsync_dir(path: str, ops: FileOps = FileOps) -> None:
    try:
        fd = ops.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        ops.fsync(fd)
    except OSError:
        pass
    finally:
        ops.close(fd)


def _write_all(fd: int, data: bytes, ops: FileOps = FileOps) -> None:
    view = memoryview(data)
    while view:
        n = ops.write(fd, view)
        view = view[n:]


class Pieces:
    """A line given as its parts, in order: what the file gets is their bytes one after the
    other (:func:`_write_lines` hands them to ``writev`` as they are). A record with a big
    body (record.Encoder.encode) is not copied into one new bytes object first: at 100 KB
    request bodies that copy, made fresh by the C library and given back after each batch,
    cost some 19 page faults a record. ``len()`` is its size in bytes, as a line's; ``bytes()``
    joins it."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[bytes]):
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def _write_lines(fd: int, lines: List[bytes], ops: FileOps = FileOps) -> None:
    """Write ``lines`` in order, in one ``writev`` where the OS has it: small lines joined into
    pieces of up to ``JOIN_MAX`` bytes, each line of ``JOIN_MAX`` bytes or more as it is, and
    a line given as its parts (:class:`Pieces`) as those parts.

    Joining a batch of big records would copy them into a buffer of megabytes, which the C
    library maps fresh from the kernel and gives back each time: at 100 KB request bodies that
    was some 25 page faults per record. One write per piece instead would hand the GIL over,
    and queue the writer behind every request thread, once per big record.
    """
    pieces: List[bytes] = []
    run: List[bytes] = []
    size = 0
    for line in lines:
        if type(line) is Pieces or len(line) >= JOIN_MAX:
            if run:
                pieces.append(b"".join(run))
                run, size = [], 0
            if type(line) is Pieces:
                pieces.extend(line.parts)
            else:
                pieces.append(line)
        else:
            run.append(line)
            size += len(line)
            if size >= JOIN_MAX:
                pieces.append(b"".join(run))
                run, size = [], 0
    if run:
        pieces.append(b"".join(run))
    writev = ops.writev
    if len(pieces) == 1 or writev is None:
        for piece in pieces:
            _write_all(fd, piece, ops)
        return
    while pieces:
        n = writev(fd, pieces[:IOV_MAX])
        done = 0
        while done < len(pieces) and n >= len(pieces[done]):
            n -= len(pieces[done])
            done += 1
        pieces = pieces[done:]
        if n:  # a short write ended inside this piece
            pieces[0] = memoryview(pieces[0])[n:]


_MORE = " (and %d more in the last %.0f s)"  # RateLimitedLog's count of the lines it held back


class RateLimitedLog:
    """Log at most once per ``interval`` seconds per key; counts what it suppressed.

    The first message of a key is logged at once; the next ones within ``interval`` of the
    last logged are counted, and the next one logged after that says how many: "... (and 41
    more in the last 12 s)", the time since the last line of its key. Suppressed messages are
    not formatted (logging formats only what it emits). ``clock`` (``time.monotonic``) is
    what a test drives instead of sleeping."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: Dict[Hashable, float] = {}
        self._suppressed: Dict[Hashable, int] = {}
        self._held: Dict[Hashable, tuple] = {}  # key -> the last suppressed (level, message, args)
        self._lock = threading.Lock()  # protects _last, _suppressed and _held

    def warning(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def info(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.INFO, key, message, *args)

    def log(self, level: int, key: Hashable, message: str, *args) -> bool:
        """Log ``message % args`` at ``level`` unless ``key`` logged one within ``interval``;
        whether it was logged. (Keys are few: a kind of trouble, or one per provider and kind.)"""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                self._held[key] = (level, message, args)
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
            self._held.pop(key, None)
        if suppressed:
            message += _MORE % (suppressed, now - last)
        self.logger.log(level, message, *args)
        return True

    def flush(self) -> int:
        """Log, for each key whose last lines were held back, the last of them and how many
        there were (at stop: else a trouble that went on until the end, or stopped within
        ``interval`` of its last line, was never told in full). How many lines it logged."""
        now = self.clock()
        with self._lock:
            held = [(key, self._suppressed.pop(key, 0), self._last.get(key, now)) + entry
                    for key, entry in self._held.items()]
            self._held.clear()
        for key, count, last, level, message, args in held:
            if count > 1:  # (this line is one of them)
                message += _MORE % (count - 1, now - last)
            self.logger.log(level, message, *args)
        return len(held)


class RecordQueue:
    """The bounded queue between the request threads and the writer.

    ``queue.SimpleQueue`` is implemented in C: a put and a get cost a tenth of
    ``queue.Queue``'s, whose every call takes Python-level locks and conditions. The bound
    is checked against ``qsize()`` before the put, so threads racing at the limit may pass it
    by one each: it protects memory, it is not a count anyone relies on. Control items
    (flush markers, stop) are never refused.

    With ``maxbytes`` (and ``size_of``, the bytes an item holds), the queue is also bounded in
    bytes: a count of records alone let a burst of large bodies hold gigabytes. The byte count
    is kept under a lock (``+=`` from many threads could lose updates); an item is always
    taken when the queue holds no bytes, so one body larger than the bound is not refused.
    The writer gives the bytes back with :meth:`taken`.
    """

    def __init__(self, maxsize: int, maxbytes: int = 0, size_of: Optional[Callable[[object], int]] = None):
        self.maxsize = maxsize
        self.maxbytes = maxbytes if size_of is not None else 0
        self.size_of = size_of
        self.bytes = 0
        self._lock = threading.Lock()
        self._q: "queue.SimpleQueue[object]" = queue.SimpleQueue()
        self.get = self._q.get
        self.get_nowait = self._q.get_nowait
        self.qsize = self._q.qsize
        self.put = self._q.put  # unbounded: control items only

    def put_nowait(self, item: object) -> None:
        """Queue a record; raises ``queue.Full`` at either bound."""
        if self._q.qsize() >= self.maxsize:
            raise queue.Full
        if self.maxbytes:
            size = item.size if type(item) is _Encoded else self.size_of(item)
            with self._lock:
                if size and self.bytes and self.bytes + size > self.maxbytes:
                    raise queue.Full
                self.bytes += size
        self._q.put(item)

    def put_past_bound(self, item: "_Encoded") -> None:
        """Queue a record already encoded, whatever the bounds (Recorder.submit)."""
        if self.maxbytes:
            with self._lock:
                self.bytes += item.size
        self._q.put(item)

    def taken(self, items: Iterable[object]) -> None:
        """The writer took these records (no control items) off the queue."""
        if self.maxbytes:
            size_of = self.size_of
            size = sum([item.size if type(item) is _Encoded else size_of(item) for item in items])
            with self._lock:
                self.bytes -= size

    def full(self) -> bool:
        return self._q.qsize() >= self.maxsize or (self.maxbytes > 0 and self.bytes >= self.maxbytes)


class Recorder:
    """Writes encoded items to per-session JSONL files from one thread.

    ``submit`` never blocks and never raises. ``close`` is idempotent: it drains what is queued
    (up to ``timeout`` seconds), syncs and closes every file.
    """

    def __init__(self, data_dir: Optional[str], encode: Encoder, queue_size: int = 10000, queue_max_bytes: int = 0,
                 size_of: Optional[Callable[[object], int]] = None, fsync: str = "interval",
                 fsync_interval: float = 1.0, max_file_size: int = 100 * 1024 * 1024, rotate_daily: bool = True,
                 compress_rotated: bool = False, file_suffix: str = "", share: Tuple[int, int] = (0, 1),
                 on_written: Optional[Callable[[object], None]] = None, clock: Callable[[], float] = time.time,
                 ops: Optional[FileOps] = None, assist_above: int = 0):
        self.ops = ops if ops is not None else FileOps()
        # None: no files (record: false's tally, whose encode counts an exchange in the metrics
        # and gives no line): the queue, the writer thread and the drain all the same.
        self.data_dir = os.path.abspath(data_dir) if data_dir is not None else None
        # What its log lines say: a tally's lose no record, and touch no disk.
        self.says = _RECORDER_SAYS if data_dir is not None else _TALLY_SAYS
        self.encode = encode
        self.fsync_mode = fsync
        self.fsync_interval = fsync_interval
        self.max_file_size = max_file_size
        self.rotate_daily = rotate_daily
        self.compress_rotated = compress_rotated
        self.file_suffix = file_suffix
        # (worker K, of N): the files of earlier runs this recorder settles at start (see _owns)
        self.share = share
        self.on_written = on_written
        self.clock = clock
        self._day_start = -1.0  # the UTC day last formatted by _today, and its start
        self._day = ""
        self.queue = RecordQueue(queue_size, queue_max_bytes, size_of)
        # 0: never; else request threads encode their own record past this backlog (see submit).
        self.assist_above = min(assist_above, max(1, queue_size // 2)) if assist_above > 0 else 0
        self.assisted = 0  # records a request thread encoded (a count, for tests and the curious)
        # Records the writer has taken off the queue and not yet encoded: part of its backlog,
        # though no longer in qsize() (see submit and _encode_all). Written by the writer only.
        self._held = 0
        self.catch_up_below = min(CATCH_UP_BELOW, self.assist_above) if self.assist_above else CATCH_UP_BELOW
        # The lock guards every append, rotation and close, and the files table.
        self.lock = threading.Lock()
        # Every file remembered (at most MAX_KNOWN_FILES), and those of them open (at most
        # MAX_OPEN_FILES), each in the order of last use: the first is the least recently written.
        self._files: "OrderedDict[Tuple[str, str], _File]" = OrderedDict()
        self._open: "OrderedDict[Tuple[str, str], _File]" = OrderedDict()
        self._stats_lock = threading.Lock()  # protects written, dropped, degraded
        self.written = 0
        self.dropped: Dict[str, int] = {}
        self.degraded = False
        self.last_error = ""
        self._ratelog = RateLimitedLog(log)
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._hurry: Optional[Callable[[], bool]] = None  # close's (see close)
        self._hurry_timeout = 0.0
        # close's deadline (monotonic), set before _closed: the writer drains until then, and
        # stops between two slices of encoding past it (see _past_drain); a hurry moves it closer.
        self._drain_until = float("inf")
        self._files_closed = False  # (under lock) close has closed every file: nothing more is written
        self._stop_taken = False  # the writer took close's stop marker off the queue
        self._unsynced_since: Optional[float] = None  # when the oldest line not yet synced was written
        self.monotonic = time.monotonic  # the clock of fsync_interval (tests replace it)
        self._compressor: Optional[threading.Thread] = None
        self._next_name: Dict[Tuple[str, str], Tuple[str, int]] = {}  # key -> (stem, next index), see _create
        self._sealed: List[_File] = []  # sealed, not yet synced and closed (see _seal)
        self._new_dirs: set = set()  # directories with entries made since the last sync (see _create, _directory)
        self._dirs: set = set()  # directories this writer made or found (see _directory)
        self._to_compress: "queue.Queue[object]" = queue.Queue()
        # The paths this run's writer created (each added before its file exists), while the
        # compressor sweeps the files of earlier runs (see _sweep); None after the sweep.
        self._own_paths: Optional[set] = set() if compress_rotated else None
        self._stop_at: Optional[float] = None  # the compressor's deadline, set by close
        self.swept: Dict[str, int] = {}  # outcomes of the sweep (settle_file's), by the compressor thread
        self.sweep_done = threading.Event()  # set when the sweep has ended (done, or stopped by close)
        self.busy_clock = time.perf_counter  # how long encoding takes (see _encode_all)
        self.rest = time.sleep
        self.nap = time.sleep  # the waits of _gather (tests replace it)

    # -- request-thread side -------------------------------------------------------------

    def start(self) -> None:
        if self.data_dir is not None:
            self.ops.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=self.says["thread"], daemon=True)
        self._thread.start()
        if self.compress_rotated:
            self._compressor = threading.Thread(target=self._compress_loop, name="proxy_llm-compress", daemon=True)
            self._compressor.start()

    def submit(self, item: object) -> bool:
        """Queue an item for writing. False (and counted) when the queue is full or closed.

        With ``assist_above``, once that many records wait (queued, or taken by the writer and
        not yet encoded), the calling thread encodes its own record before queueing it:
        requests are then arriving faster than the writer encodes, and a queue left to fill
        would drop records. The request's response is already sent; what waits is the next
        request of that connection, by one record's encoding (tens of microseconds for a small
        one), never by the disk: the writer still does every write. The proxy then serves
        requests at the pace it can record them, instead of losing records.
        """
        if self._closed:
            self._count_drop("closed", 1)
            return False
        if (self.assist_above and self.queue.qsize() + self._held >= self.assist_above and not self.degraded
                and not self.queue.full()):  # (a record that will be dropped is not worth encoding)
            item = self._encode_here(item)
            if type(item) is _Encoded:
                # Its ending and tokens are counted (the encoder's on_result): it is queued,
                # though other threads may have filled the queue while it was encoded (by
                # one record each at most, as the queue's bound allows).
                self.queue.put_past_bound(item)
                return True
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            self._count_drop("queue_full", 1)
            q = self.queue
            self._ratelog.warning("queue_full", self.says["full"], q.qsize(), q.bytes, q.maxbytes)
            return False

    def _encode_here(self, item: object) -> object:
        """``item`` encoded on the calling thread (see ``submit``), or as it was if that fails:
        the writer then tries again and counts the failure."""
        try:
            lines = self.encode(item)
        except Exception:
            return item
        with self._stats_lock:
            self.assisted += 1
        return _Encoded(lines)

    def queue_full(self) -> bool:
        return self.queue.full()

    def dropped_total(self) -> int:
        """Records lost (one per exchange); lost stream-file lines are counted apart."""
        return self._dropped(streams=False)

    def stream_dropped_total(self) -> int:
        """Lines of streams/ files lost (their records, written, still say ``stream_events``)."""
        return self._dropped(streams=True)

    def _dropped(self, streams: bool) -> int:
        with self._stats_lock:
            return sum(n for reason, n in self.dropped.items() if reason.startswith("stream_") == streams)

    def written_total(self) -> int:
        with self._stats_lock:
            return self.written

    def _count_drop(self, reason: str, n: int) -> None:
        with self._stats_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        idle_wait = self.fsync_interval if self.fsync_mode == "interval" else 1.0
        stopping = False
        while not stopping:
            wait = idle_wait
            if self.fsync_mode == "interval" and self._unsynced_since is not None:
                # Woken in time to sync the oldest unsynced line within fsync_interval (waiting
                # a whole interval from here made it up to two).
                wait = max(0.0, self._unsynced_since + self.fsync_interval - self.monotonic())
            try:
                first = self.queue.get(timeout=wait)
            except queue.Empty:
                self._idle()
                continue
            # (While it gathers, the record it holds is counted as taken and not yet encoded:
            # close's count of what is left, and submit's of the backlog, include it.)
            self._held = 0 if first is _STOP or isinstance(first, (_Marker, _Encoded)) else 1
            self._gather()
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            markers = [item for item in batch if item is _STOP or isinstance(item, _Marker)]
            if markers:
                stopping = any(item is _STOP for item in markers)
                if stopping:
                    self._stop_taken = True  # (see _left_queued)
                batch = [item for item in batch if item is not _STOP and not isinstance(item, _Marker)]
            try:
                self.queue.taken(batch)
                self._write_batch(batch)
            except Exception:  # a bug here must not stop recording for good
                log.exception("the writer failed on a batch of %d records; they are dropped", len(batch))
                self._count_drop("writer_error", len(batch))
            if self._closed and self._past_drain():
                stopping = True  # (close counts what is still queued as dropped at shutdown)
            for item in markers:
                if isinstance(item, _Marker):
                    with self.lock:
                        self._sync_dirty()
                    item.event.set()
            # Nothing of this batch is kept while the writer waits for the next: these names
            # held the last batch's exchanges, their captured bodies (up to queue_max_bytes),
            # until another record came, which for a proxy left idle after a burst is hours.
            first = batch = markers = item = None
            self._held = 0  # (_encode_all's count ends at 0; this whatever failed before it)

    def _gather(self) -> None:
        """Group commit: the writer, woken by a record, lets others arrive so that one wake-up
        (and one GIL hand-off) serves several, instead of one per record. It waits one
        ``GATHER_WINDOW`` unless ``GATHER_BELOW`` records are queued already; when at least
        two joined in that window (a thousand records a second or more), it waits on, a window
        at a time, until ``GATHER_MORE`` are queued or ``GATHER_MAX`` has passed, or the queued
        records hold ``GATHER_BYTES`` of bodies (a batch of large ones took the writer longer
        per record, its work no longer in the caches: 100 KB bodies, 263 against 243 µs). Each batch
        costs the writer more than its records alone (a wake-up, GIL hand-offs, its work begun
        with the caches cold): under saturation the larger batches took its CPU per record from
        59-63 to 56-57 µs, recording off's reader's from 15-23 to 12-21 (tests/bench/NOTES.md,
        "The eighteenth session: the writer's batches"). A record at a time (a few a second, a flush) waits one window,
        as before; closing waits no more than that."""
        q = self.queue
        queued = q.qsize()
        if queued >= GATHER_BELOW:
            return
        self.nap(GATHER_WINDOW)
        if q.qsize() - queued < 2:
            return
        waited = GATHER_WINDOW
        while waited < GATHER_MAX and q.qsize() < GATHER_MORE and q.bytes < GATHER_BYTES and not self._closed:
            self.nap(GATHER_WINDOW)
            waited += GATHER_WINDOW

    def _idle(self) -> None:
        with self.lock:
            if self.fsync_mode != "never":
                self._sync_dirty()
        if self.degraded:
            self._probe()

    def _encode_all(self, batch: Iterable[object]) -> Dict[Tuple[str, str], List[bytes]]:
        """Encode a batch, grouped per file. The writer shares the interpreter in slices.

        Records are encoded back to back, not with a GIL offer between two of them: under load
        every request thread is waiting for the GIL too, and a writer that queued up behind all
        of them after each record fell further behind the longer the load lasted, until its
        queue was full and records were dropped. After each slice of encoding, the writer:

        * rests as long as it worked when the backlog is small (a burst, such as thousands of
          streams ending together, each record a few hundred microseconds to encode): it takes
          at most half of the interpreter, and a core, and the frames still being relayed keep
          moving; the burst drains a little later;
        * offers the GIL only (``rest(0)``) and works longer slices once the backlog reaches
          ``CATCH_UP_BELOW`` records: the requests are coming faster than it writes, and resting
          would only let the queue fill up. Each slice stays below the interpreter's switch
          interval, which bounds how long a relaying thread waits either way;
        * never rests once the recorder is closing: shutdown drains at full speed, and stops
          at close's deadline (looked at once a slice): the records of the batch not encoded by
          then are counted as dropped at shutdown, as those left in the queue are.
        """
        groups: Dict[Tuple[str, str], List[bytes]] = {}
        clock = self.busy_clock
        rest = self.rest
        backlog = self.queue.qsize
        busy = 0.0
        slice_ = PACE_SLICE
        held = self._held = sum([1 for item in batch if type(item) is not _Encoded])
        catch_up = self.catch_up_below
        for item in batch:
            if type(item) is _Encoded:  # a request thread encoded it (see submit)
                lines = item.lines
            else:
                if busy >= slice_:
                    if not self._closed:
                        if backlog() < catch_up:
                            rest(busy)
                            slice_ = PACE_SLICE
                        else:
                            rest(0)
                            slice_ = CATCH_UP_SLICE
                    elif self._past_drain():  # (close's deadline came: this record and the
                        self._count_drop("shutdown", 1)  # batch's others not encoded yet)
                        slice_ = -1.0
                        continue
                    busy = 0.0
                t = clock()
                try:
                    lines = self.encode(item)
                except Exception:  # a bug in encoding must not kill the writer thread
                    log.exception("could not encode a record; it is dropped")
                    self._count_drop("encode_error", 1)
                    continue
                finally:
                    busy += clock() - t
                    held -= 1
                    self._held = held
            for kind, sid, line in lines:
                groups.setdefault((kind, safe_sid(sid)), []).append(line)
        self._held = 0
        return groups

    def _write_batch(self, batch: List[object]) -> None:
        groups = self._encode_all(batch)
        written = 0
        with self.lock:
            if self._files_closed:  # (a writer late past close's deadline: it would open them again)
                self._count_drop("shutdown", sum(len(lines) for (kind, _), lines in groups.items() if kind == RECORDS))
                groups = {}
            lost = set()  # the sessions whose records of this batch could not be written
            for key, lines in groups.items():
                if key[0] == RECORDS:
                    n = self._append(key, lines)
                    if not n:
                        lost.add(key[1])
                    written += n
                elif key[1] in lost:
                    # Their records are lost (a file's group goes in one write, or none of it
                    # does; its streams group comes after it): a line of events no record
                    # names would be an orphan in streams/.
                    self._count_drop("stream_write_error", len(lines))
                else:
                    self._append(key, lines)
            if self.fsync_mode == "always" or (
                    self.fsync_mode == "interval" and self._unsynced_since is not None
                    and self.monotonic() - self._unsynced_since >= self.fsync_interval):
                self._sync_dirty()
            elif self.fsync_mode == "never" and (self._sealed or self._new_dirs):
                self._settle()
        if written:
            with self._stats_lock:
                self.written += written
        if self.on_written is not None:
            for item in batch:
                try:
                    self.on_written(item)
                except Exception:  # metrics callbacks must not kill the writer
                    log.exception("on_written callback failed")

    def _append(self, key: Tuple[str, str], lines: List[bytes]) -> int:
        """Append lines to the file for key; returns the number of records written."""
        kind = key[0]
        size = sum(map(len, lines))
        try:
            f = self._file_for(key, size)
            before = f.size
            try:
                _write_lines(f.fd, lines, self.ops)
            except OSError:
                # Cut a half-written batch back to the last whole line (a full disk frees
                # enough for ftruncate), then let the outer handler count the loss. If even
                # that fails, abandon the file: appending after a torn fragment would glue
                # the fragment to the next line.
                try:
                    self.ops.ftruncate(f.fd, before)
                except OSError:
                    self._forget(key)
                self._open.pop(key, None)
                self._close_file(f, sync=False)
                raise
            f.size += size
            f.lines += len(lines)
            f.dirty = True
            if self._unsynced_since is None:
                self._unsynced_since = self.monotonic()
        except OSError as exc:
            if kind == RECORDS:
                self._count_drop("write_error", len(lines))
            else:
                self._count_drop("stream_write_error", len(lines))
            with self._stats_lock:
                self.degraded = True
                self.last_error = "%s: %s" % (errno.errorcode.get(exc.errno or 0, "error"), exc.strerror or exc)
            self._ratelog.warning("write_" + kind, "cannot write %s lines to %s: %s", kind, self.data_dir, self.last_error)
            return 0
        if kind != RECORDS:
            return 0
        if self.degraded:  # (records are written again: a streams line says nothing of them)
            with self._stats_lock:
                self.degraded = False
                self.last_error = ""
            self._ratelog.warning("resumed", "recording resumed in %s", self.data_dir)
        return len(lines)

    def _today(self, now: float) -> str:
        """The UTC day of ``now``, YYYYMMDD; formatted again only when ``now`` leaves the day
        last formatted (a Unix day is 86,400 seconds), not for every batch."""
        start = self._day_start
        if not start <= now < start + 86400.0:
            self._day_start = now - now % 86400.0
            self._day = time.strftime("%Y%m%d", time.gmtime(now))
        return self._day

    def _file_for(self, key: Tuple[str, str], incoming: int) -> _File:
        f = self._files.get(key)
        now = self.clock()
        day = self._today(now)
        if f is not None:
            too_big = f.size > 0 and f.size + incoming > self.max_file_size
            new_day = self.rotate_daily and f.day != day
            if too_big or new_day:
                self._seal(key, f)
                f = None
            elif f.replaced():  # open or closed, one stat per file per batch
                log.warning("a record file was removed or renamed; a new one is started")
                self._forget(key)
                self._close_file(f, sync=False)  # (nothing to do for a closed one)
                f = None
            elif f.fd is None:
                if self._reopen(f):
                    self._files.move_to_end(key)
                    self._open[key] = f
                    self._limit_open()
                    return f
                log.warning("a record file closed for the open-files limit was compressed by another process "
                            "sharing the data dir; a new one is started")
                self._forget(key)
                f = None
            else:
                self._files.move_to_end(key)
                self._open.move_to_end(key)
                return f
        kind, sid = key
        if kind == RECORDS:
            directory = os.path.join(self.data_dir, "session_" + sid)
            stem = "session_%s_%s" % (sid, time.strftime("%Y%m%d_%H%M%S", time.gmtime(now)))
        else:
            directory = os.path.join(self.data_dir, "streams")
            stem = "session_%s_%s" % (sid, day)
        made = self._directory(key, directory)
        try:
            fd, path, ident = self._create(key, directory, stem, made)
        except FileNotFoundError:
            if directory not in self._dirs:
                raise
            # Its directory was removed (by hand) since this writer made or found it: again.
            self._dirs.discard(directory)
            made = self._directory(key, directory)
            fd, path, ident = self._create(key, directory, stem, made)
        f = self._files[key] = self._open[key] = _File(path, fd, day, ident)
        self._limit_open()
        return f

    def _directory(self, key: Tuple[str, str], directory: str) -> bool:
        """Make ``directory`` (0700) unless this writer made or found it before; True when it
        made it now, and so knows it empty. Its entry in the data dir is synced with the next
        sync, together with the entry of the file made in it (see :meth:`_settle`).

        With a new session per record (an agent that starts one per task, a client whose
        session header changes every request), every record makes a directory and a file. Each
        looked the directory up first (a stat), ``makedirs`` looked the data dir up again, the
        data dir was synced at once (an open, a journal commit and a close), and the new file's
        name was looked for in the empty directory (three more stats): the data dir is now
        synced once per sync for all of them, and a directory made now is known to be empty.
        A directory known here and removed since (by hand) is made again (see _file_for).
        """
        dirs = self._dirs
        if directory in dirs:
            return False
        try:
            self.ops.makedirs(directory, mode=0o700)
            made = True
        except FileExistsError:
            if not os.path.isdir(directory):
                raise  # (a file in its place: this record cannot be written, and is counted)
            made = False
        if made:
            self._new_dirs.add(os.path.dirname(directory))
            self._next_name.pop(key, None)  # (a new directory: its names start again)
        if len(dirs) >= MAX_KNOWN_FILES:
            dirs.clear()  # (bounded: a directory forgotten costs a makedirs that finds it)
        dirs.add(directory)
        return made

    def _reopen(self, f: _File) -> bool:
        """Open again, locked (see :func:`_hold`), a file closed for the open-files limit. False
        when it is no longer there to be appended to: another process sharing the data dir (a
        second proxy started on it, a worker of another run) compressed it meanwhile, as a file
        nobody held (its lines are in its ``.gz``)."""
        try:
            fd = self.ops.open(f.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        if _hold(fd, f.path) == f.ident:
            f.fd = fd
            return True
        self.ops.close(fd)
        return False

    def _create(self, key: Tuple[str, str], directory: str, stem: str,
                empty: bool = False) -> Tuple[int, str, Tuple[int, int]]:
        """Create the next file of ``stem``: ``<stem>.jsonl``, then ``<stem>-1.jsonl``, ...;
        returns its descriptor, path and (device, inode).

        The index goes on from this key's last file of the same stem, is 0 in a directory made
        ``empty`` just now (nothing to look for), and is otherwise found by :meth:`_first_free`.
        It went through every name from 0 on each rotation: a streams file's stem is a whole
        day's, so the k-th rotation of a day tried k names (a stat and an open each), the writer
        spent most of its time there under a small ``max_file_size`` and fell behind, and past
        9,999 files of a stem no name was left and every line of that file was dropped.

        The new file is locked (shared, see :func:`_hold`) as long as it is open, so that no
        other process's compressor takes it for a file of an earlier run; its path is noted
        before it exists (``_own_paths``) for this run's own compressor.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        last = self._next_name.get(key)
        if empty:
            n = 0
        else:
            n = last[1] if last is not None and last[0] == stem else self._first_free(directory, stem)
        for _ in range(NAME_TRIES):  # (names taken meanwhile by another process, or by hand)
            path = self._name(directory, stem, n)
            n += 1
            if not empty and os.path.lexists(path + ".gz"):
                continue
            empty = False  # (past the first name tried, another process has been there: look)
            own = self._own_paths
            if own is not None:
                own.add(path)
            try:
                fd = self.ops.open(path, flags, 0o600)
            except FileExistsError:
                if own is not None:
                    own.discard(path)
                continue
            ident = _hold(fd, path)
            if ident is None:  # (another process's compressor took it, empty, before the lock)
                self.ops.close(fd)
                continue
            if len(self._next_name) >= MAX_KNOWN_FILES and key not in self._next_name:
                self._next_name.clear()  # (bounded: a key forgotten costs _first_free's few stats)
            self._next_name[key] = (stem, n)
            # Its directory is synced with the next sync (_settle), and the file, written at
            # once, with its lines: syncing it empty here cost a journal commit per rotation.
            self._new_dirs.add(directory)
            if self._unsynced_since is None:
                self._unsynced_since = self.monotonic()
            return fd, path, ident
        raise OSError(errno.EEXIST, "no free file name for %s" % stem)

    def _name(self, directory: str, stem: str, n: int) -> str:
        return os.path.join(directory, "%s%s%s.jsonl" % (stem, "-%d" % n if n else "", self.file_suffix))

    def _first_free(self, directory: str, stem: str) -> int:
        """The index after the last one taken (plain or gzip'd) of ``stem`` in ``directory``, in
        O(log n) stats: the recorder takes them in order, so an earlier run of the same day or
        second left 0..k-1 taken. (Where some were removed by hand, this may land in a gap:
        any free index is correct, O_EXCL makes sure of it.)"""
        def taken(n: int) -> bool:
            path = self._name(directory, stem, n)
            return os.path.lexists(path) or os.path.lexists(path + ".gz")

        if not taken(0):
            return 0
        low, high = 0, 1  # taken, and to be checked
        while taken(high):
            low, high = high, high * 2
        while high - low > 1:  # low taken, high free
            middle = (low + high) // 2
            if taken(middle):
                low = middle
            else:
                high = middle
        return high

    def _limit_open(self) -> None:
        """After a file was opened (it is the last in both tables): close the least recently
        written past MAX_OPEN_FILES, and forget the least recently written past MAX_KNOWN_FILES.
        It walked every file remembered, open or not, each time a file was opened."""
        opened = self._open
        while len(opened) > MAX_OPEN_FILES:
            self._close_file(opened.popitem(last=False)[1], sync=True)
        files = self._files
        while len(files) > MAX_KNOWN_FILES:
            key, f = files.popitem(last=False)
            if opened.pop(key, None) is not None:
                self._close_file(f, sync=True)

    def _close_file(self, f: _File, sync: bool) -> None:
        if f.fd is None:
            return
        try:
            if sync and f.dirty:
                self.ops.fsync(f.fd)
            f.dirty = False
        except OSError:
            pass
        finally:
            try:
                self.ops.close(f.fd)
            except OSError:
                pass
            f.fd = None

    def _forget(self, key: Tuple[str, str]) -> None:
        self._files.pop(key, None)
        self._open.pop(key, None)

    def _seal(self, key: Tuple[str, str], f: _File) -> None:
        """Rotation: a full (or yesterday's) file takes no more lines. It is synced, closed and
        (``compress_rotated``) queued for compression with the next sync (:meth:`_settle`).

        Rotation synced the file and its directory at once, and the new file and its directory
        too: four fsyncs on the writer thread, each a journal commit and a wait for the GIL,
        per rotation. Under a small ``max_file_size`` (64 KiB: a rotation every few hundred
        small records), that was most of the writer's time. Now a sync settles every rotation
        since the last one together: the first fsync commits, the others find little to do.
        """
        self._forget(key)
        self._sealed.append(f)
        if self._unsynced_since is None:
            self._unsynced_since = self.monotonic()
        if len(self._sealed) >= SEALED_MAX:  # (open descriptors: settle now)
            self._settle()

    def _sync_dirty(self) -> None:
        for f in self._open.values():  # (a closed file was synced when it was closed)
            if f.dirty and f.fd is not None:
                try:
                    self.ops.fsync(f.fd)
                except OSError as exc:
                    self._ratelog.warning("fsync", "fsync failed for a record file: %s", exc)
                f.dirty = False
        self._settle()
        self._unsynced_since = None

    def _settle(self) -> None:
        """Sync and close the files sealed since the last sync and queue them for compression;
        sync the directories where files were created since (see :meth:`_seal`, :meth:`_create`).
        Called with every sync, at the end of a batch that rotated with ``fsync: never``, and at
        close."""
        sealed, self._sealed = self._sealed, []
        for f in sealed:
            self._close_file(f, sync=True)
        for directory in sorted(self._new_dirs):
            _fsync_dir(directory, self.ops)
        self._new_dirs.clear()
        if self.compress_rotated:
            for f in sealed:
                self._to_compress.put((f.path, f.ident))

    def _probe(self) -> None:
        """While degraded and idle, check whether the data dir is writable again."""
        # Each worker of --workers its own (its file suffix): two degraded workers probing at
        # once on one name each removed the other's file, and failed on their own unlink.
        path = os.path.join(self.data_dir, ".proxy_llm_probe" + self.file_suffix)
        try:
            fd = self.ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"\0" * 4096, self.ops)
                self.ops.fsync(fd)
            finally:
                self.ops.close(fd)
                os.unlink(path)
        except OSError:
            return
        with self._stats_lock:
            self.degraded = False
            self.last_error = ""
        log.warning("data dir %s is writable again", self.data_dir)

    # -- compression (its own thread: minutes of gzip must not stall the writer) --------

    def _compress_loop(self) -> None:
        """Compress this run's sealed files as they come; in between, while none waits, settle
        the files earlier runs left (see :meth:`_sweep`). Stops at ``close``: the sweep at once,
        the sealed files at the deadline close sets (see :meth:`close`)."""
        todo: Optional[List[str]] = None if self._own_paths is not None else []  # the sweep's files
        swept = self.swept
        while True:
            if self._stop_at is not None or todo == []:
                if todo:
                    todo = []
                    log.info("stopping: files of earlier runs left to compress at the next start")
                if self._own_paths is not None:
                    self._own_paths = None  # (the sweep is over: the writer stops noting its paths)
                    if swept:
                        log.info("files of earlier runs settled: %s",
                                 ", ".join("%s %d" % kv for kv in sorted(swept.items())))
                    self.sweep_done.set()
                item = self._to_compress.get()
            else:
                try:
                    item = self._to_compress.get_nowait()
                except queue.Empty:
                    item = None
            if item is _STOP:
                return
            if item is not None:
                if self._past_stop():
                    return  # (what is left is settled at the next start)
                path, ident = item
                try:
                    if compress_file(path, self.ops, ident, self._past_stop) is None:
                        log.warning("a sealed file was moved or replaced before it was compressed; left as it is")
                except CompressionStopped:
                    return
                except OSError as exc:
                    self._ratelog.warning("compress", "could not compress a sealed file: %s", exc)
            elif todo is None:
                todo = self._sweep()
                todo.reverse()
            else:
                outcome = self._settle_old(todo.pop())
                if outcome:
                    swept[outcome] = swept.get(outcome, 0) + 1

    def _past_stop(self) -> bool:
        stop_at = self._stop_at
        return stop_at is not None and time.monotonic() >= stop_at

    def _closing(self) -> bool:
        return self._stop_at is not None

    def _owns(self, name: str) -> bool:
        """Whether this recorder settles the earlier run's file ``name`` at start: worker K of N
        takes the files of every earlier worker J with J mod N == K (a file without ``_w<J>``
        counts as J = 0), so that with any number of workers, now and then, each file has one
        sweeper. (Any other process may try it too: the locks keep that safe, see settle_file.)"""
        index, count = self.share
        match = _WORKER_OF.search(name)
        return (int(match.group(1)) if match else 0) % max(1, count) == index

    def _sweep(self) -> List[str]:
        """The files earlier runs left in this recorder's share (see :meth:`_owns`): every plain
        ``X.jsonl`` (sealed, or open when its run stopped: none is ever appended to again), and
        the ``X.jsonl`` of each leftover ``X.jsonl.gz.tmp``. Not a file of this run (noted in
        ``_own_paths`` before it is created), nor one that is not named as the recorder names
        its files."""
        if not locks_work(self.data_dir):
            log.warning("no advisory locks in %s: sealed files of earlier runs are not compressed at start, as "
                        "a file another process still writes could not be told apart", self.data_dir)
            return []
        found = set()
        try:
            tops = sorted(os.listdir(self.data_dir))
        except OSError:
            return []
        own = self._own_paths or set()
        for top in tops:
            if top == STREAMS:
                named = is_stream_file_name
            elif top.startswith("session_"):
                named = is_record_file_name
            else:
                continue
            directory = os.path.join(self.data_dir, top)
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if name.endswith(".jsonl.gz.tmp"):
                    name = name[:-len(".gz.tmp")]
                elif not name.endswith(".jsonl"):
                    continue
                path = os.path.join(directory, name)
                if named(name) and self._owns(name) and path not in own:
                    found.add(path)
        return sorted(found)

    def _settle_old(self, path: str) -> str:
        own = self._own_paths
        try:
            outcome = settle_file(path, self.ops, skip=lambda p: own is not None and p in own, stop=self._closing)
        except CompressionStopped:
            return ""
        except OSError as exc:
            self._ratelog.warning("sweep", "could not compress a file of an earlier run: %s", exc)
            return "failed"
        if outcome == SETTLE_TWIN_KEPT:
            log.warning("%s and its .gz, left by a crash between compressing and deleting, differ (or the .gz is "
                        "damaged): both kept", path)
        elif outcome == SETTLE_ORPHAN:
            log.warning("%s.gz.tmp, left by a compression that was killed, has no original beside it: left as it is",
                        path)
        return outcome

    # -- shutdown ------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown). True if done."""
        done = threading.Event()
        marker = _Marker(done)
        self.queue.put(marker)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0, hurry: Optional[Callable[[], bool]] = None,
              hurry_timeout: float = 2.0) -> None:
        """Drain, sync and close; stop the compressor. Within ``timeout`` seconds (and
        ``STOP_GRACE`` more at most for each of the writer, the last sync of the files and the
        compressor; a sync still blocked then, a hung disk, is left to the system): the writer gets
        them to drain its queue, the compressor what is left of them for the files sealed in
        this run. The writer stops at the deadline between two slices of encoding; what it has
        not written is counted as dropped (``shutdown``). The compressor stops at the deadline
        between two files, or within one chunk of a file, whose temp file it then removes; what
        it did not compress, the next start's compressor does (see _sweep).

        ``hurry`` (a second stop signal) is looked at while close waits: once it is true, what
        is left of ``timeout`` is cut to ``hurry_timeout``, for the writer and the compressor
        alike. The deadline was fixed when close began: a second signal that came while the
        writer drained a backlog, or while the compressor worked, did not shorten it."""
        with self._close_lock:
            if self._closed:
                return
            self._drain_until = time.monotonic() + timeout  # (before _closed: see _past_drain)
            self._closed = True
        self._hurry, self._hurry_timeout = hurry, hurry_timeout
        self._check_hurry()
        writer = self._thread
        if writer is not None and writer.is_alive():
            backlog = self.queue.qsize() + self._held  # (those the writer took and has not encoded too)
            if backlog:
                log.info(self.says["drain"], backlog)
            self.queue.put(_STOP)
            self._wait(writer)
            if writer.is_alive():
                log.warning(self.says["late"])
        # The last sync and close of the files, on a thread of their own: on a hung disk (a
        # network file system whose server went away) the writer may be stuck in a write or a
        # sync, holding the lock they are closed under, or the sync of a file it left unsynced
        # (fsync "never", or a disk that hung since its last sync) blocks here. Waiting for
        # either, the process never stopped.
        closer = threading.Thread(target=self._close_files, name="proxy_llm-close", daemon=True)
        closer.start()
        self._wait(closer, STOP_GRACE)
        if closer.is_alive():
            # The files stay open (the OS closes them at exit); a writer that comes back later
            # writes no more (_files_closed, read under the lock it then holds).
            self._files_closed = True
            log.error("the writer is stuck writing or syncing a file (a hung disk?): the recorder's files "
                      "are left to the system to close, and what they hold may not be on disk")
        if self._compressor is not None:
            self._stop_at = self._drain_until
            self._to_compress.put(_STOP)
            self._wait(self._compressor)
            if self._compressor.is_alive():
                log.warning("the compressor did not stop in time (a slow disk?); a temp file it leaves is "
                            "settled at the next start")
        lost = self._left_queued(writer)
        if lost:
            self._count_drop("shutdown", lost)
        self._ratelog.flush()  # (the queue's and the disk's last warnings held back, if any)
        with self._stats_lock:
            cut = self.dropped.get("shutdown", 0)
            dropped = sorted(self.dropped.items())
        if cut:
            log.log(self.says["cut_level"], self.says["cut"], cut)
        if dropped:  # the run's losses, in one line at stop (each was counted when it happened)
            log.warning(self.says["dropped"], ", ".join("%s %d" % kv for kv in dropped))

    def _past_drain(self) -> bool:
        """Past close's deadline (the writer's: see close)."""
        return time.monotonic() >= self._drain_until

    def _check_hurry(self) -> None:
        """Cut what is left of close's deadline to ``hurry_timeout`` once ``hurry`` says so."""
        hurry = self._hurry
        if hurry is None or not hurry():
            return
        self._hurry = None  # (once)
        until = time.monotonic() + self._hurry_timeout
        if until < self._drain_until:
            self._drain_until = until
            if self._stop_at is not None:
                self._stop_at = until
            log.info("stopping the recorder within %g s", self._hurry_timeout)

    def _close_files(self) -> None:
        """Close's last sync: settle, sync and close every file (see close, which runs this
        on a thread of its own and waits for it by its deadline)."""
        with self.lock:
            # (_settle syncs the directories of the files made since the last sync, each synced
            # with the sync after its file was made: closing a file changes no directory. Every
            # remembered file's directory was synced here again, up to 4,096 fsyncs at each stop
            # after a day of a new session per task, out of the compressor's share of timeout.)
            self._settle()
            for f in self._files.values():
                self._close_file(f, sync=True)
            self._open.clear()
            self._files_closed = True

    def _wait(self, thread: threading.Thread, floor: float = 0.0) -> None:
        """Join ``thread`` until close's deadline and ``STOP_GRACE`` more (it stops at the
        deadline, within a slice or a chunk), looking at ``hurry`` meanwhile; for ``floor``
        seconds from now at least (the last sync, after a writer that took all of that)."""
        least = time.monotonic() + floor
        while thread.is_alive():
            self._check_hurry()
            left = max(self._drain_until + STOP_GRACE, least) - time.monotonic()
            if left <= 0:
                return
            thread.join(min(left, HURRY_POLL) if self._hurry is not None else left)

    def _left_queued(self, writer: Optional[threading.Thread]) -> int:
        """The records still queued once the writer has stopped (its stop marker and flush
        markers are not records); those a writer still at work may yet take, counted as lost."""
        if writer is not None and writer.is_alive():
            # Close's stop marker, unless the writer took it, is no record: counted, a writer
            # late on its last record made two drops of it, with the one it counts itself.
            return max(0, self.queue.qsize() - (0 if self._stop_taken else 1))
        n = 0
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return n
            if item is not _STOP and not isinstance(item, _Marker):
                n += 1


# The lines a Recorder's queue and stop write: a recorder's (records, files), and record: false's
# tally's (the answers it reads for the token metrics: nothing written, no disk).
_RECORDER_SAYS = {
    "thread": "proxy_llm-writer",
    "cut_level": logging.ERROR,  # records lost
    "full": "record queue full (%d records, %d of at most %d bytes): record dropped",
    "drain": "writing %d queued records before closing the recorder",
    "late": "the writer did not stop in time (a slow disk?); what it still holds is dropped",
    "cut": "%d queued records were not written at shutdown",
    "dropped": "records dropped in this run: %s",
}
_TALLY_SAYS = {
    "thread": "proxy_llm-tally",
    "cut_level": logging.WARNING,  # counts that a stopping process no longer shows
    "full": "token metrics' queue full (%d answers, %d of at most %d bytes): an answer left out of them",
    "drain": "reading %d queued answers for the token metrics before stopping",
    "late": "the token metrics' reader did not stop in time; the answers it holds are not counted",
    "cut": "%d queued answers were not counted in the token metrics at shutdown",
    "dropped": "answers left out of the token metrics in this run: %s",
}


class _Encoded:
    """A record a request thread encoded itself (see ``Recorder.submit``): its lines, and
    their size for the queue's byte bound."""

    __slots__ = ("lines", "size")

    def __init__(self, lines: List[Tuple[str, str, bytes]]):
        self.lines = lines
        self.size = sum([len(line) for _, _, line in lines])


class _Marker:
    """A queue item that sets an event when the writer reaches it (see ``flush``)."""

    def __init__(self, event: threading.Event):
        self.event = event


class CompressionStopped(Exception):
    """A compression was told to stop (``close``) while it copied: its temp file is removed,
    the original kept as it was."""


def compress_file(path: str, ops: FileOps = FileOps, ident: Optional[Tuple[int, int]] = None,
                  stop: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """gzip ``path`` crash-safely: temp file, fsync, rename, fsync dir, then remove the original.

    A crash before the rename leaves the original and a ``.gz.tmp`` (ignored by readers); after
    it, both ``X.jsonl`` and a complete ``X.jsonl.gz`` (readers take ``X.jsonl``). A failure
    removes the temp file and keeps the original; so does ``stop`` returning True, asked before
    each chunk of the copy (``CompressionStopped`` is raised). The next start settles what a
    crash left (:func:`settle_file`).

    The same two states exist for a moment while a compression runs. To tell them apart
    (``verify`` on a live data dir), the original is held under an exclusive advisory lock
    (``flock``) from before the temp file is created until after the original is removed; the
    kernel drops the lock when the process dies, however it dies. See :func:`compressing`.

    With ``ident`` (the sealed file's device and inode), only that file is compressed: when the
    path holds another one by then (its directory renamed away, and the writer's new file in a
    new one given the same name, by the same second), nothing is done and None is returned. The
    compressor once gzipped such a live file and removed it: the records appended after its
    copy were lost, counted as written. None too when the file is no longer at its path once
    locked (compressed meanwhile by another process's compressor).
    """
    with open(path, "rb") as src:  # (closing it, at the very end, drops the lock)
        if ident is not None and _ident(os.fstat(src.fileno())) != ident:
            return None
        _lock(src.fileno(), exclusive=True)
        return _compress_locked(src, path, ops, stop)


SETTLE_COMPRESSED = "compressed"
SETTLE_TWIN_REMOVED = "twin_removed"  # X.jsonl removed: its complete X.jsonl.gz holds the same bytes
SETTLE_TWIN_KEPT = "twin_kept"        # X.jsonl and X.jsonl.gz differ (or the .gz is damaged): both kept
SETTLE_HELD = "held"                  # another process holds X.jsonl: being written or compressed
SETTLE_GONE = "gone"                  # X.jsonl is not there (any more)
SETTLE_ORPHAN = "orphan_tmp"          # an X.jsonl.gz.tmp without its X.jsonl: left alone
SETTLE_SKIPPED = "skipped"            # skip(path) said so


def settle_file(path: str, ops: FileOps = FileOps, skip: Optional[Callable[[str], bool]] = None,
                stop: Optional[Callable[[], bool]] = None) -> str:
    """Settle an earlier run's ``X.jsonl`` (``path``) and what a crash left beside it, under an
    exclusive lock on it taken without waiting; returns one of the ``SETTLE_*`` outcomes.

    * Held by another process (its writer holds each file it has open, see :func:`_hold`; a
      compressor holds the file it compresses): left alone, ``held``.
    * Beside a complete ``X.jsonl.gz`` holding the same bytes (a crash between the rename and
      the removal): ``X.jsonl`` is removed. If the ``.gz`` cannot be read to its end or holds
      other bytes, both are kept (``verify`` reports them).
    * Otherwise compressed (:func:`compress_file`), a leftover ``X.jsonl.gz.tmp`` of a killed
      compression removed first.

    ``skip(path)``, asked once the lock is held, keeps a file out (this run's own files).
    Where locks do not work, nothing is done (``held``): a live writer's file could not be
    told from an earlier run's.
    """
    try:
        src = open(path, "rb")
    except FileNotFoundError:
        return SETTLE_ORPHAN if os.path.lexists(path + ".gz.tmp") and not os.path.lexists(path + ".gz") \
            else SETTLE_GONE
    with src:  # (closing it drops the lock)
        if not _try_exclusive(src.fileno()):
            return SETTLE_HELD
        try:
            if _ident(os.stat(path)) != _ident(os.fstat(src.fileno())):
                return SETTLE_GONE  # (compressed and removed by another, between the open and the lock)
        except OSError:
            return SETTLE_GONE
        if skip is not None and skip(path):
            return SETTLE_SKIPPED
        final = path + ".gz"
        if os.path.lexists(final):
            if not _same_bytes(src, final, stop):
                return SETTLE_TWIN_KEPT
            _remove(final + ".tmp")
            os.unlink(path)
            _fsync_dir(os.path.dirname(path), ops)
            return SETTLE_TWIN_REMOVED
        return SETTLE_COMPRESSED if _compress_locked(src, path, ops, stop) else SETTLE_GONE


def _compress_locked(src, path: str, ops: FileOps, stop: Optional[Callable[[], bool]]) -> Optional[str]:
    """compress_file's work, ``src`` (``path``, open) locked by the caller."""
    final = path + ".gz"
    tmp = final + ".tmp"
    ident = _ident(os.fstat(src.fileno()))

    def same() -> bool:
        try:
            return _ident(os.stat(path)) == ident
        except OSError:
            return False

    if not same():
        return None
    _remove(tmp)  # (a killed compression's: no other compressor works without the lock held here)
    try:
        fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename=os.path.basename(path), mode="wb", fileobj=raw, mtime=0) as gz:
                src.seek(0)
                buf = bytearray(COPY_CHUNK)
                view = memoryview(buf)
                while True:
                    n = src.readinto(buf)
                    if not n:
                        break
                    if stop is not None and stop():
                        raise CompressionStopped(path)
                    gz.write(view[:n])
            raw.flush()
            ops.fsync(raw.fileno())
        if not same():
            os.unlink(tmp)
            return None
        os.rename(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path), ops)
    if not same():  # (replaced between the rename and now: keep it; readers take X.jsonl)
        return None
    os.unlink(path)
    _fsync_dir(os.path.dirname(path), ops)
    return final


def _same_bytes(src, gz_path: str, stop: Optional[Callable[[], bool]] = None) -> bool:
    """Whether the gzip file ``gz_path`` reads to its end (every member's CRC and length
    checked) and holds exactly the bytes of ``src``."""
    src.seek(0)
    want, got = bytearray(COPY_CHUNK), bytearray(COPY_CHUNK)  # (one buffer each, as in _compress_locked)
    want_view, got_view = memoryview(want), memoryview(got)  # (compared without a copy)
    try:
        with gzip.open(gz_path, "rb") as gz:
            while True:
                if stop is not None and stop():
                    raise CompressionStopped(gz_path)
                n = src.readinto(want)
                if not n:
                    return gz.read(1) == b""
                if _read_fully(gz, got_view, n) != n or got_view[:n] != want_view[:n]:
                    return False
    except (OSError, EOFError, zlib.error):
        return False


def _read_fully(f, view: memoryview, n: int) -> int:
    """Read up to ``n`` bytes of ``f`` into ``view``; fewer only at its end."""
    got = 0
    while got < n:
        k = f.readinto(view[got:n])
        if not k:
            break
        got += k
    return got


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _hold(fd: int, path: str) -> Optional[Tuple[int, int]]:
    """The writer's lock on a file it has open for writing: shared, taken without waiting, held
    until the file is closed; returns the file's (device, inode). Another process's compressor,
    settling the files of earlier runs, takes an exclusive lock without waiting and leaves alone
    a file it cannot lock. None when such a compressor holds the file or has removed it (the
    writer then starts another)."""
    if not _lock(fd, exclusive=False):
        return None
    try:
        ident = _ident(os.fstat(fd))
        return ident if _ident(os.stat(path)) == ident else None
    except OSError:
        return None


def _try_exclusive(fd: int) -> bool:
    """An exclusive ``flock`` on ``fd`` without waiting: True only when it is really held (not
    where there are no locks)."""
    return _flock(fd, exclusive=True, wait=False) is True


def locks_work(directory: str) -> bool:
    """Whether advisory locks work in ``directory`` (a lock taken on the directory itself)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return _flock(fd, exclusive=False, wait=False) is True
    finally:
        os.close(fd)


def _lock(fd: int, exclusive: bool) -> bool:
    """An advisory ``flock`` on ``fd``: True when taken. Exclusive: waits for it (the compressor,
    on a file this run sealed and closed; the other holders are ``compressing``, for a moment,
    and another process's compressor settling it); shared: does not wait, False when another
    holds it exclusively (the writer's lock, see ``_hold``, and ``compressing``). True also where
    there are no locks (no ``fcntl``, or a file system without them), so that nothing waits on
    them and nothing is reported held."""
    return _flock(fd, exclusive, wait=exclusive) is not False


def _flock(fd: int, exclusive: bool, wait: bool) -> Optional[bool]:
    """``flock`` on ``fd``, the one call of _lock, _try_exclusive and locks_work: True when
    taken, False when another holds it (and ``wait`` is off), None where there are no advisory
    locks (no ``fcntl``; ENOLCK, EOPNOTSUPP from a file system without them)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def compressing(path: str) -> bool:
    """Whether a live process is compressing ``path`` (an ``X.jsonl``) right now: its compressor
    holds the file's lock (see :func:`compress_file`). False when the file is gone, when nobody
    holds the lock, and where there are no locks. A leftover ``X.jsonl.gz.tmp``, or an
    ``X.jsonl`` beside its ``X.jsonl.gz``, whose ``X.jsonl`` is not held when it is checked, is
    a crash's; one that vanishes meanwhile was a compression that has just ended."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return not _lock(fd, exclusive=False)
    finally:
        os.close(fd)  # (drops the shared lock, if taken)
