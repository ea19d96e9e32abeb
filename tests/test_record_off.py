"""``record: false``: nothing written, and the metrics still read from the answers.

A proxy that records nothing still counts how each exchange ended and the tokens its answer
reports (``proxy_llm_tokens_total``), read off the request threads as a record's are. These
tests hold it to what recording on counts for the same answers: every golden fixture of every
dialect, streamed and not, through two proxies side by side.
"""
from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

from proxy_llm import notices
from proxy_llm.metrics import ProxyMetrics
from proxy_llm.notices import RateLimitedLog
from tests import sdk_replay
from tests.sdk_replay import HEADER, ReplayUpstream
from tests.support import (DEADLINE, InProcessProxy, ProxyTestCase, Reply, base_config, chunk_event, provider,
                           request, sse_reply)

# (path, model, the request's body) per dialect folder of tests/fixtures, by kind of answer.
_PATHS = {
    "openai_chat": "/v1/chat/completions",
    "openai_completions": "/v1/completions",
    "openai_embeddings": "/v1/embeddings",
    "openai_responses": "/v1/responses",
    "anthropic_messages": "/v1/messages",
    "anthropic_count_tokens": "/v1/messages/count_tokens",
}


def fixture_request(fx) -> tuple:
    """(path, body) of a request the fixture answers, as a client of its API sends it."""
    if fx.dialect == "gemini":
        method = "generateContent" if fx.kind == "json" else "streamGenerateContent"
        path = "/v1beta/models/gemini-2.0-flash:%s%s" % (method, "?alt=sse" if fx.kind == "sse" else "")
        return path, {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    model = "claude-x" if fx.dialect.startswith("anthropic") else "gpt-4o"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if fx.streamed:
        body["stream"] = True
    return _PATHS[fx.dialect], body


def counted(page: bytes) -> list:
    """The lines of a /metrics page that the answers' reading counts."""
    return sorted(line for line in page.decode().splitlines()
                  if line.startswith(("proxy_llm_tokens_total{", "proxy_llm_exchange_endings_total{")))


class GoldenCountsTest(unittest.TestCase):
    def test_record_off_counts_every_fixture_as_recording_on_does(self):
        patcher = mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL))
        patcher.start()  # (one of its own: no line left out for those of the tests before)
        self.addCleanup(patcher.stop)
        upstream = ReplayUpstream().start()
        self.addCleanup(upstream.stop)
        tmp = tempfile.mkdtemp(prefix="proxy_llm_test_")
        self.addCleanup(shutil.rmtree, tmp, True)
        providers = [provider("openai", "openai", upstream.url, "", ["gpt-*"]),
                     provider("anthropic", "anthropic", upstream.url, "", ["claude-*"]),
                     provider("gemini", "gemini", upstream.url, "", ["gemini-*"])]
        proxies = {}
        for record in (True, False):
            proxy = InProcessProxy(base_config(providers, os.path.join(tmp, "data_%s" % record),
                                               record=record)).__enter__()
            self.addCleanup(proxy.stop)
            proxies[record] = proxy
        # What the reading of a record: false exchange had kept: the answer only.
        kept = []
        count = proxies[False].server.tally.encode

        def spy(ex):
            kept.append((ex.request.chunks, ex.response.body() != b"" or ex.response.size == 0))
            return count(ex)

        proxies[False].server.tally.encode = spy
        fixtures = [fx for dialect in sorted(os.listdir(sdk_replay.FIXTURES)) if dialect != "generic"
                    for fx in sdk_replay.fixtures(dialect)]
        self.assertGreater(len(fixtures), 50)
        with self.assertLogs("proxy_llm.upstream", "WARNING") as logs:  # (the cut streams are told)
            for fx in fixtures:
                path, body = fixture_request(fx)
                answers = set()
                for proxy in proxies.values():
                    status, _, data = request(proxy.url, path=path, body=body, headers={
                        "Content-Type": "application/json", HEADER: fx.id})
                    answers.add((status, data))
                self.assertEqual(len(answers), 1, fx.id)  # (and neither proxy changed a byte: see test_proxy)
            for proxy in proxies.values():
                proxy.flush()
        told = sorted(line.split(" stream ended ")[1] for line in logs.output)
        # (The cut streams of each provider are told once, and those that ended on an error
        # event of their own once: 10 s between two lines of one kind.)
        self.assertEqual(told, ["with an error event (upstream_error)"] * 3
                         + ["without its terminal event (upstream_eof)"] * 3, logs.output)
        on, off = (counted(proxies[record].server.metrics.render()) for record in (True, False))
        self.assertEqual(off, on)
        tokens = [line for line in on if line.startswith("proxy_llm_tokens_total")]
        for provider_name in ("openai", "anthropic", "gemini"):
            self.assertTrue([line for line in tokens if 'provider="%s"' % provider_name in line], provider_name)
        ended = sum(float(line.rsplit(" ", 1)[1]) for line in off if line.startswith("proxy_llm_exchange_endings"))
        self.assertEqual(ended, len(fixtures))  # one count per exchange
        self.assertIn('ended="upstream_eof"', "\n".join(off))  # the cut streams' (the fixtures' incomplete ones)
        self.assertEqual(kept, [([], True)] * len(fixtures))
        self.assertFalse(os.path.exists(os.path.join(tmp, "data_False")))
        health = proxies[False].server.health()
        self.assertEqual((health["recording"], health["records_written"]), (False, 0))


