from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from unittest import mock

from proxy_llm import export
from tests import data_factory as df

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proxy_llm export")
    export.add_arguments(parser)
    return parser.parse_args(argv)


def read_jsonl(path: str) -> list:
    with open(path, "rb") as fh:
        return [json.loads(line) for line in fh]


class ExportTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="export-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.man = df.build_mixed(self.data)

    def export(self, *argv: str, default_data_dir=None):
        """Run export.run(); returns (exit code, stderr text, stdout bytes)."""
        args = parse(list(argv))
        err = io.StringIO()
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="utf-8")
        with redirect_stderr(err), redirect_stdout(out):
            code = export.run(args, default_data_dir)
        out.flush()
        return code, err.getvalue(), raw.getvalue()

    def export_rows(self, fmt: str, *argv: str) -> list:
        path = os.path.join(self.tmp, "out.jsonl")
        code, err, _ = self.export("--data-dir", self.data, "--format", fmt, "--out", path, *argv)
        self.assertEqual(code, 0, err)
        self.last_summary = err
        return read_jsonl(path)


class TestOpenAIChat(ExportTestCase):
    def test_one_row_per_chat_record_and_an_honest_summary(self) -> None:
        rows = self.export_rows("openai-chat")
        self.assertEqual(len(rows), len(self.man.chat_ok))
        skipped = len(self.man.records) - len(self.man.chat_ok)
        self.assertIn("read %d records from %d files" % (len(self.man.records), self.man.files), self.last_summary)
        self.assertIn("1 torn line skipped", self.last_summary)
        self.assertIn("%d skipped (error 8, not_chat 3)" % skipped, self.last_summary)
        self.assertIn("wrote %d rows" % len(rows), self.last_summary)
        self.assertIn("thinking", self.last_summary)
        self.assertIn("image 4", self.last_summary)

    def test_files_the_recorder_did_not_name_are_skipped_and_named(self) -> None:
        # notes.jsonl in a session directory was read as records: its copy of a chat record
        # became one more training row.
        strays = [p for p in df.write_strays(self.data, self.man)
                  if not os.path.relpath(p, self.data).startswith("streams")]
        rows = self.export_rows("openai-chat")
        self.assertEqual(len(rows), len(self.man.chat_ok))
        self.assertIn("read %d records from %d files" % (len(self.man.records), self.man.files), self.last_summary)
        self.assertIn("%d files not named as the recorder names its files skipped (%s, ...)"
                      % (len(strays), ", ".join(strays[:3])), self.last_summary)

    def test_rows_have_the_fine_tuning_shape(self) -> None:
        for row in self.export_rows("openai-chat"):
            self.assertLessEqual(set(row), {"messages", "tools"})
            self.assertEqual(row["messages"][-1]["role"], "assistant")
            for m in row["messages"]:
                self.assertIn(m["role"], ("system", "user", "assistant", "tool"))
                if "content" in m:
                    self.assertIsInstance(m["content"], str)
                else:
                    self.assertTrue(m["tool_calls"])
                for call in m.get("tool_calls", []):
                    self.assertEqual(call["type"], "function")
                    self.assertIsInstance(call["function"]["arguments"], str)
                    json.loads(call["function"]["arguments"])
                if m["role"] == "tool":
                    self.assertIsInstance(m["tool_call_id"], str)
            for tool in row.get("tools", []):
                self.assertEqual(set(tool), {"type", "function"})
                self.assertEqual(tool["type"], "function")

    def test_every_tool_result_answers_an_earlier_call(self) -> None:
        for row in self.export_rows("openai-chat"):
            calls = set()
            for m in row["messages"]:
                for call in m.get("tool_calls", []):
                    calls.add(call["id"])
                if m["role"] == "tool":
                    self.assertIn(m["tool_call_id"], calls)

    def test_openai_multipart_image_and_tool_result(self) -> None:
        rows = self.export_rows("openai-chat", "--session", "oa-tools", "--include-images")
        self.assertEqual(len(rows), 2)
        msgs = rows[1]["messages"]
        self.assertEqual([m["role"] for m in msgs], ["system", "user", "assistant", "tool", "assistant"])
        self.assertEqual(msgs[1]["content"], [
            {"type": "text", "text": "What's the weather in Paris? Here is a photo."},
            {"type": "image_url", "image_url": {"url": "https://example.com/paris.jpg"}}])
        self.assertEqual(msgs[3], {"role": "tool", "content": "{\"temp\": 18, \"sky\": \"clear\"}",
                                   "tool_call_id": "call_abc123"})
        self.assertEqual(msgs[4]["content"], [{"type": "text", "text": "It is 18 C and clear in Paris."}])
        self.assertEqual([t["function"]["name"] for t in rows[1]["tools"]], ["get_weather", "search"])

    def test_anthropic_thinking_only_with_the_flag(self) -> None:
        rows = self.export_rows("openai-chat", "--session", "agent-1")
        self.assertNotIn("reasoning_content", json.dumps(rows))
        self.assertIn("thinking", self.last_summary)
        rows = self.export_rows("openai-chat", "--session", "agent-1", "--include-thinking")
        first = rows[0]["messages"]
        self.assertEqual(first[0], {"role": "system", "content": "You are a coding agent."})
        self.assertEqual(first[1], {"role": "user", "content": "<system-reminder>cwd /repo</system-reminder>\nFix the bug in app.py"})
        self.assertEqual(first[2]["reasoning_content"], "I should read app.py first.")
        self.assertEqual(first[2]["tool_calls"][0]["function"],
                         {"name": "read_file", "arguments": "{\"path\": \"app.py\"}"})
        self.assertNotIn("dropped parts: thinking", self.last_summary)
        self.assertEqual(rows[0]["tools"][0]["function"]["parameters"], df.READ_TOOL["input_schema"])

    def test_anthropic_tool_result_with_text_becomes_tool_then_user(self) -> None:
        rows = self.export_rows("openai-chat", "--session", "agent-1")
        fork = [r for r in rows if r["messages"][-1].get("content") == "The file looks correct now."][0]
        roles = [m["role"] for m in fork["messages"]]
        self.assertEqual(roles, ["system", "user", "assistant", "tool", "user", "assistant"])
        self.assertEqual(fork["messages"][4]["content"], "Actually the file changed, look again.")

    def test_responses_api(self) -> None:
        rows = self.export_rows("openai-chat", "--endpoint", "/v1/responses", "--include-thinking")
        self.assertEqual(len(rows), 2)
        first, second = rows[0]["messages"], rows[1]["messages"]
        self.assertEqual(first[0], {"role": "system", "content": "You are a support agent."})
        self.assertEqual(first[1], {"role": "user", "content": "Where is my order 42?"})
        self.assertEqual(first[2]["reasoning_content"], "Need the order.")
        self.assertEqual(first[2]["tool_calls"][0]["id"], "call_r1")
        self.assertEqual([m["role"] for m in second], ["system", "user", "assistant", "tool", "assistant"])
        self.assertEqual(second[3], {"role": "tool", "content": "shipped", "tool_call_id": "call_r1"})
        self.assertEqual(rows[0]["tools"], [{"type": "function", "function": {
            "name": "lookup", "description": "Look up an order",
            "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}])
        self.assertIn("server_tool 2", self.last_summary)

    def test_gemini_generated_ids_pair_calls_and_results(self) -> None:
        rows = self.export_rows("openai-chat", "--provider", "gemini", "--ended", "completed")
        self.assertEqual(len(rows), 2)
        msgs = rows[1]["messages"]
        self.assertEqual([m["role"] for m in msgs], ["system", "user", "assistant", "tool", "assistant"])
        call_id = msgs[2]["tool_calls"][0]["id"]
        self.assertEqual(msgs[3]["tool_call_id"], call_id)
        self.assertEqual(rows[0]["messages"][2]["tool_calls"][0]["id"], call_id)
        self.assertEqual(json.loads(msgs[3]["content"]), {"time": "09:30"})
        self.assertEqual(msgs[2]["tool_calls"][0]["function"]["arguments"], "{\"zone\": \"Asia/Tokyo\"}")

    def test_include_images_makes_every_content_but_a_tool_message_s_a_list(self) -> None:
        rows = self.export_rows("openai-chat", "--include-images")
        for row in rows:
            for m in row["messages"]:
                if "content" in m:
                    self.assertIsInstance(m["content"], str if m["role"] == "tool" else list)
        gem = [r for r in rows if r["messages"][0]["content"] == [{"type": "text", "text": "Be brief."}]][0]
        self.assertEqual(gem["messages"][1]["content"][1],
                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
        self.assertNotIn("image", self.last_summary.split("dropped parts:")[-1].split(";")[0].replace("image_file", ""))

    def test_no_header_or_secret_leaves_through_chat_exports(self) -> None:
        for fmt in ("openai-chat", "sharegpt"):
            text = json.dumps(self.export_rows(fmt, "--include-images", "--include-thinking"))
            for needle in ("REDACTED", "x-api-key", "authorization", "x-request-id", "user-agent"):
                self.assertNotIn(needle, text)


class TestSharegpt(ExportTestCase):
    def test_turn_mapping(self) -> None:
        rows = self.export_rows("sharegpt", "--session", "oa-tools")
        self.assertEqual(len(rows), 2)
        conv = rows[1]["conversations"]
        self.assertEqual([t["from"] for t in conv], ["system", "human", "function_call", "observation", "gpt"])
        self.assertEqual(json.loads(conv[2]["value"]), {"name": "get_weather", "arguments": {"city": "Paris"}})
        self.assertEqual(conv[3]["value"], "{\"temp\": 18, \"sky\": \"clear\"}")
        tools = json.loads(rows[1]["tools"])
        self.assertEqual(tools[0]["name"], "get_weather")
        self.assertIn("parameters", tools[0])

    def test_text_and_tool_call_in_one_message_gives_one_function_call(self) -> None:
        # It gave a gpt turn then a function_call turn, two turns where LLaMA-Factory's reader
        # takes one (it refused the row); the text is dropped and counted, the thinking kept.
        rows = self.export_rows("sharegpt", "--session", "agent-1", "--include-thinking")
        first = rows[0]["conversations"]
        self.assertEqual([t["from"] for t in first], ["system", "human", "function_call"])
        thinking, _, calls = first[2]["value"].partition("\n</think>\n\n")
        self.assertTrue(thinking.startswith("<think>\n"), first[2]["value"])
        self.assertEqual(json.loads(calls), {"name": "read_file", "arguments": {"path": "app.py"}})
        self.assertIn("dropped parts: tool_call_text 7", self.last_summary)
        self.assertNotIn("thinking", self.last_summary)

    def test_rows_without_tools_have_an_empty_tools_string(self) -> None:
        rows = self.export_rows("sharegpt", "--model", "claude-haiku-*")
        self.assertTrue(rows)
        for row in rows:
            self.assertEqual(row["tools"], "")
            self.assertEqual(set(row), {"conversations", "tools"})

    def test_images_placeholder_and_list(self) -> None:
        rows = self.export_rows("sharegpt", "--provider", "gemini", "--include-images")
        for row in rows:
            self.assertIn("images", row)
        first = rows[0]
        self.assertEqual(first["conversations"][1]["value"], "What time is it in Tokyo?\n<image>")
        self.assertEqual(first["images"], ["data:image/png;base64,iVBORw0KGgo="])


class TestRecordsFormat(ExportTestCase):
    def test_every_record_with_json_text_bodies(self) -> None:
        rows = self.export_rows("records")
        self.assertEqual(len(rows), len(self.man.records))
        originals = {r["id"]: r for r in self.man.records}
        keys = list(export.TYPED_FIELDS) + list(export.JSON_TEXT_FIELDS) + ["extra"]
        for row in rows:
            self.assertEqual(sorted(row), sorted(keys))
            orig = originals[row["id"]]
            for field in export.TYPED_FIELDS:
                self.assertEqual(row[field], orig[field])
            for field in export.JSON_TEXT_FIELDS:
                self.assertIsInstance(row[field], str)
                self.assertEqual(json.loads(row[field]), orig.get(field))
            self.assertEqual(row["extra"], "{}")

    def test_headers_are_exported_exactly_as_recorded(self) -> None:
        rows = self.export_rows("records", "--session", "oa-tools")
        for row in rows:
            orig = [r for r in self.man.records if r["id"] == row["id"]][0]
            self.assertEqual(json.loads(row["request_headers"]), orig["request_headers"])

    def test_every_field_of_the_schema_is_a_column_not_extra(self) -> None:
        # stream_events, a field of the schema, went to extra as "a field this version does
        # not know" (its records' rows held {"stream_events": N} there, the others "{}").
        from proxy_llm import record

        columns = set(export.TYPED_FIELDS) | set(export.JSON_TEXT_FIELDS)
        self.assertEqual([f for f in record.FIELDS if f not in columns], [])
        self.assertEqual(sorted(columns - set(record.FIELDS)), [])
        rec = df.openai_chat(df.Clock(seed=4), "streamed", [{"role": "user", "content": "hi"}], {"content": "yo"})
        rec["stream_events"] = 3
        row = export.render_record(rec)
        self.assertEqual((row["extra"], row["stream_events"]), ("{}", "3"))

    def test_unknown_fields_are_kept(self) -> None:
        rec = df.openai_chat(df.Clock(seed=3), "extra", [{"role": "user", "content": "hi"}], {"content": "yo"})
        rec["future_field"] = {"a": 1}
        df.DataDirWriter(self.data).write_records([rec], stamp="20261128_000000")
        rows = self.export_rows("records", "--session", "extra")
        self.assertEqual(json.loads(rows[0]["extra"]), {"future_field": {"a": 1}})


class TestDedupe(ExportTestCase):
    def test_agent_session_keeps_the_longest_branch_and_the_fork(self) -> None:
        rows = self.export_rows("records", "--session", "agent-1", "--dedupe")
        self.assertEqual(sorted(r["id"] for r in rows), sorted(self.man.agent["kept_ids"]))
        self.assertIn("3 superseded by --dedupe", self.last_summary)

    def test_chat_rows_after_dedupe(self) -> None:
        rows = self.export_rows("openai-chat", "--session", "agent-1", "--dedupe")
        finals = sorted(r["messages"][-1]["content"] for r in rows)
        self.assertEqual(finals, ["Fixed: `retrun` is now `return`.", "Fixing a typo in app.py",
                                  "The file looks correct now."])
        longest = max(rows, key=lambda r: len(r["messages"]))
        self.assertEqual(len(longest["messages"]), 7)

    def test_without_dedupe_every_prefix_is_there(self) -> None:
        rows = self.export_rows("openai-chat", "--session", "agent-1")
        self.assertEqual(len(rows), self.man.agent["chat"])

    def test_dedupe_does_not_cross_sessions(self) -> None:
        clock = df.Clock(seed=11)
        msgs = [{"role": "user", "content": "same question"}]
        a = df.openai_chat(clock, "s-a", msgs, {"content": "same answer"})
        b = df.openai_chat(clock, "s-b", msgs, {"content": "same answer"})
        out = df.DataDirWriter(self.data)
        out.write_records([a], stamp="20261128_000000")
        out.write_records([b], stamp="20261128_000001")
        rows = self.export_rows("openai-chat", "--session", "s-a,s-b", "--dedupe")
        self.assertEqual(len(rows), 2)

    def test_dropped_parts_are_counted_for_written_rows_only(self) -> None:
        self.export_rows("openai-chat", "--include-images")
        self.assertIn("server_tool 4", self.last_summary)
        self.export_rows("openai-chat", "--include-images", "--dedupe")
        self.assertIn("dropped parts: server_tool 2, thinking 2;", self.last_summary)

    def test_a_row_the_format_cannot_hold_supersedes_nothing(self) -> None:
        # The later record of a session repeats the first and goes on, with a system message
        # in the middle, which sharegpt cannot hold (system_not_first): it is skipped, and the
        # first, shorter one is written. (It was superseded by the skipped one: neither was.)
        clock = df.Clock(seed=12)
        first = [{"role": "user", "content": "first question"}]
        a = df.openai_chat(clock, "s-held", first, {"content": "first answer"})
        later = first + [{"role": "assistant", "content": "first answer"},
                         {"role": "system", "content": "be brief"}, {"role": "user", "content": "more?"}]
        b = df.openai_chat(clock, "s-held", later, {"content": "no"})
        df.DataDirWriter(self.data).write_records([a, b], stamp="20261128_000000")
        rows = self.export_rows("sharegpt", "--session", "s-held", "--dedupe")
        self.assertEqual([r["conversations"][-1]["value"] for r in rows], ["first answer"])
        self.assertIn("system_not_first", self.last_summary)
        self.assertNotIn("superseded", self.last_summary)
        rows = self.export_rows("openai-chat", "--session", "s-held", "--dedupe")  # (it holds both)
        self.assertEqual([r["messages"][-1]["content"] for r in rows], ["no"])

    def agent_turns(self, n: int) -> list:
        """``n`` calls of one session, each resending the whole conversation before it."""
        clock = df.Clock(seed=21)
        msgs = [{"role": "user", "content": "step 0"}]
        recs = []
        for i in range(n):
            recs.append(df.openai_chat(clock, "s-long", list(msgs), {"content": "done %d" % i}))
            msgs += [{"role": "assistant", "content": "done %d" % i}, {"role": "user", "content": "step %d" % (i + 1)}]
        return recs

    def test_the_second_pass_converts_only_what_it_may_write(self) -> None:
        # Pass two converted and rendered every record again, and dropped the superseded ones
        # after that: on an agent's session, nearly all of it done twice for nothing.
        df.DataDirWriter(self.data).write_records(self.agent_turns(6), stamp="20261128_000000")
        for fmt in ("openai-chat", "sharegpt", "records"):
            with self.subTest(fmt), mock.patch.object(export, "convert", side_effect=export.convert) as conv:
                rows = self.export_rows(fmt, "--session", "s-long", "--dedupe")
                self.assertEqual(len(rows), 1)
                self.assertIn("5 superseded by --dedupe", self.last_summary)
                self.assertEqual(conv.call_count, 6 + 1)  # every record in pass one, the kept one in two

    def test_an_id_shared_with_a_record_the_format_cannot_hold(self) -> None:
        # (A damaged data dir: a record copied under the id of another.) The one sharegpt cannot
        # hold is counted skipped, the superseded one superseded, as before.
        first, second = self.agent_turns(2)
        bad = df.openai_chat(df.Clock(seed=22), "s-long", [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "more?"}], {"content": "no"})
        bad["id"] = first["id"]
        df.DataDirWriter(self.data).write_records([first, bad, second], stamp="20261128_000000")
        rows = self.export_rows("sharegpt", "--session", "s-long", "--dedupe")
        self.assertEqual([r["conversations"][-1]["value"] for r in rows], ["done 1"])
        self.assertIn("1 skipped (system_not_first 1)", self.last_summary)
        self.assertIn("1 superseded by --dedupe", self.last_summary)

    def test_dedupe_is_independent_of_the_thinking_flag(self) -> None:
        plain = self.export_rows("openai-chat", "--dedupe")
        thinking = self.export_rows("openai-chat", "--dedupe", "--include-thinking")
        self.assertEqual(len(plain), len(thinking))


class TestSplit(ExportTestCase):
    def test_the_digests_are_those_of_earlier_versions(self) -> None:
        # --split puts a row on its side by the digest of the conversation's opening: a faster
        # digest must be the same digest, or a new version moves rows from train to test.
        ms = [{"role": "user", "tool_call_id": None, "name": None, "thinking": ["x"], "tool_calls": [],
               "parts": [{"type": "text", "text": "h\u00e9llo \ud800"}, {"type": "image", "url": "data:x"}]},
              {"role": "assistant", "tool_call_id": None, "name": "bob", "parts": [], "thinking": [],
               "tool_calls": [{"id": "c1", "name": "f", "arguments": "{}"},
                              {"id": None, "name": "g", "arguments": "{\"a\": 1}"}]},
              {"role": "tool", "tool_call_id": "c1", "name": None, "parts": [{"type": "text", "text": ""}],
               "tool_calls": [], "thinking": []},
              {"role": "user", "tool_call_id": ["x"], "name": 5, "parts": [{"type": "text", "text": 7}],
               "tool_calls": [], "thinking": []}]
        self.assertEqual([export.message_digest(m).hex() for m in ms], [
            "6157a64633907d2199fb6b84a377fc5b", "ec2821cb03d1482c9867c09f7d16d34f",
            "c8817e4d335233c7f6ba3dd602960f81", "c1877c0059de70911ee3db71b783e8c2"])
        conv = export.Conversation(ms, [])
        self.assertEqual([d.hex() for d in export.prefix_digests(conv)], [
            "0e0ed92724b8065feaa8005bdd7d5c49", "bdefcaf44a5a17a7c70045bd8674975f",
            "d250ebb203926a0459c99133e16207d9", "aa0a029667d969a482a8d6809db79416"])
        self.assertEqual(export.opening_digest(conv).hex(), "0e0ed92724b8065feaa8005bdd7d5c49")

    def test_split_is_deterministic_and_complete(self) -> None:
        out = os.path.join(self.tmp, "ds.jsonl")
        code, err, _ = self.export("--data-dir", self.data, "--format", "openai-chat", "--out", out,
                                   "--split", "0.5")
        self.assertEqual(code, 0, err)
        train = read_jsonl(os.path.join(self.tmp, "ds.train.jsonl"))
        test = read_jsonl(os.path.join(self.tmp, "ds.test.jsonl"))
        self.assertEqual(len(train) + len(test), len(self.man.chat_ok))
        self.assertFalse(os.path.exists(out))
        code, err2, _ = self.export("--data-dir", self.data, "--format", "openai-chat", "--out", out,
                                    "--split", "0.5")
        self.assertEqual(read_jsonl(os.path.join(self.tmp, "ds.train.jsonl")), train)

    def test_prefixes_of_one_conversation_land_on_one_side(self) -> None:
        out = os.path.join(self.tmp, "ds.jsonl")
        for ratio in ("0.1", "0.5", "0.9"):
            self.export("--data-dir", self.data, "--format", "openai-chat", "--out", out,
                        "--session", "agent-1", "--split", ratio)
            train = read_jsonl(os.path.join(self.tmp, "ds.train.jsonl"))
            test = read_jsonl(os.path.join(self.tmp, "ds.test.jsonl"))
            main = [r for r in train + test if r["messages"][0]["content"] == "You are a coding agent."]
            self.assertEqual(len(main), 5)
            self.assertTrue(all(r in train for r in main) or all(r in test for r in main))

    def test_split_needs_out_and_a_ratio_in_range(self) -> None:
        code, err, _ = self.export("--data-dir", self.data, "--format", "records", "--split", "0.9")
        self.assertEqual(code, 2)
        self.assertIn("--split needs --out", err)
        code, err, _ = self.export("--data-dir", self.data, "--format", "records", "--split", "1.5",
                                   "--out", os.path.join(self.tmp, "x.jsonl"))
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_an_empty_out_path_is_a_usage_error(self) -> None:
        # It was an OS error about renaming a ".tmp-<pid>" file to "".
        for extra in ((), ("--split", "0.9")):
            code, err, out = self.export("--data-dir", self.data, "--format", "records", "--out", "", *extra)
            self.assertEqual((code, err.strip(), out), (2, "proxy_llm export: --out: an empty path", b""))

    def test_split_paths(self) -> None:
        self.assertEqual(export.split_paths("a/b.jsonl"), ("a/b.train.jsonl", "a/b.test.jsonl"))
        self.assertEqual(export.split_paths("data"), ("data.train.jsonl", "data.test.jsonl"))


class TestFilters(ExportTestCase):
    def ids(self, *argv: str) -> set:
        return {r["id"] for r in self.export_rows("records", *argv)}

    def test_session_model_provider_endpoint(self) -> None:
        recs = self.man.records
        self.assertEqual(self.ids("--session", "gem-1"), {r["id"] for r in recs if r["session_id"] == "gem-1"})
        odd = df.openai_chat(df.Clock(seed=8), "team/alice", [{"role": "user", "content": "q"}], {"content": "a"})
        df.DataDirWriter(self.data).write_records([odd], stamp="20261128_000000")
        self.assertEqual(self.ids("--session", "team/alice"), {odd["id"]})
        self.assertEqual(self.ids("--session", df.sanitize("team/alice")), {odd["id"]})
        self.assertEqual(self.ids("--model", "claude-*"), {r["id"] for r in recs if str(r["model"]).startswith("claude-")})
        self.assertEqual(self.ids("--provider", "anthropic"), {r["id"] for r in recs if r["provider_type"] == "anthropic"})
        self.assertEqual(self.ids("--endpoint", "/v1/embeddings", "--endpoint", "/v1/models"),
                         {r["id"] for r in recs if r["endpoint"] in ("/v1/embeddings", "/v1/models")})

    def test_status_stream_and_ended(self) -> None:
        recs = self.man.records
        self.assertEqual(self.ids("--status", "4xx,none"),
                         {r["id"] for r in recs if r["status_code"] is None or 400 <= r["status_code"] < 500})
        self.assertEqual(self.ids("--status", "200"), {r["id"] for r in recs if r["status_code"] == 200})
        self.assertEqual(self.ids("--stream"), {r["id"] for r in recs if r["stream"]})
        self.assertEqual(self.ids("--no-stream"), {r["id"] for r in recs if not r["stream"]})
        self.assertEqual(self.ids("--ended", "timeout", "--ended", "shutdown"),
                         {r["id"] for r in recs if r["ended"] in ("timeout", "shutdown")})

    def test_since_and_until(self) -> None:
        recs = sorted(self.man.records, key=lambda r: r["timestamp"])
        middle = recs[len(recs) // 2]["timestamp"]
        self.assertEqual(self.ids("--since", middle), {r["id"] for r in recs if r["timestamp"] >= middle})
        self.assertEqual(self.ids("--until", middle), {r["id"] for r in recs if r["timestamp"] < middle})
        self.assertEqual(self.ids("--until", "2026-11-27"), {r["id"] for r in recs})
        self.assertEqual(self.ids("--since", "2026-11-27T17:48:00+01:00"), {r["id"] for r in recs})

    def test_nothing_matched_is_exit_1_with_an_empty_file(self) -> None:
        out = os.path.join(self.tmp, "none.jsonl")
        code, err, _ = self.export("--data-dir", self.data, "--format", "records", "--out", out,
                                   "--since", "2030-01-01")
        self.assertEqual(code, 1)
        self.assertEqual(os.path.getsize(out), 0)
        self.assertIn("wrote 0 rows", err)

    def test_bad_filter_values_are_exit_2_one_line(self) -> None:
        for argv in (("--status", "2x"), ("--since", "yesterday"), ("--ended", "finished")):
            code, err, _ = self.export("--data-dir", self.data, "--format", "records", *argv)
            self.assertEqual(code, 2, argv)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertNotIn("Traceback", err)

    def test_parse_when(self) -> None:
        self.assertEqual(export.parse_when("2026-11-27T16:48:15.123456Z").isoformat(),
                         "2026-11-27T16:48:15.123456+00:00")
        self.assertEqual(export.parse_when("2026-11-27 18:00+02:00").isoformat(), "2026-11-27T16:00:00+00:00")
        self.assertEqual(export.parse_when("2026-11-27", end_of_day=True).isoformat(), "2026-11-28T00:00:00+00:00")


class TestCommand(ExportTestCase):
    def test_stdout_when_no_out(self) -> None:
        code, err, out = self.export("--data-dir", self.data, "--format", "sharegpt")
        self.assertEqual(code, 0)
        # (the agent's fork, a user message right after a tool result, is no sharegpt row)
        self.assertEqual(len(out.splitlines()), len(self.man.chat_ok) - 1)
        self.assertIn("sharegpt_order 1)", err)
        self.assertIn("to stdout", err)

    def test_out_dash_is_stdout(self) -> None:
        # (A file named "-" was written: an audit's finding.)
        cwd = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, cwd)
        code, err, out = self.export("--data-dir", self.data, "--format", "records", "--out", "-")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), len(self.man.records))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "-")))

    def test_out_may_not_be_a_record_file_it_reads(self) -> None:
        # It replaced the recording with the export's rows, exit 0 (an audit's finding).
        record_file = sorted(glob.glob(os.path.join(self.data, "session_*", "*.jsonl")))[0]
        with open(record_file, "rb") as fh:
            before = fh.read()
        for argv in (("--out", record_file), ("--out", os.path.join(self.data, ".", os.path.relpath(
                record_file, self.data)))):
            code, err, _ = self.export("--data-dir", self.data, "--format", "records", *argv)
            self.assertEqual(code, 2, err)
            self.assertIn("is a record file of the data dir", err)
        with open(record_file, "rb") as fh:
            self.assertEqual(fh.read(), before)

    def test_a_twin_is_named_in_the_summary(self) -> None:
        # X.jsonl.gz beside X.jsonl (a compression cut short) is read once, as the plain file:
        # the summary said nothing of it (an audit's finding); verify compares the two.
        record_file = sorted(glob.glob(os.path.join(self.data, "session_*", "*.jsonl")))[0]
        with open(record_file, "rb") as src, gzip.open(record_file + ".gz", "wb") as dst:
            dst.write(src.read())
        code, err, out = self.export("--data-dir", self.data, "--format", "records")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), len(self.man.records))
        self.assertIn("1 .jsonl.gz twin of a plain file read once, as the plain one (%s.gz)" % record_file, err)

    def test_default_data_dir_is_used(self) -> None:
        code, _, out = self.export("--format", "records", default_data_dir=self.data)
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), len(self.man.records))

    def test_unreadable_data_dir_is_exit_2(self) -> None:
        code, err, _ = self.export("--data-dir", os.path.join(self.tmp, "missing"), "--format", "records")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_unwritable_out_is_exit_2(self) -> None:
        code, err, _ = self.export("--data-dir", self.data, "--format", "records",
                                   "--out", os.path.join(self.tmp, "no", "such", "dir.jsonl"))
        self.assertEqual(code, 2)
        self.assertNotIn("Traceback", err)

    def test_lone_surrogate_is_the_replacement_character_not_fatal(self) -> None:
        # (Written back as its escape until 2026-12-06: no loader but Python's took the file.)
        rec = df.openai_chat(df.Clock(seed=5), "sur", [{"role": "user", "content": "bad \ud800 char"}],
                             {"content": "ok"})
        path = df.DataDirWriter(self.data).session_file("sur", "20261128_000000")
        with open(path, "wb") as fh:
            fh.write((json.dumps(rec) + "\n").encode("ascii"))
        rows = self.export_rows("openai-chat", "--session", "sur")
        self.assertEqual(rows[0]["messages"][0]["content"], "bad \ufffd char")

    def test_no_temp_file_is_left(self) -> None:
        self.export_rows("records")
        self.assertEqual(sorted(os.listdir(self.tmp)), ["data", "out.jsonl"])

    def test_progress_bar_draws_and_clears(self) -> None:
        stream = io.StringIO()
        bar = export.Progress(stream, 1000, enabled=True, interval=0.0)
        bar.update(500, 10)
        bar.finish()
        self.assertIn("50%", stream.getvalue())
        self.assertTrue(stream.getvalue().endswith("\r\x1b[K"))
        quiet = io.StringIO()
        export.Progress(quiet, 1000, enabled=False).update(500, 10)
        self.assertEqual(quiet.getvalue(), "")

    def test_progress_only_on_a_terminal_with_a_large_input(self) -> None:
        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        out = os.path.join(self.tmp, "p.jsonl")
        for tty, minimum, shown in ((True, 0, True), (True, 1 << 40, False), (False, 0, False)):
            err = Tty() if tty else io.StringIO()
            old = export.PROGRESS_MIN_BYTES
            export.PROGRESS_MIN_BYTES = minimum
            try:
                with redirect_stderr(err):
                    export.run(parse(["--data-dir", self.data, "--format", "records", "--out", out]))
            finally:
                export.PROGRESS_MIN_BYTES = old
            self.assertEqual("export [" in err.getvalue(), shown, (tty, minimum))
            self.assertTrue(err.getvalue().rstrip("\n").splitlines()[-1].lstrip("\r\x1b[K").startswith("export: read"))

    def test_help_lists_every_option(self) -> None:
        parser = argparse.ArgumentParser(prog="proxy_llm export")
        export.add_arguments(parser)
        text = parser.format_help()
        for option in ("--data-dir", "--format", "--out", "--session", "--model", "--provider", "--endpoint",
                       "--since", "--until", "--status", "--stream", "--no-stream", "--ended",
                       "--include-thinking", "--include-images", "--dedupe", "--split"):
            self.assertIn(option, text)

    def test_stream_and_no_stream_exclude_each_other(self) -> None:
        with redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as ctx:
            parse(["--format", "records", "--stream", "--no-stream"])
        self.assertEqual(ctx.exception.code, 2)

    def test_as_a_subprocess(self) -> None:
        if not os.path.exists(os.path.join(ROOT, "proxy_llm", "cli.py")):
            self.skipTest("cli.py not there yet")
        out = os.path.join(self.tmp, "sub.jsonl")
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-m", "proxy_llm", "export", "--data-dir", self.data,
                               "--format", "openai-chat", "--dedupe", "--out", out],
                              cwd=self.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(b"export: read", proc.stderr)
        self.assertEqual(len(read_jsonl(out)), 6)  # agent 3 + one per other tool loop


