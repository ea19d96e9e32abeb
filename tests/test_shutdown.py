"""SIGTERM with 100 open streams, against the real entry point as a subprocess.

Within ``shutdown_timeout`` the streams finish and are recorded as completed; past it they are cut
and recorded as ``shutdown``; a second signal cuts them at once. The exit code is 0 every time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

from proxy_llm import reader
from tests import support
from tests.support import (ROOT, read_until, read_to_eof, DEADLINE, FakeUpstream, InProcessProxy, ProxyProcess, Reply,
                           base_config, provider, read_records, request, wait_until)

STREAMS = 100
LAST_CHUNK = b"\r\n0\r\n\r\n"


def event(text: str, finish=None) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
           "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"






class StreamingUpstreamCase(unittest.TestCase):
    """A temp data dir, and an upstream whose streams hold after their first event until
    ``release`` is set (``reply``: its answer to a request)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_shutdown_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.release = threading.Event()
        self.addCleanup(self.release.set)
        self.upstream = FakeUpstream(self.reply)
        self.upstream.server.handle_error = lambda request, address: None  # cut connections are the point
        self.upstream.start()
        self.addCleanup(self.upstream.stop)

    def reply(self, req) -> Reply:
        return Reply(200, [("Content-Type", "text/event-stream")],
                     [event("start "), self.release, event("end"), event("", "stop"), b"data: [DONE]\n\n"])


