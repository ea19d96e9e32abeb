"""Dialect reassembly against golden files, plus unit tests of the edges.

Golden files live in tests/fixtures/<dialect name>/: an input next to
``<name>.expected.json`` holding ``{"response_body", "tokens_used", "error",
"complete"}``. Inputs by suffix:

* ``.sse``: a ``text/event-stream`` body, decoded then ``reassemble``d;
* ``.stream.json``: a streamed JSON array (Gemini without ``alt=sse``);
* ``.ndjson``: newline-delimited JSON stream;
* ``.json``: a non-streamed body, given to ``from_body``.

Each stream fixture is also fed split at random byte offsets (seeded), and at
every split point when small, and must give the same Result.

Set PROXY_LLM_REGEN_FIXTURES=1 to (re)write missing expected files from the
current code; review every such file by hand before committing it.
"""

from __future__ import annotations

import json
import os
import random
import unittest

from proxy_llm import dialects
from proxy_llm.dialects import DIALECTS, Result, decode_stream, select
from proxy_llm.dialects.anthropic import anthropic_usage
from proxy_llm.dialects.base import REASSEMBLY_ERROR
from proxy_llm.sse import Event
from tests.support import split_at

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EXPECTED = ".expected.json"
CONTENT_TYPES = (
    (".stream.json", "application/json"),
    (".ndjson", "application/x-ndjson"),
    (".sse", "text/event-stream"),
)
SMALL = 2048  # fixtures up to this size are also decoded at every single split point


def fixture_cases():
    """[(dialect name, input path, expected path)] for every golden file."""
    cases = []
    if not os.path.isdir(FIXTURES):
        return cases
    for name in sorted(os.listdir(FIXTURES)):
        folder = os.path.join(FIXTURES, name)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(EXPECTED) or fname.startswith("."):
                continue
            if not (fname.endswith(".sse") or fname.endswith(".json") or fname.endswith(".ndjson")):
                continue
            base = fname
            for suffix in (".stream.json", ".ndjson", ".sse", ".json"):
                if fname.endswith(suffix):
                    base = fname[:-len(suffix)]
                    break
            cases.append((name, os.path.join(folder, fname), os.path.join(folder, base + EXPECTED)))
    return cases


def content_type_of(path):
    for suffix, ctype in CONTENT_TYPES:
        if path.endswith(suffix):
            return ctype
    return None  # a non-streamed body


def run(dialect_name, path, pieces=None):
    """The Result of a fixture; ``pieces`` overrides how the bytes arrive."""
    dialect = DIALECTS[dialect_name]
    with open(path, "rb") as f:
        data = f.read()
    ctype = content_type_of(path)
    if ctype is None:
        body = json.loads(data.decode("utf-8")) if data.strip() else None
        return dialect.from_body(body)
    if pieces is None:
        pieces = [data]
    events, _ = decode_stream(ctype, [(float(i), p) for i, p in enumerate(pieces)], 1 << 20)
    return dialect.reassemble([ev for _, ev in events])




class GoldenFilesTest(unittest.TestCase):
    maxDiff = None

    def test_fixtures_exist(self):
        names = set(name for name, _, _ in fixture_cases())
        self.assertTrue({"openai_chat", "anthropic_messages"} <= names, names)

    def test_golden(self):
        regen = os.environ.get("PROXY_LLM_REGEN_FIXTURES") == "1"
        for name, path, expected_path in fixture_cases():
            with self.subTest(fixture=os.path.relpath(path, FIXTURES)):
                got = run(name, path).to_json()
                if regen and not os.path.exists(expected_path):
                    with open(expected_path, "w", encoding="utf-8") as f:
                        json.dump(got, f, indent=2, ensure_ascii=False)
                        f.write("\n")
                with open(expected_path, encoding="utf-8") as f:
                    want = json.load(f)
                self.assertEqual(got, want)

    def test_split_points(self):
        rng = random.Random(20261127)
        for name, path, _ in fixture_cases():
            ctype = content_type_of(path)
            if ctype is None:
                continue
            with open(path, "rb") as f:
                data = f.read()
            want = run(name, path)
            want_events = decoded(ctype, [data])
            with self.subTest(fixture=os.path.relpath(path, FIXTURES)):
                # Whole pipeline: random multi-way splits, and byte by byte.
                for _ in range(25):
                    k = rng.randrange(1, 12)
                    pieces = split_at(data, [rng.randrange(1, max(2, len(data))) for _ in range(k)])
                    self.assertEqual(run(name, path, pieces), want)
                self.assertEqual(run(name, path, [data[i:i + 1] for i in range(len(data))]), want)
                # Decoder: every split point of small fixtures; of the others,
                # every point next to a line end or inside a UTF-8 sequence.
                # The same events give the same Result.
                if len(data) <= SMALL:
                    points = range(1, len(data))
                else:
                    points = [i for i in range(1, len(data))
                              if data[i - 1] in b"\r\n" or data[i] in b"\r\n"
                              or data[i - 1] >= 0x80 or data[i] >= 0x80]
                for i in points:
                    self.assertEqual(decoded(ctype, [data[:i], data[i:]]), want_events, i)


def decoded(ctype, pieces):
    events, _ = decode_stream(ctype, [(0.0, p) for p in pieces], 1 << 20)
    return [(ev.to_json(), ev.raw) for _, ev in events]


class LoadsTest(unittest.TestCase):
    def test_loads_is_json_loads_or_none(self):
        # base.loads reads with the scanner at once when the text is one value and nothing
        # else; every other text must still get json.loads's answer (None for an error), but
        # for text nested past depth.PARSE_LIMIT, which is never parsed: None on every Python
        # (3.12 and newer parse 5,000 levels).
        from proxy_llm import depth
        from proxy_llm.dialects.base import loads

        texts = ['{"a": 1}', "[1, 2]", '"s"', "1", "-0.5e3", "null", "true", "NaN", "-Infinity", "1e400",
                 " {}", "{} ", "\n{}\n", "{}x", "{} {}", "\ufeff{}", "", " ", "{", '{"a":', '"\\ud800"',
                 "[" * 5000 + "]" * 5000, "01", "1.", ".5", '{"a":1,}', "[1,]", "{'a': 1}", "\x00"]
        rng = random.Random(7)
        for _ in range(300):
            texts.append("".join(rng.choice('{}[]":,0123456789.eE+- \t\nabtrufnl\\') for _ in range(rng.randrange(1, 12))))

        def reference(text):
            if not depth.nests_within(text.encode("utf-8", "surrogatepass"), depth.PARSE_LIMIT):
                return None
            try:
                return json.loads(text)
            except (ValueError, TypeError, RecursionError):
                return None

        for text in texts:
            with self.subTest(text=text[:40]):
                got, want = loads(text), reference(text)
                if isinstance(want, float) and want != want:  # NaN
                    self.assertTrue(isinstance(got, float) and got != got)
                else:
                    self.assertEqual((type(got), got), (type(want), want))
        self.assertEqual(loads(b'{"a": 1}'), {"a": 1})  # bytes, as json.loads takes them


