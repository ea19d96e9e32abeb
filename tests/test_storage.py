"""The recorder on real temp dirs: group commit, fsync modes, rotation, compression, faults.

File-system calls are counted (and faults injected) at the recorder's one boundary,
``storage.FileOps``; everything else is the real thing.
"""

from __future__ import annotations

import errno
import gc
import gzip
import json
import logging
import os
import queue
import random
import shutil
import stat
import tempfile
import threading
import time
import unittest
import unittest.mock
import weakref
from typing import Dict, List

from proxy_llm import reader, storage
from proxy_llm.storage import RECORDS, STREAMS, Recorder
from tests.support import wait_until

DEADLINE = 20.0


class Ops(storage.FileOps):
    """Real ``os`` calls, logged as (op, path); ``fault(op, path, data)`` may raise instead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # protects paths and calls
        self.paths: Dict[int, str] = {}
        self.calls: List[tuple] = []
        self.fault = None
        self.synced = threading.Event()  # set on every fsync of a .jsonl file
        self.made: List[tuple] = []  # (index in calls, path) of each makedirs

    def _log(self, op: str, fd: int) -> str:
        with self.lock:
            path = self.paths.get(fd, "?")
            self.calls.append((op, path))
        return path

    def _check(self, op: str, path: str, data: bytes = b"") -> None:
        if self.fault is not None:
            self.fault(op, path, data)

    def open(self, path, flags, mode=0o777):
        self._check("open", path)
        fd = os.open(path, flags, mode)
        with self.lock:
            self.paths[fd] = path
            self.calls.append(("open", path))
        return fd

    def write(self, fd, data):
        path = self._log("write", fd)
        self._check("write", path, bytes(data))
        return os.write(fd, data)

    def writev(self, fd, buffers):
        path = self._log("writev", fd)
        self._check("writev", path, b"".join(bytes(b) for b in buffers))
        return os.writev(fd, buffers)

    def fsync(self, fd):
        path = self._log("fsync", fd)
        self._check("fsync", path)
        os.fsync(fd)
        if path.endswith(".jsonl"):
            self.synced.set()

    def ftruncate(self, fd, length):
        path = self._log("ftruncate", fd)
        self._check("ftruncate", path)
        os.ftruncate(fd, length)

    def close(self, fd):
        self._log("close", fd)
        os.close(fd)

    def makedirs(self, path, mode=0o777, exist_ok=False):
        self._check("makedirs", path)
        os.makedirs(path, mode, exist_ok)
        with self.lock:
            self.made.append((len(self.calls), path))  # (where it came among the calls)

    def count(self, op: str, path_suffix: str = ".jsonl") -> int:
        with self.lock:
            return sum(1 for o, p in self.calls if o == op and p.endswith(path_suffix))

    def ops_on(self, path: str) -> List[str]:
        with self.lock:
            return [o for o, p in self.calls if p == path]


def line(sid: str, n: int, size: int = 0, kind: str = RECORDS) -> tuple:
    text = json.dumps({"sid": sid, "n": n, "pad": "x" * max(0, size)}, separators=(",", ":"))
    return (kind, sid, text.encode() + b"\n")


def encode(item):
    if isinstance(item, Exception):
        raise item
    return item if isinstance(item, list) else [item]


def data_files(root: str) -> List[str]:
    out = []
    for d, _, files in os.walk(root):
        out.extend(os.path.join(d, f) for f in files if ".jsonl" in f)
    return sorted(out)


def lines_of(path: str) -> List[bytes]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().splitlines(keepends=True)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class RecorderTestCase(unittest.TestCase):
    def setUp(self):
        logger = logging.getLogger("proxy_llm.storage")
        self.logs = Captured()
        logger.addHandler(self.logs)
        logger.propagate = False
        self.addCleanup(setattr, logger, "propagate", True)
        self.addCleanup(logger.removeHandler, self.logs)
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_storage_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.ops = Ops()
        self.written: "queue.Queue[object]" = queue.Queue()

    def recorder(self, start: bool = True, **kwargs) -> Recorder:
        kwargs.setdefault("ops", self.ops)
        kwargs.setdefault("on_written", self.written.put)
        rec = Recorder(self.data_dir, encode, **kwargs)
        self.addCleanup(rec.close, DEADLINE)
        if start:
            rec.start()
        return rec

    def put(self, rec: Recorder, item) -> None:
        """Submit one item and wait until the writer has handled it (one batch)."""
        self.assertTrue(rec.submit(item))
        self.assertIs(self.written.get(timeout=DEADLINE), item)


class GroupCommitTest(RecorderTestCase):
    def test_one_batch_is_one_write_per_file(self):
        rec = self.recorder(start=False)
        for n in range(40):  # queued before the writer starts: the first batch takes them all
            rec.submit(line("alpha" if n % 2 else "beta", n))
        for n in range(10):
            rec.submit(line("alpha", n, kind=STREAMS))
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        files = data_files(self.data_dir)
        self.assertEqual(len(files), 3)
        for path in files:
            self.assertEqual(self.ops.ops_on(path).count("write"), 1, path)
        self.assertEqual(rec.written_total(), 40)  # stream lines are not records
        alpha = [json.loads(x)["n"] for x in lines_of([p for p in files if "session_alpha" in p and "streams" not in p][0])]
        self.assertEqual(alpha, list(range(1, 40, 2)))  # queue order kept

    def gathered(self, arrivals: int, queued: int = 0, closed: bool = False, size: int = 0) -> List[float]:
        """The waits of Recorder._gather with ``queued`` records queued, ``arrivals`` more
        arriving during each wait (each holding ``size`` bytes of bodies, as the recorder
        counts them: cli's size_of)."""
        rec = self.recorder(start=False, queue_max_bytes=1 << 30, size_of=lambda item: size)
        for n in range(queued):
            rec.submit(line("q", n))
        naps: List[float] = []

        def nap(seconds):
            naps.append(seconds)
            for n in range(arrivals):
                rec.submit(line("a", n))

        rec.nap = nap
        rec._closed = closed
        rec._gather()
        return naps

    def test_a_lone_record_waits_one_window(self):
        # A few records a second, or a flush: one window, as before the longer gathering.
        window = storage.GATHER_WINDOW
        self.assertEqual(self.gathered(arrivals=0), [window])
        self.assertEqual(self.gathered(arrivals=1), [window])  # (one joined: not yet load)

    def test_under_load_it_waits_on_for_a_larger_batch(self):
        window = storage.GATHER_WINDOW
        windows = round(storage.GATHER_MAX / window)
        self.assertEqual(windows, 5)
        # Two or more join in each window: it waits on until GATHER_MORE are queued...
        self.assertEqual(self.gathered(arrivals=12), [window] * 3)  # 12, 24, then 36 >= 32
        self.assertEqual(self.gathered(arrivals=2), [window] * windows)  # ...or GATHER_MAX has passed
        self.assertEqual(self.gathered(arrivals=40), [window])  # (past GATHER_MORE in the first)

    def test_large_records_are_not_gathered_past_their_bytes(self):
        # 100 KB bodies: a batch of thirty-two took the writer longer per record than the
        # batches of a 2 ms window. It stops waiting once the queue holds GATHER_BYTES.
        window = storage.GATHER_WINDOW
        big = storage.GATHER_BYTES // 4
        self.assertEqual(self.gathered(arrivals=3, size=big), [window] * 2)  # 3, then 6 * big >= GATHER_BYTES
        self.assertEqual(self.gathered(arrivals=5, size=big), [window])  # (past it in the first window)
        self.assertEqual(self.gathered(arrivals=3, size=1000), [window] * 5)  # small: on until GATHER_MAX

    def test_no_wait_with_a_batch_queued_already_nor_past_the_first_once_closing(self):
        self.assertEqual(self.gathered(arrivals=5, queued=storage.GATHER_BELOW), [])
        # Below GATHER_BELOW it waits a window; then on only if two or more joined in it.
        self.assertEqual(self.gathered(arrivals=0, queued=storage.GATHER_BELOW - 1), [storage.GATHER_WINDOW])
        self.assertEqual(self.gathered(arrivals=1, queued=storage.GATHER_BELOW - 1), [storage.GATHER_WINDOW])
        self.assertEqual(self.gathered(arrivals=5, queued=storage.GATHER_BELOW - 1),
                         [storage.GATHER_WINDOW] * 4)  # 20, 25, 30, then 35 >= 32
        self.assertEqual(self.gathered(arrivals=5, closed=True), [storage.GATHER_WINDOW])

    def test_the_writer_writes_what_arrived_while_it_gathered_as_one_batch(self):
        rec = self.recorder(start=False)
        naps = []

        def nap(seconds):  # three records arrive in each of the writer's first three waits
            naps.append(seconds)
            if len(naps) <= 3:
                for n in range(3):
                    rec.submit(line("s", len(naps) * 10 + n))

        rec.nap = nap
        batches = []
        write_batch = rec._write_batch
        rec._write_batch = lambda batch: (batches.append(len(batch)), write_batch(batch))
        rec.start()
        rec.submit(line("s", 0))
        wait_until(lambda: rec.written_total() == 10, DEADLINE)
        self.assertEqual(batches[0], 10)  # the first, and the nine that came in three windows
        self.assertEqual(naps[:4], [storage.GATHER_WINDOW] * 4)  # (none came in the fourth)

    def sized_writes(self):
        """Record the size of each piece handed to write / writev, per call."""
        calls = []
        write, writev = self.ops.write, self.ops.writev
        self.ops.write = lambda fd, data: calls.append([len(data)]) or write(fd, data)
        self.ops.writev = lambda fd, bufs: calls.append([len(b) for b in bufs]) or writev(fd, bufs)
        return calls

    def test_big_lines_go_out_as_they_are_in_one_writev(self):
        # A batch of big records joined into one buffer of megabytes cost a fresh mapping from
        # the kernel, and its page faults, per batch; a write per record would hand the GIL
        # over per record. Small lines are still joined, up to JOIN_MAX; each big line is a
        # buffer of its own, in queue order, and the batch is one system call.
        rec = self.recorder(start=False)
        big = storage.JOIN_MAX
        sizes = [0, 0, big, 0, big, big, 0]
        for n, size in enumerate(sizes):
            rec.submit(line("s", n, size))
        calls = self.sized_writes()
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], list(range(len(sizes))))
        small = len(line("s", 0)[2])
        self.assertEqual(calls, [[2 * small, len(line("s", 2, big)[2]), small, len(line("s", 4, big)[2]),
                                  len(line("s", 5, big)[2]), small]])

    def test_a_line_given_as_its_parts_goes_out_as_those_parts(self):
        # A record with a big body comes as storage.Pieces (record._as_pieces): its parts are
        # buffers of the batch's one writev, in their place, and its size counts as a line's.
        rec = self.recorder(start=False)
        whole = line("s", 1, storage.JOIN_MAX)[2]
        parts = (whole[:10], whole[10:-100], whole[-100:])
        rec.submit(line("s", 0))
        rec.submit((RECORDS, "s", storage.Pieces(parts)))
        rec.submit(line("s", 2))
        calls = self.sized_writes()
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 1, 2])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), line("s", 0)[2] + whole + line("s", 2)[2])
        small = len(line("s", 0)[2])
        self.assertEqual(calls, [[small, 10, len(whole) - 110, 100, small]])
        self.assertEqual((rec.written_total(), len(storage.Pieces(parts)), bytes(storage.Pieces(parts))),
                         (3, len(whole), whole))

    def test_a_line_given_as_its_parts_survives_short_writes_and_no_writev(self):
        for writev in ("short", None):
            with self.subTest(writev=writev):
                rec = self.recorder(start=False)
                whole = line("s", 1, storage.JOIN_MAX)[2]
                rec.submit(line("s", 0))
                rec.submit((RECORDS, "s", storage.Pieces((whole[:7], whole[7:-3], whole[-3:]))))
                rec.submit(line("s", 2, storage.JOIN_MAX))
                original = self.ops.writev
                if writev is None:
                    self.ops.writev = None
                else:
                    def short_writev(fd, bufs, original=original):  # half the first buffer per call
                        first = bytes(bufs[0])
                        return original(fd, [first[:max(1, len(first) // 2)]])
                    self.ops.writev = short_writev
                self.addCleanup(setattr, self.ops, "writev", original)
                rec.start()
                self.assertTrue(rec.flush(DEADLINE))
                rec.close(DEADLINE)
                [path] = data_files(self.data_dir)
                with open(path, "rb") as f:
                    self.assertEqual(f.read(), line("s", 0)[2] + whole + line("s", 2, storage.JOIN_MAX)[2])
                os.remove(path)
                self.ops.writev = original

    def test_small_lines_are_joined_up_to_the_limit(self):
        rec = self.recorder(start=False)
        size = storage.JOIN_MAX // 3
        for n in range(7):
            rec.submit(line("s", n, size))
        calls = self.sized_writes()
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], list(range(7)))
        one = len(line("s", 0, size)[2])  # a little over a third of JOIN_MAX: three make a piece
        self.assertEqual(calls, [[3 * one, 3 * one, one]])

    def test_short_writev_goes_on_where_it_stopped(self):
        rec = self.recorder(start=False)
        big = storage.JOIN_MAX
        for n in range(4):
            rec.submit(line("s", n, big))
        writev = self.ops.writev
        calls = []

        def short_writev(fd, bufs):  # the kernel takes a buffer and half the next per call
            calls.append(len(bufs))
            first = bytes(bufs[0])
            if len(bufs) == 1:
                return writev(fd, [first])
            second = bytes(bufs[1])
            return writev(fd, [first, second[:len(second) // 2]])
        self.ops.writev = short_writev
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 1, 2, 3])
        self.assertEqual(calls, [4, 3, 2, 1])

    def test_without_writev_each_piece_is_a_write(self):
        rec = self.recorder(start=False)
        big = storage.JOIN_MAX
        for n, size in enumerate([0, big, 0]):
            rec.submit(line("s", n, size))
        calls = self.sized_writes()
        self.ops.writev = None  # an OS without writev
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 1, 2])
        self.assertEqual(len(calls), 3)

    def test_fsync_always_syncs_after_every_batch(self):
        rec = self.recorder(fsync="always")
        for n in range(3):
            self.put(rec, line("s", n))
        [path] = data_files(self.data_dir)
        # one fsync per batch, each after its write (none of the empty file at its creation)
        self.assertEqual(self.ops.ops_on(path), ["open"] + ["write", "fsync"] * 3)
        # its directory, once: with the first batch's sync
        self.assertEqual(self.ops.ops_on(os.path.dirname(path)), ["open", "fsync", "close"])

    def test_fsync_interval_batches_syncs(self):
        rec = self.recorder(fsync="interval", fsync_interval=60.0)
        for n in range(5):
            self.put(rec, line("s", n))
        [path] = data_files(self.data_dir)
        self.assertEqual(self.ops.ops_on(path), ["open"] + ["write"] * 5)  # (an hour to go)
        rec.close(DEADLINE)
        self.assertEqual(self.ops.ops_on(path)[-2:], ["fsync", "close"])  # synced at close

    def test_fsync_interval_syncs_within_the_interval_when_idle(self):
        # (Half a second: the look before the sync must come first, and a test thread held up
        # for 50 ms on a loaded machine would have seen the sync already.)
        rec = self.recorder(fsync="interval", fsync_interval=0.5)
        self.put(rec, line("s", 0))
        [path] = data_files(self.data_dir)
        self.ops.synced.clear()
        self.assertEqual(self.ops.ops_on(path), ["open", "write"])
        self.assertTrue(self.ops.synced.wait(DEADLINE))
        self.assertEqual(self.ops.ops_on(path), ["open", "write", "fsync"])

    def test_fsync_interval_counts_from_the_oldest_unsynced_line(self):
        # The writer waited a whole fsync_interval for its next idle sync from its last batch,
        # and synced a batch only fsync_interval after the last sync: a line written just after
        # one, with another batch 85% of an interval later, waited 1.85 intervals. (A fake clock
        # of 100-second intervals: the real waits are long, so the steps below never race them.)
        now = [1000.0]
        rec = self.recorder(start=False, fsync="interval", fsync_interval=100.0)
        rec.monotonic = lambda: now[0]
        waits: "queue.Queue[float]" = queue.Queue()
        get = rec.queue.get

        def watched_get(timeout=None):
            waits.put(timeout)
            return get(timeout=timeout)

        rec.queue.get = watched_get
        rec.start()
        self.assertEqual(waits.get(timeout=DEADLINE), 100.0)  # idle, nothing to sync
        self.put(rec, line("s", 0))  # written at 1000
        self.assertEqual(waits.get(timeout=DEADLINE), 100.0)
        now[0] = 1085.0
        self.put(rec, line("s", 1))  # not yet due
        [path] = data_files(self.data_dir)
        self.assertEqual(self.ops.ops_on(path), ["open", "write", "write"])
        self.assertAlmostEqual(waits.get(timeout=DEADLINE), 15.0)  # woken when the first is due
        now[0] = 1100.0
        self.put(rec, line("s", 2))  # due: synced with this batch
        self.assertEqual(self.ops.ops_on(path), ["open", "write", "write", "write", "fsync"])
        self.assertEqual(waits.get(timeout=DEADLINE), 100.0)  # nothing unsynced again

    def test_fsync_never_leaves_syncing_to_the_os_until_close(self):
        rec = self.recorder(fsync="never")
        for n in range(3):
            self.put(rec, line("s", n))
        [path] = data_files(self.data_dir)
        self.assertEqual(self.ops.ops_on(path), ["open", "write", "write", "write"])
        rec.close(DEADLINE)
        self.assertEqual(self.ops.ops_on(path)[-2:], ["fsync", "close"])

    def test_new_files_and_their_directories_are_synced(self):
        # With fsync: never, at the end of the batch that made them (the others: with the next
        # sync); the files with their lines, never empty (a commit for nothing).
        rec = self.recorder(fsync="never")
        self.put(rec, [line("s", 0), line("s", 0, kind=STREAMS)])
        session_dir = os.path.join(self.data_dir, "session_s")
        streams_dir = os.path.join(self.data_dir, "streams")
        self.assertEqual(self.ops.ops_on(self.data_dir), ["open", "fsync", "close"])  # (once for both new dirs)
        for d in (session_dir, streams_dir):
            self.assertEqual(self.ops.ops_on(d), ["open", "fsync", "close"], d)
        paths = data_files(self.data_dir)
        for path in paths:
            self.assertEqual(self.ops.ops_on(path), ["open", "write"])
        rec.close(DEADLINE)
        for path in paths:
            self.assertEqual(self.ops.ops_on(path), ["open", "write", "fsync", "close"])


class PacingTest(RecorderTestCase):
    """How the writer shares the interpreter (on a fake clock: no timing here)."""

    def paced(self, per_record: float, backlog: int = 0):
        rec = self.recorder(start=False)
        for n in range(backlog):  # what is still queued behind the batch in hand
            rec.queue.put_nowait(line("q", n))
        now = [0.0]
        rests: List[float] = []

        def slow_encode(item):
            now[0] += per_record
            return encode(item)

        rec.encode = slow_encode
        rec.busy_clock = lambda: now[0]
        rec.rest = rests.append
        return rec, rests

    def test_a_burst_of_slow_records_rests_after_each_slice(self):
        rec, rests = self.paced(0.0004)
        groups = rec._encode_all([line("s", n) for n in range(10)])
        self.assertEqual(len(groups[(RECORDS, "s")]), 10)  # every record still encoded, in order
        # 0.4 ms each: after three (1.2 ms >= the 1 ms slice) a rest of 1.2 ms, three times,
        # and no GIL offer between the records of a slice.
        self.assertEqual([round(r, 6) for r in rests], [0.0012] * 3)

    def test_quick_records_run_back_to_back(self):
        rec, rests = self.paced(0.00002)
        rec._encode_all([line("s", n) for n in range(40)])  # 0.8 ms in all, below one slice
        self.assertEqual(rests, [])

    def test_a_backlog_gets_longer_slices_and_no_rest(self):
        # The requests come faster than the writer writes: resting would only fill the queue
        # until records are dropped. It offers the GIL (rest(0)) after 1.2 ms (the first
        # slice), then after every 4.2 ms (slices of 4 ms): at records 4, 18 and 32 of 40.
        rec, rests = self.paced(0.0003, backlog=storage.CATCH_UP_BELOW)
        groups = rec._encode_all([line("s", n) for n in range(40)])
        self.assertEqual(len(groups[(RECORDS, "s")]), 40)
        self.assertEqual(rests, [0, 0, 0])

    def test_a_backlog_just_below_the_mark_still_rests(self):
        rec, rests = self.paced(0.0004, backlog=storage.CATCH_UP_BELOW - 1)
        rec._encode_all([line("s", n) for n in range(10)])
        self.assertEqual([round(r, 6) for r in rests], [0.0012] * 3)

    def test_no_rest_once_closing(self):
        rec, rests = self.paced(0.0004, backlog=3)
        rec._closed = True  # close() drains the backlog at full speed
        rec._encode_all([line("s", n) for n in range(10)])
        self.assertEqual(rests, [])


class RotationTest(RecorderTestCase):
    def test_rotation_by_size_seals_and_keeps_every_line_in_order(self):
        rec = self.recorder(max_file_size=1000, fsync="never")
        size = len(line("s", 0, 60)[2])
        for n in range(25):
            self.put(rec, line("s", n, 60))
        rec.close(DEADLINE)
        files = data_files(self.data_dir)
        per_file = 1000 // size
        self.assertEqual(len(files), -(-25 // per_file))
        for path in files:
            self.assertLessEqual(os.path.getsize(path), 1000)
            ops = self.ops.ops_on(path)
            self.assertEqual(ops[-2:], ["fsync", "close"], path)  # sealed files are synced, then closed
        stats = reader.ReadStats()
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir, stats)], list(range(25)))
        self.assertTrue(stats.ok)

    def test_rotation_by_day_uses_the_clock(self):
        now = [time.mktime((2026, 11, 27, 23, 59, 58, 0, 0, 0)) - time.timezone]
        rec = self.recorder(clock=lambda: now[0])
        self.put(rec, [line("s", 0), line("s", 0, kind=STREAMS)])
        now[0] += 1
        self.put(rec, [line("s", 1), line("s", 1, kind=STREAMS)])  # same day: same files
        now[0] += 2  # 00:00:01 the next day
        self.put(rec, [line("s", 2), line("s", 2, kind=STREAMS)])
        rec.close(DEADLINE)
        names = [os.path.basename(p) for p in data_files(self.data_dir)]
        self.assertEqual(names, ["session_s_20261127_235958.jsonl", "session_s_20261128_000001.jsonl",
                                 "session_s_20261127.jsonl", "session_s_20261128.jsonl"])
        self.assertEqual([len(lines_of(p)) for p in data_files(self.data_dir)], [2, 1, 2, 1])

    def test_the_day_is_the_utc_day_of_the_clock_also_when_it_steps_back(self):
        rec = self.recorder(start=False)
        rnd = random.Random(5)
        t = time.mktime((2026, 11, 27, 23, 59, 59, 0, 0, 0)) - time.timezone
        for _ in range(2000):
            t += rnd.choice((0.25, 1.0, -1.0, 3600.0, -86400.0, 86399.75, rnd.uniform(-1e6, 1e6)))
            self.assertEqual(rec._today(t), time.strftime("%Y%m%d", time.gmtime(t)), t)

    def test_no_daily_rotation_when_disabled(self):
        now = [time.mktime((2026, 11, 27, 23, 59, 59, 0, 0, 0)) - time.timezone]
        rec = self.recorder(clock=lambda: now[0], rotate_daily=False)
        self.put(rec, line("s", 0))
        now[0] += 86400
        self.put(rec, line("s", 1))
        rec.close(DEADLINE)
        self.assertEqual(len(data_files(self.data_dir)), 1)

    def test_sealed_files_are_compressed_crash_safely(self):
        now = [time.mktime((2026, 11, 27, 12, 0, 0, 0, 0, 0)) - time.timezone]
        rec = self.recorder(clock=lambda: now[0], compress_rotated=True, max_file_size=2000)
        for n in range(30):
            self.put(rec, [line("s", n, 100), line("s", n, 100, kind=STREAMS)])
            if n == 20:
                now[0] += 86400
        rec.close(DEADLINE)  # waits for the compressor
        files = data_files(self.data_dir)
        gz = [p for p in files if p.endswith(".gz")]
        plain = [p for p in files if p.endswith(".jsonl")]
        self.assertFalse([p for p in files if p.endswith(".tmp")])
        self.assertEqual(len(plain), 2, plain)  # the files still open at close stay plain
        self.assertGreaterEqual(len(gz), 3)
        for path in gz:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertFalse(os.path.exists(path[:-3]))
            # the temp file was synced before the rename
            self.assertIn("fsync", self.ops.ops_on(path + ".tmp"))
        stats = reader.ReadStats()
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir, stats)], list(range(30)))
        self.assertEqual([r["n"] for r in reader.iter_stream_lines(self.data_dir)], list(range(30)))
        self.assertTrue(stats.ok)
        self.assertEqual(stats.twins, [])

    def test_failed_compression_keeps_the_original_and_no_temp_file(self):
        path = os.path.join(self.tmp, "x.jsonl")
        with open(path, "wb") as f:
            f.write(b'{"a":1}\n')

        def fault(op, p, data):
            if op == "fsync" and p.endswith(".tmp"):
                raise OSError(errno.EIO, "injected")
        self.ops.fault = fault
        with self.assertRaises(OSError):
            storage.compress_file(path, self.ops)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["x.jsonl"])
        self.ops.fault = None
        self.assertEqual(storage.compress_file(path, self.ops), path + ".gz")
        self.assertEqual(sorted(os.listdir(self.tmp)), ["x.jsonl.gz"])


