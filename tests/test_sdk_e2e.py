"""The official SDKs as clients of the proxy: the client cannot tell the proxy is there, and the
record holds what the SDK received.

The proxy runs as a real subprocess (``python -m proxy_llm``) in front of
:class:`tests.sdk_replay.ReplayUpstream`, which answers each request with the golden fixture
named by its ``X-Fixture`` header. Every SDK call is made twice, once straight at the upstream
and once through the proxy, and the two outcomes must be equal: the SDK's objects
(``model_dump()``), the chunks of a stream, the exception raised, the response headers (but the
proxy's own ``X-Proxy-Record-Id`` and the framing headers), and the request the upstream saw.
Then the record named by ``X-Proxy-Record-Id`` is checked against what the SDK produced:
``response_body`` against the SDK's result (a non-streamed body must be the very JSON the SDK
parsed; a stream's reassembled body, parsed by the SDK's own model class, must match the SDK's
accumulated final message field by field), and ``tokens_used`` against the SDK's usage.

Fixtures are listed from disk at test time, one subTest each, so new ones are covered without
changes here. Which fixtures an SDK call is given:

* ``.json`` bodies: to the non-streamed call, whatever their status (an error body must raise
  the same exception through the proxy, and be recorded as received);
* ``.sse`` streams: to every streamed call, complete or not; the record is compared with the
  SDK's final result only when the SDK produced one. Streams the SDK rejects (cut, or carrying an
  in-band error) are still checked for parity and for the record's ``ended``/``error``;
* ``.stream.json`` and ``.ndjson`` streams are skipped: no SDK asks for these framings (the
  google-genai SDK always requests ``alt=sse``; OpenAI and Anthropic speak SSE only).

Each SDK's tests skip themselves when it is not importable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unittest
from typing import Any, Callable, Dict, List, Optional

from tests.sdk_replay import HEADER, Fixture, ReplayUpstream, fixtures
from tests.support import ProxyProcess, base_config, provider, read_records, wait_until

try:
    import openai
except ImportError:  # optional: these tests skip
    openai = None
try:
    import anthropic
except ImportError:
    anthropic = None
try:
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types
except ImportError:
    genai = genai_errors = genai_types = None

# Fast failures: no SDK retries, a short timeout (seconds), and a deadline for the upstream to
# have seen the request and for a record to reach the disk.
TIMEOUT = 10.0
DEADLINE = 10.0
RECORD_ID = "x-proxy-record-id"
# Response headers that may differ through the proxy: its own record id, and message framing
# (the proxy re-frames a body whose length it does not know as chunked).
FRAMING = frozenset((RECORD_ID, "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"))
# Request headers the upstream may see differently: the proxy sets Host itself and narrows
# Accept-Encoding to the codings its recorder can decode (gzip, deflate, identity).
REQUEST_DIFFERS = frozenset(("host", "accept-encoding", "connection"))
OTHER_FRAMINGS = ("stream.json", "ndjson")
USER = "Say hello."


def fixture_subset(dialect: str, streamed: bool) -> List[Fixture]:
    return [fx for fx in fixtures(dialect) if fx.streamed == streamed]


class Outcome:
    """What one SDK call produced, as the SDK's user sees it."""

    def __init__(self) -> None:
        self.headers: Dict[str, str] = {}
        self.chunks: List[Any] = []  # stream items (SDK objects), in order
        self.final: Any = None  # the SDK's result object (for streams: its accumulated message)
        self.body: Any = None  # the JSON the SDK parsed (non-streamed, from the raw response)
        self.error: Optional[Dict[str, Any]] = None
        self.exc: Optional[BaseException] = None

    @property
    def record_id(self) -> Optional[str]:
        return self.headers.get(RECORD_ID)

    def set_headers(self, headers: Any) -> None:
        self.headers = dict((k.lower(), v) for k, v in headers.items())

    def fail(self, exc: BaseException) -> None:
        self.exc = exc
        self.error = {"type": type(exc).__name__, "message": str(exc),
                      "status": getattr(exc, "status_code", None) or getattr(exc, "code", None),
                      "body": getattr(exc, "body", None)}
        response = getattr(exc, "response", None)
        if response is not None and getattr(response, "headers", None) is not None and not self.headers:
            self.set_headers(response.headers)

    def parity(self, dump: Callable[[Any], Any]) -> Dict[str, Any]:
        """The comparable view: everything but the proxy's own header and framing headers."""
        return {
            "headers": dict((k, v) for k, v in self.headers.items() if k not in FRAMING),
            "chunks": [dump(c) for c in self.chunks],
            "final": dump(self.final) if self.final is not None else None,
            "body": self.body,
            "error": self.error,
        }


