"""The proxy end to end, in-process: forwarding is invisible and every exchange is recorded."""

from __future__ import annotations

import base64
import gzip
import zlib
import http.client
import json
import os
import socket
import stat
import threading
import unittest
import urllib.parse
from unittest import mock

from proxy_llm import handler, record, wire
from tests import support
from tests.support import (chunk_event, DEADLINE, FakeUpstream, Reply, header, json_reply, provider, read_records, read_to_eof,
                           request, sse_reply)

CHAT_BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi \\u00e9 1e400"}],  "n": 12345678901234567890}'
CHAT_REPLY = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-2024-08-06",'
              b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}')


class ProxyTestCase(support.ProxyTestCase):
    def default_reply(self):
        return Reply(200, [("Content-Type", "application/json")], CHAT_REPLY)


class ForwardingTest(ProxyTestCase):
    def test_non_streamed_bodies_are_byte_identical_both_ways(self):
        self.replies.append(Reply(200, [("Content-Type", "application/json"), ("x-request-id", "req_abc"),
                                        ("x-ratelimit-remaining-requests", "99"), ("openai-processing-ms", "12"),
                                        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], CHAT_REPLY))
        proxy = self.start_proxy()
        status, headers, body = request(proxy.url, path="/v1/chat/completions?api-version=2024-01-01", body=CHAT_BODY,
                                        headers={"Content-Type": "application/json", "OpenAI-Organization": "org-1",
                                                 "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5"})
        seen = self.upstream.next_request()
        self.assertEqual(seen.body, CHAT_BODY)
        self.assertEqual(seen.query, "api-version=2024-01-01")
        self.assertEqual(seen.header("OpenAI-Organization"), "org-1")
        self.assertIsNone(seen.header("X-Hop"))
        self.assertIsNone(seen.header("Keep-Alive"))
        self.assertEqual(seen.header("Host"), "127.0.0.1:%d" % self.upstream.port)
        self.assertEqual(status, 200)
        self.assertEqual(body, CHAT_REPLY)
        self.assertEqual(header(headers, "x-request-id"), "req_abc")
        self.assertEqual(header(headers, "x-ratelimit-remaining-requests"), "99")
        self.assertEqual([v for k, v in headers if k.lower() == "set-cookie"], ["a=1", "b=2"])
        record_id = header(headers, "X-Proxy-Record-Id")
        [rec] = proxy.records()
        self.assertEqual(rec["id"], record_id)
        self.assertEqual(rec["endpoint"], "/v1/chat/completions")
        self.assertEqual(rec["method"], "POST")
        self.assertEqual(rec["model"], "gpt-4o")
        self.assertEqual(rec["provider"], "openai")
        self.assertEqual(rec["status_code"], 200)
        self.assertIs(rec["stream"], False)
        self.assertEqual(rec["ended"], "completed")
        self.assertEqual(rec["request_body"]["n"], 12345678901234567890)
        self.assertEqual(rec["response_body"], json.loads(CHAT_REPLY))
        self.assertEqual(rec["tokens_used"], {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
        self.assertEqual(rec["session_id"], "gpt-4o")
        self.assertIsInstance(rec["duration"], float)
        self.assertEqual(rec["schema_version"], 1)
        self.assertNotIn("error", rec)
        # Big numbers are kept exactly: the body went into the record as its own bytes.
        with open(self._record_file(), "rb") as f:
            self.assertIn(b'"n": 12345678901234567890', f.read())

    def _record_file(self):
        [d] = [d for d in os.listdir(self.data_dir) if d.startswith("session_")]
        [f] = os.listdir(os.path.join(self.data_dir, d))
        return os.path.join(self.data_dir, d, f)

    def test_stream_is_relayed_untouched_and_reassembled(self):
        events = [b": keepalive\n\n", chunk_event("Hel"), chunk_event("lo"), chunk_event("", "stop"),
                  b'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","choices":[],'
                  b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n', b"data: [DONE]\n\n"]
        self.replies.append(sse_reply(events))
        proxy = self.start_proxy()
        status, headers, body = request(proxy.url, body={"model": "gpt-4o", "stream": True, "messages": []},
                                        headers={"X-Session-Id": "run-42", "Content-Type": "application/json"})
        self.assertEqual(status, 200)
        self.assertEqual(body, b"".join(events))
        self.assertEqual(header(headers, "Content-Type"), "text/event-stream")
        [rec] = proxy.records()
        self.assertTrue(rec["stream"])
        self.assertEqual(rec["session_id"], "run-42")
        self.assertEqual(rec["session_source"], "header")
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "Hello")
        self.assertEqual(rec["response_body"]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(rec["tokens_used"]["total_tokens"], 7)
        self.assertIn("ttft_ms", rec)
        self.assertEqual(rec["ended"], "completed")
        [line] = proxy.stream_lines()
        self.assertEqual(line["id"], rec["id"])
        self.assertEqual(len(line["events"]), 6)
        self.assertTrue(all("t" in e for e in line["events"]))
        self.assertTrue(os.path.isdir(os.path.join(self.data_dir, "session_run-42")))

    def test_a_bom_after_the_start_of_a_stream_is_relayed_and_recorded_as_text(self):
        # Only a BOM that opens the stream is dropped by an SSE client (WHATWG HTML 9.2.6); one
        # after a blank line starts a line whose field ("\ufeffdata") the client ignores. The
        # client gets every byte as sent, and the record what the client made of them.
        bom = b"\xef\xbb\xbf"
        for lead, contents in ((bom, ["Hel", "lo"]), (b"\n" + bom, ["", "lo"])):
            with self.subTest(lead=lead):
                events = [lead + chunk_event("Hel"), chunk_event("lo", "stop"), b"data: [DONE]\n\n"]
                self.replies.append(sse_reply(events))
                proxy = self.start_proxy(data_dir=os.path.join(self.tmp, str(len(lead))))
                status, _, body = request(proxy.url, body={"model": "gpt-4o", "stream": True, "messages": []})
                self.assertEqual((status, body), (200, b"".join(events)))
                [rec] = proxy.records()
                self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "".join(contents))
                [line] = proxy.stream_lines()
                got = [json.loads(e["data"])["choices"][0]["delta"].get("content", "") if e["data"] else ""
                       for e in line["events"][:2]]
                self.assertEqual(got, contents)

    def test_first_event_reaches_the_client_before_the_backend_finishes(self):
        release = threading.Event()
        self.replies.append(sse_reply([chunk_event("first"), release, chunk_event("", "stop"), b"data: [DONE]\n\n"]))
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","stream":true}')
        resp = conn.getresponse()
        first = resp.read1(65536)
        self.assertEqual(first, chunk_event("first"))  # arrived while the backend is blocked
        self.assertFalse(release.is_set())
        release.set()
        rest = resp.read()
        self.assertEqual(rest, chunk_event("", "stop") + b"data: [DONE]\n\n")
        conn.close()

    def test_keep_alive_reuses_client_and_upstream_connections(self):
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=CHAT_BODY)
            resp = conn.getresponse()
            self.assertEqual(resp.read(), CHAT_REPLY)
        conn.close()
        self.assertEqual(self.upstream.connections, 1)
        self.assertEqual(len(proxy.records()), 3)
        [(pooled, _)] = list(proxy.server.pools["openai"]._idle)
        self.assertTrue(pooled.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))  # no Nagle upstream either

    def test_an_empty_line_before_a_request_line_is_ignored(self):
        # RFC 9112 2.2 (a client's stray CRLF after a body): the next request is served on the
        # same connection, where the connection used to close without a word.
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT_BODY), CHAT_BODY)
        sock.sendall(b"\r\n" + req + b"\r\n" + req)
        data = b""
        for _ in range(2):
            data = support.read_until(sock, CHAT_REPLY, data)
            head, _, data = data.partition(CHAT_REPLY)
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:40])
        self.assertEqual([r["request_body"]["model"] for r in proxy.records()], ["gpt-4o", "gpt-4o"])

    def test_expect_100_continue_is_answered_when_the_body_is_wanted(self):
        proxy = self.start_proxy(max_request_body=1000)
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        # A body it will read: 100 Continue first, then the answer.
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(head % (b"/v1/chat/completions", len(CHAT_BODY)))
        self.assertEqual(support.read_until(sock, b"\r\n\r\n"), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(CHAT_BODY)
        data = support.read_until(sock, CHAT_REPLY)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:40])
        self.assertEqual(self.upstream.next_request().body, CHAT_BODY)
        # Bodies it refuses (too large, an unknown path) are never asked for: the final answer
        # comes without a 100 Continue, and the connection closes.
        for target, length, status in ((b"/v1/chat/completions", 5000, b"413"), (b"/elsewhere", 10, b"404")):
            with self.subTest(status=status):
                data = support.raw_exchange(proxy.port, head % (target, length))
                self.assertTrue(data.startswith(b"HTTP/1.1 %s " % status), data[:60])
                self.assertNotIn(b"100 Continue", data)
        self.assertEqual([(r["status_code"], r["ended"]) for r in proxy.records()], [(200, "completed"), (413, "refused")])

    def test_large_sized_response_is_relayed_and_its_connection_reused(self):
        big = b'{"object":"list","data":[' + b",".join([b'{"embedding":[0.1,0.2,0.3],"index":%d}' % i for i in range(9000)]) + b"]}"
        self.assertGreater(len(big), 256 * 1024)  # past the one-write path: relayed with read1
        self.replies += [Reply(200, [("Content-Type", "application/json")], big)] * 2
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        for _ in range(2):
            conn.request("POST", "/v1/embeddings", body=b'{"model":"text-embedding-3-small","input":"x"}')
            resp = conn.getresponse()
            self.assertEqual((resp.getheader("Content-Length"), resp.read()), (str(len(big)), big))
        conn.close()
        self.assertEqual(self.upstream.connections, 1)
        self.assertEqual([r["ended"] for r in proxy.records()], ["completed", "completed"])

    def test_chunked_request_body_is_read_and_forwarded_with_length(self):
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        body = b'{"model":"gpt-4o","messages":[]}'
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:]) + b"0\r\n\r\n")
        seen = self.upstream.next_request()
        self.assertEqual(seen.body, body)
        self.assertEqual(seen.header("Content-Length"), str(len(body)))
        self.assertIsNone(seen.header("Transfer-Encoding"))
        sock.close()

    def test_content_length_with_transfer_encoding_is_rejected(self):
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        data = sock.makefile("rb").read()
        self.assertTrue(data.startswith(b"HTTP/1.1 400"))
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["type"], "error")  # Anthropic's error shape for /v1/messages
        self.assertEqual(self.upstream.requests.qsize(), 0)
        sock.close()

    def test_oversize_body_gets_413_in_provider_shape_and_is_recorded(self):
        proxy = self.start_proxy(max_request_body=100)
        status, headers, body = request(proxy.url, body=b'{"model":"gpt-4o","x":"' + b"a" * 200 + b'"}')
        self.assertEqual(status, 413)
        self.assertIn("limit", json.loads(body)["error"]["message"])
        [rec] = proxy.records()
        self.assertEqual(rec["status_code"], 413)
        self.assertEqual(rec["error"]["type"], "request_too_large")

    def test_gzip_response_is_passed_through_and_recorded_decoded(self):
        compressed = gzip.compress(CHAT_REPLY)
        self.replies.append(Reply(200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], compressed))
        proxy = self.start_proxy()
        status, headers, body = request(proxy.url, body=CHAT_BODY,
                                        headers={"Accept-Encoding": "gzip, br, zstd;q=0.9", "Content-Type": "application/json"})
        self.assertEqual(self.upstream.next_request().header("Accept-Encoding"), "gzip")
        self.assertEqual(body, compressed)
        self.assertEqual(header(headers, "Content-Encoding"), "gzip")
        [rec] = proxy.records()
        self.assertEqual(rec["response_body"], json.loads(CHAT_REPLY))
        self.assertEqual(rec["response_bytes"], len(compressed))

    def test_binary_bodies_pass_untouched_and_are_recorded_restorably(self):
        # What the SDKs send for a transcription (multipart with audio bytes) and get for speech.
        upload = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                  b"Content-Type: audio/wav\r\n\r\nRIFF\x24\x08\x00\x00WAVE" + bytes(range(256)) * 4 +
                  b"\r\n--xyz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--xyz--\r\n")
        audio = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(reversed(range(256))) * 8
        self.replies.append(Reply(200, [("Content-Type", "audio/mpeg")], audio))
        proxy = self.start_proxy()
        status, headers, body = request(proxy.url, path="/v1/audio/transcriptions", body=upload,
                                        headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        self.assertEqual((status, body), (200, audio))
        self.assertEqual(self.upstream.next_request().body, upload)
        [rec] = proxy.records()
        self.assertEqual(rec["body_encoding"], {"request": "base64", "response": "base64"})
        self.assertEqual(base64.b64decode(rec["request_body"]), upload)
        self.assertEqual(base64.b64decode(rec["response_body"]), audio)
        self.assertEqual((rec["request_bytes"], rec["response_bytes"]), (len(upload), len(audio)))

    def test_bodies_nested_past_what_loaders_read_are_recorded_as_their_text(self):
        # A request nested past the json module's recursion limit (refused) and an answer nested
        # past DuckDB's limit (2xx): each has its record, with its body as text, which json,
        # pandas and DuckDB can all load.
        deep = b'{"model":"gpt-4o","messages":[],"x":%s%s}' % (b"[" * 5000, b"]" * 5000)
        self.replies.append(Reply(400, [("Content-Type", "application/json")],
                                  b'{"error":{"message":"too deep","type":"invalid_request_error"}}'))
        answer = b'{"id":"x","choices":[],"y":%s%s}' % (b"[" * 200, b"]" * 200)
        self.replies.append(Reply(200, [("Content-Type", "application/json")], answer))
        proxy = self.start_proxy()
        self.assertEqual(request(proxy.url, body=deep)[0], 400)
        self.assertEqual(request(proxy.url, body=CHAT_BODY)[::2], (200, answer))
        recs = proxy.records()
        self.assertEqual([r["status_code"] for r in recs], [400, 200])
        self.assertEqual(recs[0]["request_body"], deep.decode())
        self.assertEqual(recs[1]["response_body"], answer.decode())
        self.assertEqual(recs[0]["error"]["message"], "too deep")

    def test_upstream_status_headers_and_html_error_page_pass_through(self):
        html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.replies.append(Reply(502, [("Content-Type", "text/html")], html))
        self.replies.append(Reply(429, [("Content-Type", "application/json"), ("Retry-After", "7")],
                                  b'{"error":{"message":"Rate limit","type":"rate_limit_error"}}'))
        self.replies.append(Reply(529, [("Content-Type", "application/json")],
                                  b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', reason="Site Overloaded"))
        proxy = self.start_proxy()
        self.assertEqual(request(proxy.url, body=CHAT_BODY)[::2], (502, html))
        status, headers, _ = request(proxy.url, body=CHAT_BODY)
        self.assertEqual((status, header(headers, "Retry-After")), (429, "7"))
        self.assertEqual(request(proxy.url, path="/v1/messages", body={"model": "claude-x"})[0], 529)
        recs = proxy.records()
        self.assertEqual([r["status_code"] for r in recs], [502, 429, 529])
        self.assertEqual(recs[0]["response_body"], html.decode())
        self.assertEqual(recs[1]["error"]["message"], "Rate limit")
        self.assertEqual(recs[2]["error"]["message"], "Overloaded")

    def test_get_and_delete_without_model_route_by_path(self):
        self.replies.append(json_reply({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}))
        self.replies.append(json_reply({"id": "resp_1", "object": "response", "deleted": True}))
        proxy = self.start_proxy()
        status, _, body = request(proxy.url, method="GET", path="/v1/models", headers={})
        self.assertEqual(status, 200)
        status, _, _ = request(proxy.url, method="DELETE", path="/v1/responses/resp_1", headers={})
        self.assertEqual(status, 200)
        self.assertEqual([r.method for r in (self.upstream.next_request(), self.upstream.next_request())], ["GET", "DELETE"])
        recs = proxy.records()
        self.assertEqual([(r["method"], r["endpoint"], r["provider"]) for r in recs],
                         [("GET", "/v1/models", "openai"), ("DELETE", "/v1/responses/resp_1", "openai")])
        self.assertIsNone(recs[0]["model"])
        self.assertEqual(recs[0]["session_id"], "default")


class InternalErrorTest(ProxyTestCase):
    def test_a_bug_before_forwarding_is_a_500_in_the_providers_shape_and_a_record(self):
        # Once a Content-Length that int() refused escaped this way: the client saw its
        # connection drop, and the record had no status.
        proxy = self.start_proxy()
        with mock.patch("proxy_llm.handler.sniff", side_effect=ValueError("secret-looking sk-in-message")), \
                self.assertLogs("proxy_llm.handler", "ERROR") as logs:
            status, _, body = request(proxy.url, path="/v1/messages", body={"model": "claude-x"})
        self.assertEqual(status, 500)
        self.assertEqual(json.loads(body)["type"], "error")  # Anthropic's shape
        self.assertIn("ValueError", json.loads(body)["error"]["message"])
        self.assertNotIn("sk-in-message", "\n".join(logs.output))
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["error"]["type"], rec["ended"]), (500, "proxy_error", "refused"))
        self.assertEqual(rec["request_body"], {"model": "claude-x"})


class UpgradeTest(ProxyTestCase):
    # Codex opens the Responses API as a WebSocket first (captured from codex-cli 0.171).
    HANDSHAKE = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Authorization: Bearer sk-ws-client-secret-42\r\nopenai-beta: responses_websockets=2026-02-06\r\n"
                 "session-id: ws-session\r\n\r\n")

    def test_websocket_handshake_gets_426_in_provider_shape_never_reaches_upstream_and_is_recorded(self):
        proxy = self.start_proxy()
        shapes = []
        for path in ("/v1/responses", "/v1/messages"):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
            sock.sendall((self.HANDSHAKE % path).encode("ascii"))
            data = support.read_to_eof(sock)  # the connection is closed after the answer
            sock.close()
            head, body = data.split(b"\r\n\r\n", 1)
            self.assertTrue(head.startswith(b"HTTP/1.1 426 "), head)
            self.assertIn(b"\r\nConnection: close", head)
            self.assertIn(b"\r\nContent-Length: %d" % len(body), head)
            shapes.append(json.loads(body))
        openai_error, anthropic_error = shapes
        self.assertEqual((openai_error["error"]["type"], openai_error["error"]["code"]),
                         ("invalid_request_error", "websocket_unsupported"))
        self.assertIn("WebSocket", openai_error["error"]["message"])
        self.assertEqual((anthropic_error["type"], anthropic_error["error"]["type"]), ("error", "invalid_request_error"))
        self.assertEqual(self.upstream.requests.qsize(), 0)
        recs = proxy.records()
        self.assertEqual([(r["method"], r["endpoint"], r["status_code"], r["error"]["type"], r["ended"]) for r in recs],
                         [("GET", "/v1/responses", 426, "websocket_unsupported", "refused"),
                          ("GET", "/v1/messages", 426, "websocket_unsupported", "refused")])
        self.assertEqual(recs[0]["session_id"], "ws-session")
        self.assertEqual(recs[0]["response_body"], openai_error)
        for path in support.all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(b"sk-ws-client-secret-42", f.read())

    def test_other_upgrades_are_forwarded_without_the_header(self):
        proxy = self.start_proxy()
        status, _, body = request(proxy.url, body=CHAT_BODY, headers={
            "Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA"})
        self.assertEqual((status, body), (200, CHAT_REPLY))
        seen = self.upstream.next_request()
        self.assertEqual(seen.body, CHAT_BODY)
        self.assertEqual([seen.header(h) for h in ("Upgrade", "HTTP2-Settings", "Connection")], [None, None, None])
        [rec] = proxy.records()
        self.assertEqual(rec["status_code"], 200)