class FileNameTest(RecorderTestCase):
    """The readers take only the names the recorder gives (a notes.jsonl copied into a session
    directory was read as records): every name it gives, and no other."""

    def test_every_name_the_recorder_gives_is_one_the_readers_take(self):
        fixed = time.mktime((2026, 11, 27, 16, 48, 15, 0, 0, 0)) - time.timezone
        sids = ["s", "a_20261127", "x-1.v2", "team/alice:42"]  # (the last one hashed)
        for run, suffix in enumerate(("", "", "_w3")):  # the same second: -N suffixes
            # (worker 3 of 4 leaves the plain files of the runs before alone: not its share)
            rec = self.recorder(clock=lambda: fixed, max_file_size=300, compress_rotated=True, file_suffix=suffix,
                                share=(3, 4) if suffix else (0, 1))
            for n in range(3):  # each batch rotates
                for sid in sids:
                    self.put(rec, [line(sid, n, 200), line(sid, n, 200, kind=STREAMS)])
            self.assertTrue(rec.sweep_done.wait(DEADLINE))
            rec.close(DEADLINE)
        names = {"records": [], "streams": []}
        for path in data_files(self.data_dir):
            kind = "streams" if os.path.basename(os.path.dirname(path)) == "streams" else "records"
            names[kind].append(os.path.basename(path))
        for name in names["records"]:
            self.assertTrue(storage.is_record_file_name(name), name)
            self.assertFalse(storage.is_stream_file_name(name), name)
        for name in names["streams"]:
            self.assertTrue(storage.is_stream_file_name(name), name)
            self.assertFalse(storage.is_record_file_name(name), name)
        every = names["records"] + names["streams"]
        # (the first run's last files, -2.jsonl, were compressed by the second run at its start)
        for form in ("164815.jsonl.gz", "20261127.jsonl.gz", "-2.jsonl.gz", "-5.jsonl", "-3.jsonl.gz",
                     "_w3.jsonl.gz", "-2_w3.jsonl"):
            self.assertTrue(any(n.endswith(form) for n in every), form)
        self.assertTrue(any(n.startswith("session_h") for n in every))
        stats = reader.ReadStats()
        self.assertEqual(len(list(reader.iter_records(self.data_dir, stats))), 3 * 3 * len(sids))
        self.assertEqual(len(list(reader.iter_stream_lines(self.data_dir, stats))), 3 * 3 * len(sids))
        self.assertEqual(stats.skipped_files, [])

    def test_names_the_recorder_never_gives(self):
        for name in ("notes.jsonl", "session_s_20261127_164815 (copy).jsonl", "session_s_20261127_1648.jsonl",
                     "session_s_20261127_164815-0.jsonl", "session_s_20261127_164815-01.jsonl",
                     "session_s_20261127_164815_w01.jsonl", "session_s_20261127_164815_w.jsonl",
                     "session_s_20261127_164815.jsonl.tmp", "session_s_20261127_164815.jsonl.gz.tmp",
                     "session_s_20261127_164815.JSONL", "session_s_20261127_164815.json",
                     "session_s_2026112\uff17_164815.jsonl", "session_._20261127_164815.jsonl",
                     "session_.._20261127_164815.jsonl", "session__20261127_164815.jsonl",
                     "session_%s_20261127_164815.jsonl" % ("x" * 65), "session_a b_20261127_164815.jsonl",
                     "Session_s_20261127_164815.jsonl", "session_s_20261127_164815.jsonl\n"):
            self.assertFalse(storage.is_record_file_name(name), name)
        for name in ("notes.jsonl", "session_s_20261127_164815.jsonl", "session_s_2026112.jsonl",
                     "session_s_20261127-0.jsonl", "session_s_20261127.jsonl.gz.tmp", "session_.._20261127.jsonl"):
            self.assertFalse(storage.is_stream_file_name(name), name)
        self.assertTrue(storage.is_record_file_name("session_%s_20261127_164815-12_w0.jsonl.gz" % ("x" * 64)))
        self.assertTrue(storage.is_stream_file_name("session_a_20261127_20261128-3_w1.jsonl"))


