"""Azure OpenAI through the proxy: an ``azure`` provider serves Azure's paths (``/openai/...``)
and nothing else, each request forwarded untouched (path, ``api-version``, headers, body) and
recorded once, its ``api-key`` in no file.

The upstream is a :class:`tests.support.FakeUpstream` replaying the answers Azure documents: a
chat completion with its content filter results, the stream of ``tests/fixtures/openai_chat/
azure_content_filter.sse`` (a first chunk with empty ``choices`` and ``prompt_filter_results``),
and errors in OpenAI's shape (``{"error": {"code", "message"}}``).
"""

from __future__ import annotations

import json
import os
import urllib.parse

from proxy_llm import verify
from tests.support import FIXTURES, ProxyTestCase, Reply, all_files, header, provider, request, sse_reply

API_VERSION = "api-version=2024-10-21"
DEPLOYMENT = "gpt-4o-prod"
CHAT = "/openai/deployments/%s/chat/completions?%s" % (DEPLOYMENT, API_VERSION)
AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure's keys: 32 hex digits
CLIENT_KEY = "fedcba9876543210fedcba9876543210"
ENTRA_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-token-for-test"
MESSAGES = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 20}
# Azure's response headers, passed to the client as they came.
AZURE_HEADERS = [("apim-request-id", "6d0f6e2a-0000-4000-8000-000000000001"), ("x-ms-region", "Sweden Central"),
                 ("x-ratelimit-remaining-tokens", "29980")]
COMPLETION = {
    "choices": [{"content_filter_results": {"hate": {"filtered": False, "severity": "safe"},
                                            "self_harm": {"filtered": False, "severity": "safe"},
                                            "sexual": {"filtered": False, "severity": "safe"},
                                            "violence": {"filtered": False, "severity": "safe"}},
                 "finish_reason": "stop", "index": 0, "logprobs": None,
                 "message": {"content": "Hello!", "refusal": None, "role": "assistant"}}],
    "created": 1739900000, "id": "chatcmpl-AzF2", "model": "gpt-4o-2024-11-20", "object": "chat.completion",
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {
        "hate": {"filtered": False, "severity": "safe"}, "jailbreak": {"filtered": False, "detected": False}}}],
    "system_fingerprint": "fp_ee1d74bde0",
    "usage": {"completion_tokens": 2, "prompt_tokens": 11, "total_tokens": 13,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
}
NOT_FOUND = {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not "
                                                                "exist. If you created the deployment within the "
                                                                "last 5 minutes, please wait a moment and try again."}}


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, "openai_chat", name), "rb") as f:
        return f.read()


class AzureCase(ProxyTestCase):
    def azure(self, name: str = "azure", api_key: str = AZURE_KEY, models=()):
        return provider(name, "azure", self.upstream.url, api_key, models)

    def openai(self):
        return provider("openai", "openai", self.upstream.url, "sk-openai-configured-key", ["gpt-*"])

    def send(self, target: str, body=None, headers=None):
        data = json.dumps(MESSAGES if body is None else body).encode()
        hdrs = {"Content-Type": "application/json", "api-key": CLIENT_KEY}
        hdrs.update(headers or {})
        hdrs = dict((k, v) for k, v in hdrs.items() if v is not None)  # None: not sent
        return request(self.proxy.url, "POST", target, data, hdrs), data

    def only_record(self):
        records = self.proxy.records()
        self.assertEqual(len(records), 1, records)
        return records[0]

    def assertNoSecret(self, *secrets: str) -> None:
        """No file of the data dir holds a secret, plain or percent-encoded."""
        for path in all_files(self.proxy.data_dir):
            with open(path, "rb") as f:
                data = f.read()
            for secret in secrets:
                for form in (secret, urllib.parse.quote(secret, safe="")):
                    self.assertNotIn(form.encode(), data, "%s holds a secret" % path)

    def assertVerifies(self) -> None:
        found = verify.check(self.proxy.data_dir)
        self.assertTrue(found.ok, found.problems)


