"""Read a proxy_llm data dir back: records and stream lines, one line at a time.

Layout (see the README's "On-disk layout")::

    <data_dir>/session_<sid>/session_<sid>_<YYYYMMDD_HHMMSS>[-N][_w<K>].jsonl[.gz]
    <data_dir>/streams/session_<sid>_<YYYYMMDD>[-N][_w<K>].jsonl[.gz]

Contracts:

* Only files named as the recorder names them are read: the forms above, with
  ``<sid>`` as ``session_file_id`` makes it, ``-N`` with N >= 1 and ``_w<K>``
  (``storage.is_record_file_name``, ``storage.is_stream_file_name``). Any other
  ``*.jsonl`` or ``*.jsonl.gz`` there (``notes.jsonl``, copied in by hand) is not
  records: it is skipped and listed in ``ReadStats.skipped_files``.  (A record
  file of another session's directory is read: ``verify`` reports it by content.)
* Files are read in time order: session directories by name, and inside a
  directory by the time stamp in the file name, then ``-N``, then ``_w<K>``
  (plain string order would put ``..._164815-2`` before ``..._164815``).
* Memory is bounded by the longest line: files are streamed, never loaded.
* A final line without a trailing newline that does not parse is a *torn*
  line (a crash mid-append, or the writer is appending right now): it is
  skipped and counted in ``ReadStats.torn``.  A final line without a newline
  that does parse is a record (the writer may simply not have flushed "\\n").
  Either way it ends the reading of that file: a file being appended to can
  grow while it is read, and what follows would be the rest of that line.
* Any other line that does not parse as a JSON object is a *bad line*: skipped
  and listed in ``ReadStats.bad_lines`` as ``(path, line_number)``.
* A gzip file that cannot be decompressed to its end (truncated, corrupt) is a
  *problem*: the lines read before the damage are yielded, the file is listed in
  ``ReadStats.problems`` as ``(path, message)``; no exception escapes.
* If both ``X.jsonl`` and ``X.jsonl.gz`` exist (a crash between compressing and
  deleting the original), only ``X.jsonl`` is read and the pair is listed in
  ``ReadStats.twins``; ``verify`` reports it.
* A file that vanishes between listing and opening (compressed meanwhile by a
  running proxy) is read under its ``.gz`` name if that exists.

Only a missing or unreadable *data dir* raises: ``DataDirError``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import zlib

from .depth import too_deep
from .storage import is_record_file_name, is_stream_file_name  # the names the recorder gives
from .storage import safe_sid as session_file_id  # the rule the files were named by


#: How an exchange ended: a record's ``ended`` (the README documents each; record.py writes them).
ENDINGS = ("completed", "client_aborted", "refused", "upstream_error", "upstream_eof", "timeout", "shutdown")


def shown(text: str) -> str:
    """A name or field from a record as text to print: control characters (a terminal's escape
    sequences) and lone surrogates escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


# A \u escape of a surrogate code point (D800-DFFF), either hex case.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_HIGH = frozenset(b"89abAB")
_LOW = frozenset(b"cdefCDEF")


def lone_surrogates_replaced(line: bytes) -> bytes:
    r"""The JSON text ``line`` with each escaped lone surrogate (``\ud83d`` with no low half
    after it, a low half with no high one before it) as ``\ufffd``, the replacement character.

    JSON allows them, and Python's ``json`` reads them, but pandas, DuckDB and Arrow refuse the
    whole line (so ``datasets`` refuses the whole file): half an emoji, as a JavaScript client
    that cut a string sends it, would make a record, or an export, load nowhere. A pair is kept,
    and so is ``\\ud83d`` (an escaped backslash, then text). A line without a backslash is
    settled by one memchr.
    """
    # (A search for one byte is memchr-fast; for "\\ud" the bytes module steps through the
    # line, 70 us over 100 KB. A regex with a literal first byte does the rest at half that.)
    first = line.find(b"\\")
    if first < 0:
        return line
    found = [m.start() for m in _SURROGATE_ESCAPE.finditer(line, first)]
    out = []
    pos = 0
    i = 0
    while i < len(found):
        start = found[i]
        run = start
        while run > 0 and line[run - 1] == 0x5C:
            run -= 1
        if (start - run) % 2:  # the backslash is itself escaped: text, not an escape
            i += 1
            continue
        if line[start + 3] in _HIGH and i + 1 < len(found) and found[i + 1] == start + 6 and \
                line[start + 9] in _LOW:
            i += 2  # a pair
            continue
        out.append(line[pos:start])
        out.append(b"\\ufffd")
        pos = start + 6
        i += 1
    if not out:
        return line
    out.append(line[pos:])
    return b"".join(out)


