"""Generate realistic proxy_llm data dirs for tests (records as the recorder writes them).

Every builder returns a plain record dict following the record schema
(schema_version 1).  ``DataDirWriter`` lays records out on disk the way the
recorder does: ``session_<sid>/session_<sid>_<stamp>.jsonl`` files, rotated and
gzip'd files, ``streams/`` lines, and the damage a crash leaves (torn last line,
leftover ``*.tmp``).  ``build_mixed(root)`` writes a data dir with every dialect
and every ending and returns a ``Manifest`` of what a reader must find.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import random
from datetime import datetime, timedelta, timezone

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
T0 = datetime(2026, 11, 27, 16, 48, 15, 123456, tzinfo=timezone.utc)
REDACTED = "[REDACTED:3f9a1c0e]"
ENDINGS = ("completed", "client_aborted", "refused", "upstream_error", "upstream_eof", "timeout", "shutdown")


def ulid(when: datetime, rng: random.Random) -> str:
    """A 26-char ULID: 48-bit ms time + 80 random bits, Crockford base32."""
    value = (int(when.timestamp() * 1000) << 80) | rng.getrandbits(80)
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Clock(object):
    """Deterministic time and ids: each ``tick()`` advances ``step`` seconds."""

    def __init__(self, start: datetime = T0, seed: int = 7, step: float = 3.0) -> None:
        self.now = start
        self.rng = random.Random(seed)
        self.step = step

    def tick(self) -> datetime:
        self.now = self.now + timedelta(seconds=self.step)
        return self.now


PROVIDERS = {
    "openai": ("openai", {"authorization": "Bearer " + REDACTED}),
    "anthropic": ("anthropic", {"x-api-key": REDACTED, "anthropic-version": "2023-06-01"}),
    "gemini": ("gemini", {"x-goog-api-key": REDACTED}),
}


def record(clock: Clock, *, session_id: str, provider_type: str, dialect: str, endpoint: str,
           model, request_body, response_body, stream: bool = False, status_code=200,
           ended: str = "completed", tokens=None, error=None, session_source: str = "header",
           method: str = "POST", query: str = "", duration: float = None, ttft_ms: float = None,
           truncated=None, stream_truncated: bool = False, provider=None) -> dict:
    """One record as the recorder writes it; optional fields only when they apply."""
    when = clock.tick()
    name, auth = PROVIDERS[provider_type]
    req_headers = {"content-type": "application/json", "user-agent": "factory/1.0",
                   "x-session-id": session_id}
    req_headers.update(auth)
    resp_headers = {"content-type": "text/event-stream" if stream and status_code == 200
                    else "application/json", "x-request-id": "req_%d" % clock.rng.getrandbits(32)}
    req_bytes = len(json.dumps(request_body)) if request_body is not None else 0
    resp_bytes = len(json.dumps(response_body)) if response_body is not None else 0
    rec = {
        "schema_version": 1,
        "id": ulid(when, clock.rng),
        "timestamp": rfc3339(when),
        "session_id": session_id,
        "session_source": session_source,
        "provider": provider if provider is not None else name,
        "provider_type": provider_type,
        "dialect": dialect,
        "endpoint": endpoint,
        "method": method,
        "query": query,
        "model": model,
        "stream": stream,
        "request_headers": req_headers,
        "request_body": request_body,
        "status_code": status_code,
        "response_headers": resp_headers if status_code is not None else {},
        "response_body": response_body,
        "ended": ended,
    }
    if error is None and status_code is not None and status_code >= 400:
        error = {"type": "http_%d" % status_code, "message": "HTTP %d" % status_code}
    if error is None and ended != "completed":  # as the recorder does
        error = {"type": ended, "message": "the exchange ended early (%s)" % ended}
    if error is not None:
        rec["error"] = error
    if tokens is not None:
        rec["tokens_used"] = tokens
    rec["duration"] = duration if duration is not None else round(200 + clock.rng.random() * 3000, 3)
    if stream and status_code is not None:
        rec["ttft_ms"] = ttft_ms if ttft_ms is not None else round(50 + clock.rng.random() * 400, 3)
    rec["request_bytes"] = req_bytes
    rec["response_bytes"] = resp_bytes
    if truncated:
        rec["truncated"] = truncated
    if stream_truncated:
        rec["stream_truncated"] = True
    return rec


def usage(prompt: int, completion: int, **extra) -> dict:
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    out.update(extra)
    return out


# ---------------------------------------------------------------- OpenAI chat

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"},
                                                    "limit": {"type": "integer", "default": 5}}}}}


def openai_chat(clock: Clock, session_id: str, messages: list, reply: dict, *, tools=None,
                model: str = "gpt-4o-mini", stream: bool = False, **kw) -> dict:
    """An OpenAI chat completion; ``reply`` is the assistant message of choice 0."""
    req = {"model": model, "messages": messages}
    if tools:
        req["tools"] = tools
    if stream:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    message = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    message.update(reply)
    resp = {"id": "chatcmpl-%d" % clock.rng.getrandbits(40), "object": "chat.completion",
            "created": 1795000000, "model": model + "-2024-07-18",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if reply.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}
    kw.setdefault("tokens", usage(30, 12))
    return record(clock, session_id=session_id, provider_type="openai", dialect="openai_chat",
                  endpoint="/v1/chat/completions", model=model, request_body=req,
                  response_body=resp, stream=stream, **kw)


def openai_tool_session(clock: Clock, session_id: str = "oa-tools") -> list:
    """Two calls of a tool loop: string and multi-part content, an image, tools, a tool result."""
    system = {"role": "system", "content": "You are a helpful assistant."}
    user = {"role": "user", "content": [
        {"type": "text", "text": "What's the weather in Paris? Here is a photo."},
        {"type": "image_url", "image_url": {"url": "https://example.com/paris.jpg", "detail": "low"}}]}
    call = {"id": "call_abc123", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    first = openai_chat(clock, session_id, [system, user], {"content": None, "tool_calls": [call]},
                        tools=[WEATHER_TOOL, SEARCH_TOOL])
    history = [system, user, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_abc123", "content": "{\"temp\": 18, \"sky\": \"clear\"}"}]
    second = openai_chat(clock, session_id, history, {"content": "It is 18 C and clear in Paris."},
                         tools=[WEATHER_TOOL, SEARCH_TOOL], stream=True)
    return [first, second]


def openai_functions_session(clock: Clock, session_id: str = "oa-functions") -> list:
    """Two calls of a loop with the legacy ``functions`` API (still accepted by Chat Completions):
    a ``function_call`` answer without an id, then its ``role: "function"`` result."""
    fn = {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    user = {"role": "user", "content": "Weather in Oslo?"}
    call = {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}
    first = openai_chat(clock, session_id, [user], {"content": None, "function_call": call})
    first["request_body"]["functions"] = [fn]
    first["response_body"]["choices"][0]["finish_reason"] = "function_call"
    history = [user, {"role": "assistant", "content": None, "function_call": call},
               {"role": "function", "name": "get_weather", "content": "{\"temp\": 3}"}]
    second = openai_chat(clock, session_id, history, {"content": "It is 3 C in Oslo."})
    second["request_body"]["functions"] = [fn]
    return [first, second]


def openai_custom_tool_call(clock: Clock, session_id: str = "oa-custom", with_function: bool = False) -> dict:
    """A call whose history holds a ``custom`` tool call (free-form input, GPT-5's apply_patch)
    and its result; with ``with_function``, a function call in the same message and its result."""
    custom = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch"}}
    calls = [{"id": "call_C1", "type": "custom", "custom": {"name": "apply_patch", "input": "*** Begin Patch"}}]
    results = [{"role": "tool", "tool_call_id": "call_C1", "content": "ok"}]
    tools = [custom]
    if with_function:
        calls.append({"id": "call_F1", "type": "function",
                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}})
        results.append({"role": "tool", "tool_call_id": "call_F1", "content": "{\"temp\": 18}"})
        tools.append(WEATHER_TOOL)
    messages = [{"role": "user", "content": "Patch app.py"},
                {"role": "assistant", "content": None, "tool_calls": calls}] + results
    return openai_chat(clock, session_id, messages, {"content": "Patched."}, tools=tools, model="gpt-5")


def openai_audio_session(clock: Clock, session_id: str = "oa-audio") -> list:
    """An audio conversation: an answer in audio (``audio`` with its transcript, no content),
    then a call whose history refers to it by ``{"audio": {"id"}}`` only, as OpenAI documents."""
    say = {"role": "user", "content": "Say hi"}
    audio = {"id": "audio_abc123", "expires_at": 1795003600, "data": "UklGRiQAAABXQVZF",
             "transcript": "Hi there!"}
    first = openai_chat(clock, session_id, [say], {"content": None, "audio": audio},
                        model="gpt-4o-audio-preview")
    first["request_body"].update(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    history = [say, {"role": "assistant", "audio": {"id": "audio_abc123"}},
               {"role": "user", "content": "Again, in text"}]
    second = openai_chat(clock, session_id, history, {"content": "Hi again."}, model="gpt-4o-audio-preview")
    return [first, second]


# ---------------------------------------------------------------- OpenAI Responses

def openai_responses(clock: Clock, session_id: str, input_, output: list, *, instructions=None,
                     tools=None, model: str = "gpt-4.1", stream: bool = False, **kw) -> dict:
    req = {"model": model, "input": input_}
    if instructions:
        req["instructions"] = instructions
    if tools:
        req["tools"] = tools
    if stream:
        req["stream"] = True
    resp = {"id": "resp_%d" % clock.rng.getrandbits(40), "object": "response", "status": "completed",
            "model": model, "output": output,
            "usage": {"input_tokens": 50, "output_tokens": 20, "total_tokens": 70,
                      "output_tokens_details": {"reasoning_tokens": 8}}}
    kw.setdefault("tokens", usage(50, 20, reasoning_tokens=8))
    return record(clock, session_id=session_id, provider_type="openai", dialect="openai_responses",
                  endpoint="/v1/responses", model=model, request_body=req, response_body=resp,
                  stream=stream, **kw)


def responses_session(clock: Clock, session_id: str = "resp-1") -> list:
    tools = [{"type": "function", "name": "lookup", "description": "Look up an order",
              "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}},
             {"type": "web_search_preview"}]
    first = openai_responses(clock, session_id, "Where is my order 42?", [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Need the order."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_r1", "name": "lookup",
         "arguments": "{\"order\": \"42\"}", "status": "completed"}],
        instructions="You are a support agent.", tools=tools)
    second = openai_responses(clock, session_id, [
        {"role": "user", "content": [{"type": "input_text", "text": "Where is my order 42?"}]},
        {"type": "function_call", "call_id": "call_r1", "name": "lookup", "arguments": "{\"order\": \"42\"}"},
        {"type": "function_call_output", "call_id": "call_r1", "output": "shipped"}], [
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Your order has shipped.", "annotations": []}]}],
        instructions="You are a support agent.", tools=tools, stream=True)
    return [first, second]


# ---------------------------------------------------------------- Anthropic

READ_TOOL = {"name": "read_file", "description": "Read a file",
             "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                              "required": ["path"]}}
EDIT_TOOL = {"name": "edit_file", "description": "Replace text in a file",
             "input_schema": {"type": "object", "properties": {
                 "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}}}


def anthropic(clock: Clock, session_id: str, messages: list, content: list, *, system=None,
              tools=None, model: str = "claude-sonnet-4-5", stream: bool = True, **kw) -> dict:
    """An Anthropic /v1/messages call; ``content`` is the response's content blocks."""
    req = {"model": model, "max_tokens": 4096, "messages": messages}
    if system is not None:
        req["system"] = system
    if tools:
        req["tools"] = tools
    if stream:
        req["stream"] = True
    stop = "tool_use" if any(b.get("type") == "tool_use" for b in content) else "end_turn"
    resp = {"id": "msg_%d" % clock.rng.getrandbits(40), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 900, "output_tokens": 60, "cache_read_input_tokens": 800}}
    kw.setdefault("tokens", usage(900, 60, cached_tokens=800))
    kw.setdefault("session_source", "claude_code")
    return record(clock, session_id=session_id, provider_type="anthropic",
                  dialect="anthropic_messages", endpoint="/v1/messages", model=model,
                  request_body=req, response_body=resp, stream=stream, **kw)