class ForwardTest(AzureCase):
    def test_deployment_chat_is_forwarded_untouched_with_the_configured_key(self):
        """Before Azure was supported: 404 "unknown path", nothing forwarded."""
        answer = json.dumps(COMPLETION).encode()
        self.replies.append(Reply(200, [("Content-Type", "application/json")] + AZURE_HEADERS, answer))
        self.start_proxy([self.openai(), self.azure()])
        (status, headers, body), sent = self.send(CHAT, headers={"Authorization": "Bearer " + ENTRA_TOKEN})
        self.assertEqual((status, body), (200, answer))
        for name, value in AZURE_HEADERS:
            self.assertEqual(header(headers, name), value)
        req = self.upstream.next_request()
        self.assertEqual((req.method, req.target, req.body), ("POST", CHAT, sent))
        # The configured key replaces the client's credentials, in Azure's header.
        self.assertEqual(req.header("api-key"), AZURE_KEY)
        self.assertIsNone(req.header("authorization"))
        rec = self.only_record()
        self.assertEqual(header(headers, "x-proxy-record-id"), rec["id"])
        self.assertEqual((rec["provider"], rec["provider_type"], rec["dialect"]), ("azure", "azure", "openai_chat"))
        self.assertEqual((rec["endpoint"], rec["query"], rec["model"]), (CHAT.split("?")[0], API_VERSION, DEPLOYMENT))
        self.assertEqual((rec["status_code"], rec["ended"], rec["stream"]), (200, "completed", False))
        self.assertEqual(rec["response_body"], COMPLETION)
        self.assertEqual(rec["request_body"], MESSAGES)
        self.assertEqual(rec["tokens_used"], {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13,
                                              "cached_tokens": 0, "reasoning_tokens": 0})
        self.assertEqual(rec["response_headers"]["x-ms-region"], "Sweden Central")
        self.assertNotIn("error", rec)
        self.assertNoSecret(AZURE_KEY, CLIENT_KEY, ENTRA_TOKEN)
        self.assertVerifies()

    def test_stream_with_prompt_filter_results_is_reassembled(self):
        stream = fixture("azure_content_filter.sse")
        with open(os.path.join(FIXTURES, "openai_chat", "azure_content_filter.expected.json")) as f:
            expected = json.load(f)
        self.replies.append(sse_reply([stream[:97], stream[97:400], stream[400:]], AZURE_HEADERS))
        self.start_proxy([self.azure()])
        body = dict(MESSAGES, stream=True, stream_options={"include_usage": True})
        (status, headers, got), _ = self.send(CHAT, body)
        self.assertEqual((status, got), (200, stream))
        self.assertEqual(header(headers, "content-type"), "text/event-stream")
        rec = self.only_record()
        self.assertEqual((rec["model"], rec["stream"], rec["ended"]), (DEPLOYMENT, True, "completed"))
        self.assertEqual(rec["response_body"], expected["response_body"])
        self.assertEqual(rec["tokens_used"], expected["tokens_used"])
        self.assertEqual(rec["stream_events"], stream.count(b"data: "))
        self.assertNoSecret(AZURE_KEY, CLIENT_KEY)
        self.assertVerifies()

    def test_errors_reach_the_client_as_sent_and_are_recorded_by_their_code(self):
        for status, body in ((404, NOT_FOUND), (400, json.loads(fixture("body_azure_content_filter.json")))):
            with self.subTest(status=status):
                answer = json.dumps(body).encode()
                self.replies.append(Reply(status, [("Content-Type", "application/json")] + AZURE_HEADERS, answer))
                self.start_proxy([self.azure()], data_dir=os.path.join(self.tmp, str(status)))
                (got_status, _, got), _ = self.send(CHAT)
                self.assertEqual((got_status, got), (status, answer))
                rec = self.only_record()
                self.assertEqual((rec["status_code"], rec["ended"]), (status, "completed"))
                self.assertEqual(rec["error"], {"type": body["error"]["code"], "message": body["error"]["message"]})
                self.assertEqual(rec["response_body"], body)
                self.assertNoSecret(AZURE_KEY, CLIENT_KEY)
                self.proxy.stop()

    def test_client_credentials_pass_through_without_an_api_key(self):
        """An azure provider with no api_key: the client's api-key, or its Entra ID token, goes
        to Azure, and to no record."""
        self.start_proxy([self.azure(api_key="")])
        for headers in ({"api-key": CLIENT_KEY}, {"api-key": None, "Authorization": "Bearer " + ENTRA_TOKEN}):
            with self.subTest(headers=sorted(headers)):
                (status, _, _), _ = self.send(CHAT, headers=headers)
                self.assertEqual(status, 200)
                req = self.upstream.next_request()
                self.assertEqual(req.header("api-key"), headers["api-key"])
                self.assertEqual(req.header("authorization"), headers.get("Authorization"))
        self.assertEqual(len(self.proxy.records()), 2)
        self.assertNoSecret(CLIENT_KEY, ENTRA_TOKEN)

    def test_v1_api_is_routed_by_the_body_model(self):
        self.start_proxy([self.azure("east", models=["east-*"]), self.azure("west", models=["west-*"])])
        for path in ("/openai/v1/chat/completions", "/openai/v1/responses"):
            with self.subTest(path=path):
                (status, _, _), sent = self.send(path, dict(MESSAGES, model="west-gpt-4o"))
                self.assertEqual(status, 200)
                req = self.upstream.next_request()
                self.assertEqual((req.target, req.body, req.header("api-key")), (path, sent, AZURE_KEY))
        records = self.proxy.records()
        self.assertEqual([(r["provider"], r["model"], r["endpoint"]) for r in records],
                         [("west", "west-gpt-4o", "/openai/v1/chat/completions"),
                          ("west", "west-gpt-4o", "/openai/v1/responses")])
        self.assertEqual([r["dialect"] for r in records], ["openai_chat", "openai_responses"])