class TestGoldenResponses(unittest.TestCase):
    """Every reassembled response in tests/fixtures converts (or is skipped for a reason)."""

    REQUESTS = {
        "openai_chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        "openai_responses": {"model": "m", "input": "hi"},
        "anthropic_messages": {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]},
        "gemini": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
    }
    EXPECT = {  # fixture -> (a piece of the final assistant message, dropped counts)
        "openai_chat/deepseek_reasoning": ('"reasoning_content": "Okay', {}),
        "openai_chat/n2_logprobs": ("Red.", {"choice": 1}),
        "openai_chat/tool_calls_parallel": ('"tool_calls"', {}),
        "openai_responses/function_calls_parallel": ('"tool_calls"', {}),
        "openai_responses/reasoning_summary": ('"reasoning_content"', {}),
        "anthropic_messages/thinking_signature": ("27 * 453 = 12,231", {"redacted_thinking": 1}),
        "gemini/sse_function_calls": ('"name": "get_weather"', {}),
        "openai_chat/legacy_function_call": ('"name": "get_current_weather"', {}),
        "openai_chat/audio_output": ('"content": "Hello there!"', {"audio": 1}),
        "gemini/sse_image_signatures_cached": ('"content": "Here is your cat wearing a red top hat."', {"image": 1}),
    }
    # Answers that stopped at their token limit, cut mid-way: skipped as max_tokens.
    MAX_TOKENS = {"openai_chat/usage_no_done", "openai_responses/incomplete", "gemini/sse_two_candidates"}

    # Answers resting on a tool the chat formats cannot hold: skipped as unsupported_tool_call.
    UNSUPPORTED = {"openai_chat/search_annotations", "openai_responses/builtin_tools",
                   "openai_responses/builtin_tools_cut", "anthropic_messages/server_tools_citations",
                   "anthropic_messages/beta_web_fetch_code_execution", "gemini/sse_code_execution_grounding",
                   "anthropic_messages/web_search_error_citations_empty_tool",
                   "openai_responses/background_reasoning_text_code_interpreter",
                   "openai_responses/reasoning_text_code_interpreter_cut"}

    def test_fixtures(self) -> None:
        import glob
        seen = set()
        unsupported = set()
        cut = set()
        for dialect, req in self.REQUESTS.items():
            paths = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", dialect, "*.expected.json")))
            if not paths:
                self.skipTest("no golden fixtures yet")
            for path in paths:
                name = "%s/%s" % (dialect, os.path.basename(path)[: -len(".expected.json")])
                with open(path, encoding="utf-8") as fh:
                    expected = json.load(fh)
                rec = {"dialect": dialect, "status_code": 200, "request_body": req,
                       "response_body": expected["response_body"],
                       "endpoint": "/v1beta/models/gemini-2.0-flash:streamGenerateContent"}
                dropped = export.Counter()
                with self.subTest(name):
                    try:
                        conv = export.convert(rec, dropped)
                    except export.Skip as skip:
                        if skip.reason == "unsupported_tool_call":
                            unsupported.add(name)
                            continue
                        if skip.reason == "max_tokens":
                            cut.add(name)
                            continue
                        if skip.reason == "bad_tool_arguments":  # a call cut mid-arguments
                            self.assertIs(expected.get("complete"), False, "good arguments were refused")
                            continue
                        self.assertEqual(skip.reason, "no_response")
                        self.assertTrue(expected.get("error"), "a good answer was skipped")
                        continue
                    row = export.render_openai_chat(conv, export.Options(True, False), dropped)
                    last = row["messages"][-1]
                    self.assertEqual(last["role"], "assistant")
                    self.assertTrue(last.get("content") or last.get("tool_calls"))
                    if name in self.EXPECT:
                        seen.add(name)
                        piece, counts = self.EXPECT[name]
                        self.assertIn(piece, json.dumps(last))
                        self.assertEqual(dict(dropped), counts)
        self.assertEqual(seen, set(self.EXPECT))
        self.assertEqual(unsupported, self.UNSUPPORTED)
        self.assertEqual(cut, self.MAX_TOKENS)