class ShutdownTest(StreamingUpstreamCase):

    def start(self, **extra) -> ProxyProcess:
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir, **extra)
        proc = ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        return proc

    def open_streams(self, proc: ProxyProcess):
        body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
        socks = []
        for n in range(STREAMS):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=DEADLINE)
            self.addCleanup(sock.close)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Session-Id: s%d\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (n, len(body), body))
            socks.append(sock)
        return [(sock, read_until(sock, b"start")) for sock in socks]  # every stream is open and relaying

    def records(self):
        stats = reader.ReadStats()
        recs = list(reader.iter_records(self.data_dir, stats))
        self.assertTrue(stats.ok, stats.summary())
        return recs

    def assert_refuses_connections(self, port: int) -> None:
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
                return False
            except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as it closed
                return True
        wait_until(refused, what="the listening socket to close")

    def test_open_streams_finish_within_shutdown_timeout_and_are_recorded(self):
        proc = self.start(shutdown_timeout=DEADLINE)
        opened = self.open_streams(proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_line(r"shutting down: %d exchanges in flight" % STREAMS)
        self.assert_refuses_connections(proc.port)  # draining: no new connections
        self.release.set()
        for sock, data in opened:
            data = read_until(sock, LAST_CHUNK, data)
            self.assertIn(b"[DONE]", data)
        self.assertEqual(proc.stop(timeout=DEADLINE), 0)
        recs = self.records()
        self.assertEqual(len(recs), STREAMS)
        self.assertEqual({r["ended"] for r in recs}, {"completed"})
        self.assertEqual({r["response_body"]["choices"][0]["message"]["content"] for r in recs}, {"start end"})
        self.assertEqual(len({r["session_id"] for r in recs}), STREAMS)

    def test_streams_past_shutdown_timeout_are_cut_and_recorded_as_shutdown(self):
        proc = self.start(shutdown_timeout=0.5)
        opened = self.open_streams(proc)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for sock, data in opened:
            data = read_to_eof(sock, data)
            self.assertNotIn(LAST_CHUNK, data)  # the client sees a cut stream, not a complete one
        self.assertEqual(proc.stop(timeout=DEADLINE), 0)
        self.assertLess(time.monotonic() - started, 0.5 + 8.0)
        recs = self.records()
        self.assertEqual(len(recs), STREAMS)
        self.assertEqual({r["ended"] for r in recs}, {"shutdown"})
        self.assertEqual({r["response_body"]["choices"][0]["message"]["content"] for r in recs}, {"start "})
        self.assertIn("cut %d exchanges" % STREAMS, proc.log_text())

    def test_a_second_signal_exits_at_once_after_a_best_effort_flush(self):
        proc = self.start(shutdown_timeout=600)
        opened = self.open_streams(proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_line(r"shutting down")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.stop(timeout=DEADLINE), 0)
        self.assertLess(time.monotonic() - started, 5.0)
        for sock, data in opened:
            self.assertNotIn(LAST_CHUNK, read_to_eof(sock, data))
        recs = self.records()
        self.assertEqual(len(recs), STREAMS)
        self.assertEqual({r["ended"] for r in recs}, {"shutdown"})


    def test_a_second_signal_while_the_recorder_closes_cuts_its_drain_short(self):
        # The recorder's close deadline (30 s) was fixed when the close began: a second signal
        # that came while the writer drained a backlog did not shorten it, and the proxy went on
        # writing for up to 30 s. Now what is left is about 2 s, and every record not written is
        # counted as dropped at shutdown. (A stand-in for a slow writer: each record takes 0.2 s
        # to encode, so that the requests leave a backlog of most of them.)
        self.release.set()
        script = textwrap.dedent("""
            import sys, time
            from proxy_llm import cli, storage
            real_start = storage.Recorder.start
            def start(self):
                encode = self.encode
                def slow(item):
                    time.sleep(0.2)
                    return encode(item)
                self.encode = slow
                real_start(self)
            storage.Recorder.start = start
            sys.exit(cli.main(sys.argv[1:]))
        """)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir,
                          fsync="always")
        proc = ProxyProcess(cfg, launcher=("-c", script))
        self.addCleanup(proc.cleanup)
        sent = 60
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        for _ in range(sent):
            conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","stream":true,"messages":[]}')
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            resp.read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        backlog = int(proc.wait_for_line(r"writing \d+ queued records before closing").split("writing ")[1].split()[0])
        self.assertGreater(backlog, 20)  # (at 0.2 s each, more than 4 s of writing left)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.proc.wait(DEADLINE), 0)
        self.assertLess(time.monotonic() - started, 2.0 + 2.0)
        proc.stop()
        text = proc.log_text()
        self.assertIn("stopping the recorder within 2 s", text)
        written = self.records()  # whole lines only (no torn line: records() checks)
        self.assertLess(len(written), sent)
        dropped = int(re.search(r"records dropped in this run: shutdown (\d+)\n", text).group(1))
        self.assertEqual(len(written) + dropped, sent)
        self.assertIn("%d queued records were not written at shutdown" % dropped, text)

    def test_exchanges_waiting_on_their_clients_are_cut_and_recorded(self):
        # Cutting the upstreams did not unblock a handler reading a body that stopped coming or
        # writing to a client that stopped reading: the process exited without their records.
        big = b"data: " + json.dumps({"pad": "y" * 60000}).encode() + b"\n\n"
        upstream = FakeUpstream(lambda req: Reply(200, [("Content-Type", "text/event-stream")], [big] * 300)
                                if b'"big"' in req.body else Reply(200, [("Content-Type", "application/json")],
                                                                   b'{"id":"x","choices":[]}'))
        upstream.server.handle_error = lambda request, address: None
        upstream.start()
        self.addCleanup(upstream.stop)
        cfg = base_config([provider("openai", "openai", upstream.url, "", ["gpt-*"])], self.data_dir,
                          shutdown_timeout=2.0, client_idle_timeout=600)
        proc = ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        body = b'{"model":"gpt-4o","messages":[],"pad":"' + b"z" * 100 + b'"}'
        mid = socket.create_connection(("127.0.0.1", proc.port), timeout=DEADLINE)
        self.addCleanup(mid.close)
        mid.sendall(head % len(body) + body[:40])  # and no more
        slow = socket.socket()
        self.addCleanup(slow.close)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(DEADLINE)
        slow.connect(("127.0.0.1", proc.port))
        big_body = b'{"model":"gpt-4o","stream":true,"big":1}'
        slow.sendall(head % len(big_body) + big_body)  # and never reads
        kept = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        self.addCleanup(kept.close)
        kept.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}')
        self.assertEqual(kept.getresponse().read(), b'{"id":"x","choices":[]}')
        wait_until(lambda: json.loads(request(proc.url, "GET", "/health")[2])["inflight"] == 2,
                   what="two exchanges in flight")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_line(r"shutting down: 2 exchanges in flight")
        # Draining: a request on a kept connection is refused, and recorded.
        kept.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}')
        resp = kept.getresponse()
        self.assertEqual((resp.status, resp.getheader("Retry-After")), (503, "1"))
        resp.read()
        self.assertEqual(proc.proc.wait(DEADLINE), 0)  # (no second signal: past shutdown_timeout)
        self.assertGreater(time.monotonic() - started, 2.0)
        recs = self.records()
        self.assertEqual(len(recs), 4, [(r["ended"], r["status_code"]) for r in recs])
        by_end = sorted((r["ended"], r["status_code"], r["request_bytes"]) for r in recs)
        self.assertEqual(by_end, sorted([("completed", 200, 32), ("refused", 503, 0), ("shutdown", 503, 40),
                                         ("shutdown", 200, len(big_body))]))
        self.assertIn("cut 2 exchanges", proc.log_text())

    def test_no_request_is_answered_once_the_recorder_closes(self):
        # The drain ended, the recorder closed (for up to 30 s with a backlog), and meanwhile a
        # request on a kept-alive connection was still answered 503, with a record id, and its
        # record dropped ("closed"). Now it is not answered: its connection closes. (A stand-in
        # for a slow close holds it open until the test says.)
        self.release.set()
        go = os.path.join(self.tmp, "go")
        script = textwrap.dedent("""
            import os, sys, time
            from proxy_llm import cli, storage
            real_close = storage.Recorder.close
            def close(self, *args, **kwargs):
                sys.stderr.write("closing the recorder\\n")
                sys.stderr.flush()
                deadline = time.monotonic() + 20
                while not os.path.exists(os.environ["GO_FILE"]) and time.monotonic() < deadline:
                    time.sleep(0.01)
                return real_close(self, *args, **kwargs)
            storage.Recorder.close = close
            sys.exit(cli.main(sys.argv[1:]))
        """)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir)
        proc = ProxyProcess(cfg, launcher=("-c", script), env={"GO_FILE": go})
        self.addCleanup(proc.cleanup)
        kept = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        self.addCleanup(kept.close)
        answered = []  # the record ids the client was given

        def ask() -> None:
            kept.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","stream":true,"messages":[]}')
            resp = kept.getresponse()
            resp.read()
            answered.append(resp.getheader("X-Proxy-Record-Id"))

        ask()
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_line("closing the recorder")
        with self.assertRaises(http.client.RemoteDisconnected):
            ask()
        open(go, "w").close()
        self.assertEqual(proc.proc.wait(DEADLINE), 0)
        self.assertEqual(sorted(r["id"] for r in self.records()), sorted(answered))
        self.assertNotIn("records dropped", proc.log_text())

    def test_a_signal_during_start_up_stops_the_proxy_in_order(self):
        # The handlers were installed once the server and its recorder had started: a SIGTERM
        # before killed the process (exit -15) with the writer and the compressor at work, and
        # a SIGINT raised KeyboardInterrupt through the start. (A stand-in for the moment: the
        # signal comes as the recorder starts.)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig):
                script = textwrap.dedent("""
                    import os, sys
                    from proxy_llm import cli, storage
                    real_start = storage.Recorder.start
                    def start(self):
                        os.kill(os.getpid(), %d)
                        real_start(self)
                    storage.Recorder.start = start
                    sys.exit(cli.main(sys.argv[1:]))
                """ % sig)
                path = os.path.join(self.tmp, "config.json")
                with open(path, "w") as f:
                    json.dump(base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])],
                                          self.data_dir, compress_rotated=True), f)
                out = subprocess.run([sys.executable, "-c", script, "--config", path],
                                     env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
                                     capture_output=True, timeout=DEADLINE)
                err = out.stderr.decode()
                self.assertEqual(out.returncode, 0, err)
                self.assertIn("shutting down: 0 exchanges in flight", err)
                self.assertIn("stopped", err)

    def test_regression_signals_back_to_back_never_hang_shutdown(self):
        # The handler used to call Event.set(); a signal arriving while the handler ran re-entered
        # it and deadlocked on the Event's lock (about 1 run in 6 on Python 3.8).
        for _ in range(8):
            proc = self.start(shutdown_timeout=600)
            proc.send_signal(signal.SIGTERM)
            proc.wait_for_line(r"shutting down")
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
                proc.proc.send_signal(sig)
            self.assertEqual(proc.proc.wait(DEADLINE), 0)
            proc.cleanup()

