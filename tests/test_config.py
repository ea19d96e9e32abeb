"""Configuration: defaults -> file -> $VAR -> env -> flags -> validate, with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import unittest

from proxy_llm import config
from proxy_llm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(obj) -> str:
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return path


OPENAI = {"name": "openai", "type": "openai", "base_url": "https://api.openai.com", "api_key": "$OPENAI_API_KEY",
          "models": ["gpt-*"]}


class ExpansionTest(unittest.TestCase):
    def test_forms(self):
        env = {"A": "1", "EMPTY": ""}
        self.assertEqual(config.expand("$A-${A}-$$A", env, "k"), "1-1-$A")
        self.assertEqual(config.expand("${MISSING:-dflt}", env, "k"), "dflt")
        self.assertEqual(config.expand("${MISSING:-}", env, "k"), "")
        self.assertEqual(config.expand("${EMPTY:-x}", env, "k"), "x")
        self.assertEqual(config.expand("no vars", env, "k"), "no vars")
        self.assertEqual(config.expand("$${A}", env, "k"), "${A}")  # the way to write ${ itself
        for other in ("${A-x}", "${A:=x}", "${1}", "${", "x${A:-${A}}"):
            with self.subTest(value=other), self.assertRaises(ConfigError):
                config.expand(other, env, "k")

    def test_unset_variable_names_the_key(self):
        path = write({"providers": [OPENAI]})
        self.addCleanup(os.unlink, path)
        with self.assertRaises(ConfigError) as cm:
            config.load(path, env={})
        msg = str(cm.exception)
        self.assertIn(path, msg)
        self.assertIn("providers[0].api_key", msg)
        self.assertIn("$OPENAI_API_KEY is not set", msg)

    def test_expansion_happens_after_parsing(self):
        # A value holding quotes or backslashes cannot break the JSON it is expanded into.
        path = write({"providers": [OPENAI]})
        self.addCleanup(os.unlink, path)
        cfg = config.load(path, env={"OPENAI_API_KEY": 'sk-"quoted"\\'})
        self.assertEqual(cfg.providers[0].api_key, 'sk-"quoted"\\')


class LoadTest(unittest.TestCase):
    def test_shipped_config_loads_with_no_keys_set(self):
        cfg = config.load(os.path.join(ROOT, "config.json"), env={})
        self.assertEqual(cfg.listen, "127.0.0.1:8080")
        self.assertEqual([p.name for p in cfg.providers], ["openai", "anthropic", "gemini"])
        self.assertTrue(all(p.api_key == "" for p in cfg.providers))
        self.assertEqual(cfg.data_dir, os.path.join(ROOT, "data"))
        # OpenAI's embedding models, not Gemini's text-embedding-004: the glob text-embedding-*
        # sent its embedContent calls to OpenAI (an audit's finding).
        from proxy_llm.handler import first_match
        self.assertEqual(first_match(cfg.providers, "text-embedding-3-small", False)[0].name, "openai")
        self.assertEqual(first_match(cfg.providers, "text-embedding-ada-002", False)[0].name, "openai")
        self.assertEqual(first_match(cfg.providers, "text-embedding-004", False)[0], None)

    def test_precedence_file_env_flags(self):
        path = write({"listen": "127.0.0.1:1111", "log_level": "debug", "providers": [OPENAI]})
        self.addCleanup(os.unlink, path)
        env = {"OPENAI_API_KEY": "k", "PROXY_LLM_LISTEN": "127.0.0.1:2222"}
        cfg = config.load(path, env=env)
        self.assertEqual((cfg.listen, cfg.log_level), ("127.0.0.1:2222", "DEBUG"))
        cfg = config.load(path, env=env, overrides={"listen": "127.0.0.1:3333", "log_level": None})
        self.assertEqual(cfg.listen, "127.0.0.1:3333")

    def test_bad_configs_name_file_and_key(self):
        cases = [
            ('{"providers": [', "line 1 column"),
            ({"providers": [OPENAI], "lisen": "x"}, "lisen: unknown key"),
            ({"providers": []}, "providers: at least one provider"),
            ({}, "providers: at least one provider"),
            ({"providers": [dict(OPENAI, base_url="ftp://x")]}, "providers[0].base_url: not a URL"),
            ({"providers": [dict(OPENAI, type="cohere")]}, "providers[0].type: must be one of"),
            ({"providers": [dict(OPENAI, extra=1)]}, "providers[0].extra: unknown key"),
            ({"providers": [OPENAI, OPENAI]}, "providers[1].name: a provider of that name comes before it"),
            ({"providers": [OPENAI], "listen": "nope"}, "listen: expected HOST:PORT"),
            ({"providers": [OPENAI], "listen": "127.0.0.1:\u0668\u0660"}, "listen: expected HOST:PORT"),
            # Each of these once passed, or ended in a traceback instead of this line:
            # (Named by key since: the line said "invalid JSON: NaN ..." alone, naming neither the
            # key nor the line, which the README promises.)
            ('{"providers": [%s], "fsync_interval": NaN}' % json.dumps(OPENAI),
             "fsync_interval: invalid JSON: NaN is not a number JSON allows"),
            ('{"providers": [%s], "connect_timeout": -Infinity}' % json.dumps(OPENAI),
             "connect_timeout: invalid JSON: -Infinity is not a number JSON allows"),
            ('{"providers": [{"name": "o", "models": [1, Infinity]}]}', "providers[0].models[1]: invalid JSON: Infinity"),
            ({"providers": [OPENAI], "fsync_interval": 1e308}, "fsync_interval: must be at most"),
            ({"providers": [OPENAI], "workers": 10 ** 6}, "workers: must be at most"),
            ('{"providers": [%s], "queue_size": %s}' % (json.dumps(OPENAI), "9" * 5000),
             ("queue_size: invalid JSON", "queue_size: must be at most")),  # (3.8 has no digit limit)
            ({"providers": [OPENAI], "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, "x: unknown key"),
            ({"providers": [json.loads("[" * 40 + "1" + "]" * 40)]}, "nested too deep"),
            # (Python 3.13's json reads it: then the expansion refuses it.)
            ('{"providers": %s1%s}' % ("[" * 5000, "]" * 5000), ("invalid JSON", "nested too deep")),
            ({"providers": [dict(OPENAI, base_url="http://[::1")]}, "providers[0].base_url: not a URL"),
            ({"providers": [dict(OPENAI, base_url="http://a b/")]}, "providers[0].base_url: not a URL"),
            ({"providers": [dict(OPENAI, base_url="http://h:0")]}, "providers[0].base_url: not a URL"),
            ({"providers": [dict(OPENAI, base_url="http://user:pass@h")]}, "credentials in the URL"),
            ({"providers": [dict(OPENAI, api_key="sk-1\r\nX-Evil: 1")]}, "providers[0].api_key: holds a character"),
            ({"providers": [dict(OPENAI, api_key="sk-\u2603")]}, "providers[0].api_key: holds a character"),
            ({"providers": [OPENAI], "proxy_keys": [" "]}, "proxy_keys: a key must not be blank"),
            ({"providers": [dict(OPENAI, api_key="${OPENAI_API_KEY-x}")]}, "only $VAR, ${VAR} and ${VAR:-default}"),
            ({"providers": [dict(OPENAI, api_key="${OPENAI_API_KEY:=x}")]}, "providers[0].api_key: only $VAR"),
            ({"providers": [OPENAI], "listen": "0.0.0.0:8080"}, "not a loopback address"),
            ({"providers": [OPENAI], "fsync": "sometimes"}, "fsync: must be one of"),
            ({"providers": [OPENAI], "max_request_body": "big"}, "max_request_body: must be an integer"),
            ({"providers": [OPENAI], "record": "yes"}, "record: must be true or false"),
            ({"providers": [OPENAI], "queue_max_bytes": -1}, "queue_max_bytes: must be"),
            # An audit's findings (2026-12-07): each was taken, quietly.
            ('{"providers": [%s], "providers": []}' % json.dumps(OPENAI), 'invalid JSON: duplicate key "providers"'),
            ({"providers": [OPENAI], "data_dir": ""}, "data_dir: an empty path"),  # (was the file's dir)
            ({"providers": [OPENAI], "data_dir": " "}, "data_dir: an empty path"),
            ({"providers": [OPENAI], "session_header": "X-Session-Id "}, "session_header: not a header name"),
            ({"providers": [OPENAI], "session_header": "X-Session-Id:"}, "session_header: not a header name"),
            ({"providers": [dict(OPENAI, base_url="http://127.0.0.1:8000/v1")]},
             "providers[0].base_url: ends in an API version (v1)"),
            ({"providers": [dict(OPENAI, base_url="https://openrouter.ai/api/v1/")]}, "ends in an API version (v1)"),
            ({"providers": [dict(OPENAI, type="gemini", base_url="https://g.example/v1beta")]},
             "ends in an API version (v1beta)"),
        ]
        for content, expected in cases:
            with self.subTest(expected=expected):
                path = write(content)
                self.addCleanup(os.unlink, path)
                with self.assertRaises(ConfigError) as cm:
                    config.load(path, env={"OPENAI_API_KEY": "k"})
                expected = expected if isinstance(expected, tuple) else (expected,)
                self.assertTrue(any(e in str(cm.exception) for e in expected), (expected, str(cm.exception)))
                self.assertIn(path, str(cm.exception))
                self.assertNotIn("\n", str(cm.exception))

    def test_an_empty_data_dir_in_the_file_may_be_given_by_the_environment_or_a_flag(self):
        # (Refused before the overrides were read: a review's finding.)
        path = write({"providers": [OPENAI], "data_dir": "${DATA_DIR:-}"})
        self.addCleanup(os.unlink, path)
        with self.assertRaises(ConfigError):
            config.load(path, env={"OPENAI_API_KEY": "k"})
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k", "PROXY_LLM_DATA_DIR": "/srv/records"}).data_dir,
                         "/srv/records")
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}, overrides={"data_dir": "/srv/x"}).data_dir,
                         "/srv/x")

    def test_a_bom_a_tilde_and_a_scheme_in_capitals(self):
        # A BOM (Notepad's) was "invalid JSON: Expecting value" at line 1 column 1; ~ in a flag
        # or variable was a directory named "~"; "HTTPS://" was no https for a ca_file (an audit).
        path = write("\ufeff" + json.dumps({"providers": [OPENAI]}))
        self.addCleanup(os.unlink, path)
        with open(path, "rb") as fh:
            self.assertTrue(fh.read().startswith(b"\xef\xbb\xbf"))
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}).providers[0].name, "openai")
        home = os.path.expanduser("~")
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k", "PROXY_LLM_DATA_DIR": "~/records"}).data_dir,
                         os.path.join(home, "records"))
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}, overrides={"data_dir": "~/x"}).data_dir,
                         os.path.join(home, "x"))
        pem = os.path.join(ROOT, "tests", "tls_upstream.pem")
        path = write({"providers": [dict(OPENAI, base_url="HTTPS://api.openai.com", ca_file=pem)]})
        self.addCleanup(os.unlink, path)
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}).providers[0].ca_file, pem)

    def test_a_number_or_a_switch_from_a_variable(self):
        # "${QUEUE_SIZE:-10000}" was "must be an integer", "${RECORD:-false}" "must be true or
        # false": a setting could not come from the environment by a template (an audit's finding).
        path = write({"providers": [OPENAI], "queue_size": "${QS:-100}", "record": "${REC:-false}",
                      "fsync_interval": "$FI", "total_timeout": "${TT:-}", "workers": "${W:-2}"})
        self.addCleanup(os.unlink, path)
        cfg = config.load(path, env={"OPENAI_API_KEY": "k", "FI": "0.5"})
        self.assertEqual((cfg.queue_size, cfg.record, cfg.fsync_interval, cfg.total_timeout, cfg.workers),
                         (100, False, 0.5, None, 2))
        for env, expected in (({"QS": "1e3"}, "queue_size: must be an integer"), ({"REC": "yes"}, "record: must be true"),
                              ({"QS": "-5"}, "queue_size: must be an integer")):
            with self.subTest(env=env):
                with self.assertRaises(ConfigError) as cm:
                    config.load(path, env=dict(env, OPENAI_API_KEY="k", FI="0.5"))
                self.assertIn(expected, str(cm.exception))
        path = write({"providers": [OPENAI], "queue_size": "100"})  # (no template: a string, as ever)
        self.addCleanup(os.unlink, path)
        with self.assertRaises(ConfigError):
            config.load(path, env={"OPENAI_API_KEY": "k"})

    def test_an_error_names_where_the_value_came_from_once(self):
        # A flag's error named the key twice ("--workers: workers: must be at least 1").
        path = write({"providers": [OPENAI], "workers": 0})
        self.addCleanup(os.unlink, path)
        env = {"OPENAI_API_KEY": "k"}
        cases = [
            ({"workers": 0}, {}, "--workers: must be at least 1"),
            ({"workers": 0, "log_level": "loud"}, {}, "--log-level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
            ({"workers": 1, "listen": "nope"}, {}, "--listen: expected HOST:PORT"),
            ({"workers": 1, "data_dir": 7}, {}, "--data-dir: must be a string"),
            ({"workers": 1}, {"PROXY_LLM_LISTEN": "nope"}, "$PROXY_LLM_LISTEN: listen: expected HOST:PORT"),
            ({}, {}, "%s: workers: must be at least 1" % path),
        ]
        for overrides, extra_env, expected in cases:
            with self.subTest(expected=expected):
                with self.assertRaises(ConfigError) as cm:
                    config.load(path, env=dict(env, **extra_env), overrides=overrides)
                self.assertEqual(str(cm.exception), expected)

    def test_errors_do_not_repeat_values_that_may_be_secrets(self):
        # A $VAR may hold a key; an error about the setting it went into must not print it.
        secret = "sk-PLANTED-0123456789"
        for content in ({"providers": [OPENAI], "listen": "$SECRET"},
                        {"providers": [dict(OPENAI, name="$SECRET"), dict(OPENAI, name="$SECRET")]}):
            with self.subTest(content=content):
                path = write(content)
                self.addCleanup(os.unlink, path)
                with self.assertRaises(ConfigError) as cm:
                    config.load(path, env={"OPENAI_API_KEY": "k", "SECRET": secret})
                self.assertNotIn(secret, str(cm.exception))

    def test_a_loaded_configs_repr_holds_no_secret(self):
        # A Config or a Provider in a log line or a traceback's locals (a debugger, a crash
        # reporter) printed every provider key and proxy key.
        path = write({"providers": [OPENAI], "listen": "0.0.0.0:8080", "proxy_keys": ["pk-PLANTED-proxy-key"],
                      "upstream_proxy": "http://user:PLANTED-password@egress.example:3128"})
        self.addCleanup(os.unlink, path)
        cfg = config.load(path, env={"OPENAI_API_KEY": "sk-PLANTED-provider-key"})
        self.assertEqual(cfg.providers[0].api_key, "sk-PLANTED-provider-key")
        self.assertIn("egress.example", cfg.providers[0].proxy)
        for shown in (repr(cfg), str(cfg), repr(cfg.providers[0])):
            self.assertNotIn("PLANTED", shown)
            self.assertIn("openai", shown)

    def test_queue_max_bytes_reaches_the_recorder(self):
        path = write({"providers": [OPENAI], "queue_max_bytes": 1024})
        self.addCleanup(os.unlink, path)
        self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}).queue_max_bytes, 1024)
        self.assertEqual(config.Config().queue_max_bytes, 512 * 1024 * 1024)
        cfg = config.load(path, env={"OPENAI_API_KEY": "k"}, overrides={"data_dir": tempfile.mkdtemp()})
        self.addCleanup(shutil.rmtree, cfg.data_dir, True)
        from proxy_llm import cli
        server = cli.build_server(dataclasses.replace(cfg, listen="127.0.0.1:0"))
        self.addCleanup(server.server_close)
        self.addCleanup(server.recorder.close, 10.0)
        self.assertEqual((server.recorder.queue.maxsize, server.recorder.queue.maxbytes), (10000, 1024))
        from proxy_llm.record import Exchange, captured_bytes
        self.assertIs(server.recorder.queue.size_of, captured_bytes)
        ex = Exchange("POST", "/v1/chat/completions", "", [], 100)
        ex.capture_request(b"x" * 60)
        ex.response.add(1.0, b"y" * 150)  # 100 kept of 150, and the rest as the answer's tail
        self.assertEqual(captured_bytes(ex), 210)
        ex.request.add(0.0, b"z" * 100)  # (40 more kept of the request's 100: it keeps no tail)
        self.assertEqual((captured_bytes(ex), ex.request.tail), (250, None))

    def test_non_loopback_is_allowed_with_proxy_keys(self):
        path = write({"providers": [OPENAI], "listen": "0.0.0.0:8080", "proxy_keys": ["pk-1"]})
        self.addCleanup(os.unlink, path)
        cfg = config.load(path, env={"OPENAI_API_KEY": "k"})
        self.assertEqual(cfg.proxy_keys, ("pk-1",))

    def test_azure_provider(self):
        """An azure provider's base_url is the resource's endpoint, or a gateway's base path;
        one that ends in /openai, or names a deployment or the v1 API, is refused at once (each
        request would go to /openai/openai/..., a 404 from Azure), without repeating the URL."""
        azure = {"name": "azure", "type": "azure", "api_key": "${AZURE_OPENAI_API_KEY:-}", "models": ["gpt-4o*"]}
        for url in ("https://res.openai.azure.com", "https://res.openai.azure.com/",
                    "https://res.cognitiveservices.azure.com", "https://apim.example.net/llm"):
            with self.subTest(url=url):
                path = write({"providers": [dict(azure, base_url=url)]})
                self.addCleanup(os.unlink, path)
                cfg = config.load(path, env={"AZURE_OPENAI_API_KEY": "k"})
                self.assertEqual((cfg.providers[0].type, cfg.providers[0].api_key), ("azure", "k"))
                self.assertEqual(cfg.providers[0].base_url, url.rstrip("/"))
        for url in ("https://res.openai.azure.com/openai", "https://res.openai.azure.com/openai/",
                    "https://res.openai.azure.com/openai/v1/", "https://res.openai.azure.com/openai/deployments/gpt-4o",
                    "https://apim.example.net/llm/openai"):
            with self.subTest(url=url):
                path = write({"providers": [OPENAI, dict(azure, base_url=url)]})
                self.addCleanup(os.unlink, path)
                with self.assertRaises(ConfigError) as cm:
                    config.load(path, env={"OPENAI_API_KEY": "k", "AZURE_OPENAI_API_KEY": "k"})
                msg = str(cm.exception)
                self.assertEqual(msg, "%s: providers[1].base_url: an azure provider's base_url is the resource's "
                                      "endpoint (https://<resource>.openai.azure.com), without /openai...: clients' "
                                      "paths begin with /openai/" % path)
        with self.subTest("an openai provider's base path is its own"):
            path = write({"providers": [dict(OPENAI, base_url="https://gateway.example.net/openai")]})
            self.addCleanup(os.unlink, path)
            self.assertEqual(config.load(path, env={"OPENAI_API_KEY": "k"}).providers[0].base_url,
                             "https://gateway.example.net/openai")
        with self.subTest("the types are listed"):
            path = write({"providers": [dict(azure, type="azure-openai", base_url="https://res.openai.azure.com")]})
            self.addCleanup(os.unlink, path)
            with self.assertRaises(ConfigError) as cm:
                config.load(path, env={})
            self.assertIn("providers[0].type: must be one of openai, anthropic, gemini, azure", str(cm.exception))

    def test_ca_file_is_checked_at_start(self):
        """A provider's ca_file is a PEM bundle checked when the config loads: a missing,
        unreadable or certificate-less file stops start-up naming the key and the path, not
        the first request's 502. A relative path is the config file's directory's."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        pem = os.path.join(ROOT, "tests", "tls_upstream.pem")
        shutil.copy(pem, os.path.join(tmp, "corp-ca.pem"))
        with open(os.path.join(tmp, "empty.pem"), "w") as f:
            f.write("not a certificate\n")
        cfg_path = os.path.join(tmp, "config.json")

        def load(ca_file, base_url="https://api.openai.com"):
            with open(cfg_path, "w") as f:
                json.dump({"providers": [dict(OPENAI, base_url=base_url, ca_file=ca_file)]}, f)
            return config.load(cfg_path, env={"OPENAI_API_KEY": "k"})

        self.assertEqual(load("corp-ca.pem").providers[0].ca_file, os.path.join(tmp, "corp-ca.pem"))
        self.assertEqual(load(pem).providers[0].ca_file, pem)
        self.assertEqual(load("").providers[0].ca_file, "")
        cases = [
            ("missing.pem", "https://api.openai.com",
             "providers[0].ca_file: cannot read %s: No such file or directory" % os.path.join(tmp, "missing.pem")),
            (tmp, "https://api.openai.com", "providers[0].ca_file: cannot read %s: Is a directory" % tmp),
            ("empty.pem", "https://api.openai.com",
             "providers[0].ca_file: %s holds no PEM certificate" % os.path.join(tmp, "empty.pem")),
            (["corp-ca.pem"], "https://api.openai.com", "providers[0].ca_file: must be a string (a path to a PEM file)"),
            ("corp-ca.pem", "http://127.0.0.1:9", "providers[0].ca_file: only an https base_url uses a ca_file"),
        ]
        for ca_file, base_url, expected in cases:
            with self.subTest(ca_file=ca_file), self.assertRaises(ConfigError) as cm:
                load(ca_file, base_url)
            self.assertEqual(str(cm.exception), "%s: %s" % (cfg_path, expected))

    def test_provider_globs(self):
        p = config.Provider("o", "openai", "http://x", models=("gpt-*", "o[0-9]*"))
        self.assertEqual(p.matches("gpt-4o"), "gpt-*")
        self.assertEqual(p.matches("o3-mini"), "o[0-9]*")
        self.assertIsNone(p.matches("claude-3"))
        self.assertIsNone(p.matches(None))


if __name__ == "__main__":
    unittest.main()
