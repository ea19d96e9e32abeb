"""``proxy_llm export``: turn a data dir into a training or analysis dataset.

Reads every record of a data dir (rotated and gzip'd files included; a torn
last line is skipped and reported; a ``*.jsonl[.gz]`` not named as the
recorder names its files, ``notes.jsonl``, is skipped and named), keeps those
that pass the filters, and writes one JSON object per line to ``--out`` (or
stdout).  A summary line goes
to stderr at the end; a progress bar too when stderr is a terminal and the
input is large.  Output files are written to a temporary name and renamed, so
a failed export never leaves half a file.

Formats
-------

``openai-chat``: the OpenAI fine-tuning chat format, one conversation per line:
``{"messages": [...], "tools": [...]}`` (``tools`` only when the request had
tools).  The request's history plus the response's assistant message (choice 0)
make the conversation.  Mapping from each dialect:

=====================  =====================  ======================  =====================  =====================
OpenAI chat message    OpenAI chat request    Responses API           Anthropic messages     Gemini
=====================  =====================  ======================  =====================  =====================
``system``             system, developer      ``instructions``;       ``system`` (string or  ``systemInstruction``
                                              system/developer items  text blocks)
``user``               user                   user items, string      user text/image        ``user`` text/image
                                              ``input``               blocks                 parts
``assistant`` content  assistant content,     assistant message       ``text`` blocks        ``model`` text parts
                       refusal, audio         items, output_text
                       transcript
``assistant``          ``tool_calls``         ``function_call`` items ``tool_use`` (input    ``functionCall``
``tool_calls``         (function type);       (``call_id``)           dumped to JSON text)   (args as JSON text)
                       legacy
                       ``function_call``
``tool``               tool; legacy           ``function_call_output``  ``tool_result`` blocks ``functionResponse``
                       ``function``                                   (before the user's     (``response`` as JSON
                                                                      other blocks)          text)
``reasoning_content``  ``reasoning_content``  ``reasoning`` summary   ``thinking`` blocks    ``thought: true``
(--include-thinking)   / ``reasoning``        texts                                          parts
image parts            ``image_url``          ``input_image``         ``image`` (base64 ->   ``inlineData`` image/*
(--include-images)                            (URL/data URI)          data URI, url)         (data URI), ``fileData``
``tools``              function tools         ``type: function``      custom tools:          ``functionDeclarations``
                                              tools                   ``input_schema`` ->
                                                                      ``parameters``         (``parameters`` as
                                                                                             JSON Schema)
=====================  =====================  ======================  =====================  =====================

A call without an id (legacy ``function_call``, Gemini ``functionCall``) gets
``call_<m>_<k>`` (message index in the conversation, call index in the message),
the same in every record holding that history; a result without an id (legacy
``function`` message, Gemini ``functionResponse``) answers the first unanswered
call of the assistant message before it with that name, else the first one; a
``tool`` message has no ``name`` key (OpenAI's tool message takes none): the name only pairs.

Gemini ``parameters`` (OpenAPI style, upper-case types from the google-genai
SDK) become JSON Schema: every ``type`` lower-case through ``properties``,
``items``, ``anyOf`` and ``additionalProperties``, ``TYPE_UNSPECIFIED`` left
out, other keys (``nullable``, ``format``, ``propertyOrdering``) kept;
``parametersJsonSchema`` is JSON Schema already and kept as it is.

An Anthropic ``tool_result`` with ``is_error: true`` is a ``tool`` message like
any other (the OpenAI format has no error flag; the text, usually the error,
is kept); the flag is counted as dropped ``tool_result_is_error``.

An assistant ``audio`` (an answer in audio, or its ``{"id"}`` in the history)
is counted as dropped ``audio``; its ``transcript`` is the message's text when
it has no other.

A prefill (Anthropic messages ending with an assistant message; an
OpenAI-compatible last assistant message with ``"prefix": true``, DeepSeek and
Mistral) is continued by the answer: one assistant message, its text the
prefill's then the answer's with no separator, the prefill's thinking and tool
calls before the answer's; an empty answer to a prefill is ``no_response``.

A Responses API request that continues a stored conversation with
``previous_response_id`` carries only its new input: the conversation is rebuilt
from the records read (``ChainIndex``: any file, any order, any depth), the
earlier turns' input and output items first, then the request's own; the system
message is the request's own ``instructions`` (the API does not carry a previous
response's over).  Continuable: a successful record whose response is
``completed`` or ``incomplete``, not sent with ``store: false``.  When the named
record was not read (filtered out, another data dir, a failed answer), the request
is exported as it is, as before (a tool result only: ``no_user_turn``, the result
``orphan_tool_result``).  Memory: the turns are kept least recently used first up
to ``ChainIndex.MAX_BYTES`` (their records' ``request_bytes + response_bytes``); a
request whose earlier response is read later waits for the end of the read.  With
``--dedupe`` such a row supersedes its earlier turns' (in the session of the
oldest); the ``records`` format keeps records as they are.  A request sent with
``conversation`` (Conversations API) runs with the conversation's items first:
rebuilt the same way (``ChainIndex.conversation``), from its creation's ``items``
(``POST .../conversations``), the ``items`` added (``POST .../conversations/{id}/items``),
and the continuable requests of the conversation before it, by ``timestamp``; the
system message is the request's own ``instructions``.  Such a request waits for the
end of the read; it is exported as it is when the creation was not read, or a record
of the conversation before it was not read or added what is not known (``store:
false``, an answer not whole, an item deleted); the conversation is held whole in the
same bound, and ``--dedupe`` compares its rows together.  An ``item_reference``
naming an item of the rebuilt turns stands for it; in a request not rebuilt, those
before any other item are left out, counted ``item_reference``; any other one
leaves a hole in the conversation: it is skipped as ``item_reference``, and an
input item of a type this version does not know as ``unknown_item``.  A
``compaction`` item (OpenAI's encrypted summary of the context before it) is read
as an ``item_reference`` is: first in the input, left out, counted
``compaction``; after another item, skipped as ``compaction``; in an answer,
left out (``item:compaction``), as a ``compaction_trigger`` input item is.  Text
parts of one message are joined with a newline.  Without
``--include-images`` every ``content`` is a string (``null`` is never written;
an assistant message with only tool calls has no ``content`` key); with it,
every ``content`` but a ``tool`` message's is a list of ``{"type": "text"}`` /
``{"type": "image_url"}`` parts (OpenAI's file validation takes a tool message's content as a
string only: "Input should be a valid string"; ``datasets`` reads the mixed column as JSON).
Thinking goes to the assistant
message's ``reasoning_content`` (the key vLLM, DeepSeek and the Qwen chat
templates read) only with ``--include-thinking``.

Never silently dropped: whatever is left out is counted by kind and listed in
the summary: ``thinking`` and ``image`` (without their flag),
``redacted_thinking`` and encrypted reasoning (cannot be exported), ``audio``,
``file``/``document`` parts, images inside tool results, declarations of tools
other than functions (``web_search``, ``googleSearch``, ...: ``server_tool``),
Responses ``mcp_list_tools`` items, extra choices (``n > 1``: only choice 0 is
exported).

A conversation holding a call of a tool other than a function, or its result, is
skipped as ``unsupported_tool_call`` (both chat formats): the call and its result
cannot be written as a function call and a ``tool`` message (no function was
declared; the results of a provider's search are not in the record or are
encrypted; a custom tool's input is free text), and dropped they would leave an
answer resting on a search, a run or an action with no trace of it.  That is:
Responses API built-in tool items (see ``_unsupported_item``), Anthropic
``server_tool_use``, ``mcp_tool_use`` and ``*_tool_result`` blocks (web search,
web fetch, code execution), Gemini ``executableCode``/``codeExecutionResult``
parts and an answer grounded on Google Search or URL context (its metadata; a
grounded turn of the history leaves none), an OpenAI chat ``custom`` tool call
and a search model's answer (``url_citation`` annotations).  So is an ordinary
call of a tool the provider defines and the client runs (``_check_builtin_calls``:
Anthropic ``bash_20250124``, ``text_editor_*``, ``computer_*``, ...; Gemini
``computerUse``): its declaration is no function (counted ``server_tool``) and
its schema is the model's own, so the row would call a tool it does not list.

Every ``tool`` message answers a call of the assistant message before it (only
``tool`` messages between), as the fine-tuning format requires: a result whose
call is not there (dropped, or in an earlier record) is dropped, counted
``orphan_tool_result``.  An assistant message before the answer left with
neither text nor tool calls (thinking only, even with ``--include-thinking``) is left out of
both chat formats, counted ``empty_assistant_turn``; the messages around it stay.

Skipped records (counted by reason): ``not_chat`` (embeddings, model lists,
token counting, legacy completions, anything not a chat dialect), ``error``
(no status, a non-2xx status, or an ``error`` in the record), ``truncated``
(a body was cut at capture time, ``capture_max_body``, or a stream's event past
``max_sse_event`` left out), ``max_tokens`` (the answer stopped at its token limit,
cut mid-way), ``bad_body`` (a body without the
dialect's shape), ``no_response`` (no assistant message in the response),
``empty_answer`` (the answer has neither text nor tool calls: thinking only, with
or without ``--include-thinking``, or only non-text parts), ``unsupported_tool_call``
(above), ``bad_tool_arguments`` (a call's arguments are not the JSON text of an
object; an empty text is written ``{}``),
``empty_user_turn`` (a user message with nothing to write: only images without
``--include-images``, documents, audio; the answer would answer nothing), ``no_user_turn``
(no user message at all, e.g. only tool results after a ``previous_response_id`` or in a
``conversation`` whose earlier records were not read),
``item_reference`` and ``unknown_item`` (a Responses API input item the record does
not hold, or of a type this version does not know: above),
``non_finite`` (a NaN or Infinity
number, which JSON cannot hold: the output stays strict JSON; any format).
The recorder puts an ``error`` in every record that did not end ``completed``,
so the partial answers of aborted streams are skipped as ``error`` as well.

``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}], "tools": "..."}``
built from the same conversation:

================================  =========================================================
openai-chat message               sharegpt turn
================================  =========================================================
``system``                        ``{"from": "system", "value": text}``
``user``                          ``{"from": "human", "value": text}`` (``<image>`` per image
                                  with --include-images, URLs in the row's ``images`` list)
``assistant`` text                ``{"from": "gpt", "value": text}``; thinking (with
                                  --include-thinking) as a ``<think>...</think>\\n\\n`` prefix
``assistant`` ``tool_calls``      ``{"from": "function_call", "value": "{\\"name\\": ...,
                                  \\"arguments\\": {...}}"}`` (a JSON list for parallel calls);
                                  thinking (with --include-thinking) as the same prefix; the
                                  message's text is dropped, counted ``tool_call_text`` (the
                                  reader parses all but the thinking as JSON)
``tool``                          ``{"from": "observation", "value": content}``; the results
                                  of parallel calls in one turn, a JSON list of their texts
``tools``                         ``"tools"``: JSON text of the list of function objects
                                  (``name``, ``description``, ``parameters``), ``""`` if none
================================  =========================================================

Turns follow LLaMA-Factory's order (one system turn first, then human/observation and
gpt/function_call in turn): human turns in a row and leading system messages are joined
with a newline; a system message later is ``system_not_first``, any other order the format
cannot hold (a user message right after tool results) ``sharegpt_order``, both skipped.
With --include-images, a text holding LLaMA-Factory's placeholders itself (``<image>``,
``<video>``, ``<audio>``), which its multimodal templates would count as the row's media, is
``media_placeholder``, skipped.

``records``: the filtered records themselves as one fixed set of columns, so
that pandas, DuckDB, pyarrow and ``datasets`` infer one schema however varied
the traffic: the required scalar fields typed as in the record (``id``,
``timestamp``, ``session_id``, ``model``, ``status_code``, ``ended``,
``duration``, ...); headers, bodies and every optional field (``error``,
``tokens_used``, ``ttft_ms``, ``truncated``, ``stream_truncated``,
``reassembly_error``, ``decode_error``, ``body_encoding``, ``stream_events``) as
JSON text, always a string (``json.loads`` gives the value back, ``"null"`` when
absent); fields this
version does not know in ``extra`` (JSON text of an object).

``--dedupe``: agents resend the whole history on every call, so a session of
50 calls holds 50 growing prefixes of one conversation.  Within a session, a
conversation whose messages (thinking ignored) are a proper prefix of another
conversation's is dropped, and of identical conversations only the first is
kept.  A fork (two different continuations of a shared prefix) keeps both
branches.  With ``--format records``, records that are not conversations
(embeddings, errors, ...) are all kept.  Two passes over the data dir keep memory small (hashes only).

``--split R``: rows go to ``<out stem>.train.jsonl`` or ``<out stem>.test.jsonl``
by a hash of the conversation's opening (messages up to and including the first
user message), so every prefix and fork of one conversation lands on the same
side; a fraction R goes to train.  Rows without a conversation (``records``
format, non-chat records) are split by record id.

Exit codes: 0 rows written, 1 nothing matched (an empty output is still
written), 2 bad usage or an unreadable data dir.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict, deque
from datetime import datetime, timedelta, timezone

from proxy_llm import reader
from proxy_llm.depth import too_deep
from proxy_llm.memo import Memo

__all__ = ["add_arguments", "run", "convert", "Skip", "Conversation", "FORMATS"]

FORMATS = ("openai-chat", "sharegpt", "records")
ENDINGS = reader.ENDINGS
CHAT_DIALECTS = ("openai_chat", "openai_responses", "anthropic_messages", "gemini")
PROGRESS_MIN_BYTES = 16 * 1024 * 1024

# The records format: typed columns for the schema's required scalar fields; JSON text
# (always a string, "null" when absent) for free-shaped and optional fields.  Loaders that
# fix the schema from the first rows (``datasets`` infers it from the first 10 MB) then
# never meet a column that was all-null or a struct that grows new keys further down.
TYPED_FIELDS = (
    "schema_version", "id", "timestamp", "session_id", "session_source", "provider",
    "provider_type", "dialect", "endpoint", "method", "query", "model", "stream",
    "status_code", "ended", "duration", "request_bytes", "response_bytes",
)
JSON_TEXT_FIELDS = (
    "request_headers", "request_body", "response_headers", "response_body",
    "error", "tokens_used", "ttft_ms", "truncated", "stream_truncated",
    "reassembly_error", "decode_error", "body_encoding", "stream_events",
)


class UsageError(Exception):
    """Bad command-line values; ``str(exc)`` is the one-line message."""


class Skip(Exception):
    """A record that cannot be exported (as a conversation); ``reason`` is the summary key."""

    def __init__(self, reason: str) -> None:
        Exception.__init__(self, reason)
        self.reason = reason


class Counter(dict):
    """A small counter (``collections.Counter`` without the surprises of ``+``)."""

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self[key] = self.get(key, 0) + n

    def text(self) -> str:
        return ", ".join("%s %d" % (k, v) for k, v in sorted(self.items()))


# ============================================================== conversion
#
# Internal message: {"role", "parts": [{"type": "text", "text"} |
# {"type": "image", "url"}], "thinking": [str], "tool_calls": [{"id", "name",
# "arguments": str}], "tool_call_id": str|None, "name": str|None}.
# Rendering (openai-chat, sharegpt) decides what the flags include.


class Conversation(object):
    """The messages (internal form) and OpenAI function tools of one record."""

    __slots__ = ("messages", "tools")

    def __init__(self, messages: list, tools: list) -> None:
        self.messages = messages
        self.tools = tools


def _msg(role: str) -> dict:
    return {"role": role, "parts": [], "thinking": [], "tool_calls": [], "tool_call_id": None, "name": None}


def _text(parts: list, text) -> None:
    if isinstance(text, str) and text:
        parts.append({"type": "text", "text": text})


def _list(value) -> list:
    """``value`` if it is a list, else ``[]``: the odd field of a damaged or hand-edited
    record (``"tools": 5``, ``"summary": true``) is ignored, never iterated."""
    return value if isinstance(value, list) else []


def _hashable(value):
    """``value`` as a dict key: a list or object (a damaged record) by its JSON text."""
    if isinstance(value, (list, dict)):
        return ("json", json.dumps(value, sort_keys=True))
    return value


def _dumps(value) -> str:
    """JSON text of ``value``; Skip("non_finite") for NaN or Infinity, which JSON cannot hold."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise Skip("non_finite")