AGENT_SYSTEM = [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}]


def agent_session_with_fork(clock: Clock, session_id: str = "agent-1") -> dict:
    """A recorded multi-turn Anthropic agent session with a fork, a retry and a side call.

    Returns {"records": [...], "chat": n, "branches": 3}: after --dedupe exactly the
    main branch's last call, the fork's last call and the side call remain.
    """
    tools = [READ_TOOL, EDIT_TOOL]
    u1 = {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>cwd /repo</system-reminder>"},
        {"type": "text", "text": "Fix the bug in app.py", "cache_control": {"type": "ephemeral"}}]}
    r1 = [{"type": "thinking", "thinking": "I should read app.py first.", "signature": "sig1"},
          {"type": "text", "text": "Let me read it."},
          {"type": "tool_use", "id": "toolu_01", "name": "read_file", "input": {"path": "app.py"}}]
    t1 = anthropic(clock, session_id, [u1], r1, system=AGENT_SYSTEM, tools=tools)
    a1 = {"role": "assistant", "content": copy.deepcopy(r1)}
    res1 = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "def f():\n    retrun 1\n"}]}
    r2 = [{"type": "text", "text": "Found a typo."},
          {"type": "tool_use", "id": "toolu_02", "name": "edit_file",
           "input": {"path": "app.py", "old": "retrun", "new": "return"}}]
    t2 = anthropic(clock, session_id, [u1, a1, res1], r2, system=AGENT_SYSTEM, tools=tools)
    title = anthropic(clock, session_id, [{"role": "user", "content": "Fix the bug in app.py"}],
                      [{"type": "text", "text": "Fixing a typo in app.py"}],
                      system="Summarize the task as a title.", model="claude-haiku-4-5", stream=False)
    a2 = {"role": "assistant", "content": copy.deepcopy(r2)}
    res2 = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "ok"}]}]}
    r3 = [{"type": "text", "text": "Fixed: `retrun` is now `return`."}]
    t3 = anthropic(clock, session_id, [u1, a1, res1, a2, res2], r3, system=AGENT_SYSTEM, tools=tools)
    retry = copy.deepcopy(t3)  # the client retried the very same call
    retry_rec = anthropic(clock, session_id, retry["request_body"]["messages"], r3,
                          system=AGENT_SYSTEM, tools=tools)
    # The fork: the user rewound to after the first tool call and the file read differently.
    res1b = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "def f():\n    return 2\n",
         "is_error": False},
        {"type": "text", "text": "Actually the file changed, look again."}]}
    r2b = [{"type": "text", "text": "The file looks correct now."}]
    f2 = anthropic(clock, session_id, [u1, a1, res1b], r2b, system=AGENT_SYSTEM, tools=tools)
    return {"records": [t1, t2, title, t3, retry_rec, f2], "chat": 6, "branches": 3,
            "kept_ids": [t3["id"], f2["id"], title["id"]]}


