"""The encoder (writer-thread side of a record): bodies, endings, failures, redaction."""

from __future__ import annotations

import base64
import gzip
import gc
import hashlib
import json
import random
import re
import unittest
import zlib
from unittest import mock

from proxy_llm import dialects, notices, reader, record, storage, verify, wire
from proxy_llm.config import Provider
from proxy_llm.record import FIELDS, Capture, Encoder, Exchange, session_file_id
from proxy_llm.sniff import sniff
from proxy_llm.storage import RateLimitedLog

KEY = b"fingerprint-key-0123456789abcdef"
OPENAI = Provider("openai", "openai", "http://upstream")


def exchange(body=b'{"model":"gpt-4o"}', resp=b'{"id":"x","choices":[]}', ctype="application/json", status=200,
             path="/v1/chat/completions", headers=(), resp_headers=(), stream=False, limit=1 << 20):
    ex = Exchange("POST", path, "", list(headers), limit)
    ex.provider, ex.provider_type, ex.stream, ex.status = OPENAI, "openai", stream, status
    ex.model = sniff(body)[0]  # as routing sets it (ProxyHandler.route)
    ex.request.add(0.0, body)
    ex.resp_headers = [("Content-Type", ctype)] + list(resp_headers)
    for i, part in enumerate(resp if isinstance(resp, list) else [resp]):
        ex.response.add(float(i), part)
    return ex


def encode(ex, **kw):
    # (bytes(): a record with a big body comes as its parts, storage.Pieces)
    lines = [(kind, sid, bytes(line)) for kind, sid, line in Encoder(KEY, "X-Session-Id", 1 << 20, **kw).encode(ex)]
    return [json.loads(line) for _, _, line in lines], lines


def _chars(obj) -> int:
    """The characters (or bytes) of every string in ``obj``: a memo, its keys and values."""
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_chars(k) + _chars(v) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return sum(_chars(x) for x in obj)
    return 0


