"""A seconds-long pass of the benchmark (tests/bench), so that it never rots.

It runs the real mock upstream, the TCP relay, the bare forwarder and proxy_llm (recording on) as
subprocesses, through every scenario with tiny counts, and asserts correctness
only: answers received, streams whole and in order, every record found exactly
once with the exact content.  Never timing: this machine may be busy.
"""
from __future__ import annotations

import sys
import unittest

from tests.bench import run


def tiny_options():
    opts = run.parse_args(["--quick", "--silent", "--targets", "direct,relay,forwarder,rec_on"])
    opts.settle_s = 0.0
    opts.rounds = 1
    opts.latency_s = 0.2
    opts.rate_s = 0.3          # 15 requests at 50/s
    opts.sat_s = 0.2
    opts.big_s = 0.2
    opts.streams = 20
    opts.chunks = 3
    opts.interval_ms = 20
    opts.ttft_ms = 20
    opts.python = sys.executable
    return opts


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
            for key in ("c1_p50", "r50_p50", "s16_rps", "s64_rps", "big_rps"):
                self.assertIn(key, f, name)
            self.assertGreater(f["max_rps"], 0, name)

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


if __name__ == "__main__":
    unittest.main()