def anthropic_tool_error(clock: Clock, session_id: str = "tool-error") -> dict:
    """A call whose history holds a ``tool_result`` with ``is_error: true``."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [{"role": "user", "content": "Weather in Xyz?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Xyz"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                              "content": "city not found"}]}]
    return anthropic(clock, session_id, messages, [{"type": "text", "text": "Sorry, I do not know Xyz."}],
                     tools=tools)


def anthropic_prefill(clock: Clock, session_id: str = "prefill", prefill="{",
                      content=None, tools=None) -> dict:
    """A call whose messages end with an assistant prefill (``"{"``) that the answer continues."""
    if content is None:
        content = [{"type": "text", "text": "\"city\": \"Paris\", \"country\": \"FR\"}"}]
    messages = [{"role": "user", "content": "Give Paris as JSON with city and country."},
                {"role": "assistant", "content": prefill}]
    return anthropic(clock, session_id, messages, content, tools=tools, stream=False,
                     session_source="header")


# ---------------------------------------------------------------- Gemini

def gemini(clock: Clock, session_id: str, contents: list, parts: list, *, system=None, tools=None,
           model: str = "gemini-2.0-flash", stream: bool = False, **kw) -> dict:
    req = {"contents": contents}
    if system:
        req["systemInstruction"] = {"parts": [{"text": system}]}
    if tools:
        req["tools"] = tools
    resp = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 9, "totalTokenCount": 49},
            "modelVersion": model}
    action = "streamGenerateContent" if stream else "generateContent"
    kw.setdefault("tokens", usage(40, 9))
    kw.setdefault("query", "alt=sse" if stream else "")
    return record(clock, session_id=session_id, provider_type="gemini", dialect="gemini",
                  endpoint="/v1beta/models/%s:%s" % (model, action), model=model,
                  request_body=req, response_body=resp, stream=stream, **kw)


def gemini_session(clock: Clock, session_id: str = "gem-1") -> list:
    tools = [{"functionDeclarations": [{"name": "get_time", "description": "Time in a zone",
                                        "parameters": {"type": "OBJECT", "properties": {
                                            "zone": {"type": "STRING"}}}}]},
             {"googleSearch": {}}]
    user = {"role": "user", "parts": [{"text": "What time is it in Tokyo?"},
                                      {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}
    first = gemini(clock, session_id, [user], [
        {"text": "Thinking about zones", "thought": True},
        {"functionCall": {"name": "get_time", "args": {"zone": "Asia/Tokyo"}}}],
        system="Be brief.", tools=tools)
    second = gemini(clock, session_id, [
        user, {"role": "model", "parts": [{"functionCall": {"name": "get_time", "args": {"zone": "Asia/Tokyo"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_time",
                                                         "response": {"time": "09:30"}}}]}],
        [{"text": "It is 09:30 in Tokyo."}], system="Be brief.", tools=tools, stream=True)
    return [first, second]


def gemini_sdk_tools(clock: Clock, session_id: str = "gem-sdk") -> dict:
    """A call as the google-genai SDK sends function declarations: ``parameters`` in Gemini's
    OpenAPI-style Schema (upper-case types, ``format``, ``propertyOrdering``, ``nullable``), and
    one declaration with ``parametersJsonSchema`` (JSON Schema already)."""
    weather = {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "OBJECT", "required": ["city"], "propertyOrdering": ["city", "days", "units", "tags", "filter"],
        "properties": {
            "city": {"type": "STRING", "description": "City name"},
            "days": {"type": "INTEGER", "format": "int32", "minimum": 1},
            "units": {"type": "STRING", "enum": ["metric", "imperial"], "nullable": True},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
            "filter": {"type": "OBJECT", "properties": {"type": {"type": "STRING"}, "max": {"type": "NUMBER"}}},
            "when": {"anyOf": [{"type": "STRING", "format": "date-time"}, {"type": "BOOLEAN"}]}}}}
    lookup = {"name": "lookup", "parametersJsonSchema": {
        "type": "object", "properties": {"q": {"type": "string"}}, "additionalProperties": False}}
    return gemini(clock, session_id, [{"role": "user", "parts": [{"text": "Weather in Berlin?"}]}],
                  [{"functionCall": {"name": "get_weather", "args": {"city": "Berlin"}}}],
                  model="gemini-2.5-flash", tools=[{"functionDeclarations": [weather, lookup]}])


# ---------------------------------------------------------------- not chat-like, errors, endings

def embeddings(clock: Clock, session_id: str) -> dict:
    req = {"model": "text-embedding-3-small", "input": ["hello", "world"]}
    resp = {"object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": i, "embedding": [0.01 * i, -0.2, 0.33]}
                     for i in range(2)],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    return record(clock, session_id=session_id, provider_type="openai", dialect="openai_embeddings",
                  endpoint="/v1/embeddings", model="text-embedding-3-small", request_body=req,
                  response_body=resp, tokens={"prompt_tokens": 2, "completion_tokens": 0,
                                              "total_tokens": 2})


def speech(clock: Clock, session_id: str) -> dict:
    """Text to speech: a JSON request, MP3 bytes back (kept in base64, named in body_encoding)."""
    req = {"model": "gpt-4o-mini-tts", "input": "Hello!", "voice": "alloy"}
    audio = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + bytes(range(256))
    rec = record(clock, session_id=session_id, provider_type="openai", dialect="generic",
                 endpoint="/v1/audio/speech", model="gpt-4o-mini-tts", request_body=req,
                 response_body=base64.b64encode(audio).decode("ascii"))
    rec["response_headers"]["content-type"] = "audio/mpeg"
    rec["response_bytes"] = len(audio)
    rec["body_encoding"] = {"response": "base64"}
    return rec


def models_list(clock: Clock, session_id: str) -> dict:
    resp = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    return record(clock, session_id=session_id, provider_type="openai", dialect="generic",
                  endpoint="/v1/models", model=None, request_body=None, response_body=resp,
                  method="GET")


def endings_session(clock: Clock, session_id: str = "endings") -> list:
    """One record per non-completed ending plus HTTP errors (429, unreachable)."""
    msgs = [{"role": "user", "content": "Count to ten."}]
    out = []
    partial = {"content": "1, 2, 3"}
    out.append(openai_chat(clock, session_id, msgs, partial, stream=True, ended="client_aborted",
                           tokens=None))
    out.append(anthropic(clock, session_id, msgs, [{"type": "text", "text": "1, 2"}],
                         ended="upstream_error", tokens=None,
                         error={"type": "overloaded_error", "message": "Overloaded"}))
    out.append(openai_chat(clock, session_id, msgs, partial, stream=True, ended="upstream_eof",
                           tokens=None))
    out.append(openai_chat(clock, session_id, msgs, partial, stream=True, ended="timeout", tokens=None))
    out.append(gemini(clock, session_id, [{"role": "user", "parts": [{"text": "Count to ten."}]}],
                      [{"text": "1, 2, 3, 4"}], stream=True, ended="shutdown", tokens=None))
    rate = openai_chat(clock, session_id, msgs, {"content": "x"}, status_code=429, tokens=None,
                       error={"type": "rate_limit_exceeded", "message": "Rate limit reached"})
    rate["response_body"] = {"error": {"message": "Rate limit reached", "type": "requests",
                                       "code": "rate_limit_exceeded"}}
    out.append(rate)
    gone = openai_chat(clock, session_id, msgs, {"content": "x"}, status_code=None,
                       ended="upstream_error", tokens=None,
                       error={"type": "upstream_unavailable", "message": "connection refused"})
    gone["response_body"] = None
    out.append(gone)
    # The proxy's own answer: no provider for the model (404 in the family's error shape).
    refused = anthropic(clock, session_id, msgs, [{"type": "text", "text": "x"}], status_code=404, stream=False,
                        ended="refused", tokens=None,
                        error={"type": "not_found_error", "message": "no provider serves model claude-x"})
    refused["response_body"] = {"type": "error", "error": {"type": "not_found_error",
                                                           "message": "no provider serves model claude-x"}}
    out.append(refused)
    return out


def has_stream_line(rec: dict) -> bool:
    """Whether the recorder writes a streams/ line for this record (an SSE answer)."""
    status = rec["status_code"]
    ctype = rec["response_headers"].get("content-type", "")
    return status is not None and (ctype.startswith("text/event-stream") or (
        rec["stream"] and rec["provider_type"] == "gemini" and 200 <= status < 300))


def stream_line(rec: dict, n_events: int = 3) -> dict:
    """The streams/ line of a streamed record (events are plausible SSE blocks)."""
    events = [{"t": 40.0 + 10 * i, "event": None, "data": json.dumps({"i": i}), "id": None,
               "retry": None, "comments": []} for i in range(n_events)]
    return {"id": rec["id"], "session_id": rec["session_id"], "timestamp": rec["timestamp"],
            "events": events, "truncated": False}


# ---------------------------------------------------------------- on disk

def sanitize(session_id: str) -> str:
    import hashlib
    import re
    if re.match(r"^[A-Za-z0-9._-]{1,64}$", session_id) and session_id not in (".", ".."):
        return session_id
    return "h" + hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:16]


def dumps(obj) -> bytes:
    try:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, escaped (as recorders before 2026-12-06 wrote it)
        return (json.dumps(obj) + "\n").encode("ascii")


class DataDirWriter(object):
    """Write records and stream lines as the recorder lays them out."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def session_file(self, session_id: str, stamp: str, suffix: str = "", gz: bool = False) -> str:
        sid = sanitize(session_id)
        folder = os.path.join(self.root, "session_" + sid)
        os.makedirs(folder, exist_ok=True)
        name = "session_%s_%s%s.jsonl%s" % (sid, stamp, suffix, ".gz" if gz else "")
        return os.path.join(folder, name)

    def stream_file(self, session_id: str, day: str = "20261127", gz: bool = False) -> str:
        folder = os.path.join(self.root, "streams")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, "session_%s_%s.jsonl%s" % (sanitize(session_id), day, ".gz" if gz else ""))

    @staticmethod
    def write_lines(path: str, objs: list, torn: bytes = b"") -> None:
        """Append ``objs`` as JSON lines (gzip when the path ends in .gz), then ``torn`` bytes."""
        data = b"".join(dumps(o) for o in objs) + torn
        if path.endswith(".gz"):
            with gzip.open(path, "wb") as fh:
                fh.write(data)
        else:
            with open(path, "ab") as fh:
                fh.write(data)

    def write_records(self, recs: list, stamp: str = "20261127_164815", suffix: str = "",
                      gz: bool = False, torn: bytes = b"", streams: bool = True) -> str:
        """Write records of one session to one file; stream lines for streamed records."""
        path = self.session_file(recs[0]["session_id"], stamp, suffix, gz)
        self.write_lines(path, recs, torn)
        if streams:
            lines = [stream_line(r) for r in recs if has_stream_line(r)]
            if lines:
                self.write_lines(self.stream_file(recs[0]["session_id"]), lines)
        return path