class EncoderTest(unittest.TestCase):
    def test_fields_are_all_documented(self):
        [rec], _ = encode(exchange())
        self.assertLessEqual(set(rec), set(FIELDS))

    def test_the_outcome_fields_are_what_the_json_module_writes(self):
        # status_code ... body_encoding are put together by forms (record._OUTCOME,
        # _tokens_field), not by the json module: each line must hold them as it would.
        usage = b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}'
        stream = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}],' + usage + b'}\n\n',
                  b"data: [DONE]\n\n"]
        cases = {
            "plain": exchange(resp=b'{"id":"x","choices":[],' + usage + b'}'),
            "no status": exchange(status=None),
            "an error": exchange(status=429, resp=b'{"error":{"message":"slow \\u00e9 down","type":"rate"}}'),
            "a stream": exchange(resp=stream, ctype="text/event-stream", stream=True),
            "cut, not UTF-8": exchange(body=b"\xff\xfe" + b"x" * 64, limit=16),
        }
        cases["a stream"].ttft = 12.3456789
        cases["no status"].ended = "client_aborted"
        for ex in cases.values():
            ex.duration = 1234.5675
        seen = set()
        start, end = FIELDS.index("status_code"), FIELDS.index("body_encoding") + 1
        for name, ex in cases.items():
            with self.subTest(name):
                [rec, *_], [(_, _, line), *_] = encode(ex)
                outcome = {k: rec[k] for k in FIELDS[start:end] if k in rec}
                seen.update(outcome)
                self.assertIn(json.dumps(outcome, ensure_ascii=False, separators=(",", ":")).encode()[1:-1], line)
                self.assertEqual(rec["duration"], round(1234.5675, 3))
        self.assertLessEqual(set(FIELDS[start:end]) - {"stream_truncated", "reassembly_error", "decode_error"}, seen)
        self.assertEqual(encode(cases["plain"])[0][0]["tokens_used"],
                         {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        self.assertIn("ttft_ms", encode(cases["a stream"])[0][0])
        # A tokens_used not make_usage's (a bool, a float) is encoded, never put in by %d.
        self.assertEqual(record._tokens_field({"prompt_tokens": True, "total_tokens": 1.5}),
                         b',"tokens_used":{"prompt_tokens":true,"total_tokens":1.5}')
        self.assertEqual(record._tokens_field({"prompt_tokens": 2, "total_tokens": 5}),
                         b',"tokens_used":{"prompt_tokens":2,"total_tokens":5}')
        # The durations by record._rounded: round(x, 3) as the json module writes it.
        rng = random.Random(3)
        values = [0.0, -0.0, 0.0005, 0.00049999, 1e-7, 5e-324, 0.001, 0.9995, 1.0, 2.675, 12.3456, 12.3455,
                  1234.5675, 99999.9999, 999999999.9995, 999999999.9994999, -1.2345, 1e9, 1e12, 1e16, 1e300,
                  5, 0, True, 10 ** 20]
        values += [rng.uniform(0, 10) ** rng.uniform(-9, 9.5) for _ in range(2000)]
        values += [rng.randrange(10 ** 9) / 1000 + 0.0005 for _ in range(2000)]
        for value in values:
            self.assertEqual(record._rounded(value), json.dumps(round(value, 3)).encode(), value)

    def test_dialect_failure_keeps_the_raw_body_and_says_why(self):
        events = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
        ex = exchange(resp=events, ctype="text/event-stream", stream=True)
        broken = mock.Mock(name="dialect")
        broken.name = "openai_chat"
        broken.reassemble.side_effect = KeyError("boom")
        with mock.patch.object(dialects, "select", return_value=broken), self.assertLogs("proxy_llm.record", "ERROR"):
            (rec, line), _ = encode(ex)
        self.assertIn("KeyError", rec["reassembly_error"])
        self.assertEqual(rec["response_body"], b"".join(events).decode())
        self.assertNotIn("error", rec)
        self.assertEqual(len(line["events"]), 2)

    def test_dialect_reported_failure_is_not_an_upstream_error(self):
        failed = dialects.Result(None, None, {"type": dialects.REASSEMBLY_ERROR, "message": "ValueError: x"}, False)
        with mock.patch.object(dialects.DIALECTS["openai_chat"], "from_body", return_value=failed):
            [rec], _ = encode(exchange())
        self.assertEqual(rec["reassembly_error"], "ValueError: x")
        self.assertEqual(rec["response_body"], {"id": "x", "choices": []})
        self.assertNotIn("error", rec)

    def test_a_stream_of_an_api_without_a_dialect_has_no_terminal_event_to_miss(self):
        resp = b"data: {\"a\":1}\n\ndata: [DONE]\n\n"
        [rec, _], _ = encode(exchange(path="/v1/files/abc", resp=resp, ctype="text/event-stream", stream=True))
        self.assertEqual((rec["dialect"], rec["ended"]), ("generic", "completed"))
        self.assertNotIn("error", rec)

    def test_stream_without_terminal_event_is_upstream_eof(self):
        ex = exchange(resp=[b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"par"}}]}\n\n'],
                      ctype="text/event-stream", stream=True)
        (rec, _), _ = encode(ex)
        self.assertEqual(rec["ended"], "upstream_eof")
        self.assertEqual(rec["error"]["type"], "upstream_eof")
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "par")
        self.assertEqual(rec["stream_events"], 1)

    def test_a_stream_in_a_coding_the_proxy_cannot_take_off_is_kept_as_it_came(self):
        # Content-Encoding: br on an SSE answer: read as events, its bytes made junk events, an
        # upstream_eof with an error, and no body at all (an audit's finding).
        br = [bytes([0x1b, 0x8f, 0x00, 0xf8, 0xa5, 0x94, 0xc4]), bytes(range(200, 256))]
        for ctype in ("text/event-stream", "application/json"):  # (the second: Gemini's JSON array)
            with self.subTest(ctype=ctype):
                ex = exchange(resp=br, ctype=ctype, stream=True, resp_headers=[("Content-Encoding", "br")])
                recs, _ = encode(ex)
                self.assertEqual(len(recs), 1)  # (no line in streams/: no event was told)
                [rec] = recs
                self.assertEqual((rec["ended"], rec["decode_error"]), ("completed", "content-encoding br not decoded"))
                self.assertNotIn("error", rec)
                self.assertEqual(rec["body_encoding"], {"response": "base64"})
                self.assertEqual(base64.b64decode(rec["response_body"]), b"".join(br))
                self.assertNotIn("stream_events", rec)
                self.assertFalse(verify.expects_stream_line(rec))  # (verify asks for no line in streams/)

    def test_a_request_body_the_proxy_cannot_decode_says_so(self):
        # A br body, and a broken gzip one: kept as they came, in base64, and told in decode_error
        # (it said nothing: an audit's finding), the answer's own error after the request's.
        broken = gzip.compress(b'{"model":"gpt-4o"}')[:10] + b"\xff" * 12  # (a gzip head, then no deflate)
        for coding, body, resp_coding, want in (
                ("br", b"\x1b\x8f\x00\xf8\xa5\x94", None, "request: content-encoding br not decoded"),
                ("gzip", broken, None, "request: body could not be decoded (gzip)"),
                ("br", b"\x1b\x8f\x00\xf8", "zstd",
                 "request: content-encoding br not decoded; response: content-encoding zstd not decoded")):
            with self.subTest(coding=coding, resp_coding=resp_coding):
                resp_headers = [("Content-Encoding", resp_coding)] if resp_coding else []
                ex = exchange(body=body, headers=[("Content-Encoding", coding)], resp_headers=resp_headers,
                              resp=b"\x28\xb5\x2f\xfd" if resp_coding else b'{"id":"x","choices":[]}')
                ex.assign_id()
                [rec], _ = encode(ex)
                self.assertEqual(rec["decode_error"], want)
                self.assertEqual(base64.b64decode(rec["request_body"]), body)
                self.assertEqual(rec["body_encoding"]["request"], "base64")
                self.assertEqual(verify.check_record(rec), [])

    def test_an_answer_cut_at_capture_max_body_keeps_its_usage(self):
        # Its usage comes last, past the kept part: a big embeddings batch had no tokens_used,
        # and stats undercounted (an audit's finding). Read from the part kept past the cut.
        vectors = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(["0.0123"] * 50))
                           for i in range(40))
        resp = ('{"object":"list","data":[%s],"model":"text-embedding-3-small",'
                '"usage":{"prompt_tokens":80,"total_tokens":80}}' % vectors).encode()
        ex = exchange(path="/v1/embeddings", body=b'{"model":"text-embedding-3-small","input":["a"]}',
                      resp=[resp[i:i + 997] for i in range(0, len(resp), 997)], limit=2000)
        (rec,), _ = encode(ex)
        self.assertIn("response", rec["truncated"])
        self.assertEqual(rec["tokens_used"], {"prompt_tokens": 80, "total_tokens": 80})
        # A "usage" inside the text before it is not the one read: the last one is.
        chat = ('{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
                '"content":"%s \\"usage\\": {\\"prompt_tokens\\": 1}"},"finish_reason":"stop"}],'
                '"usage":{"prompt_tokens":9,"completion_tokens":4000,"total_tokens":4009}}' % ("x" * 5000)).encode()
        (rec,), _ = encode(exchange(resp=[chat[:3000], chat[3000:]], limit=1000))
        self.assertEqual(rec["tokens_used"], {"prompt_tokens": 9, "completion_tokens": 4000, "total_tokens": 4009})

    def test_a_stored_answer_read_again_carries_no_tokens(self):
        # GET /v1/responses/{id} (a background response, a resumed stream) returns the usage of
        # the request that ran the model: counted again on every read, under no model (an audit).
        resp = (b'{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1","output":[],'
                b'"usage":{"input_tokens":10,"output_tokens":5,"total_tokens":15}}')
        for method, want in (("POST", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
                             ("GET", None)):
            with self.subTest(method=method):
                ex = exchange(path="/v1/responses" if method == "POST" else "/v1/responses/resp_1", resp=resp,
                              body=b'{"model":"gpt-4.1","input":"hi"}' if method == "POST" else b"")
                ex.method = method
                counted = []
                (rec,), _ = encode(ex, on_result=lambda ex, ended, tokens: counted.append(tokens))
                self.assertEqual((rec.get("tokens_used"), counted), (want, [want]))

    def test_stream_that_ends_on_an_error_event_is_upstream_error(self):
        # Anthropic's way of telling an overload mid-stream: an error event, then the end. It
        # was upstream_eof, told as a stream cut without its terminal event (an audit's finding).
        resp = [b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message",'
                b'"role":"assistant","content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":3,'
                b'"output_tokens":1}}}\n\n',
                b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n']
        ex = exchange(path="/v1/messages", resp=resp, ctype="text/event-stream", stream=True)
        ex.provider_type = ex.family = "anthropic"
        ex.provider = Provider("overloaded", "anthropic", "http://upstream")  # (lines are rate-limited per provider)
        with self.assertLogs("proxy_llm.upstream", "WARNING") as logs:
            (rec, _), _ = encode(ex)
        self.assertEqual((rec["ended"], rec["error"]), ("upstream_error", {"type": "overloaded_error", "message": "Overloaded"}))
        self.assertIn("stream ended with an error event (upstream_error)", logs.output[0])

    def test_numbers_json_cannot_hold_are_written_as_their_names(self):
        # A literal NaN or -Infinity in an event (a server's json.dumps of a -inf logprob), or
        # 1e400 in a tool's streamed input, went into the rebuilt body and the line held NaN:
        # verify, stats and export then dropped the record as a bad line (an audit's finding).
        chat = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,'
                b'"delta":{"role":"assistant","content":"a"},"logprobs":{"content":[{"token":"a","logprob":-Infinity,'
                b'"bytes":[97],"top_logprobs":[{"token":"b","logprob":NaN,"bytes":[98]}]}]},"finish_reason":"stop"}]}\n\n',
                b'data: [DONE]\n\n']
        (rec, _), lines = encode(exchange(resp=chat, ctype="text/event-stream", stream=True))
        for _, _, line in lines:
            reader.STRICT_JSON.decode(line.decode("utf-8"))  # (raises on NaN or Infinity)
        logprobs = rec["response_body"]["choices"][0]["logprobs"]["content"][0]
        self.assertEqual((logprobs["logprob"], logprobs["top_logprobs"][0]["logprob"]), ("-Infinity", "NaN"))
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "a")
        tool = [b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message",'
                b'"role":"assistant","content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":3,'
                b'"output_tokens":1}}}\n\n',
                b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
                b'{"type":"tool_use","id":"t","name":"f","input":{}}}\n\n',
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
                b'{"type":"input_json_delta","partial_json":"{\\"x\\": 1e400, \\"y\\": 2}"}}\n\n',
                b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
                b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use"},'
                b'"usage":{"output_tokens":5}}\n\n',
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
        ex = exchange(path="/v1/messages", resp=tool, ctype="text/event-stream", stream=True)
        ex.provider_type = ex.family = "anthropic"
        (rec, _), lines = encode(ex)
        reader.STRICT_JSON.decode(lines[0][2].decode("utf-8"))
        self.assertEqual(rec["response_body"]["content"][0]["input"], {"x": "Infinity", "y": 2})
        self.assertEqual(rec["ended"], "completed")

    def test_streams_line_is_the_json_of_its_fields(self):
        # The streams line is put together from the events' JSON strings: byte for byte what
        # json.dumps makes of the dict of its fields, for events of every kind (an event name or
        # none, id, retry, comments, unterminated, text outside ASCII) and a session id with a
        # lone surrogate (the whole line escaped then), times rounded to the microsecond.
        from proxy_llm.sse import Event
        plain = [Event('{"a":"\u00e9\\"x"}'), Event("d", "message_start"), Event("", None)]
        odd = [Event("d", "e", "7"), Event("d", None, None, 1500), Event("", None, None, None, ["ping"]), Event("x")]
        odd[-1].unterminated = True
        times = [0.0, 1.0004999, 2.0005, 12345.6789, 1e-07, 3]
        for events in (plain, plain + odd, odd, []):
            for session_id in ("s", "caf\u00e9", "half \ud83d"):
                timed = [(times[i % len(times)], e) for i, e in enumerate(events)]
                want = {"id": "01J", "session_id": session_id, "timestamp": "2026-01-01T00:00:00.000000Z",
                        "events": [e.to_json(round(t, 3)) for t, e in timed], "truncated": bool(events)}
                try:
                    text = json.dumps(want, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                except UnicodeEncodeError:
                    text = json.dumps(want, separators=(",", ":")).encode("ascii")
                got = record._streams_line("01J", session_id, want["timestamp"], timed, bool(events))
                self.assertEqual(got, text + b"\n", (events, session_id))

    def test_unterminated_last_event_is_kept_in_the_streams_file_but_not_reassembled(self):
        ex = exchange(resp=[b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"seen"}}]}\n\n',
                            b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" unseen"}}]}'],
                      ctype="text/event-stream", stream=True)
        (rec, line), _ = encode(ex)
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "seen")
        self.assertEqual(rec["stream_events"], 2)
        self.assertNotIn("unterminated", line["events"][0])
        self.assertIs(line["events"][1]["unterminated"], True)

    def test_accepted_bodies_are_spliced_and_still_give_valid_lines(self):
        for pad in ("x" * 9000, "x"):
            with self.subTest(size=len(pad)):
                self.check_accepted_bodies(pad)

    def check_accepted_bodies(self, pad):
        cases = [
            (b'{"model":"gpt-4o","a":1,"a":2,\n"p":"%s"}' % pad.encode(), 200, dict),     # kept as sent
            (b'{"model":"gpt-4o","v":NaN,"p":"%s"}' % pad.encode(), 200, str),            # lenient server
            (b'{"model":"gpt-4o","p":"\xff%s"}' % pad.encode(), 200, str),               # not UTF-8
            (b'{"model":"gpt-4o","p":"%s"' % pad.encode(), 400, str),                     # broken, refused
            (b'{"model":"gpt-4o","metadata":{"user_id":"u-9"},"p":"%s"}' % pad.encode(), 200, dict),
        ]
        for body, status, kind in cases:
            with self.subTest(body=body[:40], status=status):
                ex = exchange(body=body, status=status)
                ex.model = "gpt-4o"
                [rec], lines = encode(ex)
                self.assertIsInstance(rec["request_body"], kind)
                self.assertEqual(lines[0][2].count(b"\n"), 1)
                self.assertEqual(rec["model"], "gpt-4o")
                if kind is dict and b'"a":1,"a":2' in body:
                    self.assertIn(b'"a":1,"a":2, "p"', lines[0][2])  # duplicate keys kept, newline made a space
        [rec], _ = encode(exchange(body=cases[-1][0]))
        self.assertEqual(rec["session_id"], "u-9")

    def test_an_endpoint_without_a_dialect_does_not_vouch_for_a_body(self):
        # A 2xx from an endpoint the proxy does not know may come from one that ignored the body.
        broken = b'{"model":"gpt-4o","input":{}'  # cut short, yet it ends with a brace
        for path, kind in (("/v1/batches", str), ("/v1/some/new/thing", str), ("/v1/chat/completions", None)):
            with self.subTest(path=path):
                ex = exchange(body=broken, path=path)
                if kind is None:  # a model API that answered 2xx parsed it: spliced unparsed
                    self.assertIsNotNone(record.accepted_json(broken))
                    continue
                [rec], lines = encode(ex)
                self.assertEqual(rec["request_body"], broken.decode())

    def test_the_recorded_model_is_the_one_the_upstream_read(self):
        # Of a key given twice the upstream's parser keeps the last; a "model" inside a string is
        # not one. Routing, on a long body, may take the first; the record may not.
        pad = "p" * (40 * 1024)
        cases = [
            (b'{"model":"cheap-1","model":"gpt-big","pad":"%s"}' % pad.encode(), "gpt-big"),
            (b'{"pad":"%s","model":"cheap-1","model":"gpt-big","x":"%s"}' % (pad.encode(), pad.encode()), "gpt-big"),
            (b'{"model":"gpt-big","x\\"model":"cheap-1"}', "gpt-big"),
            (b'{"pad":"%s","x\\"model":"cheap-1"}' % pad.encode(), None),
            (b'{"model":"cheap-1","model":null}', None),
        ]
        for body, model in cases:
            with self.subTest(body=body[:60]):
                ex = exchange(body=body)
                [rec], _ = encode(ex)
                self.assertEqual(rec["model"], model)
                self.assertEqual(rec["request_body"], json.loads(body))

    def test_stream_flag_left_open_by_routing_is_settled_by_the_recorder(self):
        pad = b"y" * 9000
        big = b"z" * 40000
        for body, ctype, status, expected in (
                (b'{"model":"m","p":"%s","stream":true}' % pad, "application/json", 200, True),   # server ignored it
                (b'{"model":"m","p":"%s"}' % pad, "application/json", 200, False),
                (b'{"model":"m","stream":true}', "application/json", 200, True),
                (b'{"model":"m","x":{"stream":true},"stream":false}', "application/json", 200, False),
                (b'{"model":"m","stream":"true"}', "application/json", 200, False),  # not the JSON true
                (b'{"model":"m","p":"%s","stream":true}' % pad, "text/event-stream", 200, True),
                (b'{"model":"m","a":"%s","stream":true,"b":"%s"}' % (big, big), "application/json", 400, True),
                (b'{"model":"m","a":"%s","stream":false,"b":"%s"}' % (big, big), "application/json", 400, False)):
            with self.subTest(expected=expected, ctype=ctype, status=status):
                ex = exchange(body=body, ctype=ctype, status=status,
                              resp=b'data: {"choices":[]}\n\n' if "event" in ctype else b"{}")
                ex.stream = None  # routing does not look for it (sniff.sniff)
                recs, _ = encode(ex)
                self.assertIs(recs[0]["stream"], expected)

    def test_small_accepted_body_keeps_its_bytes_and_the_exact_model(self):
        body = b'{ "model" : "gpt\\u002d4o",\r\n  "n": 1.0e2, "messages": [{"model": "nested"}] }'
        ex = exchange(body=body, headers=[("X-Session-Id", "s")])
        [rec], lines = encode(ex)
        self.assertEqual(rec["model"], "gpt-4o")  # the escape read as JSON reads it
        self.assertIn(b'"request_body":{ "model" : "gpt\\u002d4o",    "n": 1.0e2, "messages"', lines[0][2])
        self.assertEqual(rec["request_body"]["n"], 100.0)

    def test_line_is_the_compact_encoding_of_its_fields_in_order(self):
        # The line is put together from remembered parts: whatever they are, everything before
        # the bodies must be what one json.dumps of the record would give, keys in FIELDS order.
        # One encoder for all cases and each case twice, so the second time takes the memos.
        cases = [
            exchange(headers=[("Authorization", "Bearer sk-test-0123456789"), ("X-Session-Id", "s")]),
            exchange(headers=[("Accept", "a"), ("accept", "b"), ("X-Api-Key", "k1-0123456789"),
                              ("x-api-key", "k2-0123456789")]),  # repeats are joined
            exchange(body=b'{"model":"m\\ud800","metadata":{"user_id":"\\u00e9 \\"q\\""}}', status=400,
                     resp=b'{"error":{"message":"bad","type":"invalid_request_error"}}',
                     resp_headers=[("X-Pct%%", "100%")]),  # "%" is a token character: its own case, no fallback
            exchange(resp=[b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"],
                     ctype="text/event-stream", stream=True, headers=[("X-Session-Id", "\u65e5\u672c")]),
            exchange(resp=b'{"a":"' + b"x" * 100 + b'"}', limit=20, resp_headers=[("Date", "Sun"), ("X-Req", "\u00ff"),
                                                                                 ("X-Pct%s", 'a "q" \\ %s %d\t')]),
        ]
        cases[0].query = "key=sk-query-0123456789&alt=sse"
        cases[3].ttft = 12.3456
        cases[4].ended = "client_aborted"
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20, provider_keys=["provider-key-abcdef"])
        for n, ex in enumerate(cases * 2):
            ex.id = record.new_id()
            line = encoder.encode(ex)[0][2]
            with self.subTest(case=n % len(cases)):
                head = line[:line.index(b',"request_body":')] + b"}"
                rec = json.loads(head)
                self.assertEqual(list(rec), [f for f in FIELDS if f in rec])
                # Compared \u-escaped: a part holding a lone surrogate is written escaped.
                escaped = re.sub("[^\x00-\x7f]", lambda m: "\\u%04x" % ord(m.group()), head.decode())
                self.assertEqual(escaped, json.dumps(rec, separators=(",", ":")))
                self.assertEqual(rec["id"], ex.id)
                self.assertNotIn(b"0123456789", line)
        self.assertEqual(rec["response_headers"]["x-req"], "\u00ff")
        self.assertEqual(rec["response_headers"]["x-pct%s"], 'a "q" \\ %s %d\t')
        [rec], _ = encode(cases[2])
        self.assertEqual(rec["response_headers"]["x-pct%%"], "100%")
        [rec], _ = encode(cases[1])
        self.assertEqual(rec["request_headers"]["accept"], "a, b")
        self.assertRegex(rec["request_headers"]["x-api-key"], r"^\[REDACTED:[0-9a-f]{8}\], \[REDACTED:[0-9a-f]{8}\]$")

    def test_lone_surrogates_and_non_json_bodies_still_give_valid_lines(self):
        ex = exchange(body=b'{"model":"m","x":"\\ud800"}', resp=b"<html>caf\xc3\xa9\r\n</html>")
        [rec], lines = encode(ex)
        self.assertEqual(rec["request_body"]["x"], "\ufffd")  # what pandas and DuckDB load
        self.assertEqual(rec["response_body"], "<html>caf\u00e9\r\n</html>")  # UTF-8 text as it is
        self.assertNotIn("body_encoding", rec)
        self.assertTrue(lines[0][2].endswith(b"}\n"))
        self.assertEqual(lines[0][2].count(b"\n"), 1)

    def test_bodies_nested_too_deep_to_load_are_kept_as_their_text(self):
        # A record that DuckDB (128 levels), pandas (1,024) or json (its recursion limit) cannot
        # load is a lost record, and a parser that gives up must not lose it either.
        def nest(depth):
            return b'{"model":"gpt-4o","x":%s%s}' % (b"[" * depth, b"]" * depth)

        def depth_of(value):
            if isinstance(value, dict):
                return 1 + max([depth_of(v) for v in value.values()] or [0])
            if isinstance(value, list):
                return 1 + max([depth_of(v) for v in value] or [0])
            return 0

        deep = record.MAX_NESTING  # with the outer object, one past the limit
        cases = [
            ("accepted request", dict(body=nest(deep)), "request_body"),
            ("refused request", dict(body=nest(deep), status=400), "request_body"),
            ("request past the recursion limit", dict(body=nest(50000), status=400), "request_body"),
            ("response", dict(resp=nest(deep)), "response_body"),
            ("response past the recursion limit", dict(resp=nest(50000)), "response_body"),
        ]
        for name, kw, field in cases:
            with self.subTest(name):
                ex = exchange(**kw)
                [rec], lines = encode(ex)
                sent = (kw.get("body") if field == "request_body" else kw.get("resp")).decode()
                self.assertEqual(rec[field], sent)  # its exact text
                self.assertLess(depth_of(rec), 5)
        for name, kw, field in [("request", dict(body=nest(deep - 1)), "request_body"),
                                ("response", dict(resp=nest(deep - 1)), "response_body")]:
            with self.subTest("at the limit: " + name):
                [rec], _ = encode(exchange(**kw))
                self.assertEqual(depth_of(rec[field]), deep)  # JSON, as it was sent

    def test_a_rebuilt_stream_body_nested_too_deep_is_kept_as_its_json_text(self):
        args = "[" * 120 + "]" * 120
        events = [
            {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {
                "role": "assistant", "content": "hi"}, "finish_reason": None}]},
            {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {},
                                                                                   "finish_reason": "stop"}],
             "deep": json.loads(args)},
        ]
        resp = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
        [rec, stream], lines = encode(exchange(resp=resp, ctype="text/event-stream", stream=True))
        self.assertIsInstance(rec["response_body"], str)
        body = json.loads(rec["response_body"])
        self.assertEqual(body["choices"][0]["message"]["content"], "hi")
        self.assertEqual(len(stream["events"]), 3)

    def test_nesting_is_measured_outside_strings(self):
        within = record.nests_within
        self.assertTrue(within(b"[" * 100 + b"]" * 100))
        self.assertFalse(within(b"[" * 101 + b"]" * 101))
        self.assertFalse(within(b'{"a":' * 60 + b'[' * 41 + b"1" + b"]" * 41 + b"}" * 60))
        text = b'"' + b"[{" * 3000 + b'"'  # brackets in a string are text
        self.assertTrue(within(b'{"p":%s,"q":[[1]]}' % text))
        self.assertTrue(within(b'["a\\\\"' + b",[[1]]" * 200 + b"]"))  # an escaped backslash, then the end
        self.assertFalse(within(b'["a\\\\",' + b"[" * 101 + b"]" * 101 + b"]"))
        self.assertTrue(within(b'["\\"' + b"[" * 150 + b'"]'))  # an escaped quote does not end the string
        wide = json.dumps({"tools": [{"schema": {"properties": {"a": {"items": [1, 2]}}}} for _ in range(500)],
                           "text": "x" * 10000}).encode()
        self.assertGreater(wide.count(b"{"), 2000)
        self.assertTrue(within(wide))  # many brackets, shallow
        self.assertFalse(within(b'{"t":"%s","x":%s}' % (b"y" * 10000, b"[" * 101 + b"]" * 101)))

    def test_a_2xx_answer_read_with_its_floats_as_text_gives_the_same_record(self):
        # The answer's floats stay text (record._FLOATS_AS_TEXT): the record must not change.
        from proxy_llm import reader

        floats = [0.25, -1.5e-3, 3.0, 1e20]
        cases = [
            ("/v1/embeddings", b'{"model":"text-embedding-3-small","input":["a","b"]}',
             {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": floats} for i in range(2)],
              "model": "text-embedding-3-small", "usage": {"prompt_tokens": 2, "total_tokens": 2}}),
            ("/v1/chat/completions", b'{"model":"gpt-4o","logprobs":true}',
             {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
              "logprobs": {"content": [{"token": "hi", "logprob": -0.01, "top_logprobs": []}]}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 12.0, "completion_tokens": 1e1, "total_tokens": 3}}),  # float counts: not counted
            ("/v1/chat/completions", b'{"model":"gpt-4o"}', {"error": {"code": 1.5, "detail": [0.25, 2e-3]}}),  # no message
            ("/v1/messages", b'{"model":"claude-x","max_tokens":5}',
             {"id": "m", "type": "message", "role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
              "input": {"x": 1.5}}], "usage": {"input_tokens": 3, "output_tokens": 2.5}}),
            ("/v1beta/models/gemini-2.0-flash:generateContent", b'{"contents":[]}',
             {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "avgLogprobs": -0.5}],
              "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1, "totalTokenCount": 5}}),
            ("/v1/responses", b'{"model":"gpt-4o","input":"x"}',
             {"object": "response", "status": "failed", "error": {"code": "server_error", "message": 0.5}, "output": []}),
        ]
        kinds = {"/v1/messages": "anthropic", "/v1beta/models/gemini-2.0-flash:generateContent": "gemini"}
        for path, body, answer in cases:
            with self.subTest(path=path):
                ex = exchange(body=body, resp=json.dumps(answer).encode(), path=path)
                ex.provider_type = kinds.get(path, "openai")
                ex.id = "01JCDEFGHJKMNPQRSTVWXYZ012"
                seen = []
                [rec], lines = encode(ex, on_result=lambda e, ended, tokens: seen.append((ended, tokens)))
                with mock.patch.object(record, "_FLOATS_AS_TEXT", reader.STRICT_JSON):
                    _, want = encode(ex, on_result=lambda e, ended, tokens: seen.append((ended, tokens)))
                self.assertEqual(lines, want)
                self.assertEqual(seen[0], seen[1])
                self.assertEqual(rec["response_body"], answer)  # its own bytes, floats and all
                self.assertNotIn("1.5", json.dumps(rec.get("tokens_used")))

    def test_nesting_is_measured_through_escapes_beside_quotes(self):
        # The skeleton nests_within measures keeps each escape a pair (its letter as x): a
        # string that ends in an escape (\n", \\") ends at that quote, and an escaped quote
        # after an escape (\n\") does not end its string. A skeleton of backslashes, quotes and
        # brackets alone would read \n" as an escaped quote, and \n\" as \\ and a quote.
        within = record.nests_within
        deep = b"[" * 101 + b"]" * 101
        for escape in (b"\\n", b"\\t", b"\\r\\b\\f", b"\\u00e9", b"\\/", b"\\\\", b"\\\\\\n"):
            with self.subTest(escape=escape):
                self.assertFalse(within(b'["a%s",%s]' % (escape, deep)))  # 102 levels
                self.assertTrue(within(b'["a%s\\"%s"]' % (escape, b"[" * 300)))  # one level, text
                self.assertTrue(within(b'["a%s\\"%s",%s]' % (escape, b"]" * 300, deep[2:-2])))  # 100
                self.assertFalse(within(b'["a%s\\"%s",%s]' % (escape, b"]" * 300, deep)))  # 102

    def test_nesting_matches_the_depth_a_parser_finds(self):
        # Differential: seeded JSON texts past the counting shortcut (many brackets), with
        # brackets, quotes and backslashes in strings, at depths around the limit, some
        # alternating [ and { (the quick passes take off two levels of those at once).
        rng = random.Random(20261206)
        texts = ['a[b', ']}', '\\', '"', '\\"[', 'x\\\\', '{"k": [1]}', '\u00e9\u2028[', '']

        def value(depth):
            if depth == 0:
                return rng.choice([1, None, True, rng.choice(texts) * rng.randint(1, 3)])
            kind = rng.choice("[{") if rng.random() < 0.5 else ("[" if depth % 2 else "{")
            inner = [value(depth - 1)] + [value(rng.randint(0, min(depth - 1, 3))) for _ in range(rng.randint(0, 3))]
            rng.shuffle(inner)
            if kind == "[":
                return inner
            return {rng.choice(texts) + str(i): v for i, v in enumerate(inner)}

        def depth_of(v):
            if isinstance(v, list):
                return 1 + max([depth_of(x) for x in v] or [0])
            if isinstance(v, dict):
                return 1 + max([depth_of(x) for x in v.values()] or [0])
            return 0

        padding = [[{"k": i}] for i in range(60)]  # brackets enough to be measured, shallow
        for case in range(300):
            limit = rng.choice([4, 10, 50, 100, 101])
            v = value(rng.randint(max(1, limit - 3), limit + 3) if case % 3 else rng.randint(1, 2 * limit))
            text = json.dumps([padding, v], ensure_ascii=case % 2 == 0,
                              separators=(",", ":") if case % 4 < 2 else (", ", ": ")).encode("utf-8")
            with self.subTest(case=case, limit=limit):
                self.assertEqual(record.nests_within(text, limit), depth_of([padding, v]) <= limit)

    def test_bodies_that_are_not_utf8_are_kept_exactly_in_base64_and_scrubbed_first(self):
        secret = "sk-binary-0123456789"
        # A transcription upload (multipart with WAV bytes) and a speech answer (MP3 bytes).
        upload = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\x24\x08\x00"
                  b"\x00WAVEfmt \x10\x00\xff\xfe\x80\r\n--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n"
                  + secret.encode() + b"\r\n--b--\r\n")
        audio = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + bytes(range(256)) + b"provider-key-abcdef"
        ex = exchange(body=upload, resp=audio, headers=[("Authorization", "Bearer " + secret)],
                      ctype="audio/mpeg")
        ex.path = "/v1/audio/transcriptions"
        ex.assign_id()
        [rec], lines = encode(ex, provider_keys=["provider-key-abcdef"])
        self.assertEqual(rec["body_encoding"], {"request": "base64", "response": "base64"})
        self.assertEqual(list(rec), [f for f in FIELDS if f in rec])
        redacted_secret = rec["request_headers"]["authorization"][len("Bearer "):].encode()
        self.assertEqual(base64.b64decode(rec["request_body"], validate=True), upload.replace(secret.encode(), redacted_secret))
        got = base64.b64decode(rec["response_body"], validate=True)
        self.assertEqual(got[:-len(b"provider-key-abcdef")], audio[:-len(b"provider-key-abcdef")])
        self.assertRegex(got[-30:].decode("latin-1"), r"\[REDACTED:[0-9a-f]{8}\]$")
        self.assertEqual((rec["request_bytes"], rec["response_bytes"]), (len(upload), len(audio)))
        self.assertNotIn(secret.encode(), lines[0][2])
        self.assertEqual(verify.check_record(rec), [])
        # Only the body that is not UTF-8 is named.
        [rec], _ = encode(exchange(resp=audio[:40], ctype="audio/mpeg"))
        self.assertEqual(rec["body_encoding"], {"response": "base64"})
        self.assertEqual(base64.b64decode(rec["response_body"]), audio[:40])

    def test_secrets_are_scrubbed_everywhere(self):
        secret = "sk-canary-0123456789"
        ex = exchange(headers=[("Authorization", "Bearer " + secret), ("X-Session-Id", "s")],
                      resp=json.dumps({"error": {"message": "Incorrect API key provided: %s" % secret}}).encode(),
                      status=401)
        ex.query = "key=" + secret
        [rec], lines = encode(ex, provider_keys=["provider-key-abcdef"])
        self.assertNotIn(secret.encode(), lines[0][2])
        self.assertRegex(rec["request_headers"]["authorization"], r"^Bearer \[REDACTED:[0-9a-f]{8}\]$")
        self.assertIn("[REDACTED:", rec["response_body"]["error"]["message"])
        self.assertIn("[REDACTED:", rec["error"]["message"])

    def test_secrets_are_scrubbed_from_small_and_large_records_alike(self):
        # Every secret from every part, a 60 KB request body's too (an agent's, holding the
        # output of `cat .env`: the provider key, which the client never sent).
        client, provider = "sk-client-0123456789", "provider-key-abcdef"
        echo = json.dumps({"error": {"message": "keys %s %s" % (client, provider)}}).encode()
        for size in (10, 60000):
            body = json.dumps({"model": "gpt-4o", "pad": "x" * size, "echo": client,
                               "tool_output": "OPENAI_API_KEY=%s\n" % provider}).encode()
            ex = exchange(body=body, headers=[("Authorization", "Bearer " + client), ("X-Echo", client),
                                              ("X-Provider", provider)], resp=echo, status=200)
            with self.subTest(size=size):
                [rec], lines = encode(ex, provider_keys=[provider])
                self.assertNotIn(client.encode(), lines[0][2])
                self.assertNotIn(provider.encode(), lines[0][2])
                self.assertIn(wire.redacted(client, KEY), rec["request_body"]["echo"])
                self.assertIn(wire.redacted(client, KEY), rec["request_headers"]["x-echo"])
                self.assertEqual(rec["response_body"]["error"]["message"],
                                 "keys %s %s" % (wire.redacted(client, KEY), wire.redacted(provider, KEY)))
                self.assertEqual(rec["request_body"]["tool_output"],
                                 "OPENAI_API_KEY=%s\n" % wire.redacted(provider, KEY))

    def test_a_key_that_only_the_path_holds_is_redacted_in_the_endpoint_and_scrubbed_from_the_line(self):
        # A base URL set wrong puts the key in the path, in no header, query or config: the
        # record's endpoint (and a 404 that quotes the path) kept it in clear.
        goog = "AIzaSyA0123456789abcdefghijklmnopqrstuv"
        oai = "sk-proj-0123456789abcdefghijklmn"
        header = "sk-header-secret-0123"
        cases = [  # (path, headers, the secrets, the endpoint recorded: "%s" per redaction)
            ("/%s/v1beta/models/gemini-2.0-flash:generateContent" % goog, [], [goog],
             "/%s/v1beta/models/gemini-2.0-flash:generateContent"),
            ("/v1/%s/chat/completions" % oai, [], [oai], "/v1/%s/chat/completions"),
            ("/v1/chat/completions;key=unknown-value", [], ["unknown-value"], "/v1/chat/completions;key=%s"),
            # A secret of the exchange percent-encoded in the path: under its header's fingerprint.
            ("/v1/%73k-header-secret-0123/chat/completions", [("Authorization", "Bearer " + header)], [header],
             "/v1/%s/chat/completions"),
        ]
        enc = Encoder(KEY, "X-Session-Id", 1 << 20)
        for path, headers, secrets, endpoint in cases:
            echo = json.dumps({"error": {"message": "no route for %s (%s)" % (path, secrets[0])}}).encode()
            ex = exchange(path=path, headers=headers, resp=echo, status=404)
            ex.assign_id()
            with self.subTest(path=path):
                [(_, sid, line)] = enc.encode(ex)
                rec = json.loads(line)
                self.assertEqual(rec["endpoint"], endpoint % tuple(wire.redacted(s, KEY) for s in secrets))
                self.assertEqual(rec["error"]["message"], "no route for %s (%s)" % (
                    rec["endpoint"], wire.redacted(secrets[0], KEY)))
                for secret in secrets:
                    self.assertNotIn(secret[3:].encode(), line)
        # A Gemini model that is a key (a key in the model's place): neither its session's
        # file nor the record's session id, model or endpoint hold it.
        ex = exchange(path="/v1beta/models/%s:generateContent" % goog, body=b'{"contents":[]}')
        ex.model = goog
        ex.assign_id()
        [(_, sid, line)] = enc.encode(ex)
        self.assertNotIn(goog[4:], sid)
        self.assertNotIn(goog[4:].encode(), line)
        rec = json.loads(line)
        self.assertEqual((rec["session_id"], rec["model"], rec["endpoint"]), (
            wire.redacted(goog, KEY), wire.redacted(goog, KEY), "/v1beta/models/%s:generateContent" % wire.redacted(goog, KEY)))
        # A plain path is the endpoint as it came; the work is done once per path.
        for _ in range(2):
            [rec], _ = encode(exchange(path="/v1/models/task-classification-model-large-v2"))
            self.assertEqual(rec["endpoint"], "/v1/models/task-classification-model-large-v2")
        self.assertEqual(len(enc.paths), len(cases) + 1)
        for _ in range(3):
            enc.encode(exchange(path=cases[0][0]))
        self.assertEqual(len(enc.paths), len(cases) + 1)

    def test_the_message_of_a_text_error_is_scrubbed_before_it_is_cut(self):
        # A key across the 200th character: cut first, its first part would stay, which the
        # scrub of the whole line does not find.
        secret = "sk-straddle-0123456789abcdef"
        for pad in (180, 190, 199):
            text = "y" * pad + secret + " tail"
            ex = exchange(headers=[("Authorization", "Bearer " + secret)], resp=text.encode(), ctype="text/html",
                          status=401)
            with self.subTest(pad=pad):
                [rec], lines = encode(ex)
                self.assertNotIn(secret[:8].encode(), lines[0][2])
                self.assertEqual(rec["error"]["message"], (text.replace(secret, wire.redacted(secret, KEY)))[:200])
                self.assertEqual(rec["response_body"], text.replace(secret, wire.redacted(secret, KEY)))

    def test_an_escaped_echo_is_scrubbed_from_the_record_and_the_streams_line(self):
        secret = "sk-proj-ESCAPED-0123456789/ab"
        uesc = "".join("\\u%04x" % ord(c) for c in secret)
        answer = ('{"error":{"message":"Incorrect API key provided: %s"}}' % uesc).encode()
        [rec], lines = encode(exchange(headers=[("Authorization", "Bearer " + secret)], resp=answer, status=401))
        self.assertEqual(rec["response_body"]["error"]["message"], "Incorrect API key provided: " + wire.redacted(secret, KEY))
        self.assertEqual(rec["error"]["message"], "Incorrect API key provided: " + wire.redacted(secret, KEY))
        events = [('data: {"choices":[{"index":0,"delta":{"content":"key %s"}}]}\n\n' % uesc).encode(),
                  b"data: [DONE]\n\n"]
        ex = exchange(headers=[("Authorization", "Bearer " + secret)], resp=events, ctype="text/event-stream",
                      stream=True)
        (rec, stream), lines = encode(ex, provider_keys=[])
        self.assertIn(wire.redacted(secret, KEY), json.loads(stream["events"][0]["data"])["choices"][0]["delta"]["content"])
        for _, _, line in lines:
            self.assertNotIn(b"ESCAPED", line)
            self.assertNotIn(b"\\u0045\\u0053", line)

    def test_a_client_token_that_is_also_a_number_in_the_answer(self):
        # Replaced byte for byte, "created":1234567890 would become "created":[REDACTED:...]:
        # not JSON, a record lost to every reader.
        token = "1234567890"
        answer = (b'{"id":"c1","object":"chat.completion","created":1234567890,"model":"m","choices":[{"index":0,'
                  b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
                  b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
        ex = exchange(headers=[("Authorization", "Bearer " + token)], resp=answer)
        [rec], lines = encode(ex)  # (encode loads every line)
        self.assertNotIn(token.encode(), lines[0][2])
        self.assertEqual(rec["response_body"]["created"], wire.redacted(token, KEY))
        self.assertEqual(rec["tokens_used"]["total_tokens"], 2)

    def test_gzip_bodies_are_recorded_decoded_and_bad_ones_say_so(self):
        body = json.dumps({"id": "z", "choices": []}).encode()
        [rec], _ = encode(exchange(resp=gzip.compress(body), resp_headers=[("Content-Encoding", "gzip")]))
        self.assertEqual(rec["response_body"], {"id": "z", "choices": []})
        [rec], _ = encode(exchange(resp=b"not gzip", resp_headers=[("Content-Encoding", "gzip")]))
        self.assertIn("decode_error", rec)

    def test_a_gzip_body_of_several_members_is_recorded_whole(self):
        # A gzip body may be a series of members (RFC 1952 2.2; a server compressing each
        # flush on its own sends one per flush), and clients decode them all: the record held
        # the first member alone, with no decode_error, and lost the rest of the answer.
        body = json.dumps({"id": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                                              "total_tokens": 5}}).encode()
        members = [gzip.compress(body[:9]), gzip.compress(body[9:30]), gzip.compress(body[30:])]
        packed = b"".join(members)
        for parts in ([packed], members, [packed[:25], packed[25:31], packed[31:]]):
            with self.subTest(reads=len(parts)):
                [rec], _ = encode(exchange(resp=parts, resp_headers=[("Content-Encoding", "gzip")]))
                self.assertNotIn("decode_error", rec)
                self.assertEqual(rec["response_body"], json.loads(body))
                self.assertEqual(rec["tokens_used"]["total_tokens"], 5)
        # A stream whose events came each in a member of its own.
        events = [b'data: {"id":"s","choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % w for w in (b"a", b"b")]
        events.append(b"data: [DONE]\n\n")
        [rec, streamed], _ = encode(exchange(resp=[gzip.compress(e) for e in events], ctype="text/event-stream",
                                             resp_headers=[("Content-Encoding", "gzip")], stream=True))
        self.assertEqual((rec["stream_events"], len(streamed["events"])), (3, 3))
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "ab")
        # Bytes after the last whole member that are no member are left, as clients leave them.
        [rec], _ = encode(exchange(resp=packed + b"trailing", resp_headers=[("Content-Encoding", "gzip")]))
        self.assertNotIn("decode_error", rec)
        self.assertEqual(rec["response_body"], json.loads(body))

    def test_stacked_codings_are_taken_off_one_by_one(self):
        # "gzip, gzip" was recorded as base64 of the compressed bytes: unreadable, and a key the
        # upstream echoed in it was never scrubbed.
        body = json.dumps({"error": {"message": "bad key sk-stacked-secret-1"}}).encode()
        for coding, data in (("gzip, gzip", gzip.compress(gzip.compress(body))),
                             ("deflate, gzip", gzip.compress(zlib.compress(body))),
                             ("gzip,identity, x-gzip", gzip.compress(gzip.compress(body)))):
            with self.subTest(coding=coding):
                ex = exchange(resp=data, status=401, resp_headers=[("Content-Encoding", coding)],
                              headers=[("Authorization", "Bearer sk-stacked-secret-1")])
                [rec], lines = encode(ex)
                self.assertNotIn("decode_error", rec)
                self.assertEqual(rec["response_body"]["error"]["message"],
                                 "bad key " + wire.redacted("sk-stacked-secret-1", KEY))
        for coding, data in (("gzip, br", gzip.compress(body)), ("gzip, gzip", gzip.compress(body))):
            with self.subTest(coding=coding):
                [rec], _ = encode(exchange(resp=data, resp_headers=[("Content-Encoding", coding)]))
                self.assertIn("decode_error", rec)  # the body as it came, and why
                self.assertEqual(rec["body_encoding"], {"response": "base64"})
                self.assertEqual(base64.b64decode(rec["response_body"]), data)

    def test_truncated_capture_keeps_prefix_size_and_hash(self):
        cap = Capture(10)
        for part in (b"0123456", b"789abc", b"def"):
            cap.add(0.0, part)
        self.assertEqual((cap.body(), cap.size, cap.truncated), (b"0123456789", 16, True))
        self.assertEqual(cap.sha.hexdigest(), hashlib.sha256(b"0123456789abcdef").hexdigest())
        [rec], _ = encode(exchange(resp=b'{"a":"' + b"x" * 100 + b'"}', limit=20))
        self.assertEqual(rec["truncated"]["response"]["size"], 108)
        self.assertEqual(rec["truncated"]["response"]["kept"], 20)
        self.assertIsInstance(rec["response_body"], str)

    def test_capture_keeps_times_and_bytes_without_an_object_per_chunk(self):
        cap = Capture(1 << 20)
        for n in range(50):
            cap.add(float(n), b"data: %d\n\n" % n)
        self.assertEqual(cap.parts(), [(float(n), b"data: %d\n\n" % n) for n in range(50)])
        self.assertEqual(cap.body(), b"".join(b"data: %d\n\n" % n for n in range(50)))
        # Nothing per relayed chunk for the cyclic collector to count or walk: only the lists are
        # tracked, not what is in them (a (time, bytes) pair per chunk would be).
        self.assertFalse([x for x in cap.times + cap.chunks if gc.is_tracked(x)])

    def test_session_file_ids_are_remembered_within_a_bound_and_stay_exact(self):
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20)
        rng = __import__("random").Random(5)
        ids = ["s-%d" % n for n in range(50)] + ["../x", "a b", "é" * 3, "", ".", "x" * 65]
        for n in range(9000):  # past the bound (4096), with repeats: entries reset, results never change
            sid = rng.choice(ids) if n % 3 == 0 else "fresh-%d" % n
            [(_, file_id, _)] = encoder.encode(exchange(headers=[("X-Session-Id", sid)] if sid else []))
            self.assertEqual(file_id, session_file_id(sid or "gpt-4o"))
            self.assertLessEqual(len(encoder.file_ids), 4096)
        self.assertTrue(encoder.file_ids)


    def test_credential_memos_stay_exact_and_bounded(self):
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20)
        rng = __import__("random").Random(7)
        known = ["sk-known-%02d-0123456789" % n for n in range(20)]
        for n in range(9000):  # past the bound (MEMO_SIZE) with repeats in between
            key = rng.choice(known) if n % 3 == 0 else "sk-new-%05d-abcdefgh" % n
            name, value = rng.choice([("Authorization", "Bearer " + key), ("x-api-key", key), ("api-key", key)])
            body = ('{"model":"gpt-4o","echo":"%s"}' % key).encode()
            [(_, _, line)] = encoder.encode(exchange(body=body, headers=[(name, value)],
                                                     resp=('{"error":"bad key %s"}' % key).encode(), status=401))
            rec = json.loads(line)
            self.assertEqual(rec["request_headers"][name.lower()], wire.redact_header(name.lower(), value, KEY))
            self.assertNotIn(key.encode(), line)
            self.assertIn(wire.redacted(key, KEY), rec["request_body"]["echo"])
            self.assertIn(wire.redacted(key, KEY), rec["response_body"]["error"])
            self.assertLessEqual(len(encoder.credentials), record.MEMO_SIZE)
            self.assertLessEqual(len(encoder.scrub_memo), record.MEMO_SIZE)
        self.assertTrue(encoder.credentials and encoder.scrub_memo)

    def test_memos_are_bounded_in_characters_too(self):
        # Bounded in entries only, 4,096 entries of any size stayed: a client sending another
        # long model name (the session, when no header names one) or key with each request
        # made the memos hold each of them, about 4 MB a request for a megabyte-long name.
        patch = mock.patch.object(record, "MEMO_CHARS", 1 << 20, create=True)
        patch.start()
        self.addCleanup(patch.stop)
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20)
        memos = ("file_ids", "credentials", "header_forms", "heads", "scrub_memo")
        for n in range(120):
            model = "gpt-%03d-" % n + "m" * 65536
            key = "sk-%03d-" % n + "k" * 65536
            [(_, file_id, line)] = encoder.encode(exchange(body=json.dumps({"model": model}).encode(),
                                                           headers=[("Authorization", "Bearer " + key),
                                                                    ("X-Long-%d-" % n + "h" * 65536, "v")]))
            self.assertEqual(file_id, session_file_id(model))
            line = bytes(line)  # (a body of 64 KB: it comes as its parts, storage.Pieces)
            rec = json.loads(line)
            self.assertEqual((rec["model"], rec["session_id"]), (model, model))
            self.assertNotIn(key.encode(), line)
            for name in memos:
                self.assertLessEqual(_chars(getattr(encoder, name)), 2 << 20, name)
        # Short keys are still remembered.
        encoder.encode(exchange(headers=[("X-Session-Id", "short")]))
        self.assertIn("short", encoder.file_ids)

    def test_session_sources_in_order(self):
        cases = [
            ([("X-Session-Id", "a"), ("x-claude-code-session-id", "b")], b'{"model":"m"}', ("a", "header")),
            ([("x-claude-code-session-id", "b"), ("session_id", "c")], b'{"model":"m"}', ("b", "claude_code")),
            ([("session_id", "c")], b'{"model":"m"}', ("c", "codex")),
            ([("session-id", "c2")], b'{"model":"m"}', ("c2", "codex")),
            ([], b'{"model":"m","metadata":{"user_id":"u-1"}}', ("u-1", "metadata_user_id")),
            ([], b'{"model":"m"}', ("m", "model")),
            ([], b"", ("default", "default")),
        ]
        for headers, body, expected in cases:
            with self.subTest(expected=expected):
                [rec], _ = encode(exchange(body=body, headers=headers))
                self.assertEqual((rec["session_id"], rec["session_source"]), expected)

    def test_an_upload_chunk_takes_its_starts_session_within_bounds(self):
        # The uploads remembered for their chunks (UploadSessions) are bounded in entries and in
        # characters, the oldest going first; a chunk of one pushed out is in "default", as
        # before. A start that named no session is not kept.
        patches = [mock.patch.object(record, "UPLOADS_SIZE", 8), mock.patch.object(record, "UPLOADS_CHARS", 4000)]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20)
        uploads = encoder.uploads

        def chunk(n):
            ex = exchange(body=b"\x00\x01", path="/upload/v1beta/files")
            ex.query = "upload_id=u-%d&upload_protocol=resumable" % n
            [(_, _, line)] = encoder.encode(ex)
            rec = json.loads(line)
            return rec["session_id"], rec["session_source"]

        uploads.started("/upload/v1beta/files", "upload_id=u-none", [("Host", "p")], "")
        self.assertEqual(len(uploads.entries), 0)
        for n in range(20):
            uploads.started("/upload/v1beta/files", "upload_id=u-%d&upload_protocol=resumable" % n,
                            [("Host", "p"), ("X-Session-Id", "s-%d" % n), ("x-goog-api-key", "k")], "")
            self.assertLessEqual(len(uploads.entries), 8)
        self.assertEqual(chunk(19), ("s-19", "header"))
        self.assertEqual(chunk(12), ("s-12", "header"))
        self.assertEqual(chunk(11), ("default", "default"))
        long_id = "L" * 1500  # two fit in 4,000 characters, not three
        for n in range(20, 23):
            uploads.started("/upload/v1beta/files", "upload_id=u-%d" % n, [("X-Session-Id", long_id)], "")
            self.assertLessEqual(uploads.chars, 4000)
        self.assertEqual(sorted(uploads.entries), ["upload_id=u-21", "upload_id=u-22"])
        self.assertEqual(chunk(22), (long_id, "header"))
        uploads.started("/upload/v1beta/files", "upload_id=u-big", [("X-Session-Id", "B" * 5000)], "")
        self.assertNotIn("upload_id=u-big", uploads.entries)  # larger than the whole bound



