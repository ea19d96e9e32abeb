"""The README is part of the contract: every key, flag, metric, field and ending it must name."""

from __future__ import annotations

import os
import re
import unittest

from proxy_llm import cli, config, record
from proxy_llm.metrics import ProxyMetrics

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

    def test_shipped_config_is_the_one_shown(self):
        import json

        with open(os.path.join(ROOT, "config.json")) as f:
            shipped = json.load(f)
        blocks = re.findall(r"```json\n(.*?)```", self.text, re.S)
        self.assertIn(shipped, [json.loads(b) for b in blocks])


if __name__ == "__main__":
    unittest.main()
