"""Find a request's top-level ``model`` and ``stream`` without parsing the body.

Routing needs the model before the request is forwarded, on the request's own thread, where a
full ``json.loads`` of a 100 KB chat history costs more than forwarding it (and even on a small
body, the json module's Python layers cost a client on an idle server more than this scan). So
the body is
searched for the key, and the candidate is accepted only when it is provably at the top level:
the number of unclosed brackets before it (outside strings) is one. That count is taken over the
shorter side of the body (before the key, or after its value, where the brackets still to be
closed tell the same), so a key near either end is checked in microseconds. See ``_find`` for
what happens when neither side is short.

This module imports nothing from the package.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Optional, Tuple

# A JSON string, unrolled for speed ("normal* (escaped normal*)*").
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_MODEL_VALUE = re.compile(rb'"model"\s*:\s*("[^"\\]*(?:\\.[^"\\]*)*")')
_STREAM_VALUE = re.compile(rb'"stream"\s*:\s*(true|false)')
_KEY = re.compile(rb'"(?:model|stream)"\s*:')
CHEAP_SIDE = 16 * 1024   # bytes of context scanned at most to prove a candidate's depth


def _open_brackets(segment: bytes) -> int:
    """Opening minus closing brackets outside strings in a segment starting outside a string."""
    bare = _STRING.sub(b"", segment)
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


def _at_top_level(body: bytes, start: int, end: int) -> Optional[bool]:
    """Is the key at ``start`` (whose value ends at ``end``) a top-level key? None: too costly.

    A candidate whose first quote is escaped (``{"x\\"model":"m"}``) is the end of a string,
    not a key.
    """
    slashes = 0
    while start > slashes and body[start - slashes - 1] == 0x5C:  # backslashes before its quote
        slashes += 1
    if slashes % 2:
        return False
    if start <= CHEAP_SIDE:
        return _open_brackets(body[:start]) == 1
    if len(body) - end <= CHEAP_SIDE:
        return -_open_brackets(body[end:]) == 1
    return None


def _find(body: bytes, key: bytes, pattern: "re.Pattern[bytes]") -> Optional["re.Match[bytes]"]:
    """The match of ``pattern`` for the top-level ``key``, or None.

    First the last ``CHEAP_SIDE`` bytes are searched from their end (the Python SDKs put
    ``model`` and ``stream`` after the messages, and of a key given twice a parser keeps the
    last), then the body from the start. A candidate is accepted when its shorter side proves it
    is at the top level, skipped when that proves it nested, and, when both sides are long,
    accepted as it is: in real request bodies a nested ``"model": "..."`` before the top-level
    one does not occur (message texts and tool arguments are strings, where quotes are escaped).
    On a body of at most ``CHEAP_SIDE`` bytes the first pass covers it all, and the answer is a
    parser's. The recorder checks when it can trust this answer on a longer one
    (:func:`model_is_exact`).
    """
    n = len(body)
    tail = max(0, n - CHEAP_SIDE)
    pos = body.rfind(key, tail)
    while pos >= 0:
        m = pattern.match(body, pos)
        if m is not None:
            if _at_top_level(body, pos, m.end()):
                return m
        else:  # the key with a value of another kind (null, a number): if it is the last one, none
            k = _KEY.match(body, pos)
            if k is not None and _at_top_level(body, pos, k.end()):
                return None
        pos = body.rfind(key, tail, pos)
    if tail == 0:
        return None
    pos = body.find(key)
    while pos >= 0:
        m = pattern.match(body, pos)
        if m is not None and _at_top_level(body, pos, m.end()) is not False:
            return m
        pos = body.find(key, pos + 1)
    return None


def sniff(body: bytes) -> Tuple[Optional[str], Optional[bool]]:
    """Return (model, stream) of a JSON object body.

    ``model`` is None when absent or not a string; on a body of at most ``CHEAP_SIDE`` bytes it
    is exactly what a full parse finds (the last of a key given twice, never one inside a string). ``stream`` is None (not looked for) for an object: the
    request's own thread does not need it (the response says whether it is a stream), and the
    recorder settles it from the parsed body, or with :func:`sniff_stream` for one it splices unparsed.
    """
    if not body or body.lstrip()[:1] != b"{":
        # (Not a JSON object: not looked into. A compressed or multipart body may still ask for
        # a stream, which the recorder then tells from the answer: None, not False.)
        return None, None
    m = _find(body, b'"model"', _MODEL_VALUE)
    model = None
    if m is not None:
        raw = m.group(1)
        try:
            # find, not in: for bytes, in builds and drops a TypeError before it searches
            model = json.loads(raw) if raw.find(b"\\") >= 0 else raw[1:-1].decode("utf-8")
        except ValueError:
            model = None
    return model, None


_FORM_MODEL = re.compile(rb'(?i)content-disposition:[ \t]*form-data;[ \t]*name="model"[^\r\n]*\r\n'
                         rb'(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,256})\r\n')
DECODED_MAX = 1 << 20  # bytes of a compressed body decoded to find its model


def model_elsewhere(body: bytes, content_type: str, content_encoding: str) -> Optional[str]:
    """The ``model`` of a body :func:`sniff` does not look into: a JSON body sent compressed
    (``Content-Encoding: gzip`` or ``deflate``, its first :data:`DECODED_MAX` bytes decoded),
    or a multipart form's ``model`` field (an audio transcription, an image edit: within its
    first or last 64 KB, where the SDKs put their fields). None when there is none."""
    coding = content_encoding.strip().lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        try:
            d = zlib.decompressobj(47 if coding != "deflate" else 15)
            return sniff(d.decompress(body, DECODED_MAX))[0]
        except zlib.error:
            return None
    if content_type[:19].lower() == "multipart/form-data":
        for part in (body[:65536], body[-65536:]):
            m = _FORM_MODEL.search(part)
            if m is not None:
                try:
                    return m.group(1).decode("utf-8")
                except UnicodeDecodeError:
                    return None
    return None


def model_is_exact(body: bytes) -> bool:
    """Whether :func:`sniff`'s model for ``body`` is the one a full parse finds.

    Always on a body of at most ``CHEAP_SIDE`` bytes; on a longer one, when ``"model"`` occurs
    at most once and, if once, near enough to an end for its depth to be proved (a key given
    twice, or one in the middle of a long body, is taken on trust by routing).
    """
    if len(body) <= CHEAP_SIDE:
        return True
    # From the end: bytes.rfind steps back through a body at twice the speed of bytes.find or
    # a regex's literal search forward, in a third of the regex's instructions. The second
    # search may end within the last one's first quote ('"model"model"' holds it twice).
    last = body.rfind(b'"model"')
    if last < 0:
        return True
    if body.rfind(b'"model"', 0, last + 6) >= 0:
        return False
    return last <= CHEAP_SIDE or len(body) - last <= CHEAP_SIDE


def sniff_stream(body: bytes, whole: bool = True) -> bool:
    """Whether a JSON object body has a top-level ``"stream": true`` (see ``_find``).

    With ``whole`` false only the first and last ``CHEAP_SIDE`` bytes are searched.
    """
    if not whole and len(body) > 2 * CHEAP_SIDE:
        if body.lstrip()[:1] != b"{":
            return False
        head = body.find(b'"stream"', 0, CHEAP_SIDE)
        tail = body.rfind(b'"stream"', len(body) - CHEAP_SIDE)
        for pos in (p for p in (tail, head) if p >= 0):
            m = _STREAM_VALUE.match(body, pos)
            if m is not None and _at_top_level(body, pos, m.end()):
                return m.group(1) == b"true"
        return False
    # Most bodies have no "stream" key at all: one search says so (find, not in: for bytes,
    # "in" builds and drops a TypeError before it searches).
    if body.find(b'"stream"') < 0 or body.lstrip()[:1] != b"{":
        return False
    s = _find(body, b'"stream"', _STREAM_VALUE)
    return s is not None and s.group(1) == b"true"
