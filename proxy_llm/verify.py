"""``proxy_llm verify``: check a data dir and say clearly whether it is sound.

Problems (exit code 1):

* a line that does not parse as a JSON object (file and line number);
* a torn last line (a crash mid-append);
* a record without a schema field, or with a field of the wrong type or value
  (schema_version 1: see the README's field list);
* a credential header (``authorization``, ``x-api-key``, ...) whose value is not
  redacted, or an ``endpoint`` that holds a key (a value shaped like a provider key, or
  a ``key=`` parameter's, not redacted: records written before 2026-12-06 kept a key
  a client put in its base URL; ``wire.endpoint_unredacted``); the value itself is
  never printed;
* two records, or two stream lines, with one id;
* a record in another session's directory (``session_<sid>/`` must match its
  ``session_id``, sanitised as the layout says);
* a ``*.jsonl`` or ``*.jsonl.gz`` in a session directory or ``streams/`` that is not
  named as the recorder names its files (``notes.jsonl``): the readers skip it;
* a file left unclean by a crash: a leftover temp file (``*.tmp``, e.g. from
  compression) or both ``X.jsonl`` and ``X.jsonl.gz``; a gzip file that cannot be
  read to its end.  A running proxy's compression leaves the same two states for a
  moment: while it runs, its compressor holds an advisory lock on ``X.jsonl``
  (``storage.compress_file``), and such files are a note, "in progress", not a
  problem; with no process holding the lock (a dead data dir) they are leftovers.
  A proxy leaves none when it stops (its compressor stops between files, or removes
  its temp file), so a leftover is a kill's or a crash's; the next start with
  ``compress_rotated`` settles it (``storage.settle_file``), but for a ``.gz.tmp``
  without its ``X.jsonl`` and twins whose contents differ;
* a stream line whose id has no record, or whose record is not a stream;
* a streamed record without its stream line.  A record expects a stream line
  exactly when it has ``stream_events`` (older records: when it got a response
  that was ``text/event-stream``, or a Gemini stream request answered with a
  2xx, as Gemini streams a JSON array without ``alt=sse``).  A plain JSON
  answer to a stream request (an error, or a server ignoring ``stream``) and an
  unreachable upstream have no stream line.

Notes (reported, exit code unaffected): unknown files (not the data dir's
``.proxy_llm_key``, nor a ``.gitkeep`` or ``.gitignore`` at its top, which version control
puts there: the repository's own ``data/`` holds a ``.gitkeep``), unknown record fields,
compressions in progress.

Exit codes: 0 clean, 1 problems found, 2 unreadable data dir.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys

from proxy_llm import reader, storage, wire
from proxy_llm.dialects.base import is_count

__all__ = ["add_arguments", "run", "check", "Findings", "check_record", "check_stream_line"]

session_file_id = reader.session_file_id  # re-exported for tests and callers

ENDINGS = reader.ENDINGS
SESSION_SOURCES = ("header", "claude_code", "codex", "metadata_user_id", "model", "default")
PROVIDER_TYPES = ("openai", "anthropic", "gemini", "azure")
TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
              "cache_creation_tokens", "reasoning_tokens")
SECRET_HEADERS = tuple(sorted(wire.SECRET_HEADERS))
# Files of the data dir's top level that are neither records nor a problem: the fingerprint key,
# and what version control keeps there (the repository's data/ holds a .gitkeep).
KNOWN_TOP_FILES = (".proxy_llm_key", ".gitkeep", ".gitignore")
MAX_LISTED = 20

_ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$")
_TEMP_RE = re.compile(r"(\.tmp|\.temp|\.part|\.partial|~)$|\.tmp[-.]")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _str_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def _any(v) -> bool:
    return True


# field -> (check, expectation shown in the message)
REQUIRED = (
    ("schema_version", lambda v: _is_int(v) and v == 1, "1"),
    ("id", lambda v: _is_str(v) and bool(_ULID_RE.match(v)), "a 26-char ULID"),
    ("timestamp", lambda v: _is_str(v) and bool(_TS_RE.match(v)), "an RFC 3339 UTC time"),
    ("session_id", _is_str, "a string"),
    ("session_source", lambda v: v in SESSION_SOURCES, "one of " + "|".join(SESSION_SOURCES)),
    ("provider", _str_or_none, "a string or null"),
    ("provider_type", lambda v: v is None or v in PROVIDER_TYPES, "null or " + "|".join(PROVIDER_TYPES)),
    ("dialect", _is_str, "a string"),
    ("endpoint", lambda v: _is_str(v) and v.startswith("/"), "a path"),
    ("method", _is_str, "a string"),
    ("query", _is_str, "a string"),
    ("model", _str_or_none, "a string or null"),
    ("stream", lambda v: isinstance(v, bool), "true or false"),
    ("request_headers", lambda v: isinstance(v, dict), "an object"),
    ("request_body", _any, "present"),
    ("status_code", lambda v: v is None or (_is_int(v) and 100 <= v <= 599), "an HTTP status or null"),
    ("response_headers", lambda v: isinstance(v, dict), "an object"),
    ("response_body", _any, "present"),
    ("ended", lambda v: v in ENDINGS, "one of " + "|".join(ENDINGS)),
    ("duration", lambda v: _is_num(v) and v >= 0, "a number of ms >= 0"),
    ("request_bytes", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    ("response_bytes", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
)


def _error_ok(v) -> bool:
    return isinstance(v, dict) and _is_str(v.get("type")) and _is_str(v.get("message"))


def _tokens_ok(v) -> bool:
    # (is_count: the rule the dialects read an upstream's counts by, so what the proxy writes)
    return isinstance(v, dict) and all(k in TOKEN_KEYS and is_count(n) for k, n in v.items())


def _is_base64(v) -> bool:
    if not _is_str(v):
        return False
    try:
        base64.b64decode(v, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return False
    return True


def _truncated_ok(v) -> bool:
    if not isinstance(v, dict) or not v or not set(v) <= {"request", "response"}:
        return False
    return all(isinstance(t, dict) and _is_int(t.get("size")) and _is_str(t.get("sha256"))
               and _is_int(t.get("kept")) for t in v.values())


OPTIONAL = (
    ("error", _error_ok, "{type: str, message: str}"),
    ("tokens_used", _tokens_ok, "an object of token counts (ints >= 0)"),
    ("ttft_ms", lambda v: _is_num(v) and v >= 0, "a number of ms >= 0"),
    ("truncated", _truncated_ok, "{request|response: {size, sha256, kept}}"),
    ("stream_events", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("stream_truncated", lambda v: v is True, "true"),
    ("reassembly_error", _is_str, "a string"),
    ("decode_error", _is_str, "a string"),
    ("body_encoding", lambda v: isinstance(v, dict) and bool(v) and set(v) <= {"request", "response"}
     and all(e == "base64" for e in v.values()), '{request|response: "base64"}'),
)
KNOWN_FIELDS = frozenset(name for name, _, _ in REQUIRED + OPTIONAL)


def check_record(rec: dict) -> list:
    """Schema problems of one record, as short messages (empty when it is sound)."""
    problems = []
    for name, ok, expected in REQUIRED:
        if name not in rec:
            problems.append("missing field %s" % name)
        elif not ok(rec[name]):
            problems.append("%s: expected %s" % (name, expected))
    for name, ok, expected in OPTIONAL:
        if name in rec and not ok(rec[name]):
            problems.append("%s: expected %s" % (name, expected))
    encoding = rec.get("body_encoding")
    for part in (encoding if isinstance(encoding, dict) else ()):
        if not _is_base64(rec.get(part + "_body")):
            problems.append("%s_body: expected base64 (body_encoding)" % part)
    endpoint = rec.get("endpoint")
    if _is_str(endpoint) and wire.endpoint_unredacted(endpoint):
        problems.append("endpoint: credential not redacted (as versions before 2026-12-06 left it)")
    query = rec.get("query")
    if _is_str(query) and wire.query_unredacted(query):
        problems.append("query: credential not redacted")
    for field in ("request_headers", "response_headers"):
        headers = rec.get(field)
        for name, value in (headers.items() if isinstance(headers, dict) else ()):
            if not _is_str(value):
                problems.append("%s.%s: expected a string" % (field, name))
            elif name in SECRET_HEADERS and "[REDACTED:" not in value:
                problems.append("%s.%s: credential not redacted" % (field, name))
    return problems


def check_stream_line(line: dict) -> list:
    """Shape problems of one streams/ line."""
    problems = []
    if not _is_str(line.get("id")):
        problems.append("id: expected a string")
    if not _is_str(line.get("session_id")):
        problems.append("session_id: expected a string")
    if not _is_str(line.get("timestamp")):
        problems.append("timestamp: expected a string")
    events = line.get("events")
    if not isinstance(events, list):
        problems.append("events: expected a list")
    elif not all(isinstance(e, dict) and _is_num(e.get("t")) for e in events):
        problems.append("events: expected objects with a numeric t")
    if not isinstance(line.get("truncated"), bool):
        problems.append("truncated: expected true or false")
    return problems


def expects_stream_line(rec: dict) -> bool:
    """Whether the recorder wrote a streams/ line for ``rec`` (see module docstring).

    Records carry ``stream_events`` exactly when their stream line was written; records from
    before that field existed fall back to the recorder's rule.
    """
    if "stream_events" in rec:
        return True
    if rec.get("decode_error"):  # (a stream in a coding not taken off is kept as its bytes: no events)
        return False
    status = rec.get("status_code")
    if not _is_int(status):
        return False
    gemini = rec.get("provider_type") == "gemini" or rec.get("dialect") == "gemini"
    return _is_event_stream(rec) or (rec.get("stream") is True and gemini and 200 <= status < 300)


def _is_event_stream(rec: dict) -> bool:
    headers = rec.get("response_headers")
    ctype = headers.get("content-type", "") if isinstance(headers, dict) else ""
    return isinstance(ctype, str) and ctype.split(";", 1)[0].strip().lower() == "text/event-stream"


class Findings(object):
    """Problems and notes, grouped by kind, each item a line of the report."""

    def __init__(self) -> None:
        self.problems = {}  # kind -> [text]
        self.notes = {}
        self.counts = {"sessions": 0, "record files": 0, "records": 0, "stream files": 0, "stream lines": 0}

    def problem(self, kind: str, text: str) -> None:
        self.problems.setdefault(kind, []).append(text)

    def note(self, kind: str, text: str) -> None:
        self.notes.setdefault(kind, []).append(text)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, data_dir: str) -> str:
        lines = ["verify: %s" % data_dir,
                 "  " + ", ".join("%d %s" % (n, k) for k, n in self.counts.items())]
        for title, groups in (("PROBLEMS", self.problems), ("notes", self.notes)):
            if not groups:
                continue
            total = sum(len(v) for v in groups.values())
            lines.append("%s (%d):" % (title, total))
            for kind in sorted(groups):
                items = groups[kind]
                lines.append("  %s (%d):" % (kind, len(items)))
                for text in items[:MAX_LISTED]:
                    lines.append("    " + text)
                if len(items) > MAX_LISTED:
                    lines.append("    ... and %d more" % (len(items) - MAX_LISTED))
        if self.ok:
            lines.append("verify: OK")
        else:
            lines.append("verify: FAILED: %d problem%s" % (
                sum(len(v) for v in self.problems.values()),
                "" if sum(len(v) for v in self.problems.values()) == 1 else "s"))
        return "\n".join(lines) + "\n"


def _rel(data_dir: str, path: str) -> str:
    return os.path.relpath(path, data_dir)


SKIPPED = "files not named as the recorder names its files (not read by verify, stats or export)"
IN_PROGRESS = "compressions in progress (the running proxy is gzipping these sealed files)"


def _compressing(directory: str, original: str, seen: str) -> bool:
    """Whether ``seen`` (a ``.gz.tmp``, or an ``X.jsonl`` beside its ``.gz``) belongs to a
    compression running now: the compressor holds ``original``'s lock until it has removed it
    (storage.compress_file). Not held, and ``seen`` is still there: a crash's leftover. Gone by
    then: a compression that ended meanwhile, not a leftover either."""
    if storage.compressing(os.path.join(directory, original)):
        return True
    return not os.path.lexists(os.path.join(directory, seen))


def _check_files(data_dir: str, found: Findings) -> None:
    """Leftover temp files, twins and unknown files anywhere in the data dir."""
    for top, dirs, files in os.walk(data_dir):
        dirs.sort()
        depth = 0 if os.path.abspath(top) == os.path.abspath(data_dir) else 1
        where = os.path.relpath(top, data_dir)
        own = None  # in a directory the reader reads: the test of the recorder's file names
        if where == "streams":
            own = storage.is_stream_file_name
        elif where.startswith("session_") and os.sep not in where:
            own = storage.is_record_file_name
        for name in sorted(files):
            rel = _rel(data_dir, os.path.join(top, name))
            if _TEMP_RE.search(name):
                if depth == 1 and name.endswith(".jsonl.gz.tmp") and _compressing(top, name[:-len(".gz.tmp")], name):
                    found.note(IN_PROGRESS, rel)
                else:
                    found.problem("leftover temp files (a crash during compression or a write)", rel)
            elif depth == 0 and name in KNOWN_TOP_FILES:
                continue
            elif own is not None and name.endswith(reader.RECORD_SUFFIXES):
                # (a name the recorder does not give is reported by the reader: _read_problems)
                if own(name) and name.endswith(".jsonl.gz") and name[:-3] in files:
                    if _compressing(top, name[:-3], name[:-3]):
                        found.note(IN_PROGRESS, rel)
                    else:
                        found.problem("both X.jsonl and X.jsonl.gz (a crash between compressing and deleting)", rel)
            else:
                found.note("unknown files", rel)
        if depth == 0:
            for name in dirs:
                if not (name.startswith("session_") or name == "streams"):
                    found.note("unknown directories", name)
        elif os.path.relpath(top, data_dir).count(os.sep):
            found.note("unknown directories", _rel(data_dir, top))


def _check_records(data_dir: str, found: Findings) -> dict:
    """Schema-check every record; returns {id: expects a stream line} for the stream check."""
    stats = reader.ReadStats()
    index = {}
    unknown = set()
    for path, lineno, rec in reader.iter_record_lines(data_dir, stats):
        where = "%s:%d" % (_rel(data_dir, path), lineno)
        for message in check_record(rec):
            found.problem("records that do not match the schema", "%s: %s" % (where, message))
        unknown.update(k for k in rec if k not in KNOWN_FIELDS)
        if _is_str(rec.get("session_id")):
            expected_dir = "session_" + reader.session_file_id(rec["session_id"])
            if os.path.basename(os.path.dirname(path)) != expected_dir:
                found.problem("records in another session's directory",
                              "%s: session %r belongs in %s/" % (where, rec["session_id"], expected_dir))
        rid = rec.get("id")
        if not _is_str(rid):
            continue
        if rid in index:
            found.problem("duplicate record ids", "%s: %s" % (where, rid))
            continue
        index[rid] = (expects_stream_line(rec), rec.get("stream") is True or _is_event_stream(rec),
                      rec.get("session_id"), rec.get("stream_events"))
    _read_problems(data_dir, stats, found, "record")
    found.counts["sessions"] = len(reader.session_dirs(data_dir))
    found.counts["record files"] = stats.files
    found.counts["records"] = stats.records
    for name in sorted(unknown):
        found.note("unknown record fields", reader.shown(name))
    return index


def _read_problems(data_dir: str, stats: reader.ReadStats, found: Findings, what: str) -> None:
    for path, lineno in stats.torn_lines:
        found.problem("torn last lines (a crash mid-append)", "%s:%d" % (_rel(data_dir, path), lineno))
    for path, lineno in stats.bad_lines:
        found.problem("%s lines that do not parse" % what, "%s:%d" % (_rel(data_dir, path), lineno))
    for path, message in stats.problems:
        found.problem("unreadable files", "%s: %s" % (_rel(data_dir, path), message))
    for path in stats.skipped_files:
        found.problem(SKIPPED, _rel(data_dir, path))


def _check_streams(data_dir: str, index: dict, found: Findings) -> None:
    stats = reader.ReadStats()
    seen = set()
    for path, lineno, line in reader.iter_stream_line_entries(data_dir, stats):
        where = "%s:%d" % (_rel(data_dir, path), lineno)
        for message in check_stream_line(line):
            found.problem("stream lines that do not match the schema", "%s: %s" % (where, message))
        sid = line.get("id")
        if not _is_str(sid):
            continue
        if sid in seen:
            found.problem("duplicate stream line ids", "%s: %s" % (where, sid))
            continue
        seen.add(sid)
        entry = index.get(sid)
        if entry is None:
            found.problem("stream lines without a record", "%s: %s" % (where, sid))
        elif not entry[1]:
            found.problem("stream lines whose record is not a stream", "%s: %s" % (where, sid))
        elif entry[2] != line.get("session_id"):
            found.problem("stream lines whose session differs from the record's", "%s: %s" % (where, sid))
        elif _is_int(entry[3]) and isinstance(line.get("events"), list) and len(line["events"]) != entry[3]:
            found.problem("stream lines whose events differ from the record's stream_events",
                          "%s: %s: %d events, stream_events %d" % (where, sid, len(line["events"]), entry[3]))
    _read_problems(data_dir, stats, found, "stream")
    found.counts["stream files"] = stats.files
    found.counts["stream lines"] = stats.records
    for rid, (expected, _, _, _) in index.items():
        if expected and rid not in seen:
            found.problem("streamed records without a stream line", rid)


def check(data_dir: str) -> Findings:
    """Every check of the module docstring (DataDirError if the data dir is unreadable)."""
    found = Findings()
    reader.session_dirs(data_dir)  # raises DataDirError first
    _check_files(data_dir, found)
    index = _check_records(data_dir, found)
    _check_streams(data_dir, index, found)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add verify's options to ``parser`` (``--data-dir`` defaults to None: the config's)."""
    parser.description = ("Check a data dir: every line parses and matches the record schema, no torn lines "
                          "or crash leftovers, stream files match their records. Exit 1 if anything is wrong.")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="data dir to check (default: the configured data_dir)")
    parser.epilog = "Exit status: 0 clean, 1 problems found, 2 unreadable data dir."


def run(args, default_data_dir=None) -> int:
    """Print the report; 0 clean, 1 problems found, 2 unreadable data dir."""
    data_dir = args.data_dir or default_data_dir
    if not data_dir:
        sys.stderr.write("proxy_llm verify: no data dir: pass --data-dir\n")
        return 2
    try:
        found = check(data_dir)
    except reader.DataDirError as exc:
        sys.stderr.write("proxy_llm verify: %s\n" % exc)
        return 2
    sys.stdout.write(found.report(data_dir))
    return 0 if found.ok else 1