class SelectTest(unittest.TestCase):
    def test_paths(self):
        cases = [
            ("openai", "POST", "/v1/chat/completions", "openai_chat"),
            ("gemini", "POST", "/v1beta/openai/chat/completions", "openai_chat"),
            ("openai", "POST", "/v1/completions", "openai_completions"),
            ("openai", "POST", "/v1/embeddings", "openai_embeddings"),
            ("openai", "POST", "/v1/responses", "openai_responses"),
            ("openai", "GET", "/v1/responses/resp_123", "openai_responses"),
            ("anthropic", "POST", "/v1/messages", "anthropic_messages"),
            ("anthropic", "POST", "/v1/messages/count_tokens", "anthropic_count_tokens"),
            ("gemini", "POST", "/v1beta/models/gemini-2.0-flash:generateContent", "gemini"),
            ("gemini", "POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", "gemini"),
            ("openai", "GET", "/v1/models", "generic"),
            # OpenAI's own .../messages (stored completions, Assistants): not Anthropic's (an audit).
            ("openai", "GET", "/v1/chat/completions/chatcmpl-1/messages", "generic"),
            ("openai", "POST", "/v1/threads/thread_1/messages", "generic"),
            ("anthropic", "POST", "/gateway/anthropic/v1/messages", "anthropic_messages"),
            (None, None, None, "generic"),
        ]
        for ptype, method, path, want in cases:
            self.assertEqual(select(ptype, method, path).name, want, path)

    def test_paths_remembered_are_bounded_in_characters(self):
        # The paths select() remembers were bounded in entries only (1,024): a client sending
        # another long path (a request line may be 64 KB) with each request made the writer
        # keep every one of them, 64 MB at the bound. They share record's Memo now.
        for n in range(200):
            path = "/v1/chat/completions/%03d/" % n + "p" * 16384
            self.assertEqual(select("openai", "POST", path).name, "generic")
            self.assertLessEqual(sum(len(p) for p in dialects._SELECTED if p), 1 << 20)
        self.assertEqual(select("openai", "POST", "/v1/chat/completions").name, "openai_chat")
        self.assertIn("/v1/chat/completions", dialects._SELECTED)  # a short path is still remembered

    def test_registry_names(self):
        self.assertEqual(set(DIALECTS), {
            "openai_chat", "openai_completions", "openai_responses", "openai_embeddings",
            "anthropic_messages", "anthropic_count_tokens", "gemini", "generic"})
        for name, d in DIALECTS.items():
            self.assertEqual(d.name, name)

    def test_usage_table_documented(self):
        doc = dialects.__doc__
        for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                    "cache_creation_tokens", "reasoning_tokens", "cache_read_input_tokens",
                    "thoughtsTokenCount", "input_tokens_details"):
            self.assertIn(key, doc)


class NeverRaisesTest(unittest.TestCase):
    GARBAGE_VALUES = [None, 0, "", "x", [], {}, [None], {"choices": None}, {"choices": [None, 1]},
                      {"choices": [{"index": "a", "delta": {"tool_calls": [None, {"index": None}]}}]},
                      {"type": "content_block_delta", "index": [], "delta": None},
                      {"type": "message_start", "message": []},
                      {"type": "message_delta", "usage": {"output_tokens": "x"}},
                      {"candidates": [{"content": {"parts": [None, {"text": 1}]}}]},
                      {"usageMetadata": {"promptTokenCount": True}},
                      {"type": "response.output_text.delta", "output_index": -1, "content_index": -5},
                      {"type": "response.output_text.delta", "output_index": 0, "content_index": 2,
                       "delta": "x"},
                      {"type": 5}, {"error": None}, {"error": {"message": 5}}]

    def test_garbage_events_and_bodies(self):
        rng = random.Random(7)
        datas = [json.dumps(v) for v in self.GARBAGE_VALUES] + ["{", "[DONE]", "\x00", "nul"]
        for name, dialect in DIALECTS.items():
            for _ in range(200):
                evs = [Event(data=rng.choice(datas), event=rng.choice([None, "error", "ping"]))
                       for _ in range(rng.randrange(0, 8))]
                res = dialect.reassemble(evs)
                self.assertIsInstance(res, Result)
                json.dumps(res.to_json())
            for value in self.GARBAGE_VALUES:
                res = dialect.from_body(value)
                self.assertIsInstance(res, Result)
                json.dumps(res.to_json())

    def test_internal_failure_is_reported(self):
        class Broken(dialects.Dialect):
            name = "broken"

            def _reassemble(self, events):
                raise KeyError("boom")

        res = Broken().reassemble([Event(data="{}")])
        self.assertEqual(res.error["type"], "proxy_llm.reassembly_error")
        self.assertFalse(res.complete)


class OneOddEventTest(unittest.TestCase):
    """An event of the wrong shape among good ones is skipped: the good ones are still rebuilt
    (each case once turned the whole record into a reassembly_error, or worse)."""

    def assertKept(self, res, text):
        self.assertIsNone(res.error)
        self.assertIn(text, json.dumps(res.response_body))

    def test_chat_choices_that_are_not_a_list(self):
        for odd in (5, True, "x", {"index": 0}):
            with self.subTest(choices=odd):
                res = DIALECTS["openai_chat"].reassemble(events_of(
                    {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]}, {"choices": odd},
                    {"id": "c", "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
                    "[DONE]"))
                self.assertKept(res, "hi there")

    def test_anthropic_block_index_that_is_not_an_int(self):
        for odd in ([0], {"i": 0}, True, "0"):
            with self.subTest(index=odd):
                res = DIALECTS["anthropic_messages"].reassemble(events_of(
                    {"type": "message_start", "message": {"id": "m", "content": []}},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
                    {"type": "content_block_delta", "index": odd, "delta": {"type": "text_delta", "text": "odd"}},
                    {"type": "content_block_stop", "index": odd},
                    {"type": "content_block_stop", "index": 0}, {"type": "message_stop"}))
                self.assertKept(res, "hi")
                self.assertEqual([b["text"] for b in res.response_body["content"]], ["hi", ""])  # true is not 1

    def test_responses_part_index_far_ahead(self):
        # Parts come in order; an index of 10**9 padded a list to 10**9 entries (minutes, gigabytes;
        # 2**63 never ended). 10**7 is enough to tell, and ends without the bound too.
        odd = 10 ** 7
        res = DIALECTS["openai_responses"].reassemble(events_of(
            {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "hi"},
            {"type": "response.output_text.delta", "output_index": 0, "content_index": odd, "delta": "x"},
            {"type": "response.reasoning_summary_text.delta", "output_index": 1, "summary_index": odd,
             "delta": "y"}))
        self.assertKept(res, "hi")
        self.assertEqual(len(res.response_body["output"][0]["content"]), 1)


