"""The README is part of the contract: every key, flag, metric, field and ending it must name."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import unittest

from proxy_llm import cli, config, record
from proxy_llm.metrics import ProxyMetrics
from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


class ReadmeTest(unittest.TestCase):
    def setUp(self):
        self.text = readme()

    def assertDocumented(self, names, what):
        missing = [n for n in names if "`%s`" % n not in self.text]
        self.assertEqual(missing, [], "README does not document these %s" % what)

    def test_opens_with_the_two_commands(self):
        head = self.text[:2000]
        self.assertIn("python -m proxy_llm", head)
        self.assertIn("python -m unittest", head)
        for setting in ("OPENAI_BASE_URL=http://127.0.0.1:8080/v1", "ANTHROPIC_BASE_URL=http://127.0.0.1:8080", "base_url"):
            self.assertIn(setting, self.text)

    def test_every_config_key(self):
        self.assertDocumented(config.DEFAULTS, "config keys")
        self.assertDocumented(config.PROVIDER_KEYS, "provider keys")

    def test_config_table_gives_each_key_its_default(self):
        rows = table(self.text, "| key | default | meaning |")
        self.assertEqual([r[0] for r in rows], ["`%s`" % k for k in config.DEFAULTS])
        for key, default, _ in rows:
            key = key.strip("`")
            shown = "(required)" if key == "providers" else json.loads(default.strip("`"))
            with self.subTest(key=key):
                self.assertEqual(shown, "(required)" if key == "providers" else config.DEFAULTS[key])
                self.assertEqual(type(shown), type(config.DEFAULTS[key]) if key != "providers" else str)

    def test_every_flag_and_environment_variable(self):
        flags = re.findall(r"(--[a-z][a-z-]+)", cli.build_parser().format_help())
        self.assertTrue(flags)
        missing = [f for f in set(flags) if f not in self.text]
        self.assertEqual(missing, [])
        for var in ("PROXY_LLM_LISTEN", "PROXY_LLM_DATA_DIR", "PROXY_LLM_LOG_LEVEL", "PROXY_LLM_CONFIG"):
            self.assertIn("`%s`" % var, self.text)

    def test_log_level_help_names_every_level(self):
        # The help said "DEBUG, INFO, WARNING, ERROR": CRITICAL, which the README's table and the
        # config take, was missing.
        action = [a for a in cli.build_parser()._actions if "--log-level" in a.option_strings][0]
        self.assertEqual([lvl for lvl in config.LOG_LEVELS if lvl not in action.help], [])
        self.assertIn("`log_level` | `\"INFO\"` | %s |" % ", ".join("`%s`" % lvl for lvl in config.LOG_LEVELS), self.text)

    def test_every_metric(self):
        metrics = ProxyMetrics(*(lambda: 0,) * 5)
        self.assertDocumented(metrics.registry.names(), "metrics")

    def test_metrics_table_is_the_page(self):
        rows = table(self.text, "| metric | type | labels |")
        page = ProxyMetrics(*(lambda: 0,) * 5).render().decode()
        kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M))
        self.assertEqual(sorted(r[0].strip("`") for r in rows), sorted(kinds))
        self.assertEqual({r[0].strip("`"): r[1].split()[0] for r in rows}, kinds)

    def test_every_record_field_session_source_and_ending(self):
        self.assertDocumented(record.FIELDS, "record fields")
        self.assertDocumented(record.STREAM_FIELDS, "stream line fields")
        self.assertDocumented(record.SESSION_SOURCES, "session sources")
        self.assertDocumented(record.ENDINGS, "endings")

    def test_every_error_type_of_the_proxys_own(self):
        # The error row named four of the proxy's types and "the 4xx refusals' types"; a bug's
        # proxy_error, and the types early endings and upstream error bodies give, were unnamed.
        from proxy_llm import errors

        kinds, todo = set(), [errors.ProxyError]
        while todo:
            cls = todo.pop()
            kinds.add(cls.kind)
            todo.extend(cls.__subclasses__())
        row = [line for line in self.text.splitlines() if line.startswith("| `error` |")][0]
        self.assertEqual([k for k in sorted(kinds) if "`%s`" % k not in row], [])
        self.assertEqual([e for e in record.ENDINGS if e != "completed" and e != "refused" and "`%s`" % e not in row], [])

    def test_every_field_of_a_streams_event(self):
        # An event's unterminated flag was written to streams/ files and named nowhere.
        from proxy_llm.sse import SSEDecoder

        decoder = SSEDecoder()
        events = decoder.feed(b": note\nid: 7\nretry: 100\nevent: e\ndata: x\n\ndata: cut")
        events += decoder.close()
        keys = set()
        for event in events:
            keys.update(event.to_json(1.0))
        self.assertEqual(keys, {"t", "event", "data", "id", "retry", "comments", "unterminated"})
        start = self.text.index("A line of `streams/*.jsonl` holds")
        paragraph = self.text[start:self.text.index("\n\n", start)]
        self.assertEqual([k for k in sorted(keys) if '"%s"' % k not in paragraph], [])

    def test_record_field_table_is_record_fields(self):
        rows = table(self.text, "| field | type | meaning |")
        self.assertEqual([r[0].strip("`") for r in rows], list(record.FIELDS))
        self.assertEqual(set(r[1] for r in rows) - set(FIELD_TYPES), set())

    def test_flag_table_is_the_parser_both_ways(self):
        # The table's flags against the parser's options, both ways; and each flag and variable
        # overrides the key its row names (run, not read: a config loaded with it set).
        rows = table(self.text, "| environment | flag | overrides |", split="|")
        parser = cli.build_parser()
        options = set(o for a in parser._actions for o in a.option_strings if o.startswith("--"))
        shown = set(re.findall(r"(--[a-z][a-z-]*)", " ".join(r[1] for r in rows)))
        self.assertEqual(sorted(shown), sorted(options))
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump({"providers": [{"name": "o", "type": "openai", "base_url": "http://127.0.0.1:9"}]}, f)
        values = {"listen": "127.0.0.1:1234", "data_dir": os.path.join(tmp, "d"), "log_level": "DEBUG",
                  "upstream_proxy": "http://proxy.example:3128", "workers": 3}
        checked = 0
        for env, flag, overrides in rows:
            key = re.findall(r"`([a-z_]+)`", overrides)
            if not key:
                continue
            key = key[0]
            with self.subTest(key=key):
                self.assertIn(key, values, "a row overrides a key this test has no value for")
                value = values[key]
                if env:
                    var = env.strip("`")
                    self.assertEqual(getattr(config.load(path, env={var: str(value)}), key), value)
                if flag:
                    name = flag.strip("`").split()[0]
                    args = parser.parse_args([name, str(value)])
                    self.assertEqual(getattr(cli.load_config(args), key), value)
                checked += 1
        self.assertEqual(checked, len(values))

    def test_every_environment_variable_the_code_reads_is_in_the_table(self):
        rows = table(self.text, "| environment | flag | overrides |", split="|")
        shown = set(r[0].strip("`") for r in rows if r[0])
        read = set()
        package = os.path.join(ROOT, "proxy_llm")
        for name in sorted(os.listdir(package)):
            if name.endswith(".py"):
                with open(os.path.join(package, name), encoding="utf-8") as f:
                    read.update(re.findall(r"PROXY_LLM_[A-Z_]+", f.read()))
        self.assertEqual(sorted(shown), sorted(read))

    def test_subcommand_flags_both_ways(self):
        # Each subcommand's options are in its part of the README, and every flag that part
        # names is an option of one of them.
        start = self.text.index("## From recordings to datasets")
        part = self.text[start:self.text.index("### Loading the files", start)]
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", part))
        options = set()
        for name in cli.SUBCOMMANDS:
            _, parser = cli.subcommand_parser(name)
            own = set(o for a in parser._actions for o in a.option_strings if o.startswith("--")) - {"--help"}
            with self.subTest(subcommand=name):
                self.assertEqual(sorted(own - named), [])
            options |= own
        self.assertEqual(sorted(named - options), [])

    def test_subcommand_exit_statuses_are_their_helps(self):
        # The README said export's 2 was "bad usage" (an unreadable data dir is one too, as its
        # --help said) and gave stats' none. Each subcommand's --help states its exit statuses;
        # the README's part on it states the same, and a data dir that is not there is a 2.
        parts = {"export": ("### `export`", "Filters ("), "stats": ("### `stats` and `verify`", "`verify` checks"),
                 "verify": ("`verify` checks", "`verify` may run")}
        missing = os.path.join(tempfile.mkdtemp(), "none")
        self.addCleanup(shutil.rmtree, os.path.dirname(missing))
        for name in cli.SUBCOMMANDS:
            start, end = parts[name]
            start = self.text.index(start)
            part = " ".join(self.text[start:self.text.index(end, start + 1)].split())
            epilog = cli.subcommand_parser(name)[1].epilog
            statuses = epilog[epilog.index("Exit status: "):].rstrip(".")
            with self.subTest(subcommand=name):
                self.assertIn(statuses, part)
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    code = cli.main([name, "--data-dir", missing] + (["--format", "records"] if name == "export" else []))
                self.assertEqual(code, 2)

    def test_endpoint_table_is_what_the_proxy_forwards_and_answers(self):
        from proxy_llm import errors, handler

        rows = table(self.text, "| path | answer |")
        forwarded = re.findall(r"`(/[^`]*)`", rows[0][0])
        versions = re.findall(r"`(v[0-9a-z]+)`", rows[0][0].split("(`<version>`:")[1])
        paths = set()
        for path in forwarded:
            paths.update(path.replace("<version>", v) for v in versions) if "<version>" in path else paths.add(path)
        self.assertEqual(sorted(p[:-1] for p in paths), sorted(errors.FORWARDED))
        local = [re.match(r"`GET (/[a-z]+)`", r[0]).group(1) for r in rows[1:]]
        self.assertEqual(local, list(handler.LOCAL_PATHS))

    def test_export_formats_both_ways(self):
        from proxy_llm import export

        start = self.text.index("Formats:\n")
        bullets = re.findall(r"^\* `([a-z-]+)`:", self.text[start:self.text.index("\n\n`--dedupe`", start)], re.M)
        self.assertEqual(bullets, list(export.FORMATS))

    def test_export_skip_reasons_both_ways(self):
        # The reasons a summary counts were named only here and there in the prose; two were new.
        with open(os.path.join(ROOT, "proxy_llm", "export.py"), encoding="utf-8") as f:
            raised = set(re.findall(r'Skip\("([a-z_]+)"\)', f.read()))
        start = self.text.index("Skipped records, counted by reason in the summary:\n")
        listed = re.findall(r"^\* (`[a-z_]+`(?:, `[a-z_]+`)*):", self.text[start:self.text.index("\n\n", start + 60)], re.M)
        listed = [name for item in listed for name in re.findall(r"`([a-z_]+)`", item)]
        self.assertEqual(len(listed), len(set(listed)))
        self.assertEqual(sorted(listed), sorted(raised))

    def test_provider_key_table_is_the_provider_keys(self):
        rows = table(self.text, "| key | meaning |")
        self.assertEqual(sorted(r[0].strip("`") for r in rows), sorted(config.PROVIDER_KEYS))

    def test_config_values_named_in_the_key_table(self):
        # The values a key takes, listed in its row, against the ones the config accepts.
        rows = {r[0].strip("`"): r[2] for r in table(self.text, "| key | default | meaning |")}
        for key, accepted in (("fsync", config.FSYNC_MODES), ("on_record_error", config.ON_RECORD_ERROR),
                              ("log_level", config.LOG_LEVELS)):
            with self.subTest(key=key):
                listed = [v for v in re.findall(r"`([a-zA-Z_]+)`", rows[key]) if v not in config.DEFAULTS]
                self.assertEqual(sorted(set(listed)), sorted(accepted))
        row = [r for r in table(self.text, "| key | meaning |") if r[0] == "`type`"][0]
        self.assertEqual(sorted(set(re.findall(r"`([a-z]+)`", row[1]))), sorted(config.PROVIDER_TYPES))

    def test_metric_labels_are_the_pages(self):
        # The labels a row names (the backquoted names before any colon, outside parentheses)
        # against the labels each metric has.
        rows = table(self.text, "| metric | type | labels |")
        metrics = ProxyMetrics(*(lambda: 0,) * 5)
        labels = {m.name: list(m.labelnames) for m in metrics.registry._metrics}
        for name, _, cell in rows:
            name = name.strip("`")
            bare = re.sub(r"\([^()]*\)", "", cell).split(":")[0]
            shown = re.findall(r"`([a-z_]+)`", bare) if re.match(r"\s*(`[a-z_]+`\s*,?\s*)*$", bare) else []
            with self.subTest(metric=name):
                self.assertEqual(shown, labels[name])

    def test_enumerations_of_the_record_fields(self):
        # The values a record field takes, as its row (or the paragraph on endings) lists them,
        # against the code's.
        from proxy_llm import dialects, reader, verify

        rows = {r[0].strip("`"): r[2] for r in table(self.text, "| field | type | meaning |")}
        dialect_names = set(dialects.DIALECTS)
        cases = (("session_source", record.SESSION_SOURCES), ("provider_type", config.PROVIDER_TYPES),
                 ("dialect", dialect_names))
        for field, values in cases:
            with self.subTest(field=field):
                self.assertEqual(sorted(set(re.findall(r"`([a-z_]+)`", rows[field]))), sorted(values))
        start = self.text.index("`ended` is one of ")
        sentence = self.text[start:self.text.index("Every ending", start)]
        endings = re.findall(r"`([a-z_]+)`", re.sub(r"\([^()]*\)", "", sentence))[1:]
        self.assertEqual(endings, list(reader.ENDINGS))
        self.assertEqual(list(record.SESSION_SOURCES), list(verify.SESSION_SOURCES))
        self.assertEqual(list(config.PROVIDER_TYPES), list(verify.PROVIDER_TYPES))

    def test_token_kinds(self):
        from proxy_llm import verify

        start = self.text.index("`tokens_used` has ")
        sentence = self.text[start:self.text.index(".", start)]
        self.assertEqual(re.findall(r"`([a-z_]+)`", sentence)[1:], list(verify.TOKEN_KEYS))
        row = table(self.text, "| metric | type | labels |")
        kinds = [r[2] for r in row if r[0] == "`proxy_llm_tokens_total`"][0]
        kinds = re.findall(r"`([a-z_]+)`", kinds[kinds.index("`kind`"):])[1:]
        self.assertEqual(kinds, [k for k in verify.TOKEN_KEYS if k != "total_tokens"])
        rows = table(self.text, "| tokens_used | OpenAI chat, completions, embeddings (`usage`) | OpenAI Responses "
                                "(`response.usage`) | Anthropic Messages (`usage`, merged over the stream) | Gemini "
                                "(`usageMetadata`, the last one) |")
        self.assertEqual([r[0].strip("`") for r in rows], list(verify.TOKEN_KEYS))

    def test_error_shapes_are_the_rendered_ones(self):
        from proxy_llm import errors

        start = self.text.index("Error shapes: ")
        line = self.text[start:self.text.index("\n\n", start)].replace("\n", " ")
        shapes = dict(re.findall(r"(OpenAI|Anthropic|Gemini) `(\{.*?\}\})`", line))
        self.assertEqual(sorted(shapes), ["Anthropic", "Gemini", "OpenAI"])
        for family, shape in shapes.items():
            body, _ = errors.render(family.lower(), 404, "m", "k")
            with self.subTest(family=family):
                shown = re.sub(r'\s|:\s*"[^"]*"', "", shape).replace('"', "")  # (without constants)
                self.assertEqual(shape_of(json.loads(body)), shown)

    def test_the_key_notice_is_quoted_as_written(self):
        # The Logs section gave a keyless provider's advice as "check the key its clients send";
        # the line says "it has no api_key: check the key its clients send", and the egress
        # proxy's part of a 403 was unsaid. Each advice the notice gives ends a quote there.
        from proxy_llm import notices
        from proxy_llm.storage import RateLimitedLog
        from unittest import mock

        logs_section = " ".join(self.text.split("\n### Logs\n", 1)[1].split("\n## ", 1)[0].split())
        keyless = config.Provider("o", "openai", "https://h")
        cases = ((config.Provider("o", "openai", "https://h", api_key="k" * 20), 401, ""),
                 (keyless, 401, ""),
                 (config.Provider("o", "openai", "http://h", proxy="http://proxy.corp:3128"), 403, keyless))
        told = {}
        for provider, status, after in cases:
            with mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL)), \
                    self.assertLogs("proxy_llm.upstream", "INFO") as logs:
                notices.key_refused(provider, status, "authentication_error")
            advice = told[provider] = logs.records[0].getMessage().split("(authentication_error): ", 1)[1]
            if after:  # (what a line adds to another's)
                advice = advice[len(told[after]):]
            with self.subTest(advice=advice):
                self.assertTrue("%s`" % advice in logs_section, "the Logs section ends a quote with it")

    def test_development_layout_is_the_package(self):
        # The module list under Development, both ways, against the package's modules.
        start = self.text.index("## Development\n")
        block = re.search(r"```\n(proxy_llm/\n.*?)```", self.text[start:], re.S).group(1)
        listed = set(re.findall(r"(?<![\w/])([a-z_]+\.py|[a-z_]+/)(?=\s|$)", block.split("\ntests/", 1)[0]))
        listed.discard("proxy_llm/")
        package = os.path.join(ROOT, "proxy_llm")
        shipped = set(n for n in os.listdir(package) if n.endswith(".py") and n != "__init__.py")
        shipped.update(n + "/" for n in os.listdir(package) if os.path.isfile(os.path.join(package, n, "__init__.py")))
        self.assertEqual(sorted(listed), sorted(shipped))

    def test_upstream_error_kinds_are_the_ones_counted(self):
        # proxy_llm_upstream_errors_total's kinds, as its row names them, against the kinds the
        # handler counts (each literal it passes, and the endings upstream_failed is given).
        row = [r[2] for r in table(self.text, "| metric | type | labels |") if r[0] == "`proxy_llm_upstream_errors_total`"][0]
        named = re.findall(r"`([a-z_]+)`", re.sub(r":[^,]*,", ",", row[row.index("`kind`"):]))[1:]
        with open(os.path.join(ROOT, "proxy_llm", "handler.py"), encoding="utf-8") as f:
            code = f.read()
        counted = set(re.findall(r'server_metrics_error\(self\.server, ex, "([a-z_]+)"\)', code))
        counted.update(re.findall(r'self\.upstream_failed\(ex, "([a-z_]+)"', code))
        counted.add("shutdown")  # (upstream_failed's own ending for an exchange the shutdown cut)
        self.assertEqual(sorted(named), sorted(counted))

    def test_endpoint_labels_are_named(self):
        # /v1/models/* and /v1/responses/* were labels the Metrics section did not name.
        from proxy_llm import errors, handler

        start = self.text.index("Labels never carry raw client input")
        paragraph = " ".join(self.text[start:self.text.index("\n\n", start)].split())
        shown = set(re.findall(r"`(/[^`]*)`", paragraph))
        paths = ["/v1/models/x", "/v1/responses/resp_1/input_items", "/upload/v1beta/files"]
        paths += sorted(errors.OPENAI_PATHS) + ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"]
        paths += ["/%s/models/m:%s" % (v, m) for v in ("v1", "v1beta", "v1alpha") for m in sorted(errors.GEMINI_METHODS)]
        for path in paths:
            label = handler.endpoint_label(path)
            with self.subTest(path=path):
                self.assertNotEqual(label, "other")
                if path.endswith(tuple(":" + m for m in errors.GEMINI_METHODS)):
                    self.assertIn(label.split(":")[0] + ":<method>", shown)
                    self.assertIn("`%s`" % label.split(":")[1], paragraph)
                elif path in errors.OPENAI_PATHS:
                    routing = self.text[self.text.index("## Routing\n"):self.text.index("## Configuration\n")]
                    self.assertTrue("`%s`" % path[4:] in routing, "Routing's list of OpenAI's endpoints")
                else:
                    self.assertIn(label, shown)
        for path in ("/openai/deployments/d/chat/completions", "/openai/responses", "/openai/v1/responses"):
            with self.subTest(path=path):
                label = handler.endpoint_label(path)
                self.assertIn(re.sub(r"(?<=/openai)(/deployments/\*|/v1)?/.*", lambda m: (m.group(1) or "") + "/<endpoint>",
                                     label), shown)

    def test_shipped_config_is_the_one_shown(self):
        with open(os.path.join(ROOT, "config.json")) as f:
            shipped = json.load(f)
        blocks = re.findall(r"```json\n(.*?)```", self.text, re.S)
        self.assertIn(shipped, [json.loads(b) for b in blocks])


FIELD_TYPES = {"int": (int,), "string": (str,), "string or null": (str, type(None)), "int or null": (int, type(None)),
               "bool": (bool,), "number": (int, float), "object": (dict,), "any": (object,)}


def shape_of(obj) -> str:
    """``{"error": {"type": ..., "message": ...}}`` as the README writes a shape:
    ``{error:{type,message}}`` (an object's scalar keys bare, its objects' keys nested)."""
    parts = []
    for key, value in obj.items():
        parts.append("%s:%s" % (key, shape_of(value)) if isinstance(value, dict) else key)
    return "{%s}" % ",".join(parts)


def table(text: str, head: str, split: str = " | ") -> list:
    """The rows of the README table under ``head``, as lists of cells (split on ``split``: on
    " | " by default, since a cell may hold a ``|`` of its own; "|" for a table with empty cells)."""
    start = text.index(head + "\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip()[1:-1].split(split)] if split == "|"
                    else [c.strip() for c in line.strip("|").split(split)])
    return rows


class RealRecordTest(support.ProxyTestCase):
    """The record field table and /health's keys against what a running proxy writes and says."""

    def test_records_hold_the_fields_of_the_table_with_their_types(self):
        types = {r[0].strip("`"): r[1] for r in table(readme(), "| field | type | meaning |")}
        usage = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1,' \
                b'"completion_tokens":1,"total_tokens":2}}\n\n'
        self.replies.append(support.sse_reply([support.chunk_event("Hi"), support.chunk_event("", "stop"), usage,
                                               b"data: [DONE]\n\n"]))
        self.replies.append(support.json_reply({"error": {"message": "no", "type": "invalid_request_error"}}, 400))
        proxy = self.start_proxy()
        support.request(proxy.url, body={"model": "gpt-4o", "stream": True, "messages": []})
        support.request(proxy.url, body={"model": "gpt-4o", "messages": []})
        support.request(proxy.url, path="/v1/messages", body=b"x" * 10, headers={"Content-Length": "10",
                                                                               "Transfer-Encoding": "chunked"})
        recs = proxy.records()
        self.assertEqual(len(recs), 3)
        for rec in recs:
            self.assertEqual([k for k in rec if k not in types], [], "fields the README does not list")
            for key, value in rec.items():
                with self.subTest(field=key, ended=rec["ended"]):
                    expected = FIELD_TYPES[types[key]]
                    self.assertIsInstance(value, expected)
                    if bool not in expected:
                        self.assertNotIsInstance(value, bool)
        self.assertEqual({"stream_events", "ttft_ms", "error", "tokens_used"} - set().union(*recs), set())

    def test_record_false_keeps_the_metrics_its_row_names(self):
        # The row said "forward and keep metrics" while proxy_llm_tokens_total, read from the
        # bodies, stayed empty with record: false. The metrics with a sample after the same
        # exchanges, recording on and off: recording off keeps every one, and the row's.
        def sampled(record):
            self.replies.append(support.json_reply({"id": "c", "choices": [], "usage": {
                "prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}))
            proxy = self.start_proxy(data_dir=os.path.join(self.tmp, str(record)), record=record)
            self.assertEqual(support.request(proxy.url, body={"model": "gpt-4o", "messages": []})[0], 200)
            proxy.flush()
            page = proxy.server.metrics.render().decode()
            proxy.stop()
            return set(re.findall(r"^(proxy_llm_[a-z_]+?)(?:_bucket|_sum|_count)?[{ ]", page, re.M))

        off = sampled(False)
        self.assertEqual(sampled(True) - off, set())
        row = [r[2] for r in table(readme(), "| key | default | meaning |") if r[0] == "`record`"][0]
        named = set(re.findall(r"`(proxy_llm_[a-z_]+)`", row))
        self.assertEqual(named, {"proxy_llm_tokens_total", "proxy_llm_exchange_endings_total"})
        self.assertEqual(named - off, set())

    def test_upstream_eof_is_told_with_recording_off_as_its_logs_line_says(self):
        # The Logs section said a stream ended without its terminal event was "found by the
        # recorder, so with `record: true` only": recording off reads the answers too now.
        from proxy_llm import notices
        from proxy_llm.storage import RateLimitedLog
        from unittest import mock

        patcher = mock.patch.object(notices, "RATELOG", RateLimitedLog(notices.log, notices.INTERVAL))
        patcher.start()
        self.addCleanup(patcher.stop)
        self.replies.append(support.sse_reply([support.chunk_event("hi")]))  # (no finish, no [DONE])
        proxy = self.start_proxy(record=False)
        with self.assertLogs("proxy_llm.upstream", "WARNING") as logs:
            self.assertEqual(support.request(proxy.url, body={"model": "gpt-4o", "stream": True})[0], 200)
            proxy.flush()
        self.assertEqual(len(logs.output), 1)
        self.assertIn("stream ended without its terminal event (upstream_eof)", logs.output[0])
        logs_section = readme().split("\n### Logs\n", 1)[1].split("\n## ", 1)[0]
        told = re.search(r"\(`upstream_eof`[^)]*\)", logs_section)
        self.assertIsNotNone(told, "the Logs section names upstream_eof")
        self.assertNotIn("`record: true` only", re.sub(r"\s+", " ", told.group(0)))

    def test_health_keys_are_the_documented_ones(self):
        row = [line for line in readme().splitlines() if line.startswith("| `GET /health` |")][0]
        keys = re.sub(r"\(`ok`.*?\)", "", row.split(" 503 only")[0])  # (the status values)
        listed = re.findall(r"`([a-z_]+)`", keys)
        proxy = self.start_proxy()
        self.assertEqual(sorted(proxy.server.health()), sorted(listed))


if __name__ == "__main__":
    unittest.main()