class CutThroughSecretTest(unittest.TestCase):
    """A body cut at capture_max_body where the cut goes through a secret of the exchange: its
    first characters were left at the end of the part kept, which no scrub finds."""

    SECRET = "~cut-secret-0123456789abcdef"  # "~" is in no other part of these records
    AUTH = [("Authorization", "Bearer " + SECRET)]
    PAD = b'{"error":{"message":"Incorrect API key provided: '

    def forms(self):
        s = self.SECRET
        uesc = "".join("\\u%04x" % ord(c) for c in s)
        return {"plain": s.encode(), "escaped": uesc.encode(), "partly escaped": (s[:5] + uesc[30:]).encode(),
                "within a string": json.dumps(json.dumps(uesc))[3:-3].encode()}

    def test_no_start_of_a_secret_is_left_at_the_cut_of_either_body(self):
        for name, form in self.forms().items():
            whole = self.PAD + form + b'","type":"invalid_request_error"}}'
            self.assertNotIn(b"~", wire.scrub_json(b'{"a":"%s"}' % whole.replace(b'"', b'\\"'),
                                                   wire.scrub_pairs([self.SECRET], KEY)))  # (whole: scrubbed)
            for j in range(1, len(form)):
                limit = len(self.PAD) + j
                with self.subTest(name, cut=j):
                    [rec], _ = encode(exchange(resp=whole, status=401, headers=self.AUTH, limit=limit))
                    self.assertEqual(rec["truncated"]["response"]["kept"], limit)
                    self.assertEqual(rec["response_body"], self.PAD.decode())
                    [rec], _ = encode(exchange(body=whole, headers=self.AUTH, limit=limit))
                    self.assertEqual(rec["truncated"]["request"]["kept"], limit)
                    self.assertEqual(rec["request_body"], self.PAD.decode())
                    # A provider key, which the client never sent, likewise.
                    [rec], _ = encode(exchange(resp=whole, status=401, limit=limit), provider_keys=[self.SECRET])
                    self.assertEqual(rec["response_body"], self.PAD.decode())

    def test_a_stream_and_a_compressed_body_cut_through_a_secret(self):
        s = self.SECRET.encode()
        events = [b'data: {"choices":[{"index":0,"delta":{"content":"hello "}}]}\n\n',
                  b'data: {"choices":[{"index":0,"delta":{"content":"' + s + b'"}}]}\n\n', b"data: [DONE]\n\n"]
        at = len(events[0]) + events[1].index(s)
        for j in range(1, len(s)):
            with self.subTest("stream", cut=j):
                ex = exchange(resp=events, ctype="text/event-stream", stream=True, headers=self.AUTH,
                              limit=at + j)
                _, lines = encode(ex)
                self.assertEqual(len(lines), 2)
                for _, _, line in lines:
                    self.assertNotIn(b"~", line)
        body = self.PAD + s + b'","type":"x"}}' + b" " * 200
        packed = gzip.compress(body)
        for limit in range(10, len(packed)):
            with self.subTest("gzip", limit=limit):
                ex = exchange(resp=packed, status=401, headers=self.AUTH, limit=limit,
                              resp_headers=[("Content-Encoding", "gzip")])
                [rec], [(_, _, line)] = encode(ex)
                self.assertNotIn(b"~", line)
                kept = rec["response_body"]
                if not isinstance(kept, dict):  # (all of the JSON decoded: a value)
                    kept = (kept or "").replace(wire.redacted(self.SECRET, KEY), self.SECRET)
                    self.assertTrue(body.startswith(kept.encode()), kept)

    def test_a_cut_that_goes_through_no_secret_keeps_every_byte(self):
        body = self.PAD + b"~cut-secret-01" + b"x" * 100
        for headers, limit in ((self.AUTH, len(self.PAD) + 20), ([], len(self.PAD) + 5),
                               ([("Authorization", "Bearer ~cut")], len(self.PAD) + 3)):  # (shorter than 8)
            with self.subTest(headers=headers, limit=limit):
                [rec], _ = encode(exchange(resp=body, status=401, headers=headers, limit=limit))
                self.assertEqual(rec["response_body"], body[:limit].decode())