# Files in the data dir's reading places that the recorder never names so (storage._create), as a
# user leaves them: notes, a file manager's copy, a stamp cut short, "-0", a record file's name
# in streams/.
STRAY_NAMES = ("session_oa-tools/notes.jsonl", "session_oa-tools/session_oa-tools_20261127_164815 (copy).jsonl",
               "session_oa-tools/session_oa-tools_20261127_1648.jsonl", "session_gem-1/gem.jsonl.gz",
               "session_gem-1/session_gem-1_20261127_165100-0.jsonl", "streams/notes.jsonl",
               "streams/session_gem-1_20261127_165100.jsonl")


def write_strays(root: str, man: "Manifest") -> list:
    """``STRAY_NAMES`` under ``root`` (a ``build_mixed`` data dir), each holding a sound record
    (a copy of an exportable chat record under a new id) or, under streams/, a sound stream line
    (a copy of a record's): read as data, they would count. Returns their paths, sorted."""
    rng = random.Random(11)
    rec = man.chat_ok[0]
    line = stream_line([r for r in man.records if has_stream_line(r)][0])
    paths = []
    for name in STRAY_NAMES:
        path = os.path.join(root, *name.split("/"))
        obj = dict(line if name.startswith("streams/") else rec)
        obj["id"] = ulid(T0, rng)
        DataDirWriter.write_lines(path, [obj])
        paths.append(path)
    return sorted(paths)


