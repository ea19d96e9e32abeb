"""OpenAI Responses API (``/v1/responses``), streamed and not.

A stream is typed events (``event: response.created`` + ``data: {"type":
...}``) ending with ``response.completed``, ``response.failed`` or
``response.incomplete``, each of which carries the whole final ``response``
object: that object is the reassembled body as sent (when its ``output`` is
null, as some compatible servers send it, the items seen are put there, ``[]``
when none, as the openai SDK does).

When the stream ends before any of them, the body is rebuilt from the last
``response`` snapshot seen (``response.created`` / ``response.in_progress``)
with ``output`` made of the items seen, by ``output_index``:

* ``response.output_item.added`` starts an item, ``response.output_item.done``
  replaces it with the final one;
* ``response.content_part.added`` / ``.done`` start / replace ``content[i]``;
* ``response.output_text.delta`` / ``response.refusal.delta`` /
  ``response.reasoning_text.delta`` append to the part's text (``.done``
  sets the whole text); ``response.output_text.annotation.added`` appends
  the annotation;
* ``response.function_call_arguments.delta`` appends to ``arguments``
  (``.done`` sets it whole, for servers that send only that); likewise
  ``*_call_arguments`` (MCP), ``custom_tool_call_input`` (``input``) and
  ``code_interpreter_call_code`` (``code``);
* ``response.reasoning_summary_part.added`` / ``.done`` and
  ``response.reasoning_summary_text.delta`` / ``.done`` build ``summary[i]``.

Errors: ``response.failed`` gives ``response.error``; an ``error`` event gives
its ``code``/``message``. ``Result.complete``: one of the three terminal
events was seen.
"""

from __future__ import annotations

from .base import (Dialect, Result, append_text, error_from, finalize, get, is_int, make_usage,
                   typed_payloads)

__all__ = ["OpenAIResponses", "responses_usage"]

_TERMINAL = ("response.completed", "response.failed", "response.incomplete")
_SNAPSHOTS = ("response.created", "response.in_progress", "response.queued")
_ITEM_TEXT_EVENTS = (("_call_arguments", "arguments"), ("_call_input", "input"),
                     ("_call_code", "code"))


def responses_usage(usage):
    """tokens_used from a Responses API ``usage`` object.

    ``input_tokens`` includes cached (``input_tokens_details.cached_tokens``) and
    written to the cache (``input_tokens_details.cache_write_tokens``),
    ``output_tokens`` includes reasoning
    (``output_tokens_details.reasoning_tokens``).
    """
    if not isinstance(usage, dict):
        return None
    return make_usage(
        prompt=usage.get("input_tokens"),
        completion=usage.get("output_tokens"),
        total=usage.get("total_tokens"),
        cached=get(usage, "input_tokens_details", "cached_tokens"),
        cache_creation=get(usage, "input_tokens_details", "cache_write_tokens"),
        reasoning=get(usage, "output_tokens_details", "reasoning_tokens"),
    )


