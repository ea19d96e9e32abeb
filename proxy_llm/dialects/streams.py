"""Stream framings other than SSE, decoded into :class:`proxy_llm.sse.Event` objects.

* :class:`JSONArrayDecoder`: a JSON array sent incrementally (Gemini
  ``streamGenerateContent`` without ``alt=sse``): one event per element, as
  soon as the element's last byte arrives. A body that is not an array (an
  error object, or several concatenated values) gives one event per
  top-level value.
* :class:`LineDecoder`: one event per non-empty line (NDJSON).

Both have the :class:`~proxy_llm.sse.SSEDecoder` interface (``feed``,
``close``, ``truncated``), never raise, and hold at most ``max_event_size``
bytes of any one element; a larger element is dropped and ``truncated`` set.
Event ``data`` and ``raw`` are the element's text (UTF-8, errors replaced),
``event`` is None.
"""

from __future__ import annotations

import re

from ..sse import DEFAULT_MAX_EVENT_SIZE, Event

__all__ = ["JSONArrayDecoder", "LineDecoder"]

_WS = b" \t\r\n"
# Where something happens inside a container element, outside strings.
_CONTAINER_SIG = re.compile(rb'[\[\]{}"]')
# Inside a string: its end or an escape.
_STRING_SIG = re.compile(rb'["\\]')
# Next non-blank byte between elements.
_NON_BLANK = re.compile(rb"[^ \t\r\n]")
_NON_BLANK_NON_COMMA = re.compile(rb"[^ \t\r\n,]")
# End of a scalar (number, true, false, null).
_SCALAR_END = re.compile(rb"[ \t\r\n,\]\[{}\"]")

# States.
_TOP = 0  # outside any array, expecting a value or '['
_BETWEEN = 1  # inside the outer array, between elements
_ELEMENT = 2  # inside an element


class _Bounded(object):
    """Accumulates one element's bytes up to the bound."""

    def __init__(self, max_event_size=DEFAULT_MAX_EVENT_SIZE):
        self.max_event_size = max(1, int(max_event_size))
        self.truncated = False
        self._parts = []  # type: list
        self._size = 0
        self._over = False

    def _keep(self, chunk):
        if not chunk or self._over:
            return
        self._size += len(chunk)
        if self._size > self.max_event_size:
            self._over = True
            self.truncated = True
            self._parts = []
            return
        self._parts.append(chunk)

    def _emit(self, out):
        if not self._over and self._parts:
            text = b"".join(self._parts).decode("utf-8", "replace")
            if text.strip():
                out.append(Event(data=text, raw=text))
        self._parts = []
        self._size = 0
        self._over = False


class JSONArrayDecoder(_Bounded):
    """Split a streamed JSON array (or concatenated JSON values) into element events."""

    def __init__(self, max_event_size=DEFAULT_MAX_EVENT_SIZE):
        _Bounded.__init__(self, max_event_size)
        self._state = _TOP
        self._in_array = False
        self._kind = None  # type: str | None  # "container" | "string" | "scalar"
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False
        self._scalar_first = False

    def feed(self, data):
        # type: (bytes) -> list
        out = []  # type: list
        data = bytes(data or b"")
        pos, n = 0, len(data)
        while pos < n:
            if self._state == _ELEMENT:
                pos = self._scan_element(data, pos, out)
                continue
            if self._state == _BETWEEN:
                m = _NON_BLANK_NON_COMMA.search(data, pos)
                if m is None:
                    break
                pos = m.start()
                if data[pos:pos + 1] == b"]":
                    self._state = _TOP
                    self._in_array = False
                    pos += 1
                    continue
                self._start_element(data, pos)
                continue
            # _TOP
            m = _NON_BLANK.search(data, pos)
            if m is None:
                break
            pos = m.start()
            ch = data[pos:pos + 1]
            if ch == b"[" and not self._in_array:
                self._in_array = True
                self._state = _BETWEEN
                pos += 1
                continue
            if ch in (b",", b"]"):
                pos += 1  # stray separators outside an array: skip
                continue
            self._start_element(data, pos)
        return out

    def close(self):
        # type: () -> list
        out = []  # type: list
        if self._state == _ELEMENT:
            # An element the stream cut off: emit what we have (the dialect
            # will find it is not JSON and skip it; the stream file keeps it).
            self._emit(out)
        self._state = _BETWEEN if self._in_array else _TOP
        self._in_string = self._escape = False
        self._depth = 0
        return out

    def _start_element(self, data, pos):
        self._state = _ELEMENT
        self._in_string = False
        self._escape = False
        self._depth = 0
        self._scalar = data[pos:pos + 1] not in (b"{", b"[", b'"')
        self._scalar_first = True

    def _scan_element(self, data, pos, out):
        """Scan from ``pos``; keep the element's bytes; return where scanning stopped."""
        start = pos
        n = len(data)
        if self._scalar:
            # A number, true, false, null (or garbage): ends before a blank,
            # separator or bracket. Its first byte is never the end (progress).
            m = _SCALAR_END.search(data, pos + 1 if self._scalar_first else pos)
            self._scalar_first = False
            if m is None:
                self._keep(data[start:])
                return n
            self._keep(data[start:m.start()])
            self._finish(out)
            return m.start()
        while pos < n:
            if self._escape:
                self._escape = False
                pos += 1
                continue
            if self._in_string:
                m = _STRING_SIG.search(data, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                if data[m.start():pos] == b"\\":
                    self._escape = True
                    continue
                self._in_string = False
            else:
                m = _CONTAINER_SIG.search(data, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                ch = data[m.start():pos]
                if ch == b'"':
                    self._in_string = True
                    continue
                if ch in (b"{", b"["):
                    self._depth += 1
                    continue
                self._depth -= 1
            if self._depth <= 0:
                # A closing bracket, or the end of a top-level string.
                self._keep(data[start:pos])
                self._finish(out)
                return pos
        self._keep(data[start:pos])
        return pos

    def _finish(self, out):
        self._emit(out)
        self._state = _BETWEEN if self._in_array else _TOP
        self._kind = None


class LineDecoder(_Bounded):
    """One event per non-empty line; CRLF, CR or LF end a line."""

    _LINE_END = re.compile(b"\r\n|\r|\n")

    def feed(self, data):
        # type: (bytes) -> list
        out = []  # type: list
        data = bytes(data or b"")
        pos, n = 0, len(data)
        while pos < n:
            m = self._LINE_END.search(data, pos)
            if m is None:
                self._keep(data[pos:])
                break
            self._keep(data[pos:m.start()])
            self._emit(out)
            pos = m.end()
        return out

    def close(self):
        # type: () -> list
        out = []  # type: list
        self._emit(out)
        return out