class TestConvertUnits(unittest.TestCase):
    def test_not_chat_and_errors_are_skipped_with_a_reason(self) -> None:
        clock = df.Clock()
        cases = {"not_chat": df.embeddings(clock, "s"),
                 "error": df.endings_session(clock)[-1]}
        for reason, rec in cases.items():
            with self.assertRaises(export.Skip) as ctx:
                export.convert(rec)
            self.assertEqual(ctx.exception.reason, reason)

    def test_truncated_request_is_skipped(self) -> None:
        rec = df.openai_chat(df.Clock(), "s", [{"role": "user", "content": "x"}], {"content": "y"},
                             truncated={"request": {"size": 99, "sha256": "0" * 64, "kept": 10}})
        rec["request_body"] = "{\"model\": \"gpt"
        with self.assertRaises(export.Skip) as ctx:
            export.convert(rec)
        self.assertEqual(ctx.exception.reason, "truncated")

    def test_an_answer_kept_as_text_is_a_bad_body(self) -> None:
        # (Nested past what the loaders take, not JSON, a stream whose reassembly failed: it was
        # skipped as no_response, an answer without an assistant message: an audit's finding.)
        rec = df.openai_chat(df.Clock(), "s", [{"role": "user", "content": "x"}], {"content": "y"})
        rec["response_body"] = json.dumps(rec["response_body"])
        with self.assertRaises(export.Skip) as ctx:
            export.convert(rec)
        self.assertEqual(ctx.exception.reason, "bad_body")

    def test_a_stream_with_an_event_left_out_is_skipped_as_truncated(self) -> None:
        # An event past max_sse_event is left out of the reassembly (stream_truncated): the
        # answer had a hole and was exported as whole (an audit's finding).
        rec = df.openai_chat(df.Clock(), "s", [{"role": "user", "content": "x"}], {"content": "Start.  End."},
                             stream=True, stream_truncated=True)
        with self.assertRaises(export.Skip) as ctx:
            export.convert(rec)
        self.assertEqual(ctx.exception.reason, "truncated")

    def test_an_answer_cut_at_its_token_limit_is_skipped(self) -> None:
        # Exported as a finished turn, it taught a model to stop mid-sentence (an audit's finding).
        clock = df.Clock(seed=3)
        user = [{"role": "user", "content": "Tell me a story"}]
        chat = df.openai_chat(clock, "s", user, {"content": "Once upon a"})
        responses = df.openai_responses(clock, "s", "Tell me a story", [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Once upon a"}]}])
        claude = df.anthropic(clock, "s", user, [{"type": "text", "text": "Once upon a"}])
        gem = df.gemini(clock, "s", [{"role": "user", "parts": [{"text": "Tell me a story"}]}], [{"text": "Once upon a"}])
        cuts = [(chat, lambda r: r["response_body"]["choices"][0].update(finish_reason="length")),
                (responses, lambda r: r["response_body"].update(status="incomplete",
                                                                incomplete_details={"reason": "max_output_tokens"})),
                (claude, lambda r: r["response_body"].update(stop_reason="max_tokens")),
                (gem, lambda r: r["response_body"]["candidates"][0].update(finishReason="MAX_TOKENS"))]
        for rec, cut in cuts:
            with self.subTest(rec["dialect"]):
                self.assertEqual(export.convert(rec).messages[-1]["parts"][0]["text"], "Once upon a")
                cut(rec)
                with self.assertRaises(export.Skip) as ctx:
                    export.convert(rec)
                self.assertEqual(ctx.exception.reason, "max_tokens")
        # Not a cut: Responses' incomplete for a content filter is another matter (exported).
        responses["response_body"]["incomplete_details"] = {"reason": "content_filter"}
        self.assertEqual(len(export.convert(responses).messages), 2)

    def test_extra_choices_and_redacted_thinking_are_counted(self) -> None:
        clock = df.Clock()
        rec = df.openai_chat(clock, "s", [{"role": "user", "content": "x"}], {"content": "a"})
        rec["response_body"]["choices"].append(dict(rec["response_body"]["choices"][0], index=1))
        dropped = export.Counter()
        export.convert(rec, dropped)
        self.assertEqual(dropped, {"choice": 1})
        rec = df.anthropic(clock, "s", [{"role": "user", "content": "x"}],
                           [{"type": "redacted_thinking", "data": "abc"}, {"type": "text", "text": "y"}])
        dropped = export.Counter()
        export.convert(rec, dropped)
        self.assertEqual(dropped, {"redacted_thinking": 1})

    def test_thinking_only_answer_is_empty_with_or_without_the_flag(self) -> None:
        data = tempfile.mkdtemp(prefix="export-think-")
        self.addCleanup(shutil.rmtree, data)
        rec = df.anthropic(df.Clock(), "think", [{"role": "user", "content": "x"}],
                           [{"type": "thinking", "thinking": "hmm", "signature": "s"}])
        df.DataDirWriter(data).write_records([rec])
        out = os.path.join(data, "out.jsonl")
        err = io.StringIO()
        with redirect_stderr(err):
            code = export.run(parse(["--data-dir", data, "--format", "openai-chat", "--out", out]))
        self.assertEqual(code, 1)
        self.assertIn("1 skipped (empty_answer 1)", err.getvalue())
        err = io.StringIO()
        with redirect_stderr(err):
            code = export.run(parse(["--data-dir", data, "--format", "openai-chat", "--out", out,
                                     "--include-thinking"]))
        # It was written as {"content": "", "reasoning_content": "hmm"}, which OpenAI refuses.
        self.assertEqual(code, 1)
        self.assertIn("1 skipped (empty_answer 1)", err.getvalue())

    def test_gemini_count_tokens_is_not_chat(self) -> None:
        rec = df.gemini(df.Clock(), "s", [{"role": "user", "parts": [{"text": "x"}]}], [{"text": "y"}])
        rec["endpoint"] = "/v1beta/models/gemini-2.0-flash:countTokens"
        with self.assertRaises(export.Skip):
            export.convert(rec)


# ----------------------------------------------------------------- format validators
#
# The rules the documented readers apply, checked strictly on every exported row.  Sources:
# OpenAI's fine-tuning input schema (FineTuneChatRequestInput: row keys messages, tools,
# parallel_tool_calls, functions; system, user, assistant (with weight 0/1), tool and function
# messages), its function-calling and vision fine-tuning guides (tool_calls with the arguments as
# JSON text; images as image_url parts of user messages only, http(s) or base64 data URLs of
# JPEG, PNG or WEBP), the errors its file validation returns ("At least one of content or
# function_call must be set"; a tool message's "content: Input should be a valid string"), the
# cookbook's "Data preparation and analysis for chat model fine-tuning" checks (every message has
# a role, content text, at least one assistant message); and LLaMA-Factory's sharegpt reader
# (SharegptDatasetConverter: a system turn only first, then human/observation at even and
# gpt/function_call at odd positions, an even number of turns; a function_call value is
# {"name", "arguments"} JSON or a list of them; tools as JSON text).

OPENAI_ROW_KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}
OPENAI_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "function_call", "weight", "refusal", "audio"},
    "tool": {"role", "content", "tool_call_id"},
    "function": {"role", "content", "name"},
}
IMAGE_URL = re.compile(r"^(https?://\S+|data:image/(jpeg|png|webp);base64,[A-Za-z0-9+/]+={0,2})$")


def _json_object_text(text) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _text_parts_problems(content, where: str, images: bool) -> list:
    """Problems of a content that is a list of parts (text, and image_url where ``images``)."""
    if not content:
        return ["%s: an empty list of parts" % where]
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                out.append("%s: a bad text part %r" % (where, part))
        elif kind == "image_url" and images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if set(part) != {"type", "image_url"} or not isinstance(url, str) or not IMAGE_URL.match(url):
                out.append("%s: a bad image part %r" % (where, part))
        else:
            out.append("%s: a part the format does not take there: %r" % (where, part))
    if not any(isinstance(p, dict) and (p.get("text") or p.get("type") == "image_url") for p in content):
        out.append("%s: no text or image in the parts" % where)
    return out


def openai_chat_problems(row, thinking: bool = False) -> list:
    """Every way ``row`` breaks the OpenAI chat fine-tuning format (``[]``: none).  With
    ``thinking``, the assistant's ``reasoning_content`` (--include-thinking) is allowed."""
    if not isinstance(row, dict) or not set(row) <= OPENAI_ROW_KEYS or "messages" not in row:
        return ["row keys %r" % (sorted(row) if isinstance(row, dict) else row)]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return ["no messages"]
    out = []
    calls = None  # ids of the calls of the assistant message the tool messages answer
    answered = set()
    for i, m in enumerate(messages):
        where = "message %d" % i
        role = m.get("role") if isinstance(m, dict) else None
        if role not in OPENAI_MESSAGE_KEYS:
            out.append("%s: role %r" % (where, role))
            continue
        allowed = OPENAI_MESSAGE_KEYS[role] | ({"reasoning_content"} if thinking and role == "assistant" else set())
        if not set(m) <= allowed:
            out.append("%s: keys %r" % (where, sorted(set(m) - allowed)))
        content = m.get("content")
        if role in ("system", "user"):
            if isinstance(content, list):
                out += _text_parts_problems(content, where, images=role == "user")
            elif not isinstance(content, str) or not content:
                out.append("%s: content %r" % (where, content))
        if role == "assistant":
            tool_calls = m.get("tool_calls")
            if isinstance(content, list):
                out += _text_parts_problems(content, where, images=False)
            elif content is not None and not isinstance(content, str):
                out.append("%s: content %r" % (where, content))
            if not content and not tool_calls and not m.get("function_call"):
                out.append("%s: an assistant message with neither content nor tool calls" % where)
            if "reasoning_content" in m and (not isinstance(m["reasoning_content"], str) or not m["reasoning_content"]):
                out.append("%s: reasoning_content %r" % (where, m["reasoning_content"]))
            if "weight" in m and m["weight"] not in (0, 1):
                out.append("%s: weight %r" % (where, m["weight"]))
            if tool_calls is not None and (not isinstance(tool_calls, list) or not tool_calls):
                out.append("%s: tool_calls %r" % (where, tool_calls))
            calls = set()
            answered = set()
            for call in tool_calls or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or set(call) != {"id", "type", "function"} or call["type"] != "function" \
                        or not isinstance(call["id"], str) or not call["id"] or call["id"] in calls:
                    out.append("%s: tool call %r" % (where, call))
                    continue
                calls.add(call["id"])
                if set(fn) != {"name", "arguments"} or not isinstance(fn["name"], str) or not fn["name"]:
                    out.append("%s: function %r" % (where, fn))
                if not _json_object_text(fn.get("arguments")):
                    out.append("%s: arguments not the JSON text of an object: %r" % (where, fn.get("arguments")))
        elif role == "tool":
            if not isinstance(content, str):
                out.append("%s: tool content %r (a string only)" % (where, content))
            if calls is None or m.get("tool_call_id") not in calls or m.get("tool_call_id") in answered:
                out.append("%s: tool_call_id %r answers no call of the assistant message before it"
                           % (where, m.get("tool_call_id")))
            answered.add(m.get("tool_call_id"))
        else:
            calls = None
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        out.append("no assistant message")
    elif roles[-1] != "assistant":
        out.append("the last message is %r, not the answer" % roles[-1])
    if "user" not in roles:
        out.append("no user message")
    for a, b in zip(roles, roles[1:]):
        if a == b == "assistant":
            out.append("two assistant messages in a row")
    tools = row.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            out.append("tools %r" % (tools,))
        names = set()
        for tool in tools or []:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or set(tool) != {"type", "function"} or tool["type"] != "function" \
                    or not isinstance(fn.get("name"), str) or not fn["name"] \
                    or not set(fn) <= {"name", "description", "parameters", "strict"} \
                    or ("parameters" in fn and not isinstance(fn["parameters"], dict)):
                out.append("tool %r" % (tool,))
            elif fn["name"] in names:
                out.append("tool %r listed twice" % fn["name"])
            else:
                names.add(fn["name"])
    return out


