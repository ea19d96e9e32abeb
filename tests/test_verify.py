from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock
from contextlib import redirect_stderr, redirect_stdout

from proxy_llm import storage, verify
from tests import data_factory as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 20.0


def run_verify(*argv: str, default_data_dir=None):
    parser = argparse.ArgumentParser(prog="proxy_llm verify")
    verify.add_arguments(parser)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = verify.run(args, default_data_dir)
    return code, out.getvalue(), err.getvalue()


class VerifyTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="verify-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.man = df.build_mixed(self.data, torn=False)
        self.writer = df.DataDirWriter(self.data)
        self.clock = df.Clock(seed=99, start=df.T0.replace(hour=20))

    def verify(self):
        return run_verify("--data-dir", self.data)

    def assertProblem(self, kind_part: str, detail: str = "") -> str:
        code, out, err = self.verify()
        self.assertEqual(code, 1, out)
        self.assertIn("verify: FAILED", out)
        self.assertIn(kind_part, out)
        self.assertIn(detail, out)
        return out

    def add(self, rec: dict, stamp: str = "20261127_200000", streams: bool = True) -> str:
        return self.writer.write_records([rec], stamp=stamp, streams=streams)

    def chat(self, **kw) -> dict:
        return df.openai_chat(self.clock, "extra", [{"role": "user", "content": "hi"}], {"content": "yo"}, **kw)


class TestUnreadable(VerifyTestCase):
    """A session dir that cannot be listed and a record file that is a dangling symlink were
    skipped without a word: verify said OK, and stats and export counted fewer records."""

    def test_a_dangling_symlink_record_file_fails_verify(self) -> None:
        path = self.add(self.chat())
        os.unlink(path)
        os.symlink(os.path.join(self.tmp, "gone.jsonl"), path)
        self.assertProblem("dangling symlink", os.path.basename(path))

    def test_a_session_dir_that_cannot_be_listed_fails_verify(self) -> None:
        path = self.add(self.chat())
        hidden = os.path.dirname(path)
        listdir = os.listdir

        def refusing(directory="."):
            if os.path.abspath(directory) == os.path.abspath(hidden):
                raise PermissionError(13, "Permission denied")  # (tests run as root, who may list it)
            return listdir(directory)

        with mock.patch("os.listdir", refusing):
            out = self.assertProblem("cannot list the directory", "Permission denied")
        self.assertIn(os.path.basename(hidden), out)


