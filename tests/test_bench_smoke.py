"""A seconds-long pass of the benchmark (tests/bench), so that it never rots.

It runs the real mock upstream, the TCP relay, the bare forwarder and proxy_llm (recording on) as
subprocesses, through every scenario with tiny counts, and asserts correctness
only: answers received, streams whole and in order, every record found exactly
once with the exact content.  Never timing: this machine may be busy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import unittest
import unittest.mock

from tests.bench import encode, records, run, wrk


def tiny_options(*extra):
    opts = run.parse_args(["--quick", "--silent", "--targets", "direct,relay,forwarder,rec_on", "--loadgen", "python"]
                          + list(extra))
    opts.settle_s = 0.0
    opts.rounds = 1
    opts.latency_s = 0.2
    opts.rate_s = 0.3          # 15 requests at 50/s
    opts.sat_s = 0.2
    opts.big_s = 0.2
    opts.sustain_s = 0.2
    opts.streams = 20
    opts.chunks = 3
    opts.interval_ms = 20
    opts.ttft_ms = 20
    opts.python = sys.executable
    return opts


class RoundOrderTest(unittest.TestCase):
    def test_each_target_follows_and_precedes_its_neighbours_alike(self):
        for n in range(2, 9):
            targets = ["t%d" % i for i in range(n)]
            after = {}  # (a, b): rounds in which b ran right after a
            for r in range(2 * n):
                order = run.round_order(targets, r)
                self.assertEqual(sorted(order), sorted(targets))
                for a, b in zip(order, order[1:]):
                    after[(a, b)] = after.get((a, b), 0) + 1
            for (a, b), count in after.items():
                self.assertEqual(after.get((b, a), 0), count, (n, a, b))
        self.assertEqual(run.round_order(["a", "b", "c"], 0), ["a", "b", "c"])
        self.assertEqual(run.round_order(["a", "b", "c"], 1), ["c", "b", "a"])
        self.assertEqual(run.round_order(["a", "b", "c"], 2), ["b", "c", "a"])
        self.assertEqual(run.parse_args([]).rounds % 2, 0)  # the default runs each order both ways


class FakeTarget:
    """task_cpu() plays back samples of (pid, tid) -> ns; the fake clock moves with sleep()."""

    def __init__(self, samples):
        self.samples = list(samples)
        self.now = 0.0

    def task_cpu(self):
        return self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class SettleTest(unittest.TestCase):
    """run.settle: how long a target keeps working after the load stops (no timing: fake clock)."""

    def settle(self, samples):
        t = FakeTarget(samples)
        return run.settle(t, clock=t.clock, sleep=t.sleep)

    def test_quiet_at_once(self):
        busy = 10 ** 5  # 0.1 ms in a 10 ms window: 1 % of a core
        self.assertEqual(self.settle([{(1, "1"): 0}, {(1, "1"): busy}]), 0.0)

    def test_no_process_of_its_own(self):
        self.assertEqual(self.settle([{}]), 0.0)

    def test_a_writer_still_busy_for_three_windows(self):
        ms = 10 ** 6
        samples = [{(1, "w"): 0}, {(1, "w"): 9 * ms}, {(1, "w"): 18 * ms}, {(1, "w"): 27 * ms},
                   {(1, "w"): 27 * ms}]
        self.assertAlmostEqual(self.settle(samples), 3 * run.QUIET_WINDOW)

    def test_a_thread_exiting_does_not_hide_the_others_work(self):
        # The handler thread exits with 50 ms of CPU, while the writer works a whole window.
        ms = 10 ** 6
        samples = [{(1, "w"): 0, (1, "h"): 50 * ms}, {(1, "w"): 10 * ms}, {(1, "w"): 10 * ms}]
        self.assertAlmostEqual(self.settle(samples), run.QUIET_WINDOW)

    def test_gives_up_at_the_limit(self):
        ms = 10 ** 6
        samples = ({(1, "w"): k * 10 * ms} for k in range(int(run.SETTLE_MAX / run.QUIET_WINDOW) + 10))
        self.assertGreater(self.settle(samples), run.SETTLE_MAX)


class WriterThreadTest(unittest.TestCase):
    """targets.writer_ns: the CPU of each process's busiest thread alive at both samples, its
    main thread aside (proxy_llm's writer), summed over the processes."""

    def test_the_busiest_lasting_thread_of_each_process(self):
        from tests.bench.targets import writer_ns
        ms = 10 ** 6
        before = {(7, "7"): 0, (7, "8"): 5 * ms, (7, "9"): 1 * ms, (7, "10"): 0,
                  (20, "20"): 0, (20, "21"): 2 * ms, (20, "22"): 0}
        after = {(7, "7"): 90 * ms,    # the main thread: not counted, however busy
                 (7, "8"): 45 * ms,    # the writer: 40 ms
                 (7, "9"): 3 * ms,     # a quiet thread: 2 ms
                 (7, "11"): 80 * ms,   # a connection's, born during the load: not counted
                 (20, "20"): 9 * ms, (20, "21"): 12 * ms, (20, "22"): 11 * ms}  # a worker: 11 ms
        self.assertEqual(writer_ns(before, after), 51 * ms)  # (7, "10") exited: not counted
        self.assertEqual(writer_ns({}, after), 0)


@unittest.skipUnless(sys.platform.startswith("linux"), "the benchmark reads /proc and uses SO_REUSEPORT")
class BenchSmokeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.opts = tiny_options()
        cls.figs = run.Bench(cls.opts).run()

    def test_every_target_started(self):
        for name in self.opts.targets:
            self.assertIsNone(self.figs[name]["_error"], name)

    def test_requests_answered_without_errors(self):
        for name in self.opts.targets:
            f = self.figs[name]
            self.assertEqual(f["errors"], 0, (name, f.get("_samples")))
            for key in ("c1_p50", "r50_p50", "s16_rps", "s64_rps", "big_rps", "s16_drain", "s64_drain"):
                self.assertIn(key, f, name)
            self.assertGreater(f["max_rps"], 0, name)
        for name in ("forwarder", "rec_on"):  # a process of their own: RSS sampled under load
            self.assertGreater(self.figs[name]["s64_peak_rss"], 1.0, name)
            self.assertGreater(self.figs[name]["big_peak_rss"], 1.0, name)
        self.assertNotIn("s64_peak_rss", self.figs["direct"])  # the mock is not a target's process
        for key in ("s16_writer", "s64_writer", "big_writer"):  # proxy_llm's writer thread, read from /proc
            self.assertGreaterEqual(self.figs["rec_on"][key], 0.0, key)
            self.assertNotIn(key, self.figs["forwarder"])

    def test_streams_whole_and_in_order(self):
        for name in self.opts.targets:
            f = self.figs[name]
            self.assertEqual(f["st_ok"], self.opts.streams, name)
            self.assertEqual(f["st_lost"], 0, name)
            self.assertEqual(f["st_frames_lost"], 0, name)
            self.assertEqual(f["st_reordered"], 0, name)

    def test_every_response_has_exactly_one_exact_record(self):
        rec = self.figs["rec_on"]["rec"]
        self.assertGreater(rec["expected"], 0)
        self.assertEqual(rec["problems"], [])
        self.assertEqual(rec["matched"], rec["expected"])
        self.assertEqual(rec["duplicated"], 0)
        self.assertEqual(rec["content_checked"], len(run.verify_requests("127.0.0.1", 1)))
        self.assertEqual(rec["content_ok"], rec["content_checked"])

    def test_table_renders_with_budget_lines(self):
        table, verdicts = run.render(self.figs, self.opts.targets)
        self.assertIn("| rec_on |", table)
        self.assertTrue(any("records matched" in line for line, _, _ in verdicts))


@unittest.skipUnless(sys.platform.startswith("linux"), "the benchmark reads /proc and uses SO_REUSEPORT")
@unittest.skipUnless(wrk.path(), "wrk is not installed (optional: the saturation load of the benchmark)")
class WrkSmokeTest(unittest.TestCase):
    """The saturation scenarios under wrk, and the record count that replaces the id check."""

    def test_saturation_under_wrk_answers_and_records_every_request(self):
        opts = tiny_options("--loadgen", "wrk", "--targets", "rec_on", "--scenarios", "sat16,verify")
        self.assertTrue(opts.use_wrk)
        bench = run.Bench(opts)
        f = bench.run()["rec_on"]
        self.assertEqual(f["errors"], 0, f.get("_samples"))
        self.assertGreater(f["s16_rps"], 0)
        self.assertGreater(f["s16_p99"], 0)
        tally = bench.tallies[("sat16", "rec_on")]
        self.assertGreater(tally.unnamed_ok, 0)
        self.assertEqual(tally.lat, [])  # wrk's percentiles, not the asyncio client's
        rec = f["rec"]
        self.assertEqual(rec["problems"], [])
        self.assertEqual(rec["expected"], len(bench.warm_ids["rec_on"]) + len(run.verify_requests("127.0.0.1", 1))
                         + tally.unnamed_ok)
        self.assertEqual(rec["matched"], rec["expected"])


class RecordCountTest(unittest.TestCase):
    """records.check for answers whose ids the client did not see (wrk): counted, not named."""

    def check(self, ids_in_files, named, unnamed):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        os.makedirs(os.path.join(tmp, "session_x"))
        with open(os.path.join(tmp, "session_x", "records.jsonl"), "w") as f:
            for rid in ids_in_files:
                f.write(json.dumps({"id": rid}) + "\n")
        return records.check(tmp, named, [], unnamed)

    def test_counts(self):
        ok = self.check(["a", "u1", "u2", "u3"], ["a"], (3, 5))
        self.assertEqual((ok["expected"], ok["matched"], ok["problems"]), (4, 4, []))
        cut = self.check(["a", "u1", "u2", "u3", "u4", "u5"], ["a"], (3, 5))  # up to 5 answered or cut
        self.assertEqual((cut["matched"], cut["problems"]), (4, []))
        short = self.check(["a", "u1", "u2"], ["a"], (3, 5))
        self.assertEqual((short["matched"], short["missing"]), (3, 1))
        self.assertTrue(short["problems"])
        extra = self.check(["a", "u1", "u2", "u3", "u4", "u5", "u6"], ["a"], (3, 5))
        self.assertEqual(extra["duplicated"], 1)
        self.assertTrue(extra["problems"])
        twice = self.check(["a", "u1", "u1", "u2"], ["a"], (3, 5))
        self.assertEqual(twice["duplicated"], 1)
        self.assertTrue(twice["problems"])


class EncodeBenchTest(unittest.TestCase):
    """tests.bench.encode: its exchanges are the benchmark's requests, recorded exactly."""

    def test_exchanges_encode_to_the_requests_sent(self):
        sent = [body for _, body in run.small_requests("127.0.0.1", 8080)]
        enc = encode.encoder()
        recs = [json.loads(bytes(line)) for ex in encode.exchanges(4) for _, _, line in enc.encode(ex)]
        self.assertEqual([r["request_body"] for r in recs], [json.loads(b) for b in sent] * 2)
        self.assertEqual([r["provider"] for r in recs], ["openai", "anthropic"] * 2)
        self.assertEqual({r["tokens_used"]["total_tokens"] for r in recs}, {33})
        self.assertEqual({r["session_id"] for r in recs}, {"bench"})
        self.assertEqual(len({r["id"] for r in recs}), 4)

    def test_real_headers_vary_and_are_recorded_redacted(self):
        enc = encode.encoder()
        recs = [json.loads(bytes(line)) for ex in encode.exchanges(4, real_headers=True) for _, _, line in enc.encode(ex)]
        openai, anthropic = recs[0], recs[1]
        self.assertEqual(openai["request_headers"]["x-stainless-lang"], "python")
        self.assertRegex(openai["response_headers"]["set-cookie"], r"^\[REDACTED:\w{8}\], \[REDACTED:\w{8}\]$")
        self.assertIn("anthropic-ratelimit-requests-remaining", anthropic["response_headers"])
        self.assertNotEqual(recs[0]["response_headers"]["x-request-id"], recs[2]["response_headers"]["x-request-id"])

    def test_agent_embeddings_and_stream_exchanges_are_what_they_say(self):
        enc = encode.encoder()
        [agent] = [json.loads(bytes(line)) for ex in encode.exchanges(1, agent=True) for _, _, line in enc.encode(ex)]
        self.assertEqual(len(agent["request_body"]["tools"]), 20)
        self.assertGreater(agent["request_bytes"], 50000)
        [emb] = [json.loads(bytes(line)) for ex in encode.exchanges(1, embeddings=True) for _, _, line in enc.encode(ex)]
        self.assertEqual((emb["endpoint"], len(emb["response_body"]["data"][0]["embedding"])), ("/v1/embeddings", 1536))
        self.assertEqual(emb["tokens_used"]["prompt_tokens"], 100)
        lines = [(kind, json.loads(bytes(line))) for ex in encode.exchanges(2, stream=5) for kind, _, line in enc.encode(ex)]
        records = [rec for kind, rec in lines if kind == "records"]
        self.assertEqual([r["ended"] for r in records], ["completed", "completed"])
        self.assertEqual(records[0]["response_body"]["choices"][0]["message"]["content"],
                         "".join("tok%d " % i for i in range(5)))
        self.assertEqual(records[1]["response_body"]["content"][0]["text"], "".join("tok%d " % i for i in range(5)))

    def test_time_mode_runs(self):
        with unittest.mock.patch("sys.stdout", new_callable=io.StringIO) as out:
            self.assertEqual(encode.main(["--time", "--records", "10"]), 0)
        self.assertRegex(out.getvalue(), r"^encode: [0-9.]+ us per record")


if __name__ == "__main__":
    unittest.main()
