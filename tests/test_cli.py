"""The real entry point, ``python -m proxy_llm``, as a subprocess."""

from __future__ import annotations

import http.client
import json
import os
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

from proxy_llm import cli
from tests.support import (DEADLINE, ROOT, FakeUpstream, ProxyProcess, base_config, provider, read_records, request,
                           sse_reply, wait_until)

CHAT = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def event(text: str, finish=None) -> bytes:
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}).encode() + b"\n\n"


def run(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy_llm"] + list(args), cwd=ROOT, env=full_env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)


class CommandLineTest(unittest.TestCase):
    def test_version_and_help(self):
        from proxy_llm import __version__

        out = run("--version")
        self.assertEqual(out.returncode, 0)
        self.assertEqual(out.stdout.decode().strip(), "proxy_llm " + __version__)
        out = run("--help")
        self.assertEqual(out.returncode, 0)
        for flag in ("--config", "--listen", "--data-dir", "--log-level", "--workers", "--version"):
            self.assertIn(flag, out.stdout.decode())

    def test_bad_config_exits_2_with_one_line(self):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write('{"providers": [{"name": "x", "type": "openai", "base_url": "not a url"}]}')
        self.addCleanup(os.unlink, f.name)
        out = run("--config", f.name)
        self.assertEqual(out.returncode, 2)
        lines = out.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("providers[0].base_url: not a URL", lines[0])
        self.assertNotIn("Traceback", out.stderr.decode())
        out = run("--config", os.path.join(tempfile.gettempdir(), "no-such-proxy-llm-config.json"))
        self.assertEqual(out.returncode, 2)
        self.assertIn("no such config file", out.stderr.decode())
        for argv in (["--config", ""], ["stats", "--config", ""], ["--data-dir", ""], ["verify", "--data-dir", ""]):
            with self.subTest(argv=argv):  # not the default, quietly
                out = run(*argv)
                self.assertEqual((out.returncode, out.stderr.decode().strip()),
                                 (2, "proxy_llm: %s: an empty path" % argv[-2]))
        missing = os.path.join(tempfile.gettempdir(), "no-such-proxy-llm-config.json")
        out = run("stats", env={"PROXY_LLM_CONFIG": missing})  # (it read ./data, quietly: an audit's finding)
        self.assertEqual((out.returncode, out.stderr.decode().strip()), (2, "proxy_llm: %s: no such config file" % missing))
        out = run("--workers", "0")  # the flag names its key: not "--workers: workers: ..."
        self.assertEqual((out.returncode, out.stderr.decode().strip()), (2, "proxy_llm: --workers: must be at least 1"))

    def test_subcommands_take_the_data_dir_variable_without_a_config_file(self):
        # With a config file, $PROXY_LLM_DATA_DIR overrode its data_dir for stats, export and
        # verify, as it does for serving; with none (a shell with the proxy's environment, in
        # another directory), they read ./data and stopped: "./data: not a directory".
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        data, cwd = os.path.join(tmp, "records"), os.path.join(tmp, "cwd")
        os.makedirs(os.path.join(data, "session_s"))
        os.mkdir(cwd)
        line = {"schema_version": 1, "id": "01JD0000000000000000000000", "timestamp": "2026-12-07T00:00:00Z",
                "session_id": "s", "session_source": "header", "provider": "openai", "provider_type": "openai",
                "dialect": "generic", "endpoint": "/v1/models", "method": "GET", "query": "", "model": None,
                "stream": False, "status_code": 200, "ended": "completed", "duration": 1.0, "request_bytes": 0,
                "response_bytes": 2, "request_headers": {}, "response_headers": {}, "request_body": None,
                "response_body": {}}
        with open(os.path.join(data, "session_s", "session_s_20261207_000000.jsonl"), "w") as f:
            f.write(json.dumps(line) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("PROXY_LLM_CONFIG", "PROXY_LLM_DATA_DIR")}
        env.update(PYTHONPATH=ROOT, PROXY_LLM_DATA_DIR=data)
        for argv, told in ((["stats"], b"%s: 1 files, 1 records" % data.encode()), (["verify"], b"1 records"),
                           (["export", "--format", "records"], b'"01JD0000000000000000000000"')):
            with self.subTest(argv=argv):
                out = subprocess.run([sys.executable, "-m", "proxy_llm"] + argv, cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
                self.assertEqual(out.returncode, 0, out.stderr)
                self.assertIn(told, out.stdout)

    def test_a_data_dir_or_a_port_that_cannot_be_used_is_one_line(self):
        # Each was a traceback: a file in the data dir's way ("cannot listen", exit 1, blaming
        # the port), and a taken port (AttributeError from server_close after the failed bind).
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        blocker = os.path.join(tmp, "file")
        open(blocker, "w").close()
        out = run("--data-dir", os.path.join(blocker, "data"), "--listen", "127.0.0.1:0")
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertEqual(out.stderr.decode().strip().splitlines(),
                         ["proxy_llm: --data-dir: cannot use %s: Not a directory" % os.path.join(blocker, "data")])
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        out = run("--data-dir", tmp, "--listen", "127.0.0.1:%d" % taken.getsockname()[1])
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertNotIn("Traceback", out.stderr.decode())
        self.assertIn("cannot listen on 127.0.0.1:%d" % taken.getsockname()[1], out.stderr.decode())

    def test_a_data_dir_that_cannot_be_used_names_where_it_came_from(self):
        # "data_dir: cannot use ..." named no origin, where every other config error does: the
        # file and the key, the variable and the key, or the flag (see config._fail).
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        open(os.path.join(tmp, "file"), "w").close()
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump({"listen": "127.0.0.1:0", "data_dir": "file/data",
                       "providers": [{"name": "o", "type": "openai", "base_url": "http://127.0.0.1:9"}]}, f)
        blocked = os.path.join(tmp, "file", "data")
        for workers in ("1", "2"):
            with self.subTest(workers=workers):
                out = run("--config", path, "--workers", workers)
                self.assertEqual((out.returncode, out.stderr.decode()),
                                 (2, "proxy_llm: %s: data_dir: cannot use %s: Not a directory\n" % (path, blocked)))
                out = run("--config", path, "--workers", workers, env={"PROXY_LLM_DATA_DIR": blocked + "2"})
                self.assertEqual((out.returncode, out.stderr.decode()),
                                 (2, "proxy_llm: $PROXY_LLM_DATA_DIR: data_dir: cannot use %s2: Not a directory\n"
                                  % blocked))
                out = run("--config", path, "--workers", workers, "--data-dir", blocked + "3",
                          env={"PROXY_LLM_DATA_DIR": blocked + "2"})
                self.assertEqual((out.returncode, out.stderr.decode()),
                                 (2, "proxy_llm: --data-dir: cannot use %s3: Not a directory\n" % blocked))

    def test_workers_that_cannot_start_are_one_line_too(self):
        # A data dir that cannot be used was said by every worker, and the parent exited 1
        # (after one "exited before shutdown" line per worker), where one process exits 2.
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        blocker = os.path.join(tmp, "file")
        open(blocker, "w").close()
        out = run("--data-dir", os.path.join(blocker, "data"), "--listen", "127.0.0.1:0", "--workers", "3")
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertEqual(out.stderr.decode().strip().splitlines(),
                         ["proxy_llm: --data-dir: cannot use %s: Not a directory" % os.path.join(blocker, "data")])
        # A port another --workers proxy serves on (its sockets have SO_REUSEPORT, as this one's
        # do): the workers joined its group and the two proxies shared the connections, unsaid.
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        out = run("--data-dir", tmp, "--listen", "127.0.0.1:%d" % taken.getsockname()[1], "--workers", "2")
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertNotIn("Traceback", out.stderr.decode())
        self.assertIn("cannot listen on 127.0.0.1:%d" % taken.getsockname()[1], out.stderr.decode())

    def test_shipped_config_serves_on_a_fresh_machine(self):
        tmp = tempfile.mkdtemp()
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env["PYTHONPATH"] = ROOT
        proc = subprocess.Popen([sys.executable, "-m", "proxy_llm", "--listen", "127.0.0.1:0", "--data-dir", tmp],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            line = proc.stderr.readline().decode()
            self.assertIn("listening on http://127.0.0.1:", line)
            port = int(line.split("listening on http://127.0.0.1:")[1].split()[0])
            status, _, body = request("http://127.0.0.1:%d" % port, method="GET", path="/health", headers={})
            self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(DEADLINE), 0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


class FingerprintKeyTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="proxy_llm_key_")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, cli.KEY_FILE)

    def test_made_once_whole_and_private(self):
        key = cli.fingerprint_key(self.dir)
        self.assertEqual(len(key), cli.KEY_SIZE)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(cli.fingerprint_key(self.dir), key)
        self.assertEqual(os.listdir(self.dir), [cli.KEY_FILE])  # no temporary file left

    def test_a_key_file_of_an_earlier_run_is_kept(self):
        for old in (b"k" * 32, b"k" * 48):
            with open(self.path, "wb") as f:
                f.write(old)
            self.assertEqual(cli.fingerprint_key(self.dir), old)

    def test_a_damaged_key_file_is_replaced_and_said_so(self):
        # An empty file (a crash between creating and writing it) was used as the key: every
        # fingerprint an HMAC with an empty key.
        for damaged in (b"", b"short", b"k" * 31):
            with self.subTest(size=len(damaged)):
                with open(self.path, "wb") as f:
                    f.write(damaged)
                with self.assertLogs("proxy_llm", "WARNING") as logs:
                    key = cli.fingerprint_key(self.dir)
                self.assertEqual(len(key), cli.KEY_SIZE)
                self.assertIn("damaged", logs.output[0])
                with open(self.path, "rb") as f:
                    self.assertEqual(f.read(), key)
                self.assertEqual(os.listdir(self.dir), [cli.KEY_FILE])

    def test_processes_starting_together_agree_on_one_key(self):
        # Workers read the file while another was still writing it: an empty or a cut key.
        for round_ in range(20):
            d = os.path.join(self.dir, "r%d" % round_)
            os.mkdir(d)
            gate = threading.Barrier(6)
            keys = []

            def make():
                gate.wait(DEADLINE)
                keys.append(cli.fingerprint_key(d))

            threads = [threading.Thread(target=make) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE)
            self.assertEqual(len(keys), 6)
            self.assertEqual(set(len(k) for k in keys), {cli.KEY_SIZE})
            self.assertEqual(len(set(keys)), 1, "round %d" % round_)


class GcTuningTest(unittest.TestCase):
    def test_startup_objects_frozen_and_full_collections_rarer(self):
        import gc

        from proxy_llm import server

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        server.tune_gc()
        self.assertGreater(gc.get_freeze_count(), 1000)  # at least what the imports made
        self.assertEqual(gc.get_threshold(), (before[0], before[1], server.FULL_GC_EVERY))
        self.assertGreater(server.FULL_GC_EVERY, before[2])


class ServeProcessTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.data_dir = os.path.join(self.tmp, "data")
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)
        self.upstream = FakeUpstream(lambda req: sse_reply([event("one"), self.gate, event("two", "stop"), b"data: [DONE]\n\n"]))
        self.upstream.start()
        self.addCleanup(self.upstream.stop)

    def start(self, **extra):
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir, **extra)
        proc = ProxyProcess(cfg, args=["--log-level", "INFO"], workers=extra.get("workers", 1))
        self.addCleanup(proc.cleanup)
        return proc

    def test_sigterm_during_an_open_stream_lets_it_finish_and_records_it(self):
        proc = self.start()
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", body=CHAT, headers={"X-Session-Id": "sigterm"})
        resp = conn.getresponse()
        self.assertEqual(resp.read1(65536), event("one"))
        proc.send_signal(signal.SIGTERM)
        proc.wait_for_line("shutting down: 1 exchanges in flight")
        self.gate.set()
        self.assertEqual(resp.read(), event("two", "stop") + b"data: [DONE]\n\n")
        conn.close()
        self.assertEqual(proc.stop(), 0)
        [rec] = read_records(self.data_dir)
        self.assertEqual(rec["session_id"], "sigterm")
        self.assertEqual(rec["ended"], "completed")
        self.assertEqual(rec["response_body"]["choices"][0]["message"]["content"], "onetwo")

    def test_ctrl_c_to_the_process_group_of_workers_still_drains(self):
        # A terminal's Ctrl-C signals the parent and every worker; the parent forwards its own
        # too. Each worker took the two as "a second signal: cut at once".
        proc = self.start(workers=2, shutdown_timeout=DEADLINE)
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", body=CHAT, headers={"X-Session-Id": "ctrl-c"})
        resp = conn.getresponse()
        self.assertEqual(resp.read1(65536), event("one"))
        os.killpg(proc.proc.pid, signal.SIGINT)
        proc.wait_for_line("shutting down: 1 exchanges in flight")
        self.gate.set()
        self.assertEqual(resp.read(), event("two", "stop") + b"data: [DONE]\n\n")
        self.assertEqual(proc.proc.wait(DEADLINE), 0)
        [rec] = read_records(self.data_dir)
        self.assertEqual((rec["session_id"], rec["ended"]), ("ctrl-c", "completed"))

    def test_workers_stop_when_their_parent_is_killed(self):
        # They served on, orphaned, holding the port, with nobody left to stop them.
        self.gate.set()
        proc = self.start(workers=2)
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(DEADLINE)
        for _ in range(2):
            proc.wait_for_line(r"\bstopped\b")
        proc._reader.join(DEADLINE)  # every worker closed its end of the output pipe: all exited
        self.assertFalse(proc._reader.is_alive())

    def test_a_worker_killed_while_serving_is_replaced(self):
        # The parent said so and served on with one worker fewer for the rest of its run.
        self.gate.set()
        proc = self.start(workers=2)
        pids = set()
        deadline = time.monotonic() + DEADLINE
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(json.loads(request(proc.url, method="GET", path="/health", headers={})[2])["pid"])
        self.assertEqual(len(pids), 2)
        for _ in range(4):
            self.assertEqual(request(proc.url, body=CHAT, headers={"X-Session-Id": "kill"})[0], 200)
        written = {}  # pid -> records written, as its /health says

        def all_written():
            health = json.loads(request(proc.url, method="GET", path="/health", headers={})[2])
            written[health["pid"]] = health["records_written"]
            return len(written) == 2 and sum(written.values()) == 4

        wait_until(all_written, what="the four records written")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        proc.wait_for_line(r"worker [01] exited \(-9\) before shutdown; starting a new worker [01]")
        wait_until(lambda: sum("listening on" in line for line in proc.output) == 3, what="the new worker")
        seen = set()
        deadline = time.monotonic() + DEADLINE
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(json.loads(request(proc.url, method="GET", path="/health", headers={})[2])["pid"])
        self.assertEqual(len(seen), 2, "two workers serve again")
        self.assertNotIn(victim, seen)
        for _ in range(4):
            self.assertEqual(request(proc.url, body=CHAT, headers={"X-Session-Id": "kill"})[0], 200)
        self.assertEqual(proc.stop(), 1, "a worker was lost: not a clean run")
        proc._reader.join(DEADLINE)  # every worker closed its end of the output pipe: all exited
        self.assertFalse(proc._reader.is_alive())
        records = read_records(self.data_dir)  # what the killed worker wrote is intact
        self.assertEqual([r["ended"] for r in records], ["completed"] * 8)
        self.assertEqual(len(set(r["id"] for r in records)), 8)

    # Stand-ins for serve() in a real serve_workers: a worker waits for its stop (from the
    # parent's pipe or a signal) for at most 10 s, and says whether it came.
    WAIT_FOR_STOP = textwrap.dedent("""
        import sys, time
        from proxy_llm import cli
        def wait_for_stop(worker, parent_pipe):
            stops = cli._Stops(parent_pipe)
            deadline = time.monotonic() + 10
            while not stops.count() and time.monotonic() < deadline:
                time.sleep(0.01)
            sys.stderr.write("worker %d told to stop: %s\\n" % (worker, bool(stops.count())))
            return 0
    """)

    def run_stand_in(self, script):
        """Run ``script`` (after WAIT_FOR_STOP) with a config file as its argument: (the
        finished process, its stderr)."""
        cfg = os.path.join(self.tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump(base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir), f)
        out = subprocess.run([sys.executable, "-c", self.WAIT_FOR_STOP + script, cfg], env=dict(os.environ, PYTHONPATH=ROOT),
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
        return out, out.stderr.decode()

    def test_a_worker_that_cannot_start_stops_the_others(self):
        # The parent said so and went on with the others: a proxy at part strength that looked
        # started. (A worker is made to fail by a stand-in for serve().)
        script = textwrap.dedent("""
            import sys, time
            from proxy_llm import cli
            def serve(config, worker=0, reuse_port=False, parent_pipe=None, on_ready=None, **_):
                if worker == 1:
                    return 2
                if on_ready is not None:
                    on_ready()
                return wait_for_stop(worker, parent_pipe)
            cli.serve = serve
            sys.exit(cli.serve_workers(cli.load(sys.argv[1], overrides={"workers": 3})))
        """)
        out, err = self.run_stand_in(script)
        self.assertEqual(out.returncode, 2, err)
        self.assertIn("worker 1 exited (2) before it could serve; stopping the other workers", err)
        self.assertEqual(err.count("told to stop: True"), 2, err)

    def test_workers_share_one_key_even_when_it_cannot_be_stored(self):
        # The parent's key was thrown away: when the data dir could not store it (a full disk)
        # each worker made its own, and one client's credential had a fingerprint per worker.
        self.gate.set()
        script = textwrap.dedent("""
            import errno, sys
            from proxy_llm import cli
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            cli._store_key = full
            sys.exit(cli.main(sys.argv[1:]))
        """)
        cfg = base_config([provider("openai", "openai", self.upstream.url, "", ["gpt-*"])], self.data_dir)
        proc = ProxyProcess(cfg, args=["--workers", "2", "--log-level", "INFO"], workers=2, launcher=("-c", script))
        self.addCleanup(proc.cleanup)
        workers = set()  # that recorded a request (asked on its connection)
        deadline = time.monotonic() + DEADLINE
        while len(workers) < 2 and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE)
            conn.request("GET", "/health")
            workers.add(json.loads(conn.getresponse().read())["worker"])
            conn.request("POST", "/v1/chat/completions", body=CHAT, headers={"Authorization": "Bearer sk-client-0123456789"})
            self.assertEqual(conn.getresponse().read()[-14:], b"data: [DONE]\n\n")
            conn.close()
        self.assertEqual(workers, {0, 1})
        self.assertEqual(proc.stop(), 0)
        self.assertEqual(proc.log_text().count("cannot store the fingerprint key"), 1, "said once, by the parent")
        records = read_records(self.data_dir)
        self.assertEqual(len(set(r["request_headers"]["authorization"] for r in records)), 1)

    def test_a_stop_just_before_a_worker_is_replaced_reaches_the_new_one(self):
        # A SIGTERM after the parent saw a worker die, and before it started the new one, was
        # passed on to the workers it had: the new one was never told, and the parent waited
        # for it for ever. (Stand-ins for serve() and for the moment of the signal.)
        script = textwrap.dedent("""
            import os, signal, sys, time
            from proxy_llm import cli
            blocks = []
            real_mask = signal.pthread_sigmask
            def mask(how, sigs):
                if how == signal.SIG_BLOCK:
                    blocks.append(1)
                    if len(blocks) == 3:  # the parent is about to start worker 1 again
                        os.kill(os.getpid(), signal.SIGTERM)
                return real_mask(how, sigs)
            signal.pthread_sigmask = mask
            def serve(config, worker=0, reuse_port=False, parent_pipe=None, on_ready=None, **_):
                on_ready()
                if worker == 1 and len(blocks) == 2:
                    return 1  # dies while serving: replaced
                return wait_for_stop(worker, parent_pipe)
            cli.serve = serve
            sys.exit(cli.serve_workers(cli.load(sys.argv[1], overrides={"workers": 2})))
        """)
        out, err = self.run_stand_in(script)
        self.assertIn("worker 1 exited (1) before shutdown; starting a new worker 1", err)
        self.assertEqual(err.count("told to stop: True"), 2, err)
        self.assertEqual(out.returncode, 1, err)  # (each stand-in says False after 10 s untold)

    # Stand-ins whose worker 1 dies while serving in its first ``deaths`` lives (every life, if
    # None), each life's start written to the file "lives" next to the config; worker 0 serves.
    KEEPS_DYING = textwrap.dedent("""
        import os, signal, sys, time
        from proxy_llm import cli
        LIVES = os.path.join(os.path.dirname(sys.argv[1]), "lives")
        def serve(config, worker=0, reuse_port=False, parent_pipe=None, on_ready=None, **_):
            on_ready()
            if worker == 0:
                return wait_for_stop(worker, parent_pipe)
            with open(LIVES, "a+") as f:
                f.write("%r %d\\n" % (time.monotonic(), os.getpid()))
                f.seek(0)
                life = len(f.readlines())
            if DEATHS is not None and life > DEATHS or life > 12:  # (12: a run without a limit ends)
                if DEATHS is None or STOP_WHEN_HEALTHY:
                    os.kill(os.getppid(), signal.SIGTERM)
                return wait_for_stop(worker, parent_pipe)
            return 1
        cli.serve = serve
    """)

    def lives(self):
        """The start time of each life of the stand-ins' worker 1."""
        with open(os.path.join(self.tmp, "lives")) as f:
            return [float(line.split()[0]) for line in f]

    def run_dying(self, deaths, backoff, stop_when_healthy=True, extra=""):
        script = self.KEEPS_DYING + textwrap.dedent("""
            DEATHS, STOP_WHEN_HEALTHY = %r, %r
            cli.RESTART_BACKOFF = %r
        """ % (deaths, stop_when_healthy, backoff)) + textwrap.dedent(extra) + textwrap.dedent("""
            sys.exit(cli.serve_workers(cli.load(sys.argv[1], overrides={"workers": 2})))
        """)
        return self.run_stand_in(script)

    def test_a_worker_that_keeps_dying_while_serving_stops_the_proxy(self):
        # It was replaced at once, for ever, a fork and a start per crash.
        out, err = self.run_dying(None, 0.05)
        self.assertEqual(out.returncode, 1, err)
        self.assertIn("giving up", err)
        self.assertIn("worker 1 exited (1) while serving %d times within %d s; giving up: stopping the other workers"
                      % (cli.RESTART_LIMIT, cli.RESTART_WINDOW), err)
        self.assertEqual(err.count("told to stop: True"), 1, err)  # worker 0, drained
        lives = self.lives()
        self.assertEqual(len(lives), cli.RESTART_LIMIT, err)
        gaps = [b - a for a, b in zip(lives, lives[1:])]  # the first replacement at once, then 0.05, 0.1, 0.2 s
        for i, gap in enumerate(gaps[1:]):
            self.assertGreaterEqual(gap, 0.05 * 2 ** i, gaps)

    def test_a_worker_that_dies_and_then_serves_is_replaced_after_a_backoff(self):
        out, err = self.run_dying(2, 0.5)
        self.assertIn("worker 1 exited (1) before shutdown; starting a new worker 1\n", err)
        self.assertIn("worker 1 exited (1) before shutdown; starting a new worker 1 in 0.5 s\n", err)
        self.assertNotIn("giving up", err)
        self.assertEqual(err.count("told to stop: True"), 2, err)  # worker 0, and worker 1's third life
        self.assertEqual(out.returncode, 1, err)  # a worker was lost: not a clean run
        lives = self.lives()
        self.assertEqual(len(lives), 3)
        self.assertGreaterEqual(lives[2] - lives[1], 0.5)

    def test_a_replacement_that_dies_before_it_listens_is_replaced_too(self):
        # Killed again while it imported (the OOM killer): it went down the first start's
        # branch, "before it could serve", and the whole proxy stopped (an audit's finding).
        extra = """
            def serve1(config, worker=0, reuse_port=False, parent_pipe=None, on_ready=None, **_):
                if worker == 0:
                    on_ready()
                    return wait_for_stop(worker, parent_pipe)
                with open(LIVES, "a+") as f:
                    f.write("%r %d\\n" % (time.monotonic(), os.getpid()))
                    f.seek(0)
                    life = len(f.readlines())
                if life == 2:
                    return 1  # the replacement, before it listens
                on_ready()
                if life == 1:
                    return 1  # dies while serving
                os.kill(os.getppid(), signal.SIGTERM)
                return wait_for_stop(worker, parent_pipe)
            cli.serve = serve1
        """
        out, err = self.run_dying(None, 0.05, extra=extra)
        self.assertNotIn("before it could serve", err)
        self.assertIn("worker 1 exited (1) before shutdown; starting a new worker 1 in 0.05 s\n", err)
        self.assertEqual(len(self.lives()), 3, err)
        self.assertEqual(err.count("told to stop: True"), 2, err)  # worker 0, and worker 1's third life

    def test_a_stop_during_a_backoff_ends_the_run_without_the_replacement(self):
        # Worker 0 stops the parent once worker 1's second life is gone, its replacement due
        # in 60 s, past the run's deadline: the stop must not wait for it.
        extra = """
            def serve0(config, worker=0, reuse_port=False, parent_pipe=None, on_ready=None, **_):
                if worker == 1:
                    return serve(config, worker, reuse_port, parent_pipe, on_ready)
                on_ready()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        with open(LIVES) as f:
                            pids = [int(line.split()[1]) for line in f]
                    except FileNotFoundError:
                        pids = []
                    if len(pids) >= 2 and not os.path.exists("/proc/%d" % pids[1]):  # (reaped)
                        os.kill(os.getppid(), signal.SIGTERM)
                        break
                    time.sleep(0.01)
                return wait_for_stop(worker, parent_pipe)
            cli.serve = serve0
        """
        out, err = self.run_dying(2, 60.0, stop_when_healthy=False, extra=extra)
        self.assertIn("starting a new worker 1 in 60 s", err)
        self.assertEqual(err.count("told to stop: True"), 1, err)
        self.assertEqual(len(self.lives()), 2)
        self.assertEqual(out.returncode, 1, err)

    def test_restart_backoff_and_limit_within_the_window(self):
        restarts = cli._Restarts()
        delays = [restarts.delay(1, 100.0 + i) for i in range(cli.RESTART_LIMIT)]
        self.assertEqual(delays, [0.0] + [cli.RESTART_BACKOFF * 2 ** i for i in range(cli.RESTART_LIMIT - 2)] + [None])
        self.assertEqual(restarts.delay(0, 104.0), 0.0, "each worker number on its own")
        later = 104.0 + cli.RESTART_WINDOW
        self.assertEqual(restarts.delay(1, later), 0.0, "deaths past the window forgotten")

    def test_stop_counts_a_signal_and_the_parents_byte_as_one(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        os.set_blocking(read_end, False)
        stops = cli._Stops(read_end)
        stop, hurry = cli._StopView(stops, 1), cli._StopView(stops, 2)
        self.assertFalse(stop.is_set())
        stops.received.append(signal.SIGINT)  # the terminal's Ctrl-C reached the worker...
        os.write(write_end, b"x")             # ...and the parent, which passes it on
        self.assertTrue(stop.is_set())
        self.assertFalse(hurry.is_set())
        os.write(write_end, b"x")             # a second Ctrl-C, which the parent passes on
        self.assertTrue(hurry.is_set())
        lone = cli._Stops()
        lone.received += [signal.SIGTERM, signal.SIGTERM]
        self.assertEqual(lone.count(), 2)

    def test_sighups_are_one_stop_and_never_the_second(self):
        # A closing terminal sends SIGHUP twice (the shell's, then the kernel's): counted as
        # two, they cut every exchange in flight instead of draining.
        hup, term = signal.SIGHUP, signal.SIGTERM
        # A SIGTERM after a SIGHUP is the second (an ssh session dropped, then the operator's
        # kill: it was not, an audit's finding); a SIGHUP after another signal is never one.
        for signums, count in (([], 0), ([hup], 1), ([hup, hup], 1), ([hup, term], 2), ([hup, hup, term], 2),
                               ([term, hup], 1), ([term, hup, term], 2), ([term, term], 2)):
            self.assertEqual(cli.stop_count(signums), count, signums)

    def test_a_parent_gone_is_one_stop(self):
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        stops = cli._Stops(read_end)
        self.assertEqual(stops.count(), 0)
        os.close(write_end)
        self.assertEqual((stops.count(), stops.count()), (1, 1))
        self.assertIsNone(stops.pipe)

    def test_two_workers_share_the_port_and_write_their_own_files(self):
        self.gate.set()
        proc = self.start(workers=2)
        self.assertEqual(proc.ports[0], proc.ports[1])
        pids = set()
        for _ in range(40):
            status, _, body = request(proc.url, method="GET", path="/health", headers={})
            pids.add(json.loads(body)["pid"])
            if len(pids) == 2:
                break
        self.assertEqual(len(pids), 2, "both workers answer on the shared port")
        for _ in range(10):
            status, _, _ = request(proc.url, body=CHAT, headers={"Authorization": "Bearer sk-client-0123456789"})
            self.assertEqual(status, 200)
        self.assertEqual(proc.stop(), 0)
        records = read_records(self.data_dir)
        self.assertEqual(len(records), 10)
        names = os.listdir(os.path.join(self.data_dir, "session_gpt-4o"))
        self.assertTrue(all(n.endswith(("_w0.jsonl", "_w1.jsonl")) for n in names), names)
        # One fingerprint key for both (the parent makes it before the workers start).
        self.assertEqual(len(set(r["request_headers"]["authorization"] for r in records)), 1)
        with open(os.path.join(self.data_dir, cli.KEY_FILE), "rb") as f:
            self.assertEqual(len(f.read()), cli.KEY_SIZE)

    def test_workers_spread_connections_and_stop_promptly(self):
        # Many keep-alive connections at once reach both workers, and none of the workers is
        # left waiting (in accept() or on a connection) past SIGTERM.
        self.gate.set()
        proc = self.start(workers=2)
        conns = [http.client.HTTPConnection("127.0.0.1", proc.port, timeout=DEADLINE) for _ in range(16)]
        pids = []
        for conn in conns:  # 16 keep-alive connections, all open at once
            conn.request("GET", "/health")
            health = json.loads(conn.getresponse().read())
            pids.append(health["pid"])
            # /metrics says which worker answered too (nothing did: counters of two processes,
            # one per scrape, under one name), the same one as /health on that connection.
            conn.request("GET", "/metrics")
            self.assertIn('\nproxy_llm_worker_info{worker="%d",pid="%d"} 1\n' % (health["worker"], health["pid"]),
                          conn.getresponse().read().decode())
        self.assertEqual(len(set(pids)), 2, "one worker took every connection")
        for _ in range(5):  # and a few more, one at a time
            request(proc.url, method="GET", path="/health", headers={})
        for conn in conns:
            conn.close()
        started = time.monotonic()
        self.assertEqual(proc.stop(timeout=DEADLINE), 0)
        self.assertLess(time.monotonic() - started, 10.0, "a worker waited in accept() through shutdown")


if __name__ == "__main__":
    unittest.main()