class TestClean(VerifyTestCase):
    def test_a_clean_data_dir_passes(self) -> None:
        code, out, err = self.verify()
        self.assertEqual(code, 0, out)
        self.assertTrue(out.endswith("verify: OK\n"))
        self.assertIn("6 sessions, 8 record files, %d records" % len(self.man.records), out)
        self.assertIn("%d stream lines" % len(self.man.stream_ids), out)
        self.assertEqual(err, "")

    def test_a_stream_request_answered_with_a_json_error_needs_no_stream_line(self) -> None:
        rec = self.chat(stream=True, status_code=429)
        self.assertFalse(df.has_stream_line(rec))
        self.add(rec)
        self.assertEqual(self.verify()[0], 0)

    def test_a_plain_json_answer_to_a_stream_request_needs_no_stream_line(self) -> None:
        rec = self.chat(stream=True)
        rec["response_headers"]["content-type"] = "application/json"
        self.assertFalse(df.has_stream_line(rec))
        self.add(rec)
        self.assertEqual(self.verify()[0], 0)

    def test_a_gemini_json_array_stream_needs_its_stream_line(self) -> None:
        rec = df.gemini(self.clock, "extra", [{"role": "user", "parts": [{"text": "hi"}]}], [{"text": "yo"}],
                        stream=True, query="")
        rec["response_headers"]["content-type"] = "application/json; charset=UTF-8"
        self.assertTrue(df.has_stream_line(rec))
        self.add(rec, streams=False)
        self.assertProblem("streamed records without a stream line", rec["id"])

    def test_a_data_dir_without_streams_passes(self) -> None:
        # The recorder makes streams/ with its first stream line: a proxy that only ever saw
        # plain requests has none, and verify failed it ("streams: cannot list the directory").
        data = os.path.join(self.tmp, "plain")
        df.DataDirWriter(data).write_records([self.chat()])
        self.assertFalse(os.path.exists(os.path.join(data, "streams")))
        code, out, _ = run_verify("--data-dir", data)
        self.assertEqual(code, 0, out)
        self.assertIn("1 sessions, 1 record files, 1 records, 0 stream files, 0 stream lines", out)

    def test_the_key_file_and_unknown_fields_are_fine(self) -> None:
        with open(os.path.join(self.data, ".proxy_llm_key"), "wb") as fh:
            fh.write(b"k" * 32)
        rec = self.chat()
        rec["some_new_field"] = 1
        self.add(rec)
        code, out, _ = self.verify()
        self.assertEqual(code, 0, out)
        self.assertIn("unknown record fields (1):\n    some_new_field", out)
        self.assertNotIn(".proxy_llm_key", out)

    def test_files_version_control_keeps_in_the_data_dir_are_fine(self) -> None:
        # The shipped default data dir (data/ in the repository) holds a .gitkeep, which verify
        # listed as an unknown file.
        for name in (".gitkeep", ".gitignore"):
            open(os.path.join(self.data, name), "w").close()
        open(os.path.join(self.data, "notes.txt"), "w").close()
        code, out, _ = self.verify()
        self.assertEqual(code, 0, out)
        self.assertIn("unknown files (1):\n    notes.txt\n", out)
        self.assertNotIn(".git", out)

    def test_the_repositorys_own_data_dir_is_clean(self) -> None:
        # As the repository ships it (data/ holds only its .gitkeep: whatever a local run wrote
        # there is ignored by git, and not copied here).
        shipped = os.path.join(ROOT, "data", ".gitkeep")
        self.assertTrue(os.path.exists(shipped))
        data = os.path.join(self.tmp, "shipped")
        os.mkdir(data)
        shutil.copy(shipped, data)
        self.assertEqual(run_verify("--data-dir", data)[:2], (0, "verify: %s\n  0 sessions, 0 record files, 0 records, "
                                                             "0 stream files, 0 stream lines\nverify: OK\n" % data))

    def test_default_data_dir_and_missing_dir(self) -> None:
        self.assertEqual(run_verify(default_data_dir=self.data)[0], 0)
        code, out, err = run_verify("--data-dir", os.path.join(self.tmp, "nope"))
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)