def run(call: Callable[[Outcome], None]) -> Outcome:
    """Run one SDK call; an exception it raises is part of the outcome, not a test error."""
    out = Outcome()
    try:
        call(out)
    except Exception as exc:  # the SDK's error is the outcome under comparison
        out.fail(exc)
    return out


def dump_model(obj: Any) -> Any:
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


def openai_tokens(usage: Any) -> Optional[Dict[str, int]]:
    """tokens_used as the contract derives it from an OpenAI usage object (chat, completions,
    embeddings), computed from the SDK's view of the usage."""
    if usage is None:
        return None
    u = usage.model_dump(mode="json")
    want = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if u.get(key) is not None:
            want[key] = u[key]
    if "total_tokens" not in want and "prompt_tokens" in want and "completion_tokens" in want:
        want["total_tokens"] = want["prompt_tokens"] + want["completion_tokens"]
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = u.get("prompt_cache_hit_tokens")  # DeepSeek
    if cached is not None:
        want["cached_tokens"] = cached
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        want["reasoning_tokens"] = reasoning
    return want or None


def responses_tokens(usage: Any) -> Optional[Dict[str, int]]:
    if usage is None:
        return None
    u = usage.model_dump(mode="json")
    want = {}
    for src, dst in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens"),
                     ("total_tokens", "total_tokens")):
        if u.get(src) is not None:
            want[dst] = u[src]
    cached = (u.get("input_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        want["cached_tokens"] = cached
    reasoning = (u.get("output_tokens_details") or {}).get("reasoning_tokens")
    if reasoning is not None:
        want["reasoning_tokens"] = reasoning
    return want or None


def anthropic_tokens(usage: Any) -> Optional[Dict[str, int]]:
    if usage is None:
        return None
    u = usage.model_dump(mode="json")
    terms = [u.get(k) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    want = {}
    if any(t is not None for t in terms):
        want["prompt_tokens"] = sum(t for t in terms if t is not None)
    if u.get("output_tokens") is not None:
        want["completion_tokens"] = u["output_tokens"]
    if "prompt_tokens" in want or "completion_tokens" in want:
        want["total_tokens"] = want.get("prompt_tokens", 0) + want.get("completion_tokens", 0)
    if u.get("cache_read_input_tokens") is not None:
        want["cached_tokens"] = u["cache_read_input_tokens"]
    if u.get("cache_creation_input_tokens") is not None:
        want["cache_creation_tokens"] = u["cache_creation_input_tokens"]
    return want or None


def gemini_tokens(usage: Any) -> Optional[Dict[str, int]]:
    if usage is None:
        return None
    want = {}
    if usage.prompt_token_count is not None:
        want["prompt_tokens"] = usage.prompt_token_count
    parts = [usage.candidates_token_count, usage.thoughts_token_count]
    if any(p is not None for p in parts):
        want["completion_tokens"] = sum(p for p in parts if p is not None)
    if usage.total_token_count is not None:
        want["total_tokens"] = usage.total_token_count
    elif "prompt_tokens" in want and "completion_tokens" in want:
        want["total_tokens"] = want["prompt_tokens"] + want["completion_tokens"]
    if usage.cached_content_token_count is not None:
        want["cached_tokens"] = usage.cached_content_token_count
    if usage.thoughts_token_count is not None:
        want["reasoning_tokens"] = usage.thoughts_token_count
    return want or None


class ProxiedSDKCase(unittest.TestCase):
    """A replaying upstream and the proxy subprocess in front of it, shared by a class."""

    maxDiff = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="proxy_llm_sdk_")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.upstream = ReplayUpstream().start()
        cls.addClassCleanup(cls.upstream.stop)
        cls.data_dir = os.path.join(cls.tmp, "data")
        # No model globs: each request goes to the provider of its API family.
        providers = [provider(name, name, cls.upstream.url) for name in ("openai", "anthropic", "gemini")]
        cls.proxy = ProxyProcess(base_config(providers, cls.data_dir))
        cls.addClassCleanup(cls.proxy.cleanup)
        cls.addClassCleanup(cls.proxy.stop)

    def setUp(self) -> None:
        self.drain_requests()

    # -- the upstream's view ---------------------------------------------------------------

    def drain_requests(self) -> None:
        while not self.upstream.requests.empty():
            self.upstream.requests.get_nowait()

    def take_request(self):
        req = self.upstream.next_request(timeout=DEADLINE)
        self.assertTrue(self.upstream.requests.empty(), "the SDK sent more than one request (retries?)")
        return req

    def request_view(self, req) -> Dict[str, Any]:
        headers = sorted((k.lower(), v) for k, v in req.headers if k.lower() not in REQUEST_DIFFERS)
        return {"method": req.method, "target": req.target, "headers": headers, "body": req.body}

    # -- direct and proxied ----------------------------------------------------------------

    def both(self, call: Callable[[Any, Outcome], None], direct_client: Any, proxy_client: Any,
             dump: Callable[[Any], Any] = dump_model):
        """Make one call straight at the upstream and once through the proxy; check they agree.

        Returns the proxied outcome and its record (None when the proxy gave no record id).
        """
        direct = run(lambda out: call(direct_client, out))
        seen_direct = self.request_view(self.take_request())
        via = run(lambda out: call(proxy_client, out))
        seen_via = self.request_view(self.take_request())
        self.assertEqual(seen_via, seen_direct, "the upstream saw a different request through the proxy")
        self.assertIsNone(direct.record_id)
        self.assertEqual(via.parity(dump), direct.parity(dump), "the SDK saw a different outcome through the proxy")
        self.assertIsNotNone(via.record_id, "no X-Proxy-Record-Id header reached the SDK")
        return via, self.record(via.record_id)

    def record(self, record_id: str) -> Dict[str, Any]:
        found = {}

        def present() -> bool:
            for rec in read_records(self.data_dir):
                if rec["id"] == record_id:
                    found["rec"] = rec
                    return True
            return False

        wait_until(present, DEADLINE, "record %s" % record_id)
        return found["rec"]

    def check_record(self, fx: Fixture, rec: Dict[str, Any], provider_type: str, stream: bool) -> None:
        self.assertEqual(rec["provider_type"], provider_type)
        self.assertEqual(rec["dialect"], fx.dialect)
        self.assertIs(rec["stream"], stream)
        self.assertEqual(rec["request_headers"].get(HEADER.lower()), fx.id)

    def check_stream_ending(self, fx: Fixture, rec: Dict[str, Any], via: Outcome) -> None:
        """A stream's record ends as the fixture's expected result says.

        An SDK that raised mid-stream closed its connection: the proxy may have relayed the
        whole stream by then, or may see the client go away first.
        """
        self.assertEqual(rec["status_code"], 200)
        expected = fx.expected or {}
        want_ended = "completed" if expected.get("complete") else "upstream_eof"
        if via.error is not None and rec["ended"] == "client_aborted":
            return
        self.assertEqual(rec["ended"], want_ended)
        if expected.get("error") is not None:
            self.assertEqual(rec.get("error"), expected["error"])
        elif want_ended == "completed":
            self.assertNotIn("error", rec)

    def check_error_body(self, fx: Fixture, via: Outcome, rec: Dict[str, Any]) -> None:
        """A non-streamed error: the SDK raised, and the record holds the body it was given."""
        self.assertIsNotNone(via.error, "the SDK accepted an error body")
        received = via.exc.response.json()
        self.assertEqual(received, fx.body_json())
        self.assertEqual(rec["response_body"], received)
        self.assertEqual(rec["status_code"], via.exc.response.status_code)
        self.assertEqual(rec["ended"], "completed")
        self.assertIn("error", rec)
        self.assertNotIn("tokens_used", rec)

    def fixtures_for(self, dialect: str, streamed: bool) -> List[Fixture]:
        found = fixture_subset(dialect, streamed)
        self.assertTrue(found, "no %s fixtures for %s" % ("streamed" if streamed else "body", dialect))
        return found

    def skip_other_framing(self, fx: Fixture) -> bool:
        if fx.kind in OTHER_FRAMINGS:
            self.skipTest("%s: no SDK requests a %s stream" % (fx.id, fx.kind))
        return False


@unittest.skipUnless(openai is not None, "openai is not installed")
class OpenAISDKTest(ProxiedSDKCase):
    TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                                              "required": ["location"]}}}]
    RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                       "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                      "required": ["location"]}}]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.direct = cls.client(cls.upstream.url)
        cls.via = cls.client(cls.proxy.url)

    @classmethod
    def client(cls, url: str):
        c = openai.OpenAI(api_key="sk-test-e2e", base_url=url + "/v1", max_retries=0, timeout=TIMEOUT,
                          http_client=openai.DefaultHttpxClient(event_hooks={"response": [cls.hook]}))
        cls.addClassCleanup(c.close)
        return c

    seen: List[Any] = []

    @classmethod
    def hook(cls, response: Any) -> None:
        """Keep the last response (helpers like .stream() do not expose their headers)."""
        cls.seen[:] = [response]

    def helper_headers(self, out: Outcome) -> None:
        out.set_headers(self.seen[-1].headers)

    # -- chat completions --------------------------------------------------------------------

    def chat_kwargs(self, fx: Fixture) -> Dict[str, Any]:
        return dict(model="gpt-4o", messages=[{"role": "user", "content": USER}], tools=self.TOOLS,
                    extra_headers={HEADER: fx.id})

    def test_chat_completions_create(self):
        for fx in self.fixtures_for("openai_chat", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.chat.completions.with_raw_response.create(**self.chat_kwargs(fx))
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "openai", stream=False)
                if fx.expected and fx.expected.get("error") is not None and via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertIsNone(via.error)
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual(rec["response_body"], fx.body_json())
                parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                self.assertEqual(parsed.model_dump(mode="json"), via.final.model_dump(mode="json"))
                self.assertEqual(rec.get("tokens_used"), openai_tokens(via.final.usage))

    def test_chat_completions_create_stream(self):
        for fx in self.fixtures_for("openai_chat", streamed=True):
            with self.subTest(fixture=fx.id):
                self.skip_other_framing(fx)

                def call(client, out):
                    raw = client.chat.completions.with_raw_response.create(
                        stream=True, stream_options={"include_usage": True}, **self.chat_kwargs(fx))
                    out.set_headers(raw.headers)
                    for chunk in raw.parse():
                        out.chunks.append(chunk)

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "openai", stream=True)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                self.assertTrue(via.chunks)
                parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                self.assertEqual(chat_summary(parsed.model_dump(mode="json")), chat_summary_of_chunks(via.chunks))
                usage = [c.usage for c in via.chunks if c.usage is not None]
                self.assertEqual(rec.get("tokens_used"), openai_tokens(usage[-1] if usage else None))

    def test_chat_completions_stream_helper(self):
        for fx in self.fixtures_for("openai_chat", streamed=True):
            with self.subTest(fixture=fx.id):
                self.skip_other_framing(fx)

                def call(client, out):
                    with client.chat.completions.stream(stream_options={"include_usage": True},
                                                        **self.chat_kwargs(fx)) as stream:
                        self.helper_headers(out)
                        for event in stream:
                            out.chunks.append(event)
                        out.final = stream.get_final_completion()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "openai", stream=True)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                final = via.final
                parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                self.assertEqual(chat_summary(parsed.model_dump(mode="json")),
                                 chat_summary(final.model_dump(mode="json"), sdk_accumulated=True))
                self.assertEqual(rec.get("tokens_used"), openai_tokens(final.usage))