class RecorderSetupTest(ProxyTestCase):
    def test_request_threads_help_the_writer_past_a_quarter_of_the_queue(self):
        self.assertEqual(self.start_proxy().server.recorder.assist_above, 2500)  # queue_size 10000
        self.assertEqual(self.start_proxy(queue_size=40, data_dir=os.path.join(self.tmp, "d2")).server.recorder.assist_above, 10)

class KeepAliveAfterEarlyAnswersTest(ProxyTestCase):
    def test_unread_request_body_never_becomes_the_next_request(self):
        proxy = self.start_proxy(proxy_keys=["pk-secret-1"])
        for path, headers in (("/not-v1", {}), ("/v1/chat/completions", {"X-Proxy-Key": "wrong"})):
            with self.subTest(path=path):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
                smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Proxy-Key: pk-secret-1\r\n\r\n"
                head = "".join("%s: %s\r\n" % kv for kv in headers.items()).encode()
                sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + head +
                             b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
                data = sock.makefile("rb").read()  # the proxy closes after its answer
                sock.close()
                self.assertEqual(data.count(b"HTTP/1.1 "), 1, data)
        self.assertEqual(self.upstream.requests.qsize(), 0)


class RoutingTest(ProxyTestCase):
    def test_routes_remembered_are_bounded_in_characters(self):
        # model_routes was bounded in entries only (4,096): a client sending another long model
        # name with each request made it keep every one of them.
        patch = mock.patch.object(record, "MEMO_CHARS", 1 << 20, create=True)
        patch.start()
        self.addCleanup(patch.stop)
        proxy = self.start_proxy(record=False)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        for n in range(40):
            for model in ("gpt-%02d-" % n + "m" * 100000, "gpt-4o"):
                conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": model}),
                             headers={"Content-Type": "application/json"})
                self.assertEqual(conn.getresponse().read(), CHAT_REPLY)
                self.assertEqual(self.upstream.next_request().json()["model"], model)  # routed by its glob
            self.assertLessEqual(sum(len(model) for model in proxy.server.model_routes), 1 << 20)
        self.assertIn("gpt-4o", proxy.server.model_routes)  # a short name is still remembered

    def test_models_route_by_glob_in_order_then_by_path_family(self):
        other = FakeUpstream().start()
        self.addCleanup(other.stop)
        proxy = self.start_proxy([provider("local", "openai", other.url, "", ["llama-*"]),
                                  provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", self.upstream.url, "", ["claude-*"])])
        request(proxy.url, body={"model": "llama-3-8b"})
        self.assertEqual(other.next_request().json()["model"], "llama-3-8b")
        request(proxy.url, body={"model": "unknown-model"})  # no glob: first openai-type provider
        self.assertEqual(other.next_request().json()["model"], "unknown-model")
        request(proxy.url, path="/v1/messages", body={"model": "claude-sonnet-4-5"})
        self.assertEqual(self.upstream.next_request().path, "/v1/messages")
        # Routes are remembered per model; a model no glob matches still goes by each request's
        # path family, and a later request for a known model takes the same provider.
        request(proxy.url, path="/v1/messages", body={"model": "unknown-model"})
        self.assertEqual(self.upstream.next_request().path, "/v1/messages")
        request(proxy.url, body={"model": "unknown-model"})
        self.assertEqual(other.next_request().json()["model"], "unknown-model")
        request(proxy.url, body={"model": "llama-3-8b"})
        self.assertEqual(other.next_request().json()["model"], "llama-3-8b")
        self.assertEqual([r["provider"] for r in proxy.records()], ["local", "local", "anthropic", "anthropic", "local", "local"])

    def test_the_model_of_a_compressed_body_or_a_form_routes_it(self):
        # A gzip'd body's model (and a multipart form's model field) were not seen: the request
        # went to the first provider of the path's family, and the record said model null,
        # session default, stream false for a stream (an audit's findings).
        other = FakeUpstream(lambda req: json_reply({"text": "hi"}) if req.path.endswith("/transcriptions")
                             else sse_reply([chunk_event("Hi"), b"data: [DONE]\n\n"])).start()
        self.addCleanup(other.stop)
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "", ["gpt-*"]),
                                  provider("local", "openai", other.url, "", ["claude-*", "whisper-*"])])
        body = json.dumps({"model": "claude-sonnet-4-5", "stream": True, "messages": []}).encode()
        for coding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            status, _, _ = request(proxy.url, body=packed, headers={"Content-Type": "application/json",
                                                                   "Content-Encoding": coding})
            self.assertEqual(status, 200)
            self.assertEqual(other.next_request().body, packed)  # (forwarded as it came)
        form = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                b'Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--b\r\n'
                b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-large-v3\r\n--b--\r\n')
        status, _, _ = request(proxy.url, path="/v1/audio/transcriptions", body=form,
                               headers={"Content-Type": "multipart/form-data; boundary=b"})
        self.assertEqual(status, 200)
        self.assertEqual(other.next_request().body, form)
        recs = proxy.records()
        self.assertEqual([(r["provider"], r["model"], r["stream"]) for r in recs],
                         [("local", "claude-sonnet-4-5", True)] * 2 + [("local", "whisper-large-v3", False)])
        self.assertEqual(recs[0]["session_id"], "claude-sonnet-4-5")

    def test_absolute_form_targets_go_to_the_configured_upstream(self):
        proxy = self.start_proxy()
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
        sock.sendall(b"POST http://elsewhere.example:9/v1/chat/completions?x=1 HTTP/1.1\r\nHost: elsewhere.example\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT_BODY), CHAT_BODY))
        data = sock.makefile("rb").read()
        sock.close()
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:100])
        seen = self.upstream.next_request()
        self.assertEqual((seen.path, seen.query, seen.header("Host")), ("/v1/chat/completions", "x=1", "127.0.0.1:%d" % self.upstream.port))
        [rec] = proxy.records()
        self.assertEqual((rec["endpoint"], rec["query"]), ("/v1/chat/completions", "x=1"))

    def test_the_upstream_gets_the_target_as_sent(self):
        # A "?" with nothing after it was dropped: the upstream saw another target (an audit's finding).
        proxy = self.start_proxy()
        for target in ("/v1/models?", "/v1/models", "/v1/models?a=1&a=2&b", "/v1/models?%20x=%2F"):
            with self.subTest(target=target):
                self.assertEqual(request(proxy.url, method="GET", path=target, headers={})[0], 200)
                self.assertEqual(self.upstream.next_request().target, target)
        self.assertEqual([r["query"] for r in proxy.records()], ["", "", "a=1&a=2&b", "%20x=%2F"])

    def test_an_empty_body_the_client_framed_is_framed_on(self):
        # "Content-Length: 0" on a GET or a DELETE was not forwarded (an audit's finding).
        proxy = self.start_proxy()
        for method, framed in (("GET", True), ("DELETE", True), ("GET", False), ("POST", False)):
            with self.subTest(method=method, framed=framed):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
                self.addCleanup(sock.close)
                sock.sendall(b"%s /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n"
                             % (method.encode(), b"Content-Length: 0\r\n" if framed else b""))
                self.assertTrue(read_to_eof(sock).startswith(b"HTTP/1.1 200"))
                seen = self.upstream.next_request()
                self.assertEqual(seen.header("Content-Length"), "0" if framed or method == "POST" else None)

    def test_no_provider_for_family_is_404_in_that_shape(self):
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])])
        status, _, body = request(proxy.url, path="/v1beta/models/gemini-2.0-flash:generateContent", body={"contents": []})
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"]["status"], "NOT_FOUND")
        status, _, body = request(proxy.url, path="/v1/messages", body={"model": "claude-x"})
        self.assertEqual(json.loads(body)["type"], "error")
        status, _, body = request(proxy.url, path="/favicon.ico", method="GET", headers={})
        self.assertEqual(status, 404)
        # Gemini's API root: its 404, not a request sent to the openai provider (it was).
        status, _, body = request(proxy.url, path="/v1beta", method="GET", headers={})
        self.assertEqual((status, json.loads(body)["error"].get("status")), (404, "NOT_FOUND"))
        self.assertTrue(self.upstream.requests.empty())
        recs = proxy.records()
        self.assertEqual(len(recs), 3)
        # A request that never left still has its body and an id in its record.
        self.assertEqual(recs[1]["request_body"], {"model": "claude-x"})
        self.assertEqual(len(recs[1]["id"]), 26)

    def test_gemini_methods_under_v1_go_to_gemini(self):
        # The Google Gen AI SDK (3.x) sends its models API under /v1/: countTokens, embedContent and
        # batchEmbedContents were taken for OpenAI paths, sent to the first openai provider with
        # its key in place of the client's Gemini key, and failed there (a walkthrough's finding).
        gemini = FakeUpstream().start()
        self.addCleanup(gemini.stop)
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "sk-server-key-123", ["gpt-*"]),
                                  provider("gemini", "gemini", gemini.url, "", ["gemini-*"])])
        paths = ["/v1/models/gemini-2.0-flash:countTokens", "/v1/models/gemini-embedding-001:embedContent",
                 "/v1/models/gemini-embedding-001:batchEmbedContents", "/v1/models/learnlm-2.0:countTokens"]
        for path in paths:
            # (embedContent's body names the model too, as a resource name: the path's is kept)
            body = {"model": "models/gemini-embedding-001", "content": {}} if "embedContent" in path else {"contents": []}
            request(proxy.url, path=path, body=body, headers={"x-goog-api-key": "client-gemini-key"})
        # A method with no model in its path: the body's resource name, without "models/".
        request(proxy.url, path="/v1beta/cachedContents", body={"model": "models/gemini-2.0-flash-001", "contents": []},
                headers={"x-goog-api-key": "client-gemini-key"})
        # An OpenAI fine-tuned model's id holds colons: its path stays OpenAI's.
        request(proxy.url, method="GET", path="/v1/models/ft:gpt-4o-mini:org:name:abc123", headers={})
        recs = proxy.records()
        self.assertEqual([(r["provider"], r["model"]) for r in recs],
                         [("gemini", "gemini-2.0-flash"), ("gemini", "gemini-embedding-001"),
                          ("gemini", "gemini-embedding-001"), ("gemini", "learnlm-2.0"),
                          ("gemini", "gemini-2.0-flash-001"), ("openai", None)])
        for path in paths + ["/v1beta/cachedContents"]:
            seen = gemini.next_request()
            self.assertEqual((seen.path, seen.header("x-goog-api-key"), seen.header("Authorization")),
                             (path, "client-gemini-key", None))
        self.assertEqual(self.upstream.next_request().header("Authorization"), "Bearer sk-server-key-123")

    def test_gemini_batch_and_media_methods_are_gemini_paths(self):
        # The Batch API's and Imagen's and Veo's methods under /v1/ (the Google Gen AI SDK 3.x
        # sends them there), from a client that leaves the key to the provider (no Gemini header
        # to place them): taken for OpenAI paths, they went to the openai provider, and each was
        # labelled "other" in the metrics.
        gemini = FakeUpstream().start()
        self.addCleanup(gemini.stop)
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "sk-server-key-123", ["gpt-*"]),
                                  provider("gemini", "gemini", gemini.url, "goog-server-key-123", [])])
        methods = ["batchGenerateContent", "asyncBatchEmbedContent", "predict", "predictLongRunning"]
        for method in methods:
            request(proxy.url, path="/v1/models/some-model:" + method, body={"requests": []}, headers={})
            seen = gemini.next_request()
            self.assertEqual((seen.path, seen.header("x-goog-api-key")),
                             ("/v1/models/some-model:" + method, "goog-server-key-123"))
        self.assertEqual([(r["provider"], r["model"]) for r in proxy.records()], [("gemini", "some-model")] * 4)
        self.assertEqual([handler.endpoint_label("/v1beta/models/m:" + m) for m in methods],
                         ["/v1beta/models/*:" + m for m in methods])

    def test_provider_key_replaces_client_credentials(self):
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url, "sk-server-key-123", ["gpt-*"]),
                                  provider("anthropic", "anthropic", self.upstream.url, "ant-server-key-123", ["claude-*"]),
                                  provider("gemini", "gemini", self.upstream.url, "goog-server-key-123", ["gemini-*"])])
        request(proxy.url, body={"model": "gpt-4o"}, headers={"Authorization": "Bearer client", "api-key": "client"})
        seen = self.upstream.next_request()
        self.assertEqual(seen.header("Authorization"), "Bearer sk-server-key-123")
        self.assertIsNone(seen.header("api-key"))
        request(proxy.url, path="/v1/messages", body={"model": "claude-x"}, headers={"x-api-key": "client", "anthropic-version": "2023-06-01"})
        seen = self.upstream.next_request()
        self.assertEqual(seen.header("x-api-key"), "ant-server-key-123")
        self.assertEqual(seen.header("anthropic-version"), "2023-06-01")
        request(proxy.url, path="/v1beta/models/gemini-2.0-flash:generateContent", body={"contents": []}, headers={"x-goog-api-key": "client"})
        self.assertEqual(self.upstream.next_request().header("x-goog-api-key"), "goog-server-key-123")
        # Gemini's key in the query is the client's credential too: it goes, the provider's is sent.
        request(proxy.url, path="/v1beta/models/gemini-2.0-flash:generateContent?alt=sse&key=client-query-key",
                body={"contents": []})
        seen = self.upstream.next_request()
        self.assertEqual((seen.target, seen.header("x-goog-api-key")),
                         ("/v1beta/models/gemini-2.0-flash:generateContent?alt=sse", "goog-server-key-123"))

    def test_without_provider_key_client_credentials_pass_untouched(self):
        proxy = self.start_proxy()
        request(proxy.url, path="/v1/messages", body={"model": "claude-x"},
                headers={"Authorization": "Bearer oauth-token-from-claude-code"})
        self.assertEqual(self.upstream.next_request().header("Authorization"), "Bearer oauth-token-from-claude-code")


