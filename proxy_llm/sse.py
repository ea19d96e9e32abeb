"""The one Server-Sent Events decoder, shared by every dialect.

Implements the parsing rules of the WHATWG HTML "Server-sent events" section
(9.2.6 "Interpreting an event stream") on bytes as they are relayed:

* line ends are CRLF, CR or LF; a CR at the end of one read followed by LF at
  the start of the next is one line end;
* bytes are split into lines *before* decoding, and each whole line is decoded
  as UTF-8 (``errors="replace"``), so a read that ends inside a multi-byte
  character never corrupts it;
* ``data:`` lines are joined with ``"\\n"``; ``event:``, ``id:`` and ``retry:``
  are kept; lines starting with ``:`` are comments, kept on the event;
* a blank line ends an event; :meth:`SSEDecoder.close` flushes a last event
  that had no trailing blank line (the specification would drop it; a
  recorder must not);
* one UTF-8 byte order mark is dropped at the very start of the stream, and
  there only (the specification decodes the stream with "UTF-8 decode", which
  takes off one leading BOM): after a blank line, or a second one, it is text,
  and a line it starts is a field of an unknown name, ignored.

Differences from the specification, on purpose: a block made only of comments
(``: keep-alive``) or with an empty data buffer is still returned as an
:class:`Event` because the recorder keeps the raw stream; dialects skip events
whose ``data`` is empty. ``Event.id`` is the ``id:`` of that block only, not
the stream's "last event id".

:func:`decode_chunks` decodes a whole captured stream (the recorder's case) as feeding it
read by read would, events and their read times alike, most streams at once.

Memory is bounded: an event (its raw bytes, including a line still waiting
for its line end) larger than ``max_event_size`` is dropped whole, the rest of
its bytes are skipped without being stored until the next blank line, and
:attr:`SSEDecoder.truncated` becomes true. The decoder never raises on any
input.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from itertools import accumulate, repeat
from operator import add

__all__ = ["Event", "SSEDecoder", "decode_chunks", "feed_chunks", "DEFAULT_MAX_EVENT_SIZE"]

DEFAULT_MAX_EVENT_SIZE = 8 * 1024 * 1024

# One line end: CRLF, CR or LF. A bare CR at the very end of a read may be the
# first half of a CRLF; the decoder remembers it (see SSEDecoder._pending_cr).
_LINE_END = re.compile(b"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class Event(object):
    """One decoded event block.

    ``event``/``id`` are None when the block had no such field, ``retry`` is
    None unless a valid all-digit ``retry:`` was sent, ``data`` is the data
    lines joined with ``"\\n"`` ("" when none), ``comments`` the comment
    lines without their leading colon, ``raw`` the block's lines exactly as
    received (with their line ends, without the blank line that ended it).
    """

    __slots__ = ("event", "data", "id", "retry", "comments", "raw", "unterminated")

    def __init__(self, data="", event=None, id=None, retry=None, comments=None, raw=""):
        # type: (str, str | None, str | None, int | None, list | None, str) -> None
        # unterminated: the stream ended inside this event (no closing blank line). The
        # standard (WHATWG HTML 9.2.6) says such an event is never dispatched, and the SDKs
        # drop it, so reassembly skips it; the streams file keeps it, marked.
        self.unterminated = False
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comments = comments if comments is not None else []
        self.raw = raw

    def to_json(self, t=None):
        # type: (float | None) -> dict
        """The event as a JSON object for the streams file.

        ``t`` (its arrival, ms), when given, comes first. ``event`` and ``data``
        are always present; ``id``, ``retry`` and ``comments`` only when the
        block had them. ``raw`` is left out: the fields rebuild it up to
        line-end style.
        """
        if t is None:
            out = {"event": self.event, "data": self.data}
        else:
            out = {"t": t, "event": self.event, "data": self.data}
        if self.id is not None:
            out["id"] = self.id
        if self.retry is not None:
            out["retry"] = self.retry
        if self.comments:
            out["comments"] = list(self.comments)
        if self.unterminated:
            out["unterminated"] = True
        return out

    def __repr__(self):
        return "Event(event=%r, data=%r, id=%r)" % (self.event, self.data[:60], self.id)

    def __eq__(self, other):
        if not isinstance(other, Event):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]


class SSEDecoder(object):
    """Incremental SSE decoder: :meth:`feed` bytes in any pieces, then :meth:`close`.

    ``feed(data)`` returns the events completed by ``data`` (possibly none);
    ``close()`` returns the last, unterminated event if any and resets nothing
    else: feeding after close is allowed and starts a new event.
    ``truncated`` is true once any event exceeded ``max_event_size`` bytes.
    """

    def __init__(self, max_event_size=DEFAULT_MAX_EVENT_SIZE):
        # type: (int) -> None
        self.max_event_size = max(1, int(max_event_size))
        self.truncated = False
        self._line_parts = []  # type: list  # bytes of the current, unfinished line
        self._event_size = 0  # raw bytes held for the current event (incl. the unfinished line)
        self._skipping = False  # the current event went over the bound; drop until blank line
        self._pending_cr = False  # the last read ended with CR: a leading LF is its pair
        self._started = False  # past the stream's first bytes (for the BOM rule)
        self._head = b""  # the stream's first bytes, while they may still be a BOM
        self._skip_line_nonempty = False  # while skipping: the current line had bytes
        self._reset_block()

    def _reset_block(self):
        self._raw = []  # type: list  # raw line bytes incl. line ends
        self._data = []  # type: list
        self._event = None  # type: str | None
        self._id = None  # type: str | None
        self._retry = None  # type: int | None
        self._comments = []  # type: list
        self._has_lines = False
        self._event_size = 0

    def feed(self, data):
        # type: (bytes) -> list
        """Decode ``data`` and return the list of events it completed."""
        out = []  # type: list
        if not data:
            return out
        data = bytes(data)
        if not self._started:
            data = self._start(data)
            if not data:
                return out
        pos = 0
        n = len(data)
        if (not self._line_parts and not self._has_lines and not self._skipping and not self._pending_cr
                and n <= self.max_event_size and data.find(b"\r") < 0):
            # The common read: whole events with LF line ends, nothing held from the last one.
            # Split on the blank lines at once instead of line by line; the fields go through
            # the same _field(), and no event can pass the bound (the read itself does not).
            end = data.rfind(b"\n\n")
            if end >= 0:
                data_end = data[:end]
                self._whole_events(data_end, data_end.split(b"\n\n"), out)
                pos = end + 2
        if self._pending_cr:
            self._pending_cr = False
            if data[0:1] == b"\n":
                # Second half of a CRLF split across reads. It belongs to the
                # raw text of the line it ended, if that line is still held.
                if self._has_lines and not self._skipping:
                    self._event_size += 1  # counted as it is when the CRLF comes whole
                    if self._event_size > self.max_event_size:
                        self._overflow()
                        self._skip_line_nonempty = False
                    else:
                        self._raw.append(b"\n")
                pos = 1
        search = _LINE_END.search
        while pos < n:
            m = search(data, pos)
            if m is None:
                self._add_partial(data[pos:])
                break
            end, nxt = m.start(), m.end()
            if nxt == n and data[end:nxt] == b"\r":
                self._pending_cr = True
            self._add_partial(data[pos:end])
            self._end_line(data[end:nxt], out)
            pos = nxt
        return out

    def close(self):
        # type: () -> list
        """Flush: return the last event if the stream ended without a blank line.

        Such an event is marked ``unterminated`` (the clients never saw it dispatched).
        """
        out = []  # type: list
        if not self._started and self._head:  # one or two bytes of a BOM, and nothing after
            self._started = True
            out = self.feed(self._head)
            self._head = b""
        self._pending_cr = False
        if self._line_parts and not self._skipping:
            self._end_line(b"", out)
        if self._skipping:
            self._skipping = False
            self._skip_line_nonempty = False
            self._line_parts = []
            self._reset_block()
        elif self._has_lines:
            self._dispatch(out)
            for event in out:
                event.unterminated = True
        return out

    # -- internals -----------------------------------------------------

    def _start(self, data):
        """``data`` without the BOM the stream may begin with; b"" while the first bytes, held
        in ``_head``, may still be one (a read of one or two bytes of it). Taken off the bytes
        before any line is split, not off the first line that has a field: a BOM after blank
        lines is not at the start of the stream, and stays."""
        head = self._head + data if self._head else data
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head
            return b""
        self._started = True
        self._head = b""
        return head[3:] if head[:3] == _BOM else head

    def _whole_events(self, data, blocks, out):
        # ``data``: complete events, LF only, no line end after the last line of the last one;
        # ``blocks``: ``data`` split on its blank lines (b"\n\n"). Extra blank lines show up as
        # LFs at the ends of a block: with no line held they are no-ops, as in _end_line.
        if self._uniform_events(data, len(blocks), out):
            return
        # The usual blocks, one "data: " line (OpenAI, Gemini) or "event: " then "data: "
        # (Anthropic), are made into their Event at once: what _field and _dispatch make of
        # them, a third of the work.
        field = self._field
        for block in blocks:
            block = block.strip(b"\n")
            if not block:
                continue
            if block[:6] == b"data: " and block.find(b"\n") < 0:
                text = block.decode("utf-8", "replace")
                out.append(Event(text[6:], None, None, None, [], text + "\n"))
                continue
            if block[:7] == b"event: ":
                head, _, rest = block.partition(b"\n")
                if rest[:6] == b"data: " and rest.find(b"\n") < 0:
                    out.append(Event(rest.decode("utf-8", "replace")[6:], head.decode("utf-8", "replace")[7:],
                                     None, None, [], block.decode("utf-8", "replace") + "\n"))
                    continue
            for line in block.split(b"\n"):
                field(line)
            self._raw = [block, b"\n"]
            self._dispatch(out)

    @staticmethod
    def _uniform_events(data, count, out):
        """Add the events of ``data`` (``count`` blocks, as for _whole_events) to ``out`` and
        return True when every block is one ``data: `` line, or every one an ``event: `` line
        then a ``data: `` line: a provider's stream, nearly always. False (and nothing added)
        for any other.

        Those are settled for the whole stream at once, with a few C calls, instead of block by
        block. ``data`` is decoded whole: a LF is never part of a UTF-8 sequence, so the text's
        lines are those of the bytes, each decoded as it is on its own (a sequence a LF cuts
        gets the one U+FFFD it gets at the end of a line).
        """
        lines = data.decode("utf-8", "replace").split("\n")
        per = (len(lines) + 1) // count  # lines of a block, and its blank line
        # The only empty lines the blank lines between blocks, each after ``per - 1`` lines.
        if (per * count != len(lines) + 1 or not 2 <= per <= 3 or lines.count("") != count - 1
                or lines[per - 1::per].count("") != count - 1):
            return False
        datas = lines[per - 2::per]
        if not all(map(str.startswith, datas, repeat("data: "))):
            return False
        if per == 2:
            out += [Event(line[6:], None, None, None, [], line + "\n") for line in datas]
            return True
        names = lines[::3]
        if not all(map(str.startswith, names, repeat("event: "))):
            return False
        out += [Event(line[6:], name[7:], None, None, [], name + "\n" + line + "\n")
                for name, line in zip(names, datas)]
        return True

    def _add_partial(self, chunk):
        if not chunk:
            return
        if self._skipping:
            self._skip_line_nonempty = True
            return
        self._event_size += len(chunk)
        if self._event_size > self.max_event_size:
            self._overflow()
            self._skip_line_nonempty = True
            return
        self._line_parts.append(chunk)

    def _overflow(self):
        self.truncated = True
        self._skipping = True
        self._line_parts = []
        self._raw = []
        self._data = []
        self._comments = []

    def _end_line(self, line_end, out):
        if self._skipping:
            # While skipping nothing is stored, only whether the line that
            # ends here had any byte: a line with none is the blank line that
            # ends the oversized event.
            if not self._skip_line_nonempty:
                self._skipping = False
                self._reset_block()
            self._skip_line_nonempty = False
            return
        if self._line_parts:
            line = b"".join(self._line_parts)
            self._line_parts = []
        else:
            line = b""
        if not line:
            if self._has_lines:
                self._dispatch(out)
            return
        self._event_size += len(line_end)
        if self._event_size > self.max_event_size:
            self._overflow()
            self._skip_line_nonempty = False
            return
        self._raw.append(line)
        self._raw.append(line_end)
        self._has_lines = True
        self._field(line)

    def _field(self, line):
        text = line.decode("utf-8", "replace")
        if text.startswith(":"):
            self._comments.append(text[1:])
            return
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        # Other field names are ignored, as the specification says.

    def _dispatch(self, out):
        raw = b"".join(self._raw).decode("utf-8", "replace")
        out.append(Event(
            data="\n".join(self._data),
            event=self._event,
            id=self._id,
            retry=self._retry,
            comments=self._comments,
            raw=raw,
        ))
        self._reset_block()


def decode_chunks(chunks, max_event_size=DEFAULT_MAX_EVENT_SIZE):
    # type: (list, int) -> tuple
    """A whole captured stream: ``chunks`` are ``(t, bytes)`` in arrival order. Returns
    ``([(t, Event), ...], truncated)``: what feeding the chunks one by one to an
    :class:`SSEDecoder`, then closing it, gives, each event stamped with the ``t`` of the chunk
    whose feed returned it (the ones close returns, with the last chunk's).

    The writer decodes every stream it records, and a stream mostly comes one event a read:
    fed read by read, every event costs a feed. A body of LF-terminated events with one blank
    line between them (what the providers send) is split at once instead, each event taking
    the time of the chunk that holds the LF of its blank line, where a feed would have
    completed it. Any other body (CR line ends, a leading BOM, more than one blank line in a
    row, an event that may pass the bound) is fed chunk by chunk.
    """
    decoder = SSEDecoder(max_event_size)
    datas = [data for _, data in chunks]
    body = b"".join(datas)
    end = body.rfind(b"\n\n")
    if end > 0 and body[:1] != b"\xef" and body[end - 1:end] != b"\n" and body.find(b"\r") < 0:
        # A block between blank lines with a line (an event of ignored fields too) is one event,
        # no bigger than the block and one LF; each block is one unless extra blank lines made
        # one of only LFs. (No LF ends a block: split finds the first LFs of a run, and the
        # last blank line is the first of its run.)
        whole = body[:end]
        blocks = whole.split(b"\n\n")
        if max(map(len, blocks)) < decoder.max_event_size:
            events = []  # type: list
            decoder._started = True
            decoder._whole_events(whole, blocks, events)
            if len(events) == len(blocks):
                # The blank line's LF of block i is at sum(len(block j) + 2, j <= i) - 1: its
                # chunk is the first whose running end passes it.
                past = accumulate(map(add, map(len, blocks), repeat(2)))
                ends = list(accumulate(map(len, datas)))
                timed = list(zip(map([t for t, _ in chunks].__getitem__, map(bisect_left, repeat(ends), past)),
                                 events))
                rest = body[end + 2:]
                if rest:  # no blank line in it: its feed completes none, the close one at most
                    last = chunks[-1][0]
                    timed += [(last, ev) for ev in decoder.feed(rest) + decoder.close()]
                return timed, decoder.truncated
            decoder = SSEDecoder(max_event_size)
    return feed_chunks(decoder, chunks)


def feed_chunks(decoder, chunks):
    # type: (object, list) -> tuple
    """``([(t, Event), ...], truncated)`` of ``chunks`` (``(t, bytes)``) fed one by one to
    ``decoder`` (an :class:`SSEDecoder`, or one with its interface), then closed: each event
    stamped with the ``t`` of the chunk that completed it, those of the close with the last."""
    out = []  # type: list
    t = 0.0
    for t, data in chunks:
        for ev in decoder.feed(data):
            out.append((t, ev))
    for ev in decoder.close():
        out.append((t, ev))
    return out, decoder.truncated
