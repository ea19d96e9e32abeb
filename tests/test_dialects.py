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
from proxy_llm.sse import Event

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EXPECTED = ".expected.json"
CONTENT_TYPES = (
    (".stream.json", "application/json"),
    (".ndjson", "application/x-ndjson"),
    (".sse", "text/event-stream"),
)
SMALL = 3000  # fixtures up to this size are also tested at every single split point


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


def split_at(data, points):
    points = sorted(set(p for p in points if 0 < p < len(data)))
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


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
            if content_type_of(path) is None:
                continue
            with open(path, "rb") as f:
                data = f.read()
            want = run(name, path)
            with self.subTest(fixture=os.path.relpath(path, FIXTURES)):
                for _ in range(25):
                    k = rng.randrange(1, 12)
                    pieces = split_at(data, [rng.randrange(1, max(2, len(data))) for _ in range(k)])
                    self.assertEqual(run(name, path, pieces), want)
                # Byte by byte, and every single split point when small.
                self.assertEqual(run(name, path, [data[i:i + 1] for i in range(len(data))]), want)
                if len(data) <= SMALL:
                    for i in range(1, len(data)):
                        self.assertEqual(run(name, path, [data[:i], data[i:]]), want, i)


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
            (None, None, None, "generic"),
        ]
        for ptype, method, path, want in cases:
            self.assertEqual(select(ptype, method, path).name, want, path)

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


if __name__ == "__main__":
    unittest.main()