def _json_text(value) -> str:
    if isinstance(value, str):
        return value
    return _dumps(value)


def _parts_text(parts: list) -> str:
    return "\n".join(p["text"] for p in parts if p["type"] == "text")


def _get(d: dict, *keys):
    """The first of ``keys`` present in ``d`` (Gemini accepts camelCase and snake_case)."""
    for key in keys:
        if key in d:
            return d[key]
    return None


def _function_tool(name, description=None, parameters=None):
    fn = {"name": name}
    if isinstance(description, str):
        fn["description"] = description
    if isinstance(parameters, dict):
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


def _assistant_has_content(m: dict) -> bool:
    return bool(m["parts"] or m["tool_calls"] or m["thinking"])


# ---------------------------------------------------------------- OpenAI chat

def _openai_parts(content, parts: list, dropped: Counter) -> None:
    if isinstance(content, str):
        _text(parts, content)
        return
    if not isinstance(content, list):
        return
    for part in content:
        if isinstance(part, str):
            _text(parts, part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            _text(parts, part.get("text"))
        elif kind == "refusal":
            _text(parts, part.get("refusal"))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                parts.append({"type": "image", "url": url})
        elif kind == "input_audio":
            dropped.add("audio")
        elif kind == "file":
            dropped.add("file")
        else:
            dropped.add("part:%s" % kind)


def _openai_message(m: dict, dropped: Counter):
    role = m.get("role")
    if role == "developer":
        role = "system"
    if role == "function":  # legacy function result
        out = _msg("tool")
        out["name"] = m.get("name") if isinstance(m.get("name"), str) else None
        _openai_parts(m.get("content"), out["parts"], dropped)
        return out
    if role not in ("system", "user", "assistant", "tool"):
        dropped.add("role:%s" % role)
        return None
    out = _msg(role)
    _openai_parts(m.get("content"), out["parts"], dropped)
    if role == "assistant":
        if not out["parts"]:
            _text(out["parts"], m.get("refusal"))
        audio = m.get("audio")
        if isinstance(audio, dict):  # an audio answer, or its {"id"} in the history
            dropped.add("audio")
            if not out["parts"]:
                _text(out["parts"], audio.get("transcript"))
        for key in ("reasoning_content", "reasoning"):
            if isinstance(m.get(key), str) and m[key]:
                out["thinking"].append(m[key])
                break
        if any(isinstance(a, dict) and a.get("type") == "url_citation" for a in _list(m.get("annotations"))):
            raise Skip("unsupported_tool_call")  # a search model's answer: the search left no call
        for call in _list(m.get("tool_calls")):
            if not isinstance(call, dict):
                continue
            fn = call.get("function")
            if call.get("type", "function") != "function":
                raise Skip("unsupported_tool_call")  # a custom (free-form) tool's call
            if not isinstance(fn, dict):
                dropped.add("tool_call:%s" % call.get("type"))
                continue
            out["tool_calls"].append({"id": call.get("id"), "name": fn.get("name"),
                                      "arguments": _json_text(fn.get("arguments", ""))})
        legacy = m.get("function_call")
        if isinstance(legacy, dict):
            out["tool_calls"].append({"id": None, "name": legacy.get("name"),
                                      "arguments": _json_text(legacy.get("arguments", ""))})
    elif role == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
    if isinstance(m.get("name"), str) and role in ("system", "user", "assistant"):
        out["name"] = m["name"]
    return out


def _openai_pair(m: dict, out: list, pending: list) -> list:
    """Ids for the calls and results of the legacy ``functions`` API, which has none: a call
    without an id gets ``call_<m>_<k>`` (message index, call index), as Gemini calls do, and a
    result without one answers the first unanswered call of the last assistant message with
    its name, else the first unanswered call.  Returns the new unanswered calls."""
    if m["role"] == "assistant":
        for k, call in enumerate(m["tool_calls"]):
            if not isinstance(call["id"], str) or not call["id"]:
                call["id"] = "call_%d_%d" % (len(out), k)
        return [[_hashable(c["name"]), c["id"]] for c in m["tool_calls"]]
    if m["role"] != "tool":
        return []
    return _answer(m, m["name"], pending)


def _answer(m: dict, name, pending: list) -> list:
    """Give the tool message ``m`` without a ``tool_call_id`` the first of ``pending`` ([name
    key, id] of unanswered calls) named ``name``, else the first; returns the calls left."""
    if isinstance(m["tool_call_id"], str) and m["tool_call_id"]:
        return [c for c in pending if c[1] != m["tool_call_id"]]
    if pending:
        named = [c for c in pending if c[0] == _hashable(name)]
        chosen = (named or pending)[0]
        m["tool_call_id"] = chosen[1]
        return [c for c in pending if c is not chosen]
    return pending


def _from_openai_chat(req: dict, resp, dropped: Counter) -> Conversation:
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise Skip("bad_body")
    out = []
    pending = []  # [name, id] of the last assistant message's calls not answered yet
    for m in messages:
        if isinstance(m, dict):
            conv = _openai_message(m, dropped)
            if conv is not None:
                pending = _openai_pair(conv, out, pending)
                out.append(conv)
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Skip("no_response")
    dropped.add("choice", len(choices) - 1)
    message = choices[0].get("message") or choices[0].get("delta")
    if not isinstance(message, dict):
        raise Skip("no_response")
    message = dict(message, role="assistant")
    conv = _openai_message(message, dropped)
    last = messages[-1] if messages else None
    if out and out[-1]["role"] == "assistant" and isinstance(last, dict) and last.get("role") == "assistant" \
            and last.get("prefix") is True:  # DeepSeek / Mistral prefix completion
        _continue(out[-1], [conv])
        _openai_pair(out[-1], out[:-1], pending)
    else:
        _openai_pair(conv, out, pending)
        out.append(conv)
    tools = []
    for tool in _list(req.get("tools")):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict):
            tools.append(_function_tool(fn.get("name"), fn.get("description"), fn.get("parameters")))
        else:
            dropped.add("server_tool")
    for fn in _list(req.get("functions")):
        if isinstance(fn, dict):
            tools.append(_function_tool(fn.get("name"), fn.get("description"), fn.get("parameters")))
    return Conversation(out, tools)


# ---------------------------------------------------------------- OpenAI Responses