class AcceptTest(support.ProxyTestCase):
    def test_an_accept_with_no_connection_waiting_does_not_hold_the_loop(self):
        # serve_forever accepts once poll says a connection waits; if it is gone by then, a
        # blocking accept waited for the next client, and shutdown() (a stop, SIGTERM) with it:
        # seen as a hung test run, its upstream's accept blocked on an empty queue. Here the
        # loop's one accept runs with no connection waiting at all.
        from proxy_llm import server as server_mod

        proxy = self.start_proxy([support.provider("openai", "openai", self.upstream.url)])
        for srv in (proxy.server, self.upstream.server):
            with self.subTest(server=type(srv).__name__):
                done = threading.Event()

                def accept_once():
                    srv._handle_request_noblock()
                    done.set()
                worker = threading.Thread(target=accept_once, daemon=True)
                worker.start()
                returned = done.wait(server_mod.ACCEPT_WAIT * 4 + 1)
                if not returned:  # (let the blocked accept go, and the serving loop's, before failing)
                    for _ in range(2):
                        socket.create_connection(srv.server_address[:2]).close()
                self.assertTrue(returned, "accept blocked with no connection waiting")

class RefusalCutTest(unittest.TestCase):
    """In-process: the shutdown's own steps, each at a moment the test picks."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_refusal_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.upstream = FakeUpstream().start()
        self.addCleanup(self.upstream.stop)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])],
                          os.path.join(self.tmp, "data"))
        self.proxy = InProcessProxy(cfg).__enter__()
        self.addCleanup(self.proxy.stop)

    def test_a_refusal_whose_answer_the_shutdown_cuts_is_recorded_as_shutdown(self):
        # A request on a kept-alive connection while the proxy drains is answered 503. When a
        # second signal's cut let go of its client in the middle of that answer, its record said
        # client_aborted: it came after the cut of the exchanges in flight, so it was not marked
        # cancelled, and the client had done nothing.
        server = self.proxy.server
        client = socket.socket()
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(DEADLINE)
        client.connect(("127.0.0.1", self.proxy.port))
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        read_until(client, b'"connections"')  # answered: its handler waits for the next request
        wait_until(lambda: len(server.clients) == 1, what="the connection watched")
        [clock] = list(server.clients)
        server.draining.set()  # (the first signal)
        # A client that reads nothing: the proxy's side of the connection is filled to the brim
        # (its send buffer fixed, else the kernel grows it), so that the 503 waits in its write.
        # Full when a send is refused and no room comes back: the client's window is shut.
        clock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:
            try:
                clock.sock.send(b"\0" * 1024, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not select.select([], [clock.sock], [], 0.2)[1]:
                    break
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        wait_until(lambda: len(server.inflight) == 1 and clock.due, what="the refusal waiting in its write")
        server.cut_waiting_clients()  # what the shutdown repeats after a second signal's cut
        self.proxy.flush()
        [rec] = read_records(self.proxy.data_dir)
        self.assertEqual((rec["status_code"], rec["ended"], rec["error"]["type"]),
                         (503, "shutdown", "proxy_unavailable"))


class UnfinishedTest(unittest.TestCase):
    """An exchange whose handler has not ended when the shutdown's last wait runs out (still
    connecting to an upstream: no cut reaches a connect) is recorded by the shutdown, once."""

    BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'

    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="proxy_llm_unfinished_")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.data_dir = os.path.join(tmp, "data")
        # An upstream whose accept queue is full: a connect to it waits (its SYN unanswered).
        self.listener = listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.settimeout(DEADLINE)
        filler = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
        self.addCleanup(filler.close)
        self.url = "http://127.0.0.1:%d" % listener.getsockname()[1]

    def send(self, port: int) -> socket.socket:
        """A client that sends the request (it waits on the upstream's connect)."""
        client = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.addCleanup(client.close)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(self.BODY), self.BODY))
        return client

    def test_an_exchange_still_connecting_at_the_stop_is_recorded_as_shutdown(self):
        data_dir = self.data_dir
        cfg = base_config([provider("openai", "openai", self.url, "", ["gpt-*"])], data_dir,
                          connect_timeout=600, shutdown_timeout=0.5)
        proc = ProxyProcess(cfg)
        self.addCleanup(proc.cleanup)
        self.send(proc.port)
        body = self.BODY

        def connecting() -> bool:
            status, _, answer = request(proc.url, "GET", "/health")
            return json.loads(answer)["inflight"] == 1
        wait_until(connecting, what="the exchange waiting on its connect")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.stop(timeout=DEADLINE), 0)
        [rec] = read_records(data_dir)
        self.assertEqual((rec["status_code"], rec["ended"], rec["error"]["type"]), (None, "shutdown", "shutdown"))
        self.assertEqual(rec["request_body"], json.loads(body))
        self.assertIn("recorded 1 exchanges whose handlers did not end in time", proc.log_text())

    def test_an_exchange_the_shutdown_recorded_is_not_sent_once_its_connect_ends(self):
        # In-process, the shutdown's steps at moments the test picks. The exchange recorded by
        # the shutdown (status null, shutdown) while its handler connected: when the connect
        # then ended (the upstream took it before the exit, the recorder still closing), the
        # handler sent the request on, an upstream call after the stop, and relayed the answer
        # to a client whose record said it got none.
        data_dir, listener, body = self.data_dir, self.listener, self.BODY
        proxy = InProcessProxy(base_config([provider("openai", "openai", self.url, "", ["gpt-*"])], data_dir,
                                           connect_timeout=600)).__enter__()
        self.addCleanup(proxy.stop)
        server = proxy.server
        client = self.send(proxy.port)
        wait_until(lambda: len(server.inflight) == 1, what="the exchange in flight")
        server.draining.set()
        server.cancel_inflight()
        server.stop_taking()
        from proxy_llm.handler import record_unfinished
        self.assertEqual(record_unfinished(server), 1)
        self.assertTrue(server.recorder.flush(DEADLINE))
        # The upstream takes the connection now (the SYN the full queue dropped comes again).
        held, _ = listener.accept()
        held.close()
        upstream, _ = listener.accept()
        self.addCleanup(upstream.close)
        upstream.settimeout(DEADLINE)
        self.assertEqual(upstream.recv(65536), b"", "the request went upstream after the shutdown recorded it")
        upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")  # (had it gone)
        self.assertEqual(read_to_eof(client), b"")  # answered nothing, as its record says
        wait_until(lambda: not server.inflight, what="the handler's end")
        proxy.stop()
        [rec] = read_records(data_dir)
        self.assertEqual((rec["status_code"], rec["ended"]), (None, "shutdown"))
        self.assertEqual(rec["request_body"], json.loads(body))


