from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import unittest
from unittest import mock

from proxy_llm import reader
from tests import data_factory as df


class ReaderTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="reader-")
        self.addCleanup(shutil.rmtree, self.tmp)


class TestMixedDataDir(ReaderTestCase):
    def test_reads_every_record_of_every_file_and_skips_the_torn_line(self) -> None:
        man = df.build_mixed(self.tmp)
        stats = reader.ReadStats()
        got = list(reader.iter_records(self.tmp, stats))
        self.assertEqual(sorted(r["id"] for r in got), sorted(r["id"] for r in man.records))
        self.assertEqual(stats.records, len(man.records))
        self.assertEqual(stats.files, man.files)
        self.assertEqual(stats.torn, 1)
        self.assertEqual(len(stats.torn_lines), 1)
        self.assertTrue(stats.torn_lines[0][0].endswith("-2.jsonl"))
        self.assertEqual(stats.bad_lines, [])
        self.assertEqual(stats.problems, [])
        self.assertFalse(stats.ok)
        self.assertIn("1 torn line skipped", stats.summary())

    def test_every_dialect_is_present(self) -> None:
        man = df.build_mixed(self.tmp)
        for dialect in ("openai_chat", "openai_responses", "anthropic_messages", "gemini",
                        "openai_embeddings", "generic"):
            self.assertIn(dialect, man.by_dialect)
        self.assertEqual({r["ended"] for r in man.records}, set(df.ENDINGS))

    def test_stream_lines_are_read(self) -> None:
        man = df.build_mixed(self.tmp)
        stats = reader.ReadStats()
        ids = [line["id"] for line in reader.iter_stream_lines(self.tmp, stats)]
        self.assertEqual(sorted(ids), sorted(man.stream_ids))
        self.assertTrue(stats.ok)

    def test_records_come_in_time_order_within_a_session(self) -> None:
        df.build_mixed(self.tmp)
        by_session = {}
        for rec in reader.iter_records(self.tmp):
            by_session.setdefault(rec["session_id"], []).append(rec["id"])
        for ids in by_session.values():
            self.assertEqual(ids, sorted(ids))  # ULIDs sort by time


class TestStrayFiles(ReaderTestCase):
    """A ``*.jsonl`` the recorder did not name (``notes.jsonl``, copied into a session directory
    by hand) was read as records: stats and export counted it as traffic."""

    def test_only_the_recorders_file_names_are_read_the_others_are_listed(self) -> None:
        man = df.build_mixed(self.tmp, torn=False)
        strays = df.write_strays(self.tmp, man)
        stats = reader.ReadStats()
        ids = [r["id"] for r in reader.iter_records(self.tmp, stats)]
        lines = [line["id"] for line in reader.iter_stream_lines(self.tmp, stats)]
        self.assertEqual(sorted(ids), sorted(r["id"] for r in man.records))
        self.assertEqual(sorted(lines), sorted(man.stream_ids))
        self.assertEqual(stats.skipped_files, strays)
        self.assertEqual((stats.bad_lines, stats.problems, stats.torn), ([], [], 0))
        self.assertFalse(stats.ok)
        self.assertIn("%d files not named as the recorder names its files skipped" % len(strays), stats.summary())
        self.assertEqual(reader.ReadStats().to_json()["skipped_files"], 0)
        self.assertEqual(stats.to_json()["skipped_files"], len(strays))
        self.assertFalse(set(reader.record_files(self.tmp) + reader.stream_files(self.tmp)) & set(strays))


class TestFileOrder(unittest.TestCase):
    def test_suffixes_sort_after_their_base(self) -> None:
        names = ["session_a_20261127_164815_w1.jsonl", "session_a_20261127_164815-2.jsonl",
                 "session_a_20261127_170000.jsonl", "session_a_20261127_164815.jsonl.gz"]
        self.assertEqual(sorted(names, key=reader.file_sort_key), [
            "session_a_20261127_164815.jsonl.gz", "session_a_20261127_164815_w1.jsonl",
            "session_a_20261127_164815-2.jsonl", "session_a_20261127_170000.jsonl"])

    def test_session_ids_with_digits_and_dashes(self) -> None:
        self.assertEqual(reader.file_sort_key("session_x-2_20261127_164815-3.jsonl")[:2],
                         ("session_x-2_20261127_164815", 3))


