"""OpenAI chat completions (``/v1/chat/completions``), streamed and not.

A stream is ``chat.completion.chunk`` objects, ``data: [DONE]`` last. The
reassembled body has the shape of a non-streamed ``chat.completion``:

* one accumulator per ``choices[].index`` (``n > 1`` never merges choices);
  an index sent as a string of digits (``"1"``, as some OpenAI-compatible
  servers send it) is that number;
* ``delta.role``: the first one sent (some servers repeat it on every chunk;
  concatenating would give ``"assistantassistant"``);
* string fields of ``delta`` (``content``, ``refusal``, ``reasoning_content``
  of vLLM/DeepSeek, ``reasoning`` of OpenRouter/newer vLLM, ...) are
  concatenated; ``content`` and ``refusal`` are null when never sent;
* ``delta.tool_calls[]`` are matched by their ``index`` (``"0"`` is 0), so
  parallel calls stay apart; a delta without one (Ollama, Gemini's
  OpenAI-compatible API) matches by ``id``, starts a new call with an ``id``
  not seen yet, and without an ``id`` continues the last call begun (Gemini
  sends a call's arguments so). ``function.arguments`` is concatenated;
  ``function.name`` too (as the
  SDK does: a server may split it), except a piece equal to the whole name so
  far, which is the name sent again (MiniMax through NVIDIA NIM, Fireworks and
  others repeat it on every chunk); ``id`` and ``type``: the first one sent;
* ``logprobs.content`` / ``logprobs.refusal`` lists are extended (a later
  empty list leaves a null one null, as the SDK);
* ``finish_reason``: the last non-null one;
* ``usage``: the last non-null one (the usage-only final chunk has
  ``choices: []``); a chunk ``{"error": {...}}`` sets ``Result.error``;
* other top-level fields (``id``, ``created``, ``model``, ``service_tier``, ...):
  the first non-empty value, ``system_fingerprint`` the last non-null one;
  ``obfuscation`` (random padding OpenAI puts on every chunk) is dropped, as the
  SDK drops it.

``Result.complete``: ``[DONE]`` was seen, or every choice has a
``finish_reason`` and usage was received. Events after ``[DONE]`` are not
reassembled (no text, usage or error comes from them): the SDK stops reading
there, so the client never saw them; the streams file keeps them.

Where the openai SDK's stream accumulation differs (checked by
tests/test_dialects_sdk.py): it concatenates every string, so a repeated
``role`` (vLLM), tool call ``id`` or ``function.name`` becomes doubled text
(``"read_fileread_file"``, which names no tool), and it keeps the
stream-only ``index`` on tool calls; it raises on an error chunk. We follow
the non-streamed ``chat.completion`` shape instead.
"""

from __future__ import annotations

from .base import (Dialect, Pieces, Result, append_text, error_from, finalize, is_count,
                   loads, make_usage)

__all__ = ["OpenAIChat", "openai_usage", "merge_delta"]

# Keys that identify rather than stream: never concatenated. ("name" is concatenated unless
# repeated whole: see merge_delta.)
_IDENTITY_KEYS = frozenset(("id", "type", "role", "index", "object", "call_id"))


def openai_usage(usage):
    """tokens_used from an OpenAI ``usage`` object (chat, completions, embeddings).

    ``prompt_tokens`` includes cached tokens
    (``prompt_tokens_details.cached_tokens``; DeepSeek's
    ``prompt_cache_hit_tokens`` when that is absent) and those written to the
    cache (``prompt_tokens_details.cache_write_tokens``, ``cache_creation_tokens``);
    ``reasoning_tokens`` from ``completion_tokens_details.reasoning_tokens``.
    """
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = details.get("cached_tokens")
        written = details.get("cache_write_tokens")
    else:
        cached = written = None
    if not is_count(cached):
        cached = usage.get("prompt_cache_hit_tokens")
    details = usage.get("completion_tokens_details")
    return make_usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens"), cached,
                      written, details.get("reasoning_tokens") if isinstance(details, dict) else None)


