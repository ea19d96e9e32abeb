"""The encoder against generated exchanges: whatever an exchange holds, its record is written.

Each case is an exchange a client and an upstream could produce, drawn from a seeded generator
(the same cases every run): JSON bodies with numbers past any float, lone surrogates, secrets and
NaN, bodies cut short, nested thousands deep, not UTF-8, compressed or compressed badly; SSE
streams with comments, errors, stray bytes and ``[DONE]``; every dialect's path, odd statuses,
every ending, repeated and credential headers, secrets in the query. For each, the encoder must
give exactly one record line, and every line it gives must be one line of JSON that the loaders
can read (nested at most ``MAX_NESTING`` levels below the record) with no credential the
exchange carried. A failure names the seed and case, to replay it alone.

What this generator found and what was fixed: a body nested past the json module's recursion
limit lost its record, one nested past DuckDB's 128 levels made a line DuckDB refuses, and a 2xx
from an endpoint without a dialect let a broken body into the line unparsed.
"""

from __future__ import annotations

import gzip
import json
import random
import unittest

from proxy_llm import dialects, record
from proxy_llm.config import Provider
from proxy_llm.record import Encoder, Exchange
from proxy_llm.storage import RECORDS

SEED = 20261206
CASES = 1500
PROVIDER_KEY = "sk-provider-key-0123"
CLIENT_KEY = "sk-client-secret-4567"
ANTHROPIC_KEY = "sk-ant-client-89ab"
QUERY_KEY = "AIzaQuerySecret0123"

PATHS = [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"), ("/v1/responses", "openai"),
         ("/v1/completions", "openai"), ("/v1/embeddings", "openai"), ("/v1/messages/count_tokens", "anthropic"),
         ("/v1beta/models/g:generateContent", "gemini"), ("/v1beta/models/g:streamGenerateContent", "gemini"),
         ("/v1/models", "openai"), ("/v1/batches", "openai"), ("/v1/not/known", "openai")]
ATOMS = [b"1", b"-0", b"2.5e-3", b"1e400", b"123456789012345678901234567890", b'"x"', b'"\\ud800"',
         b'"caf\xc3\xa9"', b"null", b"true", b"NaN", b"-Infinity", b'"\\u0000\\n"',
         b'"%s"' % PROVIDER_KEY.encode(), b'"Bearer %s"' % CLIENT_KEY.encode(), b"{}", b"[]"]
KEYS = [b"model", b"stream", b"usage", b"error", b"metadata", b"user_id", b"choices", b"type", b"content",
        b"delta", b"message", b"candidates", b"usageMetadata", b"input_tokens", b"prompt_tokens", b"index"]
SSE_NAMES = [b"message_start", b"content_block_start", b"content_block_delta", b"message_delta", b"error",
             b"response.output_text.delta", b"response.completed", b"ping"]
ENDINGS = ["completed", "completed", "completed", "client_aborted", "refused", "upstream_error", "upstream_eof", "timeout",
           "shutdown"]