def chat_summary(body: Dict[str, Any], sdk_accumulated: bool = False) -> Dict[str, Any]:
    """The parts of a chat completion that matter, from its JSON form.

    ``sdk_accumulated``: the body is the openai stream helper's ``get_final_completion()``. That
    helper concatenates every string it finds in the deltas, ``role`` included, so a server that
    repeats ``"role": "assistant"`` in each delta (vLLM does) gives "assistantassistant...".
    That is an SDK quirk; the record keeps the role once, as the server meant it.
    """
    choices = {}
    for choice in body.get("choices") or []:
        msg = choice.get("message") or {}
        role = msg.get("role")
        if sdk_accumulated and isinstance(role, str):
            role = re.sub(r"^(assistant)+$", "assistant", role)
        choices[choice.get("index")] = {
            "role": role,
            "content": msg.get("content"),
            "refusal": msg.get("refusal"),
            "reasoning_content": msg.get("reasoning_content"),
            "tool_calls": [(t.get("id"), t.get("type"), (t.get("function") or {}).get("name"),
                            (t.get("function") or {}).get("arguments")) for t in msg.get("tool_calls") or []],
            "finish_reason": choice.get("finish_reason"),
            "logprobs": ((choice.get("logprobs") or {}).get("content") or None),
        }
    return {"id": body.get("id"), "model": body.get("model"), "created": body.get("created"),
            "system_fingerprint": body.get("system_fingerprint"), "choices": choices, "usage": body.get("usage")}