class TestDamage(VerifyTestCase):
    def test_torn_last_line(self) -> None:
        path = self.add(self.chat())
        with open(path, "ab") as fh:
            fh.write(b'{"schema_version": 1, "id": ')
        self.assertProblem("torn last lines", os.path.relpath(path, self.data) + ":2")

    def test_bad_line_in_the_middle(self) -> None:
        path = self.add(self.chat())
        with open(path, "ab") as fh:
            fh.write(b"garbage\n" + df.dumps(self.chat()))
        self.assertProblem("record lines that do not parse", os.path.relpath(path, self.data) + ":2")

    def test_missing_field_and_wrong_types(self) -> None:
        rec = self.chat()
        del rec["ended"]
        rec["stream"] = "yes"
        rec["duration"] = "12ms"
        rec["tokens_used"] = {"prompt_tokens": 1.5}
        self.add(rec, streams=False)
        out = self.assertProblem("records that do not match the schema", "missing field ended")
        self.assertIn("stream: expected true or false", out)
        self.assertIn("duration: expected a number", out)
        self.assertIn("tokens_used: expected", out)

    def test_a_token_count_below_zero_is_a_finding(self) -> None:
        # The proxy leaves such a count out of tokens_used (dialects.is_count); one in a file
        # came from elsewhere, and would take any sum of the dataset's tokens down.
        rec = self.chat()
        rec["tokens_used"] = {"prompt_tokens": 4, "completion_tokens": -1}
        self.add(rec, streams=False)
        out = self.assertProblem("records that do not match the schema", "tokens_used: expected")
        self.assertIn("ints >= 0", out)

    def test_body_encoding_must_name_a_base64_body(self) -> None:
        rec = df.speech(self.clock, "extra")
        rec["body_encoding"] = {"request": "base64", "response": "hex"}
        self.add(rec, streams=False)
        out = self.assertProblem("records that do not match the schema", "body_encoding: expected")
        self.assertIn("request_body: expected base64", out)
        self.assertNotIn("response_body: expected base64", out)

    def test_bad_id_and_timestamp(self) -> None:
        rec = self.chat()
        rec["id"] = "not-a-ulid"
        rec["timestamp"] = "yesterday"
        self.add(rec)
        out = self.assertProblem("records that do not match the schema", "id: expected a 26-char ULID")
        self.assertIn("timestamp: expected an RFC 3339", out)

    def test_unredacted_credential_is_flagged_without_printing_it(self) -> None:
        rec = self.chat()
        rec["request_headers"]["authorization"] = "Bearer sk-live-abcdef123456"
        self.add(rec)
        out = self.assertProblem("records that do not match the schema",
                                 "request_headers.authorization: credential not redacted")
        self.assertNotIn("sk-live", out)

    def test_an_endpoint_that_still_holds_a_key_is_flagged_without_printing_it(self) -> None:
        # Before 2026-12-06 a key a client put in its base URL stayed in the record's endpoint.
        from proxy_llm import wire

        paths = ["/v1/sk-proj-abcdefghij0123456789XYZ/chat/completions",
                 "/v1/chat/completions;key=hunter2hunter2",
                 "/v1/chat/completions;api_key=q1w2e",
                 "/v1beta/models/gemini-2.0-flash:generateContent%3Fkey%3DAIzaSyA0123456789abcdefghijklmnopqrstuv"]
        for path in paths:
            with self.subTest(path=path):
                rec = self.chat()
                rec["endpoint"] = path
                self.add(rec, streams=False)
                out = self.assertProblem("records that do not match the schema",
                                         "endpoint: credential not redacted")
                for secret in ("sk-proj", "hunter2", "q1w2e", "AIzaSy"):
                    self.assertNotIn(secret, out)
                # As today's recorder writes it: redacted, and clean.
                shutil.rmtree(self.data)
                self.man = df.build_mixed(self.data, torn=False)
                rec["endpoint"] = wire.redact_path(path, wire.path_secrets(path), b"k" * 32)
                self.assertIn("[REDACTED:", rec["endpoint"])
                self.add(rec, streams=False)
                self.assertEqual(self.verify()[0], 0, self.verify()[1])
                shutil.rmtree(self.data)
                self.man = df.build_mixed(self.data, torn=False)

    def test_record_in_the_wrong_session_directory(self) -> None:
        rec = self.chat()
        path = self.add(rec, streams=False)
        moved = os.path.join(self.data, "session_gem-1", os.path.basename(path))
        os.rename(path, moved)
        self.assertProblem("records in another session's directory", "session 'extra' belongs in session_extra/")

    def test_files_the_recorder_did_not_name_are_problems_not_records(self) -> None:
        # notes.jsonl in a session directory was read as records (its record a duplicate of
        # the one it copied, its schema checked); it is now a file the readers skip.
        strays = df.write_strays(self.data, self.man)
        out = self.assertProblem(verify.SKIPPED + " (%d):" % len(strays))
        listed = out.split(verify.SKIPPED)[1].splitlines()[1:len(strays) + 1]
        self.assertEqual(sorted(line.strip() for line in listed),
                         sorted(os.path.relpath(p, self.data) for p in strays))
        self.assertIn("verify: FAILED: %d problems" % len(strays), out)  # and nothing else
        self.assertNotIn("unknown files", out)

    def test_unsafe_session_ids_live_under_their_hash(self) -> None:
        rec = df.openai_chat(self.clock, "team/alice:42", [{"role": "user", "content": "hi"}], {"content": "yo"})
        self.add(rec)
        self.assertTrue(os.path.isdir(os.path.join(self.data, "session_" + verify.session_file_id("team/alice:42"))))
        self.assertEqual(self.verify()[0], 0)
        self.assertEqual(verify.session_file_id("ok-id_1.2"), "ok-id_1.2")
        self.assertEqual(verify.session_file_id(".."), "h" + __import__("hashlib").sha256(b"..").hexdigest()[:16])

    def test_duplicate_ids(self) -> None:
        rec = self.chat()
        self.add(rec, streams=False)
        self.add(rec, stamp="20261127_200001", streams=False)
        self.assertProblem("duplicate record ids", rec["id"])

    def test_leftover_temp_file(self) -> None:
        path = os.path.join(self.data, "session_gem-1", "session_gem-1_20261127_165100.jsonl.gz.tmp")
        with open(path, "wb") as fh:
            fh.write(b"\x1f\x8b")
        self.assertProblem("leftover temp files", "session_gem-1_20261127_165100.jsonl.gz.tmp")

    def test_twin_files(self) -> None:
        path = os.path.join(self.data, "session_gem-1", "session_gem-1_20261127_165100.jsonl")
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            dst.write(src.read())
        self.assertProblem("both X.jsonl and X.jsonl.gz", "session_gem-1_20261127_165100.jsonl.gz")

    def test_truncated_gzip(self) -> None:
        path = os.path.join(self.data, "session_endings", "session_endings_20261127_165200.jsonl.gz")
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) - 20])
        self.assertProblem("unreadable files", "session_endings_20261127_165200.jsonl.gz")

    def test_stream_line_without_record(self) -> None:
        rec = self.chat(stream=True)
        self.writer.write_lines(self.writer.stream_file("extra"), [df.stream_line(rec)])
        self.assertProblem("stream lines without a record", rec["id"])

    def test_streamed_record_without_stream_line(self) -> None:
        rec = self.chat(stream=True)
        self.add(rec, streams=False)
        self.assertProblem("streamed records without a stream line", rec["id"])

    def test_credentials_in_the_answers_headers_or_the_query(self) -> None:
        # Only request_headers and endpoint were checked (an audit's finding).
        for field, value, problem in (
                ("response_headers", {"set-cookie": "sid=abc"}, "response_headers.set-cookie: credential not redacted"),
                ("response_headers", {"x-api-key": "sk-x"}, "response_headers.x-api-key: credential not redacted"),
                ("query", "alt=sse&key=AIzaSyD-plain-key", "query: credential not redacted")):
            with self.subTest(field=field, value=value):
                rec = self.chat()
                if isinstance(value, dict):
                    rec[field].update(value)
                else:
                    rec[field] = value
                self.assertEqual([p for p in verify.check_record(rec) if "credential" in p], [problem])
                redacted = "key=[REDACTED:0a1b2c3d]" if field == "query" else {
                    name: "[REDACTED:0a1b2c3d]" for name in value}
                if isinstance(redacted, dict):
                    rec[field].update(redacted)
                else:
                    rec[field] = redacted
                self.assertEqual(verify.check_record(rec), [])

    def test_stream_line_whose_events_differ_from_the_records_count(self) -> None:
        # The README says verify checks the stream files match their records' stream_events;
        # only the line's presence was checked (an audit's finding).
        rec = self.chat(stream=True)
        rec["stream_events"] = len(df.stream_line(rec)["events"]) + 1  # (the line written has 3)
        self.add(rec)
        self.assertProblem("stream lines whose events differ from the record's stream_events",
                           "%s: 3 events, stream_events 4" % rec["id"])

    def test_stream_line_for_a_record_that_is_not_a_stream(self) -> None:
        rec = self.chat(stream=False)
        self.add(rec)
        self.writer.write_lines(self.writer.stream_file("extra"), [df.stream_line(rec)])
        self.assertProblem("stream lines whose record is not a stream", rec["id"])

    def test_bad_stream_line_shape(self) -> None:
        rec = self.chat(stream=True)
        self.add(rec, streams=False)
        line = df.stream_line(rec)
        line["events"] = [{"data": "x"}]
        del line["truncated"]
        self.writer.write_lines(self.writer.stream_file("extra"), [line])
        out = self.assertProblem("stream lines that do not match the schema", "events: expected objects")
        self.assertIn("truncated: expected true or false", out)

    def test_long_lists_are_capped(self) -> None:
        for i in range(verify.MAX_LISTED + 5):
            rec = self.chat(stream=True)
            self.add(rec, streams=False)
        out = self.assertProblem("streamed records without a stream line (%d)" % (verify.MAX_LISTED + 5))
        self.assertIn("... and 5 more", out)

    def test_as_a_subprocess(self) -> None:
        if not os.path.exists(os.path.join(ROOT, "proxy_llm", "cli.py")):
            self.skipTest("cli.py not there yet")
        env = dict(os.environ, PYTHONPATH=ROOT)
        cmd = [sys.executable, "-m", "proxy_llm", "verify", "--data-dir", self.data]
        proc = subprocess.run(cmd, cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        with open(os.path.join(self.data, "session_gem-1", "x.jsonl.tmp"), "wb"):
            pass
        proc = subprocess.run(cmd, cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(b"leftover temp files", proc.stdout)


# A proxy's recorder, in its own process, whose compressor stops at each of its fsyncs (1: the
# temp file is written, 2: renamed to X.jsonl.gz, X.jsonl still there, 3: X.jsonl removed): it
# prints the step and goes on when it reads a line (or its stdin is closed).
LIVE_RECORDER = r"""
import os, sys, threading
from proxy_llm import storage
from tests import data_factory as df

class Ops(storage.FileOps):
    steps = 0

    @staticmethod
    def fsync(fd):
        os.fsync(fd)
        if threading.current_thread().name == "proxy_llm-compress":
            Ops.steps += 1
            sys.stdout.write("%d\n" % Ops.steps)
            sys.stdout.flush()
            sys.stdin.readline()

def encode(rec):
    return [(storage.RECORDS, rec["session_id"], df.dumps(rec))]

clock = df.Clock(seed=5)
recorder = storage.Recorder(sys.argv[1], encode, max_file_size=1, compress_rotated=True, fsync="never", ops=Ops())
recorder.start()
for n in range(2):  # the second record seals the first file: it is compressed
    recorder.submit(df.openai_chat(clock, "live", [{"role": "user", "content": "hi"}], {"content": "yo"}))
    assert recorder.flush(20)
recorder.close(20)
sys.stdout.write("closed\n")
"""


class TestLiveCompression(unittest.TestCase):
    """verify on a live data dir: the compressor's temp file, and the moment both X.jsonl and
    X.jsonl.gz exist, were reported as a crash's leftovers (exit 1) while a proxy was simply
    compressing a sealed file. The compressor holds a lock on X.jsonl while it works; a killed
    proxy's lock is gone with it, and its files are leftovers again."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="verify-live-")
        self.addCleanup(shutil.rmtree, self.tmp)

    def start(self, name: str):
        data = os.path.join(self.tmp, name)
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen([sys.executable, "-c", LIVE_RECORDER, data], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def stop():
            if proc.poll() is None:
                proc.kill()
            proc.wait(DEADLINE)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
        self.addCleanup(stop)
        return data, proc

    def step(self, proc, go_on: bool = True) -> str:
        """Let the child go on (when it waits), then its next line, within the deadline."""
        if go_on:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
        self.assertTrue(ready, "the child said nothing")
        return proc.stdout.readline().decode().strip()

    def kill(self, proc) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE)

    def assertInProgress(self, data: str, name: str) -> None:
        code, out, _ = run_verify("--data-dir", data)
        self.assertEqual(code, 0, out)
        self.assertIn(verify.IN_PROGRESS + " (1):\n    session_live/" + name, out)
        self.assertNotIn("PROBLEMS", out)

    def names(self, data: str) -> list:
        return sorted(os.listdir(os.path.join(data, "session_live")))

    def test_a_killed_compressions_temp_file_is_a_leftover(self) -> None:
        data, proc = self.start("tmp")
        self.assertEqual(self.step(proc, go_on=False), "1")
        [tmp] = [n for n in self.names(data) if n.endswith(".gz.tmp")]
        self.assertInProgress(data, tmp)
        self.kill(proc)
        code, out, _ = run_verify("--data-dir", data)
        self.assertEqual(code, 1, out)
        self.assertIn("leftover temp files (a crash during compression or a write) (1):\n    session_live/" + tmp, out)
        self.assertNotIn("in progress", out)

    def test_a_killed_compressions_twin_files_are_leftovers(self) -> None:
        data, proc = self.start("twin")
        self.assertEqual(self.step(proc, go_on=False), "1")
        self.assertEqual(self.step(proc), "2")
        [gz] = [n for n in self.names(data) if n.endswith(".gz")]
        self.assertIn(gz[:-3], self.names(data))
        self.assertInProgress(data, gz)
        self.kill(proc)
        code, out, _ = run_verify("--data-dir", data)
        self.assertEqual(code, 1, out)
        self.assertIn("both X.jsonl and X.jsonl.gz (a crash between compressing and deleting) (1):\n"
                      "    session_live/" + gz, out)
        self.assertNotIn("in progress", out)

    def settle(self, data: str) -> dict:
        """Start a recorder with compress_rotated on ``data`` and stop it once it has swept."""
        recorder = storage.Recorder(data, lambda item: [], compress_rotated=True)
        recorder.start()
        try:
            self.assertTrue(recorder.sweep_done.wait(DEADLINE))
        finally:
            recorder.close(DEADLINE)
        return recorder.swept

    def test_the_next_start_settles_what_a_killed_compression_left(self) -> None:
        # Before, no run ever picked them up: the leftovers stayed, and verify failed for good.
        # (the second file, open when the process was killed, is compressed too)
        for steps, outcome in ((1, {"compressed": 2}), (2, {"twin_removed": 1, "compressed": 1})):
            with self.subTest(killed_at=steps):
                data, proc = self.start("killed%d" % steps)
                self.assertEqual(self.step(proc, go_on=False), "1")
                if steps == 2:
                    self.assertEqual(self.step(proc), "2")
                [sealed] = [n for n in self.names(data) if n.endswith(".gz.tmp" if steps == 1 else ".gz")]
                sealed = sealed[:-len(".gz.tmp")] if steps == 1 else sealed[:-len(".gz")]
                self.kill(proc)
                self.assertEqual(run_verify("--data-dir", data)[0], 1)
                swept = self.settle(data)
                self.assertEqual(swept, outcome)
                self.assertIn(sealed + ".gz", self.names(data))
                self.assertEqual([n for n in self.names(data) if not n.endswith(".jsonl.gz")], [])
                code, out, _ = run_verify("--data-dir", data)
                self.assertEqual(code, 0, out)
                self.assertIn("2 records", out)

    def test_a_finished_compression_leaves_nothing_to_report(self) -> None:
        data, proc = self.start("done")
        self.assertEqual(self.step(proc, go_on=False), "1")
        self.assertEqual(self.step(proc), "2")
        self.assertEqual(self.step(proc), "3")
        proc.stdin.close()  # (no more stops)
        self.assertEqual(self.step(proc, go_on=False), "closed")
        self.assertEqual(proc.wait(DEADLINE), 0)
        self.assertEqual(sorted(n.endswith(".gz") for n in self.names(data)), [False, True])  # (no .tmp)
        code, out, _ = run_verify("--data-dir", data)
        self.assertEqual(code, 0, out)
        self.assertIn("2 records", out)
        self.assertNotIn("in progress", out)


class TestUnits(unittest.TestCase):
    def test_check_record_accepts_factory_records(self) -> None:
        clock = df.Clock()
        for rec in df.endings_session(clock) + df.gemini_session(clock) + df.responses_session(clock):
            self.assertEqual(verify.check_record(json.loads(json.dumps(rec))), [])

    def test_session_file_id_agrees_with_the_recorder(self) -> None:
        try:
            from proxy_llm import record
        except ImportError:
            self.skipTest("no recorder yet")
        for sid in ("abc", "a.b-c_d", ".", "..", "", "x" * 64, "x" * 65, "with space", "é", "a/b", "\ud800"):
            self.assertEqual(verify.session_file_id(sid), record.session_file_id(sid), sid)

    def test_known_fields_agree_with_the_recorder(self) -> None:
        try:
            from proxy_llm import record
        except ImportError:
            self.skipTest("no recorder yet")
        self.assertEqual(set(verify.KNOWN_FIELDS), set(record.FIELDS))
        self.assertEqual(set(verify.ENDINGS), set(record.ENDINGS))
        self.assertEqual(set(verify.SESSION_SOURCES), set(record.SESSION_SOURCES))

    def test_bool_is_not_an_int(self) -> None:
        rec = df.embeddings(df.Clock(), "s")
        rec["request_bytes"] = True
        self.assertEqual(verify.check_record(rec), ["request_bytes: expected an int >= 0"])


if __name__ == "__main__":
    unittest.main()


class TestRecorderOutput(unittest.TestCase):
    """The real recorder's output (in-process proxy, fake upstream) passes verify and feeds
    stats and export: the contract between the writer and the readers, tested end to end."""

    def setUp(self) -> None:
        try:
            from tests import support
        except ImportError as exc:  # the proxy is not there yet
            self.skipTest("tests.support unavailable: %s" % exc)
        self.support = support
        self.tmp = tempfile.mkdtemp(prefix="verify-real-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.upstream = support.FakeUpstream(self.reply).start()
        self.addCleanup(self.upstream.stop)
        providers = [support.provider("openai", "openai", self.upstream.url, "", ["gpt-*", "text-*"]),
                     support.provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"]),
                     support.provider("gemini", "gemini", self.upstream.url, "", ["gemini-*"])]
        self.proxy = support.InProcessProxy(support.base_config(providers, self.data)).__enter__()
        self.addCleanup(self.proxy.stop)

    def fixture(self, name: str) -> bytes:
        with open(os.path.join(ROOT, "tests", "fixtures", name), "rb") as fh:
            return fh.read()

    def reply(self, req):
        s = self.support
        body = req.json() if req.body else {}
        if req.path == "/v1/chat/completions":
            if body.get("model") == "gpt-limited":
                return s.json_reply({"error": {"message": "Rate limit", "type": "requests"}}, status=429)
            if body.get("stream") and body.get("model") != "gpt-plain":
                return s.sse_reply([self.fixture("openai_chat/basic_usage.sse")])
            return s.Reply(200, [("Content-Type", "application/json")], self.fixture("openai_chat/body_tool_calls.json"))
        if req.path == "/v1/messages":
            return s.sse_reply([self.fixture("anthropic_messages/thinking_signature.sse")])
        if req.path == "/v1/responses":
            return s.sse_reply([self.fixture("openai_responses/text.sse")])
        if req.path.endswith(":streamGenerateContent") and "alt=sse" in req.query:
            return s.sse_reply([self.fixture("gemini/sse_function_calls.sse")])
        if req.path.endswith(":streamGenerateContent"):  # a JSON array, delivered in pieces
            data = self.fixture("gemini/array_text.stream.json")
            return s.Reply(200, [("Content-Type", "application/json; charset=UTF-8")], [data[:40], data[40:]])
        if req.path == "/v1/embeddings":
            return s.json_reply({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})
        return s.json_reply({"error": {"message": "not found"}}, status=404)

    def send(self, path: str, body: dict, session: str = "real-1", **headers) -> int:
        hdrs = {"Content-Type": "application/json", "X-Session-Id": session, "Authorization": "Bearer sk-test-secret-1"}
        hdrs.update(headers)
        status, _, _ = self.support.request(self.proxy.url, path=path, body=body, headers=hdrs)
        return status

    def test_recorded_traffic_verifies_and_exports(self) -> None:
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(self.send("/v1/chat/completions", dict(chat, stream=True)), 200)
        self.assertEqual(self.send("/v1/chat/completions", chat), 200)
        self.assertEqual(self.send("/v1/chat/completions", dict(chat, model="gpt-limited", stream=True)), 429)
        self.assertEqual(self.send("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 99, "stream": True,
                                                    "messages": [{"role": "user", "content": "27 * 453?"}]}), 200)
        self.assertEqual(self.send("/v1/responses", {"model": "gpt-4.1", "input": "hi", "stream": True}), 200)
        self.assertEqual(self.send("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                                   {"contents": [{"role": "user", "parts": [{"text": "weather?"}]}]},
                                   session="real-2"), 200)
        self.assertEqual(self.send("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}), 200)
        # a server that ignores "stream": true (plain JSON, no stream line)
        self.assertEqual(self.send("/v1/chat/completions", dict(chat, model="gpt-plain", stream=True)), 200)
        # Gemini streaming a JSON array (no alt=sse): a stream line
        self.assertEqual(self.send("/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                                   {"contents": [{"role": "user", "parts": [{"text": "bonjour"}]}]},
                                   session="real-2"), 200)
        self.proxy.flush()

        code, out, _ = run_verify("--data-dir", self.data)
        self.assertEqual(code, 0, out)
        self.assertIn("9 records", out)
        self.assertIn("5 stream lines", out)
        self.assertNotIn("sk-test-secret-1", out)

        from proxy_llm import export, stats
        report = stats.collect(self.data)
        self.assertEqual(report.total.requests, 9)
        self.assertEqual(report.total.http_errors, 1)
        self.assertEqual(set(report.sessions), {"real-1", "real-2"})

        rows = os.path.join(self.tmp, "chat.jsonl")
        parser = argparse.ArgumentParser()
        export.add_arguments(parser)
        with redirect_stderr(io.StringIO()) as err:
            code = export.run(parser.parse_args(["--data-dir", self.data, "--format", "openai-chat",
                                                 "--include-thinking", "--out", rows]))
        self.assertEqual(code, 0, err.getvalue())
        with open(rows, encoding="utf-8") as fh:
            exported = [json.loads(line) for line in fh]
        self.assertEqual(len(exported), 7, err.getvalue())
        self.assertIn("skipped (error 1, not_chat 1)", err.getvalue())
        text = json.dumps(exported)
        self.assertIn("12,231", text)
        self.assertNotIn("sk-test-secret-1", text)
        self.assertNotIn("REDACTED", text)