class RotationCostTest(RecorderTestCase):
    """Rotation under a small max_file_size with compress_rotated: what it costs the writer.

    A rotation tried every name of its stem from 0 (a stat and an open each): a streams file's
    stem is a day's, so the k-th rotation of a day went through k names, the writer fell behind
    as the day went on, and past 9,999 files of a stem no name was left: every line for that
    file was dropped until the next day. And each rotation synced the full file, its
    directory, the new empty file and its directory: four commits on the writer thread.
    """

    def test_a_day_of_small_files_drops_nothing_and_a_rotation_looks_at_no_earlier_file(self):
        fixed = time.mktime((2026, 11, 27, 16, 48, 15, 0, 0, 0)) - time.timezone
        streams = os.path.join(self.data_dir, "streams")
        os.makedirs(streams, mode=0o700)
        seed = os.path.join(self.tmp, "seed.gz")
        with gzip.open(seed, "wb"):
            pass
        earlier = set()  # an earlier run of the same day: 10,000 files of 64 KiB, compressed
        for n in range(10000):
            path = os.path.join(streams, "session_s_20261127%s.jsonl" % ("-%d" % n if n else ""))
            os.link(seed, path + ".gz")  # (links: 10,000 new files would take seconds to make)
            earlier.add(path)
        probes = {"earlier": 0, "done": 0}  # names the writer looked at: the earlier run's, or its own sealed ones
        made: Dict[str, List[str]] = {}  # directory -> this run's files, in order

        def probe(path):
            if not isinstance(path, str) or threading.current_thread().name != "proxy_llm-writer":
                return
            path = path[:-3] if path.endswith(".gz") else path
            if path in earlier:
                probes["earlier"] += 1
            elif path in made.get(os.path.dirname(path), [])[:-1]:
                probes["done"] += 1

        class CountingOps(Ops):
            def open(self, path, flags, mode=0o777):
                probe(path)
                fd = super().open(path, flags, mode)
                if flags & os.O_CREAT and path.endswith(".jsonl"):
                    made.setdefault(os.path.dirname(path), []).append(path)
                return fd

        stat, lstat = os.stat, os.lstat

        def counting(real):
            def call(path, *args, **kwargs):
                probe(path)
                return real(path, *args, **kwargs)
            return call

        self.ops = CountingOps()
        rec = self.recorder(clock=lambda: fixed, max_file_size=64 * 1024, compress_rotated=True)
        with unittest.mock.patch.object(os, "stat", counting(stat)), \
                unittest.mock.patch.object(os, "lstat", counting(lstat)):
            for n in range(1500):  # small records, each with a 2 KB stream line, at a steady pace
                self.assertTrue(rec.submit([line("s", n, 400), line("s", n, 2000, kind=STREAMS)]))
                if n % 25 == 24:
                    self.assertTrue(rec.flush(DEADLINE))
            rec.close(DEADLINE)
        self.assertEqual(rec.dropped, {})
        self.assertEqual(rec.written, 1500)
        self.assertGreater(len(made[streams]), 20)  # rotations enough
        self.assertEqual(os.path.basename(made[streams][0]), "session_s_20261127-10000.jsonl")  # after the others
        self.assertEqual(probes["done"], 0)
        self.assertLessEqual(probes["earlier"], 64)  # a binary search, not a walk through 10,000 names
        for directory, paths in made.items():
            got = [json.loads(x)["n"] for path in paths
                   for x in lines_of(path + ".gz" if not os.path.exists(path) else path)]
            self.assertEqual(got, list(range(1500)), directory)

    def test_rotations_are_synced_together_with_the_next_sync(self):
        now = [1000.0]
        rec = self.recorder(start=False, fsync="interval", fsync_interval=100.0, max_file_size=1000,
                            compress_rotated=True)
        rec.monotonic = lambda: now[0]
        rec.start()
        for n in range(10):  # three lines a file: three rotations
            self.put(rec, line("s", n, 300))
        paths = [p for op, p in list(self.ops.calls) if op == "open" and p.endswith(".jsonl")]
        self.assertEqual(len(paths), 4)
        session_dir = os.path.dirname(paths[0])
        self.assertEqual(self.ops.count("fsync", ".jsonl"), 0)  # not at each rotation
        self.assertEqual(self.ops.ops_on(session_dir), [])
        self.assertFalse([p for p in data_files(self.data_dir) if p.endswith(".gz")])  # (not before they are synced)
        # The sync queues the sealed files for the compressor, which syncs their directory after
        # each rename and removal: it waits for the writer's calls to be counted before its own
        # (it once ran first, and the directory's calls were more than the writer's one sync).
        counted = threading.Event()
        self.addCleanup(counted.set)

        def hold_compressor(op, path, data):
            if op == "open" and path == session_dir and threading.current_thread().name == "proxy_llm-compress":
                counted.wait(DEADLINE)
        self.ops.fault = hold_compressor
        now[0] += 100.0
        self.put(rec, line("s", 10, 300))  # the interval's sync settles every rotation since the last one
        for path in paths[:3]:
            self.assertEqual(self.ops.ops_on(path)[-2:], ["fsync", "close"], path)
            self.assertEqual(self.ops.ops_on(path).count("fsync"), 1, path)
        self.assertEqual(self.ops.ops_on(session_dir), ["open", "fsync", "close"])  # once for them all
        counted.set()
        rec.close(DEADLINE)
        calls = list(self.ops.calls)
        for path in paths[:3]:
            self.assertFalse(os.path.exists(path))
            self.assertTrue(os.path.exists(path + ".gz"))
            self.assertLess(calls.index(("fsync", path)), calls.index(("open", path + ".gz.tmp")))  # synced, then gzip'd
        self.assertEqual([json.loads(x)["n"] for path in paths[:3] for x in lines_of(path + ".gz")], list(range(9)))


