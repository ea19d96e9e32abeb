"""Coding agents' sessions through the proxy, driven by the official SDKs as the agents drive
them: a Claude-Code-like Anthropic session, a Codex-like Responses session and a Gemini-CLI-like
session, each of many turns resending the whole growing history.

The proxy runs as a subprocess in front of a fake provider that answers each turn in the
provider's documented wire format (Anthropic's streaming Messages events, the Responses API's
streaming events and ``/v1/responses/compact`` object, Gemini's ``streamGenerateContent``
``alt=sse`` chunks), shaped after the golden fixtures under tests/fixtures/. Then everything a
user reads is checked: one record per exchange with its ending, session and ``tokens_used``; the
reassembled body equal to what the SDK accumulated; each stream's line in ``streams/``; no key in
any file or log line; ``stats --json`` for the session; ``export --dedupe`` giving the session's
whole final conversation as one row.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import tempfile
import threading
import unittest
import uuid
from typing import Any, Dict, List, Tuple

from proxy_llm import cli, export
from tests.sdk_replay import ReplayUpstream
from tests.support import ProxyProcess, Reply, all_files, base_config, json_reply, provider, read_records
from tests.test_export import parse as export_args

from tests.sdks import anthropic, genai, genai_types, openai  # (None when not installed: these tests skip)

SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


def sse_events(events: List[Tuple[str, Dict[str, Any]]]) -> List[bytes]:
    """Named SSE events (``event:`` and ``data:`` lines), one HTTP chunk each."""
    return [("event: %s\ndata: %s\n\n" % (name, json.dumps(data, separators=(",", ":")))).encode("utf-8")
            for name, data in events]


class AgentSessionCase(unittest.TestCase):
    """A fake provider (``handle``) and the proxy subprocess in front of it, per test."""

    maxDiff = None
    PROVIDER = ""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_agents_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.seen: List[Any] = []
        self.upstream = ReplayUpstream()  # (its handler quiet about clients that went away)
        self.upstream.handler = self.record_and_handle
        self.upstream.start()
        self.addCleanup(self.upstream.stop)
        self.proxy = ProxyProcess(base_config([provider(self.PROVIDER, self.PROVIDER, self.upstream.url)], self.data_dir))
        self.addCleanup(self.proxy.cleanup)

    def record_and_handle(self, req):
        self.seen.append(req)
        return self.handle(req)

    def handle(self, req) -> Reply:
        raise NotImplementedError

    def finish(self, secrets: List[str]) -> List[Dict[str, Any]]:
        """Stop the proxy (a clean exit, no error logged) and check no file and no log line holds
        a secret; the records, in order."""
        self.assertEqual(self.proxy.stop(), 0)
        log = self.proxy.log_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn(" ERROR ", log)
        for secret in secrets:
            self.assertNotIn(secret, log)
            for path in all_files(self.tmp):
                with open(path, "rb") as f:
                    self.assertNotIn(secret.encode("ascii"), f.read(), path)
        return read_records(self.data_dir)

    def stream_lines(self) -> Dict[str, Dict[str, Any]]:
        lines = {}
        folder = os.path.join(self.data_dir, "streams")
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                for line in f:
                    obj = json.loads(line)
                    lines[obj["id"]] = obj
        return lines

    def check_streams(self, records: List[Dict[str, Any]]) -> None:
        """Each streamed record has its line in streams/, with as many events as it says."""
        lines = self.stream_lines()
        streamed = [r for r in records if "stream_events" in r]
        self.assertEqual(sorted(lines), sorted(r["id"] for r in streamed))
        for rec in streamed:
            self.assertEqual(len(lines[rec["id"]]["events"]), rec["stream_events"], rec["id"])
            self.assertEqual(lines[rec["id"]]["session_id"], rec["session_id"])

    def session_stats(self, session: str) -> Dict[str, Any]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli.main(["stats", "--data-dir", self.data_dir, "--json"]), 0)
        return json.loads(out.getvalue())["sessions"][session]

    def export_rows(self, fmt: str, *extra: str) -> Tuple[List[Dict[str, Any]], str]:
        out = os.path.join(self.tmp, "export-%s.jsonl" % fmt)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = export.run(export_args(["--data-dir", self.data_dir, "--out", out, "--format", fmt, "--dedupe"]
                                          + list(extra)))
        self.assertEqual(code, 0, err.getvalue())
        with open(out, encoding="utf-8") as f:
            return [json.loads(line) for line in f], err.getvalue()


def summed(records: List[Dict[str, Any]]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for rec in records:
        for kind, n in (rec.get("tokens_used") or {}).items():
            total[kind] = total.get(kind, 0) + n
    return total


@unittest.skipUnless(anthropic is not None, "anthropic is not installed")
class ClaudeCodeSessionTest(AgentSessionCase):
    """Claude Code's way: ``x-claude-code-session-id``, ``anthropic-beta``, extended thinking whose
    signed blocks go back in the history, parallel ``tool_use`` answered by ``tool_result``
    blocks, a moving ``cache_control`` breakpoint, ``count_tokens`` between turns, a turn the
    user cancelled (the SDK's stream closed early) and resent, a 529 ``overloaded_error`` the
    SDK retried."""

    PROVIDER = "anthropic"
    TURNS = 14
    CANCEL_AT, OVERLOAD_AT = 6, 9
    MODEL = "claude-sonnet-4-5-20250929"

    def setUp(self) -> None:
        super().setUp()
        self.cached = 0
        self.overloaded = False
        self.gate = threading.Event()  # the cancelled turn's stream waits here for the client to go
        self.addCleanup(self.gate.set)

    def handle(self, req) -> Reply:
        if req.path.startswith("/v1/messages/count_tokens"):
            return json_reply({"input_tokens": len(req.body) // 4})
        body = req.json()
        if req.header("x-test-overload") and not self.overloaded:
            self.overloaded = True  # Anthropic's errors page: 529, overloaded_error
            return json_reply({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"},
                               "request_id": "req_011CVoverloaded"}, 529,
                              [("request-id", "req_011CVoverloaded"), ("x-should-retry", "true"), ("retry-after-ms", "1")])
        n = len(body["messages"])
        read, created = self.cached, max(0, len(req.body) // 4 - self.cached - 10)
        self.cached = read + created
        usage = {"input_tokens": 10, "cache_creation_input_tokens": created, "cache_read_input_tokens": read}
        blocks = [("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "thinking_delta", "thinking": "Turn %d: which" % n}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "thinking_delta", "thinking": " files \u00e9\U0001F600?"}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "signature_delta", "signature": "Eq%04d" % n * 24 + "=="}}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("content_block_start", {"type": "content_block_start", "index": 1,
                                           "content_block": {"type": "text", "text": ""}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                           "delta": {"type": "text_delta", "text": "Step %d" % n}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                           "delta": {"type": "text_delta", "text": " done."}}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 1})]
        stop = "end_turn"
        if (n // 2) % 2 == 0:  # every other turn: two parallel calls
            stop = "tool_use"
            for index, path in ((2, "a.py"), (3, "b.py")):
                args = json.dumps({"file_path": "/src/" + path, "limit": 200})
                blocks += [("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                               "type": "tool_use", "id": "toolu_%03d%d%s" % (n, index, "A" * 18), "name": "Read", "input": {}}}),
                           ("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "input_json_delta", "partial_json": ""}}),
                           ("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "input_json_delta", "partial_json": args[:7]}}),
                           ("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "input_json_delta", "partial_json": args[7:]}}),
                           ("content_block_stop", {"type": "content_block_stop", "index": index})]
        start = {"type": "message_start", "message": {
            "id": "msg_%04d" % len(self.seen), "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1, service_tier="standard")}}
        end = [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                  "usage": dict(usage, output_tokens=40 + n)}),
               ("message_stop", {"type": "message_stop"})]
        events = sse_events([("message_start", start), ("ping", {"type": "ping"})] + blocks + end)
        if req.header("x-test-cancel"):
            events = events[:4] + [self.gate] + events[4:]
        return Reply(200, SSE + [("request-id", "req_%d" % len(self.seen))], events)

    def test_claude_code_session(self):
        key = "sk-ant-api03-" + uuid.uuid4().hex * 2
        session = str(uuid.uuid4())
        client = anthropic.Anthropic(api_key=key, base_url=self.proxy.url, max_retries=2, timeout=10)
        headers = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14", "x-api-key": key,
                   "x-claude-code-session-id": session, "x-app": "cli"}
        system = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                  {"type": "text", "text": "Instructions. " * 300, "cache_control": {"type": "ephemeral"}}]
        tools = [{"name": "Read", "description": "Reads a file.", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["file_path"]}}]
        history: List[Dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Refactor the project."}]}]
        finals, counted = [], 0
        for turn in range(1, self.TURNS + 1):
            messages = json.loads(json.dumps(history))
            for message in messages:  # one breakpoint, on the last block (it moves every turn)
                for block in message["content"]:
                    block.pop("cache_control", None)
            messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
            call = dict(model=self.MODEL, max_tokens=32000, system=system, tools=tools, messages=messages,
                        thinking={"type": "enabled", "budget_tokens": 16000}, metadata={"user_id": "user_x_session_" + session})
            if turn % 4 == 0:
                client.messages.count_tokens(model=self.MODEL, system=system, tools=tools, messages=messages,
                                             extra_headers=headers)
                counted += 1
            extra = dict(headers)
            if turn == self.CANCEL_AT:
                with client.messages.stream(extra_headers=dict(extra, **{"x-test-cancel": "1"}), **call) as stream:
                    events = iter(stream)
                    self.assertEqual(next(events).type, "message_start")
                self.gate.set()
            if turn == self.OVERLOAD_AT:
                extra["x-test-overload"] = "1"
            with client.messages.stream(extra_headers=extra, **call) as stream:
                message = stream.get_final_message()
                finals.append((stream.response.headers["x-proxy-record-id"], message))
            history.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]})
            calls = [b for b in message.content if b.type == "tool_use"]
            if calls:
                history.append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": b.id, "content": "line of code %d\n" % turn * 40} for b in calls]})
            else:
                history.append({"role": "user", "content": [{"type": "text", "text": "Go on with %d." % turn}]})
        self.assertTrue(any(len([b for b in m.content if b.type == "tool_use"]) == 2 for _, m in finals))
        self.assertGreater(len(self.seen[-1].body), 10000)

        records = self.finish([key])
        # One record per exchange: every turn, the cancelled one, the 529, each count.
        ended = sorted((r["endpoint"], r["status_code"], r["ended"]) for r in records)
        self.assertEqual(ended, sorted([("/v1/messages", 200, "completed")] * self.TURNS
                                       + [("/v1/messages", 200, "client_aborted"), ("/v1/messages", 529, "completed")]
                                       + [("/v1/messages/count_tokens", 200, "completed")] * counted))
        self.assertEqual({(r["session_id"], r["session_source"]) for r in records}, {(session, "claude_code")})
        by_id = {r["id"]: r for r in records}
        for record_id, message in finals:
            rec = by_id[record_id]
            self.assertEqual(anthropic.types.Message.model_validate(rec["response_body"]).model_dump(mode="json"),
                             message.model_dump(mode="json"))
            u = message.usage
            prompt = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
            self.assertEqual(rec["tokens_used"], {
                "prompt_tokens": prompt, "completion_tokens": u.output_tokens, "total_tokens": prompt + u.output_tokens,
                "cached_tokens": u.cache_read_input_tokens, "cache_creation_tokens": u.cache_creation_input_tokens})
            self.assertEqual(rec["request_headers"]["anthropic-beta"], headers["anthropic-beta"])
        aborted = [r for r in records if r["ended"] == "client_aborted"][0]
        self.assertEqual(aborted["error"]["type"], "client_aborted")
        self.assertEqual(aborted["response_body"]["content"][0]["type"], "thinking")
        overloaded = [r for r in records if r["status_code"] == 529][0]
        self.assertEqual(overloaded["error"], {"type": "overloaded_error", "message": "Overloaded"})
        self.assertNotIn("tokens_used", overloaded)
        self.check_streams(records)

        got = self.session_stats(session)
        self.assertEqual(got["requests"], len(records))
        self.assertEqual(got["ended"], {"completed": len(records) - 1, "client_aborted": 1})
        self.assertEqual(got["status"], {"2xx": len(records) - 1, "5xx": 1})
        self.assertEqual(got["tokens"], summed(records))

        # The whole final conversation, as one row: the last request's history and its answer.
        want: List[Dict[str, Any]] = [{"role": "system", "content": "\n".join(b["text"] for b in system)}]
        for message in history[:-1]:
            if message["role"] == "user":
                want += [{"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]}
                         for b in message["content"] if b["type"] == "tool_result"]
                want += [{"role": "user", "content": b["text"]} for b in message["content"] if b["type"] == "text"]
                continue
            turn = {"role": "assistant", "content": "".join(b["text"] for b in message["content"] if b["type"] == "text")}
            calls = [{"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                     for b in message["content"] if b["type"] == "tool_use"]
            if calls:
                turn["tool_calls"] = calls
            want.append(turn)
        rows, summary = self.export_rows("openai-chat")
        self.assertEqual(len(rows), 1, summary)
        self.assertEqual(rows[0]["messages"], want)
        self.assertIn("skipped (error 2, not_chat %d)" % counted, summary)
        self.assertIn("%d superseded by --dedupe" % (self.TURNS - 1), summary)
        rows, summary = self.export_rows("sharegpt", "--include-thinking")
        self.assertEqual(len(rows), 1, summary)
        self.assertEqual(rows[0]["conversations"][-1]["value"],
                         "<think>\n%s\n</think>\n\n%s" % (finals[-1][1].content[0].thinking, finals[-1][1].content[1].text))


@unittest.skipUnless(openai is not None, "openai is not installed")
class CodexSessionTest(AgentSessionCase):
    """Codex's way: a WebSocket attempt first (the proxy answers 426), then the Responses API
    over HTTP with ``stream: true``, ``store: false``, the ``session_id`` header, reasoning items
    sent back with their ``encrypted_content``, function calls and their outputs, and a
    compaction (``/v1/responses/compact``) whose output is the next turns' input."""

    PROVIDER = "openai"
    TURNS, COMPACT_AT = 10, 7
    MODEL = "gpt-5.1-codex"

    def response(self, rid: str, status: str, output: List[Any], usage: Any, body: Dict[str, Any]) -> Dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": 1764000000, "status": status, "background": False,
                "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                "max_output_tokens": None, "model": body["model"], "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
                "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "temperature": 1.0,
                "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
                "tools": body.get("tools", []), "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": {}}

    def handle(self, req) -> Reply:
        if req.header("upgrade"):
            return json_reply({"error": {"message": "the proxy forwarded a WebSocket handshake"}}, 500)
        body = req.json()
        size = len(req.body) // 4
        usage = {"input_tokens": size, "input_tokens_details": {"cached_tokens": size // 128 * 64},
                 "output_tokens": 60, "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": size + 60}
        if req.path == "/v1/responses/compact":  # the user messages, then one compaction item
            users = [item for item in body["input"] if item.get("type") == "message" and item.get("role") == "user"]
            output = [{"id": "msg_u%d" % k, "type": "message", "status": "completed", "role": "user",
                       "content": item["content"]} for k, item in enumerate(users)]
            output.append({"id": "cmp_1", "type": "compaction", "encrypted_content": "gAAAAAcompacted" + "z" * 100})
            return json_reply({"id": "resp_cmp_1", "object": "response.compaction", "created_at": 1764000100,
                               "output": output, "usage": usage})
        n = len(self.seen)
        rid, rs_id, out_id = "resp_%04d" % n, "rs_%04d" % n, "item_%04d" % n
        events, output = [], []

        def add(kind: str, **fields: Any) -> None:
            events.append((kind, dict(type=kind, sequence_number=len(events), **fields)))

        add("response.created", response=self.response(rid, "in_progress", [], None, body))
        add("response.in_progress", response=self.response(rid, "in_progress", [], None, body))
        summary = "**Planning step %d**\n\nReading files." % n
        add("response.output_item.added", output_index=0, item={"id": rs_id, "type": "reasoning", "summary": []})
        add("response.reasoning_summary_part.added", item_id=rs_id, output_index=0, summary_index=0,
            part={"type": "summary_text", "text": ""})
        for piece in (summary[:9], summary[9:]):
            add("response.reasoning_summary_text.delta", item_id=rs_id, output_index=0, summary_index=0, delta=piece,
                obfuscation="ab")
        add("response.reasoning_summary_text.done", item_id=rs_id, output_index=0, summary_index=0, text=summary)
        add("response.reasoning_summary_part.done", item_id=rs_id, output_index=0, summary_index=0,
            part={"type": "summary_text", "text": summary})
        output.append({"id": rs_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": summary}],
                       "encrypted_content": "gAAAAA" + base64.b64encode(b"secret thoughts %d" % n * 8).decode("ascii")})
        add("response.output_item.done", output_index=0, item=output[-1])
        if n % 2 == 0:
            args = json.dumps({"command": ["bash", "-lc", "cat f%d.py" % n], "workdir": "/repo"})
            item = {"id": out_id, "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": "call_%04d" % n, "name": "shell"}
            add("response.output_item.added", output_index=1, item=item)
            for piece in (args[:9], args[9:]):
                add("response.function_call_arguments.delta", item_id=out_id, output_index=1, delta=piece, obfuscation="x")
            add("response.function_call_arguments.done", item_id=out_id, output_index=1, arguments=args)
            output.append(dict(item, status="completed", arguments=args))
        else:
            text = "Done with step %d \u2713." % n
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            add("response.output_item.added", output_index=1,
                item={"id": out_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"})
            add("response.content_part.added", item_id=out_id, output_index=1, content_index=0, part=dict(part, text=""))
            for piece in (text[:5], text[5:]):
                add("response.output_text.delta", item_id=out_id, output_index=1, content_index=0, delta=piece,
                    logprobs=[], obfuscation="q")
            add("response.output_text.done", item_id=out_id, output_index=1, content_index=0, text=text, logprobs=[])
            add("response.content_part.done", item_id=out_id, output_index=1, content_index=0, part=part)
            output.append({"id": out_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"})
        add("response.output_item.done", output_index=1, item=output[-1])
        add("response.completed", response=self.response(rid, "completed", output, usage, body))
        return Reply(200, SSE + [("x-request-id", "req_%d" % n)], sse_events(events))

    def test_codex_session(self):
        key = "sk-proj-" + uuid.uuid4().hex * 2
        session = str(uuid.uuid4())
        headers = {"session_id": session, "originator": "codex_cli_rs", "OpenAI-Beta": "responses=experimental"}
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        conn.request("GET", "/v1/responses", headers=dict(headers, **{
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13", "Authorization": "Bearer " + key}))
        answer = conn.getresponse()
        self.assertEqual((answer.status, json.loads(answer.read())["error"]["code"]), (426, "websocket_unsupported"))
        conn.close()

        client = openai.OpenAI(api_key=key, base_url=self.proxy.url + "/v1", max_retries=0, timeout=10)
        instructions = "You are Codex. " * 200
        tools = [{"type": "function", "name": "shell", "description": "Runs a command.", "strict": False, "parameters": {
            "type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}},
                                             "workdir": {"type": "string"}}, "required": ["command"]}}]
        history: List[Dict[str, Any]] = [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix the failing tests."}]}]
        finals, compacted = [], None
        for turn in range(1, self.TURNS + 1):
            if turn == self.COMPACT_AT:
                raw = client.responses.with_raw_response.compact(model=self.MODEL, input=history,
                                                                 instructions=instructions, extra_headers=headers)
                compacted = (raw.headers["x-proxy-record-id"], raw.parse())
                history = [item.to_dict(warnings=False) for item in compacted[1].output]
                for item in history:
                    item.pop("id")
                    item.pop("status", None)
            raw = client.responses.with_raw_response.create(
                model=self.MODEL, instructions=instructions, input=history, tools=tools, tool_choice="auto",
                parallel_tool_calls=False, reasoning={"effort": "medium", "summary": "auto"}, store=False, stream=True,
                include=["reasoning.encrypted_content"], prompt_cache_key=session, extra_headers=headers)
            final = [event.response for event in raw.parse() if event.type == "response.completed"][0]
            finals.append((raw.headers["x-proxy-record-id"], final))
            for item in final.output:
                item = item.to_dict()
                if item["type"] != "reasoning":  # (store: false: the reasoning item goes back with its id)
                    item.pop("id")
                item.pop("status", None)
                history.append(item)
            calls = [item for item in final.output if item.type == "function_call"]
            history += [{"type": "function_call_output", "call_id": call.call_id, "output": "ok %d\n" % turn * 40}
                        for call in calls]
            if not calls:
                history.append({"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "Next %d" % turn}]})
        sent = [json.loads(req.body) for req in self.seen if req.path == "/v1/responses"]
        self.assertTrue(any(item.get("encrypted_content") for item in sent[-1]["input"] if item["type"] == "reasoning"))

        records = self.finish([key])
        self.assertEqual(sorted((r["method"], r["endpoint"], r["status_code"], r["ended"]) for r in records), sorted(
            [("GET", "/v1/responses", 426, "refused"), ("POST", "/v1/responses/compact", 200, "completed")]
            + [("POST", "/v1/responses", 200, "completed")] * self.TURNS))
        self.assertEqual({(r["session_id"], r["session_source"]) for r in records}, {(session, "codex")})
        by_id = {r["id"]: r for r in records}
        for record_id, final in finals + [compacted]:
            rec = by_id[record_id]
            self.assertEqual(rec["response_body"], final.to_dict(warnings=False))
            u = final.usage
            self.assertEqual(rec["tokens_used"], {
                "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens,
                "cached_tokens": u.input_tokens_details.cached_tokens,
                "reasoning_tokens": u.output_tokens_details.reasoning_tokens})
        self.check_streams(records)
        got = self.session_stats(session)
        self.assertEqual((got["requests"], got["ended"]), (len(records), {"completed": len(records) - 1, "refused": 1}))
        self.assertEqual(got["tokens"], summed(records))

        # Export: the turns after the compaction read an encrypted summary no row can hold
        # (README, the compaction item after the compacted user messages), so the session's
        # row is its longest conversation before it: the compacted history and its last answer.
        rows, summary = self.export_rows("openai-chat")
        self.assertEqual(len(rows), 1, summary)
        after = self.TURNS - self.COMPACT_AT + 1
        self.assertIn("skipped (compaction %d, error 1, no_response 1)" % after, summary)
        messages, last_input = rows[0]["messages"], sent[self.COMPACT_AT - 2]["input"]
        self.assertEqual(messages[0], {"role": "system", "content": instructions})
        self.assertEqual([m["content"] for m in messages if m["role"] == "user"],
                         [item["content"][0]["text"] for item in last_input if item.get("role") == "user"])
        self.assertEqual([m["content"] for m in messages if m["role"] == "tool"],
                         [item["output"] for item in last_input if item["type"] == "function_call_output"])
        last = finals[self.COMPACT_AT - 2][1]
        self.assertEqual(messages[-1].get("content") or messages[-1]["tool_calls"][0]["id"],
                         last.output_text or last.output[1].call_id)


@unittest.skipUnless(genai is not None, "google-genai is not installed")
class GeminiCLISessionTest(AgentSessionCase):
    """Gemini CLI's way: ``streamGenerateContent?alt=sse`` with the whole history, thought parts,
    parallel ``functionCall`` parts (the first with its ``thoughtSignature``, sent back as
    received) answered by ``functionResponse`` parts, ``countTokens`` between turns."""

    PROVIDER = "gemini"
    TURNS = 10
    MODEL = "gemini-2.5-pro"

    def handle(self, req) -> Reply:
        if req.path.endswith(":countTokens"):
            return json_reply({"totalTokens": len(req.body) // 4})
        n = len(req.json()["contents"])
        prompt = len(req.body) // 4

        def chunk(parts: List[Dict[str, Any]], thoughts: int, candidates: Any = None, finish: Any = None) -> bytes:
            usage = {"promptTokenCount": prompt, "cachedContentTokenCount": prompt // 2, "thoughtsTokenCount": thoughts,
                     "totalTokenCount": prompt + thoughts + (candidates or 0)}
            if candidates is not None:
                usage["candidatesTokenCount"] = candidates
            candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if finish:
                candidate["finishReason"] = finish
            data = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": self.MODEL, "responseId": "r%04d" % n}
            return ("data: %s\r\n\r\n" % json.dumps(data)).encode("utf-8")

        def signature(tag: str) -> str:
            return base64.b64encode(("%s%04d" % (tag, n)).encode("ascii")).decode("ascii")

        body = [chunk([{"text": "**Thinking %d**\n\nWhich files" % n, "thought": True}], 40),
                chunk([{"text": " to read.", "thought": True}], 80)]
        if (n // 2) % 2 == 1:
            body += [chunk([{"text": "Reading both.", "thoughtSignature": signature("text")}], 80),
                     chunk([{"functionCall": {"name": "read_file", "args": {"absolute_path": "/repo/a%d.py" % n}},
                             "thoughtSignature": signature("call")},
                            {"functionCall": {"name": "read_file", "args": {"absolute_path": "/repo/b%d.py" % n}}}],
                           80, 30, "STOP")]
        else:
            body += [chunk([{"text": "Step %d done " % n, "thoughtSignature": signature("text")}], 80),
                     chunk([{"text": "\u2014 tests pass."}], 80, 12, "STOP")]
        return Reply(200, SSE, body)

    def test_gemini_cli_session(self):
        key = "AIzaSy" + uuid.uuid4().hex[:33]
        client = genai.Client(api_key=key, http_options=genai_types.HttpOptions(base_url=self.proxy.url))
        declaration = genai_types.FunctionDeclaration(
            name="read_file", description="Reads a file.", parameters_json_schema={
                "type": "object", "properties": {"absolute_path": {"type": "string"}}, "required": ["absolute_path"]})
        system = "You are an interactive CLI agent. " * 100
        config = genai_types.GenerateContentConfig(
            system_instruction=system, tools=[genai_types.Tool(function_declarations=[declaration])],
            thinking_config=genai_types.ThinkingConfig(include_thoughts=True, thinking_budget=-1))
        history = [genai_types.Content(role="user", parts=[genai_types.Part(text="Fix the bug in a.py")])]
        finals, counted = [], 0
        for turn in range(1, self.TURNS + 1):
            if turn % 4 == 0:
                client.models.count_tokens(model=self.MODEL, contents=history)
                counted += 1
            chunks = list(client.models.generate_content_stream(model=self.MODEL, contents=history, config=config))
            finals.append(chunks)
            parts = [p for c in chunks for p in c.candidates[0].content.parts if not p.thought]
            history.append(genai_types.Content(role="model", parts=parts))
            calls = [p.function_call for p in parts if p.function_call]
            if calls:
                history.append(genai_types.Content(role="user", parts=[genai_types.Part(
                    function_response=genai_types.FunctionResponse(name=c.name, response={"output": "line %d\n" % turn * 60}))
                    for c in calls]))
            else:
                history.append(genai_types.Content(role="user", parts=[genai_types.Part(text="Continue %d" % turn)]))
        sent = json.loads(self.seen[-1].body)["contents"]
        self.assertIn("thoughtSignature", json.dumps(sent))
        self.assertGreater(len(self.seen[-1].body), 10000)

        records = self.finish([key])
        path = "/v1beta/models/%s:" % self.MODEL
        self.assertEqual(sorted((r["endpoint"].replace("/v1/", "/v1beta/"), r["ended"]) for r in records), sorted(
            [(path + "streamGenerateContent", "completed")] * self.TURNS + [(path + "countTokens", "completed")] * counted))
        self.assertEqual({(r["session_id"], r["session_source"]) for r in records}, {(self.MODEL, "model")})
        turns = [r for r in records if r["stream"]]
        for rec, chunks in zip(turns, finals):
            self.assertEqual(rec["query"], "alt=sse")
            # The SDK's parts, a text run of one kind (thought or not) joined as the record joins it.
            want: List[Dict[str, Any]] = []
            for part in (p.model_dump(mode="json", exclude_none=True, by_alias=True) for c in chunks
                         for p in c.candidates[0].content.parts):
                if want and "text" in part and "text" in want[-1] and part.get("thought") == want[-1].get("thought") \
                        and "thoughtSignature" not in part:
                    want[-1]["text"] += part["text"]
                else:
                    want.append(part)
            self.assertEqual(rec["response_body"]["candidates"][0]["content"]["parts"], want)
            u = chunks[-1].usage_metadata
            self.assertEqual(rec["tokens_used"], {
                "prompt_tokens": u.prompt_token_count, "completion_tokens": u.candidates_token_count + u.thoughts_token_count,
                "total_tokens": u.total_token_count, "cached_tokens": u.cached_content_token_count,
                "reasoning_tokens": u.thoughts_token_count})
        self.check_streams(records)
        got = self.session_stats(self.MODEL)
        self.assertEqual((got["requests"], got["ended"]), (len(records), {"completed": len(records)}))
        self.assertEqual(got["tokens"], summed(records))

        rows, summary = self.export_rows("openai-chat")
        self.assertEqual(len(rows), 1, summary)
        self.assertIn("skipped (not_chat %d)" % counted, summary)
        want = [{"role": "system", "content": system}]
        for content in history[:-1]:
            if content.role == "user":
                want += [{"role": "tool", "content": json.dumps(p.function_response.response)} if p.function_response
                         else {"role": "user", "content": p.text} for p in content.parts]
                continue
            turn = {"role": "assistant", "content": "".join(p.text for p in content.parts if p.text)}
            calls = [p.function_call for p in content.parts if p.function_call]
            if calls:
                turn["tool_calls"] = [(c.name, json.dumps(c.args)) for c in calls]
            want.append(turn)
        got = [dict(m, tool_calls=[(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]])
               if "tool_calls" in m else m for m in rows[0]["messages"]]
        for m in got:
            m.pop("tool_call_id", None)
        self.assertEqual(got, want)
