"""The official SDKs as clients of the proxy: the client cannot tell the proxy is there, and the
record holds what the SDK received.

The proxy runs as a real subprocess (``python -m proxy_llm``) in front of
:class:`tests.sdk_replay.ReplayUpstream`, which answers each request with the golden fixture
named by its ``X-Fixture`` header. Every SDK call is made twice, once straight at the upstream
and once through the proxy, and the two outcomes must be equal: the SDK's objects
(``model_dump()``), the chunks of a stream, the exception raised, the response headers (but the
proxy's own ``X-Proxy-Record-Id`` and hop-by-hop headers), and the request the upstream saw.
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

import base64
import contextlib
import copy
import importlib
import io
import json
import os
import re
import shutil
import tempfile
import unittest
from typing import Any, Callable, Dict, List, Optional

from proxy_llm import export
from tests.sdk_replay import HEADER, Fixture, ReplayUpstream, find, fixtures, handle as replay, reply_for
from tests.support import (FIXTURES, ProxyProcess, ResumableUploads, all_files, base_config, json_reply, provider,
                           read_records, wait_until)
from tests.test_export import parse as export_args

from tests.sdks import anthropic, genai, genai_types, openai  # (None when not installed: tests skip)

# Fast failures: no SDK retries, a short timeout (seconds), and a deadline for the upstream to
# have seen the request and for a record to reach the disk.
TIMEOUT = 10.0
DEADLINE = 10.0
RECORD_ID = "x-proxy-record-id"
# Response headers that may differ through the proxy: its own record id and the hop-by-hop
# ones. Framing is compared: a body with a length keeps its Content-Length, a chunked stream
# stays chunked.
FRAMING = frozenset((RECORD_ID, "connection", "keep-alive"))
# Request headers the upstream may see differently: the proxy sets Host itself and narrows
# Accept-Encoding to the codings its recorder can decode (gzip, deflate, identity).
REQUEST_DIFFERS = frozenset(("host", "accept-encoding", "connection"))
OTHER_FRAMINGS = ("stream.json", "ndjson")
RESPONSES_TERMINAL = ("response.completed", "response.failed", "response.incomplete")
USER = "Say hello."


# The fixture folders (dialects) some SDK test below drives.
DRIVEN = frozenset(("openai_chat", "openai_completions", "openai_responses", "openai_embeddings", "generic",
                    "anthropic_messages", "anthropic_count_tokens", "gemini"))


def fixture_subset(dialect: str, streamed: bool) -> List[Fixture]:
    return [fx for fx in fixtures(dialect) if fx.streamed == streamed]


class CoverageTest(unittest.TestCase):
    def test_every_fixture_folder_is_driven_by_an_sdk(self):
        """A new dialect folder fails here until a test below drives it."""
        folders = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))
        self.assertTrue(DRIVEN & set(folders), folders)
        for folder in folders:
            with self.subTest(folder=folder):
                self.assertIn(folder, DRIVEN, "no SDK test drives tests/fixtures/%s" % folder)


class Outcome:
    """What one SDK call produced, as the SDK's user sees it."""

    def __init__(self) -> None:
        self.headers: Dict[str, str] = {}
        self.chunks: List[Any] = []  # stream items (SDK objects), in order
        self.final: Any = None  # the SDK's result object (for streams: its accumulated message)
        self.body: Any = None  # the JSON the SDK parsed (non-streamed, from the raw response)
        self.error: Optional[Dict[str, Any]] = None
        self.exc: Optional[BaseException] = None
        self.request: Optional[Dict[str, Any]] = None  # what the upstream received

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
        """The comparable view: everything but the proxy's own header and hop-by-hop headers."""
        return {
            "headers": dict((k, v) for k, v in self.headers.items() if k not in FRAMING),
            "chunks": [dump(c) for c in self.chunks],
            "final": dump(self.final) if self.final is not None else None,
            "body": self.body,
            "error": self.error,
        }


class ResponseLog:
    """An httpx ``response`` event hook: the last HTTP response an SDK client received. It gives
    the headers of calls whose result does not expose them (stream helpers, and calls where the
    SDK raised before returning anything)."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, response: Any) -> None:
        self.last = response

    def hooks(self) -> Dict[str, List[Any]]:
        return {"response": [self]}


def run(call: Callable[[Outcome], None], log: ResponseLog) -> Outcome:
    """Run one SDK call; an exception it raises is part of the outcome, not a test error."""
    out = Outcome()
    log.last = None
    try:
        call(out)
    except Exception as exc:  # the SDK's error is the outcome under comparison
        out.fail(exc)
        if not out.headers and log.last is not None:
            out.set_headers(log.last.headers)
    return out


def dump_model(obj: Any) -> Any:
    return obj.model_dump(mode="json", warnings=False) if hasattr(obj, "model_dump") else obj


def openai_tokens(usage: Any) -> Optional[Dict[str, int]]:
    """tokens_used as the contract derives it from an OpenAI usage object (chat, completions,
    embeddings), computed from the SDK's view of the usage."""
    if usage is None:
        return None
    u = usage.model_dump(mode="json", warnings=False)
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
    u = usage.model_dump(mode="json", warnings=False)
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
    u = usage if isinstance(usage, dict) else usage.model_dump(mode="json", warnings=False)
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
    prompt = [usage.prompt_token_count, usage.tool_use_prompt_token_count]
    if any(p is not None for p in prompt):
        want["prompt_tokens"] = sum(p for p in prompt if p is not None)
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


def chat_turns(messages: list) -> list:
    """An openai-chat row's messages as (role, content), or (role, its calls as (id, name,
    arguments)) for an assistant message with tool calls."""
    return [(m["role"], m.get("content") if "tool_calls" not in m else
             [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]])
            for m in messages]