def _openai_chunk(body: str) -> bytes:
    return b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o",%s}\n\n' % body.encode()


OPENAI_LONG = ([_openai_chunk('"choices":[{"index":0,"delta":{"content":"word%d "},"finish_reason":null}]' % i)
                for i in range(100)]
               + [_openai_chunk('"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]'),
                  _openai_chunk('"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":300,"total_tokens":309}'),
                  b"data: [DONE]\n\n"])
ANTHROPIC_LONG = (
    [b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
     b'"role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,'
     b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n',
     b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
     b'"content_block":{"type":"text","text":""}}\n\n']
    + [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
       b'"delta":{"type":"text_delta","text":"word%d "}}\n\n' % i for i in range(100)]
    + [b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
       b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
       b'"stop_sequence":null},"usage":{"output_tokens":300}}\n\n',
       b'event: message_stop\ndata: {"type":"message_stop"}\n\n'])


class StreamPastCaptureTest(unittest.TestCase):
    """A stream longer than capture_max_body: its usage and terminal event come last, past the
    kept part. They are read from its last part (Capture.tail): the record's tokens_used and
    ended, and recording off's token counts, are the whole stream's."""

    def stream(self, events, limit, anthropic=False):
        ex = exchange(resp=events, ctype="text/event-stream", stream=True, limit=limit,
                      path="/v1/messages" if anthropic else "/v1/chat/completions",
                      body=b'{"model":"claude-x","stream":true}' if anthropic else b'{"model":"gpt-4o","stream":true}')
        if anthropic:
            ex.provider, ex.provider_type, ex.family = Provider("anthropic", "anthropic", "http://upstream"), \
                "anthropic", "anthropic"
        return ex

    def test_the_usage_past_the_kept_part_is_the_records(self):
        for anthropic, events, tokens in ((False, OPENAI_LONG, (9, 300)), (True, ANTHROPIC_LONG, (25, 300))):
            with self.subTest(anthropic=anthropic):
                ex = self.stream(events, 2000, anthropic)
                self.assertTrue(ex.response.truncated)
                [rec, _], _ = encode(ex)
                self.assertEqual((rec["ended"], "error" in rec), ("completed", False))
                self.assertEqual((rec["tokens_used"]["prompt_tokens"], rec["tokens_used"]["completion_tokens"]), tokens)
                self.assertEqual(rec["truncated"]["response"]["kept"], 2000)
                # The body is the kept part's reading: the start of the text, not its end.
                text = json.dumps(rec["response_body"])
                self.assertIn("word0 ", text)
                self.assertNotIn("word99 ", text)

    def test_recording_off_counts_them_too(self):
        seen = []
        encoder = Encoder(KEY, "X-Session-Id", 1 << 20, on_result=lambda ex, ended, tokens: seen.append((ended, tokens)))
        self.assertEqual(encoder.count(self.stream(OPENAI_LONG, 2000)), [])
        self.assertEqual(seen, [("completed", {"prompt_tokens": 9, "completion_tokens": 300, "total_tokens": 309})])

    def test_a_stream_cut_past_the_kept_part_ended_early(self):
        # It stopped before its finish, usage and [DONE]: not "completed", as a stream that
        # fits is not (it was counted completed, its end unread).
        ex = self.stream(OPENAI_LONG[:80], 2000)
        self.assertTrue(ex.response.truncated)
        # (A fresh limiter: the notice is told once in 10 s per provider, process-wide.)
        with mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL)), \
                self.assertLogs("proxy_llm.upstream", "WARNING"):
            [rec, _], _ = encode(ex)
        self.assertEqual((rec["ended"], rec["error"]["type"]), ("upstream_eof", "upstream_eof"))
        self.assertNotIn("tokens_used", rec)

    def test_a_tail_whose_start_was_dropped_is_read_from_its_first_whole_event(self):
        with mock.patch.object(record, "TAIL_MAX", 700):
            ex = self.stream(OPENAI_LONG, 2000)
        self.assertTrue(ex.response.tail_cut)
        self.assertLess(ex.response.tail_bytes, 1200)
        [rec, _], _ = encode(ex)
        self.assertEqual((rec["ended"], rec["tokens_used"]["total_tokens"]), ("completed", 309))
        self.assertEqual(record.captured_bytes(ex), ex.request.kept + 2000 + ex.response.tail_bytes)

    def test_the_event_the_cut_splits_is_read_whole(self):
        # The cut falls inside the usage event: its start is kept, its end is the tail's.
        before = sum(map(len, OPENAI_LONG[:-2]))
        for limit in (before + 1, before + 20, before + len(OPENAI_LONG[-2]) - 1):
            with self.subTest(limit=limit):
                [rec, _], _ = encode(self.stream(OPENAI_LONG, limit))
                self.assertEqual((rec["ended"], rec["tokens_used"]["total_tokens"]), ("completed", 309))

    def test_crlf_streams_and_a_stream_that_fits(self):
        crlf = [e.replace(b"\n", b"\r\n") for e in OPENAI_LONG]
        [rec, _], _ = encode(self.stream(crlf, 2000))
        self.assertEqual((rec["ended"], rec["tokens_used"]["total_tokens"]), ("completed", 309))
        ex = self.stream(OPENAI_LONG, 2000)
        ex.resp_headers.append(("Content-Encoding", "Identity"))  # (no coding: read as one without)
        [rec, _], _ = encode(ex)
        self.assertEqual((rec["ended"], rec["tokens_used"]["total_tokens"]), ("completed", 309))
        gz = gzip.compress(b"".join(OPENAI_LONG))
        ex = self.stream([gz[i:i + 500] for i in range(0, len(gz), 500)], 300)
        ex.resp_headers.append(("Content-Encoding", "gzip"))  # (its tail cannot be read alone)
        [rec, _], _ = encode(ex)
        self.assertEqual((rec["ended"], "tokens_used" in rec), ("completed", False))
        ex = self.stream(OPENAI_LONG, 1 << 20)
        self.assertEqual((ex.response.truncated, ex.response.tail), (False, None))
        [rec, _], _ = encode(ex)
        self.assertNotIn("truncated", rec)
        self.assertEqual(rec["tokens_used"]["total_tokens"], 309)