class TestDamage(ReaderTestCase):
    def _file(self, name: str = "session_s_20261127_164815.jsonl") -> str:
        folder = os.path.join(self.tmp, "session_s")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name)

    def test_bad_middle_line_is_listed_with_its_number(self) -> None:
        path = self._file()
        with open(path, "wb") as fh:
            fh.write(b'{"id": "a"}\nnot json\n[1, 2]\n\n{"id": "b"}\n')
        stats = reader.ReadStats()
        self.assertEqual([r["id"] for r in reader.iter_records(self.tmp, stats)], ["a", "b"])
        self.assertEqual(stats.bad_lines, [(path, 2), (path, 3)])
        self.assertEqual(stats.torn, 0)

    def test_final_line_without_newline_that_parses_is_a_record(self) -> None:
        with open(self._file(), "wb") as fh:
            fh.write(b'{"id": "a"}\n{"id": "b"}')
        stats = reader.ReadStats()
        self.assertEqual([r["id"] for r in reader.iter_records(self.tmp, stats)], ["a", "b"])
        self.assertTrue(stats.ok)

    def test_a_file_growing_during_the_read_gives_no_bad_line(self) -> None:
        # The writer appends while a reader (export, stats, verify on a live data dir) reads:
        # the reader meets a line still being written at the end of the file, and by its next
        # read the rest of that line is there. That rest is not a line of its own.
        path = self._file()
        with open(path, "wb") as fh:
            fh.write(b'{"id": "a"}\n{"id": "b", "pad": "')
        real_open = reader._open

        class Growing:
            """The real file; once the reader has taken the unfinished line, the writer ends it."""

            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def __iter__(self):
                for line in self.fh:
                    if not line.endswith(b"\n"):
                        with open(path, "ab") as w:
                            w.write(b'xyz"}\n{"id": "c"}\n')
                    yield line

        def growing_open(p):
            fh, raw = real_open(p)
            return Growing(fh), raw

        stats = reader.ReadStats()
        with mock.patch.object(reader, "_open", growing_open):
            got = [r["id"] for r in reader.iter_records(self.tmp, stats)]
        self.assertEqual(got, ["a"])
        self.assertEqual((stats.torn, stats.bad_lines), (1, []))
        stats = reader.ReadStats()  # read again: the file as it is now
        self.assertEqual([r["id"] for r in reader.iter_records(self.tmp, stats)], ["a", "b", "c"])
        self.assertTrue(stats.ok)

    def test_truncated_gzip_is_a_problem_not_a_traceback(self) -> None:
        path = self._file("session_s_20261127_164815.jsonl.gz")
        data = gzip.compress(b"".join(b'{"id": "r%03d", "pad": "%s"}\n' % (i, b"x" * 50) for i in range(300)))
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        stats = reader.ReadStats()
        got = list(reader.iter_records(self.tmp, stats))
        self.assertLess(len(got), 300)
        self.assertEqual(len(stats.problems), 1)
        self.assertEqual(stats.problems[0][0], path)

    def test_garbage_gzip_is_a_problem(self) -> None:
        with open(self._file("session_s_20261127_164815.jsonl.gz"), "wb") as fh:
            fh.write(b"this is not gzip at all\n")
        stats = reader.ReadStats()
        self.assertEqual(list(reader.iter_records(self.tmp, stats)), [])
        self.assertEqual(len(stats.problems), 1)

    def test_an_empty_gzip_file_is_a_problem(self) -> None:
        # A compression cut short leaves one; gzip reads it as an empty file, so it passed.
        open(self._file("session_s_20261127_164815.jsonl.gz"), "wb").close()
        stats = reader.ReadStats()
        self.assertEqual(list(reader.iter_records(self.tmp, stats)), [])
        self.assertEqual([p[1] for p in stats.problems], ["unreadable: an empty file is not gzip"])

    def test_twin_gz_is_skipped_and_listed(self) -> None:
        plain = self._file()
        with open(plain, "wb") as fh:
            fh.write(b'{"id": "a"}\n')
        with gzip.open(plain + ".gz", "wb") as fh:
            fh.write(b'{"id": "a"}\n')
        stats = reader.ReadStats()
        self.assertEqual([r["id"] for r in reader.iter_records(self.tmp, stats)], ["a"])
        self.assertEqual(stats.twins, [plain + ".gz"])

    def test_invalid_utf8_line_is_bad_not_fatal(self) -> None:
        with open(self._file(), "wb") as fh:
            fh.write(b'{"id": "\xff\xfe"}\n{"id": "b"}\n')
        stats = reader.ReadStats()
        self.assertEqual([r["id"] for r in reader.iter_records(self.tmp, stats)], ["b"])
        self.assertEqual(len(stats.bad_lines), 1)

    def test_missing_data_dir_raises_data_dir_error(self) -> None:
        with self.assertRaises(reader.DataDirError):
            list(reader.iter_records(os.path.join(self.tmp, "nope")))

    def test_empty_data_dir_yields_nothing(self) -> None:
        stats = reader.ReadStats()
        self.assertEqual(list(reader.iter_records(self.tmp, stats)), [])
        self.assertEqual(list(reader.iter_stream_lines(self.tmp, stats)), [])
        self.assertEqual(stats.files, 0)
        self.assertEqual(stats.problems, [])  # (no streams/ yet is no stream files, not a problem)
        self.assertTrue(stats.ok)


if __name__ == "__main__":
    unittest.main()


class TestLoneSurrogates(unittest.TestCase):
    def test_lone_surrogate_escapes_become_the_replacement_character(self) -> None:
        import json
        import random
        from proxy_llm.reader import lone_surrogates_replaced
        rnd = random.Random(3)
        pieces = ["a", "\U0001f600", "\ud83d", "\ude00", "\\", "\\ud83d", "u", "d83d", "\"", "\n"]
        for n in range(2000):
            value = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8)))
            line = json.dumps({"k": value, "n": [value]}, ensure_ascii=n % 2 == 0).encode("utf-8", "surrogatepass")
            if n % 2:  # ensure_ascii=False keeps a lone surrogate as a character: escape those as JSON does
                line = json.dumps({"k": value, "n": [value]}).encode("ascii")
            got = lone_surrogates_replaced(line)
            # What a strict reader gets: every surrogate that is not half of a pair replaced.
            expected = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            with self.subTest(value=value):
                self.assertEqual(json.loads(got), {"k": expected, "n": [expected]})
                got.decode("utf-8")  # and nothing a UTF-8 reader refuses
                if expected == value:
                    self.assertIs(got, line)

