"""End to end: the data dir and every export load in pandas, DuckDB and Hugging Face datasets.

Skipped where a package is absent (the package itself needs none of them).
What these tests established about the raw record files (see the README):

* pandas ``read_json(path, lines=True)`` loads each record file as it is (plain
  or .gz); a torn last line makes that file fail (``ValueError``).
* pandas without ``dtype=False`` turns a text that looks like a number (a
  session "0012", a model "007") into one; with it, each column is as written.
* DuckDB ``read_json`` with default detection builds deep STRUCTs from a sample
  of the first files and then fails (or silently drops keys) on bodies whose
  shape varies later; ``maximum_depth=1`` keeps bodies and headers as JSON and
  always works, but makes every column JSON (``max(request_bytes)`` compares
  texts); the README's recipe names the columns, the scalars typed and the rest
  JSON; ``ignore_errors=true`` turns a torn line into an all-NULL row.
* pyarrow and ``datasets`` cannot load raw records at all: provider bodies are
  polymorphic (``content`` is a string or a list).  ``export --format records``
  is the loadable form.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
import unittest

from proxy_llm import export, record
from tests import data_factory as df
from tests.test_export import openai_chat_problems, parse, sharegpt_problems


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def duckdb_recipe(pattern: str) -> str:
    """The README's DuckDB query ("Loading the files"), reading ``pattern``."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    block = text[text.index("```sql\n", text.index("### Loading the files")) + 7:]
    query = block[:block.index("```")]
    assert "'data/session_*/*.jsonl*'" in query, query
    return query.replace("'data/session_*/*.jsonl*'", "'%s'" % pattern)


def run_export(data: str, out: str, *argv: str) -> int:
    import io
    from contextlib import redirect_stderr
    with redirect_stderr(io.StringIO()):
        return export.run(parse(["--data-dir", data, "--out", out] + list(argv)), None)


def count_lines(path: str) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def encoded_records(root: str, name: str, cases) -> str:
    """A record file as the encoder writes it, one record per dict of ``test_record.exchange``
    arguments in ``cases``; returns its path."""
    from tests.test_record import encode, exchange
    lines = []
    for kw in cases:
        ex = exchange(**kw)
        ex.assign_id()
        lines += [line for _, _, line in encode(ex)[1]]
    os.makedirs(root)
    path = os.path.join(root, name)
    with open(path, "wb") as fh:
        fh.writelines(lines)
    return path


def deep_records(root: str) -> str:
    """A record file as the encoder writes it for bodies nested too deep for the loaders (a
    request past the json module's recursion limit, an answer past DuckDB's 128 levels), and
    one plain record; returns its path."""
    return encoded_records(root, "deep.jsonl", (
        dict(body=b'{"model":"gpt-4o","x":%s%s}' % (b"[" * 5000, b"]" * 5000), status=400),
        dict(resp=b'{"id":"x","y":%s%s}' % (b"[" * 300, b"]" * 300)), dict()))


HALF_EMOJI = b'{"model":"gpt-4o","messages":[{"role":"user","content":"cut \\ud83d here, whole \\ud83d\\ude00"}]}'


def surrogate_records(root: str) -> str:
    """A record file as the encoder writes it for bodies holding a lone surrogate escape (half
    an emoji, as a JavaScript client that cut a string sends it): a request answered 2xx (its
    bytes spliced in) and an answer; returns its path."""
    return encoded_records(root, "surrogates.jsonl", (
        dict(body=HALF_EMOJI),
        dict(resp=b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"\\udc00 alone"}}]}'),
        dict()))


def many_files_with_late_variation(root: str) -> int:
    """40 uniform sessions, then records whose bodies and headers vary; returns the count."""
    clock = df.Clock(seed=21)
    w = df.DataDirWriter(root)
    for i in range(40):
        w.write_records([df.openai_chat(clock, "s%02d" % i, [{"role": "user", "content": "hi"}],
                                        {"content": "yo"})], stamp="20261127_1700%02d" % i)
    odd = df.openai_chat(clock, "zz", [{"role": "user", "content": "hi"}], {"content": "yo"})
    odd["request_body"] = "not json: a body the recorder kept as text"
    err = df.openai_chat(clock, "zz", [{"role": "user", "content": "hi"}], {"content": "yo"}, status_code=404)
    err["response_body"] = {"error": "plain string error"}
    w.write_records([odd, err], stamp="20261127_180000")
    return 42