def merge_delta(acc, delta):
    """Merge a streamed ``delta`` dict into ``acc`` in place.

    Strings concatenate (except identity keys, where the first non-empty value
    stays, and a ``name`` equal to the whole name so far, which is the name
    sent again), lists extend, dicts merge recursively, other values replace;
    None never overwrites. Concatenated text is kept as :class:`Pieces`:
    call :func:`finalize` on the result.
    """
    for key, value in delta.items():
        if value is None:
            acc.setdefault(key, None)
            continue
        old = acc.get(key)
        if old is None:
            if isinstance(value, dict):
                acc[key] = {}
                merge_delta(acc[key], value)
            elif isinstance(value, list):
                acc[key] = list(value)
            else:
                acc[key] = value
        elif isinstance(value, str) and isinstance(old, (str, Pieces)):
            if key in _IDENTITY_KEYS:
                if not old:
                    acc[key] = value
            elif key == "name" and value == (old if type(old) is str else "".join(old)):
                continue  # the whole name again, not a piece of it
            else:
                append_text(acc, key, value)
        elif isinstance(value, list) and isinstance(old, list) and not isinstance(old, Pieces):
            old.extend(value)
        elif isinstance(value, dict) and isinstance(old, dict):
            merge_delta(old, value)
        else:
            acc[key] = value


# Not copied from the chunks to the body as the first non-empty value: "obfuscation" is random
# padding OpenAI puts on every chunk (stream_options.include_obfuscation, on by default), not
# part of the response, and the SDK drops it too; "system_fingerprint" is the last one sent,
# copied on its own.
_NOT_HEAD = frozenset(("choices", "usage", "object", "error", "obfuscation", "system_fingerprint"))


def _empty(value):
    return value is None or value == "" or value == 0 or value == [] or value == {}


def _index(value):
    """A stream's ``index`` (of a choice, of a tool call) as an int, or None for none: an int,
    or a string of digits, the same index (some OpenAI-compatible servers send ``"0"``: read
    as no index, each of its tool call deltas was a call of its own)."""
    if type(value) is int:
        return value
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    return None


# The fields of a streamed choice that _Choice.add reads by name; any other goes to its extra.
_CHOICE_KEYS = frozenset(("index", "delta", "logprobs", "finish_reason"))


class _Choice(object):
    __slots__ = ("index", "message", "tool_calls", "calls_by_index", "logprobs", "finish_reason", "extra")

    def __init__(self, index):
        self.index = index
        self.message = {}  # type: dict
        self.tool_calls = []  # type: list  # accumulated calls, in order of first appearance
        self.calls_by_index = {}  # type: dict  # the same calls by their index (one look-up a delta)
        self.logprobs = None  # type: dict | None
        self.finish_reason = None
        self.extra = {}  # type: dict  # other choice-level fields (e.g. stop_reason of vLLM)

    def add(self, choice):
        delta = choice.get("delta")
        if isinstance(delta, dict):
            msg = self.message
            for key, value in delta.items():
                if type(value) is str:
                    old = msg.get(key)
                    if type(old) is Pieces and key not in _IDENTITY_KEYS and key != "name":
                        old.append(value)  # a piece of text: what merge_delta would do, at once
                        continue
                self._add_delta_field(key, value)
        lp = choice.get("logprobs")
        if isinstance(lp, dict):
            if self.logprobs is None:
                self.logprobs = {}
            elif [] in lp.values():
                # A later empty list adds nothing: it leaves a null one null (as the SDK).
                lp = dict((k, v) for k, v in lp.items() if v != [])
            merge_delta(self.logprobs, lp)
        fr = choice.get("finish_reason")
        if fr is not None:
            self.finish_reason = fr
        if _CHOICE_KEYS.issuperset(choice):  # (a C loop; nearly every chunk)
            return
        for key, value in choice.items():
            if key in _CHOICE_KEYS:
                continue
            # The last non-empty value (Azure sends content_filter_results
            # per chunk, then {} on the last one).
            if key not in self.extra or not _empty(value):
                self.extra[key] = value

    def _add_delta_field(self, key, value):
        msg = self.message
        if key == "role":
            if value and not msg.get("role"):
                msg["role"] = value
        elif key == "tool_calls":
            if isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        self._add_tool_call(call)
        else:
            merge_delta(msg, {key: value})

    def _add_tool_call(self, call):
        index = _index(call.get("index"))
        if index is not None:
            target = self.calls_by_index.get(index)
        else:
            target = self._unindexed(call.get("id"))
        if target is None:
            target = {}
            self.tool_calls.append((index, target))
            if index is not None:
                self.calls_by_index[index] = target
        merge_delta(target, dict((k, v) for k, v in call.items() if k != "index"))

    def _unindexed(self, call_id):
        """The call a tool call delta without an index adds to: the one with its ``id``; without
        an ``id``, the last call begun (Gemini's OpenAI-compatible API sends a call's arguments
        in such deltas: each was a call of its own, with no name). None: a new call."""
        if call_id:
            for _, acc in self.tool_calls:
                if acc.get("id") == call_id:
                    return acc
            return None
        return self.tool_calls[-1][1] if self.tool_calls else None

    def build(self):
        msg = self.message
        out_msg = {"role": msg.get("role") or "assistant",
                   "content": msg.get("content"),
                   "refusal": msg.get("refusal")}
        for key, value in msg.items():
            if key not in out_msg:
                out_msg[key] = value
        if self.tool_calls:
            calls = []
            for _, acc in self.tool_calls:
                call = {"id": acc.get("id"), "type": acc.get("type") or "function"}
                fn = acc.get("function")
                if isinstance(fn, dict):
                    call["function"] = {"name": fn.get("name"),
                                        "arguments": fn.get("arguments") or ""}
                    for k, v in fn.items():
                        if k not in call["function"]:
                            call["function"][k] = v
                for k, v in acc.items():
                    if k not in call:
                        call[k] = v
                calls.append(call)
            out_msg["tool_calls"] = calls
        out = {"index": self.index, "message": out_msg, "logprobs": self.logprobs,
               "finish_reason": self.finish_reason}
        out.update(self.extra)
        return out