class GeminiPrefixesTest(ProxyTestCase):
    """Gemini's paths outside /v1/ and /v1beta/: /v1alpha/ (the Google Gen AI SDK's
    api_version="v1alpha"), the Files API's resumable uploads (/upload/<version>/files, then each
    chunk to the URL the start answered with) and downloads (/download/<version>/files/...). All
    were the proxy's 404 ("unknown path") before; a client of the proxy could not upload a file."""

    GOOG_KEY = "AIza" + "Sy0uPl0adKeyN0tReal-abcdefghijklmno"  # shaped like Google's keys (39 characters)

    def setUp(self):
        super().setUp()
        self.uploads = support.ResumableUploads()
        self.gemini = FakeUpstream(self.uploads).start()
        self.addCleanup(self.gemini.stop)

    def start(self, **extra):
        # An openai provider first: a request the path does not place would go there.
        return self.start_proxy([provider("openai", "openai", self.upstream.url),
                                 provider("gemini", "gemini", self.gemini.url)], **extra)

    def upload(self, proxy, data, chunk, query="", start_headers=(), chunk_headers=()):
        """Google's documented curl sequence, through the proxy: the start, then ``data`` in
        chunks of ``chunk`` bytes to the upload URL the client got, as it is (as the Google Gen
        AI SDK does with the client's base_url alone). The key goes in ``query`` if given, else
        in x-goog-api-key; ``start_headers`` and ``chunk_headers`` are sent too. Returns every
        (status, headers, body) the client got."""
        start_body = {"file": {"display_name": "photo"}}
        headers = {"Content-Type": "application/json", "X-Goog-Upload-Protocol": "resumable",
                   "X-Goog-Upload-Command": "start", "X-Goog-Upload-Header-Content-Length": str(len(data)),
                   "X-Goog-Upload-Header-Content-Type": "image/png"}
        if not query:
            headers["x-goog-api-key"] = self.GOOG_KEY
        headers.update(start_headers)
        answers = [request(proxy.url, path="/upload/v1beta/files" + query, body=start_body, headers=headers)]
        url = urllib.parse.urlsplit(header(answers[0][1], "X-Goog-Upload-URL"))
        origin, target = "%s://%s" % (url.scheme, url.netloc), "%s?%s" % (url.path, url.query)
        for offset in range(0, len(data), chunk):
            last = offset + chunk >= len(data)
            headers = {"Content-Type": "application/octet-stream", "X-Goog-Upload-Offset": str(offset),
                       "X-Goog-Upload-Command": "upload, finalize" if last else "upload"}
            headers.update(chunk_headers)
            answers.append(request(origin, path=target, body=data[offset:offset + chunk], headers=headers))
        return answers

    def test_a_resumable_upload_is_forwarded_untouched_and_recorded_chunk_by_chunk(self):
        proxy = self.start()
        data = bytes(range(256)) * 300 + b"\xff\xfe tail"  # not UTF-8: recorded in base64
        chunk = 30000
        with self.assertLogs("proxy_llm", "DEBUG") as logs:
            answers = self.upload(proxy, data, chunk, query="?key=" + self.GOOG_KEY)
            recs = proxy.records()
        # The upstream got the file whole, the key in the chunks' query (no api_key configured:
        # the client's credentials pass), and nothing reached the openai provider.
        [(name, got)] = self.uploads.files.items()
        self.assertEqual(got, data)
        self.assertTrue(self.upstream.requests.empty())
        seen = [self.gemini.next_request() for _ in answers]
        self.assertEqual(seen[0].target, "/upload/v1beta/files?key=" + self.GOOG_KEY)
        self.assertTrue(all(s.query.startswith("key=%s&upload_id=" % self.GOOG_KEY) for s in seen[1:]))
        # The upload URL reached the client with the proxy's origin (the upstream's before: the
        # chunks went past the proxy, unrecorded), its path and query as the upstream sent them
        # (the key in it is the client's own).
        self.assertEqual(header(answers[0][1], "X-Goog-Upload-URL"), proxy.url + seen[1].target)
        # The client got the protocol's headers and the final file as the upstream sent them.
        statuses = [a[0] for a in answers]
        self.assertEqual(statuses, [200] * len(answers))
        self.assertEqual([header(a[1], "X-Goog-Upload-Status") for a in answers],
                         ["active"] * (len(answers) - 1) + ["final"])
        self.assertEqual(header(answers[0][1], "X-Goog-Upload-Chunk-Granularity"), "8388608")
        final = json.loads(answers[-1][2])
        self.assertEqual((final["file"]["name"], final["file"]["sizeBytes"]), (name, str(len(data))))
        self.assertEqual(answers[-1][2][:3], b'{\n ')  # its own bytes, not re-serialised
        # One record per exchange, each with its id, each the gemini provider's.
        self.assertEqual(len(recs), len(answers))
        by_id = dict((r["id"], r) for r in recs)
        ordered = [by_id[header(a[1], "X-Proxy-Record-Id")] for a in answers]
        for rec in ordered:
            self.assertEqual((rec["provider"], rec["provider_type"], rec["endpoint"], rec["status_code"], rec["ended"]),
                             ("gemini", "gemini", "/upload/v1beta/files", 200, "completed"))
        self.assertEqual(ordered[0]["request_body"], {"file": {"display_name": "photo"}})
        chunks = [base64.b64decode(rec["request_body"]) for rec in ordered[1:]]
        self.assertEqual(b"".join(chunks), data)
        self.assertEqual([rec.get("body_encoding") for rec in ordered[1:]], [{"request": "base64"}] * len(chunks))
        self.assertEqual(ordered[-1]["response_body"], final)
        # The key was in the start's query, the upload URL the upstream answered with, and every
        # chunk's query: in no file and no log line.
        self.assertIn("[REDACTED", ordered[1]["query"])
        # The record says what the provider answered: the upstream's URL, not the client's.
        self.assertTrue(ordered[0]["response_headers"]["x-goog-upload-url"].startswith(
            self.gemini.url + "/upload/v1beta/files?key=[REDACTED"), ordered[0]["response_headers"])
        for path in support.all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(self.GOOG_KEY.encode(), f.read(), path)
        self.assertNotIn(self.GOOG_KEY, "\n".join(logs.output))
        self.assertTrue(any("/upload/v1beta/files" in line for line in logs.output))
        status, _, metrics = request(proxy.url, method="GET", path="/metrics", headers={})
        self.assertIn(b'endpoint="/upload/v1beta/files"', metrics)

    def test_only_a_url_under_the_providers_base_url_is_made_the_proxys(self):
        # The upstream answers with the URL the test asks for (X-Want), in X-Goog-Upload-URL or,
        # with X-Want-Location, in Location. The provider's base_url has a path: a URL under it
        # reaches the client on the proxy's origin, as the client addressed it (its Host),
        # without the base path; any other URL as the upstream sent it.
        def answer(req):
            name = "Location" if req.header("X-Want-Location") else "X-Goog-Upload-URL"
            return Reply(int(req.header("X-Want-Status") or 200), [(name, req.header("X-Want")), ("Content-Length", "0")])

        self.gemini.handler = answer
        proxy = self.start_proxy([provider("gemini", "gemini", self.gemini.url + "/gw")])
        base, port = self.gemini.url + "/gw", self.gemini.port
        here = "/upload/v1beta/files?upload_id=AHxI-1&upload_protocol=resumable"
        rewritten = [
            (base + here, proxy.url + here),
            (base + "/upload/v1alpha/files?upload_id=2", proxy.url + "/upload/v1alpha/files?upload_id=2"),
            (base + "/upload/v1beta/files", proxy.url + "/upload/v1beta/files"),
            (" %s " % (base + here), proxy.url + here),
        ]
        kept = [
            "http://127.0.0.1:%d/upload/v1beta/files?upload_id=3" % port,  # outside the base path
            "http://127.0.0.1:%d/gwx/upload/v1beta/files?upload_id=3" % port,
            "http://127.0.0.1:%d/gw/upload/v1beta/files?upload_id=3" % (port + 1 if port < 65535 else port - 1),
            "https://127.0.0.1:%d/gw/upload/v1beta/files?upload_id=3" % port,
            "http://localhost:%d/gw/upload/v1beta/files?upload_id=3" % port,  # another host name
            "http://user@127.0.0.1:%d/gw/upload/v1beta/files?upload_id=3" % port,
            base + "/elsewhere/files?upload_id=3",  # a path the proxy does not forward
            base + "/upload/v1beta/../files?upload_id=3",  # nor refuses to
            "https://upload.example.com/upload/v1beta/files?upload_id=3",
            "/upload/v1beta/files?upload_id=3", "not a url", "http://127.0.0.1:x/gw/upload/v1beta/files",
        ]
        for sent, expected in rewritten + [(url, url) for url in kept]:
            with self.subTest(url=sent):
                status, headers, _ = request(proxy.url, path="/upload/v1beta/files", body=b"",
                                             headers={"X-Want": sent, "x-goog-api-key": self.GOOG_KEY})
                self.assertEqual((status, header(headers, "X-Goog-Upload-URL")), (200, expected))
        # As the client addressed the proxy: its Host.
        _, headers, _ = request(proxy.url, path="/upload/v1beta/files", body=b"",
                                headers={"X-Want": base + here, "Host": "proxy.example:8080"})
        self.assertEqual(header(headers, "X-Goog-Upload-URL"), "http://proxy.example:8080" + here)
        # Location: on a 2xx (uploadType=resumable's start), not on a redirect.
        for status, expected in ((200, proxy.url + here), (201, proxy.url + here), (302, base + here)):
            _, headers, _ = request(proxy.url, path="/upload/v1beta/files?uploadType=resumable", body=b"",
                                    headers={"X-Want": base + here, "X-Want-Location": "1", "X-Want-Status": str(status)})
            self.assertEqual(header(headers, "Location"), expected, status)
        # Only the answers to an upload are looked at.
        _, headers, _ = request(proxy.url, path="/v1beta/files", body=b"", headers={"X-Want": base + here})
        self.assertEqual(header(headers, "X-Goog-Upload-URL"), base + here)
        # Each record keeps what the upstream answered.
        recs = proxy.records()
        self.assertEqual(len(recs), len(rewritten) + len(kept) + 5)
        self.assertEqual(recs[0]["response_headers"]["x-goog-upload-url"], base + here)
        self.assertEqual(recs[len(rewritten) + len(kept)]["response_headers"]["x-goog-upload-url"], base + here)

    def test_the_upload_url_is_on_the_origin_a_reverse_proxy_in_front_received(self):
        # Behind a reverse proxy that terminates TLS, the client reaches the proxy over https,
        # perhaps on another host: the forwarding fields it adds say so (Forwarded, RFC 7239,
        # else X-Forwarded-Proto / -Host), and the upload URL the client gets takes its scheme
        # and host from them (it was always http:// and the Host before). A value unfit for a
        # URL is ignored. The fields themselves reach the upstream untouched.
        proxy = self.start()
        here = "127.0.0.1:%d" % proxy.port
        cases = [
            ({"X-Forwarded-Proto": "https"}, "https://" + here),
            ({"X-Forwarded-Proto": "HTTPS , http", "X-Forwarded-Host": "llm.example.com, inner.local"},
             "https://llm.example.com"),
            ({"X-Forwarded-Host": "llm.example.com:8443"}, "http://llm.example.com:8443"),
            ({"Forwarded": 'for=192.0.2.60;proto=https;host="llm.example.com:8443", for=10.0.0.1;proto=http;host=inner'},
             "https://llm.example.com:8443"),
            ({"Forwarded": "proto=https; host=[2001:db8::1]:8443"}, "https://[2001:db8::1]:8443"),
            # Forwarded first, each of its parameters on its own.
            ({"Forwarded": "proto=https;host=a.example", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "b.example"},
             "https://a.example"),
            ({"Forwarded": "for=192.0.2.60;proto=https", "X-Forwarded-Host": "b.example"}, "https://b.example"),
            # Ignored: a scheme but http(s), a host with a path, userinfo, a blank, a control
            # character, a port past 65535, not ASCII; a Forwarded not well formed, or naming a
            # parameter twice (the X-Forwarded- fields are then read).
            ({"X-Forwarded-Proto": "ftp"}, "http://" + here),
            ({"X-Forwarded-Proto": "https:"}, "http://" + here),
            ({"X-Forwarded-Proto": "javascript"}, "http://" + here),
            ({"X-Forwarded-Host": "evil.example/path"}, "http://" + here),
            ({"X-Forwarded-Host": "user@evil.example"}, "http://" + here),
            ({"X-Forwarded-Host": "evil .example"}, "http://" + here),
            ({"X-Forwarded-Host": "evil.example\x01"}, "http://" + here),
            ({"X-Forwarded-Host": "evil.example\x1f"}, "http://" + here),
            ({"X-Forwarded-Host": "evil.example:99999"}, "http://" + here),
            ({"X-Forwarded-Host": "\xe9vil.example"}, "http://" + here),
            ({"X-Forwarded-Host": ""}, "http://" + here),
            ({"Forwarded": 'proto=https;host="evil.example/x"'}, "https://" + here),
            ({"Forwarded": "proto=https;host=evil.example/x"}, "http://" + here),  # (a bare / is not a token)
            ({"Forwarded": "proto=https;proto=http"}, "http://" + here),
            ({"Forwarded": "proto https", "X-Forwarded-Proto": "https"}, "https://" + here),
            ({"Forwarded": 'host="evil example"', "X-Forwarded-Host": "b.example"}, "http://b.example"),
        ]
        for fields, origin in cases:
            with self.subTest(fields=fields):
                headers = {"Content-Type": "application/json", "X-Goog-Upload-Protocol": "resumable",
                           "X-Goog-Upload-Command": "start", "x-goog-api-key": self.GOOG_KEY}
                headers.update(fields)
                status, got, _ = request(proxy.url, path="/upload/v1beta/files", body={"file": {}}, headers=headers)
                seen = self.gemini.next_request()
                self.assertEqual(status, 200)
                url = header(got, "X-Goog-Upload-URL")
                self.assertTrue(url.startswith(origin + "/upload/v1beta/files?upload_id="), url)
                for name, value in fields.items():
                    self.assertEqual(seen.header(name), value, name)
        # Each record keeps the URL the upstream answered with, and the fields as they came.
        recs = proxy.records()
        self.assertEqual(len(recs), len(cases))
        self.assertTrue(all(r["response_headers"]["x-goog-upload-url"].startswith(self.gemini.url) for r in recs))
        self.assertEqual(recs[0]["request_headers"]["x-forwarded-proto"], "https")

    def test_an_uploads_chunks_are_recorded_in_its_starts_session(self):
        # The chunks of an upload carry none of the client's headers (the Google Gen AI SDK
        # sends them with its upload headers only): their records were in the session
        # "default", the start's in the session it named. Each chunk's record now joins the
        # session of the upload it belongs to (its upload_id), with the same source, unless it
        # names a session of its own; an upload whose start named none stays in "default".
        proxy = self.start()
        data = os.urandom(5000)
        secret_session = "run-" + self.GOOG_KEY  # (a session id holding the start's key)
        uploads = [
            ({"X-Session-Id": "upload-run-a"}, {}, [("upload-run-a", "header")] * 4),
            ({"x-claude-code-session-id": "cc-b"}, {}, [("cc-b", "claude_code")] * 4),
            ({"X-Session-Id": "upload-run-c"}, {"X-Session-Id": "own-c"},
             [("upload-run-c", "header")] + [("own-c", "header")] * 3),
            ({}, {}, [("default", "default")] * 4),
            ({"X-Session-Id": secret_session}, {}, None),
        ]
        ids = []
        for start_headers, chunk_headers, _ in uploads:
            answers = self.upload(proxy, data, 2000, start_headers=start_headers, chunk_headers=chunk_headers)
            self.assertEqual([a[0] for a in answers], [200] * 4)
            ids.append([header(a[1], "X-Proxy-Record-Id") for a in answers])
        # Two uploads in flight at once: each chunk joins its own upload's start.
        starts = []
        for name in ("x", "y"):
            status, got, _ = request(proxy.url, path="/upload/v1beta/files", body={"file": {}}, headers={
                "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
                "x-goog-api-key": self.GOOG_KEY, "X-Session-Id": "both-" + name})
            starts.append(urllib.parse.urlsplit(header(got, "X-Goog-Upload-URL")))
        both = []
        for offset, url in ((0, starts[1]), (0, starts[0]), (100, starts[1])):
            _, got, _ = request("%s://%s" % (url.scheme, url.netloc), path=url.path + "?" + url.query,
                                body=os.urandom(100), headers={"X-Goog-Upload-Command": "upload",
                                                               "X-Goog-Upload-Offset": str(offset)})
            both.append(header(got, "X-Proxy-Record-Id"))
        by_id = dict((r["id"], r) for r in proxy.records())
        for (_, _, expected), upload_ids in zip(uploads, ids):
            got = [(by_id[i]["session_id"], by_id[i]["session_source"]) for i in upload_ids]
            if expected is None:  # the start's key scrubbed from every record's id, the same way
                self.assertEqual(set(got), {(got[0][0], "header")})
                self.assertTrue(got[0][0].startswith("run-[REDACTED:"), got[0][0])
            else:
                self.assertEqual(got, expected)
        self.assertEqual([by_id[i]["session_id"] for i in both], ["both-y", "both-x", "both-y"])
        for path in support.all_files(self.data_dir):
            self.assertNotIn(self.GOOG_KEY, path)
            with open(path, "rb") as f:
                self.assertNotIn(self.GOOG_KEY.encode(), f.read(), path)

    def test_a_provider_keys_echo_never_reaches_the_client(self):
        # With a provider's api_key the upstream gets that key (x-goog-api-key), never the
        # client's; an upstream that echoes it in the upload URL (as Google echoes a ?key=) has
        # it taken out of the URL the client gets. The chunks still go through the proxy, which
        # adds the provider's key to each.
        provider_key = "AIza" + "SyPr0v1derKeyN0tReal-abcdefghijklmnop"

        def echoing(req):
            answer = self.uploads(req)
            if req.header("X-Goog-Upload-Command") == "start":
                answer.headers = [(n, v.replace("?", "?key=%s&" % req.header("x-goog-api-key"), 1)
                                   if n == "X-Goog-Upload-URL" else v) for n, v in answer.headers]
            return answer

        self.gemini.handler = echoing
        proxy = self.start_proxy([provider("gemini", "gemini", self.gemini.url, provider_key)])
        data = os.urandom(5000)
        answers = self.upload(proxy, data, 2000)
        self.assertEqual([a[0] for a in answers], [200] * 4)
        self.assertEqual(list(self.uploads.files.values()), [data])
        url = header(answers[0][1], "X-Goog-Upload-URL")
        self.assertTrue(url.startswith(proxy.url + "/upload/v1beta/files?upload_id="), url)
        for status, headers, body in answers:
            self.assertNotIn(provider_key, repr(headers) + body.decode("latin-1"))
        seen = [self.gemini.next_request() for _ in answers]
        self.assertEqual([s.header("x-goog-api-key") for s in seen], [provider_key] * 4)
        self.assertTrue(all(s.query.startswith("upload_id=") for s in seen[1:]), [s.query for s in seen])
        # The record keeps the upstream's URL, the key scrubbed.
        recs = proxy.records()
        self.assertEqual(len(recs), 4)
        self.assertIn("key=[REDACTED", recs[0]["response_headers"]["x-goog-upload-url"])
        for path in support.all_files(self.data_dir):
            with open(path, "rb") as f:
                self.assertNotIn(provider_key.encode(), f.read(), path)

    def test_a_chunk_past_the_limits(self):
        # Past capture_max_body a chunk goes on whole and its record keeps a prefix, the size and
        # the SHA-256; past max_request_body it is refused, 413 in Gemini's shape, recorded.
        proxy = self.start(capture_max_body=1000, max_request_body=5000)
        data = os.urandom(4000)
        answers = self.upload(proxy, data, 4000)
        self.assertEqual(self.uploads.files and list(self.uploads.files.values()), [data])
        rec = [r for r in proxy.records() if r["id"] == header(answers[1][1], "X-Proxy-Record-Id")][0]
        self.assertEqual(rec["truncated"]["request"]["size"], 4000)
        self.assertEqual(len(base64.b64decode(rec["request_body"])), 1000)
        status, headers, body = self.upload(proxy, os.urandom(6000), 6000)[1]
        self.assertEqual((status, json.loads(body)["error"]["status"]), (413, "INVALID_ARGUMENT"))
        rec = [r for r in proxy.records() if r["id"] == header(headers, "X-Proxy-Record-Id")][0]
        self.assertEqual((rec["endpoint"], rec["status_code"], rec["ended"]), ("/upload/v1beta/files", 413, "refused"))

    def test_v1alpha_and_downloads_go_to_gemini(self):
        # v1alpha is v1beta's wire format; a download's answer is the file's bytes.
        body = {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}}
        self.gemini.handler = lambda req: (
            Reply(200, [("Content-Type", "application/octet-stream")], b"\x89PNG\r\n\x1a\n\x00")
            if req.path.startswith("/download/") else json_reply(body))
        proxy = self.start()
        paths = ["/v1alpha/models/gemini-2.5-flash:generateContent", "/v1alpha/models/gemini-2.5-flash:countTokens",
                 "/download/v1beta/files/abc123:download?alt=media", "/download/v1/files/abc123:download?alt=media"]
        for path in paths:
            method = "GET" if path.startswith("/download/") else "POST"
            status, _, _ = request(proxy.url, method=method, path=path, body=None if method == "GET" else {"contents": []},
                                   headers={"x-goog-api-key": self.GOOG_KEY})
            self.assertEqual(status, 200, path)
            self.assertEqual(self.gemini.next_request().target, path)
        self.assertTrue(self.upstream.requests.empty())
        recs = proxy.records()
        self.assertEqual([(r["provider"], r["dialect"], r["model"]) for r in recs],
                         [("gemini", "gemini", "gemini-2.5-flash"), ("gemini", "generic", "gemini-2.5-flash"),
                          ("gemini", "generic", None), ("gemini", "generic", None)])
        self.assertEqual(recs[0]["tokens_used"]["total_tokens"], 4)
        self.assertEqual(base64.b64decode(recs[2]["response_body"]), b"\x89PNG\r\n\x1a\n\x00")
        self.assertEqual(recs[2]["body_encoding"], {"response": "base64"})

    def test_with_proxy_keys_an_upload_url_carries_its_own_pass(self):
        # The Google Gen AI SDK sends the chunks with none of the client's headers (its key
        # included): with proxy_keys set, every chunk was the proxy's 401, and no file could be
        # uploaded. The URL the proxy hands out now carries a pass for that URL alone.
        proxy_key = "pk-upload-0123456789abcdef"
        proxy = self.start(proxy_keys=[proxy_key])
        data = bytes(range(256)) * 40
        answers = self.upload(proxy, data, 4000, start_headers={"X-Proxy-Key": proxy_key})
        self.assertEqual([a[0] for a in answers], [200] * 4)
        self.assertEqual(list(self.uploads.files.values()), [data])
        url = urllib.parse.urlsplit(header(answers[0][1], "X-Goog-Upload-URL"))
        query = url.query.split("&")
        self.assertTrue(query[-1].startswith(wire.UPLOAD_PASS + "="), url.query)
        seen = [self.gemini.next_request() for _ in answers]
        # The pass goes no further: the upstream gets its own URL's query, the record too.
        self.assertEqual([s.query for s in seen[1:]], ["&".join(query[:-1])] * 3)
        self.assertNotIn(wire.UPLOAD_PASS, json.dumps(proxy.records()))
        # Only for that URL, and only a good pass: anything else still needs a proxy key.
        other_id = "&".join(query[:-1]).replace("upload_id=", "upload_id=X")
        bad = (url.query[:-1] + ("0" if url.query[-1] != "0" else "1"), other_id + "&" + query[-1],
               url.query + "&" + query[-1], "&".join(query[:-1]))
        for q in bad:
            with self.subTest(query=q):
                status, _, body = request(proxy.url, path="%s?%s" % (url.path, q), body=b"x",
                                          headers={"X-Goog-Upload-Command": "query"})
                self.assertEqual(status, 401, body)
                self.assertEqual(json.loads(body)["error"]["status"], "UNAUTHENTICATED")
        status, _, _ = request(proxy.url, path="/v1beta/models/gemini-2.5-flash:generateContent?" + query[-1],
                               body={"contents": []})
        self.assertEqual(status, 401)  # (a pass lets in nothing but uploads)
        self.assertTrue(self.gemini.requests.empty())

    def test_other_paths_stay_the_proxys_404(self):
        proxy = self.start()
        for path in ("/upload/files", "/upload/v2/files", "/v1alphax/models/m:generateContent", "/download/files/a",
                     "/uploads/v1beta/files", "/v2/models"):
            with self.subTest(path=path):
                status, _, body = request(proxy.url, path=path, body={}, headers={"x-goog-api-key": self.GOOG_KEY})
                self.assertEqual(status, 404)
                self.assertIn("unknown path", json.loads(body)["error"]["message"])
        self.assertTrue(self.gemini.requests.empty() and self.upstream.requests.empty())
        self.assertEqual(proxy.records(), [])
        # With no gemini provider, an upload is the 404 of a family nobody serves, in its shape.
        proxy.stop()
        proxy = self.start_proxy([provider("openai", "openai", self.upstream.url)])
        status, _, body = request(proxy.url, path="/upload/v1beta/files", body={})
        self.assertEqual((status, json.loads(body)["error"]["status"]), (404, "NOT_FOUND"))
        self.assertTrue(self.upstream.requests.empty())


