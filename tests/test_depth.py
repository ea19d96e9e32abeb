"""JSON nested past the recursion limit is kept as text, and never takes the interpreter down
(proxy_llm.depth).

Python 3.8 aborts the whole process ("Fatal Python error: Cannot recover from stack overflow")
when Python code runs while a ``json`` parse is at the recursion limit (a garbage collection's
callbacks, a weak reference's) and the parse then goes on: a client's body nested a few thousand
levels deep killed the proxy now and then, from the writer thread. Python 3.12 and newer parse
it, and then a walk of the value fails (a stream's reassembly). Each place that parses text from
outside is run here, in a child interpreter whose every allocation triggers a collection with a
callback, so that the abort, where it can happen, happens every time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import unittest

from proxy_llm import depth
from tests.support import DEADLINE, ROOT

CHILD = textwrap.dedent(r"""
    import gc, json, os, sys, tempfile
    from proxy_llm import dialects, export, reader, record
    from proxy_llm.dialects import base

    deep = "[" * 5000 + "]" * 5000
    sse = "".join("event: %s\ndata: %s\n\n" % (kind, json.dumps(data)) for kind, data in (
        ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                                 "content": [], "model": "claude-x"}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": deep}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_stop", {"type": "message_stop"})))
    tmp = tempfile.mkdtemp()
    os.makedirs(os.path.join(tmp, "session_s"))
    with open(os.path.join(tmp, "session_s", "session_s_20261206_000000.jsonl"), "w") as f:
        f.write('{"id":"a","x":%s}\n{"id":"b"}\n' % deep)

    gc.callbacks.append(lambda phase, info: None)  # Python code at every collection...
    gc.set_threshold(1)  # ...and a collection at every allocation
    out = {}
    out["body"] = record.parse_body(deep.encode()) == (deep, None)
    out["event"] = base.loads(deep) is None
    events, _ = dialects.decode_stream("text/event-stream", [(0.0, sse.encode())])
    result = dialects.DIALECTS["anthropic_messages"].reassemble([e for _, e in events])
    out["tool_input"] = result.response_body["content"][0]["input"] == deep
    stats = reader.ReadStats()
    ids = [r["id"] for r in reader.iter_records(tmp, stats)]  # (no recorder writes the first line)
    out["records"] = ids[-1:] == ["b"] and (ids == ["b"] and len(stats.bad_lines) == 1 or sys.version_info >= (3, 9))
    out["arguments"] = export._call_value({"name": "f", "arguments": deep}) == {"name": "f", "arguments": deep}
    gc.set_threshold(700)
    print(json.dumps(out))
""")


class DeepParseTest(unittest.TestCase):
    def test_text_nested_past_the_recursion_limit_is_kept_as_text_and_the_interpreter_lives(self):
        proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=DEADLINE * 3)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode("utf-8", "replace")[-3000:])
        out = json.loads(proc.stdout.decode().splitlines()[-1])
        self.assertEqual(out, dict.fromkeys(out, True))
        self.assertEqual(set(out), {"body", "event", "tool_input", "records", "arguments"})

    def test_the_guard_measures_nesting_outside_strings(self):
        limit = depth.PARSE_LIMIT
        self.assertFalse(depth.too_deep("[" * limit + "]" * limit))
        self.assertTrue(depth.too_deep("[" * (limit + 1) + "]" * (limit + 1)))
        self.assertTrue(depth.too_deep(b"[" * (limit + 1) + b"]" * (limit + 1)))
        self.assertFalse(depth.too_deep('["%s"]' % ("[" * 5000)))  # brackets in a string are text


if __name__ == "__main__":
    unittest.main()