def events_of(*payloads, **kw):
    """SSE events with the given JSON payloads (str payloads are sent as is)."""
    name = kw.get("event")
    return [Event(data=p if isinstance(p, str) else json.dumps(p), event=name) for p in payloads]


class UsageTest(unittest.TestCase):
    def test_openai_absent_fields_stay_absent(self):
        chat = DIALECTS["openai_chat"]
        self.assertIsNone(chat.from_body({"id": "x", "choices": []}).tokens_used)
        self.assertEqual(chat.from_body({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}).tokens_used,
                         {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        self.assertEqual(chat.from_body({"usage": {"prompt_tokens": 3, "total_tokens": 3}}).tokens_used,
                         {"prompt_tokens": 3, "total_tokens": 3})
        # null and non-int counts are "not sent"
        self.assertEqual(chat.from_body({"usage": {"prompt_tokens": None, "completion_tokens": True,
                                                   "total_tokens": "7"}}).tokens_used, None)

    def test_deepseek_cache_hit(self):
        res = DIALECTS["openai_chat"].from_body(
            {"usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                       "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}})
        self.assertEqual(res.tokens_used["cached_tokens"], 64)

    def test_anthropic(self):
        res = DIALECTS["anthropic_messages"].from_body({"usage": {"input_tokens": 10, "output_tokens": 2}})
        self.assertEqual(res.tokens_used, {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
        res = DIALECTS["anthropic_messages"].from_body({"usage": {
            "input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000,
            "output_tokens": 7}})
        self.assertEqual(res.tokens_used, {"prompt_tokens": 1105, "completion_tokens": 7, "total_tokens": 1112,
                                           "cached_tokens": 1000, "cache_creation_tokens": 100})

    def test_anthropic_thinking_tokens(self):
        """Anthropic's usage tells the output tokens spent thinking (output_tokens_details,
        within output_tokens): reasoning_tokens; the stream's last count stands."""
        res = DIALECTS["anthropic_messages"].from_body({"usage": {
            "input_tokens": 10, "output_tokens": 900, "output_tokens_details": {"thinking_tokens": 750}}})
        self.assertEqual(res.tokens_used, {"prompt_tokens": 10, "completion_tokens": 900, "total_tokens": 910,
                                           "reasoning_tokens": 750})
        evs = events_of(
            {"type": "message_start", "message": {"id": "m", "content": [], "usage": {
                "input_tokens": 9, "output_tokens": 1, "output_tokens_details": {"thinking_tokens": 0}}}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 40, "output_tokens_details": {"thinking_tokens": 31}}},
            {"type": "message_stop"})
        self.assertEqual(DIALECTS["anthropic_messages"].reassemble(evs).tokens_used,
                         {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49, "reasoning_tokens": 31})

    def test_anthropic_stream_merges_usage(self):
        evs = events_of(
            {"type": "message_start", "message": {"id": "m", "content": [], "usage": {
                "input_tokens": 9, "cache_read_input_tokens": 4, "output_tokens": 1}}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 30, "input_tokens": None, "cache_creation_input_tokens": 2}},
            {"type": "message_stop"})
        res = DIALECTS["anthropic_messages"].reassemble(evs)
        self.assertEqual(res.response_body["usage"], {"input_tokens": 9, "cache_read_input_tokens": 4,
                                                      "output_tokens": 30, "cache_creation_input_tokens": 2})
        self.assertEqual(res.tokens_used, {"prompt_tokens": 15, "completion_tokens": 30, "total_tokens": 45,
                                           "cached_tokens": 4, "cache_creation_tokens": 2})
        self.assertTrue(res.complete)

    def test_gemini(self):
        g = DIALECTS["gemini"]
        self.assertEqual(g.from_body({"usageMetadata": {"promptTokenCount": 4}}).tokens_used,
                         {"prompt_tokens": 4})
        self.assertEqual(g.from_body({"usageMetadata": {"promptTokenCount": 4, "thoughtsTokenCount": 10,
                                                        "totalTokenCount": 14}}).tokens_used,
                         {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14,
                          "reasoning_tokens": 10})
        # The tool-use prompt (grounding search results, code output) is input: in the total,
        # not in promptTokenCount.
        self.assertEqual(g.from_body({"usageMetadata": {"promptTokenCount": 4, "toolUsePromptTokenCount": 30,
                                                        "candidatesTokenCount": 6, "totalTokenCount": 40}}).tokens_used,
                         {"prompt_tokens": 34, "completion_tokens": 6, "total_tokens": 40})
        self.assertEqual(g.from_body({"usageMetadata": {"toolUsePromptTokenCount": 30}}).tokens_used,
                         {"prompt_tokens": 30})

    def test_responses(self):
        res = DIALECTS["openai_responses"].from_body({"object": "response", "usage": {
            "input_tokens": 10, "output_tokens": 4, "total_tokens": 14}})
        self.assertEqual(res.tokens_used, {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})

    def test_openai_cache_writes(self):
        """OpenAI's usage tells the prompt tokens written to the cache (cache_write_tokens, in
        the prompt's count as the cached ones are): cache_creation_tokens, as Anthropic's."""
        chat = DIALECTS["openai_chat"].from_body({"usage": {
            "prompt_tokens": 2048, "completion_tokens": 10, "total_tokens": 2058,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1920, "audio_tokens": 0}}})
        self.assertEqual(chat.tokens_used, {"prompt_tokens": 2048, "completion_tokens": 10, "total_tokens": 2058,
                                            "cached_tokens": 0, "cache_creation_tokens": 1920})
        responses = DIALECTS["openai_responses"].from_body({"object": "response", "usage": {
            "input_tokens": 2048, "output_tokens": 10, "total_tokens": 2058,
            "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 1792,
                                     "cache_write_tokens_details": {"ttl_30m_tokens": 1792, "ttl_12h_tokens": 0}},
            "output_tokens_details": {"reasoning_tokens": 0}}})
        self.assertEqual(responses.tokens_used, {"prompt_tokens": 2048, "completion_tokens": 10,
                                                 "total_tokens": 2058, "cached_tokens": 128,
                                                 "cache_creation_tokens": 1792, "reasoning_tokens": 0})
        # Not a count: not sent.
        self.assertNotIn("cache_creation_tokens", DIALECTS["openai_chat"].from_body({"usage": {
            "prompt_tokens": 5, "prompt_tokens_details": {"cache_write_tokens": -1}}}).tokens_used)

    def test_a_count_below_zero_is_not_sent(self):
        # Some servers send -1 for a count they do not know: tokens_used leaves it out, as it
        # leaves out a count the upstream never sent (never 0), and a total is not made from it.
        # A negative count in tokens_used would also take proxy_llm_tokens_total down.
        chat = DIALECTS["openai_chat"].from_body({"usage": {
            "prompt_tokens": 12, "completion_tokens": -1, "total_tokens": -1,
            "prompt_tokens_details": {"cached_tokens": -1}, "prompt_cache_hit_tokens": 3,
            "completion_tokens_details": {"reasoning_tokens": -1}}})
        self.assertEqual(chat.tokens_used, {"prompt_tokens": 12, "cached_tokens": 3})
        self.assertEqual(DIALECTS["openai_chat"].from_body({"usage": {
            "prompt_tokens": 0, "completion_tokens": 0}}).tokens_used,  # (0 is a count)
            {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        responses = DIALECTS["openai_responses"].from_body({"object": "response", "usage": {
            "input_tokens": -5, "output_tokens": 4, "total_tokens": -1,
            "output_tokens_details": {"reasoning_tokens": 2}}})
        self.assertEqual(responses.tokens_used, {"completion_tokens": 4, "reasoning_tokens": 2})
        # Anthropic's prompt is a sum: a part below zero is not added to it.
        anthropic = DIALECTS["anthropic_messages"].from_body({"usage": {
            "input_tokens": 9, "cache_read_input_tokens": -1, "cache_creation_input_tokens": -2,
            "output_tokens": -1}})
        self.assertEqual(anthropic.tokens_used, {"prompt_tokens": 9})
        g = DIALECTS["gemini"]
        self.assertEqual(g.from_body({"usageMetadata": {
            "promptTokenCount": -1, "toolUsePromptTokenCount": 30, "candidatesTokenCount": 6,
            "thoughtsTokenCount": -1, "cachedContentTokenCount": -1}}).tokens_used,
            {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36})
        self.assertEqual(g.from_body({"usageMetadata": {
            "promptTokenCount": 4, "toolUsePromptTokenCount": -30}}).tokens_used, {"prompt_tokens": 4})
        self.assertIsNone(g.from_body({"usageMetadata": {"promptTokenCount": -1, "totalTokenCount": -1}}).tokens_used)

    def test_count_tokens_is_not_usage(self):
        res = DIALECTS["anthropic_count_tokens"].from_body({"input_tokens": 12})
        self.assertIsNone(res.tokens_used)
        self.assertEqual(res.response_body, {"input_tokens": 12})


class OpenAIChatEdgesTest(unittest.TestCase):
    chat = DIALECTS["openai_chat"]

    def chunk(self, choices, **kw):
        d = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}
        d.update(kw)
        return d

    def test_tool_calls_without_index(self):
        # Some compatible servers omit "index": match by id, else a new call (with an id).
        evs = events_of(
            self.chunk([{"index": 0, "delta": {"tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{\"x\""}}]}}]),
            self.chunk([{"index": 0, "delta": {"tool_calls": [
                {"id": "b", "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]),
            "[DONE]")
        calls = self.chat.reassemble(evs).response_body["choices"][0]["message"]["tool_calls"]
        self.assertEqual([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls],
                         [("a", "f", "{}"), ("b", "g", '{"x": 1}')])

    def test_tool_call_and_choice_index_as_a_string_is_the_same_index(self):
        # Some compatible servers send "index": "0": it was taken for no index, so each delta
        # without an id was a call of its own, and choice "1" went into choice 0.
        def tool(index, **call):
            call["index"] = index
            return self.chunk([{"index": 0, "delta": {"tool_calls": [call]}}])
        evs = events_of(
            tool("0", id="a", type="function", function={"name": "f", "arguments": ""}),
            tool("1", id="b", type="function", function={"name": "g", "arguments": "["}),
            tool(0, function={"arguments": "{\"x\":"}), tool("0", function={"arguments": " 1}"}),
            tool("01", function={"arguments": "]"}),
            self.chunk([{"index": "1", "delta": {"content": "second"}}]), "[DONE]")
        choices = self.chat.reassemble(evs).response_body["choices"]
        self.assertEqual([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in
                          choices[0]["message"]["tool_calls"]], [("a", "f", '{"x": 1}'), ("b", "g", "[]")])
        self.assertEqual([(c["index"], c["message"]["content"]) for c in choices], [(0, None), (1, "second")])
        # Anything else is no index (never an error, never a lost record).
        for odd in ("x", "-1", "\u0661", 1.5, [], {}, True):
            with self.subTest(index=odd):
                res = self.chat.reassemble(events_of(tool(odd, id="a", function={"name": "f", "arguments": "{}"}), "[DONE]"))
                self.assertEqual(res.response_body["choices"][0]["message"]["tool_calls"][0]["id"], "a")

    def test_tool_call_deltas_without_index_or_id_continue_the_last_call(self):
        # Gemini's OpenAI-compatible API sends a call's arguments in deltas with neither: each
        # was a new call with no id and no name.
        def tool(**call):
            return self.chunk([{"index": 0, "delta": {"tool_calls": [call]}}])
        evs = events_of(tool(id="a", type="function", function={"name": "f", "arguments": "{\"x\""}),
                        tool(function={"arguments": ": 1}"}),
                        tool(id="b", type="function", function={"name": "g", "arguments": "{"}),
                        tool(function={"arguments": "}"}), tool(extra_content={"google": {"thought_signature": "s"}}),
                        "[DONE]")
        calls = self.chat.reassemble(evs).response_body["choices"][0]["message"]["tool_calls"]
        self.assertEqual([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls],
                         [("a", "f", '{"x": 1}'), ("b", "g", "{}")])
        self.assertEqual(calls[1]["extra_content"], {"google": {"thought_signature": "s"}})

    def test_repeated_name_and_id_not_concatenated(self):
        evs = events_of(
            self.chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}}]),
            self.chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "}"}}]}}]))
        call = self.chat.reassemble(evs).response_body["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual(call, {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}})

    def test_obfuscation_is_not_copied(self):
        # OpenAI pads every chunk with a random "obfuscation" string: not part of the response.
        for name in ("openai_chat", "openai_completions"):
            evs = events_of(self.chunk([{"index": 0, "delta": {"content": "a"}, "text": "a"}], obfuscation="q8Zr"),
                            self.chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}], obfuscation="Ab"),
                            "[DONE]")
            body = DIALECTS[name].reassemble(evs).response_body
            self.assertNotIn("obfuscation", body, name)
            self.assertEqual(body["id"], "c1")

    def test_nothing_after_done(self):
        # The SDK stops reading at [DONE]: text, usage and errors after it never reached the client.
        for name in ("openai_chat", "openai_completions"):
            evs = events_of(self.chunk([{"index": 0, "delta": {"content": "Hi"}, "text": "Hi", "finish_reason": "stop"}]),
                            "[DONE]",
                            self.chunk([{"index": 0, "delta": {"content": " extra"}, "text": " extra"}]),
                            self.chunk([], usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
                            {"error": {"type": "server_error", "message": "late"}})
            res = DIALECTS[name].reassemble(evs)
            choice = res.response_body["choices"][0]
            self.assertEqual(choice["message"]["content"] if name == "openai_chat" else choice["text"], "Hi")
            self.assertNotIn("usage", res.response_body)
            self.assertIsNone(res.tokens_used)
            self.assertIsNone(res.error)
            self.assertTrue(res.complete)

    def test_name_pieces_concatenated_repeats_not(self):
        def call(**fn):
            return self.chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": fn}]}}])
        evs = events_of(call(name="get_", arguments=""), call(name="weather", arguments="{}"),
                        call(name="get_weather"), call(name="get_weather", arguments=""))
        fn = self.chat.reassemble(evs).response_body["choices"][0]["message"]["tool_calls"][0]["function"]
        self.assertEqual(fn, {"name": "get_weather", "arguments": "{}"})
        # Legacy function_call likewise.
        evs = events_of(self.chunk([{"index": 0, "delta": {"function_call": {"name": "look", "arguments": ""}}}]),
                        self.chunk([{"index": 0, "delta": {"function_call": {"name": "_up", "arguments": "{}"}}}]),
                        self.chunk([{"index": 0, "delta": {"function_call": {"name": "look_up"}}}]))
        msg = self.chat.reassemble(evs).response_body["choices"][0]["message"]
        self.assertEqual(msg["function_call"], {"name": "look_up", "arguments": "{}"})

    def test_later_empty_logprobs_list_keeps_null(self):
        evs = events_of(
            self.chunk([{"index": 0, "delta": {"refusal": "No"}, "logprobs": {"content": None, "refusal": [
                {"token": "No", "logprob": -0.1, "bytes": [78, 111], "top_logprobs": []}]}}]),
            self.chunk([{"index": 0, "delta": {"refusal": "."}, "logprobs": {"content": [], "refusal": [
                {"token": ".", "logprob": -0.2, "bytes": [46], "top_logprobs": []}]}, "finish_reason": "stop"}]))
        lp = self.chat.reassemble(evs).response_body["choices"][0]["logprobs"]
        self.assertIsNone(lp["content"])
        self.assertEqual([t["token"] for t in lp["refusal"]], ["No", "."])

    def test_choices_out_of_order_and_sparse(self):
        evs = events_of(self.chunk([{"index": 2, "delta": {"content": "c"}}]),
                        self.chunk([{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]))
        body = self.chat.reassemble(evs).response_body
        self.assertEqual([(c["index"], c["message"]["content"]) for c in body["choices"]], [(0, "a"), (2, "c")])

    def test_complete_rules(self):
        finished = self.chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        usage = self.chunk([], usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
        self.assertFalse(self.chat.reassemble(events_of(finished)).complete)
        self.assertTrue(self.chat.reassemble(events_of(finished, usage)).complete)
        self.assertTrue(self.chat.reassemble(events_of(finished, "[DONE]")).complete)
        self.assertTrue(self.chat.reassemble(events_of("[DONE]")).complete)
        self.assertIsNone(self.chat.reassemble(events_of("[DONE]")).response_body)

    def test_legacy_function_call_and_audio(self):
        evs = events_of(
            self.chunk([{"index": 0, "delta": {"role": "assistant", "function_call": {"name": "f", "arguments": ""}}}]),
            self.chunk([{"index": 0, "delta": {"function_call": {"arguments": "{\"a\":"}}}]),
            self.chunk([{"index": 0, "delta": {"function_call": {"arguments": "1}"},
                                               "audio": {"id": "audio_1", "transcript": "hi"}}}]),
            self.chunk([{"index": 0, "delta": {"audio": {"transcript": " there", "data": "AAA"}},
                         "finish_reason": "function_call"}]))
        msg = self.chat.reassemble(evs).response_body["choices"][0]["message"]
        self.assertEqual(msg["function_call"], {"name": "f", "arguments": '{"a":1}'})
        self.assertEqual(msg["audio"], {"id": "audio_1", "transcript": "hi there", "data": "AAA"})


class AnthropicEdgesTest(unittest.TestCase):
    d = DIALECTS["anthropic_messages"]

    def test_tool_input_rules(self):
        start = {"type": "message_start", "message": {"id": "m", "type": "message", "content": []}}
        evs = events_of(
            start,
            {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t",
                                                                          "name": "n", "input": {}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "u",
                                                                          "name": "n", "input": {}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "[1,"}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " 2]"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "v",
                                                                          "name": "n", "input": {"k": 1}}},
            {"type": "content_block_stop", "index": 2},
            {"type": "content_block_delta", "index": 7, "delta": {"type": "text_delta", "text": "orphan"}})
        content = self.d.reassemble(evs).response_body["content"]
        self.assertEqual([b["input"] for b in content], [{}, [1, 2], {"k": 1}])

    def test_prefilled_input_stays_when_nothing_streamed(self):
        # The SDK parses only a non-empty buffer: an empty (or no) partial_json keeps the start's input.
        start = {"type": "message_start", "message": {"id": "m", "type": "message", "content": []}}
        evs = events_of(
            start,
            {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t",
                                                                          "name": "n", "input": {"city": "Paris"}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "u",
                                                                          "name": "n", "input": {"k": 1}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " "}},
            {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "v",
                                                                          "name": "n"}},
            {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}})
        content = self.d.reassemble(evs).response_body["content"]
        self.assertEqual([b["input"] for b in content], [{"city": "Paris"}, {"k": 1}, {}])

    def test_message_delta_null_keeps_container(self):
        evs = events_of(
            {"type": "message_start", "message": {"id": "m", "type": "message", "content": [],
                                                  "stop_sequence": "X", "container": {"id": "c1"}}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                                "container": None, "future_field": None}},
            {"type": "message_stop"})
        body = self.d.reassemble(evs).response_body
        self.assertEqual(body["container"], {"id": "c1"})
        self.assertIsNone(body["stop_sequence"])  # stop_sequence is set as sent, null too
        self.assertEqual(body["stop_reason"], "end_turn")
        self.assertNotIn("future_field", body)

    def test_unknown_delta_type_keeps_text(self):
        evs = events_of(
            {"type": "message_start", "message": {"id": "m", "content": []}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "future", "body": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "body_delta", "body": "a"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "body_delta", "body": "b"}})
        self.assertEqual(self.d.reassemble(evs).response_body["content"], [{"type": "future", "body": "ab"}])

    def test_error_event_without_message(self):
        res = self.d.reassemble(events_of({"type": "error", "error": {"type": "api_error", "message": "boom"}},
                                          event="error"))
        self.assertEqual(res.error, {"type": "api_error", "message": "boom"})
        self.assertIsNone(res.response_body)
        self.assertFalse(res.complete)