class FailureTest(ProxyTestCase):
    def test_unreachable_upstream_is_502_in_provider_shape_and_recorded(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead = "http://127.0.0.1:%d" % sock.getsockname()[1]
        sock.close()
        proxy = self.start_proxy([provider("openai", "openai", dead, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", dead, "", ["claude-*"])])
        status, headers, body = request(proxy.url, body=CHAT_BODY)
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["type"], "server_error")
        status, _, body = request(proxy.url, path="/v1/messages", body={"model": "claude-x"})
        self.assertEqual((status, json.loads(body)["error"]["type"]), (502, "api_error"))
        recs = proxy.records()
        self.assertEqual([r["ended"] for r in recs], ["upstream_error", "upstream_error"])
        self.assertEqual(recs[0]["id"], header(headers, "X-Proxy-Record-Id"))

    def test_upstream_that_never_answers_is_504(self):
        gate = threading.Event()
        self.addCleanup(gate.set)
        self.replies.append(Reply(200, [], b"{}", delay_headers=gate))
        proxy = self.start_proxy(response_header_timeout=0.2)
        status, _, body = request(proxy.url, body=CHAT_BODY)
        self.assertEqual(status, 504)
        [rec] = proxy.records()
        self.assertEqual(rec["ended"], "timeout")


    def test_a_small_body_cut_short_reaches_the_client_as_it_came(self):
        # 1,000 of 5,009 promised bytes, then the upstream closes. Directly, a client gets the
        # status, the headers and the 1,000 bytes; through the proxy it got a bare disconnect
        # (bodies up to 256 KB are read whole before the one write), and the record said 0 bytes.
        sent = (b'{"id":"x","choices":[{"message":{"content":"' + b"y" * 2000)[:1000]
        self.replies.append(Reply(200, [("Content-Type", "application/json"), ("Content-Length", "5009")], [sent],
                                  chunked=False, close_delimited=True))
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=CHAT_BODY,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader("Content-Length")), (200, "5009"))
        with self.assertRaises(http.client.IncompleteRead) as cm:
            resp.read()
        self.assertEqual(cm.exception.partial, sent)
        [rec] = proxy.records()
        self.assertEqual((rec["status_code"], rec["ended"], rec["response_bytes"]), (200, "upstream_error", 1000))
        self.assertEqual(rec["response_body"], sent.decode())


class ThreadLeakTest(ProxyTestCase):
    def test_stopping_the_proxy_leaves_no_thread_behind(self):
        from tests.support import wait_until

        before = set(threading.enumerate())
        proxy = self.start_proxy()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=CHAT_BODY)
            conn.getresponse().read()
        def leftover():
            return [t.name for t in threading.enumerate() if t not in before and t.name.startswith("proxy_llm")]

        running = set(leftover())
        self.assertLessEqual({"proxy_llm-writer", "proxy_llm-watchdog", "proxy_llm-conn"}, running)
        conn.close()
        proxy.stop()
        wait_until(lambda: not leftover(), what="proxy threads to end")
        self.assertEqual(leftover(), [])