class RoutingTest(AzureCase):
    def test_azure_paths_go_to_azure_providers_only(self):
        """Providers listed so that a glob walk over all of them would pick the wrong one: an
        Azure path goes to the azure provider whose globs match its deployment (not the openai
        provider listed before it, whose globs match too), else the first azure provider (the
        body's model does not route it); an OpenAI path never goes to an azure provider,
        whatever its globs."""
        self.start_proxy([self.azure("east", models=["east-*", "gpt-4o-mini"]), self.openai(),
                          self.azure("west", models=["gpt-4o*"])])
        cases = (("/openai/deployments/gpt-4o/chat/completions?" + API_VERSION, {}, "west"),
                 ("/openai/deployments/east-1/embeddings?" + API_VERSION, {}, "east"),
                 ("/openai/deployments/other/chat/completions?" + API_VERSION, {"model": "gpt-4o"}, "east"),
                 ("/v1/chat/completions", {"model": "gpt-4o-mini"}, "openai"))
        for target, extra, name in cases:
            with self.subTest(target=target):
                (status, _, _), _ = self.send(target, dict(MESSAGES, **extra))
                self.assertEqual(status, 200)
                req = self.upstream.next_request()
                self.assertEqual(req.target, target)
                if name == "openai":
                    self.assertEqual(req.header("authorization"), "Bearer sk-openai-configured-key")
                    self.assertIsNone(req.header("api-key"))
                else:
                    self.assertEqual(req.header("api-key"), AZURE_KEY)
                    self.assertIsNone(req.header("authorization"))
        records = self.proxy.records()
        self.assertEqual([r["provider"] for r in records], [name for _, _, name in cases])
        # The deployment when the body names no model; the body's model otherwise.
        self.assertEqual([r["model"] for r in records], ["gpt-4o", "east-1", "gpt-4o", "gpt-4o-mini"])
        metrics = request(self.proxy.url, "GET", "/metrics")[2].decode()
        self.assertIn('endpoint="/openai/deployments/*/chat/completions"', metrics)
        self.assertIn('endpoint="/openai/deployments/*/embeddings"', metrics)
        self.assertNotIn("east-1", metrics)

    def test_no_azure_provider_is_a_404_in_openai_shape(self):
        self.start_proxy([self.openai()])
        (status, _, body), _ = self.send(CHAT)
        self.assertEqual(status, 404)
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "not_found_error")
        self.assertIn("no azure provider configured for /openai/deployments/%s/chat/completions" % DEPLOYMENT,
                      error["message"])
        self.assertTrue(self.upstream.requests.empty())
        rec = self.only_record()
        self.assertEqual((rec["ended"], rec["status_code"], rec["provider"]), ("refused", 404, None))
        self.assertNoSecret(CLIENT_KEY, "sk-openai-configured-key")

    def test_other_paths_still_get_the_unknown_path_404(self):
        self.start_proxy([self.openai(), self.azure()])
        for target in ("/openai", "/openaiv1/chat/completions", "/azure/openai/deployments/x/chat/completions"):
            with self.subTest(target=target):
                (status, _, body), _ = self.send(target)
                self.assertEqual(status, 404)
                message = json.loads(body)["error"]["message"]
                self.assertIn("proxy_llm forwards /v1/, /v1beta/", message)
                self.assertIn(", /openai/", message)
        self.assertTrue(self.upstream.requests.empty())
        self.assertEqual(self.proxy.records(), [])


if __name__ == "__main__":
    import unittest

    unittest.main()