class _ResponsesBuilder(object):
    """Folds Responses API items into messages; assistant-side items merge into one message."""

    def __init__(self, dropped: Counter) -> None:
        self.messages = []
        self.dropped = dropped
        self.pending_thinking = []
        self.open_assistant = None
        self.started = False  # an item other than an item_reference has been read
        self.answering = False  # the response's output items are being read
        self.known = None  # (a conversation rebuilt from earlier records) item id -> item read

    def _assistant(self) -> dict:
        if self.open_assistant is None:
            self.open_assistant = _msg("assistant")
            self.messages.append(self.open_assistant)
        if self.pending_thinking:
            self.open_assistant["thinking"].extend(self.pending_thinking)
            self.pending_thinking = []
        return self.open_assistant

    def close(self) -> None:
        """End the current assistant turn (at the request/response boundary)."""
        if self.pending_thinking:
            self._assistant()
        self.open_assistant = None

    def _content(self, content, parts: list) -> None:
        if isinstance(content, str):
            _text(parts, content)
            return
        for part in _list(content):
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("input_text", "output_text", "text"):
                _text(parts, part.get("text"))
            elif kind == "refusal":
                _text(parts, part.get("refusal"))
            elif kind == "input_image":
                url = part.get("image_url")
                if isinstance(url, str):
                    parts.append({"type": "image", "url": url})
                else:
                    self.dropped.add("image_file_id")
            elif kind == "input_audio":
                self.dropped.add("audio")
            elif kind == "input_file":
                self.dropped.add("file")
            else:
                self.dropped.add("part:%s" % kind)

    def item(self, item) -> None:
        if isinstance(item, str):
            item = {"role": "user", "content": item}
        if not isinstance(item, dict):
            return
        role = item.get("role")
        kind = item.get("type")
        if kind is None:  # an EasyInputMessage has a role and no type; a reference may be {"id"} alone
            kind = "item_reference" if role is None and "id" in item else "message"
        if kind == "item_reference":
            found = self.known.get(item.get("id")) if self.known is not None else None
            if found is None:
                self._reference()
            else:  # an item of the earlier turns this conversation was rebuilt from
                self.item(found)
            return
        if kind == "compaction" or kind == "compaction_trigger":
            self._compaction(kind)
            return
        self.started = True
        if self.known is not None and isinstance(item.get("id"), str):
            self.known[item["id"]] = item
        if kind == "message" and role == "assistant":
            self._content(item.get("content"), self._assistant()["parts"])
        elif kind == "message" and role in ("user", "system", "developer"):
            self.close()
            m = _msg("system" if role == "developer" else role)
            self._content(item.get("content"), m["parts"])
            self.messages.append(m)
        elif kind == "function_call":
            self._assistant()["tool_calls"].append({
                "id": item.get("call_id") or item.get("id"), "name": item.get("name"),
                "arguments": _json_text(item.get("arguments", ""))})
        elif kind == "function_call_output":
            self.close()
            m = _msg("tool")
            m["tool_call_id"] = item.get("call_id")
            output = item.get("output")
            if isinstance(output, list):
                self._content(output, m["parts"])
            else:
                _text(m["parts"], _json_text(output) if output is not None else "")
            self.messages.append(m)
        elif kind == "reasoning":
            texts = [s.get("text") for s in _list(item.get("summary"))
                     if isinstance(s, dict) and isinstance(s.get("text"), str) and s.get("text")]
            texts += [c.get("text") for c in _list(item.get("content"))
                      if isinstance(c, dict) and isinstance(c.get("text"), str) and c.get("text")]
            if texts:
                self.pending_thinking.append("\n".join(texts))
            elif item.get("encrypted_content"):
                self.dropped.add("encrypted_reasoning")
        elif kind == "mcp_list_tools":  # lists the tools of an MCP server: no turn
            self.dropped.add("item:mcp_list_tools")
        elif _unsupported_item(kind):
            raise Skip("unsupported_tool_call")
        else:  # a type this version does not know: what it says is not in the row
            raise Skip("unknown_item")

    def _compaction(self, kind: str) -> None:
        """OpenAI's compaction: a ``compaction`` item is the provider's encrypted summary of the
        context before it (``/v1/responses/compact`` answers with the user messages and one, and
        a response compacted on its way may hold one in its output), which the model then reads
        in place of that context; a ``compaction_trigger`` (the last input item) asks for one.
        In the output it is left out, counted (the answer follows it).  In the input, before any
        other item it stands for the earlier turns as a leading ``item_reference`` does: left
        out, counted.  After one, what the model read from there on is a summary the row cannot
        hold: Skip("compaction").  A trigger is left out, counted (its answer is a compaction,
        no answer to export: ``no_response``)."""
        if self.answering or kind == "compaction_trigger":
            self.dropped.add("item:%s" % kind)
        elif self.started:
            raise Skip("compaction")
        else:
            self.dropped.add("compaction")

    def _reference(self) -> None:
        """An ``item_reference`` stands for an item stored by the provider, not in the record
        (nor among the earlier turns a rebuilt conversation holds: ``known``).  Before any other
        item of the input it stands for earlier turns, as a ``previous_response_id`` does (they
        are in the earlier records): it is left out, counted.  After one (the earlier turns of a
        rebuilt conversation included), the conversation has a hole where it stands:
        Skip("item_reference")."""
        if self.started:
            raise Skip("item_reference")
        self.dropped.add("item_reference")


def _unsupported_item(kind) -> bool:
    """Whether a Responses API item is a call (or its output) of a tool other than a function:
    built-in tools the provider runs (``web_search_call``, ``file_search_call``,
    ``code_interpreter_call``, ``image_generation_call``, ``mcp_call`` and the MCP approvals),
    and tools the client runs with no function form (``computer_call``, ``local_shell_call``,
    ``custom_tool_call`` and their ``*_output``).  Dropped, they would leave an answer resting
    on a search, a run or an action with no trace of it.  ``mcp_list_tools`` only lists tools."""
    return isinstance(kind, str) and kind != "mcp_list_tools" and (
        kind.endswith("_call") or kind.endswith("_call_output") or kind.startswith("mcp_"))


def _from_responses(req: dict, resp, dropped: Counter, chain=None) -> Conversation:
    """``chain``: the earlier turns (:class:`_Turn`, oldest first) the request continues with
    its ``previous_response_id``: their input and output items come before its own input.
    Only this request's ``instructions`` are the system message: the API inserts them as the
    first item of the context and does not carry a previous response's over."""
    builder = _ResponsesBuilder(dropped)
    instructions = req.get("instructions")
    if isinstance(instructions, str) and instructions:
        m = _msg("system")
        _text(m["parts"], instructions)
        builder.messages.append(m)
    if chain:
        builder.known = {}
        for turn in chain:
            for items in (turn.input, turn.output):
                for item in items:
                    builder.item(item)
                builder.close()
    items = req.get("input")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise Skip("bad_body")
    for item in items:
        builder.item(item)
    builder.close()
    output = resp.get("output") if isinstance(resp, dict) else None
    if not isinstance(output, list) or not output:
        raise Skip("no_response")
    start = len(builder.messages)
    builder.answering = True
    for item in output:
        builder.item(item)
    builder.close()
    if not any(m["role"] == "assistant" for m in builder.messages[start:]):
        raise Skip("no_response")
    tools = []
    for tool in _list(req.get("tools")):
        if isinstance(tool, dict) and tool.get("type") == "function":
            tools.append(_function_tool(tool.get("name"), tool.get("description"), tool.get("parameters")))
        else:
            dropped.add("server_tool")
    return Conversation(builder.messages, tools)


# ---------------------------------------------------------------- Anthropic

def _anthropic_image(block: dict, parts: list, dropped: Counter) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        dropped.add("image")
        return
    if source.get("type") == "base64":
        parts.append({"type": "image", "url": "data:%s;base64,%s" % (source.get("media_type"), source.get("data"))})
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        parts.append({"type": "image", "url": source["url"]})
    else:
        dropped.add("image_file_id")


def _anthropic_tool_result(block: dict, dropped: Counter) -> dict:
    m = _msg("tool")
    m["tool_call_id"] = block.get("tool_use_id")
    if block.get("is_error") is True:  # the format has no such flag: the text is kept, the flag counted
        dropped.add("tool_result_is_error")
    content = block.get("content")
    if isinstance(content, str):
        _text(m["parts"], content)
    for sub in _list(content):
        if not isinstance(sub, dict):
            continue
        if sub.get("type") == "text":
            _text(m["parts"], sub.get("text"))
        elif sub.get("type") == "image":
            dropped.add("tool_result_image")
        else:
            dropped.add("block:%s" % sub.get("type"))
    return m


def _anthropic_message(role: str, content, dropped: Counter) -> list:
    """One Anthropic message -> internal messages (tool results become ``tool`` messages first)."""
    m = _msg(role)
    tool_messages = []
    if isinstance(content, str):
        _text(m["parts"], content)
        content = []
    for block in _list(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            _text(m["parts"], block.get("text"))
        elif kind == "image":
            _anthropic_image(block, m["parts"], dropped)
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str) and block["thinking"]:
                m["thinking"].append(block["thinking"])
        elif kind == "redacted_thinking":
            dropped.add("redacted_thinking")
        elif kind == "tool_use":
            m["tool_calls"].append({"id": block.get("id"), "name": block.get("name"),
                                    "arguments": _json_text(block.get("input", {}))})
        elif kind == "tool_result":
            tool_messages.append(_anthropic_tool_result(block, dropped))
        elif kind == "document":
            dropped.add("document")
        elif kind in ("server_tool_use", "mcp_tool_use", "mcp_tool_result") \
                or (isinstance(kind, str) and kind.endswith("_tool_result")):
            raise Skip("unsupported_tool_call")  # web search, web fetch, code execution, MCP, ...
        else:  # container_upload, search_result, ...
            dropped.add("block:%s" % kind)
    if role == "assistant" or m["parts"] or not tool_messages:
        return tool_messages + [m]
    return tool_messages


def _continue(prefill: dict, answer: list) -> None:
    """Fold the ``answer`` (its internal messages) to a prefill (a request ending with an
    assistant message) into the prefill's message: its text continues the prefill's last text
    with no separator; the answer's other parts, thinking and tool calls follow the prefill's.
    Skip("no_response") when the answer is empty (only the prefill would be exported)."""
    if len(answer) != 1 or not _assistant_has_content(answer[0]):
        raise Skip("no_response")
    answer = answer[0]
    parts = answer["parts"]
    if prefill["parts"] and parts and prefill["parts"][-1]["type"] == "text" and parts[0]["type"] == "text":
        prefill["parts"][-1] = {"type": "text", "text": prefill["parts"][-1]["text"] + parts[0]["text"]}
        parts = parts[1:]
    prefill["parts"].extend(parts)
    prefill["thinking"].extend(answer["thinking"])
    prefill["tool_calls"].extend(answer["tool_calls"])


def _from_anthropic(req: dict, resp, dropped: Counter) -> Conversation:
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise Skip("bad_body")
    out = []
    system = req.get("system")
    if system:
        m = _msg("system")
        if isinstance(system, str):
            _text(m["parts"], system)
        else:
            for block in _list(system):
                if isinstance(block, dict) and block.get("type") == "text":
                    _text(m["parts"], block.get("text"))
        out.append(m)
    for message in messages:
        if isinstance(message, dict) and message.get("role") in ("user", "assistant"):
            out.extend(_anthropic_message(message["role"], message.get("content"), dropped))
    if not isinstance(resp, dict) or not isinstance(resp.get("content"), list):
        raise Skip("no_response")
    answer = _anthropic_message("assistant", resp["content"], dropped)
    if out and out[-1]["role"] == "assistant" and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        _continue(out[-1], answer)  # a prefill: the answer continues it
    else:
        out.extend(answer)
    tools = []
    builtin = set()  # names of the tools Anthropic defines (bash, computer, text editor, ...)
    for tool in _list(req.get("tools")):
        if isinstance(tool, dict) and "input_schema" in tool and tool.get("type", "custom") == "custom":
            tools.append(_function_tool(tool.get("name"), tool.get("description"), tool.get("input_schema")))
        else:
            dropped.add("server_tool")
            if isinstance(tool, dict):
                builtin.add(_hashable(tool.get("name")))
    # The client runs these, called by ordinary tool_use blocks; their schema is the model's own.
    _check_builtin_calls(out, tools, builtin)
    return Conversation(out, tools)