def _response_error(response):
    err = response.get("error") if isinstance(response, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        return {"type": str(err.get("code") or err.get("type") or "error"),
                "message": msg if isinstance(msg, str) else str(err)}
    return None


MAX_PART_GAP = 64  # content or summary parts an event may skip ahead of the ones seen


def _slot(items, index, default_factory):
    """``items[index]``, growing the list with placeholders as needed."""
    while len(items) <= index:
        items.append(None)
    if not isinstance(items[index], dict):
        items[index] = default_factory()
    return items[index]


class _Items(object):
    """Output items rebuilt from events, by output_index."""

    def __init__(self):
        self.items = {}  # type: dict

    def item(self, ev):
        index = ev.get("output_index")
        if not is_int(index):
            # Find by item_id among the items seen.
            item_id = ev.get("item_id")
            for item in self.items.values():
                if item.get("id") == item_id:
                    return item
            return None
        item = self.items.get(index)
        if item is None:
            item = self.items[index] = {"id": ev.get("item_id")}
        return item

    def part(self, ev, key="content", index_key="content_index", part_type="output_text"):
        item = self.item(ev)
        if item is None:
            return None
        index = ev.get(index_key)
        if not is_int(index) or index < 0:
            return None
        parts = item.get(key)
        if not isinstance(parts, list):
            parts = item[key] = []
        if index > len(parts) + MAX_PART_GAP:  # parts come in order: 10**9 would be a list of 10**9
            return None
        return _slot(parts, index, lambda: {"type": part_type, "text": ""})

    def apply(self, etype, ev):
        if etype == "response.output_item.added" or etype == "response.output_item.done":
            index = ev.get("output_index")
            item = ev.get("item")
            if is_int(index) and isinstance(item, dict):
                self.items[index] = dict(item)
        elif etype in ("response.content_part.added", "response.content_part.done"):
            part = self.part(ev)
            if part is not None and isinstance(ev.get("part"), dict):
                part.clear()
                part.update(ev["part"])
        elif etype == "response.output_text.delta":
            part = self.part(ev)
            if part is not None:
                append_text(part, "text", ev.get("delta"))
                if isinstance(ev.get("logprobs"), list) and ev["logprobs"]:
                    lps = part.get("logprobs")
                    if not isinstance(lps, list):
                        lps = part["logprobs"] = []
                    lps.extend(ev["logprobs"])
        elif etype == "response.output_text.done":
            part = self.part(ev)
            if part is not None and isinstance(ev.get("text"), str):
                part["text"] = ev["text"]
        elif etype == "response.output_text.annotation.added":
            part = self.part(ev)
            if part is not None and ev.get("annotation") is not None:
                notes = part.get("annotations")
                if not isinstance(notes, list):
                    notes = part["annotations"] = []
                notes.append(ev["annotation"])
        elif etype == "response.refusal.delta":
            part = self.part(ev, part_type="refusal")
            if part is not None:
                append_text(part, "refusal", ev.get("delta"))
        elif etype == "response.refusal.done":
            part = self.part(ev, part_type="refusal")
            if part is not None and isinstance(ev.get("refusal"), str):
                part["refusal"] = ev["refusal"]
        elif etype == "response.reasoning_text.delta":
            part = self.part(ev, part_type="reasoning_text")
            if part is not None:
                append_text(part, "text", ev.get("delta"))
        elif etype == "response.reasoning_text.done":
            part = self.part(ev, part_type="reasoning_text")
            if part is not None and isinstance(ev.get("text"), str):
                part["text"] = ev["text"]
        elif etype in ("response.reasoning_summary_part.added",
                       "response.reasoning_summary_part.done"):
            part = self.part(ev, "summary", "summary_index", "summary_text")
            if part is not None and isinstance(ev.get("part"), dict):
                part.clear()
                part.update(ev["part"])
        elif etype == "response.reasoning_summary_text.delta":
            part = self.part(ev, "summary", "summary_index", "summary_text")
            if part is not None:
                append_text(part, "text", ev.get("delta"))
        elif etype == "response.reasoning_summary_text.done":
            part = self.part(ev, "summary", "summary_index", "summary_text")
            if part is not None and isinstance(ev.get("text"), str):
                part["text"] = ev["text"]
        else:
            # Tool-call text streamed into one field of the item:
            # function_call_arguments / mcp_call_arguments -> "arguments",
            # custom_tool_call_input -> "input",
            # code_interpreter_call_code -> "code".
            for suffix, key in _ITEM_TEXT_EVENTS:
                if etype.endswith(suffix + ".delta"):
                    item = self.item(ev)
                    if item is not None:
                        append_text(item, key, ev.get("delta"))
                    break
                if etype.endswith(suffix + ".done"):
                    item = self.item(ev)
                    if item is not None and isinstance(ev.get(key), str):
                        item[key] = ev[key]
                    break

    def output(self):
        return finalize([self.items[i] for i in sorted(self.items)])


class OpenAIResponses(Dialect):
    name = "openai_responses"

    def _reassemble(self, events):
        final = None
        snapshot = None
        items = _Items()
        error = None
        for etype, payload, ev in typed_payloads(events):
            if not isinstance(etype, str):
                # An untyped OpenAI error chunk ({"error": {...}}, as LiteLLM sends when a
                # stream fails to start): the SDK raises on it, the record keeps it.
                error = error_from(payload) or error
                continue
            if etype in _TERMINAL:
                if isinstance(payload.get("response"), dict):
                    final = payload["response"]
                    error = _response_error(final) or error
            elif etype in _SNAPSHOTS:
                if isinstance(payload.get("response"), dict):
                    snapshot = payload["response"]
            elif etype == "error":
                msg = payload.get("message")
                err = error_from(payload)
                if err is None:
                    err = {"type": str(payload.get("code") or "error"),
                           "message": msg if isinstance(msg, str) else ev.data}
                error = err
            elif etype.startswith("response."):
                items.apply(etype, payload)
        if final is not None:
            output = items.output()
            if final.get("output") is None:
                # Some servers send the terminal response without its output
                # (the openai SDK then uses the items it saw, [] when none, so do we).
                final = dict(final)
                final["output"] = output
            return Result(final, responses_usage(final.get("usage")), error, True)
        output = items.output()
        if snapshot is None and not output:
            return Result(None, None, error, False)
        body = dict(snapshot or {"object": "response"})
        if output or not isinstance(body.get("output"), list):
            body["output"] = output
        return Result(body, responses_usage(body.get("usage")), error, False)

    def _from_body(self, body):
        if not isinstance(body, dict):
            return Result(body, None, None, body is not None)
        usage = body.get("usage")
        # A response object's error (status "failed") has a code and no type; an HTTP error
        # body is OpenAI's usual envelope, read as every OpenAI dialect reads it.
        error = _response_error(body) if body.get("object") == "response" else error_from(body)
        return Result(body, responses_usage(usage), error, True)
