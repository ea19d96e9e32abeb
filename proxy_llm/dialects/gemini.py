"""Google Gemini ``generateContent`` and ``streamGenerateContent``.

Each streamed element (SSE ``data:`` with ``?alt=sse``, else an element of a
JSON array) is a ``GenerateContentResponse``. Reassembly gives one
``GenerateContentResponse``:

* ``candidates`` by ``index`` (0 when absent); their ``content.parts`` are
  appended in order, consecutive text parts of the same kind (``thought``
  true or not) merged into one; a part carrying a ``thoughtSignature`` keeps
  it, and a second signed part is not merged into an already signed one;
  ``functionCall`` and other parts are kept as sent;
* other candidate fields (``finishReason``, ``safetyRatings``,
  ``citationMetadata``, ``groundingMetadata``, ...) and top-level fields
  (``modelVersion``, ``responseId``, ``promptFeedback``): the last value sent;
* ``usageMetadata`` is cumulative: the last one counts.

``promptFeedback.blockReason`` and an ``{"error": ...}`` element set
``Result.error``. ``Result.complete``: every candidate has a
``finishReason`` (or the prompt was blocked).
"""

from __future__ import annotations

from .base import Dialect, Pieces, Result, append_text, error_from, finalize, is_count, is_int, loads, make_usage

__all__ = ["Gemini", "gemini_usage"]


def gemini_usage(meta):
    """tokens_used from ``usageMetadata``.

    prompt is ``promptTokenCount + toolUsePromptTokenCount`` (those sent): the
    tool-use prompt (search results, code output fed back to the model) is
    input the model read, billed as input, and counted in ``totalTokenCount``
    but not in ``promptTokenCount``; ``promptTokenCount`` includes
    ``cachedContentTokenCount``. completion is
    ``candidatesTokenCount + thoughtsTokenCount`` (those sent);
    ``reasoning_tokens`` is ``thoughtsTokenCount``.
    """
    if not isinstance(meta, dict):
        return None
    cands = meta.get("candidatesTokenCount")
    thoughts = meta.get("thoughtsTokenCount")
    sent = [v for v in (cands, thoughts) if is_count(v)]
    prompt = meta.get("promptTokenCount")
    tool_prompt = meta.get("toolUsePromptTokenCount")
    if is_count(tool_prompt):
        prompt = prompt + tool_prompt if is_count(prompt) else tool_prompt
    return make_usage(
        prompt=prompt,
        completion=sum(sent) if sent else None,
        total=meta.get("totalTokenCount"),
        cached=meta.get("cachedContentTokenCount"),
        reasoning=thoughts,
    )


def _is_text_part(part):
    return isinstance(part.get("text"), (str, Pieces)) and all(
        k in ("text", "thought", "thoughtSignature") for k in part)


class _Candidate(object):
    __slots__ = ("index", "fields", "role", "parts", "content_extra", "has_content")

    def __init__(self, index):
        self.index = index
        self.fields = {}  # type: dict
        self.role = None
        self.parts = []  # type: list
        self.content_extra = {}  # type: dict
        self.has_content = False

    def add(self, cand):
        for key, value in cand.items():
            if key == "content":
                if isinstance(value, dict):
                    self._add_content(value)
            elif key != "index":
                self.fields[key] = value

    def _add_content(self, content):
        self.has_content = True
        for key, value in content.items():
            if key == "role":
                if value and not self.role:
                    self.role = value
            elif key == "parts":
                if isinstance(value, list):
                    for part in value:
                        if isinstance(part, dict):
                            self._add_part(part)
            else:
                self.content_extra[key] = value

    def _add_part(self, part):
        prev = self.parts[-1] if self.parts else None
        if (prev is not None and _is_text_part(part) and _is_text_part(prev)
                and bool(prev.get("thought")) == bool(part.get("thought"))
                and not ("thoughtSignature" in prev and "thoughtSignature" in part)):
            append_text(prev, "text", part["text"])
            if "thoughtSignature" in part:
                prev["thoughtSignature"] = part["thoughtSignature"]
            return
        self.parts.append(dict(part))

    def build(self):
        out = {}
        if self.has_content:
            content = {"parts": finalize(self.parts)}
            if self.role:
                content["role"] = self.role
            content.update(self.content_extra)
            out["content"] = content
        out.update(self.fields)
        out["index"] = self.index
        return out


def _block_error(feedback):
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if reason:
        msg = feedback.get("blockReasonMessage")
        return {"type": "prompt_blocked",
                "message": msg if isinstance(msg, str) and msg else "blockReason: %s" % reason}
    return None


class Gemini(Dialect):
    name = "gemini"

    def _reassemble(self, events):
        return self._merge(loads(ev.data) for ev in events if ev.data)

    def _merge(self, elements):
        top = {}  # type: dict
        cands = {}  # type: dict
        usage = None
        error = None
        seen = False
        for elem in elements:
            if not isinstance(elem, dict):
                continue
            err = error_from(elem)
            if err is not None:
                error = err
                continue
            seen = True
            for key, value in elem.items():
                if key == "candidates":
                    if not isinstance(value, list):
                        continue
                    for pos, cand in enumerate(value):
                        if not isinstance(cand, dict):
                            continue
                        index = cand.get("index")
                        if not is_int(index):
                            index = pos
                        acc = cands.get(index)
                        if acc is None:
                            acc = cands[index] = _Candidate(index)
                        acc.add(cand)
                elif key == "usageMetadata":
                    if isinstance(value, dict):
                        usage = value
                else:
                    top[key] = value
        if not seen:
            return Result(None, None, error, False)
        body = {}
        if cands:
            body["candidates"] = [cands[i].build() for i in sorted(cands)]
        if "promptFeedback" in top:
            body["promptFeedback"] = top.pop("promptFeedback")
        if usage is not None:
            body["usageMetadata"] = usage
        body.update(top)
        blocked = _block_error(body.get("promptFeedback"))
        complete = bool(blocked) or (bool(cands) and all(
            c.fields.get("finishReason") for c in cands.values()))
        return Result(body, gemini_usage(usage), error or blocked, complete)

    def _from_body(self, body):
        if isinstance(body, list):
            # A whole streamGenerateContent array read as one body.
            return self._merge(body)
        if not isinstance(body, dict):
            return Result(body, None, None, body is not None)
        err = error_from(body)
        if err is not None:
            return Result(body, None, err, True)
        return Result(body, gemini_usage(body.get("usageMetadata")),
                      _block_error(body.get("promptFeedback")), True)