# ---------------------------------------------------------------- Gemini

def _gemini_content(role: str, parts, out: list, dropped: Counter) -> None:
    """Append the internal messages of one Gemini ``content`` to ``out``.

    In a model turn, consecutive text parts of one kind (thought or not) are one text, joined
    as they are, as the provider streams a turn in pieces and the recorder's reassembly (and
    the SDK's ``text``) joins them: a history that holds the turn as it was streamed, a part
    or a content per chunk, then reads as the answer that turn's record holds."""
    m = _msg(role)
    tool_messages = []
    index = len(out)
    pending = []  # [name key, id] of the last assistant message's calls, for responses without id
    for prev in reversed(out):
        if prev["role"] == "assistant":
            pending = [[_hashable(call["name"]), call["id"]] for call in prev["tool_calls"]]
            break
    last = None  # (model turn) the kind of the part before: "text", "thought", or None
    for part in _list(parts):
        if not isinstance(part, dict):
            continue
        call = _get(part, "functionCall", "function_call")
        result = _get(part, "functionResponse", "function_response")
        inline = _get(part, "inlineData", "inline_data")
        file_data = _get(part, "fileData", "file_data")
        kind = None
        if isinstance(part.get("text"), str):
            text = part["text"]
            kind = "thought" if part.get("thought") else "text"
            if not text:
                kind = last  # (an empty part, as a signature's, joins nothing and parts nothing)
            elif role != "assistant" or kind != last:
                if kind == "thought":
                    m["thinking"].append(text)
                else:
                    _text(m["parts"], text)
            elif kind == "thought":
                m["thinking"][-1] += text
            else:
                m["parts"][-1]["text"] += text
        elif isinstance(call, dict):
            call_id = call.get("id") or "call_%d_%d" % (index, len(m["tool_calls"]))
            m["tool_calls"].append({"id": call_id, "name": call.get("name"),
                                    "arguments": _json_text(call.get("args", {}))})
        elif isinstance(result, dict):
            t = _msg("tool")
            t["tool_call_id"] = result.get("id")
            pending = _answer(t, result.get("name"), pending)
            _text(t["parts"], _json_text(result.get("response", {})))
            tool_messages.append(t)
        elif isinstance(inline, dict):
            mime = str(_get(inline, "mimeType", "mime_type") or "")
            if mime.startswith("image/"):
                m["parts"].append({"type": "image", "url": "data:%s;base64,%s" % (mime, inline.get("data"))})
            else:
                dropped.add("audio" if mime.startswith("audio/") else "file")
        elif isinstance(file_data, dict):
            mime = str(_get(file_data, "mimeType", "mime_type") or "")
            uri = _get(file_data, "fileUri", "file_uri")
            if mime.startswith("image/") and isinstance(uri, str):
                m["parts"].append({"type": "image", "url": uri})
            else:
                dropped.add("file")
        elif any(k in part for k in ("executableCode", "codeExecutionResult",
                                     "executable_code", "code_execution_result")):
            raise Skip("unsupported_tool_call")  # code execution, run by the provider
        last = kind
    out.extend(tool_messages)
    if role == "assistant" or m["parts"] or not tool_messages:
        out.append(m)


def _grounded(candidate: dict) -> bool:
    """Whether a Gemini answer rests on a Google Search or URL context the provider ran: its
    ``groundingMetadata`` names queries or sources, or its ``urlContextMetadata`` URLs (the
    answer's parts hold no trace of them)."""
    grounding = _get(candidate, "groundingMetadata", "grounding_metadata")
    if isinstance(grounding, dict) and any(_get(grounding, *keys) for keys in (
            ("webSearchQueries", "web_search_queries"), ("groundingChunks", "grounding_chunks"))):
        return True
    urls = _get(candidate, "urlContextMetadata", "url_context_metadata")
    return isinstance(urls, dict) and bool(_get(urls, "urlMetadata", "url_metadata"))


def _json_schema(schema):
    """A Gemini ``Schema`` (OpenAPI style: ``"type": "OBJECT"``, as the google-genai SDK sends
    it) as JSON Schema: every ``type`` lower-case (``TYPE_UNSPECIFIED`` removed), through
    ``properties``, ``items``, ``anyOf`` and ``additionalProperties``; other keys are kept."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type":
            if isinstance(value, str):
                if value.upper() == "TYPE_UNSPECIFIED":
                    continue
                value = value.lower()
            elif isinstance(value, list):
                value = [v.lower() if isinstance(v, str) else v for v in value]
        elif key == "properties" and isinstance(value, dict):
            value = {name: _json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = _json_schema(value)
        elif key in ("anyOf", "any_of") and isinstance(value, list):
            value = [_json_schema(sub) for sub in value]
        out[key] = value
    return out


def _from_gemini(req: dict, resp, dropped: Counter, endpoint: str) -> Conversation:
    if ":generateContent" not in endpoint and ":streamGenerateContent" not in endpoint:
        raise Skip("not_chat")
    contents = req.get("contents")
    if not isinstance(contents, list):
        raise Skip("bad_body")
    out = []
    system = _get(req, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        m = _msg("system")
        for part in _list(system.get("parts")):
            if isinstance(part, dict):
                _text(m["parts"], part.get("text"))
        out.append(m)
    # The SDK's chat keeps a streamed answer as a model content per chunk: consecutive model
    # contents are one turn, as the answer was one.
    turns = []  # [role, parts]
    for content in contents:
        if isinstance(content, dict):
            role = "assistant" if content.get("role") == "model" else "user"
            if role == "assistant" and turns and turns[-1][0] == role:
                turns[-1][1] = turns[-1][1] + _list(content.get("parts"))
            else:
                turns.append([role, _list(content.get("parts"))])
    for role, parts in turns:
        _gemini_content(role, parts, out, dropped)
    bodies = resp if isinstance(resp, list) else [resp]
    reply_parts = []
    for body in bodies:
        candidates = body.get("candidates") if isinstance(body, dict) else None
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            if body is bodies[0]:
                dropped.add("choice", len(candidates) - 1)
            if _grounded(candidates[0]):
                raise Skip("unsupported_tool_call")
            content = candidates[0].get("content")
            if isinstance(content, dict) and isinstance(content.get("parts"), list):
                reply_parts.extend(content["parts"])
    if not reply_parts:
        raise Skip("no_response")
    _gemini_content("assistant", reply_parts, out, dropped)
    tools = []
    computer_use = False
    for tool in _list(req.get("tools")):
        decls = _get(tool, "functionDeclarations", "function_declarations") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and _get(tool, "computerUse", "computer_use") is not None:
            computer_use = True
        if isinstance(decls, list):
            for d in decls:
                if isinstance(d, dict):
                    params = d.get("parameters")
                    if isinstance(params, dict):
                        params = _json_schema(params)
                    else:  # already JSON Schema
                        params = _get(d, "parametersJsonSchema", "parameters_json_schema")
                    tools.append(_function_tool(d.get("name"), d.get("description"), params))
        else:
            dropped.add("server_tool")
    # Computer use: the model calls its predefined functions (click_at, ...) by ordinary
    # functionCall parts, declared by none of the request's functionDeclarations.
    _check_builtin_calls(out, tools, ANY if computer_use else set())
    return Conversation(out, tools)


ANY = None  # every name: see _check_builtin_calls


def _check_builtin_calls(messages: list, tools: list, builtin) -> None:
    """Skip("unsupported_tool_call") when a call of ``messages`` is not to a declared function
    but to a tool the provider defines and the client runs (its names ``builtin``, or ANY name
    not declared): its declaration is not a function (dropped, counted ``server_tool``), so
    the row would call a tool its ``tools`` do not hold, whose schema is the model's own."""
    declared = {_hashable(tool["function"]["name"]) for tool in tools}
    for m in messages:
        for call in m["tool_calls"]:
            name = _hashable(call["name"])
            if name not in declared and (builtin is ANY or name in builtin):
                raise Skip("unsupported_tool_call")


def convert(record: dict, dropped: Counter | None = None, chain=None) -> Conversation:
    """The conversation of one record: request history + the response's assistant message.

    Raises Skip(reason) for records that are not chat-like or have no usable answer;
    counts parts that can never be exported into ``dropped`` (see module docstring).
    ``chain``: for a Responses API record, the earlier turns its ``previous_response_id``
    continues (:meth:`ChainIndex.chain`), or None.
    """
    if dropped is None:
        dropped = Counter()
    dialect = record.get("dialect")
    if dialect not in CHAT_DIALECTS:
        raise Skip("not_chat")
    status = record.get("status_code")
    if not isinstance(status, int) or not 200 <= status < 300 or record.get("error"):
        raise Skip("error")
    if (isinstance(record.get("truncated"), dict) and record["truncated"]) or record.get("stream_truncated") is True:
        raise Skip("truncated")  # (a body cut at capture_max_body; an event past max_sse_event left out)
    req, resp = record.get("request_body"), record.get("response_body")
    if not isinstance(req, dict) or not isinstance(resp, (dict, list)):
        # (A body kept as its text: not JSON, nested past what the loaders take, a stream
        # whose reassembly failed.)
        raise Skip("bad_body")
    if _stopped_at_max_tokens(dialect, resp):
        raise Skip("max_tokens")
    if dialect == "openai_chat":
        conv = _from_openai_chat(req, resp, dropped)
    elif dialect == "openai_responses":
        conv = _from_responses(req, resp, dropped, chain)
    elif dialect == "anthropic_messages":
        conv = _from_anthropic(req, resp, dropped)
    else:
        conv = _from_gemini(req, resp, dropped, str(record.get("endpoint") or ""))
    conv.messages = [m for m in _pair_check(conv.messages, dropped) if m["role"] != "system" or m["parts"]]
    for m in conv.messages:
        for call in m["tool_calls"]:
            call["arguments"] = _arguments(call["arguments"])
    if not conv.messages or conv.messages[-1]["role"] != "assistant" or not _assistant_has_content(conv.messages[-1]):
        raise Skip("no_response")
    return conv


def _stopped_at_max_tokens(dialect: str, resp) -> bool:
    """Whether the answer stopped at its token limit, cut mid-way: OpenAI chat's
    ``finish_reason: "length"``, a Responses ``status: "incomplete"`` for
    ``max_output_tokens``, Anthropic's ``stop_reason: "max_tokens"`` (or the context window's),
    Gemini's ``finishReason: "MAX_TOKENS"`` (a JSON-array stream's last)."""
    if isinstance(resp, list):  # (Gemini's streamed JSON array, as an older record holds it)
        resp = resp[-1] if resp else None
    if not isinstance(resp, dict):
        return False
    if dialect == "openai_chat":
        choices = resp.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        return isinstance(first, dict) and first.get("finish_reason") == "length"
    if dialect == "openai_responses":
        details = resp.get("incomplete_details")
        return resp.get("status") == "incomplete" and isinstance(details, dict) and (
            details.get("reason") == "max_output_tokens")
    if dialect == "anthropic_messages":
        return resp.get("stop_reason") in ("max_tokens", "model_context_window_exceeded")
    candidates = resp.get("candidates")
    first = candidates[0] if isinstance(candidates, list) and candidates else None
    return isinstance(first, dict) and _get(first, "finishReason", "finish_reason") == "MAX_TOKENS"