class RecordOffTest(ProxyTestCase):
    def metrics(self, proxy) -> str:
        status, _, body = request(proxy.url, method="GET", path="/metrics", headers={})
        self.assertEqual(status, 200)
        return body.decode()

    def test_a_compressed_answer_is_read_and_passed_on_as_it_came(self):
        answer = json.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": {
            "prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}}).encode()
        packed = gzip.compress(answer)
        self.replies.append(Reply(200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], packed))
        proxy = self.start_proxy(record=False)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}',
                     headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader("Content-Encoding"), resp.read()), (200, "gzip", packed))
        proxy.flush()
        text = self.metrics(proxy)
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="prompt_tokens"} 12', text)
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="completion_tokens"} 4', text)
        self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 1', text)
        self.assertFalse(os.path.exists(self.data_dir))

    def test_a_count_below_zero_never_takes_a_counter_down(self):
        # A server that sends -1 for a count it does not know: that count is not in the
        # metrics (a Prometheus counter only goes up), the others are.
        answer = json.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": {
            "prompt_tokens": 12, "completion_tokens": -1, "total_tokens": -1}}).encode()
        for _ in range(2):
            self.replies.append(Reply(200, [("Content-Type", "application/json")], answer))
        proxy = self.start_proxy(record=False)
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
            self.addCleanup(conn.close)
            conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}',
                         headers={"Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().read(), answer)
        proxy.flush()
        text = self.metrics(proxy)
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="prompt_tokens"} 24', text)
        self.assertNotIn('kind="completion_tokens"', text)
        self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 2', text)
        # And the counter itself, whatever a dialect hands it:
        metrics = ProxyMetrics(*(lambda: 0,) * 5)
        metrics.recorded("completed", "openai", "gpt-*", {"prompt_tokens": 5, "completion_tokens": -3})
        metrics.recorded("completed", "openai", "gpt-*", {"prompt_tokens": -5, "completion_tokens": 2})
        page = metrics.render().decode()
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="prompt_tokens"} 5', page)
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="completion_tokens"} 2', page)

    def test_a_whole_stream_longer_than_capture_max_body_ended_as_it_came(self):
        # Its terminal event lay past the kept part: read from that part, the stream looked cut
        # (upstream_eof, and a WARNING "stream ended without its terminal event") though its
        # client got it whole; recording off counted every such stream "completed" before it
        # read the answers, and the records said upstream_eof.
        # Its usage, past the kept part too, is read from the stream's last part (Capture.tail).
        usage = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
                 b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n')
        events = [chunk_event("x" * 200) for _ in range(20)] + [chunk_event("", "stop"), usage, b"data: [DONE]\n\n"]
        patcher = mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL))
        patcher.start()
        self.addCleanup(patcher.stop)
        for record in (False, True):
            self.replies.append(sse_reply(events))
            proxy = self.start_proxy(data_dir=os.path.join(self.tmp, "data_%s" % record), record=record,
                                     capture_max_body=1000)
            with self.assertLogs("proxy_llm.upstream", "INFO") as logs:
                notices.log.info("(start)")  # (assertLogs wants one line at least)
                status, _, body = request(proxy.url, body={"model": "gpt-4o", "stream": True})
                proxy.flush()
            self.assertEqual((status, body), (200, b"".join(events)))
            self.assertEqual(logs.output, ["INFO:proxy_llm.upstream:(start)"])
            text = self.metrics(proxy)
            self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 1\n', text)
            self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="completion_tokens"} 2\n', text)
            if record:
                rec, = proxy.records()
                self.assertEqual(rec["tokens_used"], {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
                self.assertEqual((rec["ended"], "error" in rec, rec["truncated"]["response"]["kept"]),
                                 ("completed", False, 1000))
            proxy.stop()

    def test_its_lines_at_stop_say_what_was_left_out_in_its_own_words(self):
        # The recorder's lines, their noun changed: "writing 6 queued token counts before
        # closing the token count writer", and at ERROR "5 queued token counts were not written
        # at shutdown": nothing is written with record: false, and no record is lost.
        proxy = self.start_proxy(record=False)
        tally = proxy.server.tally
        tally.assist_above = 0  # (the request threads leave it all to its thread)
        count = tally.encode
        first = []

        def held(ex):  # the first answer holds its thread until close's deadline has passed
            if not first:
                first.append(ex)
                while not (tally._closed and tally._past_drain()):
                    time.sleep(0.005)
            return count(ex)

        tally.encode = held
        for _ in range(6):
            self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 200)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        with self.assertLogs("proxy_llm.storage", "INFO") as logs:
            tally.close(0.2)
        self.assertEqual(logs.output, [
            "INFO:proxy_llm.storage:reading 6 queued answers for the token metrics before stopping",
            "WARNING:proxy_llm.storage:5 queued answers were not counted in the token metrics at shutdown",
            "WARNING:proxy_llm.storage:answers left out of the token metrics in this run: shutdown 5"])
        text = self.metrics(proxy)
        self.assertIn("proxy_llm_token_counts_dropped_total 5\n", text)
        self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 1\n', text)

    def test_health_shows_the_answers_waiting_for_their_counts(self):
        proxy = self.start_proxy(record=False)
        tally = proxy.server.tally
        tally.assist_above = 0  # (the request threads leave it all to its thread)
        count = tally.encode
        reading, release = threading.Event(), threading.Event()

        def held(ex):  # the first answer holds the counting thread
            if not reading.is_set():
                reading.set()
                release.wait(DEADLINE)
            return count(ex)

        tally.encode = held
        self.addCleanup(release.set)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 200)
        self.assertTrue(reading.wait(DEADLINE))
        for _ in range(3):
            self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 200)
        self.assertTrue(proxy.server.wait_idle(DEADLINE))
        status, _, body = request(proxy.url, method="GET", path="/health", headers={})
        health = json.loads(body)
        self.assertEqual((status, health["status"], health["recording"]), (200, "ok", False))
        self.assertEqual(health["record_queue_depth"], 3)
        self.assertGreater(health["record_queue_bytes"], 0)  # (the answers, kept until read)
        # /metrics reads the same queue (its depth stayed 0 with recording off).
        text = self.metrics(proxy)
        self.assertIn("proxy_llm_record_queue_depth 3\n", text)
        self.assertIn("proxy_llm_record_queue_bytes %d\n" % health["record_queue_bytes"], text)
        release.set()
        proxy.flush()
        health = proxy.server.health()
        self.assertEqual((health["record_queue_depth"], health["record_queue_bytes"]), (0, 0))
        text = self.metrics(proxy)
        self.assertIn("proxy_llm_record_queue_depth 0\n", text)
        self.assertIn("proxy_llm_record_queue_bytes 0\n", text)
        self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 4\n', self.metrics(proxy))

    def test_an_exchange_the_counting_could_not_take_is_counted_as_left_out(self):
        self.replies.append(sse_reply([b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
                                       b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
                                       b"data: [DONE]\n\n"]))
        proxy = self.start_proxy(record=False)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o", "stream": True})[0], 200)
        proxy.flush()
        proxy.server.tally.close(DEADLINE)  # (as at shutdown: what comes after is not taken)
        self.assertEqual(request(proxy.url, body={"model": "gpt-4o"})[0], 200)
        # (The client has its answer before the handler hands the exchange on: wait for that.)
        self.assertTrue(proxy.server.wait_idle(DEADLINE), "exchanges still in flight")
        text = self.metrics(proxy)
        self.assertIn("proxy_llm_token_counts_dropped_total 1\n", text)
        status, _, body = request(proxy.url, method="GET", path="/health", headers={})
        health = json.loads(body)
        self.assertEqual((status, health["recording"], health["token_counts_dropped"]), (200, False, 1))
        self.assertEqual((health["records_written"], health["records_dropped"]), (0, 0))
        self.assertIn('proxy_llm_tokens_total{provider="openai",model="gpt-*",kind="prompt_tokens"} 3', text)
        self.assertIn('proxy_llm_exchange_endings_total{ended="completed"} 1', text)
        self.assertEqual(re.findall(r"proxy_llm_records_(?:written|dropped)_total (\d+)", text), ["0", "0"])


if __name__ == "__main__":
    unittest.main()
