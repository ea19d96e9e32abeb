"""Dialects: how each LLM API's responses are decoded, reassembled and counted.

Entry points (all run on the recorder's writer thread; none raises):

* :func:`select` ``(provider_type, method, path) -> Dialect`` picks the
  dialect from the endpoint path (without query); unknown endpoints get the
  ``generic`` dialect, never None.
* :func:`decode_stream` ``(content_type, chunks, max_event_size)`` turns a
  captured stream body into timed :class:`~proxy_llm.sse.Event` objects.
* ``Dialect.reassemble(events)`` (streams) and ``Dialect.from_body(body)``
  (non-streamed, parsed JSON) give a :class:`Result`: ``response_body``,
  ``tokens_used``, ``error``, ``complete``. A bug inside a dialect does not
  raise: it gives ``error["type"] == REASSEMBLY_ERROR`` and no body.

Token usage (``tokens_used``)
-----------------------------

A key is present only when the upstream sent its source field; a count the
upstream never sent is absent, never 0. ``total_tokens`` is the upstream's
total when sent, else ``prompt_tokens + completion_tokens`` when both exist.

| tokens_used | OpenAI chat, completions, embeddings (`usage`) | OpenAI Responses (`response.usage`) | Anthropic Messages (`usage`, merged over the stream) | Gemini (`usageMetadata`, the last one) |
| --- | --- | --- | --- | --- |
| prompt_tokens | `prompt_tokens` (includes cached) | `input_tokens` (includes cached) | `input_tokens + cache_creation_input_tokens + cache_read_input_tokens` | `promptTokenCount + toolUsePromptTokenCount` (includes cached) |
| completion_tokens | `completion_tokens` | `output_tokens` (includes reasoning) | `output_tokens` | `candidatesTokenCount + thoughtsTokenCount` |
| total_tokens | `total_tokens` | `total_tokens` | prompt_tokens + completion_tokens | `totalTokenCount` |
| cached_tokens | `prompt_tokens_details.cached_tokens` (DeepSeek: `prompt_cache_hit_tokens`) | `input_tokens_details.cached_tokens` | `cache_read_input_tokens` | `cachedContentTokenCount` |
| cache_creation_tokens | `prompt_tokens_details.cache_write_tokens` | `input_tokens_details.cache_write_tokens` | `cache_creation_input_tokens` | - |
| reasoning_tokens | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | `output_tokens_details.thinking_tokens` | `thoughtsTokenCount` |

A sum is present when any of its terms was sent (the terms sent are added).

Anthropic ``count_tokens`` responses consume no tokens: ``tokens_used`` is
None there (the count stays in ``response_body``).
"""

from __future__ import annotations

from .. import sse
from ..memo import Memo
from .anthropic import AnthropicCountTokens, AnthropicMessages
from .base import REASSEMBLY_ERROR, Dialect, Result
from .gemini import Gemini
from .openai_chat import OpenAIChat
from .openai_misc import OpenAICompletions, OpenAIEmbeddings
from .openai_responses import OpenAIResponses
from .streams import JSONArrayDecoder, LineDecoder

__all__ = ["Dialect", "Result", "select", "decode_stream", "DIALECTS", "GENERIC",
           "REASSEMBLY_ERROR"]

GENERIC = Dialect()

# The registry: (test on the path, dialect), first match wins. Matching is on
# the path alone because providers serve each other's formats (Anthropic and
# Gemini both offer OpenAI-compatible /chat/completions); provider_type only
# breaks ties (see select). More specific suffixes come first.
_RULES = (
    (lambda p: p.endswith("/messages/count_tokens"), AnthropicCountTokens()),
    # (/v1/messages, not OpenAI's /v1/chat/completions/{id}/messages or /v1/threads/{id}/messages)
    (lambda p: p.endswith("/v1/messages"), AnthropicMessages()),
    (lambda p: p.endswith("/chat/completions"), OpenAIChat()),
    (lambda p: p.endswith("/completions"), OpenAICompletions()),
    (lambda p: p.endswith("/embeddings"), OpenAIEmbeddings()),
    (lambda p: p.endswith("/responses") or "/responses/" in p, OpenAIResponses()),
    (lambda p: p.endswith(":generateContent") or p.endswith(":streamGenerateContent"), Gemini()),
)

#: Every dialect by name (including "generic").
DIALECTS = dict([(d.name, d) for _, d in _RULES] + [(GENERIC.name, GENERIC)])


def select(provider_type, method, path):
    # type: (str | None, str | None, str | None) -> Dialect
    """The dialect for a request; the ``generic`` dialect when none matches.

    ``path`` is without the query string. ``method`` and ``provider_type``
    do not change the choice today (the path is unambiguous across the three
    providers); they are part of the signature so a future endpoint can use
    them.
    """
    found = _SELECTED.get(path)
    if found is not None:
        return found
    p = (path or "").split("?", 1)[0].rstrip("/")
    found = GENERIC
    for test, dialect in _RULES:
        if test(p):
            found = dialect
            break
    return _SELECTED.remember(path, found, len(path) if path else 0)


# Paths are few; a client inventing them only resets this. Bounded in characters too: a
# request line may be 64 KB long, and 1,024 of them were 64 MB kept on the writer.
_SELECTED = Memo(1024, 1 << 20)


def decode_stream(content_type, chunks, max_event_size=sse.DEFAULT_MAX_EVENT_SIZE):
    # type: (str | None, list, int) -> tuple
    """Decode a captured stream body into ``([(t_ms, Event), ...], truncated)``.

    ``chunks`` are ``(t_ms, bytes)`` in arrival order; each event is stamped
    with the time of the chunk that completed it. ``text/event-stream`` is
    SSE; ``application/json`` is a JSON array split into one event per element
    (Gemini ``streamGenerateContent`` without ``alt=sse``); anything else is
    one event per non-empty line (NDJSON). A missing or unrecognised type
    (neither of those nor NDJSON) is sniffed from the first bytes: SSE when
    they start with an SSE field or comment, a JSON array when with ``[``.
    ``truncated`` is true when an
    event was dropped for exceeding ``max_event_size``. Never raises on bad
    bytes.
    """
    if not isinstance(chunks, (list, tuple)):
        chunks = list(chunks or ())
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in _KNOWN_MEDIA and not media.endswith("+json"):
        media = _sniff(chunks)
    if media == "text/event-stream":
        return sse.decode_chunks(chunks, max_event_size)
    if media == "application/json" or media.endswith("+json"):
        decoder = JSONArrayDecoder(max_event_size)
    else:
        decoder = LineDecoder(max_event_size)
    return sse.feed_chunks(decoder, chunks)


_KNOWN_MEDIA = frozenset(("text/event-stream", "application/json", "application/x-ndjson",
                          "application/ndjson", "application/jsonl", "application/json-seq"))
_SSE_STARTS = (b"data:", b"event:", b"id:", b"retry:", b":")


def _sniff(chunks):
    """The media type a body with no usable Content-Type looks like."""
    head = []
    size = 0
    for _, data in chunks or ():
        head.append(data)
        size += len(data)
        if size >= 64:
            break
    start = b"".join(head)[:64].lstrip(b" \t\r\n\xef\xbb\xbf")
    if start.startswith(_SSE_STARTS):
        return "text/event-stream"
    if start.startswith(b"["):
        return "application/json"
    return "application/x-ndjson"