class HangupTest(StreamingUpstreamCase):
    """SIGHUP (a terminal closing, an ssh session dropping) stops the proxy as SIGTERM does; its
    default action killed it with no drain: the stream in flight and the records still queued
    were never written. Under ``nohup`` (SIGHUP ignored at start) it is ignored, as before."""

    QUICK = 20  # exchanges completed just before the signal: their records may still be queued

    def reply(self, req) -> Reply:
        if b'"stream":true' in req.body:
            return super().reply(req)
        return Reply(200, [("Content-Type", "application/json")], b'{"id":"q","object":"chat.completion","choices":[]}')

    def start(self, workers: int = 1, sighup=signal.SIG_DFL) -> ProxyProcess:
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir,
                          shutdown_timeout=DEADLINE)
        proc = ProxyProcess(cfg, args=["--workers", str(workers)], workers=workers, sighup=sighup)
        self.addCleanup(proc.cleanup)
        return proc

    def open_stream(self, proc: ProxyProcess):
        body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=DEADLINE)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Session-Id: slow\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return sock, read_until(sock, b"start")

    def quick_exchanges(self, proc: ProxyProcess) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        try:
            for _ in range(self.QUICK):
                conn.request("POST", "/v1/chat/completions", body=b'{"model":"gpt-4o","messages":[]}',
                             headers={"X-Session-Id": "quick"})
                resp = conn.getresponse()
                self.assertEqual(resp.status, 200)
                resp.read()
        finally:
            conn.close()

    def hang_up_and_drain(self, proc: ProxyProcess, hang_up) -> None:
        """``hang_up()`` twice, as a closing terminal does (the shell passes its SIGHUP on to its
        jobs, then the kernel signals the foreground group as the shell exits): one request to
        stop, not a second signal that cuts what is in flight."""
        sock, data = self.open_stream(proc)
        self.quick_exchanges(proc)
        hang_up()
        proc.wait_for_line(r"shutting down: 1 exchanges in flight")
        hang_up()  # (after the first was taken: two at once would be one pending signal)
        # A second stop would cut the stream within the main loop's 0.1 s: it is kept ten times
        # as long before its end is released.
        self.assertEqual(select.select([sock], [], [], 1.0)[0], [], "the stream was cut")
        self.release.set()
        self.assertIn(b"[DONE]", read_until(sock, LAST_CHUNK, data))  # drained, not cut
        self.assertEqual(proc.proc.wait(DEADLINE), 0)
        recs = read_records(self.data_dir)
        self.assertEqual(sorted((r["session_id"], r["ended"]) for r in recs),
                         [("quick", "completed")] * self.QUICK + [("slow", "completed")])
        self.assertEqual(len({r["id"] for r in recs}), self.QUICK + 1)
        [slow] = [r for r in recs if r["session_id"] == "slow"]
        self.assertEqual(slow["response_body"]["choices"][0]["message"]["content"], "start end")

    def test_sighup_drains_and_records_every_exchange(self):
        proc = self.start()
        self.hang_up_and_drain(proc, lambda: proc.send_signal(signal.SIGHUP))
        self.assertIn("stopped", proc.log_text())

    def test_sighup_to_the_process_group_of_workers_drains(self):
        proc = self.start(workers=2)

        # The terminal's process group: the parent and every worker.
        self.hang_up_and_drain(proc, lambda: os.killpg(proc.proc.pid, signal.SIGHUP))
        proc._reader.join(DEADLINE)  # every worker closed its end of the output pipe: all exited
        self.assertEqual(proc.log_text().count("stopped"), 2)

    def test_under_nohup_sighup_is_ignored(self):
        # nohup starts the proxy with SIGHUP ignored, so that it outlives its terminal: it must
        # keep serving, one process and --workers alike. A SIGHUP taken would start the drain
        # within the main loop's 0.1 s; the proxy is watched serving for ten times that.
        for workers in (1, 2):
            with self.subTest(workers=workers):
                self.data_dir = os.path.join(self.tmp, "data%d" % workers)
                proc = self.start(workers=workers, sighup=signal.SIG_IGN)
                os.killpg(proc.proc.pid, signal.SIGHUP)
                watched_until = time.monotonic() + 1.0
                while time.monotonic() < watched_until:
                    status, _, body = request(proc.url, "GET", "/health", headers={})
                    self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
                self.assertEqual(request(proc.url, body=b'{"model":"gpt-4o","messages":[]}')[0], 200)
                self.assertNotIn("shutting down", proc.log_text())
                self.assertEqual(proc.stop(signal.SIGTERM), 0)
                self.assertEqual(proc.log_text().count("shutting down: "), workers)  # on SIGTERM
                self.assertEqual([r["ended"] for r in read_records(self.data_dir)], ["completed"])


if __name__ == "__main__":
    unittest.main()
