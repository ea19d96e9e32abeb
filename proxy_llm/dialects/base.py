"""What every dialect shares: :class:`Result`, the :class:`Dialect` base, small helpers.

A dialect turns what an upstream sent into a :class:`Result`. Subclasses
implement ``_reassemble(events)`` and ``_from_body(body)``; the public
:meth:`Dialect.reassemble` and :meth:`Dialect.from_body` never raise: a bug or
an input shape nobody foresaw becomes ``Result.error`` of type
``"proxy_llm.reassembly_error"`` (the raw events are recorded anyway).
"""

from __future__ import annotations

import json
from operator import attrgetter

from ..depth import too_deep

__all__ = ["Result", "Dialect", "REASSEMBLY_ERROR", "loads", "typed_payloads", "is_int", "error_from",
           "make_usage", "is_count", "get", "Pieces", "append_text", "finalize"]

REASSEMBLY_ERROR = "proxy_llm.reassembly_error"


class Result(object):
    """The outcome of one response, as the record stores it.

    ``response_body``: the provider's own final response object (for streams,
    rebuilt from the events), or None when nothing usable was received.
    ``tokens_used``: dict or None (see the table in ``proxy_llm.dialects``);
    keys appear only when the upstream sent their source field.
    ``error``: None or ``{"type": str, "message": str}``.
    ``complete``: the stream's terminal event was seen (non-streamed bodies:
    a body was received).
    """

    __slots__ = ("response_body", "tokens_used", "error", "complete")

    def __init__(self, response_body=None, tokens_used=None, error=None, complete=False):
        self.response_body = response_body
        self.tokens_used = tokens_used
        self.error = error
        self.complete = complete

    def to_json(self):
        # type: () -> dict
        return {
            "response_body": self.response_body,
            "tokens_used": self.tokens_used,
            "error": self.error,
            "complete": self.complete,
        }

    def __repr__(self):
        return "Result(%r)" % (self.to_json(),)

    def __eq__(self, other):
        if not isinstance(other, Result):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]


class Dialect(object):
    """One API's response format. Stateless: one instance serves every record."""

    name = "generic"

    def reassemble(self, events):
        # type: (list) -> Result
        """Rebuild the final response from a stream's events. Never raises.

        An ``unterminated`` event (the stream ended inside it) is skipped, as every client
        skips it: the record holds what the client received.
        """
        try:
            events = list(events or ())
            try:
                cut = any(map(_UNTERMINATED, events))  # (a C loop: this runs for every stream)
            except AttributeError:  # an event of another kind
                cut = True
            if cut:
                events = [e for e in events if not getattr(e, "unterminated", False)]
            return self._reassemble(events)
        except Exception as exc:  # noqa: BLE001 - contract: report, never raise
            return _failed(exc)

    def from_body(self, body):
        # type: (object) -> Result
        """Read a non-streamed response (parsed JSON value or None). Never raises."""
        try:
            return self._from_body(body)
        except Exception as exc:  # noqa: BLE001 - contract: report, never raise
            return _failed(exc, body)

    # Subclasses override these two.
    def _reassemble(self, events):
        items = []
        for ev in events:
            if ev.data:
                value = loads(ev.data)
                items.append(ev.data if value is None else value)
        return Result(items or None, None, None, False)

    def _from_body(self, body):
        return Result(body, None, error_from(body), body is not None)

    def __repr__(self):
        return "<dialect %s>" % self.name


_UNTERMINATED = attrgetter("unterminated")


def _failed(exc, body=None):
    return Result(body, None, {"type": REASSEMBLY_ERROR,
                               "message": "%s: %s" % (type(exc).__name__, exc)}, False)


_SCAN = json.JSONDecoder().scan_once  # the scanner json.loads uses, as json.loads makes it


