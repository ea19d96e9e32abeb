"""Anthropic Messages (``/v1/messages``) and token counting (``/v1/messages/count_tokens``).

A stream is ``message_start``, then per content block ``content_block_start``
/ ``content_block_delta``... / ``content_block_stop``, then ``message_delta``
and ``message_stop``; ``ping`` may come anywhere and an in-band ``error``
event may end the stream even though the HTTP status was 200.

Reassembly rebuilds the ``message`` object of ``message_start``:

* blocks are kept by their ``index``, each starting as the
  ``content_block`` of ``content_block_start`` (so server tool blocks such as
  ``server_tool_use``, ``web_search_tool_result``, ``redacted_thinking``
  arrive whole);
* ``text_delta`` appends ``text``, ``thinking_delta`` appends ``thinking``,
  ``signature_delta`` appends ``signature`` (byte for byte; the anthropic
  SDK replaces instead: the API sends one signature_delta per block, so
  both agree, and appending keeps every byte should it ever be split),
  ``citations_delta`` appends to ``citations``; ``compaction_delta`` sets
  ``content`` and ``encrypted_content`` (the whole summary comes in one, and
  the SDK replaces);
* a ``fallback`` block (a model handing the turn over to the next, beta)
  makes its ``to.model`` the message's ``model``, as the SDK does: the model
  that served the rest of the answer;
* ``input_json_delta.partial_json`` pieces are concatenated and parsed at
  ``content_block_stop`` (or at the end of the stream); when they are empty
  (or blank) the ``input`` of ``content_block_start`` stays, as in the SDK
  (``{}`` if it had none); text that is not JSON is kept as the string so
  nothing is lost;
* ``message_delta``: ``delta`` fields replace the message's: ``stop_reason``,
  ``stop_sequence`` and ``stop_details`` as sent, even null; any other field
  (``container``, ...) only when not null, as the SDK does for ``container``
  (a null does not erase the ``message_start`` value); the event's own
  fields beside ``delta`` and ``usage`` (``context_management``,
  ``input_transformations``, beta) likewise go to the message when not null;
  its ``usage`` fields are merged over the ``message_start`` usage (a null
  one is skipped; ``output_tokens`` is cumulative).

``Result.complete``: ``message_stop`` was seen.
"""

from __future__ import annotations

import json

from ..depth import too_deep
from .base import Dialect, Pieces, Result, append_text, error_from, finalize, get, is_int, loads, make_usage

__all__ = ["AnthropicMessages", "AnthropicCountTokens", "anthropic_usage"]


def anthropic_usage(usage):
    """tokens_used from an Anthropic ``usage`` object.

    ``input_tokens`` excludes cache reads and writes, so
    ``prompt_tokens = input_tokens + cache_creation_input_tokens +
    cache_read_input_tokens`` (those sent); ``cached_tokens`` is
    ``cache_read_input_tokens``, ``cache_creation_tokens`` is
    ``cache_creation_input_tokens``, ``completion_tokens`` is ``output_tokens``, and
    ``reasoning_tokens`` is ``output_tokens_details.thinking_tokens`` (in ``output_tokens``).

    Server-side compaction (beta) samples once more to write its summary: billed, but each
    ``compaction`` entry of ``usage.iterations`` is left out of the top-level counts (the API
    reference's words), so those entries' counts are added to the same fields.
    """
    if not isinstance(usage, dict):
        return None
    counts = _counts(usage)
    iterations = usage.get("iterations")
    if iterations and type(iterations) is list:
        for entry in iterations:
            if type(entry) is dict and entry.get("type") == "compaction":
                counts = [total if more is None else more if total is None else total + more
                          for total, more in zip(counts, _counts(entry))]
    prompt, output, read, created = counts
    details = usage.get("output_tokens_details")
    return make_usage(prompt, output, None, read, created,
                      details.get("thinking_tokens") if isinstance(details, dict) else None)


def _counts(usage):
    """(prompt, output, cache reads, cache writes) of a usage object or of one of its
    iterations, each a count or None (not sent, or not a count: is_count, inline, as this runs
    for every record); the prompt is the sum of the input, the cache writes and the reads sent."""
    prompt = None
    created = usage.get("cache_creation_input_tokens")
    read = usage.get("cache_read_input_tokens")
    for count in (usage.get("input_tokens"), created, read):
        if type(count) is int and count >= 0:
            prompt = count if prompt is None else prompt + count
    output = usage.get("output_tokens")
    return (prompt, output if type(output) is int and output >= 0 else None,
            read if type(read) is int and read >= 0 else None,
            created if type(created) is int and created >= 0 else None)


def _block(blocks, payload):
    """The block an event's ``index`` names, or None (an index that is not an int, a list or
    true, names none: true would be block 1 as a dict key)."""
    index = payload.get("index")
    return blocks.get(index) if is_int(index) else None


def _event_error(payload):
    err = payload.get("error")
    if isinstance(err, dict):
        return {"type": str(err.get("type") or "error"),
                "message": err.get("message") if isinstance(err.get("message"), str)
                else json.dumps(err)}
    return {"type": "error", "message": json.dumps(payload)}


# message_delta fields a null may set (the SDK copies these as sent); any other null one
# (e.g. "container": null) leaves the message's value.
_DELTA_NULLABLE = frozenset(("stop_reason", "stop_sequence", "stop_details"))
# A message_delta event's members that are not fields of the message (its other members, such
# as the beta context_management, are: the SDK copies them over when not null).
_DELTA_EVENT = frozenset(("type", "delta", "usage"))
# What a compaction_delta sets on its block (the SDK replaces both, even with null).
_COMPACTION = ("content", "encrypted_content")