@unittest.skipUnless(_has("pandas"), "pandas not installed")
class TestPandas(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="e2e-pandas-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.man = df.build_mixed(self.data, torn=False)

    def test_raw_record_files_load_as_they_are(self) -> None:
        import pandas as pd
        files = sorted(glob.glob(os.path.join(self.data, "session_*", "*.jsonl*")))
        self.assertTrue(any(f.endswith(".gz") for f in files))
        frame = pd.concat([pd.read_json(f, lines=True, dtype=False) for f in files], ignore_index=True)
        self.assertEqual(len(frame), len(self.man.records))
        self.assertEqual(sorted(frame["id"]), sorted(r["id"] for r in self.man.records))
        for col in ("request_body", "response_body", "tokens_used", "status_code", "ended"):
            self.assertIn(col, frame.columns)

    def test_the_readmes_recipe_keeps_texts_that_look_like_numbers(self) -> None:
        # An audit's finding: the recipe without dtype=False made session "0012" 12 and model
        # "007" 7.0 (two sessions, "0012" and "12", would merge).
        import pandas as pd
        data = os.path.join(self.tmp, "numeric")
        clock = df.Clock(seed=6)
        recs = [df.openai_chat(clock, sid, [{"role": "user", "content": "hi"}], {"content": "yo"}, model=model)
                for sid, model in (("0012", "007"), ("12", "1e3"))]
        df.DataDirWriter(data).write_records(recs)
        files = sorted(glob.glob(os.path.join(data, "session_*", "*.jsonl*")))
        frame = pd.concat([pd.read_json(f, lines=True) for f in files], ignore_index=True)
        self.assertNotEqual(sorted(map(str, frame["session_id"])), ["0012", "12"])  # (why the recipe says so)
        frame = pd.concat([pd.read_json(f, lines=True, dtype=False) for f in files], ignore_index=True)
        self.assertEqual(sorted(frame["session_id"]), ["0012", "12"])
        self.assertEqual(sorted(frame["model"]), ["007", "1e3"])
        self.assertEqual(frame["status_code"].tolist(), [200, 200])
        self.assertEqual(str(pd.to_datetime(frame["timestamp"]).dt.tz), "UTC")

    def test_records_export_loads_and_bodies_decode(self) -> None:
        import pandas as pd
        out = os.path.join(self.tmp, "records.jsonl")
        self.assertEqual(run_export(self.data, out, "--format", "records"), 0)
        frame = pd.read_json(out, lines=True)
        self.assertEqual(len(frame), len(self.man.records))
        bodies = [json.loads(b) for b in frame["request_body"]]
        self.assertEqual(sorted(json.dumps(b, sort_keys=True) for b in bodies),
                         sorted(json.dumps(r["request_body"], sort_keys=True) for r in self.man.records))

    def test_records_of_bodies_nested_too_deep_load(self) -> None:
        import pandas as pd
        frame = pd.read_json(deep_records(os.path.join(self.tmp, "deep")), lines=True)
        self.assertEqual(list(frame["status_code"]), [400, 200, 200])

    def test_records_of_bodies_with_a_lone_surrogate_load(self) -> None:
        # pandas refused the file ("Unpaired high surrogate"): the escape is now U+FFFD.
        import pandas as pd
        frame = pd.read_json(surrogate_records(os.path.join(self.tmp, "surrogates")), lines=True)
        self.assertEqual(frame["request_body"][0]["messages"][0]["content"], "cut \ufffd here, whole \U0001f600")
        self.assertEqual(frame["response_body"][1]["choices"][0]["message"]["content"], "\ufffd alone")

    def test_exports_of_records_holding_a_lone_surrogate_load(self) -> None:
        # Records written before the recorder replaced them (an older data dir): every export
        # wrote the escape back, and the one record made the whole file unloadable.
        import pandas as pd
        data = os.path.join(self.tmp, "old")
        clock = df.Clock(seed=5)
        rec = df.openai_chat(clock, "s", [{"role": "user", "content": "cut \ud83d"}], {"content": "ok \udc00"})
        df.DataDirWriter(data).write_records([rec])
        for fmt in ("records", "openai-chat", "sharegpt"):
            out = os.path.join(self.tmp, fmt + ".jsonl")
            self.assertEqual(run_export(data, out, "--format", fmt), 0)
            with self.subTest(format=fmt):
                self.assertEqual(len(pd.read_json(out, lines=True)), 1)
                with open(out, "rb") as fh:
                    self.assertIn(b"\\ufffd", fh.read())

    def test_torn_line_breaks_pandas_on_that_file(self) -> None:
        import pandas as pd
        torn = os.path.join(self.tmp, "torn")
        df.build_mixed(torn, torn=True)
        path = glob.glob(os.path.join(torn, "session_agent-1", "*-2.jsonl"))[0]
        with self.assertRaises(ValueError):
            pd.read_json(path, lines=True)


@unittest.skipUnless(_has("duckdb"), "duckdb not installed")
class TestDuckDB(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="e2e-duckdb-")
        self.addCleanup(shutil.rmtree, self.tmp)

    def sql(self, query: str) -> list:
        import duckdb
        con = duckdb.connect()
        try:
            return con.sql(query).fetchall()
        finally:
            con.close()

    def test_mixed_data_dir_loads_as_it_is(self) -> None:
        data = os.path.join(self.tmp, "data")
        man = df.build_mixed(data, torn=False)
        pattern = os.path.join(data, "session_*", "*.jsonl*")
        rows = self.sql("select id, status_code, ended from read_json('%s', format='newline_delimited')" % pattern)
        self.assertEqual(len(rows), len(man.records))
        count = self.sql("select count(*) from read_json('%s', format='newline_delimited')"
                         % os.path.join(data, "session_*", "*.jsonl"))
        self.assertEqual(count[0][0], sum(1 for _ in glob.glob(os.path.join(data, "session_*", "*.jsonl")))
                         and len([r for r in man.records]) - 10)  # 10 records live in the two .gz files

    def test_records_of_bodies_nested_too_deep_load(self) -> None:
        path = deep_records(os.path.join(self.tmp, "deep"))
        for query in ("select * from read_json('%s', format='newline_delimited')" % path, duckdb_recipe(path)):
            rows = self.sql("select status_code from (%s) where id is not null" % query)
            self.assertEqual([r[0] for r in rows], [400, 200, 200])

    def test_records_of_bodies_with_a_lone_surrogate_load(self) -> None:
        # DuckDB refused the line ("no low surrogate in string"), and the README's recipe with
        # ignore_errors dropped the row without a word.
        path = surrogate_records(os.path.join(self.tmp, "surrogates"))
        for query in ("select * from read_json('%s', format='newline_delimited')" % path, duckdb_recipe(path)):
            rows = self.sql("select count(*) from (%s) where id is not null" % query)
            self.assertEqual(rows[0][0], 3)

    def test_recipe_for_varied_traffic(self) -> None:
        data = os.path.join(self.tmp, "varied")
        total = many_files_with_late_variation(data)
        pattern = os.path.join(data, "session_*", "*.jsonl*")
        rows = self.sql("select id, json_extract_string(request_body, '$.model') from (%s)" % duckdb_recipe(pattern))
        self.assertEqual(len(rows), total)
        self.assertEqual(sum(model == "gpt-4o-mini" for _, model in rows), total - 1)  # (one body is text)

    def test_the_readmes_recipe_types_the_scalars(self) -> None:
        # An audit's finding: the recipe was maximum_depth=1, which makes every column JSON:
        # max(request_bytes) compared texts, and session_id = 'x' raised a conversion error.
        data = os.path.join(self.tmp, "mixed")
        man = df.build_mixed(data, torn=False)
        query = duckdb_recipe(os.path.join(data, "session_*", "*.jsonl*"))
        types = dict((row[0], row[1]) for row in self.sql("describe " + query))
        self.assertEqual(list(types), list(record.FIELDS))  # (every field named, in order)
        self.assertEqual((types["status_code"], types["request_bytes"], types["timestamp"], types["request_body"]),
                         ("INTEGER", "BIGINT", "TIMESTAMP WITH TIME ZONE", "JSON"))
        [(biggest, sessions, some)] = self.sql(
            "select max(request_bytes), count(distinct session_id), count(*) filter (where session_id = '%s') "
            "from (%s)" % (man.records[0]["session_id"], query))
        self.assertEqual(biggest, max(r["request_bytes"] for r in man.records))
        self.assertEqual(sessions, len({r["session_id"] for r in man.records}))
        self.assertEqual(some, sum(r["session_id"] == man.records[0]["session_id"] for r in man.records))

    def test_default_detection_fails_on_late_variation(self) -> None:
        """Evidence for the README: default detection samples the first files only."""
        import duckdb
        data = os.path.join(self.tmp, "varied")
        many_files_with_late_variation(data)
        pattern = os.path.join(data, "session_*", "*.jsonl*")
        try:
            self.sql("select * from read_json('%s', format='newline_delimited')" % pattern)
        except duckdb.Error as exc:
            self.assertIn("JSON transform error", str(exc))
        else:
            self.skipTest("this duckdb copes with late variation; the README caveat can go")

    def test_torn_line_recipe(self) -> None:
        data = os.path.join(self.tmp, "torn")
        man = df.build_mixed(data, torn=True)
        pattern = os.path.join(data, "session_*", "*.jsonl*")
        rows = self.sql("select count(*) from (%s)" % duckdb_recipe(pattern))
        self.assertEqual(rows[0][0], len(man.records))

    def test_records_export_loads(self) -> None:
        data = os.path.join(self.tmp, "varied")
        total = many_files_with_late_variation(data)
        out = os.path.join(self.tmp, "records.jsonl")
        self.assertEqual(run_export(data, out, "--format", "records"), 0)
        rows = self.sql("select count(*), count(request_body) from read_json('%s', format='newline_delimited')" % out)
        self.assertEqual(rows[0], (total, total))


@unittest.skipUnless(_has("datasets"), "datasets not installed")
class TestHFDatasets(unittest.TestCase):
    """Every export loads with ``datasets.load_dataset("json")`` without a schema error."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="e2e-datasets-")
        cls.data = os.path.join(cls.tmp, "data")
        cls.man = df.build_mixed(cls.data, torn=True)
        many_files_with_late_variation(os.path.join(cls.data))
        cls.env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        import datasets
        datasets.disable_progress_bars()

    @classmethod
    def tearDownClass(cls) -> None:
        for key, value in cls.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(cls.tmp)

    def load(self, path: str, **kw):
        import datasets
        cache = tempfile.mkdtemp(dir=self.tmp, prefix="cache-")
        return datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache, **kw)

    def test_the_split_files_load_one_by_one(self) -> None:
        # An audit's finding: with tools whose shape varies (a description in one function, not
        # in the others), data_files={"train": ..., "test": ...} fails to cast one file's schema
        # to the other's. The README says to load them one by one.
        import datasets
        for described in range(12):  # (the first whose conversation the split puts on the test side)
            data = os.path.join(self.tmp, "split-data-%d" % described)
            clock = df.Clock(seed=7)
            recs = []
            for i in range(12):
                fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
                if i == described:
                    fn["description"] = "Current weather"
                recs.append(df.openai_chat(clock, "s%d" % i, [{"role": "user", "content": "question %d" % i}],
                                           {"content": "answer %d" % i}, tools=[{"type": "function", "function": fn}]))
            df.DataDirWriter(data).write_records(recs)
            out = os.path.join(self.tmp, "split-%d.jsonl" % described)
            self.assertEqual(run_export(data, out, "--format", "openai-chat", "--split", "0.5"), 0)
            files = {side: os.path.join(self.tmp, "split-%d.%s.jsonl" % (described, side)) for side in ("train", "test")}
            with open(files["test"], encoding="utf-8") as fh:
                if any("description" in line for line in fh):
                    break
        else:
            self.fail("no conversation went to the test side")
        loaded = {side: self.load(path) for side, path in files.items()}
        self.assertEqual(sum(len(ds) for ds in loaded.values()), 12)
        try:
            datasets.load_dataset("json", data_files=files, cache_dir=tempfile.mkdtemp(dir=self.tmp))
        except Exception:
            pass  # (the README's reason to load them one by one)
        else:
            self.skipTest("this datasets casts one split's tools to the other's; the README caveat can go")

    def check(self, name: str, *argv: str, stress: bool = True) -> str:
        """Export, then load with the default reader and as one block; with ``stress``, also in
        2 KB blocks (the schema must hold when inferred from the first block only)."""
        out = os.path.join(self.tmp, name + ".jsonl")
        self.assertEqual(run_export(self.data, out, *argv), 0)
        expected = count_lines(out)
        self.assertGreater(expected, 0)
        self.assertEqual(len(self.load(out)), expected)
        self.assertEqual(len(self.load(out, chunksize=os.path.getsize(out) + 1)), expected)
        if stress:
            self.assertEqual(len(self.load(out, chunksize=2048)), expected)
        return out

    def test_openai_chat(self) -> None:
        self.check("chat", "--format", "openai-chat", stress=False)

    def test_openai_chat_with_thinking_and_images(self) -> None:
        self.check("chat_all", "--format", "openai-chat", "--include-thinking", "--include-images", stress=False)

    def test_openai_chat_deduped(self) -> None:
        self.check("chat_dedupe", "--format", "openai-chat", "--dedupe", stress=False)

    def test_sharegpt(self) -> None:
        self.check("sharegpt", "--format", "sharegpt")

    def test_sharegpt_with_images(self) -> None:
        self.check("sharegpt_img", "--format", "sharegpt", "--include-images", "--include-thinking", stress=False)

    def test_records(self) -> None:
        out = self.check("records", "--format", "records")
        self.assertEqual(count_lines(out), len(self.man.records) + 42)

    def test_large_openai_chat_files_need_one_block(self) -> None:
        """Evidence for the README: ``datasets`` fixes the schema from the first block (10 MB by
        default); when tool calls first appear after it, loading fails unless the file is read
        as one block (``chunksize`` larger than the file)."""
        import datasets
        data = os.path.join(self.tmp, "late_tools")
        clock = df.Clock(seed=5)
        w = df.DataDirWriter(data)
        plain = [df.openai_chat(clock, "late", [{"role": "user", "content": "question %d %s" % (i, "x" * 200)}],
                                {"content": "answer %d" % i}) for i in range(30)]
        w.write_records(plain + df.openai_tool_session(clock, "late"), stamp="20261127_170000")
        out = os.path.join(self.tmp, "late_tools.jsonl")
        self.assertEqual(run_export(data, out, "--format", "openai-chat"), 0)
        self.assertEqual(len(self.load(out, chunksize=os.path.getsize(out) + 1)), 32)
        try:
            self.load(out, chunksize=2048)
        except datasets.exceptions.DatasetGenerationError:
            pass
        else:
            self.skipTest("this datasets version infers the schema from every block")

    def test_exports_of_the_audited_shapes_load(self) -> None:
        """Legacy functions, Gemini SDK schemas, a prefill, a custom tool call, an audio history
        and a tool error beside the mixed data dir: every chat export loads, and the tool call ids
        are a string column (they were null for legacy function calls)."""
        data = os.path.join(self.tmp, "audited")
        shutil.copytree(self.data, data)
        clock = df.Clock(seed=47)
        recs = (df.openai_functions_session(clock) + [df.gemini_sdk_tools(clock), df.anthropic_prefill(clock),
                df.openai_custom_tool_call(clock, with_function=True), df.anthropic_tool_error(clock)]
                + df.openai_audio_session(clock))
        df.DataDirWriter(data).write_records(recs, stamp="20261128_000000")
        for name, argv in (("a_chat", ("--format", "openai-chat")),
                           ("a_chat_all", ("--format", "openai-chat", "--include-thinking", "--include-images")),
                           ("a_sharegpt", ("--format", "sharegpt"))):
            out = os.path.join(self.tmp, name + ".jsonl")
            self.assertEqual(run_export(data, out, *argv), 0)
            ds = self.load(out, chunksize=os.path.getsize(out) + 1)
            self.assertEqual(len(ds), count_lines(out))
            if "openai-chat" in argv:
                ids = [call["id"] for row in ds for m in row["messages"] for call in (m.get("tool_calls") or [])]
                self.assertTrue(ids)
                self.assertTrue(all(isinstance(i, str) for i in ids), ids)

    def test_exports_of_every_shape_load_and_keep_their_format(self) -> None:
        """Every golden fixture, the mixed-provider tool loops and the audited shapes: each chat
        export loads, and every row, as ``datasets`` gives it back, keeps its format's rules."""
        data = os.path.join(self.tmp, "formats")
        df.build_formats(data)
        for name, argv in (("f_chat", ("--format", "openai-chat")),
                           ("f_chat_all", ("--format", "openai-chat", "--include-thinking", "--include-images")),
                           ("f_sharegpt", ("--format", "sharegpt")),
                           ("f_sharegpt_all", ("--format", "sharegpt", "--include-thinking", "--include-images"))):
            out = os.path.join(self.tmp, name + ".jsonl")
            self.assertEqual(run_export(data, out, *argv), 0)
            ds = self.load(out, chunksize=os.path.getsize(out) + 1)
            self.assertEqual(len(ds), count_lines(out))
            with self.subTest(name):
                for row in ds:
                    if "openai-chat" in argv:
                        # (absent keys come back as None: the struct's other messages have them)
                        row = {k: v for k, v in row.items() if v is not None}
                        row["messages"] = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
                        problems = openai_chat_problems(row, thinking=True)
                    else:
                        problems = sharegpt_problems(row, images="--include-images" in argv)
                    self.assertEqual(problems, [], row)

    def test_split_files(self) -> None:
        out = os.path.join(self.tmp, "split.jsonl")
        self.assertEqual(run_export(self.data, out, "--format", "openai-chat", "--split", "0.7"), 0)
        total = 0
        for side in ("train", "test"):
            path = os.path.join(self.tmp, "split.%s.jsonl" % side)
            n = count_lines(path)
            total += n
            if n:
                self.assertEqual(len(self.load(path)), n)
        self.assertEqual(total, len(self.man.chat_ok) + 40)  # the odd two are skipped


if __name__ == "__main__":
    unittest.main()