SHAREGPT_FROM = {"system", "human", "gpt", "function_call", "observation"}


def _function_call_problems(value: str, where: str) -> list:
    # As LLaMA-Factory's FunctionFormatter reads it: the first block in the template's thought
    # words (by default these) is the thinking; the rest must be the JSON of the calls.
    thought = re.search(r"<think>\n(.*?)\n</think>\n\n", value, re.DOTALL)
    if thought:
        value = value.replace(thought.group(0), "")
    try:
        calls = json.loads(value)
    except ValueError:
        return ["%s: function_call value not JSON" % where]
    calls = calls if isinstance(calls, list) and calls else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or set(call) != {"name", "arguments"} or not isinstance(call["name"], str) \
                or not call["name"] or not isinstance(call["arguments"], dict):
            out.append("%s: function_call %r" % (where, call))
    return out


def sharegpt_problems(row, images: bool = False) -> list:
    """Every way ``row`` breaks the sharegpt format as LLaMA-Factory reads it (``[]``: none)."""
    keys = {"conversations", "tools"} | ({"images"} if images else set())
    if not isinstance(row, dict) or set(row) != keys:
        return ["row keys %r" % (sorted(row) if isinstance(row, dict) else row)]
    turns = row["conversations"]
    if not isinstance(turns, list):
        return ["conversations %r" % (turns,)]
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or set(t) != {"from", "value"} or t["from"] not in SHAREGPT_FROM \
                or not isinstance(t["value"], str):
            out.append("turn %d: %r" % (i, t))
    if out:
        return out
    if turns and turns[0]["from"] == "system":
        turns = turns[1:]
    if not turns:
        return ["no turns"]
    for i, t in enumerate(turns):
        where = "turn %d" % i
        expected = ("human", "observation") if i % 2 == 0 else ("gpt", "function_call")
        if t["from"] not in expected:
            out.append("%s: %r where %s must be" % (where, t["from"], " or ".join(expected)))
        if t["from"] == "function_call":
            out += _function_call_problems(t["value"], where)
        elif t["from"] in ("human", "gpt") and not t["value"]:
            out.append("%s: an empty %s turn" % (where, t["from"]))
    if len(turns) % 2:
        out.append("an odd number of turns (%d)" % len(turns))
    tools = row["tools"]
    if not isinstance(tools, str):
        out.append("tools %r (JSON text)" % (tools,))
    elif tools:
        try:
            listed = json.loads(tools)
        except ValueError:
            listed = None
        if not isinstance(listed, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                    for f in listed):
            out.append("tools %r" % tools)
    if images:
        placeholders = sum(t["value"].count("<image>") for t in row["conversations"])
        if not isinstance(row["images"], list) or placeholders != len(row["images"]):
            out.append("%d <image> for images %r" % (placeholders, row["images"]))
    return out