class LocalEndpointsTest(ProxyTestCase):
    def test_health_and_metrics(self):
        proxy = self.start_proxy()
        request(proxy.url, body=CHAT_BODY)
        self.replies.append(sse_reply([chunk_event("Hi"), chunk_event("", "stop"), b"data: [DONE]\n\n"]))
        request(proxy.url, body={"model": "gpt-4o", "stream": True, "messages": []})
        proxy.flush()
        status, _, body = request(proxy.url, method="GET", path="/health", headers={})
        health = json.loads(body)
        self.assertEqual((status, health["status"]), (200, "ok"))
        self.assertEqual(health["records_written"], 2)
        self.assertEqual((health["record_queue_depth"], health["record_queue_bytes"]), (0, 0))
        status, headers, body = request(proxy.url, method="GET", path="/metrics", headers={})
        text = body.decode()
        self.assertIn('proxy_llm_requests_total{provider="openai",endpoint="/v1/chat/completions",status_class="2xx",model="gpt-*"} 2', text)
        # Time to first token: the stream only.
        self.assertIn('proxy_llm_time_to_first_token_seconds_count{provider="openai",endpoint="/v1/chat/completions"} 1', text)
        for name in ("proxy_llm_request_duration_seconds_bucket", "proxy_llm_inflight_requests", "proxy_llm_records_written_total 2",
                     "proxy_llm_records_dropped_total 0", "# TYPE proxy_llm_request_duration_seconds histogram",
                     'proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="prompt_tokens"} 9',
                     'proxy_llm_exchange_endings_total{ended="completed"} 2'):
            self.assertIn(name, text)
        self.assertNotIn('kind="total_tokens"', text)  # a sum of the other kinds, not a kind
        # A probe's query (a cache buster, Prometheus' params): the same pages, not a 404.
        status, _, body = request(proxy.url, method="GET", path="/health?probe=1", headers={})
        self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
        status, _, body = request(proxy.url, method="GET", path="/metrics?name[]=x", headers={})
        self.assertEqual(status, 200)
        self.assertIn(b"proxy_llm_records_written_total 2", body)
        self.assertEqual(len(proxy.records()), 2)  # (answered by the proxy: no records)