if __name__ == "__main__":
    unittest.main()


class BigRecordAsPartsTest(unittest.TestCase):
    """A record whose bodies come to record.PIECES_FROM bytes or more is written as its parts
    (storage.Pieces: the body's own bytes object among them, not copied into one line), when
    the scrub would change nothing in it; else it is one line, scrubbed, as before. Either way
    its bytes are those of the one line."""

    KEYS = ["provider-key-abcdef"]

    def lines(self, ex, whole_line=False, keys=None):
        keys = self.KEYS if keys is None else keys
        with mock.patch.object(record, "PIECES_FROM", 1 << 62 if whole_line else record.PIECES_FROM):
            return Encoder(KEY, "X-Session-Id", 1 << 20, provider_keys=keys).encode(ex)

    def big(self, text=b"", **kw):
        pad = b"x" * (record.PIECES_FROM + 100)
        return exchange(body=b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + text + pad + b'"}]}', **kw)

    def test_a_big_record_is_written_as_its_parts_and_reads_as_the_line(self):
        ex = self.big(headers=[("Authorization", "Bearer sk-client-0123456789")])
        [(kind, sid, line)] = self.lines(ex)
        self.assertIs(type(line), storage.Pieces)
        self.assertTrue(any(part is ex.request.chunks[0] for part in line.parts))  # (not copied)
        [(_, _, joined)] = self.lines(ex, whole_line=True)
        self.assertIs(type(joined), bytes)
        self.assertEqual((bytes(line), len(line)), (joined, len(joined)))
        self.assertEqual(json.loads(bytes(line))["request_body"]["messages"][0]["content"][:3], "xxx")
        self.assertNotIn(b"sk-client-0123456789", bytes(line))
        # Both bodies big (a short part between them, shorter than the secrets): parts too.
        ex = self.big(resp=b'{"id":"' + b"y" * record.PIECES_FROM + b'","choices":[]}',
                      headers=[("Authorization", "Bearer sk-client-0123456789")])
        [(_, _, line)] = self.lines(ex)
        [(_, _, joined)] = self.lines(ex, whole_line=True)
        self.assertIs(type(line), storage.Pieces)
        self.assertEqual(bytes(line), joined)
        self.assertTrue(any(part is ex.response.chunks[0] for part in line.parts))

    def test_a_big_record_the_scrub_changes_is_one_line_as_before(self):
        secret = b"sk-client-0123456789"
        cases = {
            "the client's key in the body": (self.big(secret, headers=[("Authorization", "Bearer " + secret.decode())]),
                                             secret),
            "a provider key in the answer": (self.big(resp=b'{"id":"provider-key-abcdef","choices":[]}'),
                                             b"provider-key-abcdef"),
            "an escaped character (the escapes' pass)": (self.big(b"\\u0041"), None),
            "a key not plain ASCII": (self.big(), None),
        }
        for name, (ex, gone) in cases.items():
            with self.subTest(name):
                keys = ["provider-key-\u00e9abcdef"] if "not plain" in name else None
                [(_, _, line)] = self.lines(ex, keys=keys)
                [(_, _, joined)] = self.lines(ex, whole_line=True, keys=keys)
                self.assertIs(type(line), bytes)
                self.assertEqual(line, joined)
                if gone is not None:
                    self.assertNotIn(gone, line)
                    json.loads(line)

    def test_a_secret_across_two_parts_keeps_the_record_one_line(self):
        pad = b"a" * 20000
        pairs = wire.scrub_pairs(["SECRET-0123"], KEY)
        self.assertIsInstance(record._as_pieces((pad, b"b" * 20000, b"}"), pairs), storage.Pieces)
        for cut in range(1, len("SECRET-0123")):
            with self.subTest(cut=cut):  # across each seam, cut at every place
                left, right = b"SECRET-0123"[:cut], b"SECRET-0123"[cut:]
                self.assertIsNone(record._as_pieces((pad + left, right + pad, b"}"), pairs))
                self.assertIsNone(record._as_pieces((pad, pad + left, right + b"}\n"), pairs))
        # Across a part shorter than the secret, two seams at once, cut at every place.
        for start in range(1, 8):
            with self.subTest(short_part_at=start):
                secret = b"SECRET-0123"
                parts = (pad + secret[:start], secret[start:start + 3], secret[start + 3:] + pad)
                self.assertEqual(b"".join(parts).count(secret), 1)
                self.assertIsNone(record._as_pieces(parts, pairs))
                self.assertIsInstance(record._as_pieces((pad, secret[start:start + 3], pad), pairs), storage.Pieces)
        self.assertEqual(record._seam([b"abc", b"d", b"efg"], 0, 3), b"abcdef")
        self.assertEqual(record._seam([b"abc", b"d", b"efg"], 1, 2), b"cdef")
        self.assertEqual(record._seam([b"ab", b"cd"], 0, 5), b"abcd")
        # Nothing long enough to stand alone: one line.
        self.assertIsNone(record._as_pieces((b"{", b"}"), pairs))

    def test_records_as_parts_are_the_lines_they_would_be(self):
        # Differential: big records with secrets (the client's, the provider's, none), in the
        # body or not, escapes, CRLF and non-ASCII text, each encoded both ways.
        rng = random.Random(5)
        pieces = 0
        for n in range(60):
            secret = "sk-client-%08d" % rng.randrange(10 ** 8)
            bits = [b"plain text ", b"\\n", b"\\u00e9", b"\\u0041", b"\xc3\xa9", secret.encode(),
                    b"\\u0073" + secret[1:].encode(),  # (its escaped form: the escapes' pass finds it)
                    b"provider-key-abcdef", b"\\/", b"[]{}", b"\\\\"]
            text = b"".join(rng.choice(bits) for _ in range(rng.randrange(0, 6)))
            resp = rng.choice([b'{"id":"x","choices":[]}',
                               b'{"id":"' + b"y" * rng.choice([10, record.PIECES_FROM]) + b'","choices":[]}'])
            ex = self.big(text, resp=resp, headers=[("Authorization", "Bearer " + secret)])
            [(_, sid, line)] = self.lines(ex)
            [(_, sid_whole, joined)] = self.lines(ex, whole_line=True)
            self.assertEqual((bytes(line), sid), (joined, sid_whole), text)
            self.assertNotIn(secret.encode(), joined)
            pieces += type(line) is storage.Pieces
        self.assertGreater(pieces, 10)
        self.assertLess(pieces, 60)
