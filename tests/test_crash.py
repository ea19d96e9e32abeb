"""kill -9 under load, again and again, on the same data dir.

What the recorder promises (README, "Durability") and what this test checks after every kill:

* Every record the proxy had reported as written (``/health`` ``records_written``, read just
  before the kill) is on disk: a written record is in the OS's page cache, which a process
  crash does not lose (power loss is another matter: that is what ``fsync`` is for).
* A record is queued when its exchange ends, after the client has the response, and is written
  by one writer thread; records still queued at a crash are lost (``record_queue_depth`` shows
  the lag, which grows when the disk is slow). Once ``records_written`` has caught up, every
  exchange that ended before has its record: every other run stops the load, waits for that,
  then kills.
* Every line that is whole parses; a file holds at most one torn line, its last.
* A restart never appends to an old file: files from earlier runs keep their exact bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import unittest
from typing import Dict, List, Tuple

from proxy_llm import reader
from tests.support import DEADLINE, FakeUpstream, ProxyProcess, Reply, base_config, json_reply, provider

SEED = 20261127
RUNS = 5
CLIENTS = 4


def upstream_reply(req) -> Reply:
    body = req.json()
    size = body.get("size", 10)
    if body.get("stream"):
        events = []
        for n in range(body.get("events", 3)):
            obj = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
                   "choices": [{"index": 0, "delta": {"content": "x" * size}, "finish_reason": None}]}
            events.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
        return Reply(200, [("Content-Type", "text/event-stream")], events + [b"data: [DONE]\n\n"])
    return json_reply({"id": "x", "object": "chat.completion", "model": "gpt-4o",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * size},
                                    "finish_reason": "stop"}]})


def snapshot(root: str) -> Dict[str, str]:
    """The digest of each record file's lines, by its plain name (X.jsonl, also when it is
    X.jsonl.gz: a later start compresses an earlier run's files; of twins, X.jsonl)."""
    out = {}
    for d, _, files in os.walk(root):
        for name in sorted(files, reverse=True):  # (X.jsonl after X.jsonl.gz: its digest kept)
            if ".jsonl" in name and not name.endswith(".tmp"):
                out[plain(os.path.join(d, name))] = digest(os.path.join(d, name))
    return out


def plain(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def digest(path: str) -> str:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        return hashlib.sha256(f.read()).hexdigest()


class Load:
    """Client threads sending a seeded mix of small, large, plain and streamed requests."""

    def __init__(self, port: int, seed: int):
        self.port = port
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()  # protects done
        self.done: List[Tuple[str, float]] = []  # (record id, monotonic time the response was complete)
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def client(self, n: int) -> None:
        rng = random.Random(self.seed * 100 + n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        try:
            while not self.stop.is_set():
                body = {"model": "gpt-4o", "stream": rng.random() < 0.5, "size": rng.choice([10, 500, 5000, 20000]),
                        "events": rng.randint(1, 5),
                        "messages": [{"role": "user", "content": "z" * rng.randint(0, 3000)}]}
                try:
                    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                                 headers={"Content-Type": "application/json", "X-Session-Id": "s%d" % rng.randint(0, 5)})
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    return  # the proxy was killed
                finished = time.monotonic()
                if resp.status == 200:
                    with self.lock:
                        self.done.append((resp.getheader("X-Proxy-Record-Id"), finished))
        finally:
            conn.close()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(DEADLINE)


class CrashTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_crash_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.upstream = FakeUpstream(upstream_reply)
        self.upstream.server.handle_error = lambda request, address: None  # resets are expected here
        self.upstream.start()
        self.addCleanup(self.upstream.stop)

    def health(self, port: int) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def check_files(self) -> List[dict]:
        """Whole lines parse, at most one torn line per file and only last; returns the records."""
        stats = reader.ReadStats()
        recs = list(reader.iter_records(self.data_dir, stats))
        list(reader.iter_stream_lines(self.data_dir, stats))
        self.assertEqual(stats.bad_lines, [])
        self.assertEqual(stats.problems, [])
        torn_paths = [path for path, _ in stats.torn_lines]
        self.assertEqual(len(torn_paths), len(set(torn_paths)), "a file with two torn lines")
        for path, lineno in stats.torn_lines:
            # (A torn file of an earlier run may be gzip'd by now: a start settles them.)
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                self.assertEqual(len(f.read().split(b"\n")), lineno, "a torn line that is not the last: " + path)
        return recs

    def test_kill_9_under_load_then_restart_on_the_same_dir(self):
        rng = random.Random(SEED)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir,
                          max_file_size=1024 * 1024, compress_rotated=True)
        all_done = []
        for run in range(RUNS):
            before = snapshot(self.data_dir)
            proc = ProxyProcess(cfg)
            self.addCleanup(proc.cleanup)
            load = Load(proc.port, SEED + run).start()
            load.stop.wait(rng.uniform(0.4, 1.2))  # a seeded random moment under load
            quiesced = run % 2 == 1
            if quiesced:
                load.join()
                deadline = time.monotonic() + DEADLINE
                while True:
                    health = self.health(proc.port)
                    # An empty queue is not enough: the writer may still hold the last batch.
                    if health["inflight"] == 0 and health["records_written"] >= len(load.done):
                        break
                    self.assertLess(time.monotonic(), deadline, "the writer never caught up")
                    load.stop.wait(0.01)
            written = self.health(proc.port)["records_written"]
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(DEADLINE)
            load.join()
            self.assertGreater(len(load.done), 0)

            recs = self.check_files()
            ids = {r["id"] for r in recs}
            self.assertEqual(len(ids), len(recs), "a record written twice")
            for path, lines in before.items():  # never appended to, never rewritten (maybe compressed)
                self.assertTrue(os.path.exists(path) or os.path.exists(path + ".gz"),
                                "a file of an earlier run vanished: " + path)
                self.assertEqual(digest(path if os.path.exists(path) else path + ".gz"), lines, path)
            new_files = set(snapshot(self.data_dir)) - set(before)
            new_records = sum(1 for path, _, _ in reader.iter_record_lines(self.data_dir) if plain(path) in new_files)
            self.assertGreaterEqual(new_records, written, "records reported written were lost (run %d)" % run)
            if quiesced:
                self.assertEqual(new_records, written)
                missing = [rid for rid, _ in load.done if rid not in ids]
                self.assertEqual(missing, [], "run %d: exchanges ended before an empty queue have no record" % run)
            all_done.extend(load.done)

        # A clean start on the crashed dir works and a clean stop loses nothing.
        proc = ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        self.assertEqual(self.health(proc.port)["status"], "ok")
        self.assertEqual(proc.stop(), 0)
        recs = self.check_files()
        if os.environ.get("PROXY_LLM_CRASH_VERBOSE"):
            stats = reader.ReadStats()
            list(reader.iter_records(self.data_dir, stats))
            print("\n%d responses, %d records, %s, %d twins" % (len(all_done), len(recs), stats.summary(),
                                                                len(stats.twins)))


if __name__ == "__main__":
    unittest.main()