class FilesTest(ProxyTestCase):
    def test_file_layout_permissions_and_unsafe_session_ids(self):
        proxy = self.start_proxy()
        # Header values travel as bytes; http.client and http.server both map them with latin-1.
        sids = ["good-id_1.x", "../../etc/passwd", "a" * 100, "..", "日本".encode().decode("latin-1")]
        for sid in sids:
            request(proxy.url, body=CHAT_BODY, headers={"X-Session-Id": sid, "Content-Type": "application/json"})
        recs = proxy.records()
        self.assertEqual(sorted(r["session_id"] for r in recs), sorted(sids))
        names = sorted(os.listdir(self.data_dir))
        self.assertIn("session_good-id_1.x", names)
        for name in names:
            full = os.path.join(self.data_dir, name)
            if os.path.isdir(full):
                self.assertEqual(stat.S_IMODE(os.stat(full).st_mode), 0o700)
                self.assertRegex(name, r"^(session_[A-Za-z0-9._-]{1,64}|streams)$")
                for f in os.listdir(full):
                    self.assertEqual(stat.S_IMODE(os.stat(os.path.join(full, f)).st_mode), 0o600)
                    self.assertRegex(f, r"^session_[A-Za-z0-9._-]+_\d{8}_\d{6}\.jsonl$")
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)

    def test_a_new_start_never_appends_to_an_old_file(self):
        proxy = self.start_proxy()
        request(proxy.url, body=CHAT_BODY)
        proxy.flush()
        proxy.stop()  # idempotent: its cleanup runs again harmlessly
        proxy = self.start_proxy()
        request(proxy.url, body=CHAT_BODY)
        proxy.flush()
        files = os.listdir(os.path.join(self.data_dir, "session_gpt-4o"))
        self.assertEqual(len(files), 2)
        self.assertEqual(len(read_records(self.data_dir)), 2)


if __name__ == "__main__":
    unittest.main()