class ProxiedSDKCase(unittest.TestCase):
    """A replaying upstream and the proxy subprocess in front of it, shared by a class."""

    maxDiff = None
    LOG_LEVEL = "INFO"  # (DEBUG logs a line per exchange)

    def export_session(self, session: str, fmt: str, name: str):
        """``export --dedupe`` of one session's records in ``fmt``: (its one row, the summary)."""
        out = os.path.join(self.tmp, "%s-%s.jsonl" % (name, fmt))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = export.run(export_args(["--data-dir", self.data_dir, "--out", out, "--format", fmt,
                                           "--session", session, "--dedupe"]))
        self.assertEqual(code, 0, err.getvalue())
        with open(out, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        self.assertEqual(len(rows), 1, err.getvalue())
        return rows[0], err.getvalue()

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.mkdtemp(prefix="proxy_llm_sdk_")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.upstream = ReplayUpstream().start()
        cls.addClassCleanup(cls.upstream.stop)
        cls.data_dir = os.path.join(cls.tmp, "data")
        # No model globs: each request goes to the provider of its API family (Azure OpenAI's
        # paths, /openai/..., to the azure provider).
        providers = [provider(name, name, cls.upstream.url) for name in ("openai", "anthropic", "gemini", "azure")]
        cls.proxy = ProxyProcess(base_config(providers, cls.data_dir, log_level=cls.LOG_LEVEL))
        cls.addClassCleanup(cls.proxy.cleanup)
        cls.addClassCleanup(cls.stop_proxy)
        cls.log = ResponseLog()

    @classmethod
    def stop_proxy(cls) -> None:
        """Stop the proxy; a failed exit or a logged error or traceback (say, a dialect that
        raised) fails the class."""
        code = cls.proxy.stop()
        log = cls.proxy.log_text()
        if code != 0 or "Traceback" in log or " ERROR " in log:
            raise AssertionError("proxy exited %s; log:\n%s" % (code, log[-4000:]))

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

        Returns the proxied outcome (with ``request``, what the upstream received) and the record
        its ``X-Proxy-Record-Id`` names.
        """
        direct = run(lambda out: call(direct_client, out), self.log)
        seen_direct = self.request_view(self.take_request())
        via = run(lambda out: call(proxy_client, out), self.log)
        seen_via = self.request_view(self.take_request())
        via.request = seen_via
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

    def check_record(self, fx: Fixture, rec: Dict[str, Any], provider_type: str, stream: bool, via: Outcome) -> None:
        """What every record must say, whatever the outcome: who, what, and the request as sent."""
        self.assertEqual(rec["provider_type"], provider_type)
        self.assertEqual(rec["dialect"], fx.dialect)
        self.assertIs(rec["stream"], stream)
        self.assertEqual(rec["method"], via.request["method"])
        self.assertEqual(rec["endpoint"], via.request["target"].split("?")[0])
        self.assertEqual(rec["request_headers"].get(HEADER.lower()), fx.id)
        body = via.request["body"]
        self.assertEqual(rec["request_body"], json.loads(body) if body else None)
        self.assertEqual(rec["request_bytes"], len(body))
        if body:
            model = json.loads(body).get("model")
            if model is not None:
                self.assertEqual(rec["model"], model)
        self.assertIsNone(rec.get("reassembly_error"))
        self.assertIsNone(rec.get("decode_error"))

    def check_stream_ending(self, fx: Fixture, rec: Dict[str, Any], via: Outcome) -> None:
        """A stream's record ends as the fixture's expected result says.

        An SDK that raised mid-stream closed its connection: the proxy may have relayed the
        whole stream by then, or may see the client go away first.
        """
        self.assertEqual(rec["status_code"], 200)
        expected = fx.expected or {}
        want_ended = ("completed" if expected.get("complete") else
                      "upstream_error" if expected.get("error") is not None else "upstream_eof")
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
        # Framings no SDK asks for (Gemini's JSON array without alt=sse, NDJSON) are covered by
        # the golden tests and the recorder tests, not here.
        found = [fx for fx in fixture_subset(dialect, streamed) if fx.kind not in OTHER_FRAMINGS]
        self.assertTrue(found, "no %s fixtures for %s" % ("streamed" if streamed else "body", dialect))
        return found


@unittest.skipUnless(openai is not None, "openai is not installed")
class OpenAISDKTest(ProxiedSDKCase):
    PROVIDER_TYPE = "openai"  # the provider the calls are routed to
    MODELS_PATH = "/v1/models"
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
                          http_client=openai.DefaultHttpxClient(event_hooks=cls.log.hooks()))
        cls.addClassCleanup(c.close)
        return c

    def helper_headers(self, out: Outcome) -> None:
        """The stream helpers do not expose the HTTP response; the event hook saw it."""
        out.set_headers(self.log.last.headers)

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
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=False, via=via)
                if fx.expected and fx.expected.get("error") is not None and via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertIsNone(via.error)
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual(rec["response_body"], fx.body_json())
                parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                self.assertEqual(parsed.model_dump(mode="json", warnings=False), via.final.model_dump(mode="json", warnings=False))
                self.assertEqual(rec.get("tokens_used"), openai_tokens(via.final.usage))

    def test_chat_completions_create_stream(self):
        for fx in self.fixtures_for("openai_chat", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    raw = client.chat.completions.with_raw_response.create(
                        stream=True, stream_options={"include_usage": True}, **self.chat_kwargs(fx))
                    out.set_headers(raw.headers)
                    for chunk in raw.parse():
                        out.chunks.append(chunk)

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                self.assertTrue(via.chunks)
                if fx.name in UNINDEXED_TOOL_CALLS:
                    # The SDK's chunks, summed by index as chat_summary_of_chunks sums them,
                    # are not the message these streams make (a call's index a string, or
                    # none): the record holds the fixture's expected reassembly.
                    self.assertEqual(rec["response_body"], fx.expected["response_body"])
                else:
                    parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                    self.assertEqual(chat_summary(parsed.model_dump(mode="json", warnings=False)),
                                     chat_summary_of_chunks(via.chunks))
                usage = [c.usage for c in via.chunks if c.usage is not None]
                self.assertEqual(rec.get("tokens_used"), openai_tokens(usage[-1] if usage else None))

    def test_chat_completions_stream_helper(self):
        for fx in self.fixtures_for("openai_chat", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    with client.chat.completions.stream(stream_options={"include_usage": True},
                                                        **self.chat_kwargs(fx)) as stream:
                        self.helper_headers(out)
                        for event in stream:
                            out.chunks.append(event)
                        out.final = stream.get_final_completion()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                final = via.final
                parsed = openai.types.chat.ChatCompletion.construct(**rec["response_body"])
                self.assertEqual(chat_summary(parsed.model_dump(mode="json", warnings=False)),
                                 chat_summary(final.model_dump(mode="json", warnings=False), sdk_accumulated=True))
                self.assertEqual(rec.get("tokens_used"), openai_tokens(final.usage))

    # -- responses ---------------------------------------------------------------------------

    def responses_kwargs(self, fx: Fixture) -> Dict[str, Any]:
        return dict(model="gpt-4o", input=USER, tools=self.RESPONSE_TOOLS, extra_headers={HEADER: fx.id})

    def test_responses_create(self):
        for fx in self.fixtures_for("openai_responses", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.responses.with_raw_response.create(**self.responses_kwargs(fx))
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=False, via=via)
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual(rec["response_body"], fx.body_json())
                parsed = openai.types.responses.Response.construct(**rec["response_body"])
                self.assertEqual(parsed.model_dump(mode="json", warnings=False), via.final.model_dump(mode="json", warnings=False))
                self.assertEqual(rec.get("tokens_used"), responses_tokens(via.final.usage))

    def test_responses_create_stream(self):
        for fx in self.fixtures_for("openai_responses", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    raw = client.responses.with_raw_response.create(stream=True, **self.responses_kwargs(fx))
                    out.set_headers(raw.headers)
                    for event in raw.parse():
                        out.chunks.append(event)

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                terminal = [e.response for e in via.chunks if e.type in RESPONSES_TERMINAL]
                if via.error is not None or not terminal:
                    continue
                # The SDK's view: the terminal event's response, with the output items of the
                # output_item.done events when the terminal response carries none.
                final = terminal[-1].model_dump(mode="json", warnings=False)
                if not final.get("output"):
                    done = [e for e in via.chunks if e.type == "response.output_item.done"]
                    final["output"] = [e.item.model_dump(mode="json", warnings=False) for e in sorted(done, key=lambda e: e.output_index)]
                parsed = openai.types.responses.Response.construct(**rec["response_body"])
                self.assertEqual(responses_summary(parsed.model_dump(mode="json", warnings=False)), responses_summary(final))
                self.assertEqual(rec.get("tokens_used"), responses_tokens(terminal[-1].usage))

    def test_responses_stream_helper(self):
        for fx in self.fixtures_for("openai_responses", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    with client.responses.stream(**self.responses_kwargs(fx)) as stream:
                        self.helper_headers(out)
                        for event in stream:
                            out.chunks.append(event)
                        out.final = stream.get_final_response()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                parsed = openai.types.responses.Response.construct(**rec["response_body"])
                self.assertEqual(responses_summary(parsed.model_dump(mode="json", warnings=False)),
                                 responses_summary(via.final.model_dump(mode="json", warnings=False)))
                self.assertEqual(rec.get("tokens_used"), responses_tokens(via.final.usage))

    # -- legacy completions, embeddings, models ----------------------------------------------

    def test_previous_response_id_chain_exports_as_one_conversation(self):
        # A conversation continued with previous_response_id, as the Agents SDK and many apps
        # chain it: a question answered by two calls (streamed), their results only (not
        # streamed), a new question (streamed). Each request holds only its new input; the
        # export rebuilt none of it (the second was skipped as no_user_turn, its results
        # dropped as orphans, the third an answer to "Thanks!" alone).
        session = "responses-chain-%s" % os.urandom(4).hex()
        calls, body, text = find("openai_responses/function_calls_parallel"), find("openai_responses/body_text"), \
            find("openai_responses/text")
        common = dict(model="gpt-4o", instructions="Be brief.", tools=self.RESPONSE_TOOLS)

        def headers(fx: Fixture) -> Dict[str, Any]:
            return dict(extra_headers={HEADER: fx.id, "X-Session-Id": session})

        with self.via.responses.stream(input=USER, **common, **headers(calls)) as stream:
            first = stream.get_final_response()
        self.take_request()
        results = [{"type": "function_call_output", "call_id": item.call_id, "output": "18C"}
                   for item in first.output if item.type == "function_call"]
        self.assertEqual(len(results), 2)
        second = self.via.responses.create(input=results, previous_response_id=first.id, **common, **headers(body))
        self.assertEqual(json.loads(self.take_request().body)["previous_response_id"], first.id)
        events = list(self.via.responses.create(input="Thanks!", previous_response_id=second.id, stream=True,
                                                **common, **headers(text)))
        self.take_request()
        third = [e.response for e in events if e.type == "response.completed"][0]
        wait_until(lambda: len([r for r in read_records(self.data_dir) if r["session_id"] == session]) == 3,
                   DEADLINE, "three records of the chain")
        call_turn = [("assistant", [(item.call_id, item.name, item.arguments) for item in first.output])]
        want = [("system", "Be brief."), ("user", USER)] + call_turn + [("tool", "18C"), ("tool", "18C"),
                ("assistant", second.output_text), ("user", "Thanks!"), ("assistant", third.output_text)]
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                row, summary = self.export_session(session, fmt, "chain")
                self.assertIn("2 superseded by --dedupe", summary)
                if fmt == "openai-chat":
                    self.assertEqual(chat_turns(row["messages"]), want)
                else:
                    self.assertEqual([t["from"] for t in row["conversations"]], [
                        "system", "human", "function_call", "observation", "gpt", "human", "gpt"])
                    self.assertEqual(row["conversations"][3]["value"], '["18C", "18C"]')

    def test_conversation_exports_as_one_conversation(self):
        # A conversation kept by the Conversations API: made with a developer item, a user item
        # added, then a question answered by two calls (streamed), their results only (not
        # streamed, the conversation as an object), a new question (streamed). Each request
        # holds only its new input; the export rebuilt none of it (the second was skipped as
        # no_user_turn, its results dropped as orphans, the third an answer to "Thanks!" alone,
        # and the conversation's own items were nowhere).
        session = "responses-conversation-%s" % os.urandom(4).hex()
        cid = "conv_%s" % os.urandom(12).hex()
        calls, body, text = find("openai_responses/function_calls_parallel"), find("openai_responses/body_text"), \
            find("openai_responses/text")

        def upstream(req):
            # The Conversations API's answers (the API reference: a conversation object; the
            # list of the items made, each with its id and status), and the Responses fixtures
            # with the conversation the response belongs to, as the API sends it.
            path = req.path.split("?")[0]  # (Azure OpenAI's: /openai/conversations?api-version=...)
            if req.method == "POST" and path.endswith("/conversations"):
                return json_reply({"id": cid, "object": "conversation", "created_at": 1764000000, "metadata": {}})
            if req.method == "POST" and path.endswith("/conversations/%s/items" % cid):
                made = [{"type": "message", "id": "msg_%s%d" % (cid[5:13], k), "status": "completed",
                         "role": item["role"], "content": [{"type": "input_text", "text": item["content"]}]}
                        for k, item in enumerate(json.loads(req.body)["items"])]
                return json_reply({"object": "list", "data": made, "first_id": made[0]["id"],
                                   "last_id": made[-1]["id"], "has_more": False})
            if "conversation" in json.loads(req.body or b"{}"):
                fx = copy.copy(find(req.header(HEADER)))
                tag = ('"conversation":{"id":"%s"},' % cid).encode("ascii")
                fx.data = fx.data.replace(b'"object":"response"', tag + b'"object":"response"').replace(
                    b'"object": "response"', tag + b'"object": "response"')
                return reply_for(fx)
            return replay(req)

        self.upstream.handler = upstream
        self.addCleanup(setattr, self.upstream, "handler", replay)
        common = dict(model="gpt-4o", instructions="Be brief.", tools=self.RESPONSE_TOOLS)
        where = dict(extra_headers={"X-Session-Id": session})

        def headers(fx: Fixture) -> Dict[str, Any]:
            return dict(extra_headers={HEADER: fx.id, "X-Session-Id": session})

        conversation = self.via.conversations.create(
            items=[{"type": "message", "role": "developer", "content": "You work for ACME."}], **where)
        self.assertEqual(conversation.id, cid)
        self.take_request()
        added = self.via.conversations.items.create(cid, items=[{"type": "message", "role": "user",
                                                                 "content": "Hello."}], **where)
        self.assertEqual([item.id for item in added.data], [added.first_id])
        self.take_request()
        with self.via.responses.stream(input=USER, conversation=cid, **common, **headers(calls)) as stream:
            first = stream.get_final_response()
        self.assertEqual(first.conversation.id, cid)
        self.take_request()
        results = [{"type": "function_call_output", "call_id": item.call_id, "output": "18C"}
                   for item in first.output if item.type == "function_call"]
        self.assertEqual(len(results), 2)
        second = self.via.responses.create(input=results, conversation={"id": cid}, **common, **headers(body))
        self.assertEqual(json.loads(self.take_request().body)["conversation"], {"id": cid})
        events = list(self.via.responses.create(input="Thanks!", conversation=cid, stream=True,
                                                **common, **headers(text)))
        self.take_request()
        third = [e.response for e in events if e.type == "response.completed"][0]
        wait_until(lambda: len([r for r in read_records(self.data_dir) if r["session_id"] == session]) == 5,
                   DEADLINE, "five records of the conversation")
        records = [r for r in read_records(self.data_dir) if r["session_id"] == session]
        self.assertEqual(sorted(r["endpoint"].rsplit("/conversations", 1)[1] for r in records
                                if r["dialect"] == "generic"), ["", "/%s/items" % cid])
        call_turn = [("assistant", [(item.call_id, item.name, item.arguments) for item in first.output])]
        want = [("system", "Be brief."), ("system", "You work for ACME."), ("user", "Hello."), ("user", USER)] + \
            call_turn + [("tool", "18C"), ("tool", "18C"), ("assistant", second.output_text), ("user", "Thanks!"),
                         ("assistant", third.output_text)]
        for fmt in ("openai-chat", "sharegpt"):
            with self.subTest(fmt):
                row, summary = self.export_session(session, fmt, "conversation")
                self.assertIn("2 superseded by --dedupe", summary)
                self.assertIn("2 skipped (not_chat 2)", summary)
                if fmt == "openai-chat":
                    self.assertEqual(chat_turns(row["messages"]), want)
                else:
                    self.assertEqual([(t["from"], t["value"]) for t in row["conversations"]][:2], [
                        ("system", "Be brief.\nYou work for ACME."), ("human", "Hello.\n" + USER)])
                    self.assertEqual([t["from"] for t in row["conversations"]], [
                        "system", "human", "function_call", "observation", "gpt", "human", "gpt"])

    def test_completions_create(self):
        for fx in self.fixtures_for("openai_completions", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.completions.with_raw_response.create(
                        model="gpt-3.5-turbo-instruct", prompt=USER, extra_headers={HEADER: fx.id})
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=False, via=via)
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertEqual(rec["response_body"], via.body)
                parsed = openai.types.Completion.construct(**rec["response_body"])
                self.assertEqual(parsed.model_dump(mode="json", warnings=False), via.final.model_dump(mode="json", warnings=False))
                self.assertEqual(rec.get("tokens_used"), openai_tokens(via.final.usage))

    def test_completions_create_stream(self):
        for fx in self.fixtures_for("openai_completions", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    raw = client.completions.with_raw_response.create(
                        model="gpt-3.5-turbo-instruct", prompt=USER, stream=True,
                        stream_options={"include_usage": True}, extra_headers={HEADER: fx.id})
                    out.set_headers(raw.headers)
                    for chunk in raw.parse():
                        out.chunks.append(chunk)

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                parsed = openai.types.Completion.construct(**rec["response_body"])
                self.assertEqual(completion_summary([parsed]), completion_summary(via.chunks))
                usage = [c.usage for c in via.chunks if c.usage is not None]
                self.assertEqual(rec.get("tokens_used"), openai_tokens(usage[-1] if usage else None))

    def test_embeddings_create(self):
        for fx in self.fixtures_for("openai_embeddings", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.embeddings.with_raw_response.create(
                        model="text-embedding-3-small", input=[USER, "Again."], encoding_format="float",
                        extra_headers={HEADER: fx.id})
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=False, via=via)
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertEqual(rec["response_body"], via.body)
                parsed = openai.types.CreateEmbeddingResponse.construct(**rec["response_body"])
                self.assertEqual(parsed.model_dump(mode="json", warnings=False), via.final.model_dump(mode="json", warnings=False))
                self.assertEqual([d.embedding for d in via.final.data], [d["embedding"] for d in rec["response_body"]["data"]])
                self.assertEqual(rec.get("tokens_used"), openai_tokens(via.final.usage))

    def test_models_list(self):
        for fx in self.fixtures_for("generic", streamed=False):
            with self.subTest(fixture=fx.id):
                if fx.name != "models_list":
                    self.skipTest("%s: not an OpenAI endpoint this test knows" % fx.id)

                def call(client, out):
                    raw = client.models.with_raw_response.list(extra_headers={HEADER: fx.id})
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.chunks = list(raw.parse())

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, self.PROVIDER_TYPE, stream=False, via=via)
                self.assertIsNone(via.error)
                self.assertEqual(rec["endpoint"], self.MODELS_PATH)
                self.assertEqual(rec["method"], "GET")
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual([m.model_dump(mode="json", warnings=False) for m in via.chunks],
                                 [openai.types.Model.construct(**m).model_dump(mode="json", warnings=False) for m in rec["response_body"]["data"]])
                self.assertNotIn("tokens_used", rec)



@unittest.skipUnless(openai is not None, "openai is not installed")
class AzureOpenAISDKTest(OpenAISDKTest):
    """Every call of :class:`OpenAISDKTest` made by the ``AzureOpenAI`` client (Azure's dated
    API versions): chat, completions and embeddings to ``/openai/deployments/<model>/...``,
    responses and models to ``/openai/...``, each with ``?api-version=`` and the key in
    ``api-key``; the proxy sends them to its azure provider, whose ``base_url`` is the
    resource's endpoint."""

    PROVIDER_TYPE = "azure"
    MODELS_PATH = "/openai/models"
    LOG_LEVEL = "DEBUG"  # a line per exchange, which must not hold the key
    API_VERSION = "2024-10-21"
    API_KEY = "0123456789abcdef0123456789abcdef"  # shaped as Azure's keys: 32 hex digits

    @classmethod
    def client(cls, url: str, **azure: Any):
        c = openai.AzureOpenAI(api_key=cls.API_KEY, azure_endpoint=url, api_version=cls.API_VERSION, max_retries=0,
                               timeout=TIMEOUT, http_client=openai.DefaultHttpxClient(event_hooks=cls.log.hooks()),
                               **azure)
        cls.addClassCleanup(c.close)
        return c

    def test_deployment_client_and_the_key(self):
        """A client bound to a deployment (``azure_deployment``) sends it in the path and the
        model the caller names in the body: the record's model is the body's, its endpoint names
        the deployment. The api-key reaches the upstream, and no record, stream line or log."""
        fx = next(f for f in self.fixtures_for("openai_chat", streamed=True) if f.name == "azure_content_filter")
        direct = self.client(self.upstream.url, azure_deployment="prod-4o")
        via_client = self.client(self.proxy.url, azure_deployment="prod-4o")

        def call(client, out):
            raw = client.chat.completions.with_raw_response.create(stream=True, **self.chat_kwargs(fx))
            out.set_headers(raw.headers)
            out.chunks.extend(raw.parse())

        via, rec = self.both(call, direct, via_client)
        self.assertEqual(via.request["target"],
                         "/openai/deployments/prod-4o/chat/completions?api-version=" + self.API_VERSION)
        self.assertEqual(dict(via.request["headers"])["api-key"], self.API_KEY)
        self.check_record(fx, rec, "azure", stream=True, via=via)
        self.check_stream_ending(fx, rec, via)
        self.assertEqual((rec["model"], rec["query"]), ("gpt-4o", "api-version=" + self.API_VERSION))
        self.assertEqual(rec["response_body"], fx.expected["response_body"])
        self.assertEqual(rec["tokens_used"], fx.expected["tokens_used"])
        for path in all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(self.API_KEY.encode(), f.read(), path)
        # (The exchange's log line, read from the proxy's stderr by a thread of the test.)
        wait_until(lambda: "/openai/deployments/prod-4o/chat/completions" in self.proxy.log_text(), DEADLINE,
                   "the exchange's log line")
        self.assertNotIn(self.API_KEY, self.proxy.log_text())


@unittest.skipUnless(anthropic is not None, "anthropic is not installed")
class AnthropicSDKTest(ProxiedSDKCase):
    MODEL = "claude-e2e-test"  # not a real model: the SDK warns about deprecated real ones
    TOOLS = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.direct = cls.client(cls.upstream.url)
        cls.via = cls.client(cls.proxy.url)

    @classmethod
    def client(cls, url: str):
        c = anthropic.Anthropic(api_key="sk-ant-test-e2e", base_url=url, max_retries=0, timeout=TIMEOUT,
                                http_client=anthropic.DefaultHttpxClient(event_hooks=cls.log.hooks()))
        cls.addClassCleanup(c.close)
        return c

    def kwargs(self, fx: Fixture) -> Dict[str, Any]:
        return dict(model=self.MODEL, max_tokens=2048, messages=[{"role": "user", "content": USER}],
                    tools=self.TOOLS, thinking={"type": "enabled", "budget_tokens": 1024},
                    extra_headers={HEADER: fx.id})

    @staticmethod
    def messages(client, fx: Fixture):
        """The client's messages API for this fixture: a ``beta_`` fixture holds what only a beta
        feature sends (``context_management``, ...), which the beta client reads."""
        return client.beta.messages if fx.name.startswith("beta_") else client.messages

    def parse_record(self, rec: Dict[str, Any], fx: Optional[Fixture] = None) -> Dict[str, Any]:
        model = anthropic.types.beta.BetaMessage if fx is not None and fx.name.startswith("beta_") else anthropic.types.Message
        return model.construct(**rec["response_body"]).model_dump(mode="json", warnings=False)

    def test_messages_create(self):
        for fx in self.fixtures_for("anthropic_messages", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.messages.with_raw_response.create(**self.kwargs(fx))
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "anthropic", stream=False, via=via)
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    self.assertEqual(rec["error"]["message"], fx.body_json()["error"]["message"])
                    continue
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual(rec["response_body"], fx.body_json())
                self.assertEqual(self.parse_record(rec), via.final.model_dump(mode="json", warnings=False))
                self.assertEqual(rec.get("tokens_used"), anthropic_tokens(via.final.usage))

    def test_messages_create_stream(self):
        for fx in self.fixtures_for("anthropic_messages", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    raw = self.messages(client, fx).with_raw_response.create(stream=True, **self.kwargs(fx))
                    out.set_headers(raw.headers)
                    for event in raw.parse():
                        out.chunks.append(event)

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "anthropic", stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    self.check_stream_error(fx, via, rec)
                    continue
                message = anthropic_message_of_events(via.chunks)
                self.assertEqual(anthropic_summary(self.parse_record(rec, fx)), anthropic_summary(message))
                self.assertEqual(rec.get("tokens_used"), anthropic_tokens(message["usage"]))

    def test_messages_stream_helper(self):
        for fx in self.fixtures_for("anthropic_messages", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    with self.messages(client, fx).stream(**self.kwargs(fx)) as stream:
                        out.set_headers(stream.response.headers)
                        for event in stream:
                            out.chunks.append(event)
                        out.final = stream.get_final_message()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "anthropic", stream=True, via=via)
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    self.check_stream_error(fx, via, rec)
                    continue
                final = via.final.model_dump(mode="json", warnings=False)
                self.assertEqual(anthropic_summary(self.parse_record(rec, fx), partial_parse=True), anthropic_summary(final))
                self.assertEqual(rec.get("tokens_used"), anthropic_tokens(via.final.usage))

    def test_unterminated_last_event(self):
        """A stream cut inside its last event: the SDK never sees that event (SSE drops an event
        without its closing blank line), and neither does the record's reassembled body; the
        streams file keeps it, marked ``unterminated``."""
        cut = [fx for fx in fixtures("anthropic_messages") if fx.unterminated]
        if not cut:
            self.skipTest("no anthropic_messages fixture ends inside an event")
        for fx in cut:
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.messages.with_raw_response.create(stream=True, **self.kwargs(fx))
                    out.set_headers(raw.headers)
                    for event in raw.parse():
                        out.chunks.append(event)

                via, rec = self.both(call, self.direct, self.via)
                self.assertIsNone(via.error)
                message = anthropic_message_of_events(via.chunks)
                self.assertEqual(anthropic_summary(self.parse_record(rec)), anthropic_summary(message))

    def check_stream_error(self, fx: Fixture, via: Outcome, rec: Dict[str, Any]) -> None:
        """An in-band ``error`` event: the SDK raised it, and the record carries the same error."""
        self.assertIsInstance(via.exc, anthropic.APIError)
        body = via.error["body"]
        self.assertIsInstance(body, dict, via.error)
        self.assertEqual(rec.get("error"), {"type": body["error"]["type"], "message": body["error"]["message"]})

    def test_count_tokens(self):
        for fx in self.fixtures_for("anthropic_count_tokens", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    raw = client.messages.with_raw_response.count_tokens(
                        model=self.MODEL, messages=[{"role": "user", "content": USER}], tools=self.TOOLS,
                        extra_headers={HEADER: fx.id})
                    out.set_headers(raw.headers)
                    out.body = json.loads(raw.http_response.text)
                    out.final = raw.parse()

                via, rec = self.both(call, self.direct, self.via)
                self.check_record(fx, rec, "anthropic", stream=False, via=via)
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    continue
                self.assertEqual(rec["endpoint"], "/v1/messages/count_tokens")
                self.assertEqual(rec["response_body"], via.body)
                self.assertEqual(rec["response_body"]["input_tokens"], via.final.input_tokens)
                self.assertNotIn("tokens_used", rec)  # counting tokens consumes none


@unittest.skipUnless(genai is not None, "google-genai is not installed")
class GeminiSDKTest(ProxiedSDKCase):
    MODEL = "gemini-2.5-flash"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.direct = cls.client(cls.upstream.url)
        cls.via = cls.client(cls.proxy.url)
        # The Files API's uploads carry no X-Fixture (the SDK sends the chunks with its upload
        # headers only): the upstream answers them as Google's resumable protocol does.
        cls.uploads = ResumableUploads()
        cls.upstream.handler = lambda req: cls.uploads(req) if req.path.startswith("/upload/") else replay(req)

    @classmethod
    def client(cls, url: str, api_version: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        options = genai_types.HttpOptions(base_url=url, timeout=int(TIMEOUT * 1000), api_version=api_version,
                                          retry_options=genai_types.HttpRetryOptions(attempts=1),
                                          client_args={"event_hooks": cls.log.hooks()}, headers=headers)
        c = genai.Client(api_key="gemini-test-e2e", http_options=options)
        cls.addClassCleanup(c.close)
        return c

    def config(self, fx: Fixture):
        return genai_types.GenerateContentConfig(
            http_options=genai_types.HttpOptions(headers={HEADER: fx.id}),
            thinking_config=genai_types.ThinkingConfig(include_thoughts=True),
            tools=[genai_types.Tool(function_declarations=[genai_types.FunctionDeclaration(
                name="get_weather", description="Weather in a city",
                parameters=genai_types.Schema(type="OBJECT", properties={"location": genai_types.Schema(type="STRING")}))])])

    def parse_record(self, rec: Dict[str, Any]):
        """The record's body as the SDK parses a response (camelCase aliases, base64 bytes)."""
        return genai_types.GenerateContentResponse.model_validate_json(json.dumps(rec["response_body"]))

    def test_generate_content(self):
        for fx in self.fixtures_for("gemini", streamed=False):
            with self.subTest(fixture=fx.id):
                def call(client, out):
                    result = client.models.generate_content(model=self.MODEL, contents=USER, config=self.config(fx))
                    out.set_headers(result.sdk_http_response.headers)
                    out.final = result

                via, rec = self.both(call, self.direct, self.via, dump=gemini_dump)
                self.check_record(fx, rec, "gemini", stream=False, via=via)
                self.assertEqual(rec["model"], self.MODEL)
                self.assertRegex(rec["endpoint"], r"^/v1(beta)?/models/%s:generateContent$" % re.escape(self.MODEL))
                self.assertEqual(rec["endpoint"], via.request["target"])
                if via.error is not None:
                    self.check_error_body(fx, via, rec)
                    self.assertEqual(rec["response_body"], via.exc.details)
                    continue
                self.assertEqual(rec["response_body"], fx.body_json())
                self.assertEqual(gemini_dump(self.parse_record(rec)), gemini_dump(via.final))
                self.assertEqual(rec.get("tokens_used"), gemini_tokens(via.final.usage_metadata))

    def test_generate_content_stream(self):
        for fx in self.fixtures_for("gemini", streamed=True):
            with self.subTest(fixture=fx.id):

                def call(client, out):
                    for chunk in client.models.generate_content_stream(model=self.MODEL, contents=USER,
                                                                       config=self.config(fx)):
                        if not out.headers:
                            out.set_headers(chunk.sdk_http_response.headers)
                        out.chunks.append(chunk)

                via, rec = self.both(call, self.direct, self.via, dump=gemini_dump)
                self.check_record(fx, rec, "gemini", stream=True, via=via)
                self.assertEqual(rec["model"], self.MODEL)
                self.assertRegex(rec["endpoint"], r"^/v1(beta)?/models/%s:streamGenerateContent$" % re.escape(self.MODEL))
                self.assertEqual(rec["endpoint"] + "?" + rec["query"], via.request["target"])
                self.assertEqual(rec["query"], "alt=sse")
                self.check_stream_ending(fx, rec, via)
                if via.error is not None:
                    continue
                self.assertTrue(via.chunks)
                self.assertEqual(gemini_summary([self.parse_record(rec)]), gemini_summary(via.chunks))
                self.assertEqual(rec.get("tokens_used"), gemini_tokens(via.chunks[-1].usage_metadata))

    def test_v1alpha(self):
        # http_options api_version="v1alpha": v1beta's wire format under /v1alpha/, which was the
        # proxy's own 404 ("unknown path") before.
        direct, via_client = self.client(self.upstream.url, "v1alpha"), self.client(self.proxy.url, "v1alpha")
        fx = find("gemini/body_cached")

        def call(client, out):
            result = client.models.generate_content(model=self.MODEL, contents=USER, config=self.config(fx))
            out.set_headers(result.sdk_http_response.headers)
            out.final = result

        via, rec = self.both(call, direct, via_client, dump=gemini_dump)
        self.assertIsNone(via.error)
        self.check_record(fx, rec, "gemini", stream=False, via=via)
        self.assertEqual(rec["endpoint"], "/v1alpha/models/%s:generateContent" % self.MODEL)
        self.assertEqual(gemini_dump(self.parse_record(rec)), gemini_dump(via.final))
        fx = find("gemini/sse_text")

        def stream(client, out):
            for chunk in client.models.generate_content_stream(model=self.MODEL, contents=USER, config=self.config(fx)):
                out.chunks.append(chunk)
            out.set_headers(self.log.last.headers)

        via, rec = self.both(stream, direct, via_client, dump=gemini_dump)
        self.assertIsNone(via.error)
        self.check_record(fx, rec, "gemini", stream=True, via=via)
        self.assertEqual(rec["endpoint"], "/v1alpha/models/%s:streamGenerateContent" % self.MODEL)
        self.assertEqual(gemini_summary([self.parse_record(rec)]), gemini_summary(via.chunks))

    def test_chat_stream_history_exports_as_one_conversation(self):
        # google-genai's chat keeps a streamed answer in its history as a model content per
        # chunk, and sends it so with the next message: the export reads those contents as one
        # turn, the answer the turn's own record holds, so --dedupe keeps one conversation.
        fx = find("gemini/sse_text")
        session = "gemini-chat-%s" % os.urandom(4).hex()
        chat = self.via.chats.create(model=self.MODEL, config=genai_types.GenerateContentConfig(
            http_options=genai_types.HttpOptions(headers={HEADER: fx.id, "X-Session-Id": session})))
        questions = ("Why is the sky blue?", "And the sea?")
        answers = []
        for question in questions:
            answers.append("".join(chunk.text or "" for chunk in chat.send_message_stream(question)))
            last = json.loads(self.take_request().body)
        self.assertGreater(len(last["contents"]), 3, "the SDK's history no longer holds a content per chunk")
        self.assertTrue(all(answers))
        wait_until(lambda: len([r for r in read_records(self.data_dir) if r["session_id"] == session]) == 2,
                   DEADLINE, "two records of the chat")
        want = [("user", questions[0]), ("assistant", answers[0]), ("user", questions[1]), ("assistant", answers[1])]
        for fmt, key, role, text in (("openai-chat", "messages", "role", "content"),
                                     ("sharegpt", "conversations", "from", "value")):
            with self.subTest(fmt):
                row, summary = self.export_session(session, fmt, "chat")
                got = [(m[role], m[text]) for m in row[key]]
                if fmt == "sharegpt":
                    got = [("user" if who == "human" else "assistant", said) for who, said in got]
                self.assertEqual(got, want)

    def test_files_upload(self):
        # client.files.upload: the start (POST /upload/v1/files), then the file in chunks to the
        # X-Goog-Upload-URL the start answered with. With the client's base_url alone (no
        # http_options of the upload's own) the SDK sends the chunks to that URL as given: the
        # proxy gives it its own origin, so that they go through it (they went to the provider
        # directly before, unrecorded).
        chunk = getattr(importlib.import_module("google.genai._api_client"), "CHUNK_SIZE", 8 * 1024 * 1024)
        data = os.urandom(chunk + 1000)  # two chunks: "upload", then "upload, finalize"
        made = {}
        for name, client, url in (("direct", self.direct, self.upstream.url), ("via", self.via, self.proxy.url)):
            self.drain_requests()
            made[name] = client.files.upload(file=io.BytesIO(data), config=genai_types.UploadFileConfig(
                mime_type="application/octet-stream", display_name="blob"))
            # The SDK's last request, the finalize, went to the base_url's origin.
            self.assertEqual(str(self.log.last.request.url).split("/upload/")[0], url)
            seen = [self.upstream.requests.get_nowait() for _ in range(3)]
            self.assertTrue(self.upstream.requests.empty())
            self.assertEqual([r.header("X-Goog-Upload-Command") for r in seen], ["start", "upload", "upload, finalize"])
            self.assertEqual(self.uploads.files[made[name].name], data)
            self.assertEqual(b"".join(r.body for r in seen[1:]), data)
        # The SDK's File is the same either way, but for the name the upstream gave each upload.
        direct, via = (gemini_dump(made[k]) for k in ("direct", "via"))
        for value in (direct, via):
            value.pop("name")
            value.pop("uri")
        self.assertEqual(via, direct)
        self.assertEqual(made["via"].size_bytes, len(data))
        # Three records, one per exchange: the start, and each chunk in base64.
        recs: List[Dict[str, Any]] = []

        def written() -> bool:
            recs[:] = [r for r in read_records(self.data_dir) if r["endpoint"] == "/upload/v1/files"]
            return len(recs) >= 3

        wait_until(written, DEADLINE, "the upload's records")
        start, first, last = recs
        # Every chunk through the proxy: the finalize's answer carried the last record's id.
        self.assertEqual(self.log.last.headers.get("x-proxy-record-id"), last["id"])
        self.assertEqual(start["response_headers"]["x-goog-upload-url"].split("/upload/")[0], self.upstream.url)
        self.assertEqual([r["endpoint"] for r in recs], ["/upload/v1/files"] * 3)
        self.assertEqual([(r["provider_type"], r["status_code"], r["ended"]) for r in recs], [("gemini", 200, "completed")] * 3)
        self.assertEqual(start["request_body"]["file"]["display_name"], "blob")
        self.assertEqual(start["response_headers"]["x-goog-upload-status"], "active")
        self.assertIn("upload_id=", first["query"])
        self.assertEqual(base64.b64decode(first["request_body"]) + base64.b64decode(last["request_body"]), data)
        self.assertEqual(last["body_encoding"], {"request": "base64"})
        self.assertEqual(last["response_body"]["file"]["name"], made["via"].name)
        self.assertNotIn("gemini-test-e2e", json.dumps(recs))

    def test_files_upload_in_a_session(self):
        # A client whose http_options name a session (X-Session-Id): the SDK sends that header
        # with the start, not with the chunks (it sends them with its upload headers only), whose
        # records were in the session "default" for that. Each now joins its upload's start's.
        # (Under v1beta: test_files_upload's records are the proxy's /upload/v1/ ones.)
        client = self.client(self.proxy.url, "v1beta", headers={"X-Session-Id": "sdk-upload-run"})
        chunk = getattr(importlib.import_module("google.genai._api_client"), "CHUNK_SIZE", 8 * 1024 * 1024)
        data = os.urandom(chunk + 1000)
        self.drain_requests()
        made = client.files.upload(file=io.BytesIO(data), config=genai_types.UploadFileConfig(
            mime_type="application/octet-stream", display_name="in-a-session"))
        seen = [self.upstream.requests.get_nowait() for _ in range(3)]
        self.assertEqual([r.header("X-Session-Id") for r in seen], ["sdk-upload-run", None, None])
        self.assertEqual(self.uploads.files[made.name], data)
        finalize = self.log.last.headers.get("x-proxy-record-id")
        recs: List[Dict[str, Any]] = []

        def written() -> bool:
            recs[:] = [r for r in read_records(self.data_dir) if r["id"] == finalize]
            return bool(recs)

        wait_until(written, DEADLINE, "the finalize's record")
        self.assertEqual(recs[0]["response_body"]["file"]["name"], made.name)
        upload_id = recs[0]["query"]

        def session_records() -> bool:
            recs[:] = [r for r in read_records(self.data_dir) if r["session_id"] == "sdk-upload-run"]
            return len(recs) >= 3

        wait_until(session_records, DEADLINE, "the upload's records in its session")
        self.assertEqual([(r["endpoint"], r["session_source"]) for r in recs], [("/upload/v1beta/files", "header")] * 3)
        self.assertEqual(recs[0]["request_headers"]["x-session-id"], "sdk-upload-run")
        self.assertEqual([r["query"] for r in recs[1:]], [upload_id] * 2)
        self.assertEqual([r["request_headers"].get("x-session-id") for r in recs[1:]], [None, None])
        self.assertEqual(base64.b64decode(recs[1]["request_body"]) + base64.b64decode(recs[2]["request_body"]), data)


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


# Streams whose tool call deltas carry an index as a string ("0") or none (Gemini's
# OpenAI-compatible API): the SDK's stream helper fails on them (test_dialects_sdk), and a sum
# of the chunks by index is not their message.
UNINDEXED_TOOL_CALLS = frozenset(("tool_calls_string_index", "tool_calls_no_index"))


def chat_summary_of_chunks(chunks: List[Any]) -> Dict[str, Any]:
    """The same parts, accumulated from the SDK's stream chunks (concatenating deltas by index)."""
    choices: Dict[int, Dict[str, Any]] = {}
    head: Dict[str, Any] = {"id": None, "model": None, "created": None, "system_fingerprint": None, "usage": None}
    for chunk in chunks:
        c = chunk.model_dump(mode="json", warnings=False)
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


def responses_summary(body: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a Responses object that matter: its output items, status and usage."""
    items = []
    for item in body.get("output") or []:
        kind = item.get("type")
        entry = {"type": kind, "id": item.get("id"), "status": item.get("status")}
        if kind == "message":
            entry["role"] = item.get("role")
            entry["content"] = [(c.get("type"), c.get("text"), c.get("refusal"), c.get("annotations"))
                                for c in item.get("content") or []]
        elif kind == "function_call":
            entry["call"] = (item.get("call_id"), item.get("name"), item.get("arguments"))
        elif kind == "reasoning":
            entry["summary"] = [(s.get("type"), s.get("text")) for s in item.get("summary") or []]
            entry["content"] = item.get("content")
            entry["encrypted_content"] = item.get("encrypted_content")
        else:
            entry["item"] = item
        items.append(entry)
    return {"id": body.get("id"), "model": body.get("model"), "status": body.get("status"),
            "error": body.get("error"), "incomplete_details": body.get("incomplete_details"),
            "output": items, "usage": body.get("usage")}


def completion_summary(completions: List[Any]) -> Dict[str, Any]:
    """Text and finish reason per choice index, concatenated over (chunk) completions."""
    choices: Dict[int, Dict[str, Any]] = {}
    for completion in completions:
        for choice in completion.choices or []:
            acc = choices.setdefault(choice.index, {"text": "", "finish_reason": None, "tokens": []})
            acc["text"] += choice.text or ""
            if choice.finish_reason:
                acc["finish_reason"] = choice.finish_reason
            if choice.logprobs is not None and choice.logprobs.tokens:
                acc["tokens"] += choice.logprobs.tokens
    return {"id": completions[-1].id if completions else None, "choices": choices}


def drop_none(value: Any) -> Any:
    """A JSON value without null members (null and absent mean the same to an SDK user)."""
    if isinstance(value, dict):
        return dict((k, drop_none(v)) for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def anthropic_summary(message: Dict[str, Any], partial_parse: bool = False) -> Dict[str, Any]:
    """The parts of an Anthropic message that matter: every content block (text, citations,
    thinking and its signature, redacted thinking, tool_use and its parsed input, server tool
    blocks), the stop reason, the usage, the container and the context management applied.

    ``partial_parse``: a stream cut inside a tool's input leaves JSON text that does not parse.
    The record keeps that text as received (a string ``input``); the SDK's stream helper shows
    what its partial parser (jiter, ``partial_mode=True``) makes of it, dropping the unfinished
    member. To compare the two, the record's text is put through the same parser.
    """
    blocks = []
    for block in message.get("content") or []:
        block = dict(block)
        block.pop("parsed_output", None)  # the SDK's structured-output helper, not wire data
        if partial_parse and isinstance(block.get("input"), str):
            import jiter  # an anthropic dependency, present whenever anthropic is

            block["input"] = jiter.from_json(block["input"].encode("utf-8"), partial_mode=True)
        blocks.append(drop_none(block))
    return {"id": message.get("id"), "model": message.get("model"), "role": message.get("role"),
            "content": blocks, "stop_reason": message.get("stop_reason"),
            "stop_sequence": message.get("stop_sequence"), "usage": drop_none(message.get("usage")),
            "container": drop_none(message.get("container")),
            "context_management": drop_none(message.get("context_management"))}


def anthropic_message_of_events(events: List[Any]) -> Dict[str, Any]:
    """The message the raw stream events describe, accumulated by this test (not by the SDK's
    helper, which test_messages_stream_helper covers)."""
    message: Dict[str, Any] = {}
    blocks: Dict[int, Dict[str, Any]] = {}
    partial: Dict[int, str] = {}
    for ev in events:
        e = ev.model_dump(mode="json", warnings=False)
        kind = e.get("type")
        if kind == "message_start":
            message = dict(e["message"])
        elif kind == "content_block_start":
            blocks[e["index"]] = dict(e["content_block"])
        elif kind == "content_block_delta":
            block, delta = blocks[e["index"]], e["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = (block.get("text") or "") + delta["text"]
            elif dtype == "thinking_delta":
                block["thinking"] = (block.get("thinking") or "") + delta["thinking"]
            elif dtype == "signature_delta":
                block["signature"] = delta["signature"]
            elif dtype == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + delta["partial_json"]
            elif dtype == "citations_delta":
                block["citations"] = (block.get("citations") or []) + [delta["citation"]]
        elif kind == "message_delta":
            message.update(dict((k, v) for k, v in e["delta"].items() if k in ("stop_reason", "stop_sequence")))
            for key, value in list(e["delta"].items()) + list(e.items()):
                if key in ("container", "context_management") and value is not None:
                    message[key] = value
            usage = dict(message.get("usage") or {})
            usage.update(dict((k, v) for k, v in (e.get("usage") or {}).items() if v is not None))
            message["usage"] = usage
    for index, text in partial.items():
        try:
            blocks[index]["input"] = json.loads(text) if text else {}
        except ValueError:  # a cut stream: the input as received, like the record keeps it
            blocks[index]["input"] = text
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def gemini_dump(obj: Any) -> Any:
    """A google-genai object without what the SDK adds itself: the HTTP headers it saw and its
    automatic-function-calling bookkeeping."""
    if obj is None or not hasattr(obj, "model_dump"):
        return obj
    return obj.model_dump(mode="json", warnings=False, exclude={"sdk_http_response", "automatic_function_calling_history"})


def gemini_summary(responses: List[Any]) -> Dict[str, Any]:
    """The parts of Gemini responses that matter, concatenated over stream chunks: per candidate
    the text, the thought text, function calls, thought signatures (base64), the other parts
    (code executed and its result, ...) in order, finish reason, the last grounding and citation
    metadata."""
    candidates: Dict[int, Dict[str, Any]] = {}
    for response in responses:
        data = gemini_dump(response)
        for cand in data.get("candidates") or []:
            acc = candidates.setdefault(cand.get("index") or 0, {
                "role": None, "text": "", "thought": "", "function_calls": [], "thought_signatures": [],
                "other_parts": [], "finish_reason": None, "grounding_metadata": None, "citation_metadata": None})
            content = cand.get("content") or {}
            acc["role"] = content.get("role") or acc["role"]
            for part in content.get("parts") or []:
                if part.get("text") is not None:
                    acc["thought" if part.get("thought") else "text"] += part["text"]
                if part.get("function_call") is not None:
                    acc["function_calls"].append(drop_none(part["function_call"]))
                if part.get("thought_signature") is not None:
                    acc["thought_signatures"].append(part["thought_signature"])
                other = drop_none(dict((k, v) for k, v in part.items()
                                       if k not in ("text", "thought", "function_call", "thought_signature")))
                if other:
                    acc["other_parts"].append(other)
            if cand.get("finish_reason"):
                acc["finish_reason"] = cand["finish_reason"]
            for key in ("grounding_metadata", "citation_metadata"):
                if cand.get(key) is not None:
                    acc[key] = drop_none(cand[key])
    last = gemini_dump(responses[-1]) if responses else {}
    return {"candidates": candidates, "usage_metadata": last.get("usage_metadata"),
            "model_version": last.get("model_version"), "response_id": last.get("response_id"),
            "prompt_feedback": last.get("prompt_feedback")}


if __name__ == "__main__":
    unittest.main()