def _refuse_constant(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


# NaN and Infinity are not JSON, and strict readers refuse them: the recorder never lets them
# into a record (record.parse_body), and here a line holding one is a bad line, reported as
# such. One decoder for all (json.loads with arguments builds a new one per call).
STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)
# A record line nests no deeper than the records' rule (depth.MAX_NESTING) and the line's own
# few levels: only a line no recorder wrote can go deeper. Measuring every line first costs an
# agent's record a third of its parse, so it is done only where such a line can abort the
# interpreter, not merely fail its parse (see depth).
_DEPTH_GUARD = sys.version_info < (3, 9)

__all__ = [
    "DataDirError",
    "ReadStats",
    "iter_records",
    "iter_record_lines",
    "iter_stream_lines",
    "iter_stream_line_entries",
    "record_files",
    "stream_files",
    "session_dirs",
    "session_file_id",
]

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz")

# <base stamp>[-N][_w<K>]; the stamp is YYYYMMDD or YYYYMMDD_HHMMSS.
_NAME_RE = re.compile(r"^(?P<base>.*_\d{8}(?:_\d{6})?)(?:-(?P<n>\d+))?(?:_w(?P<w>\d+))?$")


class DataDirError(Exception):
    """The data dir is missing or unreadable; ``str(exc)`` is a one-line message."""


class ReadStats(object):
    """Counters filled while reading.

    files      files opened
    lines      non-empty lines seen (torn and bad lines included)
    records    JSON objects yielded
    torn       torn final lines skipped (``torn_lines`` lists them)
    bad_lines  [(path, line_number)] lines that did not parse (not torn)
    problems   [(path, message)] files that could not be read to their end
    twins      [path] ``X.jsonl.gz`` files skipped because ``X.jsonl`` exists
    skipped_files [path] ``*.jsonl[.gz]`` files not named as the recorder names its files: not read
    bytes_done compressed/on-disk bytes consumed so far (for progress bars)
    """

    def __init__(self) -> None:
        self.files = 0
        self.lines = 0
        self.records = 0
        self.torn = 0
        self.torn_lines = []  # type: list
        self.bad_lines = []  # type: list
        self.problems = []  # type: list
        self.twins = []  # type: list
        self.skipped_files = []  # type: list
        self.bytes_done = 0

    @property
    def ok(self) -> bool:
        """True when nothing was skipped or damaged."""
        return not (self.torn or self.bad_lines or self.problems or self.skipped_files)

    def summary(self) -> str:
        """One human line, e.g. ``"3 files, 120 records, 1 torn line skipped"``."""
        parts = ["%d files" % self.files, "%d records" % self.records]
        if self.torn:
            parts.append("%d torn line%s skipped" % (self.torn, "" if self.torn == 1 else "s"))
        if self.bad_lines:
            parts.append("%d bad line%s skipped" % (len(self.bad_lines), "" if len(self.bad_lines) == 1 else "s"))
        if self.problems:
            parts.append("%d unreadable file%s" % (len(self.problems), "" if len(self.problems) == 1 else "s"))
        if self.skipped_files:
            parts.append("%d file%s not named as the recorder names its files skipped" % (
                len(self.skipped_files), "" if len(self.skipped_files) == 1 else "s"))
        return ", ".join(parts)

    def to_json(self) -> dict:
        """A JSON-ready dict of the counters (paths as strings)."""
        return {
            "files": self.files,
            "lines": self.lines,
            "records": self.records,
            "torn": self.torn,
            "bad_lines": len(self.bad_lines),
            "problems": len(self.problems),
            "skipped_files": len(self.skipped_files),
        }


def _check_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise DataDirError("%s: not a directory" % data_dir)
    try:
        os.listdir(data_dir)
    except OSError as exc:
        raise DataDirError("%s: cannot read: %s" % (data_dir, exc.strerror or exc))