def _arguments(text) -> str:
    """A call's arguments as the format takes them, the JSON text of an object (the readers
    ``json.loads`` it): an empty text (a call without arguments, as some OpenAI-compatible
    servers send it) is ``{}``; anything else that is not a JSON object (a model's broken JSON,
    NaN, a list, nested past what a parser takes) is Skip("bad_tool_arguments").

    An agent's every request resends the calls before it, so the same texts come again and
    again: the verdicts of the last ones are remembered (``_VERDICTS``), not parsed anew."""
    if not isinstance(text, str):
        raise Skip("bad_tool_arguments")
    verdict = _VERDICTS.get(text)
    if verdict is None:
        verdict = _VERDICTS.remember(text, _verdict(text), len(text))
    if not verdict:
        raise Skip("bad_tool_arguments")
    return verdict


def _verdict(text: str) -> str:
    """:func:`_arguments`' answer for a text: what it returns, or "" for a Skip."""
    if not text.strip():
        return "{}"
    try:
        if too_deep(text):
            return ""
        value = _ARGUMENTS_JSON.decode(text)
    except (ValueError, RecursionError):
        return ""
    return text if isinstance(value, dict) else ""


def _pair_check(messages: list, dropped: Counter) -> list:
    """The rule of the OpenAI chat format: a ``tool`` message answers a call of the assistant
    message before it (only tool messages between).  A call still without an id (a damaged
    record) gets ``call_<m>_<k>``; a result that answers no such call (its call is not in the
    record, or was damaged) is dropped, counted ``orphan_tool_result``."""
    out = []
    calls = set()
    for index, m in enumerate(messages):
        if m["role"] == "assistant":
            for k, call in enumerate(m["tool_calls"]):
                if not isinstance(call["id"], str) or not call["id"]:
                    call["id"] = "call_%d_%d" % (index, k)
            calls = {call["id"] for call in m["tool_calls"]}
        elif m["role"] == "tool":
            if not isinstance(m["tool_call_id"], str) or m["tool_call_id"] not in calls:
                dropped.add("orphan_tool_result")
                continue
        else:
            calls = set()
        out.append(m)
    return out


# ============================================================== Responses API chains

class _Turn(object):
    """One Responses API exchange a later request can continue: its request's input items and
    its response's output items (the parsed record's own lists: nothing is copied), the
    response id it continued (or None), its session, and its size for the bound."""

    __slots__ = ("parent", "session", "input", "output", "size")

    def __init__(self, parent, session, input_: list, output: list, size: int) -> None:
        self.parent = parent
        self.session = session
        self.input = input_
        self.output = output
        self.size = size


# Statuses of a response a later request can continue: the API keeps an incomplete response
# (cut at its token limit) as context as well; a failed one is an error record, never indexed.
_CONTINUABLE = ("completed", "incomplete", None)


class ChainIndex(object):
    """The Responses API turns of an export, by response id, so that a request sent with
    ``previous_response_id`` (which holds only its new input) is exported with the earlier
    turns it continues.

    Fed every record read, in read order: :meth:`read` for those that pass the filters,
    :meth:`forget` for the others.  A record is indexed when a later request can continue it:
    ``openai_responses``, answered (2xx, no ``error``, nothing cut), its response ``completed``
    or ``incomplete`` with an ``id``, and not sent with ``store: false`` (the API keeps no such
    response to continue).  Memory: the turns are kept least recently used first up to
    ``max_bytes``, counted as their records' ``request_bytes + response_bytes`` (continuing a
    turn, or a later turn of its chain, uses it again); the ids of the responses read but not
    held (filtered out, failed, pushed out by the bound) are kept, ids only, in ``gone``.

    Conversations (a request sent with ``conversation``) are held in ``turns`` too, whole, under
    ``("conversation", id)``: a :class:`_Conversation` of the records that made it and added
    items to it, in the same bound (pushed out, its key is in ``gone``)."""

    MAX_BYTES = 128 * 1024 * 1024

    def __init__(self, max_bytes: int | None = None) -> None:
        self.turns = OrderedDict()  # response id -> _Turn, least recently used first
        self.max_bytes = self.MAX_BYTES if max_bytes is None else max_bytes
        self.bytes = 0
        self.gone = {}  # response id read but not held -> True when the bound pushed it out

    def forget(self, rec: dict) -> None:
        """A record left out by the filters: a request continuing it starts after it; a
        request of a conversation it may have added items to is exported as it is."""
        if rec.get("dialect") == "openai_responses":
            self._gone(rec.get("response_body"))
            req = rec.get("request_body")
            cid = _conversation_id(req) if isinstance(req, dict) else None
            if cid is not None and not _rejected(rec):
                self._entry(cid, rec, None)
        else:
            self._conversations_api(rec, False)

    def _gone(self, resp) -> None:
        rid = resp.get("id") if isinstance(resp, dict) else None
        if isinstance(rid, str) and rid and rid not in self.turns:
            self.gone[rid] = False

    def read(self, rec: dict) -> tuple:
        """(what ``rec``'s request continues: the ``previous_response_id``, or
        ``("conversation", id)`` for a request sent with ``conversation``, else None; the chain
        of a ``previous_response_id``, see :meth:`chain`: a conversation's is known at the end
        of the read, :meth:`conversation`), then ``rec`` indexed if a later request can continue
        it.  A record of the Conversations API is indexed too (None, None)."""
        if rec.get("dialect") != "openai_responses":
            self._conversations_api(rec, True)
            return None, None
        req, resp = rec.get("request_body"), rec.get("response_body")
        if not isinstance(req, dict):
            return None, None
        prev = req.get("previous_response_id")
        if not isinstance(prev, str) or not prev:
            prev = None
        # (The API refuses previous_response_id with conversation: a record holding both is
        # continued by the first, as before.)
        cid = _conversation_id(req) if prev is None else None
        chain = self.chain(prev) if prev is not None else None
        rid = resp.get("id") if isinstance(resp, dict) else None
        items = _input_items(req)
        output = resp.get("output") if isinstance(resp, dict) else None
        turn = None
        if answered(rec) and resp.get("status") in _CONTINUABLE and req.get("store") is not False \
                and isinstance(rid, str) and rid and isinstance(items, list) and isinstance(output, list):
            turn = _Turn(prev, rec.get("session_id"), items, output, _size(rec))
        if cid is not None:
            # A response of a conversation followed the conversation's items: a request
            # continuing it with previous_response_id would need them, and is exported as it is.
            self._gone(resp)
            if turn is not None or not _rejected(rec):
                self._entry(cid, rec, turn)
            return ("conversation", cid), None
        if turn is not None:
            old = self.turns.pop(rid, None)
            if old is not None:
                self.bytes -= old.size
            self.turns[rid] = turn
            self.bytes += turn.size
            self.gone.pop(rid, None)
            self._bound()
        else:
            self._gone(resp)
        return prev, chain

    def _bound(self) -> None:
        """Push out the least recently used turns and conversations past ``max_bytes``."""
        while self.bytes > self.max_bytes and len(self.turns) > 1:
            evicted, held = self.turns.popitem(last=False)
            self.bytes -= held.size
            self.gone[evicted] = True

    # -- the Conversations API ------------------------------------------------------------

    def _conversation(self, cid: str):
        """The :class:`_Conversation` of ``cid``, made when first met; None when the bound
        pushed it out (what it held is lost: its requests are exported as they are)."""
        key = ("conversation", cid)
        if self.gone.get(key) is True:
            return None
        conv = self.turns.get(key)
        if conv is None:
            conv = self.turns[key] = _Conversation()
        self.turns.move_to_end(key)
        return conv

    def _grow(self, conv, size: int) -> None:
        conv.size += size
        self.bytes += size
        self._bound()

    def _entry(self, cid: str, rec: dict, turn) -> None:
        """Add to conversation ``cid`` what ``rec`` added to it: ``turn`` (its items), or None
        for a record whose effect is not known (not read, not stored, not answered)."""
        conv = self._conversation(cid)
        if conv is None:
            return
        when = _moment(rec)
        if when is None:  # (a damaged timestamp: the record's place is not known)
            conv.broken = True
            return
        conv.entries.append((when, str(rec.get("id")), turn))
        conv.ordered = False
        self._grow(conv, turn.size if turn is not None else 0)

    def _conversations_api(self, rec: dict, read: bool) -> None:
        """Index a record of the Conversations API: ``POST .../conversations`` (its ``items``
        open the conversation), ``POST .../conversations/{id}/items`` (adds ``items``),
        ``DELETE .../conversations/{id}/items/{item}`` (removes one: what follows is not known).
        ``read``: the record passed the filters (else its items are not known either)."""
        if rec.get("dialect") != "generic":
            return
        endpoint = rec.get("endpoint")
        method = rec.get("method")
        if not isinstance(endpoint, str) or method not in ("POST", "DELETE"):
            return
        path = endpoint.rstrip("/")
        req, resp = rec.get("request_body"), rec.get("response_body")
        if method == "POST" and path.endswith("/conversations"):
            cid = resp.get("id") if isinstance(resp, dict) else None
            items = req.get("items", []) if isinstance(req, dict) else [] if req is None else None
            if not (read and answered(rec) and isinstance(cid, str) and cid
                    and (items is None or isinstance(items, list))):
                return  # (not read, or no conversation made: its requests are exported as they are)
            conv = self._conversation(cid)
            when = _moment(rec)
            if conv is None or conv.created is not None or when is None or items is None:
                if conv is not None:
                    conv.broken = True  # (two creations of one id, a damaged record)
                return
            conv.created = _Turn(None, ("conversation", cid), items, [], _size(rec))
            conv.since = when
            self._grow(conv, conv.created.size)
            return
        match = _CONVERSATION_ITEMS.search(path)
        if match is None or (method == "POST") != (match.group(2) is None) or _rejected(rec):
            return
        items = req.get("items") if isinstance(req, dict) else None
        turn = None
        if read and method == "POST" and answered(rec) and isinstance(items, list):
            turn = _Turn(None, rec.get("session_id"), items, [], _size(rec))
        self._entry(match.group(1), rec, turn)

    def conversation(self, rec: dict):
        """The turns a request sent with ``conversation`` follows, oldest first, once every
        record is read: the creation's items, then each record that added items to the
        conversation before it (by ``timestamp``).  None (the request is exported as it is)
        when the creation was not read, or a record of the conversation before it was not read
        or added what is not known."""
        req = rec.get("request_body")
        cid = _conversation_id(req) if isinstance(req, dict) else None
        conv = self.turns.get(("conversation", cid)) if cid is not None else None
        when = _moment(rec)
        if conv is None or conv.created is None or conv.broken or when is None or when < conv.since:
            return None
        self.turns.move_to_end(("conversation", cid))
        if not conv.ordered:
            conv.entries.sort(key=lambda entry: entry[:2])
            conv.ordered = True
        place = (when, str(rec.get("id")))
        chain = [conv.created]
        for entry in conv.entries:
            if entry[:2] >= place:
                break
            if entry[2] is None:
                return None
            chain.append(entry[2])
        return chain

    def chain(self, prev: str):
        """The turns a request continuing ``prev`` follows, oldest first: ``prev``'s turn, the
        one it continued, and so on back to a turn that continues none or whose earlier turn is
        not held (the conversation then starts there, as that turn's own export does).  None
        when ``prev`` itself is not held."""
        turns = []
        seen = set()
        rid = prev
        while rid is not None and rid not in seen and rid in self.turns:
            seen.add(rid)  # (a damaged record naming its own id, or a later one: no loop)
            turn = self.turns[rid]
            turns.append((rid, turn))
            rid = turn.parent
        if not turns:
            return None
        turns.reverse()
        for rid, _ in turns:  # (used again: the least recently used go first)
            self.turns.move_to_end(rid)
        return [turn for _, turn in turns]

    def missing(self, prev, chain):
        """The id of the turn ``prev``'s chain stops short of (not held), or None: it is whole
        (a damaged record naming a turn of its own chain counts as whole).  ``prev`` a
        conversation's key: that key when ``chain`` is None."""
        if chain is None:
            return prev
        if not isinstance(prev, str):
            return None
        parent = chain[0].parent
        return None if parent is None or parent in self.turns else parent

    def may_come(self, prev, chain) -> bool:
        """Whether the turn missing from ``prev``'s chain may still be read (it was not read
        yet): the record continuing it then waits for the end of the read.  A request of a
        conversation always does: any record read later may be an earlier one of it."""
        if not isinstance(prev, str):
            return True
        missing = self.missing(prev, chain)
        return missing is not None and missing not in self.gone