class CompressMovedTest(unittest.TestCase):
    def test_a_file_at_a_sealed_files_path_is_not_compressed_away(self):
        # The compressor took the path alone: with the data dir moved away while it was behind,
        # the writer's new file got the sealed one's name (same second), and the compressor
        # gzipped it and removed it, live: the record written after its copy was lost, counted.
        tmp = tempfile.mkdtemp(prefix="proxy_llm_compress_")
        self.addCleanup(shutil.rmtree, tmp, True)
        data = os.path.join(tmp, "data")
        behind, copied, release = threading.Event(), threading.Event(), threading.Event()
        for event in (behind, copied, release):
            self.addCleanup(event.set)

        class Ops(storage.FileOps):
            @staticmethod
            def fsync(fd):  # the compressor's fsync of its temp file comes right after its copy
                if threading.current_thread().name == "proxy_llm-compress" and \
                        os.readlink("/proc/self/fd/%d" % fd).endswith(".gz.tmp"):
                    copied.set()
                    release.wait(10)
                os.fsync(fd)

        compress = storage.compress_file

        def late(*args):
            behind.wait(10)
            result = compress(*args)
            copied.set()  # (when it left the file alone, or once released)
            return result

        def encode(item):
            return [(RECORDS, "s", (json.dumps({"id": item, "pad": "x" * 300}) + "\n").encode())]

        with unittest.mock.patch.object(storage, "compress_file", late):
            rec = Recorder(data, encode, fsync="never", max_file_size=1024, compress_rotated=True,
                           clock=lambda: 1800000000.0, ops=Ops())
            rec.start()
            self.addCleanup(rec.close)
            for item in ("A0", "A1", "A2", "A3"):  # the fourth rotates the first file: sealed, queued
                rec.submit(item)
                self.assertTrue(rec.flush())
            os.rename(data, data + ".old")  # archived by hand while the compressor is behind
            for item in ("B0", "B1"):
                rec.submit(item)
                self.assertTrue(rec.flush())
            behind.set()
            self.assertTrue(copied.wait(10))  # it copied the path's file, or left it alone
            rec.submit("C0")
            self.assertTrue(rec.flush())
            release.set()
            rec.close()
        ids = []
        for root in (data, data + ".old"):
            for path in sorted(os.listdir(os.path.join(root, "session_s"))):
                full = os.path.join(root, "session_s", path)
                with (gzip.open(full) if path.endswith(".gz") else open(full, "rb")) as fh:
                    raw = fh.read()
                ids += [json.loads(line)["id"] for line in raw.splitlines()]
        self.assertEqual(sorted(ids), ["A0", "A1", "A2", "A3", "B0", "B1", "C0"])
        self.assertEqual(rec.written, 7)