class Manifest(object):
    """What ``build_mixed`` wrote: the truth the tests check readers against."""

    def __init__(self) -> None:
        self.records = []  # every complete record written, in file order per session
        self.torn = 0
        self.files = 0
        self.by_dialect = {}
        self.agent = None

    def add(self, recs: list) -> None:
        self.records.extend(recs)
        for r in recs:
            self.by_dialect[r["dialect"]] = self.by_dialect.get(r["dialect"], 0) + 1

    @property
    def chat_ok(self) -> list:
        """Records an openai-chat export keeps without filters (chat-like, 2xx, no error)."""
        chat = ("openai_chat", "openai_responses", "anthropic_messages", "gemini")
        return [r for r in self.records if r["dialect"] in chat and r["status_code"] is not None
                and 200 <= r["status_code"] < 300 and "error" not in r]

    @property
    def stream_ids(self) -> list:
        return [r["id"] for r in self.records if has_stream_line(r)]


def build_mixed(root: str, torn: bool = True) -> Manifest:
    """A data dir with every dialect and ending, a rotated gzip'd file and (``torn``) a torn line."""
    clock = Clock()
    out = DataDirWriter(root)
    man = Manifest()
    oa = openai_tool_session(clock)
    emb = embeddings(clock, "oa-tools")
    # rotated: first file sealed and gzip'd, the second holds the rest
    out.write_records(oa[:1], stamp="20261127_164815", gz=True)
    out.write_records(oa[1:] + [emb], stamp="20261127_170000")
    man.add(oa + [emb])
    man.files += 2
    agent = agent_session_with_fork(clock)
    half = len(agent["records"]) // 2
    out.write_records(agent["records"][:half], stamp="20261127_164900")
    # same second, a second file (-2), ends in a torn line (crash mid-append)
    out.write_records(agent["records"][half:], stamp="20261127_164900", suffix="-2",
                      torn=b'{"schema_version": 1, "id": "01J' if torn else b"")
    man.add(agent["records"])
    man.agent = agent
    man.torn += 1 if torn else 0
    man.files += 2
    resp = responses_session(clock)
    gem = gemini_session(clock)
    out.write_records(resp, stamp="20261127_165000")
    out.write_records(gem, stamp="20261127_165100")
    man.add(resp + gem)
    man.files += 2
    ends = endings_session(clock)
    ends.append(models_list(clock, "endings"))
    out.write_records(ends, stamp="20261127_165200", gz=True)
    man.add(ends)
    man.files += 1
    media = [speech(clock, "media")]  # a body that is not UTF-8 (body_encoding)
    out.write_records(media, stamp="20261127_165300")
    man.add(media)
    man.files += 1
    return man