class _Block(object):
    __slots__ = ("block", "json_parts", "closed")

    def __init__(self, block):
        self.block = block
        self.json_parts = None  # type: list | None  # partial_json pieces, once any arrived
        self.closed = False

    def delta(self, delta):
        dtype = delta.get("type")
        block = self.block
        if dtype == "text_delta":
            piece = delta.get("text")
            text = block.get("text")
            if type(text) is Pieces and type(piece) is str:
                text.append(piece)  # (append_text's work, without the call: nearly every event)
            else:
                append_text(block, "text", piece)
        elif dtype == "input_json_delta":
            piece = delta.get("partial_json")
            if self.json_parts is None:
                self.json_parts = []
            if isinstance(piece, str):
                self.json_parts.append(piece)
        elif dtype == "thinking_delta":
            append_text(block, "thinking", delta.get("thinking"))
        elif dtype == "signature_delta":
            append_text(block, "signature", delta.get("signature"))
        elif dtype == "citations_delta":
            citation = delta.get("citation")
            if citation is not None:
                cites = block.get("citations")
                if not isinstance(cites, list):
                    cites = block["citations"] = []
                cites.append(citation)
        elif dtype == "compaction_delta":
            for key in _COMPACTION:
                block[key] = delta.get(key)
        else:
            # A delta type this code does not know: merge its string fields
            # the way the known ones work, so the text is not lost.
            for key, value in delta.items():
                if key != "type" and isinstance(value, str):
                    append_text(block, key, value)

    def finish(self):
        if self.json_parts is not None:
            text = "".join(self.json_parts)
            if not text.strip():
                # Nothing streamed: the start's input stays (the SDK parses only a
                # non-empty buffer).
                if self.block.get("input") is None:
                    self.block["input"] = {}
            else:
                try:
                    if too_deep(text):  # (see depth)
                        raise RecursionError
                    self.block["input"] = json.loads(text)
                except (ValueError, RecursionError):
                    self.block["input"] = text
            self.json_parts = None
        self.closed = True
        return self.block


class AnthropicMessages(Dialect):
    name = "anthropic_messages"

    def _reassemble(self, events):
        message = None  # type: dict | None
        blocks = {}  # type: dict
        usage = {}  # type: dict
        error = None
        stopped = False
        for ev in events:
            # (typed_payloads, inline: this runs for every event of every stream.)
            data = ev.data
            if not data:
                continue
            payload = loads(data)
            if not isinstance(payload, dict):
                continue
            etype = payload.get("type") or ev.event
            if etype == "content_block_delta":  # (first: nearly every event is one)
                index = payload.get("index")
                acc = blocks.get(index) if type(index) is int else None  # (_block: JSON's ints)
                delta = payload.get("delta")
                if acc is not None and isinstance(delta, dict):
                    acc.delta(delta)
            elif etype == "message_start":
                msg = payload.get("message")
                if isinstance(msg, dict):
                    message = dict(msg)
                    if isinstance(msg.get("usage"), dict):
                        usage = dict(msg["usage"])
            elif etype == "content_block_start":
                index = payload.get("index")
                block = payload.get("content_block")
                if is_int(index) and isinstance(block, dict):
                    blocks[index] = _Block(dict(block))
                    if block.get("type") == "fallback":
                        served = get(block, "to", "model")
                        if isinstance(served, str):
                            if message is None:
                                message = {}
                            message["model"] = served
            elif etype == "content_block_stop":
                acc = _block(blocks, payload)
                if acc is not None:
                    acc.finish()
            elif etype == "message_delta":
                if message is None:
                    message = {}
                delta = payload.get("delta")
                if isinstance(delta, dict):
                    for key, value in delta.items():
                        if value is not None or key in _DELTA_NULLABLE:
                            message[key] = value
                for key, value in payload.items():
                    if value is not None and key not in _DELTA_EVENT:
                        message[key] = value
                du = payload.get("usage")
                if isinstance(du, dict):
                    for key, value in du.items():
                        if value is not None:
                            usage[key] = value
            elif etype == "message_stop":
                stopped = True
            elif etype == "error":
                error = _event_error(payload)
            # "ping" and unknown events: nothing to rebuild.
        if message is None and not blocks:
            return Result(None, None, error, stopped)
        if message is None:
            message = {}
        content = [blocks[i].block if blocks[i].closed else blocks[i].finish()
                   for i in sorted(blocks)]
        message["content"] = finalize(content)
        if usage:
            message["usage"] = usage
        return Result(message, anthropic_usage(usage or None), error, stopped)

    def _from_body(self, body):
        usage = body.get("usage") if isinstance(body, dict) else None
        return Result(body, anthropic_usage(usage), error_from(body), body is not None)


class AnthropicCountTokens(Dialect):
    """``/v1/messages/count_tokens``: ``{"input_tokens": N}``.

    Counting tokens consumes none, so ``tokens_used`` stays None (the count
    is in ``response_body``); otherwise usage statistics would double count.
    """

    name = "anthropic_count_tokens"

    def _from_body(self, body):
        return Result(body, None, error_from(body), body is not None)

    def _reassemble(self, events):
        for ev in events:
            value = loads(ev.data) if ev.data else None
            if value is not None:
                return self._from_body(value)
        return Result(None, None, None, False)