def chat_summary_of_chunks(chunks: List[Any]) -> Dict[str, Any]:
    """The same parts, accumulated from the SDK's stream chunks (concatenating deltas by index)."""
    choices: Dict[int, Dict[str, Any]] = {}
    head: Dict[str, Any] = {"id": None, "model": None, "created": None, "system_fingerprint": None, "usage": None}
    for chunk in chunks:
        c = chunk.model_dump(mode="json")
        for key in ("id", "model", "created", "system_fingerprint"):
            if c.get(key):
                head[key] = c[key]
        if c.get("usage") is not None:
            head["usage"] = c["usage"]
        for choice in c.get("choices") or []:
            acc = choices.setdefault(choice["index"], {"role": None, "content": None, "refusal": None,
                                                       "reasoning_content": None, "tool_calls": {},
                                                       "finish_reason": None, "logprobs": None})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            for key in ("content", "refusal", "reasoning_content"):
                if delta.get(key) is not None:
                    acc[key] = (acc[key] or "") + delta[key]
            for tc in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(tc.get("index"), [None, None, None, ""])
                fn = tc.get("function") or {}
                slot[0] = tc.get("id") or slot[0]
                slot[1] = tc.get("type") or slot[1]
                slot[2] = fn.get("name") or slot[2]
                slot[3] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]
            lp = (choice.get("logprobs") or {}).get("content")
            if lp:
                acc["logprobs"] = (acc["logprobs"] or []) + lp
    for acc in choices.values():
        acc["tool_calls"] = [tuple(v) for _, v in sorted(acc["tool_calls"].items())]
    head["choices"] = choices
    return head


if __name__ == "__main__":
    unittest.main()