# ---------------------------------------------------------------- every shape, for the format rules

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
_FIXTURE_REQUESTS = {
    "openai_chat": ("openai", "/v1/chat/completions",
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}),
    "openai_responses": ("openai", "/v1/responses", {"model": "m", "input": "hi", "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}),
    "anthropic_messages": ("anthropic", "/v1/messages", {"model": "m", "max_tokens": 9, "system": "Be kind.",
                                                         "messages": [{"role": "user", "content": "hi"}]}),
    "gemini": ("gemini", "/v1beta/models/m:streamGenerateContent",
               {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


def golden_records(clock: Clock) -> list:
    """A record per golden fixture of the chat dialects (tests/fixtures/<dialect>/*.expected.json),
    streamed and not: its reassembled answer to a short request; an answer the fixture marks
    incomplete ended ``upstream_eof`` (``upstream_error`` when it ended on an error event), as the
    recorder would have it."""
    import glob
    out = []
    for dialect, (provider_type, endpoint, req) in sorted(_FIXTURE_REQUESTS.items()):
        for path in sorted(glob.glob(os.path.join(FIXTURES, dialect, "*.expected.json"))):
            with open(path, encoding="utf-8") as fh:
                expected = json.load(fh)
            for stream in (False, True):
                out.append(record(clock, session_id="golden-" + os.path.basename(path).split(".")[0],
                                  provider_type=provider_type, dialect=dialect, endpoint=endpoint, model="m",
                                  request_body=copy.deepcopy(req), response_body=expected["response_body"],
                                  stream=stream, error=expected.get("error"),
                                  ended="completed" if expected.get("complete", True) else
                                  "upstream_error" if expected.get("error") else "upstream_eof"))
    return out


def mixed_provider_records(clock: Clock) -> list:
    """Tool loops of every dialect with the shapes the fine-tuning formats are strict about:
    parallel calls and results, text and thinking beside calls, an empty argument text, a
    developer message, a system message late in the conversation, Anthropic tool results
    beside text, an image-only user message, a thinking-only turn, Gemini parallel calls."""
    recs = []
    calls = [{"id": "c%d" % k, "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"location\": \"%s\"}" % city}} for k, city in enumerate("AB")]
    history = [{"role": "developer", "content": "Use metric."}, {"role": "user", "content": "Weather in A and B?"},
               {"role": "assistant", "content": "Checking both.", "tool_calls": calls},
               {"role": "tool", "tool_call_id": "c0", "content": "18"}, {"role": "tool", "tool_call_id": "c1", "content": "20"}]
    recs.append(openai_chat(clock, "mix-oa", history[:2], {"content": "Checking both.", "tool_calls": calls},
                            tools=[WEATHER_TOOL], stream=True))
    recs.append(openai_chat(clock, "mix-oa", history, {"content": "18 and 20."}, tools=[WEATHER_TOOL]))
    recs.append(openai_chat(clock, "mix-oa", [{"role": "user", "content": "Time?"}], {"content": None, "tool_calls": [
        {"id": "c9", "type": "function", "function": {"name": "now", "arguments": ""}}]}))
    recs.append(openai_chat(clock, "mix-oa", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                              {"role": "system", "content": "Be terse."},
                                              {"role": "user", "content": "c"}], {"content": "d"}, stream=True))
    recs.append(openai_chat(clock, "mix-oa", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], {"content": "A cat."}))
    recs.append(openai_chat(clock, "mix-oa", [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "", "reasoning_content": "hmm"},
                                              {"role": "user", "content": "q2"}],
                            {"content": "a", "reasoning_content": "so"}))
    lookup = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    recs.append(openai_responses(clock, "mix-resp", [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Orders 1 and 2?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "function_call", "call_id": "k1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call", "call_id": "k2", "name": "lookup", "arguments": "{\"o\": 2}"},
        {"type": "function_call_output", "call_id": "k1", "output": "shipped"},
        {"type": "function_call_output", "call_id": "k2", "output": [{"type": "input_text", "text": "lost"}]}],
        [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "1 shipped, 2 lost."}]}],
        instructions="You are a support agent.", tools=[lookup], stream=True))
    reads = [{"type": "thinking", "thinking": "Read both.", "signature": "s1"}, {"type": "text", "text": "Reading."},
             {"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a"}},
             {"type": "tool_use", "id": "t2", "name": "read_file", "input": {"path": "b"}}]
    ask = {"role": "user", "content": "Read a and b."}
    results = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "A"},
                                           {"type": "tool_result", "tool_use_id": "t2",
                                            "content": [{"type": "text", "text": "B"}]}]}
    recs.append(anthropic(clock, "mix-an", [ask], reads, system="Be exact.", tools=[READ_TOOL], stream=False))
    recs.append(anthropic(clock, "mix-an", [ask, {"role": "assistant", "content": reads}, results], [
        {"type": "thinking", "thinking": "Both read.", "signature": "s2"}, {"type": "redacted_thinking", "data": "x"},
        {"type": "text", "text": "A and B."}], system="Be exact.", tools=[READ_TOOL]))
    beside = copy.deepcopy(results)
    beside["content"].append({"type": "text", "text": "Also read c."})
    recs.append(anthropic(clock, "mix-an", [ask, {"role": "assistant", "content": reads}, beside],
                          [{"type": "text", "text": "Reading c."}], system="Be exact.", tools=[READ_TOOL]))
    recs.append(anthropic(clock, "mix-an", [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}], [{"type": "text", "text": "A cat."}]))
    recs.append(anthropic(clock, "mix-an", [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "t", "signature": "s"}]}, {"role": "user", "content": "go on"}],
        [{"type": "text", "text": "ok"}]))
    g_tools = [{"functionDeclarations": [{"name": "get_time", "parameters": {
        "type": "OBJECT", "properties": {"zone": {"type": "STRING"}}}}]}]
    contents = [{"role": "user", "parts": [{"text": "Time in A and B?"}]},
                {"role": "model", "parts": [{"text": "Two zones.", "thought": True},
                                            {"functionCall": {"name": "get_time", "args": {"zone": "A"}}},
                                            {"functionCall": {"name": "get_time", "args": {"zone": "B"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_time", "response": {"t": 1}}},
                                           {"functionResponse": {"name": "get_time", "response": {"t": 2}}}]}]
    recs.append(gemini(clock, "mix-gem", contents[:1], contents[1]["parts"], tools=g_tools))
    recs.append(gemini(clock, "mix-gem", contents, [{"text": "1 and 2."}], tools=g_tools, stream=True))
    return recs


def text_beside_calls(clock: Clock, thinking: str = "Need the weather.") -> list:
    """An answer of each chat dialect holding thinking, text ("Let me check.") and a call of
    get_weather for Paris in one assistant turn, as the providers send it."""
    ask = "Weather in Paris?"
    g_tool = [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "OBJECT"}}]}]
    return [
        openai_chat(clock, "beside-oa", [{"role": "user", "content": ask}], {
            "content": "Let me check.", "reasoning_content": thinking, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": "{\"city\": \"Paris\"}"}}]},
            tools=[WEATHER_TOOL]),
        openai_responses(clock, "beside-resp", ask, [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": thinking}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}],
            tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]),
        anthropic(clock, "beside-an", [{"role": "user", "content": ask}], [
            {"type": "thinking", "thinking": thinking, "signature": "s"}, {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Paris"}}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]),
        gemini(clock, "beside-gem", [{"role": "user", "parts": [{"text": ask}]}], [
            {"text": thinking, "thought": True}, {"text": "Let me check."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}], tools=g_tool),
    ]


def builtin_tool_records(clock: Clock) -> list:
    """Conversations resting on a tool the chat formats cannot hold, one per shape: the Responses
    API's built-in tool items (the wire example of tests/fixtures/openai_responses/builtin_tools)
    in an answer, and in a later request's input as a client that keeps its own state resends
    them; an Anthropic web search in the history; a Gemini code execution; a Gemini answer
    grounded on Google Search; an OpenAI chat custom tool call; a search model's answer."""
    with open(os.path.join(FIXTURES, "openai_responses", "builtin_tools.expected.json"), encoding="utf-8") as fh:
        output = json.load(fh)["response_body"]["output"]
    search = {"type": "web_search", "search_context_size": "low"}
    ask = {"role": "user", "content": "Euro rate, and a coin icon?"}
    answer = [item for item in output if item["type"] == "message"]
    search_item = [item for item in output if item["type"] == "web_search_call"]
    an_search = [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "ECB rate"}},
                 {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
                     {"type": "web_search_result", "url": "https://www.ecb.europa.eu/", "title": "ECB",
                      "encrypted_content": "EqQB", "page_age": None}]},
                 {"type": "text", "text": "The euro is at 1.17 dollars."}]
    grounded = gemini(clock, "builtin-gem-search", [{"role": "user", "parts": [{"text": "Euro rate?"}]}],
                      [{"text": "The euro is at 1.17 dollars."}], tools=[{"googleSearch": {}}])
    grounded["response_body"]["candidates"][0]["groundingMetadata"] = {
        "webSearchQueries": ["euro dollar rate"], "groundingChunks": [{"web": {"uri": "https://x.example/", "title": "x"}}]}
    search_model = openai_chat(clock, "builtin-oa-search", [{"role": "user", "content": "Euro rate?"}], {
        "content": "The euro is at 1.17 dollars (ECB).", "annotations": [{"type": "url_citation", "url_citation": {
            "start_index": 28, "end_index": 33, "url": "https://www.ecb.europa.eu/", "title": "ECB"}}]},
        model="gpt-4o-search-preview")
    return [
        openai_responses(clock, "builtin-resp", [ask], copy.deepcopy(output), tools=[search], stream=True),
        openai_responses(clock, "builtin-resp", [ask] + search_item + answer + [
            {"role": "user", "content": "Thanks!"}], [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "You're welcome."}]}],
            tools=[search]),
        anthropic(clock, "builtin-an", [{"role": "user", "content": "Euro rate?"},
                                        {"role": "assistant", "content": an_search},
                                        {"role": "user", "content": "Thanks!"}],
                  [{"type": "text", "text": "You're welcome."}],
                  tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]),
        gemini(clock, "builtin-gem-code", [{"role": "user", "parts": [{"text": "Sum 1..100?"}]}], [
            {"executableCode": {"language": "PYTHON", "code": "print(sum(range(101)))"}},
            {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "5050\n"}}, {"text": "5050."}],
            tools=[{"codeExecution": {}}]),
        grounded,
        openai_custom_tool_call(clock, "builtin-oa-custom", with_function=True),
        search_model,
    ]