class _Conversation(object):
    """What the records read say of one conversation (Conversations API): its creation
    (a :class:`_Turn` of its ``items``, None until read) and its time (``since``), and the
    records that added items to it, ``(time, record id, _Turn)``, or ``(time, record id,
    None)`` for a record whose effect is not known; ``size`` counts for the bound."""

    __slots__ = ("created", "since", "entries", "ordered", "broken", "size")

    def __init__(self) -> None:
        self.created = None
        self.since = None
        self.entries = []
        self.ordered = True
        self.broken = False  # (a record of it out of time, or created twice: never rebuilt)
        self.size = 0


# POST .../conversations/{id}/items, DELETE .../conversations/{id}/items/{item id}
_CONVERSATION_ITEMS = re.compile(r"/conversations/([^/]+)/items(/[^/]+)?$")


def _conversation_id(req: dict):
    """The conversation a Responses API request names (``"conv_..."`` or ``{"id": ...}``), or
    None."""
    conv = req.get("conversation")
    if isinstance(conv, dict):
        conv = conv.get("id")
    return conv if isinstance(conv, str) and conv else None


def _input_items(req: dict):
    items = req.get("input")
    return [items] if isinstance(items, str) else items


def _size(rec: dict) -> int:
    """A record's size for the bound: ``request_bytes + response_bytes``."""
    return sum(n for n in (rec.get("request_bytes"), rec.get("response_bytes"))
               if isinstance(n, int) and not isinstance(n, bool) and n > 0)


def _rejected(rec: dict) -> bool:
    """Whether the API (or the proxy, which never forwarded it) answered the request with an
    error: it changed nothing.  An exchange cut short or timed out may have."""
    status = rec.get("status_code")
    return isinstance(status, int) and not 200 <= status < 300 and rec.get("ended") in ("completed", "refused")


def _moment(rec: dict):
    """A record's ``timestamp`` as a datetime, or None when it is not one."""
    try:
        return parse_when(str(rec.get("timestamp")))
    except ValueError:
        return None


def answered(rec: dict) -> bool:
    """Whether a record holds a whole successful answer: a 2xx status, no ``error``, no body
    cut, both bodies JSON objects or lists (what :func:`convert` asks before the dialect's
    own checks)."""
    status = rec.get("status_code")
    if not isinstance(status, int) or not 200 <= status < 300 or rec.get("error"):
        return False
    if (isinstance(rec.get("truncated"), dict) and rec["truncated"]) or rec.get("stream_truncated") is True:
        return False
    return isinstance(rec.get("request_body"), dict) and isinstance(rec.get("response_body"), (dict, list))


# ============================================================== rendering

class Options(object):
    """What the renderers include: thinking and images (``--include-*``)."""

    def __init__(self, include_thinking: bool = False, include_images: bool = False) -> None:
        self.include_thinking = include_thinking
        self.include_images = include_images


def _count_excluded(m: dict, opts: Options, dropped: Counter) -> None:
    if not opts.include_thinking:
        dropped.add("thinking", len(m["thinking"]))
    images = sum(1 for p in m["parts"] if p["type"] == "image")
    if not opts.include_images or m["role"] in ("assistant", "tool", "system"):
        dropped.add("image", images)


def render_openai_chat(conv: Conversation, opts: Options, dropped: Counter) -> dict:
    """The OpenAI fine-tuning row of a conversation (see module docstring)."""
    messages = []
    last = len(conv.messages) - 1
    for i, m in enumerate(conv.messages):
        _count_excluded(m, opts, dropped)
        out = {"role": m["role"]}
        if opts.include_images and m["role"] != "tool":  # a tool message's content: a string only
            parts = []
            for p in m["parts"]:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                elif m["role"] == "user":
                    parts.append({"type": "image_url", "image_url": {"url": p["url"]}})
            if parts or not m["tool_calls"]:
                out["content"] = parts
        else:
            text = _parts_text(m["parts"])
            if text or not m["tool_calls"]:
                out["content"] = text
        if m["name"] and m["role"] != "tool":  # a tool message has no name (its call has)
            out["name"] = m["name"]
        if m["role"] == "assistant":
            if m["thinking"] and opts.include_thinking:
                out["reasoning_content"] = "\n".join(m["thinking"])
            if m["tool_calls"]:
                out["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in m["tool_calls"]]
        if m["role"] == "tool":
            out["tool_call_id"] = m["tool_call_id"]
        if m["role"] == "assistant" and i < last and not (out.get("content") or out.get("tool_calls")):
            # Nothing left of it (audio, thinking, ...): OpenAI refuses an assistant message with
            # neither content nor tool calls, whatever reasoning_content it holds.
            dropped.add("empty_assistant_turn")
            if opts.include_thinking:
                dropped.add("thinking", len(m["thinking"]))
            continue
        messages.append(out)
    row = {"messages": messages}
    if conv.tools:
        row["tools"] = conv.tools
    return row


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is not JSON" % text)
    return value


# As json.loads(text, parse_float=_finite, parse_constant=_finite), which builds a decoder per call.
_ARGUMENTS_JSON = json.JSONDecoder(parse_float=_finite, parse_constant=_finite)
# Verdicts of the last arguments texts (see _arguments), bounded as the recorder's memos are.
_VERDICTS = Memo(4096, 1 << 22)


def _call_value(call: dict):
    try:  # arguments that hold NaN or Infinity stay text, as other text that is not JSON
        if isinstance(call["arguments"], str) and too_deep(call["arguments"]):  # (see depth)
            raise RecursionError
        args = _ARGUMENTS_JSON.decode(call["arguments"])
    except (ValueError, RecursionError):  # (nested past the recursion limit: text too)
        args = call["arguments"]
    return {"name": call["name"], "arguments": args}


# LLaMA-Factory's default thought words (a template's ``thought_words``): its reader takes the
# first such block off a gpt or function_call turn as the thinking, and parses the rest of a
# function_call turn as the JSON of the calls.
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
# LLaMA-Factory's placeholders for the media of a row (its ``images``, ``videos``, ``audios``).
IMAGE_PLACEHOLDER, OTHER_PLACEHOLDERS = "<image>", ("<video>", "<audio>")


def _with_thinking(thinking: list, value: str, dropped: Counter) -> str:
    """``value`` after the thinking in LLaMA-Factory's thought words.  A thinking text that holds
    the closing words would end the block early (the reader takes the first match) and leave the
    rest in the answer, or in the JSON of a function_call turn, which the reader then refuses:
    such thinking is left out, counted ``thinking``."""
    text = "\n".join(thinking)
    if THINK_CLOSE in text:
        dropped.add("thinking", len(thinking))
        return value
    return THINK_OPEN + text + THINK_CLOSE + value


def render_sharegpt(conv: Conversation, opts: Options, dropped: Counter) -> dict:
    """The sharegpt row of a conversation (see module docstring), in the order LLaMA-Factory's
    reader takes: one system turn first, then human or observation and gpt or function_call in
    turn.  An assistant message with tool calls is one function_call turn: its thinking (with
    --include-thinking) goes before the JSON in the thought words, as for a gpt turn, but its text
    has no place there (the reader parses the rest as JSON): counted ``tool_call_text``; the results of parallel
    calls are one observation turn (a JSON list of their texts); human turns in a row (an empty
    assistant turn between them was left out) are one.  Skip("system_not_first") for a system
    message after the conversation began, Skip("sharegpt_order") for any other order the format
    cannot hold (a user message right after tool results, a conversation opening with the
    assistant)."""
    turns = []  # [from, [values]]: consecutive human or observation values join into one turn
    images = []
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    last = len(conv.messages) - 1
    for i, m in enumerate(conv.messages):
        _count_excluded(m, opts, dropped)
        pieces = []
        for p in m["parts"]:
            if p["type"] == "text":
                pieces.append(p["text"])
            elif opts.include_images and m["role"] == "user":
                pieces.append("<image>")
                images.append(p["url"])
        value = "\n".join(pieces)
        kind = names[m["role"]]
        if m["role"] == "assistant":
            if not value and not m["tool_calls"] and i < last:  # as in render_openai_chat
                dropped.add("empty_assistant_turn")
                if opts.include_thinking:
                    dropped.add("thinking", len(m["thinking"]))
                continue
            if m["tool_calls"]:
                dropped.add("tool_call_text", 1 if value else 0)
                calls = [_call_value(c) for c in m["tool_calls"]]
                kind, value = "function_call", _dumps(calls[0] if len(calls) == 1 else calls)
            if m["thinking"] and opts.include_thinking:
                value = _with_thinking(m["thinking"], value, dropped)
        elif m["role"] == "system" and turns and turns[-1][0] != "system":
            raise Skip("system_not_first")
        if turns and turns[-1][0] == kind and kind in ("system", "human", "observation"):
            turns[-1][1].append(value)
        else:
            turns.append([kind, [value]])
    out = []
    for kind, values in turns:
        if kind == "observation" and len(values) > 1:
            value = _dumps(values)
        else:
            value = "\n".join(values)
        out.append({"from": kind, "value": value})
    body = out[1:] if out and out[0]["from"] == "system" else out
    if len(body) % 2 or any(t["from"] not in (("human", "observation"), ("gpt", "function_call"))[k % 2]
                            for k, t in enumerate(body)):
        raise Skip("sharegpt_order")
    row = {"conversations": out,
           "tools": _dumps([t["function"] for t in conv.tools]) if conv.tools else ""}
    if opts.include_images:
        # LLaMA-Factory's multimodal plugins count the placeholders in every turn's text and
        # refuse the row (a ValueError that stops the whole preprocessing) unless they match
        # the row's images, videos and audios: a text that holds one itself ("the <image> token
        # of LLaVA") cannot be told from ours.
        if sum(t["value"].count(IMAGE_PLACEHOLDER) for t in out) != len(images) \
                or any(p in t["value"] for t in out for p in OTHER_PLACEHOLDERS):
            raise Skip("media_placeholder")
        row["images"] = images
    return row


def render_record(record: dict) -> dict:
    """A record as one fixed set of columns: TYPED_FIELDS as they are, JSON_TEXT_FIELDS as
    JSON text (``json.loads`` gives the value back; ``"null"`` when absent), and any field
    this version does not know in ``extra`` (JSON text of an object, ``"{}"`` when none)."""
    row = {}
    for key in TYPED_FIELDS:
        row[key] = record.get(key)
    for key in JSON_TEXT_FIELDS:
        row[key] = _dumps(record.get(key))
    known = set(TYPED_FIELDS) | set(JSON_TEXT_FIELDS)
    row["extra"] = _dumps({k: v for k, v in record.items() if k not in known})
    return row


# ============================================================== dedupe and split

def _put(h, value) -> None:
    """Feed one optional string to a hash, length-prefixed (so fields cannot run together)."""
    if value is None:
        h.update(b"\xff")
        return
    data = str(value).encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def message_digest(m: dict) -> bytes:
    """16-byte digest of a message for prefix comparison: role, parts, tool calls, tool call id
    and name; thinking is ignored (it is often stripped from the history a client resends).
    Hashes the strings directly: JSON-encoding every message was the slowest step of --dedupe."""
    h = hashlib.blake2b(digest_size=16)
    _put(h, m["role"])
    _put(h, m["tool_call_id"])
    _put(h, m["name"])
    h.update(len(m["parts"]).to_bytes(8, "big"))
    for part in m["parts"]:
        _put(h, part["type"])
        _put(h, part.get("text") if part["type"] == "text" else part.get("url"))
    h.update(len(m["tool_calls"]).to_bytes(8, "big"))
    for call in m["tool_calls"]:
        _put(h, call["id"])
        _put(h, call["name"])
        _put(h, call["arguments"])
    return h.digest()


def prefix_digests(conv: Conversation, stop=None) -> list:
    """``d[k]`` is a 16-byte digest of ``messages[:k+1]`` (rolling, so O(total size)).
    With ``stop(message) -> bool``, ends after the first message for which it is true."""
    out = []
    state = b""
    for m in conv.messages:
        state = hashlib.blake2b(state + message_digest(m), digest_size=16).digest()
        out.append(state)
        if stop is not None and stop(m):
            break
    return out


def opening_digest(conv: Conversation) -> bytes:
    """Digest of the messages up to and including the first user message (split key)."""
    return prefix_digests(conv, stop=lambda m: m["role"] == "user")[-1]


def split_side(key: bytes, ratio: float) -> str:
    """``"train"`` or ``"test"``: a deterministic coin with P(train) = ratio."""
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / float(1 << 64)
    return "train" if value < ratio else "test"


class Deduper(object):
    """Pass one of --dedupe: collects digests, then says which record ids to keep."""

    def __init__(self) -> None:
        self.sessions = {}  # session -> {"prefixes": set, "full": [(id, digest, length)]}

    def add(self, session_id, record_id, conv: Conversation) -> None:
        digests = prefix_digests(conv)
        entry = self.sessions.setdefault(_hashable(session_id), {"prefixes": set(), "full": []})
        entry["prefixes"].update(digests[:-1])
        entry["full"].append((record_id, digests[-1]))

    def ids(self) -> set:
        """Ids of every conversation added."""
        return set(record_id for entry in self.sessions.values() for record_id, _ in entry["full"])

    def keep_ids(self) -> set:
        """Ids of the longest trajectory of each branch (first of identical ones)."""
        keep = set()
        for entry in self.sessions.values():
            seen = set()
            for record_id, full in entry["full"]:
                if full in entry["prefixes"] or full in seen:
                    continue
                seen.add(full)
                keep.add(record_id)
        return keep


# ============================================================== filters

_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(Z|[+-]\d{2}:?\d{2})?)?$")