class GeminiEdgesTest(unittest.TestCase):
    g = DIALECTS["gemini"]

    def parts(self, *chunks):
        evs = events_of(*[{"candidates": [{"content": {"role": "model", "parts": list(c)}}]} for c in chunks])
        return self.g.reassemble(evs).response_body["candidates"][0]["content"]["parts"]

    def test_merge_rules(self):
        got = self.parts([{"text": "a", "thought": True}], [{"text": "b", "thought": True}],
                         [{"text": "c"}], [{"text": "d", "thoughtSignature": "S1"}],
                         [{"text": "e", "thoughtSignature": "S2"}],
                         [{"functionCall": {"name": "f", "args": {}}}], [{"text": "g"}])
        self.assertEqual(got, [{"text": "ab", "thought": True}, {"text": "cd", "thoughtSignature": "S1"},
                               {"text": "e", "thoughtSignature": "S2"},
                               {"functionCall": {"name": "f", "args": {}}}, {"text": "g"}])

    def test_last_usage_counts(self):
        evs = events_of({"usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3}},
                        {"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 5, "totalTokenCount": 8}})
        self.assertEqual(self.g.reassemble(evs).tokens_used,
                         {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})


class ResponsesEdgesTest(unittest.TestCase):
    r = DIALECTS["openai_responses"]

    def test_nested_error_event(self):
        res = self.r.reassemble(events_of({"type": "error", "error": {"type": "invalid_request_error",
                                                                      "code": "bad", "message": "no"}}))
        self.assertEqual(res.error, {"type": "invalid_request_error", "message": "no"})

    def test_untyped_error_chunk(self):
        # LiteLLM answers a Responses stream that fails to start with HTTP 500 and an untyped
        # OpenAI error chunk, then [DONE]; the openai SDK raises on such a chunk.
        res = self.r.reassemble(events_of({"error": {"message": "Error processing stream start",
                                                     "type": "internal_server_error", "param": None,
                                                     "code": "500"}}, "[DONE]"))
        self.assertEqual(res.error, {"type": "internal_server_error", "message": "Error processing stream start"})
        self.assertIsNone(res.response_body)

    def test_events_before_items(self):
        evs = events_of({"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
                         "item_id": "msg_1", "delta": "hi"})
        res = self.r.reassemble(evs)
        self.assertEqual(res.response_body["output"],
                         [{"id": "msg_1", "content": [{"type": "output_text", "text": "hi"}]}])
        self.assertFalse(res.complete)


    def test_terminal_output_null_without_items_is_empty_list(self):
        # The openai SDK puts the items it saw where a failed/incomplete response's output is
        # null: [] when there were none.
        for etype in ("response.failed", "response.incomplete", "response.completed"):
            res = self.r.reassemble(events_of(
                {"type": "response.created", "response": {"id": "resp_1", "object": "response",
                                                          "status": "in_progress", "output": []}},
                {"type": etype, "response": {"id": "resp_1", "object": "response", "status": "failed",
                                             "output": None, "error": {"code": "server_error",
                                                                       "message": "boom"}}}))
            self.assertEqual(res.response_body["output"], [], etype)
            self.assertTrue(res.complete)

class ResponsesToolTextTest(unittest.TestCase):
    def test_custom_tool_input_and_code(self):
        evs = events_of(
            {"type": "response.output_item.added", "output_index": 0,
             "item": {"id": "ctc_1", "type": "custom_tool_call", "call_id": "c", "name": "exec", "input": ""}},
            {"type": "response.custom_tool_call_input.delta", "output_index": 0, "item_id": "ctc_1", "delta": "ls "},
            {"type": "response.custom_tool_call_input.delta", "output_index": 0, "item_id": "ctc_1", "delta": "-la"},
            {"type": "response.output_item.added", "output_index": 1,
             "item": {"id": "ci_1", "type": "code_interpreter_call", "code": ""}},
            {"type": "response.code_interpreter_call_code.delta", "output_index": 1, "item_id": "ci_1",
             "delta": "print(1)"},
            {"type": "response.mcp_call_arguments.delta", "item_id": "ci_1", "delta": "{}"})
        out = DIALECTS["openai_responses"].reassemble(evs).response_body["output"]
        self.assertEqual(out[0]["input"], "ls -la")
        self.assertEqual(out[1]["code"], "print(1)")
        self.assertEqual(out[1]["arguments"], "{}")  # found by item_id when output_index is absent


class SniffTest(unittest.TestCase):
    def test_unknown_content_type(self):
        for ctype in (None, "", "text/plain", "application/octet-stream"):
            evs, _ = decode_stream(ctype, [(0.0, b"\xef\xbb\xbfdata: 1\n\n")], 1024)
            self.assertEqual([e.data for _, e in evs], ["1"], ctype)
            evs, _ = decode_stream(ctype, [(0.0, b'  [{"a": 1},'), (1.0, b' {"b": 2}]')], 1024)
            self.assertEqual([e.data for _, e in evs], ['{"a": 1}', '{"b": 2}'], ctype)
            evs, _ = decode_stream(ctype, [(0.0, b'{"a": 1}\n{"b": 2}\n')], 1024)
            self.assertEqual([e.data for _, e in evs], ['{"a": 1}', '{"b": 2}'], ctype)
        # An explicit NDJSON type is not sniffed.
        evs, _ = decode_stream("application/x-ndjson", [(0.0, b"data: 1\n")], 1024)
        self.assertEqual([e.data for _, e in evs], ["data: 1"])

    def test_iterator_chunks(self):
        evs, _ = decode_stream("text/event-stream", iter([(0.0, b"data: 1\n\n")]), 1024)
        self.assertEqual(len(evs), 1)


class MutationFuzzTest(unittest.TestCase):
    """Damaged fixtures: never an internal failure, always JSON-serialisable, bounded."""

    def test_mutated_fixtures(self):
        rng = random.Random(424242)
        for name, path, _ in fixture_cases():
            ctype = content_type_of(path)
            with open(path, "rb") as f:
                data = f.read()
            dialect = DIALECTS[name]
            for _ in range(40):
                buf = bytearray(data)
                for _ in range(rng.randrange(1, 6)):
                    op = rng.randrange(4)
                    i = rng.randrange(len(buf) + 1)
                    j = min(len(buf), i + rng.randrange(1, 40))
                    if op == 0:
                        del buf[i:j]
                    elif op == 1:
                        buf[i:i] = buf[i:j]
                    elif op == 2 and i < len(buf):
                        buf[i] = rng.randrange(256)
                    else:
                        del buf[i:]
                mutated = bytes(buf)
                with self.subTest(fixture=os.path.relpath(path, FIXTURES)):
                    if ctype is None:
                        try:
                            body = json.loads(mutated.decode("utf-8", "replace"))
                        except ValueError:
                            body = mutated.decode("utf-8", "replace")
                        res = dialect.from_body(body)
                    else:
                        evs, _ = decode_stream(ctype, [(0.0, mutated)], rng.choice((256, 1 << 20)))
                        res = dialect.reassemble([e for _, e in evs])
                    self.assertIsInstance(res, Result)
                    if res.error is not None:
                        self.assertNotEqual(res.error["type"], REASSEMBLY_ERROR, res.error)
                    json.dumps(res.to_json())


# The SDKs' own stream accumulators, called directly (no HTTP), for differential tests of
# single edges; tests/test_dialects_sdk.py replays whole fixtures through the SDK clients.
try:
    from openai._models import construct_type as _oai_construct
    from openai._streaming import SSEDecoder as _OAIDecoder
    from openai.lib.streaming.chat._completions import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk
except Exception:  # pragma: no cover - optional (ImportError, or a moved private module)
    ChatCompletionStreamState = None
try:
    from anthropic._streaming import SSEDecoder as _AntDecoder
    from anthropic.lib.streaming._messages import accumulate_event as _ant_accumulate
except Exception:  # pragma: no cover - optional
    _ant_accumulate = None
try:
    from anthropic.lib.streaming._beta_messages import accumulate_event as _ant_beta_accumulate
except Exception:  # pragma: no cover - optional (or an SDK without these beta features)
    _ant_beta_accumulate = None


def sse_bytes(*payloads):
    """An SSE body: one ``data:`` event per payload (str payloads sent as is); typed payloads
    also get their ``event:`` line, as Anthropic sends them."""
    out = []
    for p in payloads:
        if isinstance(p, str):
            out.append("data: %s\n\n" % p)
        else:
            named = "event: %s\n" % p["type"] if isinstance(p.get("type"), str) else ""
            out.append("%sdata: %s\n\n" % (named, json.dumps(p)))
    return "".join(out).encode("utf-8")


def ours_of(dialect, raw):
    evs, _ = decode_stream("text/event-stream", [(0.0, raw)], 1 << 20)
    return DIALECTS[dialect].reassemble([e for _, e in evs])


def without_nulls(value):
    if isinstance(value, dict):
        return dict((k, without_nulls(v)) for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@unittest.skipUnless(ChatCompletionStreamState is not None, "openai SDK not installed")
class OpenAIChatSDKAccumulatorTest(unittest.TestCase):
    """Edges compared with the openai SDK's ChatCompletionStreamState, fed as openai.Stream
    feeds it (it stops at [DONE])."""

    maxDiff = None

    def chunk(self, delta, finish_reason=None, **kw):
        d = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        d.update(kw)
        return d

    def sdk(self, raw):
        state = ChatCompletionStreamState()
        for event in _OAIDecoder().iter_bytes(iter([raw])):
            if event.data.startswith("[DONE]"):
                break
            state.handle_chunk(_oai_construct(type_=ChatCompletionChunk, value=event.json()))
        out = state.get_final_completion().to_dict()
        for choice in out["choices"]:
            # The stream-only "index" of tool calls: a chat.completion has none, nor do we.
            for call in choice["message"].get("tool_calls") or ():
                call.pop("index", None)
            choice["message"].pop("parsed", None)
            for call in choice["message"].get("tool_calls") or ():
                call.get("function", {}).pop("parsed_arguments", None)
        return without_nulls(out)

    def assertSameAsSDK(self, *payloads):
        raw = sse_bytes(*payloads)
        mine = ours_of("openai_chat", raw).response_body
        self.assertEqual(without_nulls(mine), self.sdk(raw))
        return mine

    def test_obfuscation_dropped(self):
        body = self.assertSameAsSDK(self.chunk({"role": "assistant", "content": "Hi"}, obfuscation="q8Zr"),
                                    self.chunk({}, "stop", obfuscation="Ab"), "[DONE]")
        self.assertNotIn("obfuscation", body)

    def test_stops_at_done(self):
        body = self.assertSameAsSDK(self.chunk({"role": "assistant", "content": "Hi"}, "stop"), "[DONE]",
                                    self.chunk({"content": " extra"}),
                                    self.chunk({}, usage={"prompt_tokens": 1, "completion_tokens": 1,
                                                          "total_tokens": 2}))
        self.assertEqual(body["choices"][0]["message"]["content"], "Hi")

    def tool_chunk(self, **call):
        return self.chunk({"tool_calls": [dict(call, index=0)]})

    def test_tool_name_in_pieces(self):
        body = self.assertSameAsSDK(
            self.chunk({"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]}),
            self.tool_chunk(function={"name": "weather", "arguments": "{\"city\":"}),
            self.tool_chunk(function={"arguments": " \"Paris\"}"}), self.chunk({}, "tool_calls"), "[DONE]")
        self.assertEqual(body["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather")

    def test_later_empty_logprobs_list(self):
        tok = {"token": "No", "logprob": -0.1, "bytes": [78, 111], "top_logprobs": []}
        body = self.assertSameAsSDK(
            self.chunk({"role": "assistant", "refusal": "No"}, logprobs=None),
            dict(self.chunk({"refusal": "No"}), choices=[{"index": 0, "delta": {"refusal": "No"},
                                                         "logprobs": {"content": None, "refusal": [tok]},
                                                         "finish_reason": None}]),
            dict(self.chunk({}), choices=[{"index": 0, "delta": {}, "logprobs": {"content": [], "refusal": [tok]},
                                           "finish_reason": "stop"}]), "[DONE]")
        self.assertIsNone(body["choices"][0]["logprobs"]["content"])

    def test_tool_name_repeated_known_difference(self):
        # MiniMax through NVIDIA NIM and Fireworks repeat the whole name (and id) on every chunk:
        # the SDK doubles it ("get_weatherget_weather", naming no tool); we keep it once.
        raw = sse_bytes(
            self.chunk({"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
            self.tool_chunk(id="call_1", type="function", function={"name": "get_weather", "arguments": "{}"}),
            self.chunk({}, "tool_calls"), "[DONE]")
        mine = without_nulls(ours_of("openai_chat", raw).response_body)
        sdk = self.sdk(raw)
        sdk_call = sdk["choices"][0]["message"]["tool_calls"][0]
        self.assertEqual((sdk_call["id"], sdk_call["function"]["name"]), ("call_1call_1", "get_weatherget_weather"))
        sdk_call.update(id="call_1", function={"name": "get_weather", "arguments": "{}"})
        self.assertEqual(mine, sdk)


@unittest.skipUnless(_ant_accumulate is not None, "anthropic SDK not installed")
class AnthropicSDKAccumulatorTest(unittest.TestCase):
    """Edges compared with the anthropic SDK's accumulate_event, fed as its MessageStream feeds it."""

    maxDiff = None
    START = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}

    def sdk(self, raw, beta=False):
        snapshot, bufs = None, {}
        for event in _AntDecoder().iter_bytes(iter([raw])):
            if event.event in (None, "ping") or not event.data:
                continue
            if beta:
                snapshot = _ant_beta_accumulate(event=event.json(), current_snapshot=snapshot, request_headers={},
                                                json_bufs=bufs)
            else:
                snapshot = _ant_accumulate(event=event.json(), current_snapshot=snapshot, json_bufs=bufs)
        return without_nulls(snapshot.to_dict(mode="json"))

    @staticmethod
    def compaction_block(summary):
        """The events of a compaction block (beta) at index 0 holding ``summary``."""
        return ({"type": "content_block_start", "index": 0, "content_block": {"type": "compaction", "content": None}},
                {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "compaction_delta", "content": summary, "encrypted_content": "Eo0BCkYIBxgCKkB1"}},
                {"type": "content_block_stop", "index": 0})

    def assertSameAsSDK(self, *payloads, **kw):
        raw = sse_bytes(*payloads)
        mine = ours_of("anthropic_messages", raw).response_body
        self.assertEqual(without_nulls(mine), self.sdk(raw, kw.get("beta", False)))
        return mine

    def test_prefilled_tool_input_kept(self):
        body = self.assertSameAsSDK(
            self.START,
            {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_2", "name": "f", "input": {"city": "Rome"}}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                                  "partial_json": "{\"city\": \"Oslo\"}"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": {"output_tokens": 9}},
            {"type": "message_stop"})
        self.assertEqual([b["input"] for b in body["content"]], [{"city": "Paris"}, {"city": "Oslo"}])

    def test_null_container_does_not_erase(self):
        start = json.loads(json.dumps(self.START))
        start["message"]["container"] = {"id": "container_1", "expires_at": "2030-01-01T00:00:00Z"}
        text = ({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
                {"type": "content_block_stop", "index": 0})
        body = self.assertSameAsSDK(
            start, *text + ({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                                                 "container": None},
                              "usage": {"output_tokens": 3}}, {"type": "message_stop"}))
        self.assertEqual(body["container"]["id"], "container_1")
        # A container sent in the delta replaces the start's.
        body = self.assertSameAsSDK(
            start, *text + ({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                                                 "container": {"id": "container_2",
                                                                               "expires_at": "2030-01-02T00:00:00Z"}},
                              "usage": {"output_tokens": 3}}, {"type": "message_stop"}))
        self.assertEqual(body["container"]["id"], "container_2")

    @unittest.skipUnless(_ant_beta_accumulate is not None, "anthropic SDK without the beta accumulator")
    def test_beta_message_delta_fields_compaction_and_fallback(self):
        """The beta features' stream shapes, as the beta client accumulates them: the
        context_management and input_transformations a message_delta carries beside its delta go
        to the message (a null one leaves the start's); a compaction_delta sets its block's
        content and encrypted_content; a fallback block names the model that served the rest."""
        start = json.loads(json.dumps(self.START))
        start["message"]["input_transformations"] = []
        body = self.assertSameAsSDK(
            start,
            *self.compaction_block("Summary: the user asked for a haiku."),
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "fallback", "from": {"model": "claude-sonnet-4-5"}, "to": {"model": "claude-opus-4-1-20250805"},
                "trigger": {"type": "refusal"}}},
            {"type": "content_block_stop", "index": 1},
            {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Autumn moon"}},
            {"type": "content_block_stop", "index": 2},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "context_management": {"applied_edits": [{"type": "clear_tool_uses_20250919", "cleared_tool_uses": 2,
                                                       "cleared_input_tokens": 4100}]},
             "input_transformations": None, "usage": {"output_tokens": 12}},
            {"type": "message_stop"}, beta=True)
        self.assertEqual(body["content"][0]["content"], "Summary: the user asked for a haiku.")
        self.assertEqual(body["model"], "claude-opus-4-1-20250805")
        self.assertEqual(body["context_management"]["applied_edits"][0]["cleared_tool_uses"], 2)
        self.assertEqual(body["input_transformations"], [])

    @unittest.skipUnless(_ant_beta_accumulate is not None, "anthropic SDK without the beta accumulator")
    def test_compaction_iterations_are_counted(self):
        """Server-side compaction samples a summary first: its usage.iterations entry is billed
        but left out of the top-level counts (the SDK's BetaUsage.iterations), so tokens_used
        adds it; a message entry is in them already, and is not added again."""
        start = json.loads(json.dumps(self.START))
        start["message"]["usage"] = {"input_tokens": 23000, "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 0, "output_tokens": 1}
        iterations = [{"type": "compaction", "input_tokens": 180000, "output_tokens": 3500,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000},
                      {"type": "message", "input_tokens": 23000, "output_tokens": 1000,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}]
        payloads = (
            start,
            *self.compaction_block("Summary: a website was planned."),
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Based on our plan"}},
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": 1000, "iterations": iterations}},
            {"type": "message_stop"})
        body = self.assertSameAsSDK(*payloads, beta=True)
        self.assertEqual(body["usage"]["iterations"], iterations)
        tokens = ours_of("anthropic_messages", sse_bytes(*payloads)).tokens_used
        self.assertEqual(tokens, {"prompt_tokens": 23000 + 180000 + 2000, "completion_tokens": 1000 + 3500,
                                  "total_tokens": 205000 + 4500, "cached_tokens": 2000,
                                  "cache_creation_tokens": 0})
        # The same usage in a whole answer; entries that are not counts add nothing.
        usage = dict(start["message"]["usage"], output_tokens=1000, iterations=iterations + [
            {"type": "compaction", "input_tokens": -1, "output_tokens": "7"}, "junk", {"type": "advisor_message",
                                                                                     "input_tokens": 9}])
        self.assertEqual(anthropic_usage(usage), tokens)
        self.assertEqual(anthropic_usage({"iterations": [{"type": "compaction", "output_tokens": 5}]}),
                         {"completion_tokens": 5})


if __name__ == "__main__":
    unittest.main()
