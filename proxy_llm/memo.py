"""A bounded memo: a dict that starts again when full.

The writer's encoder, the server's routes and the dialect registry each remember what a
request's strings (a session id, a key, a model, a path) gave the last time: the same few recur,
and a hit is one ``dict.get``. The strings are the client's, so each memo is bounded in entries
and in the characters of its keys and values: a client inventing them only resets it.

This module imports nothing from the package (the dialects, below ``record``, use it too).
"""

from __future__ import annotations

from typing import Any


class Memo(dict):
    """A dict bounded in entries (``entries``) and in the characters of its keys and values
    (``chars``): full, it starts again (a client inventing keys or session ids only resets
    it). A bound on entries alone let 4,096 entries of any size stay: a client sending a
    different megabyte-long model name (or session id, or key) with each request made the
    memos of its record heads, session files and routes hold 4 MB per request, gigabytes
    before the first reset. A hit is one ``get``, as on a dict; :meth:`remember` is called on a
    miss only."""

    __slots__ = ("chars", "max_entries", "max_chars")

    def __init__(self, entries: int, chars: int) -> None:
        super().__init__()
        self.chars = 0
        self.max_entries = entries
        self.max_chars = chars

    def remember(self, key: Any, value: Any, chars: int) -> Any:
        """Store ``value`` under ``key`` (the two holding about ``chars`` characters) and return
        it; one larger than the whole bound is not stored."""
        if chars > self.max_chars:
            return value
        if len(self) >= self.max_entries or self.chars + chars > self.max_chars:
            self.clear()
            self.chars = 0
        self.chars += chars
        self[key] = value
        return value
