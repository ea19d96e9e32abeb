"""How deep JSON text nests, measured without parsing it, and what is too deep to parse.

:func:`nests_within` decides whether a body goes into a record as JSON (:data:`MAX_NESTING`: the
loaders' limits), and :func:`too_deep` whether text from outside (bodies, events, a tool call's
arguments, a record file's lines) is given to the ``json`` parser at all. Text that could nest
past :data:`PARSE_LIMIT` is not: it is what it would be were the parse to fail (a body as its
text, an event as no JSON), on every Python alike. For two reasons:

* Python 3.8 cannot survive a parse that reaches the recursion limit if anything runs Python
  code at that moment (a garbage collection's callbacks, a weak reference's, which a collection
  triggered by the parser's own allocations runs): the RecursionError that code gets is
  swallowed ("Exception ignored"), the parser goes on, and 50 levels further the interpreter
  aborts the whole process ("Fatal Python error: Cannot recover from stack overflow"). A
  client's body nested a few thousand levels deep killed the proxy, now and then, from the
  writer thread.
* Python 3.12 and newer parse deeper than their recursion limit lets Python code walk: a tool
  call's input nested 5,000 levels deep was parsed, then failed its stream's reassembly
  (``reassembly_error``), where 3.11 kept it as text.
"""

from __future__ import annotations

import re

# A body nested deeper than this goes into the record as its text (a JSON string), not as JSON:
# DuckDB refuses a line nested 128 levels deep, pandas one of 1,024, Python's json module one
# at its recursion limit, and a refused line is a lost record for whoever loads the file.
MAX_NESTING = 100
# Far below the recursion limit (1,000) less the callers' own frames: a parse this deep, and a
# walk of what it gives, never comes near it.
PARSE_LIMIT = 400


# Everything in JSON text but brackets and quotes (see nests_within).
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
# The skeleton of a text with escapes keeps, besides, the backslashes and every letter an escape
# may have after one (as x), so that each escape stays a pair in it (see nests_within).
_ESCAPE_LETTERS = bytes.maketrans(b"/bfnrtu", b"xxxxxxx")
_NOT_ESCAPE_SKELETON = bytes(sorted(set(range(256)) - set(b'[]{}"\\/bfnrtu')))
_INNERMOST = re.compile(rb"\[\]|\{\}")  # one scan a pass: one level a pass, never two


def nests_within(data: bytes, limit: int = MAX_NESTING) -> bool:
    """True when the JSON text ``data`` nests arrays and objects at most ``limit`` levels deep.

    A level needs an opening bracket: a body with no more than ``limit`` of them is settled by
    counting, for a long one with searches that stop at the limit. A body with more brackets
    (an agent's request: tools with their schemas, a long history of tool calls) is measured
    on its skeleton: its brackets and quotes, the escaped ones dropped, then the strings
    (brackets in a prompt are text), then the innermost pairs, a level or two a pass.

    Each step is a C scan, and only the first reads the whole text: a translate to the
    skeleton, in which, when the text has escapes, each escape stays a pair (its backslash and
    its letter, ``x`` for any but a quote or a backslash), so that dropping ``\\\\`` then
    ``\\"`` from the skeleton, left to right as a parser reads, drops what it would from the
    text; the other escapes then go with their ``x`` (two passes over the text cost as much as
    the whole measure of its skeleton). Two quotes side by side in the skeleton are dropped by
    a plain replace, which is exact: nothing structural stands between them, so whether they
    are one empty string or the end of one string and the start of the next, dropping them
    changes no bracket's place in or out of a string, nor which quotes pair up after. What is
    left of the strings (the rare ones that hold brackets) goes with a split on the quote, every
    other part kept (a regex's per-match work costs twice that). A pass of two replaces, for
    ``[]`` and for ``{}``, takes off at least one level and at most two: emptied within
    ``limit // 2`` passes, the text nests within ``limit``; otherwise the regex, one level a
    pass, settles it.
    """
    if len(data) <= 2 * limit:
        return True
    if len(data) <= 4096:
        if data.count(b"[") + data.count(b"{") <= limit:
            return True
    else:
        opens = 0
        for bracket in (b"[", b"{"):
            i = data.find(bracket)
            while i >= 0 and opens <= limit:
                opens += 1
                i = data.find(bracket, i + 1)
        if opens <= limit:
            return True
    if data.find(b"\\") >= 0:
        skeleton = data.translate(_ESCAPE_LETTERS, _NOT_ESCAPE_SKELETON)
        if skeleton.find(b"\\\\") >= 0:
            skeleton = skeleton.replace(b"\\\\", b"")
        skeleton = skeleton.replace(b'\\"', b"").translate(None, b"\\x").replace(b'""', b"")
    else:
        skeleton = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if skeleton.find(b'"') >= 0:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    rest = skeleton
    for _ in range(limit // 2):
        rest = rest.replace(b"[]", b"").replace(b"{}", b"")
        if not rest:
            return True
    for _ in range(limit):
        if not skeleton:
            return True
        skeleton = _INNERMOST.sub(b"", skeleton)
    return not skeleton


def too_deep(text) -> bool:
    """Whether JSON ``text`` (str or bytes) may nest past :data:`PARSE_LIMIT`: not to be given
    to the parser (see the module's docstring). Short text, and text with few brackets, is
    settled at once: nearly every event and answer."""
    if len(text) <= 2 * PARSE_LIMIT:
        return False
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= PARSE_LIMIT:
            return False
        text = text.encode("utf-8", "surrogatepass")
    elif text.count(b"[") + text.count(b"{") <= PARSE_LIMIT:
        return False
    return not nests_within(text, PARSE_LIMIT)