def file_sort_key(name: str) -> tuple:
    """Time-order key for a record or stream file name (see module docstring)."""
    stem = name
    for suffix in (".jsonl.gz", ".jsonl"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _NAME_RE.match(stem)
    if not match:
        return (stem, 0, 0, name)
    return (match.group("base"), int(match.group("n") or 0), int(match.group("w") or 0), name)


def _data_files(directory: str, stats: ReadStats | None, own) -> list:
    """The ``*.jsonl``/``*.jsonl.gz`` files of one directory that the recorder named (``own``,
    a test of the name), time ordered, twins removed.

    A directory that cannot be listed, and a name that is not a regular file (a dangling
    symlink, a FIFO), are problems in ``stats``: they were skipped without a word. A
    ``*.jsonl[.gz]`` the recorder did not name (``notes.jsonl``, copied in by hand) is not read
    and is listed in ``stats.skipped_files``: it was read as records."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        if stats is not None:
            stats.problems.append((directory, "cannot list the directory: %s" % (exc.strerror or exc)))
        return []
    present = set(names)
    chosen = []
    for name in sorted(names):
        if name.endswith(RECORD_SUFFIXES) and not own(name):
            if stats is not None:
                stats.skipped_files.append(os.path.join(directory, name))
        elif name.endswith(".jsonl"):
            chosen.append(name)
        elif name.endswith(".jsonl.gz"):
            if name[: -len(".gz")] in present:
                if stats is not None:
                    stats.twins.append(os.path.join(directory, name))
                continue
            chosen.append(name)
    chosen.sort(key=file_sort_key)
    out = []
    for name in chosen:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            out.append(path)
        elif stats is not None:
            stats.problems.append((path, "not a regular file (a dangling symlink?): not read"))
    return out


def session_dirs(data_dir: str) -> list:
    """The ``session_*`` directories of a data dir, sorted by name.

    Raises DataDirError when ``data_dir`` is not a readable directory.
    """
    _check_dir(data_dir)
    out = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if name.startswith("session_") and os.path.isdir(path):
            out.append(path)
    return out


def record_files(data_dir: str, stats: ReadStats | None = None) -> list:
    """Every record file of a data dir, in reading order (DataDirError if unreadable)."""
    out = []
    for directory in session_dirs(data_dir):
        out.extend(_data_files(directory, stats, is_record_file_name))
    return out


def stream_files(data_dir: str, stats: ReadStats | None = None) -> list:
    """Every file under ``streams/``, in reading order (DataDirError if unreadable). No
    ``streams/`` is no stream files: the recorder makes it with its first stream line."""
    _check_dir(data_dir)
    directory = os.path.join(data_dir, "streams")
    if not os.path.lexists(directory):
        return []
    return _data_files(directory, stats, is_stream_file_name)


def _open(path: str):
    """Open a data file for binary line reading; returns (file, raw file or None)."""
    if path.endswith(".gz"):
        raw = open(path, "rb")
        if not raw.peek(1):  # no gzip member at all (a compression cut short): gzip reads it as empty
            raw.close()
            raise EOFError("an empty file is not gzip")
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return open(path, "rb"), None


def _iter_file(path: str, stats: ReadStats):
    """Yield (line_number, obj) for each JSON object line of one file; see module docstring."""
    try:
        fh, raw = _open(path)
    except FileNotFoundError:
        if not path.endswith(".gz") and os.path.exists(path + ".gz"):
            path = path + ".gz"
            fh, raw = _open(path)
        else:
            return
    except OSError as exc:
        stats.problems.append((path, "cannot open: %s" % (exc.strerror or exc)))
        return
    except EOFError as exc:
        stats.files += 1
        stats.problems.append((path, "unreadable: %s" % exc))
        return
    stats.files += 1
    base_done = stats.bytes_done
    lineno = 0
    try:
        with fh:
            for line in fh:
                lineno += 1
                if raw is not None:
                    stats.bytes_done = base_done + raw.tell()
                else:
                    stats.bytes_done += len(line)
                if not line.strip():
                    continue
                stats.lines += 1
                try:
                    # As json.loads(line), without NaN and Infinity (UnicodeDecodeError is a ValueError).
                    if _DEPTH_GUARD and too_deep(line):  # (Python 3.8: see depth)
                        raise RecursionError
                    obj = STRICT_JSON.decode(line.decode(json.detect_encoding(line), "surrogatepass"))
                except (ValueError, RecursionError):
                    obj = None
                whole = line.endswith(b"\n")
                if not isinstance(obj, dict):
                    if not whole:
                        stats.torn += 1
                        stats.torn_lines.append((path, lineno))
                        break  # the end of the file as it was: see the module docstring
                    stats.bad_lines.append((path, lineno))
                    continue
                stats.records += 1
                yield lineno, obj
                if not whole:
                    break
    except (EOFError, OSError, zlib.error) as exc:
        stats.problems.append((path, "unreadable after line %d: %s" % (lineno, exc)))
    finally:
        if raw is not None:
            raw.close()
            try:
                stats.bytes_done = base_done + os.path.getsize(path)
            except OSError:
                pass


def _iter_paths(paths: list, stats: ReadStats | None):
    if stats is None:
        stats = ReadStats()
    for path in paths:
        for lineno, obj in _iter_file(path, stats):
            yield path, lineno, obj


def iter_record_lines(data_dir: str, stats: ReadStats | None = None):
    """Yield ``(path, line_number, record)`` for every record of a data dir, in time order.

    Raises DataDirError (before yielding) when ``data_dir`` is unreadable.
    """
    return _iter_paths(record_files(data_dir, stats), stats)


def iter_records(data_dir: str, stats: ReadStats | None = None):
    """Yield every record dict of a data dir (see module docstring for skips and counts)."""
    for _path, _lineno, record in iter_record_lines(data_dir, stats):
        yield record


def iter_stream_line_entries(data_dir: str, stats: ReadStats | None = None):
    """Yield ``(path, line_number, stream_line)`` for every line under ``streams/``."""
    return _iter_paths(stream_files(data_dir, stats), stats)


def iter_stream_lines(data_dir: str, stats: ReadStats | None = None):
    """Yield every stream-line dict under ``<data_dir>/streams/`` (same rules as records)."""
    for _path, _lineno, line in iter_stream_line_entries(data_dir, stats):
        yield line