class AuditCase(unittest.TestCase):
    """Export a few hand-built records (one data dir per test)."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="export-audit-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.out = os.path.join(self.tmp, "out.jsonl")

    def rows(self, recs: list, *argv: str) -> list:
        """Rows of an export of ``recs`` (default openai-chat); the summary in ``self.summary``."""
        shutil.rmtree(self.data, ignore_errors=True)
        df.DataDirWriter(self.data).write_records(recs)
        if "--format" not in argv:
            argv = ("--format", "openai-chat") + argv
        err = io.StringIO()
        with redirect_stderr(err):
            code = export.run(parse(["--data-dir", self.data, "--out", self.out] + list(argv)))
        self.summary = err.getvalue()
        self.assertEqual(code, 0, self.summary)
        rows = read_jsonl(self.out)
        for row in rows:
            if argv[1] == "openai-chat":
                self.assertEqual(openai_chat_problems(row, thinking="--include-thinking" in argv), [], row)
            elif argv[1] == "sharegpt":
                self.assertEqual(sharegpt_problems(row, images="--include-images" in argv), [], row)
        return rows

    def assertDedupeKeepsTheFirst(self, recs: list, reason: str) -> None:
        """With --dedupe, a session's second exchange skipped for ``reason`` supersedes nothing:
        its first (two turns) is the one row, in both chat formats."""
        for fmt, key in (("openai-chat", "messages"), ("sharegpt", "conversations")):
            with self.subTest(fmt):
                rows = self.rows(recs, "--format", fmt, "--dedupe")
                self.assertEqual(len(rows), 1)
                self.assertEqual(len(rows[0][key]), 2)
                self.assertIn("1 skipped (%s 1)" % reason, self.summary)


class TestLegacyFunctions(AuditCase):
    def test_calls_get_stable_ids_and_results_answer_them(self) -> None:
        # The ids were null (an audit's finding): invalid for fine-tuning.
        recs = df.openai_functions_session(df.Clock(seed=31))
        first, second = self.rows(recs)
        call = first["messages"][-1]["tool_calls"][0]
        self.assertEqual(call, {"id": "call_1_0", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}})
        msgs = second["messages"]
        self.assertEqual([m["role"] for m in msgs], ["user", "assistant", "tool", "assistant"])
        self.assertEqual(msgs[1]["tool_calls"], [call])
        # (a "name" key, which a tool message does not take, was there too)
        self.assertEqual(msgs[2], {"role": "tool", "content": "{\"temp\": 3}", "tool_call_id": "call_1_0"})
        self.assertEqual(openai_chat_problems(second), [])
        self.assertEqual(second["tools"][0]["function"]["name"], "get_weather")
        rows = self.rows(recs, "--dedupe")
        self.assertEqual(len(rows), 1)  # the first call's conversation is a prefix of the second's
        turns = self.rows(recs, "--format", "sharegpt")[1]["conversations"]
        self.assertEqual([t["from"] for t in turns], ["human", "function_call", "observation", "gpt"])

    def test_results_answer_calls_by_name_then_order(self) -> None:
        user = {"role": "user", "content": "Weather and time in Oslo?"}
        calls = {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
        results = [{"role": "function", "name": "get_time", "content": "09:30"},
                   {"role": "function", "name": "other", "content": "3 C"}]
        rec = df.openai_chat(df.Clock(seed=32), "f", [user, calls] + results, {"content": "3 C at 09:30."})
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual([c["id"] for c in msgs[1]["tool_calls"]], ["call_1_0", "call_1_1"])
        self.assertEqual([(m["content"], m["tool_call_id"]) for m in msgs[2:4]],
                         [("09:30", "call_1_1"), ("3 C", "call_1_0")])

    def test_gemini_results_answer_calls_by_name_then_order(self) -> None:
        calls = {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}}},
                                            {"functionCall": {"name": "get_time", "args": {}}}]}
        results = {"role": "user", "parts": [{"functionResponse": {"name": "get_time", "response": {"t": 1}}},
                                             {"functionResponse": {"name": "renamed", "response": {"w": 2}}}]}
        rec = df.gemini(df.Clock(seed=33), "g", [{"role": "user", "parts": [{"text": "q"}]}, calls, results],
                        [{"text": "ok"}])
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual([(m["content"], m["tool_call_id"]) for m in msgs[2:4]],
                         [("{\"t\": 1}", "call_1_1"), ("{\"w\": 2}", "call_1_0")])


class TestGeminiStreamedTurns(AuditCase):
    def test_a_turn_kept_as_streamed_is_one_turn(self) -> None:
        # google-genai's chat keeps a streamed answer as a model content per chunk (an audit's
        # finding: each became an assistant message, and --dedupe kept every record).
        clock = df.Clock(seed=35)
        q1 = {"role": "user", "parts": [{"text": "Why blue?"}, {"text": "Briefly."}]}
        first = df.gemini(clock, "g", [q1], [{"text": "Hmm, light", "thought": True}, {"text": "Rayleigh scattering."}])
        history = [q1, {"role": "model", "parts": [{"text": "Hmm,", "thought": True}]},
                   {"role": "model", "parts": [{"text": " light", "thought": True}, {"text": "Rayleigh"}]},
                   {"role": "model", "parts": [{"text": "", "thoughtSignature": "c2ln"}]},
                   {"role": "model", "parts": [{"text": " scattering."}]},
                   {"role": "user", "parts": [{"text": "And the sea?"}]}]
        second = df.gemini(clock, "g", history, [{"text": "It reflects"}, {"text": " the sky."}])
        rows = self.rows([first, second], "--dedupe", "--include-thinking")
        self.assertEqual(len(rows), 1, self.summary)
        self.assertEqual([(m["role"], m["content"], m.get("reasoning_content")) for m in rows[0]["messages"]], [
            ("user", "Why blue?\nBriefly.", None),  # (a user's parts: joined with a newline, as ever)
            ("assistant", "Rayleigh scattering.", "Hmm, light"),
            ("user", "And the sea?", None),
            ("assistant", "It reflects the sky.", None)])
        rows = self.rows([first, second], "--dedupe", "--format", "sharegpt")
        self.assertEqual([turn["value"] for turn in rows[0]["conversations"]],
                         ["Why blue?\nBriefly.", "Rayleigh scattering.", "And the sea?", "It reflects the sky."])

    def test_texts_either_side_of_a_call_stay_apart(self) -> None:
        calls = {"role": "model", "parts": [{"text": "Checking."}, {"functionCall": {"name": "f", "args": {}}},
                                            {"text": "Done checking."}]}
        results = {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"ok": 1}}}]}
        rec = df.gemini(df.Clock(seed=36), "g", [{"role": "user", "parts": [{"text": "q"}]}, calls, results],
                        [{"text": "ok"}])
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual(msgs[1]["content"], "Checking.\nDone checking.")
        self.assertEqual(msgs[1]["tool_calls"][0]["function"]["name"], "f")


class TestGeminiSchemas(AuditCase):
    def test_openapi_types_become_json_schema(self) -> None:
        # The SDK's upper-case types were copied as they are (an audit's finding): not JSON Schema.
        rec = df.gemini_sdk_tools(df.Clock(seed=34))
        weather, lookup = self.rows([rec])[0]["tools"]
        self.assertEqual(weather["function"]["parameters"], {
            "type": "object", "required": ["city"], "propertyOrdering": ["city", "days", "units", "tags", "filter"],
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer", "format": "int32", "minimum": 1},
                "units": {"type": "string", "enum": ["metric", "imperial"], "nullable": True},
                "tags": {"type": "array", "items": {"type": "string"}},
                "filter": {"type": "object", "properties": {"type": {"type": "string"}, "max": {"type": "number"}}},
                "when": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "boolean"}]}}})
        self.assertEqual(lookup["function"]["parameters"],
                         rec["request_body"]["tools"][0]["functionDeclarations"][1]["parametersJsonSchema"])
        tools = json.loads(self.rows([rec], "--format", "sharegpt")[0]["tools"])
        self.assertEqual(tools[0]["parameters"], weather["function"]["parameters"])
        self.assertEqual(rec["request_body"]["tools"][0]["functionDeclarations"][0]["parameters"]["type"], "OBJECT")

    def test_unspecified_type_is_left_out(self) -> None:
        self.assertEqual(export._json_schema({"type": "TYPE_UNSPECIFIED", "description": "any"}),
                         {"description": "any"})


class TestPrefill(AuditCase):
    def test_the_answer_continues_the_prefill_in_one_message(self) -> None:
        # It was two assistant messages, the last a fragment (an audit's finding).
        rec = df.anthropic_prefill(df.Clock(seed=35))
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual(msgs, [{"role": "user", "content": "Give Paris as JSON with city and country."},
                                {"role": "assistant", "content": "{\"city\": \"Paris\", \"country\": \"FR\"}"}])
        turns = self.rows([rec], "--format", "sharegpt")[0]["conversations"]
        self.assertEqual(turns, [{"from": "human", "value": "Give Paris as JSON with city and country."},
                                 {"from": "gpt", "value": "{\"city\": \"Paris\", \"country\": \"FR\"}"}])

    def test_blocks_of_the_prefill_and_of_the_answer_are_kept_in_order(self) -> None:
        clock = df.Clock(seed=36)
        prefill = [{"type": "thinking", "thinking": "Plan first.", "signature": "s"},
                   {"type": "text", "text": "Let me check"}]
        answer = [{"type": "text", "text": " the weather."},
                  {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}]
        rec = df.anthropic_prefill(clock, prefill=prefill, content=answer)
        last = self.rows([rec], "--include-thinking")[0]["messages"][-1]
        self.assertEqual(last["content"], "Let me check the weather.")
        self.assertEqual(last["reasoning_content"], "Plan first.")
        self.assertEqual([c["id"] for c in last["tool_calls"]], ["toolu_9"])

    def test_an_empty_answer_to_a_prefill_is_skipped(self) -> None:
        rec = df.anthropic_prefill(df.Clock(seed=37), content=[])
        with self.assertRaises(export.Skip) as ctx:
            export.convert(rec)
        self.assertEqual(ctx.exception.reason, "no_response")

    def test_openai_compatible_prefix_completion(self) -> None:
        # DeepSeek's (and Mistral's) prefix completion: "prefix": true on the last assistant message.
        messages = [{"role": "user", "content": "Write quicksort in Python."},
                    {"role": "assistant", "content": "```python\n", "prefix": True}]
        rec = df.openai_chat(df.Clock(seed=38), "p", messages, {"content": "def qs(a): ...\n```"},
                             model="deepseek-chat")
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual(msgs[1:], [{"role": "assistant", "content": "```python\ndef qs(a): ...\n```"}])
        messages[-1].pop("prefix")  # without it the answer is a new message
        rec = df.openai_chat(df.Clock(seed=38), "p", messages, {"content": "Done."})
        self.assertEqual([m["parts"] for m in export.convert(rec).messages[1:]],
                         [[{"type": "text", "text": "```python\n"}], [{"type": "text", "text": "Done."}]])


class TestDroppedCalls(AuditCase):
    def test_a_custom_tool_call_skips_the_conversation(self) -> None:
        # The call and its result were dropped, leaving "Patched." with no trace of the patch
        # (and, beside a function call, half of a parallel call): a conversation that never was.
        for with_function in (False, True):
            rec = df.openai_custom_tool_call(df.Clock(seed=39), with_function=with_function)
            plain = df.openai_chat(df.Clock(seed=40), "plain", [{"role": "user", "content": "hi"}], {"content": "yo"})
            for fmt in ("openai-chat", "sharegpt"):
                with self.subTest(with_function=with_function, fmt=fmt):
                    self.assertEqual(len(self.rows([rec, plain], "--format", fmt)), 1)
                    self.assertIn("1 skipped (unsupported_tool_call 1)", self.summary)

    def test_results_after_a_user_message_or_without_a_call_are_orphans(self) -> None:
        clock = df.Clock(seed=41)
        call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                     "function": {"name": "f", "arguments": "{}"}}]}
        messages = [{"role": "tool", "tool_call_id": "c0", "content": "no call before"},
                    {"role": "user", "content": "go"}, call,
                    {"role": "tool", "tool_call_id": "c1", "content": "answer"},
                    {"role": "user", "content": "and?"},
                    {"role": "tool", "tool_call_id": "c1", "content": "late"}]
        rec = df.openai_chat(clock, "o", messages, {"content": "done"})
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual([m["role"] for m in msgs], ["user", "assistant", "tool", "user", "assistant"])
        self.assertIn("orphan_tool_result 2", self.summary)

    def test_an_assistant_turn_with_only_thinking_is_left_out_with_or_without_the_flag(self) -> None:
        clock = df.Clock(seed=42)
        history = [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]},
                   {"role": "user", "content": "b"}]
        rec = df.anthropic(clock, "t", history, [{"type": "text", "text": "c"}])
        self.assertEqual([m["role"] for m in self.rows([rec])[0]["messages"]], ["user", "user", "assistant"])
        self.assertIn("dropped parts: empty_assistant_turn 1, thinking 1;", self.summary)
        # With the flag it was {"content": "", "reasoning_content": "hm"}: neither content nor
        # tool calls, which OpenAI refuses.
        msgs = self.rows([rec], "--include-thinking")[0]["messages"]
        self.assertEqual([m["role"] for m in msgs], ["user", "user", "assistant"])
        self.assertIn("dropped parts: empty_assistant_turn 1, thinking 1;", self.summary)
        turns = self.rows([rec], "--format", "sharegpt", "--include-thinking")[0]["conversations"]
        self.assertEqual([t["from"] for t in turns], ["human", "gpt"])


class TestTextBesideCalls(AuditCase):
    """One answer per dialect (df.text_beside_calls): thinking, text and a call in one turn."""

    def test_openai_chat_keeps_text_and_thinking_beside_the_calls_from_every_dialect(self) -> None:
        recs = df.text_beside_calls(df.Clock(seed=61))
        rows = self.rows(recs, "--include-thinking")
        self.assertEqual(len(rows), 4)
        for i, row in enumerate(rows):
            with self.subTest(i):
                answer = row["messages"][-1]
                self.assertEqual(answer["content"], "Let me check.")
                self.assertEqual(answer["reasoning_content"], "Need the weather.")
                self.assertEqual([(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                  for c in answer["tool_calls"]], [("get_weather", {"city": "Paris"})])
        self.assertNotIn("dropped parts", self.summary)

    def test_sharegpt_keeps_the_thinking_before_the_calls_and_counts_the_text(self) -> None:
        # The thinking was dropped as the text is, though LLaMA-Factory reads it there: its
        # function formatter takes the thought words off before it parses the calls.
        recs = df.text_beside_calls(df.Clock(seed=62))
        rows = self.rows(recs, "--format", "sharegpt", "--include-thinking")
        self.assertEqual(len(rows), 4)
        for i, row in enumerate(rows):
            with self.subTest(i):
                self.assertEqual(row["conversations"][-1], {"from": "function_call", "value": (
                    '<think>\nNeed the weather.\n</think>\n\n{"name": "get_weather", "arguments": {"city": "Paris"}}')})
        self.assertIn("dropped parts: tool_call_text 4;", self.summary)
        rows = self.rows(recs, "--format", "sharegpt")
        for row in rows:
            self.assertEqual(row["conversations"][-1]["value"], '{"name": "get_weather", "arguments": {"city": "Paris"}}')
        self.assertIn("dropped parts: thinking 4, tool_call_text 4;", self.summary)

    def test_thinking_holding_the_closing_words_is_left_out(self) -> None:
        # LLaMA-Factory's reader takes the first closing words as the block's end: the rest of
        # the thinking would go before the JSON, which it then refuses.
        recs = df.text_beside_calls(df.Clock(seed=63), thinking="a\n</think>\n\nb")
        for row in self.rows(recs, "--format", "sharegpt", "--include-thinking"):
            self.assertEqual(row["conversations"][-1]["value"], '{"name": "get_weather", "arguments": {"city": "Paris"}}')
        self.assertIn("dropped parts: thinking 4, tool_call_text 4;", self.summary)


class TestUnsupportedToolCalls(AuditCase):
    """Conversations resting on a tool the chat formats cannot hold (df.builtin_tool_records)."""

    def plain(self) -> dict:
        return df.openai_chat(df.Clock(seed=71), "plain", [{"role": "user", "content": "hi"}], {"content": "yo"})

    def test_every_shape_is_skipped_in_both_chat_formats(self) -> None:
        # The built-in tool items were dropped and counted (item:web_search_call, block:...,
        # code_execution), leaving an answer that quotes a search, a run or an image with no
        # trace of it; a grounded or search model's answer the same with nothing counted.
        recs = df.builtin_tool_records(df.Clock(seed=72))
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                rows = self.rows(recs + [self.plain()], "--format", fmt)
                self.assertEqual(len(rows), 1)
                self.assertIn("; %d skipped (unsupported_tool_call %d);" % (len(recs), len(recs)), self.summary)
                self.assertNotIn("dropped parts", self.summary)

    def test_the_records_format_keeps_them(self) -> None:
        recs = df.builtin_tool_records(df.Clock(seed=73))
        rows = self.rows(recs, "--format", "records")
        self.assertEqual({r["id"]: json.loads(r["response_body"]) for r in rows},
                         {r["id"]: r["response_body"] for r in recs})
        self.assertNotIn("skipped", self.summary)

    def test_the_turns_before_the_search_stay_with_dedupe(self) -> None:
        # A skipped conversation supersedes nothing: the exchange before the search is kept.
        clock = df.Clock(seed=74)
        hello = [{"role": "user", "content": "hi"},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]}]
        first = df.openai_responses(clock, "s", hello[:1], hello[1:])
        output = df.builtin_tool_records(df.Clock(seed=75))[0]["response_body"]["output"]
        second = df.openai_responses(clock, "s", hello + [{"role": "user", "content": "Euro rate?"}], output)
        msgs = self.rows([first, second], "--dedupe")[0]["messages"]
        self.assertEqual(msgs, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        self.assertIn("1 skipped (unsupported_tool_call 1)", self.summary)

    def test_items_that_change_no_turn_are_still_dropped_and_counted(self) -> None:
        # A tool list, encrypted reasoning and a built-in tool declared but not called leave the
        # conversation as it was.
        output = df.builtin_tool_records(df.Clock(seed=76))[0]["response_body"]["output"]
        kept = [item for item in output if item["type"] in ("reasoning", "mcp_list_tools", "message")]
        rec = df.openai_responses(df.Clock(seed=77), "s", "Euro rate?", kept, tools=[{"type": "web_search"}])
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual(msgs[-1], {"role": "assistant", "content": "The euro is at 1.17 dollars (ECB)."})
        self.assertIn("dropped parts: encrypted_reasoning 1, item:mcp_list_tools 1, server_tool 1;", self.summary)


class TestClientBuiltinToolCalls(AuditCase):
    """Calls of a tool the provider defines and the client runs, by an ordinary call: Anthropic's
    bash, text editor and computer (tool_use), Gemini computer use (functionCall)."""

    def test_every_shape_is_skipped_in_both_chat_formats(self) -> None:
        # They were exported as function calls while their declarations were dropped (counted
        # server_tool): the row called a tool its tools list did not hold.
        recs = df.client_builtin_tool_records(df.Clock(seed=78))
        plain = df.openai_chat(df.Clock(seed=79), "plain", [{"role": "user", "content": "hi"}], {"content": "yo"})
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                rows = self.rows(recs + [plain], "--format", fmt)
                self.assertEqual(len(rows), 1)
                self.assertIn("; %d skipped (unsupported_tool_call %d);" % (len(recs), len(recs)), self.summary)

    def test_the_turns_before_the_call_stay_with_dedupe(self) -> None:
        clock = df.Clock(seed=80)
        bash = {"type": "bash_20250124", "name": "bash"}
        hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
        first = df.anthropic(clock, "s", hello[:1], hello[1]["content"], tools=[bash])
        second = df.anthropic(clock, "s", hello + [{"role": "user", "content": "Run the tests."}], [
            {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "pytest -q"}}], tools=[bash])
        self.assertDedupeKeepsTheFirst([first, second], "unsupported_tool_call")

    def test_declared_but_not_called_or_beside_a_called_function_still_exports(self) -> None:
        # The declaration alone changes no turn; a call of a custom tool declared beside it is a
        # function call like any other.
        clock = df.Clock(seed=81)
        bash = {"type": "bash_20250124", "name": "bash"}
        computer = {"computerUse": {"environment": "ENVIRONMENT_BROWSER"}}
        lookup = {"functionDeclarations": [{"name": "lookup", "parameters": {"type": "OBJECT"}}]}
        recs = [df.anthropic(clock, "a", [{"role": "user", "content": "hi"}], [{"type": "text", "text": "yo"}],
                             tools=[bash]),
                df.anthropic(clock, "b", [{"role": "user", "content": "Read a.py"}], [
                    {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}}],
                    tools=[bash, df.READ_TOOL]),
                df.gemini(clock, "c", [{"role": "user", "parts": [{"text": "Look up 42"}]}],
                          [{"functionCall": {"name": "lookup", "args": {}}}], tools=[computer, lookup])]
        rows = self.rows(recs)
        self.assertEqual([row["messages"][-1].get("tool_calls", [{}])[0].get("function", {}).get("name")
                          for row in rows], [None, "read_file", "lookup"])
        self.assertIn("dropped parts: server_tool 3;", self.summary)
        self.assertNotIn("skipped", self.summary)


class TestItemReferences(AuditCase):
    """Responses API input items the record does not hold (df.item_reference_records)."""

    def test_a_reference_after_the_first_item_or_an_unknown_item_is_skipped(self) -> None:
        # The conversation was exported without them, counted item:item_reference (a bare
        # {"id"} as item:message): the user's question, then the call's result with its call
        # left out (orphan_tool_result), then the answer.
        recs = df.item_reference_records(df.Clock(seed=82))
        plain = df.openai_chat(df.Clock(seed=83), "plain", [{"role": "user", "content": "hi"}], {"content": "yo"})
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                self.assertEqual(len(self.rows(recs + [plain], "--format", fmt)), 1)
                self.assertIn("; 3 skipped (item_reference 2, unknown_item 1);", self.summary)
                self.assertNotIn("dropped parts", self.summary)

    def test_leading_references_are_the_earlier_turns_as_with_previous_response_id(self) -> None:
        # Before any other item they stand for the stored conversation this request continues,
        # as a previous_response_id does: the new input is exported as it is, the references
        # counted; a result whose call they hold is dropped, as after a previous_response_id.
        clock = df.Clock(seed=84)
        answer = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Yes."}]}]
        recs = [df.openai_responses(clock, "s", [{"type": "item_reference", "id": "msg_1"}, {"id": "msg_2"},
                                                 {"role": "user", "content": "And Paris?"}], answer),
                df.openai_responses(clock, "t", [{"type": "item_reference", "id": "fc_1"}, {
                    "type": "function_call_output", "call_id": "call_1", "output": "ok"}], answer)]
        for fmt, key in (("openai-chat", "messages"), ("sharegpt", "conversations")):
            with self.subTest(fmt):
                rows = self.rows(recs, "--format", fmt)
                self.assertEqual(len(rows), 1)
                self.assertEqual(len(rows[0][key]), 2)
                self.assertIn("1 skipped (no_user_turn 1);", self.summary)
                self.assertIn("dropped parts: item_reference 2;", self.summary)

    def test_a_skipped_one_supersedes_nothing_with_dedupe(self) -> None:
        clock = df.Clock(seed=85)
        ask = {"role": "user", "content": "Where is my order 42?"}
        call = {"type": "function_call", "call_id": "call_r1", "name": "lookup", "arguments": "{}"}
        first = df.openai_responses(clock, "item-ref", [ask], [call],
                                    tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}])
        second = df.item_reference_records(clock)[0]
        second["request_body"]["tools"] = first["request_body"]["tools"]
        self.assertDedupeKeepsTheFirst([first, second], "item_reference")


class TestCompaction(AuditCase):
    """OpenAI's compaction items: an encrypted summary the model reads in place of the context
    before it (read as an item_reference is), in an answer left out."""

    COMPACTION = {"type": "compaction", "id": "cmp_1", "encrypted_content": "gAAAAABpZ0x1"}

    def test_compaction_items(self) -> None:
        clock = df.Clock(seed=86)
        answer = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]}]
        ask = {"role": "user", "content": "Now add tests."}
        codex = df.openai_responses(clock, "codex", [  # /responses/compact's output, then a new turn
            {"role": "user", "content": "Fix the parser."}, {"role": "user", "content": "And the docs."},
            self.COMPACTION, ask], answer)
        leading = df.openai_responses(clock, "lead", [self.COMPACTION, ask], answer)
        compacted = df.openai_responses(clock, "auto", [ask], [self.COMPACTION] + answer)
        trigger = df.openai_responses(clock, "trig", [ask, {"type": "compaction_trigger"}], [self.COMPACTION])
        for fmt, key in (("openai-chat", "messages"), ("sharegpt", "conversations")):
            with self.subTest(fmt):
                rows = self.rows([codex, leading, compacted, trigger], "--format", fmt)
                self.assertEqual(len(rows), 2)
                for row in rows:  # the question and the answer, without the summary
                    self.assertEqual(len(row[key]), 2)
                self.assertIn("2 skipped (compaction 1, no_response 1);", self.summary)
                # (A skipped record's parts are not counted: the trigger's answer is no reply.)
                self.assertIn("dropped parts: compaction 1, item:compaction 1;", self.summary)


class TestResponsesChains(AuditCase):
    """A Responses API request sent with previous_response_id holds only its new input: the
    export rebuilds the earlier turns from the records it reads (export.ChainIndex)."""

    TOOLS = [{"type": "function", "name": "lookup", "description": "Look up an order",
              "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}]
    ASK = "Where is my order 42?"
    CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_r1", "name": "lookup",
            "arguments": "{\"order\": \"42\"}", "status": "completed"}

    @staticmethod
    def answer(text: str, item_id: str = "msg_1") -> list:
        return [{"type": "message", "id": item_id, "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": text, "annotations": []}]}]

    def turns(self, seed: int = 91, instructions=("Be brief.", "Be brief.", "Be brief."), session: str = "agent") -> list:
        """Three turns of a chain: a question answered by a call; its result only (after the
        first response's id), answered; a new question (after the second's)."""
        clock = df.Clock(seed=seed)
        first = df.openai_responses(clock, session, self.ASK, [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Need the order."}]},
            self.CALL], instructions=instructions[0], tools=self.TOOLS)
        second = df.openai_responses(clock, session, [
            {"type": "function_call_output", "call_id": "call_r1", "output": "shipped"}],
            self.answer("Your order has shipped."), instructions=instructions[1], tools=self.TOOLS, stream=True)
        third = df.openai_responses(clock, session, "Thanks! When will it arrive?",
                                    self.answer("Tomorrow.", "msg_2"), instructions=instructions[2], tools=self.TOOLS)
        self.link(second, first)
        self.link(third, second)
        return [first, second, third]

    @staticmethod
    def link(rec: dict, earlier: dict) -> None:
        rec["request_body"]["previous_response_id"] = earlier["response_body"]["id"]

    WHOLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK},
             {"role": "assistant", "tool_calls": [{"id": "call_r1", "type": "function", "function": {
                 "name": "lookup", "arguments": "{\"order\": \"42\"}"}}]},
             {"role": "tool", "content": "shipped", "tool_call_id": "call_r1"},
             {"role": "assistant", "content": "Your order has shipped."},
             {"role": "user", "content": "Thanks! When will it arrive?"},
             {"role": "assistant", "content": "Tomorrow."}]

    def test_a_turn_is_exported_with_the_earlier_turns_it_continues(self) -> None:
        # The second turn (only a tool result) was skipped as no_user_turn, its result dropped
        # as orphan_tool_result, and the third exported as an answer to "Thanks!" alone.
        rows = self.rows(self.turns())
        self.assertEqual([r["messages"] for r in rows], [self.WHOLE[:3], self.WHOLE[:5], self.WHOLE])
        self.assertEqual(rows[2]["tools"], [{"type": "function", "function": {
            "name": "lookup", "description": "Look up an order", "parameters": self.TOOLS[0]["parameters"]}}])
        self.assertNotIn("skipped", self.summary)
        self.assertNotIn("orphan_tool_result", self.summary)
        self.assertIn("; 2 continuing earlier records (previous_response_id, conversation);", self.summary)
        rows = self.rows(self.turns(), "--format", "sharegpt")
        self.assertEqual([(t["from"], t["value"]) for t in rows[2]["conversations"]], [
            ("system", "Be brief."), ("human", self.ASK),
            ("function_call", '{"name": "lookup", "arguments": {"order": "42"}}'), ("observation", "shipped"),
            ("gpt", "Your order has shipped."), ("human", "Thanks! When will it arrive?"), ("gpt", "Tomorrow.")])

    def test_dedupe_keeps_the_whole_conversation_once(self) -> None:
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                rows = self.rows(self.turns(), "--format", fmt, "--dedupe")
                self.assertEqual(len(rows), 1)
                self.assertEqual(len(rows[0]["messages" if fmt == "openai-chat" else "conversations"]), 7)
                self.assertIn("2 superseded by --dedupe", self.summary)
        # The records format keeps the records as they are (each of its own conversation).
        recs = self.turns()
        rows = self.rows(recs, "--format", "records", "--dedupe")
        self.assertEqual([json.loads(r["request_body"]) for r in rows], [r["request_body"] for r in recs])

    def test_instructions_are_the_request_s_own(self) -> None:
        # The API inserts a request's instructions as the first item of the context and does
        # not carry a previous response's over (the create-response reference, instructions).
        rows = self.rows(self.turns(instructions=("Be brief.", "Be formal.", None)))
        self.assertEqual(rows[1]["messages"][0], {"role": "system", "content": "Be formal."})
        self.assertEqual(rows[1]["messages"][1:], self.WHOLE[1:5])
        self.assertEqual(rows[2]["messages"], self.WHOLE[1:])

    def test_an_earlier_turn_read_later_is_found(self) -> None:
        # Session directories are read by name: the first turn (session "z") is read after the
        # turns continuing it (session "a"); with --dedupe the chain counts in the first turn's
        # session, where its own row is superseded.
        first, second, third = self.turns()
        first["session_id"] = "z"
        df.DataDirWriter(self.data).write_records([first])
        second["session_id"] = third["session_id"] = "a"
        df.DataDirWriter(self.data).write_records([second, third])
        for extra, n in (((), 3), (("--dedupe",), 1)):
            with self.subTest(extra=extra):
                err = io.StringIO()
                with redirect_stderr(err):
                    code = export.run(parse(["--data-dir", self.data, "--out", self.out, "--format", "openai-chat"]
                                            + list(extra)))
                self.assertEqual(code, 0, err.getvalue())
                rows = read_jsonl(self.out)
                self.assertEqual(len(rows), n, err.getvalue())
                self.assertIn(self.WHOLE, [r["messages"] for r in rows])

    def assertAsToday(self, recs: list, *argv: str, absent=()) -> None:
        """The rows and the counts of ``recs`` are those of the same records without
        previous_response_id (the earlier response is not among those read)."""
        plain = df.openai_chat(df.Clock(seed=90), "p", [{"role": "user", "content": "hi"}], {"content": "yo"})
        rows = self.rows(recs + [plain], *argv)
        summary = self.summary
        for rec in recs:
            rec["request_body"].pop("previous_response_id", None)
        self.assertEqual(rows, self.rows([r for r in recs if r not in absent] + [plain], *argv))
        n = len(recs) + 1
        self.assertEqual(summary.split("; wrote")[0].replace("; 1 filtered out", ""),
                         self.summary.split("; wrote")[0].replace("read %d records" % (n - len(absent)), "read %d records" % n))

    def test_an_earlier_turn_not_read_leaves_the_export_as_it_was(self) -> None:
        first, second, third = self.turns(seed=92)
        # filtered out
        first["model"] = "gpt-4o"
        self.assertAsToday([first, second], "--model", "gpt-4.1,gpt-4o-mini", absent=[first])
        self.assertIn("1 skipped (no_user_turn 1)", self.summary)
        # an answer that failed (response.failed: the record holds an error), one not stored
        for damage in ("failed", "store"):
            with self.subTest(damage):
                first, second, third = self.turns(seed=93)
                if damage == "failed":
                    first["response_body"]["status"] = "failed"
                    first["error"] = {"type": "server_error", "message": "The model failed to generate a response."}
                else:
                    first["request_body"]["store"] = False
                self.assertAsToday([first, second])
                self.assertIn("no_user_turn 1", self.summary)

    def test_an_incomplete_earlier_answer_is_context(self) -> None:
        # The API keeps an incomplete response (cut at max_output_tokens): a request continuing
        # it follows its partial answer; its own row is skipped as max_tokens.
        clock = df.Clock(seed=94)
        first = df.openai_responses(clock, "s", "Tell me a story.", self.answer("Once upon a"))
        first["response_body"].update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        second = df.openai_responses(clock, "s", "Go on.", self.answer("time, a fox.", "msg_2"))
        self.link(second, first)
        rows = self.rows([first, second])
        self.assertEqual(rows, [{"messages": [
            {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a"},
            {"role": "user", "content": "Go on."}, {"role": "assistant", "content": "time, a fox."}]}])
        self.assertIn("1 skipped (max_tokens 1)", self.summary)

    def test_a_chain_holding_a_built_in_tool_call_is_skipped_as_it_is(self) -> None:
        first, second, third = self.turns(seed=95)
        first["response_body"]["output"].insert(0, {"type": "web_search_call", "id": "ws_1", "status": "completed",
                                                    "action": {"type": "search", "query": "order 42"}})
        self.rows([first, second, third, df.openai_chat(df.Clock(seed=96), "p", [{"role": "user", "content": "hi"}],
                                                        {"content": "yo"})])
        self.assertIn("3 skipped (unsupported_tool_call 3)", self.summary)

    def test_item_references_resolve_to_the_items_of_the_chain(self) -> None:
        # A reference to an item of the earlier turns stands for it, first or further in; one to
        # an item the chain does not hold is a hole in the conversation.
        first, second, third = self.turns(seed=97)
        first["request_body"]["input"] = [{"type": "message", "id": "msg_u1", "role": "user",
                                           "content": [{"type": "input_text", "text": self.ASK}]}]
        third["request_body"]["input"] = [{"type": "item_reference", "id": "msg_u1"}, {"role": "user", "content": "Thanks!"},
                                          {"id": "fc_1"}, {"type": "function_call_output", "call_id": "call_r1",
                                                           "output": "delivered"}]
        rows = self.rows([first, second, third])
        self.assertEqual(rows[2]["messages"][5:], [
            {"role": "user", "content": self.ASK}, {"role": "user", "content": "Thanks!"}, self.WHOLE[2],
            {"role": "tool", "content": "delivered", "tool_call_id": "call_r1"},
            {"role": "assistant", "content": "Tomorrow."}])
        self.assertNotIn("item_reference", self.summary)
        third["request_body"]["input"] = [{"type": "item_reference", "id": "msg_elsewhere"}, "Thanks!"]
        self.assertEqual(len(self.rows([first, second, third])), 2)
        self.assertIn("1 skipped (item_reference 1)", self.summary)

    def test_a_chain_cut_short_starts_at_the_earliest_turn_read(self) -> None:
        first, second, third = self.turns(seed=98)
        # The first turn's record is not there: the second is exported as it is (skipped, a tool
        # result only), the third with the second's turn, its result dropped as an orphan.
        rows = self.rows([second, third])
        self.assertEqual([r["messages"] for r in rows], [self.WHOLE[:1] + self.WHOLE[4:]])
        self.assertIn("1 skipped (no_user_turn 1)", self.summary)
        self.assertIn("orphan_tool_result 1", self.summary)

    def test_a_turn_naming_its_own_chain_does_not_loop(self) -> None:
        first, second, third = self.turns(seed=99)
        self.link(first, third)  # a damaged record: a cycle
        self.assertEqual(len(self.rows([first, second, third])), 3)
        self.link(first, first)
        self.assertEqual(len(self.rows([first, second, third])), 3)

    def test_the_memory_bound(self) -> None:
        # Turns are kept up to ChainIndex.MAX_BYTES (their records' request_bytes +
        # response_bytes), least recently used first: past it, a turn is exported without the
        # earlier turns, and counted.
        first, second, third = self.turns(seed=100)
        other = df.openai_responses(df.Clock(seed=101), "agent", "Unrelated. " * 500, self.answer("Sure."))
        size = lambda rec: rec["request_bytes"] + rec["response_bytes"]
        with mock.patch.object(export.ChainIndex, "MAX_BYTES", size(first) + size(other) - 1):
            rows = self.rows([first, other, second, third])
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[2]["messages"], self.WHOLE[:1] + self.WHOLE[4:])
        self.assertIn("1 skipped (no_user_turn 1)", self.summary)
        self.assertIn("; 1 continuing earlier records (previous_response_id, conversation); 2 without earlier turns", self.summary)

    def test_continuing_a_turn_keeps_it_longer(self) -> None:
        def rec(rid: str, prev=None) -> dict:
            req = {"input": "q"}
            if prev:
                req["previous_response_id"] = prev
            return {"dialect": "openai_responses", "status_code": 200, "request_body": req, "request_bytes": 100,
                    "response_body": {"id": rid, "status": "completed", "output": []}, "response_bytes": 0}

        index = export.ChainIndex(max_bytes=300)
        for r in (rec("a"), rec("c"), rec("b", "a"), rec("d")):
            index.read(r)
        self.assertEqual(list(index.turns), ["a", "b", "d"])  # c went first: a was used again
        self.assertEqual(index.gone, {"c": True})
        self.assertEqual(len(index.chain("b")), 2)
        self.assertIsNone(index.chain("c"))
        index.read(rec("e", "missing"))
        self.assertEqual(index.missing("e", index.chain("e")), "missing")
        self.assertTrue(index.may_come("e", index.chain("e")))
        index.forget(rec("missing"))
        self.assertFalse(index.may_come("e", index.chain("e")))


class TestResponsesConversations(AuditCase):
    """A Responses API request sent with conversation runs with the conversation's items
    before its input: the export rebuilds them from the records it reads, the creation's items
    (POST /v1/conversations), those added (POST /v1/conversations/{id}/items) and the earlier
    requests of the conversation, by time (export.ChainIndex.conversation)."""

    ASK = TestResponsesChains.ASK
    CALL = TestResponsesChains.CALL
    TOOLS = TestResponsesChains.TOOLS
    answer = staticmethod(TestResponsesChains.answer)
    PERSONA = {"type": "message", "role": "developer", "content": "You work for ACME."}
    WHOLE = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "You work for ACME."},
             {"role": "user", "content": "Hello."}] + TestResponsesChains.WHOLE[1:]

    @staticmethod
    def create(clock, session: str, items=None, cid: str = "conv_1") -> dict:
        """POST /v1/conversations: the conversation object it answers (the API reference)."""
        return df.record(clock, session_id=session, provider_type="openai", dialect="generic",
                         endpoint="/v1/conversations", model=None,
                         request_body={} if items is None else {"items": items},
                         response_body={"id": cid, "object": "conversation", "created_at": 1764000000, "metadata": {}})

    @staticmethod
    def add(clock, session: str, items: list, cid: str = "conv_1", **kw) -> dict:
        """POST /v1/conversations/{id}/items: the list of the items made."""
        made = [dict(item, id="msg_add%d" % k, status="completed") for k, item in enumerate(items)]
        return df.record(clock, session_id=session, provider_type="openai", dialect="generic",
                         endpoint="/v1/conversations/%s/items" % cid, model=None, request_body={"items": items},
                         response_body={"object": "list", "data": made, "first_id": made[0]["id"],
                                        "last_id": made[-1]["id"], "has_more": False}, **kw)

    @staticmethod
    def join(rec: dict, cid: str = "conv_1", as_object: bool = False) -> dict:
        rec["request_body"]["conversation"] = {"id": cid} if as_object else cid
        rec["response_body"]["conversation"] = {"id": cid}
        return rec

    def turns(self, seed: int = 120, session: str = "agent", instructions=("Be brief.",) * 3) -> list:
        """A conversation made with a developer item, a user item added, then three requests:
        a question answered by a call; its result only; a new question."""
        clock = df.Clock(seed=seed)
        made = self.create(clock, "default", [self.PERSONA])
        added = self.add(clock, "default", [{"type": "message", "role": "user", "content": "Hello."}])
        first = self.join(df.openai_responses(clock, session, self.ASK, [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Need the order."}]},
            self.CALL], instructions=instructions[0], tools=self.TOOLS))
        second = self.join(df.openai_responses(clock, session, [
            {"type": "function_call_output", "call_id": "call_r1", "output": "shipped"}],
            self.answer("Your order has shipped."), instructions=instructions[1], tools=self.TOOLS, stream=True),
            as_object=True)
        third = self.join(df.openai_responses(clock, session, "Thanks! When will it arrive?",
                                              self.answer("Tomorrow.", "msg_2"), instructions=instructions[2],
                                              tools=self.TOOLS))
        return [made, added, first, second, third]

    def test_a_request_is_exported_with_the_conversation_before_it(self) -> None:
        # Each request was exported with its own input only: the second (a tool result only)
        # skipped as no_user_turn, its result dropped as orphan_tool_result, the third an
        # answer to "Thanks!" alone, and the creation's and added items nowhere.
        rows = self.rows(self.turns())
        self.assertEqual([r["messages"] for r in rows], [self.WHOLE[:5], self.WHOLE[:7], self.WHOLE])
        self.assertIn("; 2 skipped (not_chat 2);", self.summary)  # (the Conversations API's records)
        self.assertNotIn("orphan_tool_result", self.summary)
        self.assertIn("; 3 continuing earlier records (previous_response_id, conversation);", self.summary)
        rows = self.rows(self.turns(), "--format", "sharegpt")
        self.assertEqual([t["from"] for t in rows[2]["conversations"]], [
            "system", "human", "function_call", "observation", "gpt", "human", "gpt"])
        self.assertEqual(rows[2]["conversations"][0]["value"], "Be brief.\nYou work for ACME.")

    def test_dedupe_keeps_the_whole_conversation_once(self) -> None:
        # The creation (session "default") and the requests (another session) are one
        # conversation: its longest row supersedes the others wherever they were recorded.
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                rows = self.rows(self.turns(), "--format", fmt, "--dedupe")
                self.assertEqual(len(rows), 1, self.summary)
                self.assertIn("2 superseded by --dedupe", self.summary)
        recs = self.turns()
        rows = self.rows(recs, "--format", "records", "--dedupe")
        self.assertEqual([json.loads(r["request_body"]) for r in rows], [r["request_body"] for r in recs])

    def test_records_read_in_any_order_are_put_in_time_order(self) -> None:
        # The creation in a session read after the requests, the requests out of order in
        # their file: their timestamps order them.
        made, added, first, second, third = self.turns(seed=121)
        df.DataDirWriter(self.data).write_records([made, added])  # (session "default")
        first["session_id"] = second["session_id"] = third["session_id"] = "a-first"
        df.DataDirWriter(self.data).write_records([third, first, second])
        err = io.StringIO()
        with redirect_stderr(err):
            code = export.run(parse(["--data-dir", self.data, "--out", self.out, "--format", "openai-chat"]))
        self.assertEqual(code, 0, err.getvalue())
        self.assertEqual(sorted(len(r["messages"]) for r in read_jsonl(self.out)), [5, 7, 9])
        self.assertIn(self.WHOLE, [r["messages"] for r in read_jsonl(self.out)])

    def test_instructions_are_the_request_s_own(self) -> None:
        # A request's instructions are inserted into its context; they are no item of the
        # conversation, so a later request does not get them.
        rows = self.rows(self.turns(seed=122, instructions=("Be brief.", "Be formal.", None)))
        self.assertEqual(rows[1]["messages"][0], {"role": "system", "content": "Be formal."})
        self.assertEqual(rows[1]["messages"][1:], self.WHOLE[1:7])
        self.assertEqual(rows[2]["messages"], self.WHOLE[1:])

    def assertAsToday(self, recs: list, *argv: str, kept=()) -> None:
        """The rows and counts of the requests in ``recs`` but those in ``kept`` are those of
        the same records without conversation (exported as they are; the rows of a
        conversation's requests come after the others, once every record is read)."""
        rows = self.rows(recs, *argv)
        summary = self.summary
        for rec in recs:
            if rec["dialect"] == "openai_responses" and rec not in kept:
                rec["request_body"].pop("conversation", None)
        self.assertEqual(sorted(map(json.dumps, rows)), sorted(map(json.dumps, self.rows(recs, *argv))))
        continuing = r"; \d+ continuing earlier records \([^)]*\)"
        self.assertEqual(re.sub(continuing, "", summary), re.sub(continuing, "", self.summary))

    def test_a_conversation_whose_creation_was_not_read_is_exported_as_it_was(self) -> None:
        self.assertIn(self.WHOLE, [r["messages"] for r in self.rows(self.turns(seed=123))])  # (with it)
        made, added, first, second, third = self.turns(seed=123)
        self.assertAsToday([added, first, second, third])
        self.assertIn("2 skipped (no_user_turn 1, not_chat 1)", self.summary)
        made, added, first, second, third = self.turns(seed=123)
        made["model"] = "gpt-4o"  # (filtered out)
        self.assertAsToday([made, added, first, second, third], "--model", "gpt-4.1,None")

    def test_a_record_before_it_not_read_or_not_known_leaves_a_request_as_it_was(self) -> None:
        # What an earlier record of the conversation added is not known: filtered out, sent
        # with store: false (the API reference does not say whether its items join the
        # conversation), cut short, in the background, an item deleted.  The requests after it
        # are exported as they are; those before it are rebuilt.
        def damaged(how: str) -> list:
            recs = self.turns(seed=124)
            second = recs[3]
            if how == "filtered":
                second["model"] = "gpt-4o"
            elif how == "store":
                second["request_body"]["store"] = False
            elif how == "aborted":
                second.update(ended="client_aborted", error={"type": "client_aborted", "message": "gone"})
            elif how == "background":
                second["response_body"]["status"] = "queued"
            elif how == "deleted":
                gone = df.record(df.Clock(seed=125, start=df.T0 + timedelta(seconds=7)), session_id="default",
                                 provider_type="openai", dialect="generic", method="DELETE",
                                 endpoint="/v1/conversations/conv_1/items/msg_add0", model=None, request_body=None,
                                 response_body={"id": "conv_1", "object": "conversation", "created_at": 1764000000,
                                                "metadata": {}})
                recs.insert(3, gone)
            return recs

        for how in ("filtered", "store", "aborted", "background", "deleted"):
            with self.subTest(how):
                recs = damaged(how)
                argv = ("--model", "gpt-4.1,None") if how == "filtered" else ()
                rows = self.rows(recs, *argv)
                self.assertEqual(rows[0]["messages"], self.WHOLE[:5])
                self.assertEqual(rows[-1]["messages"], self.WHOLE[:1] + self.WHOLE[7:])
                recs = damaged(how)
                self.assertAsToday(recs, *argv, kept=[recs[2]] + ([recs[3]] if how in ("store", "background") else []))

    def test_a_request_the_api_refused_added_nothing(self) -> None:
        made, added, first, second, third = self.turns(seed=126)
        refused = self.join(df.openai_responses(df.Clock(seed=127, start=df.T0 + timedelta(seconds=7)), "agent",
                                                "Ignored.", [], status_code=400))
        refused["response_body"] = {"error": {"message": "Invalid", "type": "invalid_request_error",
                                              "param": None, "code": None}}
        rows = self.rows([made, added, first, refused, second, third])
        self.assertEqual(rows[-1]["messages"], self.WHOLE)

    def test_the_memory_bound(self) -> None:
        # Past ChainIndex.MAX_BYTES a conversation is pushed out whole (its requests are
        # exported as they are, counted); so is a request waiting past it.
        recs = self.turns(seed=128)
        other = df.openai_responses(df.Clock(seed=133, start=df.T0 + timedelta(seconds=60)), "x",
                                    "Unrelated. " * 500, self.answer("Sure."))
        size = lambda rec: rec["request_bytes"] + rec["response_bytes"]
        with mock.patch.object(export.ChainIndex, "MAX_BYTES", sum(size(r) for r in recs)):
            rows = self.rows(recs + [other])
        self.assertEqual([r["messages"] for r in rows][1:], [[self.WHOLE[0]] + self.WHOLE[3:5],
                                                             self.WHOLE[:1] + self.WHOLE[7:]])
        self.assertIn("3 skipped (no_user_turn 1, not_chat 2)", self.summary)
        self.assertIn("; 3 without earlier turns past the", self.summary)
        self.assertNotIn("continuing", self.summary)
        # The requests waiting for the end of the read past the bound: the oldest goes on, as it is.
        recs = self.turns(seed=134)
        with mock.patch.object(export.ChainIndex, "MAX_BYTES", size(recs[2]) + size(recs[3]) - 1):
            rows = self.rows(recs)
        self.assertEqual(rows[0]["messages"], [self.WHOLE[0]] + self.WHOLE[3:5])
        self.assertEqual(rows[-1]["messages"], self.WHOLE)
        self.assertIn("without earlier turns past the", self.summary)

    def test_previous_response_id_naming_a_request_of_a_conversation(self) -> None:
        # Such a response followed the conversation's items, which the chain does not hold:
        # a request continuing it is exported as it is.
        made, added, first, second, third = self.turns(seed=129)
        later = df.openai_responses(df.Clock(seed=130, start=df.T0 + timedelta(seconds=60)), "agent", "And then?",
                                    self.answer("Then nothing.", "msg_3"))
        later["request_body"]["previous_response_id"] = third["response_body"]["id"]
        rows = self.rows([made, added, first, second, third, later])
        self.assertEqual(len(rows), 4)
        self.assertIn({"messages": [{"role": "user", "content": "And then?"},
                                    {"role": "assistant", "content": "Then nothing."}]}, rows)

    def test_a_conversation_opened_empty(self) -> None:
        # The first request of a conversation created without items is as it was (not counted
        # as continuing); the second follows it.
        clock = df.Clock(seed=131)
        made = self.create(clock, "default")
        first = self.join(df.openai_responses(clock, "s", "Hi.", self.answer("Hello.")))
        second = self.join(df.openai_responses(clock, "s", "Bye.", self.answer("Bye.", "msg_2")))
        rows = self.rows([made, first, second], "--dedupe")
        self.assertEqual(rows, [{"messages": [
            {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye."}]}])
        self.assertIn("; 1 continuing earlier records", self.summary)

    def test_item_references_resolve_to_the_items_of_the_conversation(self) -> None:
        made, added, first, second, third = self.turns(seed=132)
        third["request_body"]["input"] = [{"role": "user", "content": "Thanks!"}, {"type": "item_reference", "id": "fc_1"},
                                          {"type": "function_call_output", "call_id": "call_r1", "output": "delivered"}]
        rows = self.rows([made, added, first, second, third])
        self.assertEqual(rows[-1]["messages"][7:], [
            {"role": "user", "content": "Thanks!"}, self.WHOLE[4],
            {"role": "tool", "content": "delivered", "tool_call_id": "call_r1"},
            {"role": "assistant", "content": "Tomorrow."}])
        self.assertNotIn("item_reference", self.summary)


class TestAssistantAudio(AuditCase):
    def test_audio_is_counted_and_an_audio_only_turn_left_out(self) -> None:
        # The turn was {"role": "assistant", "content": ""} and the audio not counted (an audit's finding).
        first, second = df.openai_audio_session(df.Clock(seed=43))
        self.assertEqual(self.rows([second])[0]["messages"], [
            {"role": "user", "content": "Say hi"}, {"role": "user", "content": "Again, in text"},
            {"role": "assistant", "content": "Hi again."}])
        self.assertIn("dropped parts: audio 1, empty_assistant_turn 1;", self.summary)
        turns = self.rows([second], "--format", "sharegpt")[0]["conversations"]
        self.assertEqual(turns, [{"from": "human", "value": "Say hi\nAgain, in text"}, {"from": "gpt", "value": "Hi again."}])
        self.assertIn("dropped parts: audio 1, empty_assistant_turn 1;", self.summary)

    def test_an_audio_answer_is_exported_as_its_transcript(self) -> None:
        first, _ = df.openai_audio_session(df.Clock(seed=44))
        self.assertEqual(self.rows([first])[0]["messages"][-1], {"role": "assistant", "content": "Hi there!"})
        self.assertIn("dropped parts: audio 1;", self.summary)


class TestToolErrors(AuditCase):
    def test_the_is_error_flag_is_counted(self) -> None:
        # It was lost without a count (an audit's finding).
        rec = df.anthropic_tool_error(df.Clock(seed=45))
        msgs = self.rows([rec])[0]["messages"]
        self.assertEqual(msgs[2], {"role": "tool", "content": "city not found", "tool_call_id": "toolu_1"})
        self.assertIn("dropped parts: tool_result_is_error 1;", self.summary)
        self.rows(df.agent_session_with_fork(df.Clock(seed=46))["records"])  # is_error false: no count
        self.assertNotIn("is_error", self.summary)


class TestFormatRules(AuditCase):
    """Rows the documented readers take: each test a rule an export broke."""

    def assertValid(self, rows: list, *argv: str) -> None:
        for row in rows:
            if "--format" in argv and argv[argv.index("--format") + 1] == "sharegpt":
                problems = sharegpt_problems(row, images="--include-images" in argv)
            else:
                problems = openai_chat_problems(row, thinking="--include-thinking" in argv)
            self.assertEqual(problems, [], json.dumps(row))

    def test_a_tool_message_content_is_a_string_with_images(self) -> None:
        # Every content was a list of parts with --include-images, a tool message's too, which
        # OpenAI's file validation refuses ("Input should be a valid string").
        clock = df.Clock(seed=61)
        recs = df.openai_tool_session(clock) + df.gemini_session(clock) + [df.anthropic_tool_error(clock)]
        rows = self.rows(recs, "--include-images")
        tools = [m for row in rows for m in row["messages"] if m["role"] == "tool"]
        self.assertEqual([m["content"] for m in tools], ['{"temp": 18, "sky": "clear"}', '{"time": "09:30"}',
                                                         "city not found"])
        self.assertIsInstance(rows[0]["messages"][1]["content"], list)
        self.assertValid(rows, "--include-images")

    def test_a_text_holding_a_media_placeholder_is_skipped_in_sharegpt_with_images(self) -> None:
        # A text that says "<image>" (or "<video>", "<audio>") itself was written as it is beside
        # the placeholders of the row's images: LLaMA-Factory's multimodal plugins count them in
        # every turn and refuse the row ("The number of images does not match the number of
        # <image> tokens"), stopping the whole preprocessing.
        clock = df.Clock(seed=67)
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        recs = [df.openai_chat(clock, "s%d" % k, [{"role": "user", "content": [
            {"type": "text", "text": question}, image]}], {"content": answer})
            for k, (question, answer) in enumerate((
                ("What is this?", "A dot."),
                ("Where does the <image> token of LLaVA go?", "Before the question."),
                ("Is this a frame?", "Use a <video> element."),
                ("What tag plays this?", "<audio>, with controls.")))]
        rows = self.rows(recs, "--format", "sharegpt", "--include-images")
        self.assertValid(rows, "--format", "sharegpt", "--include-images")
        self.assertEqual([(row["conversations"][0]["value"], row["images"]) for row in rows],
                         [("What is this?\n<image>", ["data:image/png;base64,iVBORw0KGgo="])])
        self.assertIn("3 skipped (media_placeholder 3)", self.summary)
        # Without images, no placeholder is read: the texts are written as they are.
        self.assertEqual(len(self.rows(recs, "--format", "sharegpt")), 4)
        self.assertEqual(len(self.rows(recs, "--include-images")), 4)


    def test_arguments_are_the_json_text_of_an_object(self) -> None:
        # An empty text (a call without arguments) was written as it was, and broken JSON too:
        # neither is JSON, which the readers parse.
        clock = df.Clock(seed=62)
        user = [{"role": "user", "content": "now"}]

        def call(arguments: str) -> dict:
            return df.openai_chat(clock, "a", user, {"content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "now", "arguments": arguments}}]})
        empty = df.openai_responses(clock, "a", "now", [
            {"type": "function_call", "call_id": "c2", "name": "now", "arguments": ""}])
        recs = [call(""), call(" "), empty, call("{\"tz\": \"UT"), call("[1]"), call("{\"x\": NaN}")]
        rows = self.rows(recs)
        self.assertEqual([r["messages"][-1]["tool_calls"][0]["function"]["arguments"] for r in rows],
                         ["{}", "{}", "{}"])
        self.assertIn("3 skipped (bad_tool_arguments 3)", self.summary)
        self.assertValid(rows)
        turns = [r["conversations"][-1] for r in self.rows(recs, "--format", "sharegpt")]
        self.assertEqual({t["value"] for t in turns}, {'{"name": "now", "arguments": {}}'})

    def test_the_arguments_an_agent_resends_are_parsed_once(self) -> None:
        # Every call of an agent's session was parsed again in each later request that resends
        # it (a session of n calls: n * n / 2 parses). The same verdicts, a broken text's too.
        clock = df.Clock(seed=63)
        marker = "%x" % id(self)  # (texts no other test exported: the verdicts are remembered)
        texts = ["{\"n\": %d, \"m\": \"%s\"}" % (i, marker) for i in range(5)] + ["{\"broken\": \"" + marker]
        msgs = [{"role": "user", "content": "go"}]
        recs = []
        for i, text in enumerate(texts):
            call = {"id": "c%d" % i, "type": "function", "function": {"name": "f", "arguments": text}}
            recs.append(df.openai_chat(clock, "a", list(msgs), {"content": None, "tool_calls": [call]}))
            msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c%d" % i, "content": "ok"}]
        recs.append(df.openai_chat(clock, "a", list(msgs), {"content": "done"}))
        for run, expected in enumerate((sorted(texts), [])):  # (the second export remembers them)
            with mock.patch.object(export, "too_deep", side_effect=export.too_deep) as measured:
                rows = self.rows(recs)
            self.assertEqual(len(rows), 5)
            self.assertIn("2 skipped (bad_tool_arguments 2)", self.summary)
            parsed = [c[0][0] for c in measured.call_args_list if marker in c[0][0]]
            self.assertEqual(sorted(parsed), expected, run)
        rows = self.rows(recs, "--format", "sharegpt")
        self.assertEqual([len(r["conversations"]) for r in rows], [2, 4, 6, 8, 10])
        self.assertIn("2 skipped (bad_tool_arguments 2)", self.summary)

    def test_every_message_has_content_and_a_user_asks(self) -> None:
        # An image-only user message was written with content "" without --include-images, an
        # Anthropic system of non-text blocks as an empty system message, and a Responses call
        # holding only a tool result after previous_response_id as an answer to no one.
        clock = df.Clock(seed=63)
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        photo = df.anthropic(clock, "u", [{"role": "user", "content": [image]}], [{"type": "text", "text": "A cat."}])
        system = df.anthropic(clock, "u", [{"role": "user", "content": "hi"}], [{"type": "text", "text": "yo"}],
                              system=[{"type": "image", "source": {}}])
        tail = df.openai_responses(clock, "u", [{"type": "function_call_output", "call_id": "c0", "output": "3"}],
                                   [{"type": "message", "role": "assistant",
                                     "content": [{"type": "output_text", "text": "It is 3."}]}])
        tail["request_body"]["previous_response_id"] = "resp_0"
        rows = self.rows([photo, system, tail])
        self.assertEqual(rows, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
        self.assertIn("2 skipped (empty_user_turn 1, no_user_turn 1)", self.summary)
        rows = self.rows([photo, system, tail], "--include-images")
        self.assertEqual(len(rows), 2)
        self.assertValid(rows, "--include-images")
        self.assertValid(self.rows([photo, system, tail], "--format", "sharegpt"), "--format", "sharegpt")

    def test_sharegpt_turns_alternate_as_llama_factory_reads_them(self) -> None:
        # Parallel results were one observation turn each, text beside calls a gpt turn before
        # the function_call, two system messages two system turns: rows LLaMA-Factory's
        # reader refuses ("Invalid role tag"), as it does the two skipped here.
        clock = df.Clock(seed=64)
        calls = [{"id": "c%d" % k, "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": "{\"city\": \"%s\"}" % c}}
                 for k, c in enumerate("AB")]
        chat = df.openai_chat(clock, "s", [
            {"role": "user", "content": "A and B?"}, {"role": "assistant", "content": "Both.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c0", "content": "1"}, {"role": "tool", "tool_call_id": "c1", "content": "2"}],
            {"content": "1 and 2."}, tools=[df.WEATHER_TOOL])
        gem_calls = {"role": "model", "parts": [{"functionCall": {"name": "t", "args": {"z": z}}} for z in "AB"]}
        gem_results = {"role": "user", "parts": [{"functionResponse": {"name": "t", "response": {"t": k}}}
                                                 for k in (1, 2)]}
        gem = df.gemini(clock, "s", [{"role": "user", "parts": [{"text": "A and B?"}]}, gem_calls, gem_results],
                        [{"text": "1 and 2."}], stream=True)
        two_systems = df.openai_responses(clock, "s", [{"role": "developer", "content": "Be brief."}, "hi"], [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}],
            instructions="You are kind.")
        late_system = df.openai_chat(clock, "s", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                  {"role": "system", "content": "Be terse."},
                                                  {"role": "user", "content": "c"}], {"content": "d"})
        recs = [chat, gem, two_systems, late_system, df.agent_session_with_fork(clock)["records"][-1]]
        rows = self.rows(recs, "--format", "sharegpt")
        self.assertValid(rows, "--format", "sharegpt")
        self.assertIn("2 skipped (sharegpt_order 1, system_not_first 1)", self.summary)
        self.assertIn("tool_call_text 1", self.summary)
        self.assertEqual([[(t["from"], t["value"]) for t in row["conversations"]] for row in rows], [
            [("human", "A and B?"),
             ("function_call", '[{"name": "get_weather", "arguments": {"city": "A"}}, '
                               '{"name": "get_weather", "arguments": {"city": "B"}}]'),
             ("observation", '["1", "2"]'), ("gpt", "1 and 2.")],
            [("human", "A and B?"),
             ("function_call", '[{"name": "t", "arguments": {"z": "A"}}, {"name": "t", "arguments": {"z": "B"}}]'),
             ("observation", '["{\\"t\\": 1}", "{\\"t\\": 2}"]'), ("gpt", "1 and 2.")],
            [("system", "You are kind.\nBe brief."), ("human", "hi"), ("gpt", "yo")]])
        self.assertEqual(len(self.rows(recs)), 5)  # all valid in openai-chat, which holds them

class TestDocumentedFormats(unittest.TestCase):
    """Every row of every chat export, with every shaping flag, of a data dir holding every golden
    fixture (streamed and not), the mixed-provider tool loops and the audited shapes keeps the
    rules of the format it claims (the validators above)."""

    FLAGS = ((), ("--include-thinking",), ("--include-images",), ("--include-thinking", "--include-images"),
             ("--dedupe",))

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="export-formats-")
        cls.data = os.path.join(cls.tmp, "data")
        df.build_formats(cls.data)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.tmp)

    def test_every_row_keeps_the_format_s_rules(self) -> None:
        out = os.path.join(self.tmp, "out.jsonl")
        for fmt in ("openai-chat", "sharegpt"):
            for flags in self.FLAGS:
                with self.subTest(fmt, flags=flags):
                    err = io.StringIO()
                    with redirect_stderr(err):
                        code = export.run(parse(["--data-dir", self.data, "--format", fmt, "--out", out] + list(flags)))
                    self.assertEqual(code, 0, err.getvalue())
                    rows = read_jsonl(out)
                    self.assertGreater(len(rows), 40)
                    for row in rows:
                        if fmt == "openai-chat":
                            problems = openai_chat_problems(row, thinking="--include-thinking" in flags)
                        else:
                            problems = sharegpt_problems(row, images="--include-images" in flags)
                        self.assertEqual(problems, [], json.dumps(row)[:2000])

    def test_the_validators_refuse_what_the_readers_refuse(self) -> None:
        """The validators are no rubber stamp: each rule refuses a row that breaks it."""
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        good = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "r"},
                             {"role": "assistant", "content": "a"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
        self.assertEqual(openai_chat_problems(good), [])
        bad = {
            "arguments as an object": (2, {"tool_calls": [dict(call, function={"name": "f", "arguments": {}})]}),
            "arguments not JSON": (2, {"tool_calls": [dict(call, function={"name": "f", "arguments": "{"})]}),
            "no content nor calls": (2, {"tool_calls": None, "content": ""}),
            "tool without id": (3, {"tool_call_id": None}),
            "tool content a list": (3, {"content": [{"type": "text", "text": "r"}]}),
            "tool with a name": (3, {"name": "f"}),
            "empty user": (1, {"content": ""}),
            "image in the answer": (4, {"content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}),
            "unknown key": (4, {"reasoning_content": "t"}),
            "bad weight": (4, {"weight": 2}),
        }
        for name, (index, change) in bad.items():
            row = json.loads(json.dumps(good))
            row["messages"][index].update(change)
            row["messages"][index] = {k: v for k, v in row["messages"][index].items() if v is not None}
            with self.subTest(name):
                self.assertNotEqual(openai_chat_problems(row), [])
        self.assertNotEqual(openai_chat_problems(dict(good, messages=good["messages"][:-1])), [])  # ends with tool
        self.assertNotEqual(openai_chat_problems(dict(good, messages=good["messages"][:2])), [])  # no answer
        self.assertNotEqual(openai_chat_problems(dict(good, extra=1)), [])
        self.assertEqual(openai_chat_problems(dict(good, parallel_tool_calls=False)), [])
        turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                 {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                 {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]
        self.assertEqual(sharegpt_problems({"conversations": turns, "tools": ""}), [])
        thought = dict(turns[2], value="<think>\nhm\n</think>\n\n" + turns[2]["value"])
        self.assertEqual(sharegpt_problems({"conversations": turns[:2] + [thought] + turns[3:], "tools": ""}), [])
        for name, broken in {
                "two observations": turns[:4] + [turns[3]] + turns[4:],
                "gpt then function_call": turns[:2] + [{"from": "gpt", "value": "x"}] + turns[2:],
                "late system": turns[:2] + [turns[0]] + turns[2:],
                "human after observation": turns[:4] + [turns[1], turns[4]],
                "arguments as text": turns[:2] + [{"from": "function_call", "value": '{"name": "f", "arguments": "{}"}'}]
                + turns[3:],
                "text before the calls": turns[:2] + [{"from": "function_call", "value": "Let me see.\n" + turns[2]["value"]}]
                + turns[3:],
                "thinking cut short": turns[:2] + [{"from": "function_call", "value": "<think>\na\n</think>\n\nb\n</think>"
                                                   "\n\n" + turns[2]["value"]}] + turns[3:],
                "ends with a human": turns[:2]}.items():
            with self.subTest(name):
                self.assertNotEqual(sharegpt_problems({"conversations": broken, "tools": ""}), [])

def _refuse_constant(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


def strict_rows(path: str) -> list:
    """The rows of a JSONL file, refusing NaN and Infinity as strict JSON readers do."""
    with open(path, "rb") as fh:
        return [json.loads(line, parse_constant=_refuse_constant) for line in fh]


class TestDamagedRecords(unittest.TestCase):
    """Hand-edited or damaged records: the odd field is ignored or the record skipped, never a crash."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="export-damaged-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.data = os.path.join(self.tmp, "data")
        self.out = os.path.join(self.tmp, "out.jsonl")

    def write(self, recs: list) -> None:
        """Write ``recs`` as one session file (ASCII JSON: lone surrogates stay escapes)."""
        shutil.rmtree(self.data, ignore_errors=True)
        path = df.DataDirWriter(self.data).session_file("damaged", "20261127_000000")
        with open(path, "wb") as fh:
            fh.write(b"".join((json.dumps(r) + "\n").encode("ascii") for r in recs))

    def run_export(self, *argv: str):
        """(exit code, summary) of an export of the data dir to ``self.out``."""
        err = io.StringIO()
        with redirect_stderr(err):
            code = export.run(parse(["--data-dir", self.data, "--out", self.out] + list(argv)))
        self.assertNotIn("Traceback", err.getvalue())
        return code, err.getvalue()

    def test_list_fields_holding_a_number_or_bool_are_ignored(self) -> None:
        clock = df.Clock(seed=11)
        user = [{"role": "user", "content": "hi"}]
        answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}

        def chat(**req):
            rec = df.openai_chat(clock, "d", user, {"content": "ok"})
            rec["request_body"].update(req)
            return rec

        bad_call = df.openai_chat(clock, "d", user, {"content": "ok"})
        bad_call["response_body"]["choices"][0]["message"]["tool_calls"] = 5
        gem_user = [{"role": "user", "parts": [{"text": "hi"}]}]
        gem_system = df.gemini(clock, "d", gem_user, [{"text": "ok"}])
        gem_system["request_body"]["systemInstruction"] = {"parts": 5}
        cases = {
            "chat tools 5": chat(tools=5),
            "chat tools true": chat(tools=True),
            "chat functions 5": chat(functions=5),
            "chat response tool_calls 5": bad_call,
            "chat history tool_calls 5": chat(messages=[{"role": "assistant", "tool_calls": 5}] + user),
            "responses input summary 5": df.openai_responses(
                clock, "d", [{"type": "reasoning", "summary": 5}, "hi"], [answer]),
            "responses output content 5": df.openai_responses(
                clock, "d", "hi", [{"type": "reasoning", "summary": [], "content": 5}, answer]),
            "responses tools true": df.openai_responses(clock, "d", "hi", [answer], tools=True),
            "anthropic tools 5": df.anthropic(clock, "d", user, [{"type": "text", "text": "ok"}], tools=5),
            "gemini tools 5": df.gemini(clock, "d", gem_user, [{"text": "ok"}], tools=5),
            "gemini systemInstruction parts 5": gem_system,
            "gemini list role and call names": df.gemini(clock, "d", [
                {"role": ["model"], "parts": [{"text": "hi"}]},
                {"role": "model", "parts": [{"functionCall": {"name": ["f"], "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": {"n": 1}, "response": {}}}]}],
                [{"text": "ok"}]),
        }
        for name, rec in cases.items():
            self.write([rec])
            for argv in (["--format", "openai-chat"], ["--format", "sharegpt", "--dedupe"],
                         ["--format", "records", "--dedupe", "--split", "0.5"]):
                with self.subTest(name, argv=argv):
                    code, err = self.run_export(*argv)
                    self.assertEqual(code, 0, err)
                    self.assertNotIn("skipped (", err)
                    paths = export.split_paths(self.out) if "--split" in argv else [self.out]
                    rows = [row for path in paths for row in read_jsonl(path)]
                    self.assertEqual(len(rows), 1)
                    if argv[1] == "openai-chat":
                        self.assertEqual(rows[0]["messages"][-1], {"role": "assistant", "content": "ok"})
                        self.assertNotIn("tools", rows[0])

    def test_dedupe_with_an_object_or_list_session_id(self) -> None:
        clock = df.Clock(seed=12)
        for session in ({"a": 1}, ["s", 1]):
            first = df.openai_chat(clock, "d", [{"role": "user", "content": "hi"}], {"content": "ok"})
            second = df.openai_chat(clock, "d", [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "ok"},
                                                 {"role": "user", "content": "more"}], {"content": "done"})
            first["session_id"] = second["session_id"] = session
            self.write([first, second])
            with self.subTest(session=session):
                code, err = self.run_export("--format", "openai-chat", "--dedupe")
                self.assertEqual(code, 0, err)
                self.assertIn("1 superseded by --dedupe", err)
                self.assertEqual(read_jsonl(self.out)[0]["messages"][-1]["content"], "done")

    def test_filters_with_list_or_object_values_do_not_match(self) -> None:
        rec = df.openai_chat(df.Clock(seed=13), "d", [{"role": "user", "content": "hi"}], {"content": "ok"})
        rec.update(session_id={"a": 1}, provider=[1], provider_type={"t": 1}, ended=["completed"])
        self.write([rec])
        for argv in (["--session", "d"], ["--provider", "openai"], ["--ended", "completed"]):
            with self.subTest(argv=argv):
                code, err = self.run_export("--format", "records", *argv)
                self.assertEqual(code, 1, err)
                self.assertIn("1 filtered out", err)

    def test_split_by_an_id_with_a_lone_surrogate(self) -> None:
        rec = df.embeddings(df.Clock(seed=14), "d")
        rec["id"] = "\ud800"
        self.write([rec])
        code, err = self.run_export("--format", "records", "--split", "0.5")
        self.assertEqual(code, 0, err)
        train, test = export.split_paths(self.out)
        self.assertEqual([r["id"] for r in read_jsonl(train) + read_jsonl(test)], ["\ufffd"])

    def test_non_finite_numbers_are_never_written(self) -> None:
        """NaN and Infinity are not JSON: such a record is skipped as non_finite (whatever the reader
        lets through: the records are handed to export directly)."""
        clock = df.Clock(seed=15)
        user = [{"role": "user", "content": "hi"}]
        tool = {"type": "function", "function": {"name": "f", "parameters": {"m": float("nan")}}}
        recs = [df.openai_chat(clock, "d", user, {"content": "ok"}, tools=[tool]),
                df.anthropic(clock, "d", user, [{"type": "tool_use", "id": "t1", "name": "f",
                                                 "input": {"x": float("inf")}}]),
                df.openai_chat(clock, "d", user, {"content": "fine"}, duration=float("-inf")),
                df.openai_chat(clock, "d", user, {"content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": NaN}"}}]})]
        self.write([df.openai_chat(clock, "d", user, {"content": "placeholder"})])
        expect = {"openai-chat": ("3 skipped (bad_tool_arguments 1, non_finite 2)", 1),
                  "sharegpt": ("3 skipped (bad_tool_arguments 1, non_finite 2)", 1),
                  "records": ("3 skipped (non_finite 3)", 1)}
        for fmt, (skipped, written) in expect.items():
            for extra in ([], ["--dedupe"]):
                with self.subTest(fmt, extra=extra), \
                        mock.patch.object(export.reader, "iter_records", lambda *a: iter(recs)):
                    code, err = self.run_export("--format", fmt, *extra)
                    self.assertEqual(code, 0, err)
                    self.assertIn(skipped, err)
                    self.assertEqual(len(strict_rows(self.out)), written)

    def test_non_finite_arguments_are_skipped(self) -> None:
        # They were kept as text: arguments a strict reader's json.loads refuses.
        rec = df.openai_chat(df.Clock(seed=16), "d", [{"role": "user", "content": "hi"}], {"content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": NaN, \"y\": 1e999}"}}]})
        with self.assertRaises(export.Skip) as ctx:
            export.convert(rec)
        self.assertEqual(ctx.exception.reason, "bad_tool_arguments")

    def test_encoding_refuses_non_finite_numbers(self) -> None:
        for value in (float("nan"), float("inf"), float("-inf")):
            with self.assertRaises(export.Skip) as ctx:
                export.encode_line({"x": [value]})
            self.assertEqual(ctx.exception.reason, "non_finite")
            with self.assertRaises(export.Skip):
                export.render_record({"request_body": {"x": value}})
        self.assertEqual(export.encode_line({"x": "\ud800"}), b'{"x": "\\ufffd"}\n')


if __name__ == "__main__":
    unittest.main()