class SweepTest(RecorderTestCase):
    """At start, with compress_rotated, the compressor settles what earlier runs left: sealed
    files never compressed (a shutdown that came first, a kill), a killed compression's temp
    file, and X.jsonl beside its complete X.jsonl.gz. Before, no run ever picked them up: they
    stayed plain, and verify reported the leftovers for good."""

    def earlier(self, name: str, lines: List[bytes], sid: str = "s") -> str:
        directory = os.path.join(self.data_dir, "session_" + sid)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(b"".join(lines))
        return path

    def gzip_to(self, path: str, data: bytes) -> None:
        with gzip.open(path, "wb") as f:
            f.write(data)

    def swept(self, **kwargs) -> Recorder:
        rec = self.recorder(compress_rotated=True, **kwargs)
        self.assertTrue(rec.sweep_done.wait(DEADLINE))
        return rec

    def test_plain_files_temp_files_and_twins_of_earlier_runs_are_settled(self):
        ls = [line("s", n)[2] for n in range(8)]
        plain = self.earlier("session_s_20261127_120000.jsonl", ls[0:2])
        killed = self.earlier("session_s_20261127_120001.jsonl", ls[2:4])  # a kill while its .gz.tmp was written
        with open(killed + ".gz.tmp", "wb") as f:
            f.write(gzip.compress(ls[2])[:20])
        twin = self.earlier("session_s_20261127_120002.jsonl", ls[4:6])  # a kill between the rename and the unlink
        self.gzip_to(twin + ".gz", b"".join(ls[4:6]))
        torn = self.earlier("session_s_20261127_120003.jsonl", ls[6:8])  # a twin whose .gz is cut short
        with open(torn + ".gz", "wb") as f:
            f.write(gzip.compress(b"".join(ls[6:8]))[:-6])
        orphan = os.path.join(self.data_dir, "session_s", "session_s_20261127_120004.jsonl.gz.tmp")
        with open(orphan, "wb") as f:  # (its original removed by hand: not the proxy's to settle)
            f.write(b"x")
        rec = self.swept()
        self.assertEqual(rec.swept, {"compressed": 2, "twin_removed": 1, "twin_kept": 1, "orphan_tmp": 1})
        self.put(rec, line("s", 8))
        rec.close(DEADLINE)
        names = sorted(os.listdir(os.path.join(self.data_dir, "session_s")))
        base = os.path.basename
        self.assertEqual([n for n in names if "12000" in n], sorted([
            base(plain) + ".gz", base(killed) + ".gz", base(twin) + ".gz", base(torn), base(torn) + ".gz",
            base(orphan)]))
        self.assertEqual(lines_of(killed + ".gz"), ls[2:4])
        self.assertEqual(lines_of(plain + ".gz"), ls[0:2])
        stats = reader.ReadStats()
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir, stats)], list(range(9)))
        self.assertEqual(stats.twins, [torn + ".gz"])
        self.assertTrue(any("differ (or the .gz is damaged): both kept" in m for m in self.logs.messages))

    def test_a_file_another_process_holds_is_left_alone(self):
        # A second proxy on the same data dir (by mistake, or a worker of another run): its
        # writer holds each file it has open; the sweeper skips them. One it closed for the
        # open-files limit is not held: swept, its lines are in its .gz, and the writer starts
        # another when it comes back to that session.
        done = self.earlier("session_s_20261127_110000.jsonl", [line("s", 0)[2]])
        other_written: "queue.Queue[object]" = queue.Queue()
        with unittest.mock.patch.object(storage, "MAX_OPEN_FILES", 1):
            other = Recorder(self.data_dir, encode, on_written=other_written.put, clock=lambda: 1800000000.0)
            other.start()
            self.addCleanup(other.close, DEADLINE)
            for item in ([line("a", 0)], [line("b", 0)]):  # a's file is closed when b's is opened
                self.assertTrue(other.submit(item))
                self.assertIs(other_written.get(timeout=DEADLINE), item)
            [a_path] = data_files(os.path.join(self.data_dir, "session_a"))
            [b_path] = data_files(os.path.join(self.data_dir, "session_b"))
            rec = self.swept()
            self.assertEqual(rec.swept, {"compressed": 2, "held": 1})
            self.assertTrue(os.path.exists(done + ".gz"))
            self.assertTrue(os.path.exists(a_path + ".gz"))
            self.assertEqual(data_files(os.path.join(self.data_dir, "session_b")), [b_path])  # held: untouched
            for item in ([line("a", 1)], [line("b", 1)]):
                self.assertTrue(other.submit(item))
                self.assertIs(other_written.get(timeout=DEADLINE), item)
            other.close(DEADLINE)
        rec.close(DEADLINE)
        self.assertEqual(lines_of(b_path), [line("b", 0)[2], line("b", 1)[2]])
        got = [(r["sid"], r["n"]) for r in reader.iter_records(self.data_dir)]
        self.assertEqual(sorted(got), [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("s", 0)])
        self.assertEqual(other.dropped, {})

    def test_this_runs_own_files_are_never_touched(self):
        rec = self.recorder(start=False, compress_rotated=True)
        rec.start()
        self.put(rec, line("s", 0))  # (maybe before the sweep lists the directory)
        [path] = data_files(self.data_dir)
        self.assertTrue(rec.sweep_done.wait(DEADLINE))
        self.assertEqual(data_files(self.data_dir), [path])
        self.put(rec, line("s", 1))
        rec.close(DEADLINE)
        self.assertEqual(lines_of(path), [line("s", 0)[2], line("s", 1)[2]])

    def test_each_worker_settles_its_share_whatever_the_worker_count_was(self):
        # Files of a run with 4 workers, and of one without: a run with 2 workers settles
        # them all, each file by one worker (K mod 2; no suffix counts as worker 0).
        names = {}
        for suffix in ("", "_w0", "_w1", "_w2", "_w3"):
            names[suffix] = self.earlier("session_s_20261127_100000%s.jsonl" % suffix, [line("s", 0)[2]])
        shares = []
        for worker in (0, 1):
            rec = self.swept(file_suffix="_w%d" % worker, share=(worker, 2))
            shares.append(sorted(p for p in data_files(self.data_dir) if p.endswith(".gz")))
            self.assertEqual(rec.swept, {"compressed": 2 if worker else 3})
            rec.close(DEADLINE)
        self.assertEqual(shares[0], sorted(names[s] + ".gz" for s in ("", "_w0", "_w2")))
        self.assertEqual(shares[1], sorted(p + ".gz" for p in names.values()))

    def test_shutdown_stops_the_compressor_in_time_and_the_next_start_finishes(self):
        # A backlog of sealed files at shutdown: close waited 'timeout' for the compressor and
        # returned with it still at work; the process exited in the middle of a compression
        # (a real .gz.tmp left) and the files after it stayed plain for good.
        at_tmp = threading.Event()
        closing: List[float] = []

        class SlowOps(Ops):
            def open(self, path, flags, mode=0o777):
                if path.endswith(".gz.tmp") and not at_tmp.is_set():
                    at_tmp.set()  # the first compression waits until past close's deadline
                    end = time.monotonic() + DEADLINE
                    while not closing and time.monotonic() < end:
                        time.sleep(0.01)
                    if closing:
                        time.sleep(max(0.0, closing[0] - time.monotonic()))
                return super().open(path, flags, mode)

        self.ops = SlowOps()
        rec = self.recorder(compress_rotated=True, max_file_size=1, fsync="never", clock=lambda: 1800000000.0)
        for n in range(6):  # each line seals the file before it: 5 sealed files
            self.put(rec, line("s", n, 100))
        self.assertTrue(rec.flush(DEADLINE))
        self.assertTrue(at_tmp.wait(DEADLINE))
        timeout = 0.5
        started = time.monotonic()
        closing.append(started + timeout + 0.2)  # (released past the deadline)
        rec.close(timeout)
        self.assertLess(time.monotonic() - started, timeout + storage.STOP_GRACE)
        self.assertFalse(rec._compressor.is_alive())  # stopped, not left at work
        files = data_files(self.data_dir)
        self.assertEqual([p for p in files if p.endswith(".tmp")], [])
        self.assertGreaterEqual(len([p for p in files if p.endswith(".jsonl")]), 5)  # left for later
        self.ops = Ops()
        rec = self.swept()
        self.assertEqual(rec.swept, {"compressed": len([p for p in files if p.endswith(".jsonl")])})
        rec.close(DEADLINE)
        files = data_files(self.data_dir)
        self.assertTrue(all(p.endswith(".jsonl.gz") for p in files), files)
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir)], list(range(6)))


class HurryTest(RecorderTestCase):
    """A second stop signal while the recorder closes (close's ``hurry``): close's deadline was
    fixed when it began, so a signal that came while the writer drained a backlog, or while
    the compressor worked, did not shorten it (30 s at shutdown). Now what is left is cut to
    ``hurry_timeout``; what the writer has not written by then is counted as dropped."""

    def test_a_hurry_during_the_drain_cuts_the_writer_short_and_counts_the_rest(self):
        sent = 200
        rec = self.recorder(start=False, fsync="always", queue_size=1000)
        encoded = []

        def slow(item):  # a slow writer (a slow disk, big records): 4 s for the backlog
            time.sleep(0.02)
            encoded.append(item)
            return encode(item)

        rec.encode = slow
        for n in range(sent):
            self.assertTrue(rec.submit(line("s", n)))
        rec.start()
        hurried: List[float] = []

        def hurry() -> bool:  # the second signal comes once the writer is at work on the backlog
            if not hurried and len(encoded) >= 10:
                hurried.append(time.monotonic())
            return bool(hurried)

        rec.close(30.0, hurry=hurry, hurry_timeout=0.5)
        self.assertTrue(hurried)
        self.assertLess(time.monotonic() - hurried[0], 0.5 + 1.0)
        self.assertFalse(rec._thread.is_alive())
        written = [json.loads(text)["n"] for path in data_files(self.data_dir) for text in lines_of(path)]
        self.assertEqual(written, list(range(len(written))))  # whole lines, in order, none twice
        self.assertTrue(10 <= len(written) < sent, len(written))
        self.assertEqual(rec.written_total(), len(written))
        self.assertEqual(rec.dropped, {"shutdown": sent - len(written)})  # every other record counted
        self.assertIn("%d queued records were not written at shutdown" % (sent - len(written)), self.logs.messages)

    def test_a_writer_late_past_close_counts_its_stop_marker_as_no_record(self):
        # The writer is still at work on the last record (one slow to encode: a huge stream)
        # when close's wait runs out, nothing else queued. Close counted what the queue held,
        # its own stop marker, as a record lost, and the writer then counted the record it
        # could no longer write: two drops for one record.
        encoding, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        rec = self.recorder(start=False)

        def slow(item):
            encoding.set()
            release.wait(DEADLINE)
            return encode(item)

        rec.encode = slow
        rec.start()
        self.assertTrue(rec.submit(line("s", 0)))
        self.assertTrue(encoding.wait(DEADLINE))
        with unittest.mock.patch.object(storage, "STOP_GRACE", 0.1):
            rec.close(0.1)
        self.assertTrue(rec._thread.is_alive())  # (still encoding)
        release.set()
        rec._thread.join(DEADLINE)
        self.assertFalse(rec._thread.is_alive())
        self.assertEqual(rec.written_total(), 0)
        self.assertEqual(rec.dropped, {"shutdown": 1})

    def hung_disk(self):
        """A disk whose every sync of a record file blocks until the returned ``release`` is set
        (set at cleanup); ``syncing`` is set once one blocks."""
        syncing, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def hang(op, path, data):
            if op == "fsync" and path.endswith(".jsonl"):
                syncing.set()
                release.wait(DEADLINE)

        self.ops.fault = hang
        return syncing, release

    def close_in_time(self, rec: Recorder) -> bool:
        """Close ``rec`` (a 0.1 s deadline and grace) on a thread of its own: whether it
        returned within the test's deadline."""
        closed = threading.Event()

        def close():
            rec.close(0.1)
            closed.set()

        with unittest.mock.patch.object(storage, "STOP_GRACE", 0.1):
            threading.Thread(target=close, daemon=True).start()
            return closed.wait(DEADLINE)

    def test_a_writer_stuck_in_a_sync_does_not_hold_the_stop(self):
        # A hung disk (a network file system whose server went away): the writer blocks in an
        # fsync, holding the lock its files are closed under. Close waited for that lock with no
        # deadline, so the process never stopped; now it gives up on it at its deadline.
        syncing, release = self.hung_disk()
        rec = self.recorder(fsync="always")
        self.assertTrue(rec.submit(line("s", 0)))
        self.assertTrue(syncing.wait(DEADLINE))
        returned = self.close_in_time(rec)
        release.set()  # (the disk comes back: the writer ends, and so would a close still waiting)
        self.assertTrue(returned, "close waited for a writer stuck in an fsync")
        self.assertTrue(any("stuck writing or syncing" in m for m in self.logs.messages), self.logs.messages)
        rec._thread.join(DEADLINE)
        self.assertFalse(rec._thread.is_alive())
        self.assertTrue(rec._files_closed)

    def test_a_disk_that_hangs_in_closes_own_sync_does_not_hold_the_stop(self):
        # The same hung disk, met by close itself: with fsync "never" (or a disk that hung since
        # the writer's last sync) the writer's writes went to the page cache and it stopped in
        # time, and close's last sync of the files, made on close's own thread, blocked with no
        # deadline: the process never stopped. Now that sync is waited for by the deadline too.
        syncing, release = self.hung_disk()
        rec = self.recorder(fsync="never")
        self.put(rec, line("s", 0))
        returned = self.close_in_time(rec)
        self.assertTrue(syncing.is_set())  # (close's sync was the one that hung)
        release.set()
        self.assertTrue(returned, "close waited for its own sync on a hung disk")
        self.assertFalse(rec._thread.is_alive())
        self.assertTrue(any("stuck writing or syncing" in m for m in self.logs.messages), self.logs.messages)
        self.assertTrue(rec._files_closed)
        self.assertEqual(rec.written_total(), 1)

    def test_a_hurry_while_the_compressor_works_stops_it_short(self):
        begun: List[str] = []

        class SlowOps(Ops):
            def open(self, path, flags, mode=0o777):
                if path.endswith(".gz.tmp"):  # a slow disk: each compression takes 0.2 s
                    begun.append(path)
                    time.sleep(0.2)
                return super().open(path, flags, mode)

        self.ops = SlowOps()
        rec = self.recorder(compress_rotated=True, max_file_size=1, fsync="never", clock=lambda: 1800000000.0)
        sent = 41
        for n in range(sent):  # each line seals the file before it: 40 sealed files, 8 s of gzip
            self.put(rec, line("s", n, 100))
        at_close = len(begun)
        hurried: List[float] = []

        def hurry() -> bool:  # the second signal comes while the compressor works for close
            if not hurried and rec._stop_at is not None and len(begun) >= at_close + 2:
                hurried.append(time.monotonic())
            return bool(hurried)

        rec.close(30.0, hurry=hurry, hurry_timeout=0.5)
        self.assertTrue(hurried)
        self.assertLess(time.monotonic() - hurried[0], 0.5 + 1.0)
        self.assertFalse(rec._compressor.is_alive())  # stopped, not left at work
        files = data_files(self.data_dir)
        self.assertEqual([p for p in files if p.endswith(".tmp")], [])
        self.assertGreater(len([p for p in files if p.endswith(".jsonl")]), 1)  # left for the next start
        self.assertEqual(sorted(r["n"] for r in reader.iter_records(self.data_dir)), list(range(sent)))
        self.assertEqual(rec.dropped, {})


