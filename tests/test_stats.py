from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import unittest.mock
from contextlib import redirect_stderr, redirect_stdout

from proxy_llm import stats
from tests import data_factory as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stats(*argv: str, default_data_dir=None):
    parser = argparse.ArgumentParser(prog="proxy_llm stats")
    stats.add_arguments(parser)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = stats.run(args, default_data_dir)
    return code, out.getvalue(), err.getvalue()


def nearest_rank(values, p):
    ordered = sorted(values)
    k = 0
    while (k + 1) / len(ordered) < p / 100.0:
        k += 1
    return ordered[k]


class TestPercentile(unittest.TestCase):
    def test_nearest_rank(self) -> None:
        self.assertIsNone(stats.percentile([], 50))
        self.assertEqual(stats.percentile([5.0], 95), 5.0)
        values = list(range(1, 101))
        self.assertEqual(stats.percentile(values, 50), 50)
        self.assertEqual(stats.percentile(values, 95), 95)
        self.assertEqual(stats.percentile([3, 1, 2], 50), 2)
        self.assertEqual(stats.percentile([1, 2, 3, 4], 95), 4)


class TestStats(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="stats-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.man = df.build_mixed(self.data)

    def json_report(self) -> dict:
        code, out, err = run_stats("--data-dir", self.data, "--json")
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def test_totals_match_the_records(self) -> None:
        report = self.json_report()
        recs = self.man.records
        total = report["total"]
        self.assertEqual(total["requests"], len(recs))
        for ending in df.ENDINGS:
            self.assertEqual(total["ended"].get(ending, 0), sum(1 for r in recs if r["ended"] == ending))
        self.assertEqual(total["http_errors"],
                         sum(1 for r in recs if r["status_code"] is None or r["status_code"] >= 400))
        self.assertEqual(total["status"], {"2xx": len(recs) - 3, "4xx": 2, "none": 1})
        for kind in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            self.assertEqual(total["tokens"].get(kind, 0),
                             sum(r.get("tokens_used", {}).get(kind, 0) for r in recs), kind)
        durations = [r["duration"] for r in recs]
        self.assertEqual(total["duration_ms"], {"p50": nearest_rank(durations, 50),
                                                "p95": nearest_rank(durations, 95)})
        ttfts = [r["ttft_ms"] for r in recs if "ttft_ms" in r]
        self.assertEqual(total["ttft_ms"]["p95"], nearest_rank(ttfts, 95))
        self.assertEqual(total["request_bytes"], sum(r["request_bytes"] for r in recs))
        self.assertEqual(report["read"]["torn"], 1)
        self.assertEqual(report["read"]["records"], len(recs))

    def test_a_count_below_zero_is_not_summed(self) -> None:
        # Builds before 2026-12-07 recorded a -1 some servers send for a count they do not
        # know (verify names such records); the sums leave it out.
        before = self.json_report()["total"]["tokens"]
        clock = df.Clock(seed=5, start=df.T0.replace(hour=21))
        rec = df.openai_chat(clock, "negative", [{"role": "user", "content": "hi"}], {"content": "yo"})
        rec["tokens_used"] = {"prompt_tokens": 7, "completion_tokens": -1, "total_tokens": -1}
        df.DataDirWriter(self.data).write_records([rec], stamp="20261127_210000", streams=False)
        after = self.json_report()["total"]["tokens"]
        self.assertEqual(after["prompt_tokens"], before["prompt_tokens"] + 7)
        self.assertEqual(after["completion_tokens"], before["completion_tokens"])
        self.assertEqual(after["total_tokens"], before["total_tokens"])

    def test_groups_by_session_model_and_provider(self) -> None:
        report = self.json_report()
        recs = self.man.records
        self.assertEqual(set(report["sessions"]), {r["session_id"] for r in recs})
        self.assertEqual(set(report["models"]), {r["model"] or "(none)" for r in recs})
        self.assertEqual(set(report["providers"]), {r["provider"] for r in recs})
        for name, group in report["sessions"].items():
            self.assertEqual(group["requests"], sum(1 for r in recs if r["session_id"] == name))
        self.assertEqual(sum(g["requests"] for g in report["models"].values()), len(recs))
        gem = report["models"]["gemini-2.0-flash"]
        self.assertEqual(gem["ended"], {"completed": 2, "shutdown": 1})

    def test_text_tables(self) -> None:
        code, out, _ = run_stats("--data-dir", self.data)
        self.assertEqual(code, 0)
        self.assertIn("1 torn line skipped", out.splitlines()[0])
        for header in ("session ", "model ", "provider "):
            self.assertIn("\n" + header, out)
        for name in ("agent-1", "claude-sonnet-4-5", "anthropic", "(none)"):
            self.assertIn(name, out)
        total_lines = [line for line in out.splitlines() if line.startswith("total ")]
        self.assertEqual(len(total_lines), 3)
        self.assertEqual(total_lines[0].split()[1], str(len(self.man.records)))

    def test_files_the_recorder_did_not_name_are_skipped_counted_and_named(self) -> None:
        # notes.jsonl in a session directory was read as records: its copy of a chat record
        # counted as one more request.
        strays = [os.path.relpath(p, self.data) for p in df.write_strays(self.data, self.man)
                  if not os.path.relpath(p, self.data).startswith("streams")]
        report = self.json_report()
        self.assertEqual(report["total"]["requests"], len(self.man.records))
        self.assertEqual(report["read"]["records"], len(self.man.records))
        self.assertEqual(report["read"]["skipped_files"], len(strays))
        self.assertEqual(report["skipped"], strays)
        code, out, _ = run_stats("--data-dir", self.data)
        self.assertEqual(code, 0)
        head = out.split("\n\n")[0].splitlines()
        self.assertIn("%d files not named as the recorder names its files skipped" % len(strays), head[0])
        self.assertEqual(head[1:], ["skipped, not named as the recorder names its files: " + name for name in strays])
        self.assertEqual([line for line in out.splitlines() if line.startswith("total ")][0].split()[1],
                         str(len(self.man.records)))

    def test_a_twin_is_read_once_and_named(self) -> None:
        plain = sorted(glob.glob(os.path.join(self.data, "session_*", "*.jsonl")))[0]
        with open(plain, "rb") as src, gzip.open(plain + ".gz", "wb") as dst:
            dst.write(src.read())
        twin = os.path.relpath(plain + ".gz", self.data)
        report = self.json_report()
        self.assertEqual(report["total"]["requests"], len(self.man.records))
        self.assertEqual(report["twins"], [twin])
        code, out, _ = run_stats("--data-dir", self.data)
        self.assertEqual(code, 0)
        self.assertIn("\nread once, as the plain file beside it (a compression cut short): " + twin,
                      out.split("\n\n")[0])

    def test_empty_and_missing_data_dirs(self) -> None:
        empty = os.path.join(self.tmp, "empty")
        os.mkdir(empty)
        code, out, _ = run_stats("--data-dir", empty)
        self.assertEqual(code, 0)
        self.assertIn("no records", out)
        code, out, err = run_stats("--data-dir", os.path.join(self.tmp, "missing"))
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_default_data_dir(self) -> None:
        code, out, _ = run_stats("--json", default_data_dir=self.data)
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["total"]["requests"], len(self.man.records))

    def test_as_a_subprocess(self) -> None:
        if not os.path.exists(os.path.join(ROOT, "proxy_llm", "cli.py")):
            self.skipTest("cli.py not there yet")
        proc = subprocess.run([sys.executable, "-m", "proxy_llm", "stats", "--data-dir", self.data, "--json"],
                              cwd=self.tmp, env=dict(os.environ, PYTHONPATH=ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["total"]["requests"], len(self.man.records))


class TestOddRecords(unittest.TestCase):
    """Records no proxy wrote (hand-edited, or from another tool): the subcommands report what
    they can and never stop on them (each case once stopped one with a traceback)."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="stats-odd-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        os.makedirs(os.path.join(self.data, "session_s"))
        self.path = os.path.join(self.data, "session_s", "session_s_20261127_000000.jsonl")

    def write(self, *lines: bytes) -> None:
        with open(self.path, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))

    def command(self, *argv: str) -> subprocess.CompletedProcess:
        # A strict UTF-8 terminal: what a lone surrogate or a file name that is not UTF-8 meets.
        return subprocess.run([sys.executable, "-m", "proxy_llm"] + list(argv) + ["--data-dir", self.data],
                              cwd=self.tmp, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)

    def test_numbers_no_float_holds(self) -> None:
        self.write(b'{"id":"a","session_id":"s","duration":1e400,"ttft_ms":1e999,"request_bytes":1e999,"status_code":true}',
                   b'{"id":"b","session_id":"s","duration":%s,"response_bytes":%s}' % (b"9" * 400, b"9" * 400),
                   b'{"id":"c","session_id":"s","duration":2.5,"status_code":200,"request_bytes":10}')
        for argv in (["stats"], ["stats", "--json"]):
            with self.subTest(argv=argv):
                proc = self.command(*argv)
                self.assertEqual(proc.returncode, 0, proc.stderr)
        report = json.loads(self.command("stats", "--json").stdout)["total"]
        self.assertEqual(report["requests"], 3)
        self.assertEqual(report["duration_ms"], {"p50": 2.5, "p95": 2.5})  # only the one that is a time
        self.assertEqual((report["request_bytes"], report["response_bytes"]), (10, 0))
        self.assertEqual(report["status"], {"2xx": 1, "none": 2})  # true is not a status

    def test_nan_and_infinity_lines_are_bad_lines(self) -> None:
        self.write(b'{"id":"a","session_id":"s","duration":NaN}', b'{"id":"b","session_id":"s","duration":-Infinity}',
                   b'{"id":"c","session_id":"s","duration":1.5}')
        report = json.loads(self.command("stats", "--json").stdout)
        self.assertEqual(report["total"]["requests"], 1)
        self.assertEqual(report["read"]["bad_lines"], 2)
        proc = self.command("verify")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn(b"record lines that do not parse (2)", proc.stdout)

    def test_names_a_terminal_cannot_show_are_escaped(self) -> None:
        self.write(b'{"id":"a","session_id":"a\\ud800","model":"m\\u001b[31m","x\\udfff":1,"duration":1}')
        proc = self.command("stats")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(b"a\\ud800", proc.stdout)
        self.assertIn(b"m\\x1b[31m", proc.stdout)
        self.assertNotIn(b"\x1b", proc.stdout)
        proc = self.command("verify")
        self.assertIn(proc.returncode, (0, 1), proc.stderr)
        self.assertIn(b"x\\udfff", proc.stdout)

    def test_a_crash_is_exit_status_3_not_problems_found(self) -> None:
        from proxy_llm import cli
        err = io.StringIO()
        with unittest.mock.patch.object(stats, "run", side_effect=RuntimeError("a bug")), redirect_stderr(err):
            code = cli.main(["stats", "--data-dir", self.data])
        self.assertEqual(code, cli.INTERNAL_ERROR)
        self.assertIn("RuntimeError: a bug", err.getvalue())


if __name__ == "__main__":
    unittest.main()