def loads(text):
    """Parse JSON text; None when it is not JSON (or is JSON null).

    ``json.loads``'s answer. An event's data is nearly always one JSON value with nothing
    around it: the scanner reads that at once (every event of a stream comes through here);
    anything else (whitespace around it, more after it, a BOM, not JSON) goes through
    ``json.loads``.
    """
    if text and too_deep(text):  # (see depth)
        return None
    if type(text) is str:
        try:
            value, end = _SCAN(text, 0)
            if end == len(text):
                return value
        except (StopIteration, ValueError, RecursionError):
            pass
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def typed_payloads(events):
    """Yield (type, payload, event) for each event whose data is a JSON object.

    The type is the payload's ``type``, else the SSE ``event:`` name (Anthropic and the
    Responses API send both); events without data or with other JSON are skipped.
    """
    for ev in events:
        if not ev.data:
            continue
        payload = loads(ev.data)
        if isinstance(payload, dict):
            yield payload.get("type") or ev.event, payload, ev


def is_int(value):
    """True for a real int (bool is not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def error_from(body):
    """The ``{"type", "message"}`` of an error object in ``body``, or None.

    Understands OpenAI and Azure OpenAI (``{"error": {"type"|"code", "message"}}``), Anthropic
    (``{"type": "error", "error": {"type", "message"}}``) and Google
    (``{"error": {"code", "status", "message"}}``, also inside a list).
    """
    if isinstance(body, list):
        for item in body:
            err = error_from(item)
            if err is not None:
                return err
        return None
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict):
        # Google's "status" is a name (INVALID_ARGUMENT); Azure OpenAI's is the HTTP status
        # (400, next to its "code": "content_filter"), which names no error: the code does.
        status = err.get("status")
        etype = err.get("type") or (status if isinstance(status, str) else None) or err.get("code") or "error"
        msg = err.get("message")
        return {"type": str(etype), "message": msg if isinstance(msg, str) else json.dumps(err)}
    if isinstance(err, str) and err:
        return {"type": "error", "message": err}
    return None


def is_count(value):
    """True for a token count: an int (never a bool) of 0 or more. Some servers send -1 for a
    count they do not know; it is not sent, as any other value that is not a count."""
    return type(value) is int and value >= 0


def make_usage(prompt=None, completion=None, total=None, cached=None,
               cache_creation=None, reasoning=None):
    """Build tokens_used from counts the upstream sent (None = not sent).

    Values that are not counts (:func:`is_count`: not an int, or negative) count as not
    sent. ``total_tokens`` is the sent total, or prompt + completion when the upstream sent
    both but no total. Returns None when nothing was sent.
    """
    # is_count's test, inline: one per count, in the documented key order (prompt, completion,
    # total, the rest); this runs for every record the writer encodes.
    out = {}
    if type(prompt) is int and prompt >= 0:
        out["prompt_tokens"] = prompt
    if type(completion) is int and completion >= 0:
        out["completion_tokens"] = completion
    if type(total) is int and total >= 0:
        out["total_tokens"] = total
    elif len(out) == 2:
        out["total_tokens"] = prompt + completion
    if type(cached) is int and cached >= 0:
        out["cached_tokens"] = cached
    if type(cache_creation) is int and cache_creation >= 0:
        out["cache_creation_tokens"] = cache_creation
    if type(reasoning) is int and reasoning >= 0:
        out["reasoning_tokens"] = reasoning
    return out or None


def get(obj, *keys):
    """``obj[k1][k2]...`` through dicts, None when any step is missing or not a dict."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


class Pieces(list):
    """Text being streamed, kept as pieces and joined once by :func:`finalize`.

    Joining as we go (``old + piece``) copies the whole text at every delta:
    quadratic for long answers.
    """

    __slots__ = ()


def append_text(obj, key, piece):
    """Append the string ``piece`` to the text at ``obj[key]`` (see :class:`Pieces`)."""
    if not isinstance(piece, str):
        return
    old = obj.get(key)
    if isinstance(old, Pieces):
        old.append(piece)
    elif isinstance(old, str):
        obj[key] = Pieces((old, piece))
    else:
        obj[key] = Pieces((piece,))


def finalize(value):
    """Join every :class:`Pieces` inside ``value`` (dicts and lists, in place); return it."""
    if isinstance(value, Pieces):
        return "".join(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = finalize(item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list)):
                value[i] = finalize(item)
    return value