class Generator:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def value(self, depth: int = 0) -> bytes:
        r = self.r.random()
        if depth > 5 or r < 0.4:
            return self.r.choice(ATOMS)
        items = range(self.r.randint(0, 4))
        if r < 0.75:
            return b"{%s}" % b",".join(b'"%s":%s' % (self.r.choice(KEYS), self.value(depth + 1)) for _ in items)
        return b"[%s]" % b",".join(self.value(depth + 1) for _ in items)

    def body(self) -> bytes:
        r = self.r.random()
        if r < 0.5:
            return self.value()
        if r < 0.6:
            depth = self.r.randint(90, 3000)
            closed = depth if self.r.random() < 0.7 else self.r.randint(0, depth)
            return b'{"model":"m","x":%s%s}' % (b"[" * depth, b"]" * closed)
        if r < 0.7:
            return bytes(self.r.randint(0, 255) for _ in range(self.r.randint(1, 60)))
        if r < 0.75:
            return b""
        if r < 0.85:  # damaged inside, yet still a brace at each end
            body = b'{"model":"m","a":%s}' % self.value()
            cut = self.r.randint(1, len(body) - 2)
            return body[:cut] + body[cut + 1:]
        return self.value()[:self.r.randint(0, 40)]  # cut short

    def stream(self) -> bytes:
        out = []
        for _ in range(self.r.randint(0, 8)):
            r = self.r.random()
            if r < 0.55:
                out.append(b"data: %s\n\n" % self.value().replace(b"\n", b""))
            elif r < 0.7:
                out.append(b"event: %s\ndata: %s\n\n" % (self.r.choice(SSE_NAMES), self.value().replace(b"\n", b"")))
            elif r < 0.8:
                out.append(b": keepalive\n\n")
            elif r < 0.9:
                out.append(b"data: [DONE]\n\n")
            else:
                out.append(bytes(self.r.randint(0, 255) for _ in range(self.r.randint(1, 20))))
        return b"".join(out)

    def exchange(self) -> Exchange:
        r = self.r
        path, ptype = r.choice(PATHS)
        headers = [("Content-Type", "application/json")]
        for _ in range(r.randint(0, 4)):
            headers.append(r.choice([
                ("Authorization", "Bearer " + CLIENT_KEY), ("x-api-key", ANTHROPIC_KEY), ("Cookie", "a=b"),
                ("X-Session-Id", r.choice(["s1", "../..", "caf\u00e9", "x" * 100, ""])),
                ("Content-Encoding", r.choice(["gzip", "br", "deflate", "identity"])),
                ("X-Dup", "1"), ("x-dup", "2"), ("Odd%Name", "v")]))
        query = r.choice(["", "key=" + QUERY_KEY, "alt=sse", "a=%ZZ"])
        ex = Exchange(r.choice(["POST", "POST", "GET"]), path, query, headers, r.choice([1 << 20, 64]))
        ex.provider = Provider(ptype, ptype, "http://upstream")
        ex.provider_type = ex.family = ptype
        body = self.body()
        if r.random() < 0.1:
            body = gzip.compress(body)
        ex.request.add(0.0, body)
        ex.model = r.choice([None, "m", "gpt-4o", "\ud800"])
        ex.stream = r.choice([None, True, False])
        ex.status = r.choice([None, 200, 200, 200, 201, 204, 302, 400, 429, 500])
        if ex.status and 200 <= ex.status < 300 and dialects.select(ptype, ex.method, path) is not dialects.GENERIC \
                and not _json_object(body):
            ex.status = 400  # a model API answers 2xx only to a body it parsed
        ctype = r.choice(["application/json", "text/event-stream", "text/event-stream; charset=utf-8",
                          "application/x-ndjson", "", "text/html"])
        ex.resp_headers = [("Content-Type", ctype)] + r.choice(
            [[], [("Content-Encoding", "gzip")], [("Set-Cookie", "s=1"), ("set-cookie", "t=2")]])
        resp = self.stream() if "event-stream" in ctype or r.random() < 0.2 else self.body()
        if ("Content-Encoding", "gzip") in ex.resp_headers and r.random() < 0.7:
            resp = gzip.compress(resp)
        parts = r.randint(1, 4)
        for i in range(parts):
            ex.response.add(float(i), resp[i * len(resp) // parts:(i + 1) * len(resp) // parts])
        ex.ended = r.choice(ENDINGS)
        ex.ttft = r.choice([None, 1.5])
        ex.duration = r.random() * 100
        ex.assign_id()
        return ex


def _json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def credentials(ex: Exchange) -> list:
    """The secrets this exchange carried, which its lines must not hold."""
    out = [PROVIDER_KEY]
    if ("Authorization", "Bearer " + CLIENT_KEY) in ex.req_headers:
        out.append(CLIENT_KEY)
    if ("x-api-key", ANTHROPIC_KEY) in ex.req_headers:
        out.append(ANTHROPIC_KEY)
    if QUERY_KEY in ex.query:
        out.append(QUERY_KEY)
    return [s.encode() for s in out]


class GeneratedExchangesTest(unittest.TestCase):
    def test_every_exchange_gets_one_loadable_record_without_its_secrets(self):
        gen = Generator(SEED)
        encoder = Encoder(b"k" * 32, "x-session-id", 4096, provider_keys=[PROVIDER_KEY])
        failures = []
        for case in range(CASES):
            ex = gen.exchange()
            try:
                self.check(ex, encoder.encode(ex))
            except Exception as exc:  # collected: one run names every failing case
                failures.append("case %d (%s %s, status %s): %s: %s" % (
                    case, ex.method, ex.path, ex.status, type(exc).__name__, str(exc)[:200]))
        if failures:
            self.fail("seed %d, %d of %d cases:\n%s" % (SEED, len(failures), CASES, "\n".join(failures)))

    def check(self, ex: Exchange, lines: list) -> None:
        self.assertEqual([kind for kind, _, _ in lines].count(RECORDS), 1)
        for _, _, line in lines:
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(line.count(b"\n"), 1)
            json.loads(line)
            self.assertTrue(record.nests_within(line, record.MAX_NESTING + 3), "nested too deep to load")
            for secret in credentials(ex):
                self.assertNotIn(secret, line)


if __name__ == "__main__":
    unittest.main()