def client_builtin_tool_records(clock: Clock) -> list:
    """Conversations resting on a tool the provider defines and the client runs, called by an
    ordinary call whose tool is no function: Anthropic's bash and text editor in the history
    (as Claude Code sends them) and computer use in the answer; Gemini computer use in the
    history and in the answer."""
    bash = {"type": "bash_20250124", "name": "bash"}
    editor = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool", "max_characters": 10000}
    computer = {"type": "computer_20250124", "name": "computer", "display_width_px": 1024,
                "display_height_px": 768}
    run = [{"role": "user", "content": "Run the tests."},
           {"role": "assistant", "content": [
               {"type": "tool_use", "id": "toolu_b1", "name": "bash", "input": {"command": "pytest -q"}}]},
           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_b1", "content": "3 passed"}]}]
    browse = gemini(clock, "client-builtin-gem", [
        {"role": "user", "parts": [{"text": "Open example.com"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "open_web_browser", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "open_web_browser", "response": {
            "url": "https://example.com/"}}}]}],
        [{"text": "It is open."}], tools=[{"computerUse": {"environment": "ENVIRONMENT_BROWSER"}}],
        model="gemini-2.5-computer-use-preview-10-2025")
    click = gemini(clock, "client-builtin-gem", [{"role": "user", "parts": [{"text": "Click Sign in"}]}],
                   [{"functionCall": {"name": "click_at", "args": {"x": 500, "y": 300}}}],
                   tools=[{"computerUse": {"environment": "ENVIRONMENT_BROWSER"}}],
                   model="gemini-2.5-computer-use-preview-10-2025")
    return [
        anthropic(clock, "client-builtin-an", run, [{"type": "text", "text": "All 3 tests pass."}],
                  tools=[bash, editor]),
        anthropic(clock, "client-builtin-an", [{"role": "user", "content": "Screenshot, please."}], [
            {"type": "text", "text": "Taking one."},
            {"type": "tool_use", "id": "toolu_c1", "name": "computer", "input": {"action": "screenshot"}}],
            tools=[computer, READ_TOOL]),
        browse,
        click,
    ]