class OpenAIChat(Dialect):
    name = "openai_chat"
    object_name = "chat.completion"
    choice_class = _Choice

    def _reassemble(self, events):
        head = {}  # type: dict  # id, created, model, ...: first non-null value of each
        # Keys a chunk's top level may have that the head takes nothing more from: those not
        # copied, and those of head holding a non-empty value (that value stays). A chunk with
        # only such keys (nearly every one: a C test) needs no look at its keys one by one.
        settled = set(_NOT_HEAD)  # type: set
        choices = {}  # type: dict
        usage = None
        error = None
        done = False
        seen_chunk = False
        for ev in events:
            data = ev.data
            if not data:
                continue
            if data[0] != "{" and data.strip().startswith("[DONE]"):
                # The end, as for the SDK (it stops reading at a data starting with
                # [DONE]): what follows is kept in streams/ but not reassembled.
                done = True
                break
            chunk = loads(data)
            if not isinstance(chunk, dict):
                continue
            err = error_from(chunk) if "error" in chunk else None
            if err is not None:
                # An error chunk (OpenRouter, vLLM) may still carry choices
                # (finish_reason "error"): record both.
                error = err
                if not chunk.get("choices"):
                    continue
            seen_chunk = True
            if "system_fingerprint" in chunk:
                # The SDK keeps the last chunk's; a null one does not erase it. (Its place in
                # head does not matter: it goes into the body by name.)
                value = chunk["system_fingerprint"]
                if value is not None or "system_fingerprint" not in head:
                    head["system_fingerprint"] = value
            if not settled.issuperset(chunk):
                for key, value in chunk.items():
                    if key in settled:
                        continue
                    if key not in head or (_empty(head[key]) and not _empty(value)):
                        # First non-empty value: Azure's first chunk (prompt
                        # filter results) has id "", model "" and created 0.
                        head[key] = value
                        if not _empty(value):
                            settled.add(key)  # (its value stays: no need to look again)
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            choices_sent = chunk.get("choices")
            for choice in choices_sent if isinstance(choices_sent, list) else ():
                if not isinstance(choice, dict):
                    continue
                index = choice.get("index")
                if type(index) is not int:
                    index = _index(index)
                    if index is None:
                        index = 0
                acc = choices.get(index)
                if acc is None:
                    acc = choices[index] = self.choice_class(index)
                acc.add(choice)
        if not seen_chunk:
            return Result(None, None, error, done)
        body = {"id": head.pop("id", None), "object": self.object_name,
                "created": head.pop("created", None), "model": head.pop("model", None)}
        if "system_fingerprint" in head:
            body["system_fingerprint"] = head.pop("system_fingerprint")
        body.update(head)
        body["choices"] = [finalize(choices[i].build()) for i in sorted(choices)]
        if usage is not None:
            body["usage"] = usage
        finished = bool(choices) and all(c.finish_reason is not None for c in choices.values())
        complete = done or (finished and usage is not None)
        return Result(body, openai_usage(usage), error, complete)

    def _from_body(self, body):
        usage = body.get("usage") if isinstance(body, dict) else None
        return Result(body, openai_usage(usage), error_from(body), body is not None)
