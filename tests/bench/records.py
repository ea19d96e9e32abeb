"""The record check: every successful response has exactly one record, with the exact content.

Records are found through the ``X-Proxy-Record-Id`` response header and read back
from ``<data_dir>/session_*/*.jsonl[.gz]`` after the proxy was stopped with
SIGTERM (which flushes them).  For the exchanges kept by the verify scenario the
record's ``request_body`` must equal the JSON sent, ``response_body`` the JSON
received (for streams: the text of the reassembled message must equal the
concatenated deltas received), and ``status_code``/``stream`` must match.
"""
from __future__ import annotations

import glob
import gzip
import json
import os


def load_records(data_dir: str) -> dict:
    """id -> list of records (a torn last line is skipped)."""
    out = {}
    paths = glob.glob(os.path.join(data_dir, "session_*", "*.jsonl"))
    paths += glob.glob(os.path.join(data_dir, "session_*", "*.jsonl.gz"))
    for path in sorted(paths):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                out.setdefault(rec.get("id"), []).append(rec)
    return out


def streamed_text(body: bytes) -> str:
    """Concatenate the text deltas of an OpenAI or Anthropic SSE body."""
    parts = []
    for line in bytes(body).split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        try:
            ev = json.loads(data)
        except ValueError:
            continue
        if ev.get("object") == "chat.completion.chunk":
            for ch in ev.get("choices") or ():
                parts.append((ch.get("delta") or {}).get("content") or "")
        elif ev.get("type") == "content_block_delta":
            parts.append((ev.get("delta") or {}).get("text") or "")
    return "".join(parts)


def recorded_text(response_body) -> str:
    """The assistant text of a reassembled OpenAI chat completion or Anthropic message."""
    if not isinstance(response_body, dict):
        return None
    if "choices" in response_body:
        try:
            return response_body["choices"][0]["message"]["content"]
        except (LookupError, TypeError):
            return None
    if "content" in response_body:
        try:
            return "".join(b.get("text", "") for b in response_body["content"])
        except (AttributeError, TypeError):
            return None
    return None


def check(data_dir: str, record_ids, exchanges, unnamed=(0, 0)) -> dict:
    """Returns {"expected", "matched", "missing", "duplicated", "content_checked",
    "content_ok", "problems": [first few descriptions]}.

    ``unnamed`` is (successful answers, all answers) whose record ids the client did not see
    (wrk): the records with ids outside ``record_ids`` must number at least the first and at
    most the second (an error answer has a record too, and so may a request cut when the load
    stopped: wrk counts one per connection there), each id once."""
    records = load_records(data_dir)
    result = {"expected": 0, "matched": 0, "missing": 0, "duplicated": 0,
              "content_checked": 0, "content_ok": 0, "problems": []}
    problems = result["problems"]
    seen = set()
    for rid in record_ids:
        if rid in seen:
            result["duplicated"] += 1  # the proxy handed out one id twice
            if len(problems) < 8:
                problems.append("id %s returned twice" % rid)
            continue
        seen.add(rid)
        result["expected"] += 1
        n = len(records.get(rid, ()))
        if n == 1:
            result["matched"] += 1
        elif n == 0:
            result["missing"] += 1
            if len(problems) < 8:
                problems.append("no record for %s" % rid)
        else:
            result["duplicated"] += 1
            if len(problems) < 8:
                problems.append("%d records for %s" % (n, rid))
    ok, answered = unnamed
    if ok or answered:
        others = [rid for rid in records if rid not in seen]
        n = sum(len(records[rid]) for rid in others)
        twice = sum(1 for rid in others if len(records[rid]) > 1)
        result["expected"] += ok
        result["duplicated"] += twice
        if twice and len(problems) < 8:
            problems.append("%d ids with more than one record" % twice)
        if n < ok:
            result["matched"] += n
            result["missing"] += ok - n
            if len(problems) < 8:
                problems.append("%d records for %d answers the client saw no id for" % (n, ok))
        else:
            result["matched"] += ok
            if n > answered and len(problems) < 8:
                result["duplicated"] += n - answered
                problems.append("%d records for at most %d answers (%d successful) with no id seen" % (n, answered, ok))
    for sent_body, resp in exchanges:
        result["content_checked"] += 1
        recs = records.get(resp.record_id) or []
        why = _compare(sent_body, resp, recs[0]) if len(recs) == 1 else "record count %d" % len(recs)
        if why is None:
            result["content_ok"] += 1
        elif len(problems) < 8:
            problems.append("%s: %s" % (resp.record_id, why))
    return result


def _compare(sent_body: bytes, resp, rec: dict):
    """None if the record holds exactly what was exchanged, else why not."""
    if rec.get("request_body") != json.loads(sent_body):
        return "request_body differs"
    if rec.get("status_code") != resp.status:
        return "status_code %r != %r" % (rec.get("status_code"), resp.status)
    ctype = (resp.headers or {}).get("content-type", "")
    stream = ctype.startswith("text/event-stream")
    if bool(rec.get("stream")) != stream:
        return "stream %r != %r" % (rec.get("stream"), stream)
    if stream:
        got, want = recorded_text(rec.get("response_body")), streamed_text(resp.body)
        if got != want:
            return "reassembled text differs (%r... vs %r...)" % (str(got)[:40], want[:40])
    elif rec.get("response_body") != json.loads(bytes(resp.body)):
        return "response_body differs"
    return None