class ManySessionsTest(RecorderTestCase):
    """A proxy in front of agents sees a new session id for every task, for weeks: what the
    writer keeps per session must stay bounded, and its descriptors within MAX_OPEN_FILES."""

    def open_data_fds(self) -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + fd).startswith(self.data_dir):
                    n += 1
            except OSError:  # (the descriptor listdir itself used)
                pass
        return n

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counts descriptors in /proc")
    def test_sessions_remembered_and_files_open_are_bounded_the_least_recent_go_first(self):
        known, opened = 16, 4
        patch = unittest.mock.patch.multiple(storage, create=True, MAX_KNOWN_FILES=known, MAX_OPEN_FILES=opened)
        patch.start()
        self.addCleanup(patch.stop)
        rec = self.recorder()
        for n in range(200):  # a new session for every record, and one that keeps coming back
            self.put(rec, [line("s%d" % n, n), line("s%d" % n, n, kind=STREAMS)])
            self.put(rec, line("hot", n))
            self.assertLessEqual(len(rec._files), known)
            self.assertLessEqual(len(rec._next_name), known)
            self.assertLessEqual(self.open_data_fds(), opened)
        # The session written all along kept its one file, open all along (least recently
        # written is closed and forgotten first, not first created).
        hot = [p for p in data_files(self.data_dir) if "session_hot" in p]
        self.assertEqual(len(hot), 1, hot)
        self.assertEqual(len(lines_of(hot[0])), 200)
        self.assertEqual(self.ops.ops_on(hot[0]).count("open"), 1)
        # A session forgotten and back starts a new file; one still remembered appends to its own.
        self.put(rec, line("s0", 1000))
        self.put(rec, line("s199", 1000))
        self.assertEqual(len([p for p in data_files(self.data_dir) if "session_s0_" in p and "streams" not in p]), 2)
        self.assertEqual(len([p for p in data_files(self.data_dir) if "session_s199_" in p and "streams" not in p]), 1)
        rec.close(DEADLINE)
        self.assertEqual(self.open_data_fds(), 0)
        self.assertEqual(rec.written_total(), 402)
        self.assertEqual(sum(len(lines_of(p)) for p in data_files(self.data_dir)), 602)


    def test_a_batch_of_new_sessions_lands_each_in_its_own_file_and_each_directory_is_synced_once(self):
        # With a new session per record, the data dir was synced at once for every directory
        # made (an open, a journal commit and a close per record, on the writer thread); it is
        # synced once with the next sync, with the session directories and the files.
        opened = 16
        patch = unittest.mock.patch.object(storage, "MAX_OPEN_FILES", opened)
        patch.start()
        self.addCleanup(patch.stop)
        rec = self.recorder(start=False, fsync="interval", fsync_interval=100.0)
        sessions = ["task-%03d" % n for n in range(100)]
        for n, sid in enumerate(sessions):
            self.assertTrue(rec.submit(line(sid, n)))
        flushed = threading.Event()
        rec.queue.put(storage._Marker(flushed))  # (one batch: the records, then a sync)
        rec.start()
        self.assertTrue(flushed.wait(DEADLINE))
        self.assertEqual(rec.written_total(), len(sessions))
        with self.ops.lock:
            calls = list(self.ops.calls)
            made = [(i, path) for i, path in self.ops.made if path != self.data_dir]
        self.assertEqual(len(made), len(sessions))
        self.assertEqual(self.ops.ops_on(self.data_dir), ["open", "fsync", "close"])
        self.assertGreaterEqual(calls.index(("fsync", self.data_dir)), made[-1][0])  # (after every directory made)
        for n, sid in enumerate(sessions):
            directory = os.path.join(self.data_dir, "session_" + sid)
            [name] = os.listdir(directory)
            path = os.path.join(directory, name)
            self.assertTrue(storage.is_record_file_name(name), name)
            self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [n])
            self.assertEqual(self.ops.ops_on(directory), ["open", "fsync", "close"], directory)
            self.assertGreater(calls.index(("fsync", directory)), calls.index(("open", path)))
            self.assertEqual(self.ops.ops_on(path).count("fsync"), 1, path)  # (closed for the limit, or synced)
        rec.close(DEADLINE)
        self.assertEqual(len(data_files(self.data_dir)), len(sessions))

    def test_shutdown_syncs_no_directory_again(self):
        # close() synced the directory of every file remembered (up to MAX_KNOWN_FILES), each
        # synced already with the sync after its file was made.
        rec = self.recorder(fsync="interval", fsync_interval=100.0)
        sessions = ["task-%03d" % n for n in range(20)]
        for n, sid in enumerate(sessions):
            self.put(rec, [line(sid, n), line(sid, n, kind=STREAMS)])
        self.assertTrue(rec.flush(DEADLINE))
        self.put(rec, line("late", 0))  # (made after the last sync: synced at close)
        with self.ops.lock:
            synced = len(self.ops.calls)
        rec.close(DEADLINE)
        with self.ops.lock:
            at_close = [(op, os.path.basename(path)) for op, path in self.ops.calls[synced:]]
        dirs = [os.path.join(self.data_dir, "session_" + sid) for sid in sessions + ["late"]]
        dirs.append(os.path.join(self.data_dir, STREAMS))
        for d in dirs:
            self.assertEqual(self.ops.ops_on(d), ["open", "fsync", "close"], d)  # (once, with a sync)
        self.assertEqual(self.ops.ops_on(self.data_dir), ["open", "fsync", "close"] * 2)
        late = [name for op, name in at_close if op == "fsync" and name.startswith("session_late_")]
        self.assertEqual(len(late), 1)
        self.assertEqual(sorted(at_close), sorted([("close", "data"), ("fsync", "data"), ("open", "data"),
                                                   ("close", "session_late"), ("fsync", "session_late"),
                                                   ("open", "session_late"), ("fsync", late[0])]
                                                  + [("close", name) for name in
                                                     [os.path.basename(p) for p in data_files(self.data_dir)]]))
        self.assertEqual(len(data_files(self.data_dir)), 41)


class IdleWriterTest(RecorderTestCase):
    def test_the_writer_keeps_nothing_of_its_last_batch_while_it_waits(self):
        # The last batch's items (exchanges, their captured bodies: up to queue_max_bytes) were
        # held by the writer's loop variables until another record came.
        class Item:
            def __init__(self, n):
                self.lines = [line("idle", n, 1000)]

        done = queue.Queue()
        rec = Recorder(self.data_dir, lambda item: item.lines, ops=self.ops, on_written=lambda item: done.put(None))
        self.addCleanup(rec.close, DEADLINE)
        items = [Item(n) for n in range(3)]
        refs = [weakref.ref(item) for item in items]
        for item in items:
            self.assertTrue(rec.submit(item))
        rec.start()
        for _ in range(len(items)):
            done.get(timeout=DEADLINE)
        del items, item
        gc.collect()
        wait_until(lambda: all(ref() is None for ref in refs), what="the written items to be let go of")
        self.assertEqual(rec.written_total(), 3)


class RestartTest(RecorderTestCase):
    def test_a_new_start_never_appends_to_an_old_file(self):
        fixed = time.time()
        rec = self.recorder(clock=lambda: fixed)
        self.put(rec, [line("s", 0), line("s", 0, kind=STREAMS)])
        rec.close(DEADLINE)
        before = {p: lines_of(p) for p in data_files(self.data_dir)}
        for n in (1, 2):
            rec = self.recorder(clock=lambda: fixed)  # same second: the names collide
            self.put(rec, [line("s", n), line("s", n, kind=STREAMS)])
            rec.close(DEADLINE)
        after = data_files(self.data_dir)
        self.assertEqual(len(after), 6)
        for path, content in before.items():
            self.assertEqual(lines_of(path), content)
        self.assertTrue(any(os.path.basename(p).endswith("-2.jsonl") for p in after))

    def test_a_torn_last_line_is_skipped_and_counted_by_the_reader(self):
        rec = self.recorder()
        self.put(rec, [line("s", 0), line("s", 1)])
        rec.close(DEADLINE)
        [path] = data_files(self.data_dir)
        with open(path, "ab") as f:
            f.write(line("s", 2)[2][:15])  # a crash in the middle of an append
        stats = reader.ReadStats()
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir, stats)], [0, 1])
        self.assertEqual((stats.torn, stats.bad_lines), (1, []))