def item_reference_records(clock: Clock) -> list:
    """Responses API requests holding items the record does not: an ``item_reference`` (typed,
    and as a bare ``{"id"}``) after the user's message, standing for the reasoning and the call
    of the earlier answer (as a client of a stored conversation sends them); an item of a type
    this version does not know."""
    ask = {"role": "user", "content": "Where is my order 42?"}
    result = {"type": "function_call_output", "call_id": "call_r1", "output": "{\"status\": \"shipped\"}"}
    answer = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It has shipped."}]}]
    return [
        openai_responses(clock, "item-ref", [ask, {"type": "item_reference", "id": "rs_1"},
                                             {"type": "item_reference", "id": "fc_1"}, result], answer),
        openai_responses(clock, "item-ref", [ask, {"id": "rs_1"}, {"id": "fc_1"}, result], answer),
        openai_responses(clock, "item-ref", [ask, {"type": "some_future_item", "id": "fi_1"}], answer),
    ]


def build_formats(root: str) -> None:
    """``build_mixed`` plus the audited shapes, every golden fixture and the mixed-provider
    records: the data dir the format-rule tests export."""
    build_mixed(root, torn=False)
    clock = Clock(seed=99)
    out = DataDirWriter(root)
    audited = (openai_functions_session(clock) + [gemini_sdk_tools(clock), anthropic_prefill(clock),
               openai_custom_tool_call(clock, with_function=True), anthropic_tool_error(clock)]
               + openai_audio_session(clock))
    out.write_records(audited, stamp="20261128_000000")
    out.write_records(golden_records(clock), stamp="20261128_000100")
    out.write_records(mixed_provider_records(clock), stamp="20261128_000200")
    out.write_records(text_beside_calls(clock), stamp="20261128_000300")
    out.write_records(builtin_tool_records(clock), stamp="20261128_000400")
    out.write_records(client_builtin_tool_records(clock) + item_reference_records(clock), stamp="20261128_000500")