def parse_when(text: str, end_of_day: bool = False) -> datetime:
    """An ISO date or datetime as an aware UTC datetime (naive means UTC).

    A bare date is midnight, or the next midnight with ``end_of_day`` (so that
    ``--until 2026-11-27`` includes that day).  ValueError if unparseable.
    """
    match = _TS_RE.match(text.strip())
    if not match:
        raise ValueError("not an ISO date or datetime: %r" % text)
    day, clock, zone = match.groups()
    if clock is None:
        when = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return when + timedelta(days=1) if end_of_day else when
    if len(clock) == 5:
        clock += ":00"
    seconds, _, frac = clock.partition(".")
    when = datetime.strptime(day + "T" + seconds, "%Y-%m-%dT%H:%M:%S")
    if frac:
        when = when.replace(microsecond=int((frac + "000000")[:6]))
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        when = when - sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return when.replace(tzinfo=timezone.utc)


def _split_list(values) -> list:
    out = []
    for value in values or []:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def _status_matcher(spec: str):
    spec = spec.lower()
    if spec in ("none", "null"):
        return lambda code: code is None
    if re.match(r"^[1-5]xx$", spec):
        digit = int(spec[0])
        return lambda code: isinstance(code, int) and code // 100 == digit
    if re.match(r"^\d{3}$", spec):
        value = int(spec)
        return lambda code: code == value
    raise UsageError("--status: %r is not a code, a class like 2xx, or none" % spec)


class Filter(object):
    """The record filters of export (every given filter must match)."""

    def __init__(self, args) -> None:
        self.sessions = set(_split_list(args.session))
        self.models = _split_list(args.model)
        self.providers = set(_split_list(args.provider))
        self.endpoints = _split_list(args.endpoint)
        self.statuses = [_status_matcher(s) for s in _split_list(args.status)]
        self.ended = set(_split_list(args.ended))
        for ending in self.ended:
            if ending not in ENDINGS:
                raise UsageError("--ended: %r is not one of %s" % (ending, ", ".join(ENDINGS)))
        self.stream = args.stream
        try:
            self.since = parse_when(args.since) if args.since else None
            self.until = parse_when(args.until, end_of_day=True) if args.until else None
        except ValueError as exc:
            raise UsageError("--since/--until: %s" % exc)

    def __call__(self, rec: dict) -> bool:
        if self.sessions and _hashable(rec.get("session_id")) not in self.sessions \
                and reader.session_file_id(str(rec.get("session_id"))) not in self.sessions:
            return False
        if self.models and not any(fnmatch.fnmatchcase(str(rec.get("model")), p) for p in self.models):
            return False
        if self.providers and _hashable(rec.get("provider")) not in self.providers \
                and _hashable(rec.get("provider_type")) not in self.providers:
            return False
        if self.endpoints and not any(fnmatch.fnmatchcase(str(rec.get("endpoint")), p) for p in self.endpoints):
            return False
        if self.statuses and not any(m(rec.get("status_code")) for m in self.statuses):
            return False
        if self.ended and _hashable(rec.get("ended")) not in self.ended:
            return False
        if self.stream is not None and bool(rec.get("stream")) != self.stream:
            return False
        if self.since is not None or self.until is not None:
            try:
                when = parse_when(str(rec.get("timestamp")))
            except ValueError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


# ============================================================== output