class FaultTest(RecorderTestCase):
    def test_half_written_batch_is_cut_back_and_recording_resumes(self):
        rec = self.recorder()
        self.put(rec, line("s", 0))
        full = {"on": True, "calls": 0}
        original_write = self.ops.write

        def filling_write(fd, data):  # the disk fills up in the middle of a batch
            if full["on"]:
                full["calls"] += 1
                if full["calls"] == 1:
                    return original_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return original_write(fd, data)
        self.ops.write = filling_write
        self.put(rec, [line("s", 1), line("s", 2), line("s", 3)])
        self.assertTrue(rec.degraded)
        self.assertIn("ENOSPC", rec.last_error)
        self.assertEqual(rec.dropped.get("write_error"), 3)
        self.assertTrue(any("ENOSPC" in m for m in self.logs.messages), self.logs.messages)
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0])  # whole lines only
        full["on"] = False
        self.put(rec, line("s", 4))
        self.assertFalse(rec.degraded)
        self.assertEqual(rec.last_error, "")
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 4])
        self.assertEqual(rec.written_total(), 2)

    def test_a_file_removed_while_closed_after_a_failure_is_started_again(self):
        # Space freed by hand: the record file that a failed write closed is deleted. Writing
        # resumes in a new file (it used to fail with ENOENT on every batch, for good).
        rec = self.recorder()
        self.put(rec, line("s", 0))
        original_write = self.ops.write

        def full_write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ops.write = full_write
        self.put(rec, line("s", 1))
        self.assertTrue(rec.degraded)
        [old] = data_files(self.data_dir)
        os.remove(old)
        self.ops.write = original_write
        self.put(rec, line("s", 2))
        self.assertFalse(rec.degraded)
        [new] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(new)], [2])
        self.assertEqual((rec.written_total(), rec.dropped), (2, {"write_error": 1}))

    def test_a_file_removed_or_renamed_while_open_is_started_again(self):
        # Appends to a file no longer at its path would be lost with it (and free no space).
        rec = self.recorder()
        self.put(rec, line("s", 0))
        [first] = data_files(self.data_dir)
        os.remove(first)
        self.put(rec, line("s", 1))
        [second] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(second)], [1])
        moved = second.replace(".jsonl", ".old")  # data_files skips it
        os.rename(second, moved)
        self.put(rec, line("s", 2))
        self.put(rec, line("s", 3))
        [third] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(third)], [2, 3])
        with open(moved, "rb") as f:
            self.assertEqual([json.loads(x)["n"] for x in f.read().splitlines()], [1])
        self.assertEqual(rec.written_total(), 4)
        self.assertIn("a record file was removed or renamed; a new one is started", self.logs.messages)

    def test_a_batch_of_several_writes_is_cut_back_whole(self):
        # The disk fills up after the first big line of a batch went out: that line is cut
        # back too, so the batch is either all there or counted dropped, never half.
        rec = self.recorder()
        self.put(rec, line("s", 0))
        original = self.ops.writev
        calls = []

        def filling_writev(fd, bufs):
            calls.append(len(bufs))
            if len(calls) == 1:
                return original(fd, [bytes(bufs[0])])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.ops.writev = filling_writev
        big = storage.JOIN_MAX
        self.put(rec, [line("s", 1, big), line("s", 2, big)])
        self.assertEqual(calls, [2, 1])
        self.assertEqual(rec.dropped.get("write_error"), 2)
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0])
        self.ops.writev = original
        self.put(rec, [line("s", 3, big), line("s", 4, big)])
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 3, 4])

    def test_a_lost_streamed_exchange_counts_one_dropped_record(self):
        rec = self.recorder()

        def fault(op, path, data):
            if op in ("open", "write"):
                raise OSError(errno.ENOSPC, "No space left on device")
        self.ops.fault = fault
        self.put(rec, [line("s", 0), line("s", 0, kind=STREAMS)])
        self.assertEqual(rec.dropped, {"write_error": 1, "stream_write_error": 1})
        self.assertEqual(rec.dropped_total(), 1)

    def test_a_disk_too_full_for_records_stays_degraded_and_keeps_their_streams_lines_out(self):
        # A nearly full disk with streamed traffic: the big record lines failed, each small
        # streams line still fitted, and its success cleared `degraded` (so /health said ok and
        # fail_closed kept serving while every record was lost) and left an orphan line.
        rec = self.recorder(start=False)

        def records_do_not_fit(op, path, data):
            if op in ("write", "writev") and os.sep + "streams" + os.sep not in path:
                raise OSError(errno.ENOSPC, "No space left on device")
        self.ops.fault = records_do_not_fit
        for n in range(3):  # one batch: two sessions, a streamed exchange of each and a plain one
            rec.submit([line("s", n), line("s", n, kind=STREAMS)] if n < 2 else line("t", n))
            rec.submit([line("t", n), line("t", n, kind=STREAMS)] if n < 2 else line("s", n))
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        self.assertTrue(rec.degraded)
        self.assertIn("ENOSPC", rec.last_error)
        self.assertEqual(rec.dropped, {"write_error": 6, "stream_write_error": 4})
        self.assertEqual([p for p in data_files(self.data_dir) if lines_of(p)], [])
        for _ in range(6):
            self.written.get(timeout=DEADLINE)
        self.ops.fault = None
        self.put(rec, [line("s", 9), line("s", 9, kind=STREAMS)])
        self.assertFalse(rec.degraded)
        self.assertEqual(rec.last_error, "")
        written = {os.path.basename(os.path.dirname(p)): [json.loads(x)["n"] for x in lines_of(p)]
                   for p in data_files(self.data_dir) if lines_of(p)}
        self.assertEqual(sorted(written.values()), [[9], [9]], written)
        self.assertEqual(sum("recording resumed" in m for m in self.logs.messages), 1, self.logs.messages)

    def test_a_file_that_cannot_be_cut_back_is_abandoned(self):
        rec = self.recorder()
        self.put(rec, line("s", 0))
        broken = {"on": True}
        original_write = self.ops.write

        def torn_write(fd, data):
            if broken["on"]:
                original_write(fd, bytes(data[:7]))
                raise OSError(errno.EIO, "injected I/O error")
            return original_write(fd, data)

        def fault(op, path, data):
            if op == "ftruncate" and broken["on"]:
                raise OSError(errno.EIO, "injected I/O error")
        self.ops.write = torn_write
        self.ops.fault = fault
        self.put(rec, line("s", 1))
        broken["on"] = False
        self.put(rec, line("s", 2))
        rec.close(DEADLINE)
        files = data_files(self.data_dir)
        self.assertEqual(len(files), 2)  # the torn file got no more lines
        stats = reader.ReadStats()
        self.assertEqual([r["n"] for r in reader.iter_records(self.data_dir, stats)], [0, 2])
        self.assertEqual((stats.torn, stats.bad_lines), (1, []))

    def test_encoder_and_writer_bugs_never_stop_the_writer(self):
        rec = self.recorder()
        self.put(rec, ValueError("bug in encode"))
        self.assertEqual(rec.dropped.get("encode_error"), 1)

        def fault(op, path, data):
            if op == "open" and "session_boom" in path:
                raise RuntimeError("not an OSError")
        self.ops.fault = fault
        self.assertTrue(rec.submit(line("boom", 0)))
        self.assertTrue(rec.flush(DEADLINE))
        self.assertEqual(rec.dropped.get("writer_error"), 1)
        self.ops.fault = None
        self.put(rec, line("ok", 1))
        self.assertTrue(rec.flush(DEADLINE))
        self.assertEqual(rec.written_total(), 1)
        self.assertTrue(rec._thread.is_alive())

    def test_past_assist_above_request_threads_encode_and_nothing_is_dropped(self):
        encoded_by = {}

        def encode_noting_the_thread(item):
            if not isinstance(item, Exception):
                encoded_by[json.loads(item[2])["n"]] = threading.current_thread().name
            return encode(item)

        size_of = lambda item: len(item[2]) if isinstance(item, tuple) else 0  # noqa: E731 (the test line's bytes)
        rec = Recorder(self.data_dir, encode_noting_the_thread, queue_size=100, queue_max_bytes=1 << 20,
                       size_of=size_of, ops=self.ops, assist_above=10)
        self.addCleanup(rec.close, DEADLINE)
        items = [line("s", n) for n in range(40)]
        items[25] = ValueError("cannot encode")  # fails here, then again on the writer: counted once
        for item in items:  # the writer is not started: the queue only grows
            self.assertTrue(rec.submit(item))
        here = threading.current_thread().name
        self.assertEqual(sorted(n for n, name in encoded_by.items() if name == here), [n for n in range(10, 40) if n != 25])
        self.assertEqual(rec.assisted, 29)
        self.assertEqual(rec.queue.bytes, sum(len(item[2]) for item in items if not isinstance(item, Exception)))
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual(lines_of(path), [item[2] for item in items if not isinstance(item, Exception)])  # in order
        self.assertEqual((rec.written_total(), rec.dropped), (39, {"encode_error": 1}))
        self.assertEqual(rec.queue.bytes, 0)
        self.assertEqual(sorted(n for n, name in encoded_by.items() if name != here), list(range(10)))

    def test_a_record_encoded_here_is_queued_though_the_queue_filled_meanwhile(self):
        # Encoding counts the exchange's ending and tokens (the metrics): a record encoded by
        # its request thread was dropped when other threads filled the queue in the meantime,
        # counted in the endings and in records_dropped both (an audit's finding).
        rec = self.recorder(start=False, queue_size=8, queue_max_bytes=1 << 20,
                            size_of=lambda item: len(item[2]), assist_above=2)
        counted = []

        def encode_while_others_fill_the_queue(item):
            counted.append(json.loads(item[2])["n"])
            if counted[-1] == 5:  # three other request threads fill the queue meanwhile
                for n in (6, 7, 8):
                    self.assertTrue(rec.queue.put_nowait(line("s", n)) is None)
            return encode(item)
        rec.encode = encode_while_others_fill_the_queue
        for n in range(6):
            self.assertTrue(rec.submit(line("s", n)))
        self.assertEqual(rec.queue.qsize(), 9)  # (one past its bound: one racing thread's)
        self.assertEqual(rec.assisted, 4)
        self.assertFalse(rec.submit(line("s", 9)))  # full: dropped, not encoded
        self.assertEqual(counted, [2, 3, 4, 5])
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual(sorted(json.loads(x)["n"] for x in lines_of(path)), list(range(9)))
        self.assertEqual((rec.written_total(), rec.dropped), (9, {"queue_full": 1}))
        self.assertEqual(rec.queue.bytes, 0)

    def test_records_the_writer_took_but_has_not_encoded_count_as_backlog(self):
        # The writer takes a batch off the queue at once: the queue looks empty while the
        # writer still has the whole batch to encode. Request threads go on helping then.
        entered, gate = threading.Event(), threading.Event()
        encoded_by = {}

        def slow_first(item):
            n = json.loads(item[2])["n"]
            encoded_by[n] = threading.current_thread().name
            if n == 0:
                entered.set()
                gate.wait(DEADLINE)
            return encode(item)

        rec = Recorder(self.data_dir, slow_first, queue_size=100, ops=self.ops, assist_above=10)
        self.addCleanup(rec.close, DEADLINE)
        self.addCleanup(gate.set)
        for n in range(20):
            rec.submit(line("s", n))
        self.assertEqual(rec.assisted, 10)  # past 10 queued, before the writer started
        rec.start()
        self.assertTrue(entered.wait(DEADLINE))  # the writer holds the batch, stuck on its first
        self.assertEqual(rec.queue.qsize(), 0)
        rec.submit(line("s", 20))
        self.assertEqual((rec.assisted, encoded_by[20]), (11, threading.current_thread().name))
        gate.set()
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], list(range(21)))

    def test_assist_above_is_off_by_default_and_below_half_the_queue(self):
        self.assertEqual(self.recorder(start=False).assist_above, 0)
        self.assertEqual(self.recorder(start=False, queue_size=8, assist_above=1024).assist_above, 4)
        rec = self.recorder(start=False, queue_size=8, assist_above=2)
        rec.degraded = True  # records may not be written at all: no request thread spends time on them
        for n in range(5):
            rec.submit(line("s", n))
        self.assertEqual(rec.assisted, 0)
        rec.degraded = False
        for n in range(5, 10):  # the queue holds 5 of its 8: 3 encoded here, then 2 dropped unencoded
            rec.submit(line("s", n))
        self.assertEqual((rec.assisted, rec.dropped), (3, {"queue_full": 2}))

    def test_full_queue_and_closed_recorder_drop_and_count(self):
        rec = self.recorder(start=False, queue_size=2)
        self.assertTrue(rec.submit(line("s", 0)))
        self.assertTrue(rec.submit(line("s", 1)))
        self.assertFalse(rec.submit(line("s", 2)))
        self.assertTrue(rec.queue_full())
        self.assertEqual(rec.dropped, {"queue_full": 1})
        rec.start()
        rec.close(DEADLINE)
        self.assertIn("records dropped in this run: queue_full 1", self.logs.messages)
        self.assertFalse(rec.submit(line("s", 3)))
        self.assertEqual(rec.dropped_total(), 2)
        self.assertEqual(rec.written_total(), 2)

    def test_the_queue_is_bounded_in_bytes_too(self):
        size_of = lambda item: len(item[2])  # noqa: E731 (the bytes of the test line)
        one = len(line("s", 0, 60)[2])
        rec = self.recorder(start=False, queue_max_bytes=2 * one + 10, size_of=size_of)
        self.assertTrue(rec.submit(line("s", 0, 60)))
        self.assertTrue(rec.submit(line("s", 1, 60)))
        self.assertFalse(rec.submit(line("s", 2, 60)))  # a third would pass the byte bound
        self.assertEqual(rec.queue.bytes, 2 * one)
        self.assertEqual(rec.dropped, {"queue_full": 1})
        self.assertTrue(any("record queue full" in m for m in self.logs.messages), self.logs.messages)
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        self.assertEqual(rec.queue.bytes, 0)  # the writer gave the bytes back
        self.assertTrue(rec.submit(line("s", 3, 60)))
        self.assertTrue(rec.flush(DEADLINE))
        self.assertEqual(rec.written_total(), 3)
        self.assertEqual(rec.queue.bytes, 0)

    def test_one_record_larger_than_the_byte_bound_is_taken_when_the_queue_is_empty(self):
        rec = self.recorder(start=False, queue_max_bytes=100, size_of=lambda item: len(item[2]))
        self.assertTrue(rec.submit(line("s", 0, 500)))
        self.assertTrue(rec.queue_full())  # what fail_closed answers 503 for
        self.assertFalse(rec.submit(line("s", 1, 10)))  # nothing more until it is written
        rec.start()
        self.assertTrue(rec.flush(DEADLINE))
        self.assertFalse(rec.queue_full())
        self.assertTrue(rec.submit(line("s", 2, 10)))
        self.assertTrue(rec.flush(DEADLINE))
        [path] = data_files(self.data_dir)
        self.assertEqual([json.loads(x)["n"] for x in lines_of(path)], [0, 2])

    def test_byte_count_is_exact_under_racing_threads(self):
        q = storage.RecordQueue(10 ** 6, 10 ** 9, size_of=len)
        start = threading.Barrier(8)

        def churn():
            start.wait()
            for n in range(2000):
                q.put_nowait(b"x" * (n % 7 + 1))
        threads = [threading.Thread(target=churn) for _ in range(8)]
        for t in threads:
            t.start()
        taken = []
        while any(t.is_alive() for t in threads) or q.qsize():
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                continue
            taken.append(item)
            if len(taken) == 100:
                q.taken(taken)
                taken = []
        for t in threads:
            t.join()
        q.taken(taken)
        self.assertEqual(q.bytes, 0)

    def degrade_then_recover(self, rec: Recorder) -> None:
        """A write fails (EROFS): ``rec`` is degraded; the dir writable again, its idle probe
        (every fsync_interval) clears that."""
        blocked = {"on": True}

        def fault(op, path, data):
            if blocked["on"] and op in ("open", "write"):
                raise OSError(errno.EROFS, "Read-only file system")
        self.ops.fault = fault
        self.put(rec, line("s", 0))
        self.assertTrue(rec.degraded)
        self.assertIn("EROFS", rec.last_error)
        blocked["on"] = False
        deadline = time.monotonic() + DEADLINE
        while rec.degraded and time.monotonic() < deadline:
            self.ops.synced.wait(0.05)  # the idle probe runs every fsync_interval
        self.assertFalse(rec.degraded)

    def test_probe_clears_degraded_when_the_dir_is_writable_again(self):
        self.degrade_then_recover(self.recorder(fsync="interval", fsync_interval=0.02))
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, ".proxy_llm_probe")))

    def test_each_worker_probes_its_own_file(self):
        # Two workers degraded together probed one file, each removing the other's.
        self.degrade_then_recover(self.recorder(fsync="interval", fsync_interval=0.02, file_suffix="_w1"))
        with self.ops.lock:
            probed = [os.path.basename(p) for op, p in self.ops.calls if op == "open" and "probe" in p]
        self.assertEqual(set(probed), {".proxy_llm_probe_w1"})