def encode_line(obj) -> bytes:
    """One JSON line as UTF-8; a lone surrogate (which no loader but Python's takes) becomes
    U+FFFD (reader.lone_surrogates_replaced). Skip("non_finite") for NaN or Infinity, which
    JSON cannot hold."""
    text = _dumps(obj)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return reader.lone_surrogates_replaced((json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii"))


class Output(object):
    """A JSONL sink: a file written under a temporary name and renamed on ``commit``, or stdout."""

    def __init__(self, path) -> None:
        self.path = path
        self.rows = 0
        if path is None:
            self.fh = getattr(sys.stdout, "buffer", sys.stdout)
            self.tmp = None
        else:
            self.tmp = "%s.tmp-%d" % (path, os.getpid())
            self.fh = open(self.tmp, "wb")

    def write(self, line: bytes) -> None:
        """Write one line from :func:`encode_line`."""
        self.fh.write(line)
        self.rows += 1

    def commit(self) -> None:
        if self.tmp is None:
            self.fh.flush()
            return
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.tmp is not None:
            self.fh.close()
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def split_paths(out: str) -> tuple:
    """``data.jsonl`` -> (``data.train.jsonl``, ``data.test.jsonl``)."""
    stem = out
    for suffix in (".jsonl", ".json", ".ndjson"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + ".train.jsonl", stem + ".test.jsonl"


class Progress(object):
    """A one-line progress bar on a terminal stream; silent when disabled."""

    def __init__(self, stream, total_bytes: int, enabled: bool, interval: float = 0.2) -> None:
        self.stream = stream
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.interval = interval
        self.last = 0.0
        self.shown = False

    def update(self, done_bytes: int, records: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        frac = min(done_bytes / float(self.total), 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write("\rexport [%-30s] %3d%% %d records" % (bar, int(frac * 100), records))
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# ============================================================== command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add export's options to ``parser`` (``--data-dir`` defaults to None: the config's)."""
    parser.description = ("Export recorded traffic as a dataset: OpenAI fine-tuning chat JSONL, "
                          "sharegpt, or the raw records with bodies as JSON text.")
    parser.epilog = ("A summary line goes to stderr (records read, skipped by reason, parts dropped, rows "
                     "written; torn lines skipped). Exit status: 0 rows written, 1 nothing matched, "
                     "2 bad usage or unreadable data dir.")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="data dir to read (default: the configured data_dir)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="openai-chat: OpenAI fine-tuning {messages, tools}; sharegpt: "
                             "{conversations: [{from, value}], tools}; records: the records, "
                             "bodies and optional fields as JSON text")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="output file (default: stdout); with --split, the stem of two files")
    group = parser.add_argument_group("filters (repeatable; comma lists allowed)")
    group.add_argument("--session", action="append", metavar="ID",
                       help="session id (or its directory name without session_)")
    group.add_argument("--model", action="append", metavar="PATTERN", help="model name or glob, e.g. 'gpt-4o*'")
    group.add_argument("--provider", action="append", metavar="NAME",
                       help="provider name or type (openai, anthropic, gemini, azure)")
    group.add_argument("--endpoint", action="append", metavar="PATTERN",
                       help="endpoint path or glob, e.g. /v1/messages")
    group.add_argument("--since", metavar="WHEN", help="ISO date or datetime (UTC unless an offset is given), inclusive")
    group.add_argument("--until", metavar="WHEN",
                       help="ISO date or datetime, exclusive; a bare date includes that whole day")
    group.add_argument("--status", action="append", metavar="CODE", help="status code, class (2xx) or none")
    streams = group.add_mutually_exclusive_group()
    streams.add_argument("--stream", dest="stream", action="store_const", const=True, default=None,
                         help="streamed requests only")
    streams.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                         help="non-streamed requests only")
    group.add_argument("--ended", action="append", metavar="ENDING", help="|".join(ENDINGS))
    shaping = parser.add_argument_group("shaping")
    shaping.add_argument("--include-thinking", action="store_true",
                         help="keep thinking/reasoning text (default: dropped and counted)")
    shaping.add_argument("--include-images", action="store_true",
                         help="keep user images as image parts (default: dropped and counted)")
    shaping.add_argument("--dedupe", action="store_true",
                         help="per session, keep only the longest trajectory of each branch")
    shaping.add_argument("--split", type=float, metavar="RATIO", default=None,
                         help="train fraction, e.g. 0.9: writes <out stem>.train.jsonl and .test.jsonl")


class _Run(object):
    """State of one export: counters for the summary line."""

    def __init__(self, args, data_dir: str) -> None:
        self.args = args
        self.data_dir = data_dir
        self.filter = Filter(args)
        self.opts = Options(args.include_thinking, args.include_images)
        self.stats = reader.ReadStats()
        self.filtered_out = 0
        self.skipped = Counter()
        self.dropped = Counter()
        self.superseded = 0
        self.continued = 0  # rows rebuilt from earlier turns (previous_response_id, conversation)
        self.evicted = 0  # rows whose earlier turns the bound had pushed out
        self.keep = None  # set of ids from the dedupe pass, or None
        self.superseded_ids = frozenset()  # ids pass one found superseded (see dedupe_pass)

    def conversation(self, rec: dict, dropped: Counter, chain=None) -> Conversation:
        """``convert`` plus the answer check (Skip("empty_answer") when the final assistant
        message has neither text nor tool calls, e.g. thinking only: OpenAI refuses an assistant
        message without content or tool calls, and thinking alone is no answer to train on)."""
        conv = convert(rec, dropped, chain)
        last = conv.messages[-1]
        has_text = any(p["type"] == "text" for p in last["parts"])
        if not (has_text or last["tool_calls"]):
            raise Skip("empty_answer")
        users = 0
        for m in conv.messages:
            if m["role"] == "user":
                users += 1
                if not any(p["type"] == "text" or self.opts.include_images for p in m["parts"]):
                    raise Skip("empty_user_turn")  # only images (without the flag), documents, audio
        if not users:
            raise Skip("no_user_turn")  # e.g. only tool results after a previous_response_id
        return conv

    def line(self, rec: dict, conv: Conversation | None, dropped: Counter) -> bytes:
        """The exported line of a record (its conversation ``conv`` for the chat formats), or
        Skip when the format cannot hold it (sharegpt's order, a number JSON cannot hold)."""
        fmt = self.args.format
        if fmt == "openai-chat":
            return encode_line(render_openai_chat(conv, self.opts, dropped))
        if fmt == "sharegpt":
            return encode_line(render_sharegpt(conv, self.opts, dropped))
        return encode_line(render_record(rec))

    def records(self, progress: Progress, offset: int = 0):
        """Yield (record, chain) for every record that passes the filters, in read order, with
        the earlier turns a Responses API record continues (``chain``, see ChainIndex.chain;
        None).  A record whose chain misses a turn not read yet (a session read later, say)
        waits for the end of the read, the records waiting held up to ChainIndex's bound (past
        it, the oldest goes on with what is held then).  The ``records`` format keeps every
        record as it is, its conversation too: no chain."""
        chains = ChainIndex() if self.args.format != "records" else None
        waiting = deque()  # [record, what it continues, size]: records whose chain may still be completed
        waiting_bytes = 0
        for rec in reader.iter_records(self.data_dir, self.stats):
            progress.update(offset + self.stats.bytes_done, self.stats.records)
            if not self.filter(rec):
                self.filtered_out += 1
                if chains is not None:
                    chains.forget(rec)
                continue
            chain = None
            if chains is not None:
                prev, chain = chains.read(rec)
                if prev is not None:
                    if chains.may_come(prev, chain) and answered(rec):
                        size = _size(rec)
                        waiting.append((rec, prev, size))
                        waiting_bytes += size
                        while waiting_bytes > chains.max_bytes and waiting:
                            early, prev, size = waiting.popleft()
                            waiting_bytes -= size
                            yield early, self.final_chain(chains, early, prev, False)
                        continue
                    self.count_cut(chains, prev, chain)
            yield rec, chain
        for rec, prev, _ in waiting:
            yield rec, self.final_chain(chains, rec, prev, True)

    def final_chain(self, chains: ChainIndex, rec: dict, prev, whole: bool):
        """The chain of a record that waited; ``whole``: every record was read.  A request of a
        conversation that goes before (past the bound) is exported as it is, counted: a record
        read later may have added items to the conversation before it."""
        if isinstance(prev, str):
            chain = chains.chain(prev)
        elif whole:
            chain = chains.conversation(rec)
        else:
            self.evicted += 1
            return None
        self.count_cut(chains, prev, chain)
        return chain

    def count_cut(self, chains: ChainIndex, prev: str, chain) -> None:
        """Count a record whose chain the bound cut short (a turn it pushed out is missing)."""
        missing = chains.missing(prev, chain)
        if missing is not None and chains.gone.get(missing) is True:
            self.evicted += 1

    def rows(self, progress: Progress, offset: int = 0):
        """Yield (split key bytes, encoded row) for every exported row; counts go to the summary."""
        fmt = self.args.format
        self.evicted = 0  # (counted again: the dedupe pass reads the same records)
        for rec, chain in self.records(progress, offset):
            rid = str(rec.get("id"))
            if rid in self.superseded_ids:  # (the verdict of pass one: converting it again is moot)
                self.superseded += 1
                continue
            conv = None
            dropped = Counter()
            if fmt != "records" or self.keep is not None or self.args.split is not None:
                try:
                    conv = self.conversation(rec, dropped, chain)
                except Skip as skip:
                    if fmt != "records":
                        self.skipped.add(skip.reason)
                        continue
            try:
                line = self.line(rec, conv, dropped)
            except Skip as skip:  # (before the dedupe's verdict: such a record superseded nothing)
                self.skipped.add(skip.reason)
                continue
            if self.keep is not None and conv is not None and rid not in self.keep:
                self.superseded += 1
                continue
            key = None
            if self.args.split is not None:
                key = opening_digest(conv) if conv is not None else rid.encode("utf-8", "surrogatepass")
            if fmt != "records":
                for kind, n in dropped.items():
                    self.dropped.add(kind, n)
            if chain is not None and any(turn.input or turn.output for turn in chain):
                self.continued += 1  # (not the first request of a conversation opened empty)
            yield key, line

    def dedupe_pass(self, progress: Progress) -> None:
        """Pass one: digests of every matching chat record, then the ids to keep.  A
        conversation rebuilt from earlier turns counts in the session of its oldest turn, so
        that it supersedes their rows wherever they were recorded."""
        deduper = Deduper()
        stats, self.stats = self.stats, reader.ReadStats()
        filtered_out, self.filtered_out = self.filtered_out, 0
        skipped = set()  # ids of records the format cannot hold (most often none)
        try:
            for rec, chain in self.records(progress):
                try:
                    conv = self.conversation(rec, Counter(), chain)
                    # A record the format cannot hold is not written: it supersedes nothing (its
                    # earlier, shorter versions were in neither output before).
                    self.line(rec, conv, Counter())
                except Skip:
                    skipped.add(str(rec.get("id")))
                    continue
                session = chain[0].session if chain else rec.get("session_id")
                deduper.add(session, str(rec.get("id")), conv)
        finally:
            self.stats, self.filtered_out = stats, filtered_out
        self.keep = deduper.keep_ids()
        # Pass two reads the same records in the same order and gets the same conversations:
        # a record pass one found superseded (held by the format, not kept) is counted as such
        # without being converted and rendered again, which was most of pass two's work (an
        # agent's session is mostly prefixes). An id shared with a record the format could not
        # hold (a damaged data dir) goes the long way, as does a record written meanwhile.
        self.superseded_ids = deduper.ids() - self.keep - skipped


def _files(paths: list, what: str) -> str:
    """``"<n> <what> (<the first three>, ...)"``, ``what`` holding a ``%s`` for the plural."""
    return "%d %s (%s%s)" % (len(paths), what % ("" if len(paths) == 1 else "s"),
                             ", ".join(reader.shown(p) for p in paths[:3]), ", ..." if len(paths) > 3 else "")


def _summary(run: _Run, outputs: list) -> str:
    s = run.stats
    parts = ["export: read %d records from %d files" % (s.records, s.files)]
    if s.torn:
        parts.append("%d torn line%s skipped" % (s.torn, "" if s.torn == 1 else "s"))
    if s.bad_lines:
        parts.append("%d bad lines skipped" % len(s.bad_lines))
    if s.problems:
        parts.append("%d unreadable files (%s)" % (len(s.problems), "; ".join(
            "%s: %s" % (p, m) for p, m in s.problems[:3])))
    if s.skipped_files:
        parts.append(_files(s.skipped_files, "file%s not named as the recorder names its files skipped"))
    if s.twins:  # (a compression cut short leaves both; verify says whether they differ)
        parts.append(_files(s.twins, ".jsonl.gz twin%s of a plain file read once, as the plain one"))
    if run.filtered_out:
        parts.append("%d filtered out" % run.filtered_out)
    if run.skipped:
        parts.append("%d skipped (%s)" % (sum(run.skipped.values()), run.skipped.text()))
    if run.superseded:
        parts.append("%d superseded by --dedupe" % run.superseded)
    if run.continued:
        parts.append("%d continuing earlier records (previous_response_id, conversation)" % run.continued)
    if run.evicted:
        parts.append("%d without earlier turns past the %d MiB kept (previous_response_id, conversation)"
                     % (run.evicted, ChainIndex.MAX_BYTES // (1024 * 1024)))
    if run.dropped:
        parts.append("dropped parts: %s" % run.dropped.text())
    written = " and ".join("%d row%s to %s" % (o.rows, "" if o.rows == 1 else "s", o.path or "stdout")
                           for o in outputs)
    parts.append("wrote %s" % written)
    return "; ".join(parts)


def _validate(args, default_data_dir) -> str:
    data_dir = args.data_dir or default_data_dir
    if not data_dir:
        raise UsageError("no data dir: pass --data-dir")
    if args.out == "":  # (an unset variable in a script?): not stdout, quietly
        raise UsageError("--out: an empty path")
    if args.out == "-":  # stdout, as the tools' convention has it (not a file named "-")
        args.out = None
    if args.split is not None:
        if not 0.0 < args.split < 1.0:
            raise UsageError("--split: %s is not between 0 and 1" % args.split)
        if not args.out:
            raise UsageError("--split needs --out (the stem of the .train/.test files)")
    return data_dir


def _check_outputs(paths, files) -> None:
    """UsageError when an output path is one of the record files the export reads: the export
    would replace the recording it is made from."""
    for path in paths:
        if path is None or not os.path.exists(path):
            continue
        for record_file in files:
            try:
                same = os.path.samefile(path, record_file)
            except OSError:
                continue
            if same:
                raise UsageError("--out: %s is a record file of the data dir: the export would replace it" % path)


def run(args, default_data_dir=None) -> int:
    """Run export; 0 rows written, 1 nothing matched, 2 bad usage or unreadable data dir."""
    try:
        data_dir = _validate(args, default_data_dir)
        run_ = _Run(args, data_dir)
        files = reader.record_files(data_dir)
        _check_outputs(split_paths(args.out) if args.split is not None else [args.out], files)
    except (UsageError, reader.DataDirError) as exc:
        sys.stderr.write("proxy_llm export: %s\n" % exc)
        return 2
    total = 0
    for path in files:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    progress = Progress(sys.stderr, total * (2 if args.dedupe else 1),
                        enabled=sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    try:
        outputs = [Output(p) for p in split_paths(args.out)] if args.split is not None else [Output(args.out)]
    except OSError as exc:
        sys.stderr.write("proxy_llm export: %s: %s\n" % (args.out, exc.strerror or exc))
        return 2
    try:
        if args.dedupe:
            run_.dedupe_pass(progress)
        for key, line in run_.rows(progress, offset=total if args.dedupe else 0):
            out = outputs[0]
            if args.split is not None and split_side(key, args.split) == "test":
                out = outputs[1]
            out.write(line)
        for out in outputs:
            out.commit()
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        for out in outputs:
            out.abort()
        progress.finish()
        sys.stderr.write("proxy_llm export: %s\n" % exc)
        return 2
    except BaseException:
        for out in outputs:
            out.abort()
        raise
    progress.finish()
    sys.stderr.write(_summary(run_, outputs) + "\n")
    return 0 if sum(o.rows for o in outputs) else 1