class PermissionsTest(RecorderTestCase):
    def test_files_0600_and_dirs_0700_whatever_the_umask(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        rec = self.recorder(max_file_size=200, compress_rotated=True)
        for n in range(5):
            self.put(rec, [line("s", n, 100), line("s", n, 100, kind=STREAMS)])
        rec.close(DEADLINE)
        self.assertTrue(any(p.endswith(".gz") for p in data_files(self.data_dir)))
        for d, dirs, files in os.walk(self.data_dir):
            self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700, d)
            for f in files:
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode), 0o600, f)

    def test_unsafe_session_ids_from_any_caller_stay_inside_the_data_dir(self):
        rec = self.recorder()
        for sid in ("../../escape", "/abs/path", "..", ".", "", "a\0b", "x" * 65, "ok"):
            self.put(rec, (RECORDS, sid, b'{"a":1}\n'))
        rec.close(DEADLINE)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "escape")))
        names = sorted(os.listdir(self.data_dir))
        self.assertIn("session_ok", names)
        self.assertEqual(len(names), 8)
        for name in names:
            self.assertRegex(name, r"^session_[A-Za-z0-9._-]{1,64}$")
        self.assertEqual(storage.safe_sid("../x"), storage.safe_sid("../x"))
        self.assertNotEqual(storage.safe_sid("../x"), storage.safe_sid("../y"))


class RateLimitedLogTest(unittest.TestCase):
    """The limiter the recorder's warnings and the operator's notices (proxy_llm.notices) share,
    on a clock the test moves: no sleep."""

    def test_the_first_at_once_then_one_per_interval_with_the_count_left_out(self):
        clock = unittest.mock.Mock(return_value=1000.0)
        logger = logging.getLogger("proxy_llm.test_ratelog")
        ratelog = storage.RateLimitedLog(logger, 10.0, clock)
        with self.assertLogs(logger, "INFO") as logs:
            self.assertTrue(ratelog.warning(("openai", "upstream_unavailable"), "down: %s", "a"))
            for _ in range(41):
                clock.return_value += 0.2
                self.assertFalse(ratelog.warning(("openai", "upstream_unavailable"), "down: %s", "b"))
            self.assertTrue(ratelog.warning(("openai", "timeout"), "slow"))  # another kind: its own limit
            self.assertTrue(ratelog.info(("anthropic", "auth"), "refused"))  # another provider too
            clock.return_value = 1012.0
            self.assertTrue(ratelog.warning(("openai", "upstream_unavailable"), "down: %s", "c"))
            clock.return_value += 1.0
            self.assertFalse(ratelog.warning(("openai", "upstream_unavailable"), "down: %s", "d"))
        self.assertEqual(logs.output, ["WARNING:proxy_llm.test_ratelog:down: a",
                                       "WARNING:proxy_llm.test_ratelog:slow",
                                       "INFO:proxy_llm.test_ratelog:refused",
                                       "WARNING:proxy_llm.test_ratelog:down: c (and 41 more in the last 12 s)"])

    def test_flush_tells_the_lines_held_back_once(self):
        # At stop: a trouble that went on to the end (or ended within the interval of its last
        # line) was never told in full; its last line held back and how many there were.
        clock = unittest.mock.Mock(return_value=1000.0)
        logger = logging.getLogger("proxy_llm.test_ratelog")
        ratelog = storage.RateLimitedLog(logger, 10.0, clock)
        with self.assertLogs(logger, "INFO") as logs:
            ratelog.warning("down", "down: %s", "a")
            for letter in "bcd":
                clock.return_value += 1.0
                ratelog.warning("down", "down: %s", letter)
            ratelog.info("auth", "refused %d", 1)
            clock.return_value += 1.0
            ratelog.info("auth", "refused %d", 2)
            ratelog.warning("timeout", "slow")  # (none held back)
            clock.return_value += 1.0
            self.assertEqual(ratelog.flush(), 2)
            self.assertEqual(ratelog.flush(), 0)  # (told once)
            clock.return_value += 20.0
            self.assertTrue(ratelog.warning("down", "down: %s", "e"))  # (a count flushed is not said again)
        self.assertEqual(sorted(logs.output), sorted([
            "WARNING:proxy_llm.test_ratelog:down: a",
            "INFO:proxy_llm.test_ratelog:refused 1",
            "WARNING:proxy_llm.test_ratelog:slow",
            "WARNING:proxy_llm.test_ratelog:down: d (and 2 more in the last 5 s)",
            "INFO:proxy_llm.test_ratelog:refused 2",
            "WARNING:proxy_llm.test_ratelog:down: e"]))
        self.assertEqual(logs.output[:3], ["WARNING:proxy_llm.test_ratelog:down: a",
                                           "INFO:proxy_llm.test_ratelog:refused 1",
                                           "WARNING:proxy_llm.test_ratelog:slow"])


if __name__ == "__main__":
    unittest.main()
