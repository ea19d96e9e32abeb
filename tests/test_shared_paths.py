"""Paths that several providers' APIs share (``GET /v1/models``, ``/v1/models/<id>``,
``/v1/files``, ``/v1/batches`` ...): each request reaches the provider whose API it speaks, with
its own credential, and no other provider sees it.

Every provider is a :class:`tests.support.FakeUpstream` of its own on a real socket, answering
in its API's shape, and configured without an ``api_key`` (the client's credential passes
through: the case where a request sent to the wrong provider carries a key to a third party).
Requests are sent raw, as each SDK sends them, and, where the SDK is installed, by the official
SDK itself through the proxy as a subprocess.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import unittest
from typing import Dict, List, Optional

from tests.support import (FakeUpstream, InProcessProxy, ProxyProcess, Request, base_config, json_reply,
                           provider, request)

from tests.sdks import anthropic, genai, genai_types, openai  # (None when not installed: the SDK tests skip)

FAMILIES = ("openai", "anthropic", "gemini")
# Each API's key, shaped as the provider issues them, to find wherever they went.
OPENAI_KEY = "sk-proj-openai-" + "o" * 24
ANTHROPIC_KEY = "sk-ant-api03-" + "a" * 24
GEMINI_KEY = "AIza" + "g" * 35
KEYS = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY, "gemini": GEMINI_KEY}
ANTHROPIC_VERSION = "2023-06-01"


def family_reply(family: str):
    """A provider's answer to a model listing or lookup, in its API's shape, naming the family
    in the model id (so that an SDK's result says which provider answered); ``{"ok": true}`` to
    anything else."""

    def answer(req: Request):
        path = req.path.split("/v1/", 1)[-1].split("/v1beta/", 1)[-1]
        if path.endswith(":generateContent"):
            return json_reply({"candidates": [{"content": {"role": "model", "parts": [{"text": "from-" + family}]},
                                               "finishReason": "STOP", "index": 0}]})
        if path == "models":
            if family == "openai":
                return json_reply({"object": "list", "data": [
                    {"id": "gpt-from-openai", "object": "model", "created": 1, "owned_by": "openai"}]})
            if family == "anthropic":
                return json_reply({"data": [{"id": "claude-from-anthropic", "type": "model", "display_name": "C",
                                             "created_at": "2025-01-01T00:00:00Z"}],
                                   "has_more": False, "first_id": "claude-from-anthropic",
                                   "last_id": "claude-from-anthropic"})
            return json_reply({"models": [{"name": "models/gemini-from-gemini", "displayName": "G"}]})
        if path.startswith("models/"):
            model = path[len("models/"):]
            if family == "openai":
                return json_reply({"id": model + "-from-openai", "object": "model", "created": 1, "owned_by": "openai"})
            if family == "anthropic":
                return json_reply({"id": model + "-from-anthropic", "type": "model", "display_name": "C",
                                   "created_at": "2025-01-01T00:00:00Z"})
            return json_reply({"name": "models/%s-from-gemini" % model, "displayName": "G"})
        if path == "messages":  # (a server behind any type may speak the Messages API: vLLM, Ollama)
            return json_reply({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                               "content": [{"type": "text", "text": "from-" + family}], "stop_reason": "end_turn",
                               "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})
        return json_reply({"ok": True, "provider": family})

    return answer


class SharedPathCase(unittest.TestCase):
    """Three fake providers, one per API, and the proxy in front of them with no api_key."""

    families = FAMILIES  # the providers configured, in order

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_shared_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.upstreams: Dict[str, FakeUpstream] = {}
        for family in FAMILIES:
            up = FakeUpstream(family_reply(family)).start()
            self.addCleanup(up.stop)
            self.upstreams[family] = up
        self.proxy = self.start_proxy()

    def providers(self) -> List[dict]:
        return [provider(f, f, self.upstreams[f].url) for f in self.families]

    def start_proxy(self):
        proxy = InProcessProxy(base_config(self.providers(), os.path.join(self.tmp, "data"))).__enter__()
        self.addCleanup(proxy.stop)
        return proxy

    def received(self) -> Dict[str, List[Request]]:
        """What each provider received since the last call. A request the proxy forwarded is in
        its provider's queue before the provider answers, so before the client has its answer."""
        out: Dict[str, List[Request]] = {}
        for family, up in self.upstreams.items():
            got = []
            while True:
                try:
                    got.append(up.requests.get_nowait())
                except queue.Empty:
                    break
            out[family] = got
        return out

    def assertOnlyReached(self, family: str, count: int = 1) -> List[Request]:
        """Exactly ``count`` requests reached ``family``'s provider and none any other; no
        provider saw a key of another API."""
        got = self.received()
        for other in FAMILIES:
            if other != family:
                self.assertEqual([(r.method, r.target) for r in got[other]], [],
                                 "a request for %s reached %s" % (family, other))
        self.assertEqual(len(got[family]), count, [(r.method, r.target) for r in got[family]])
        for req in got[family]:
            self.assertNoForeignKey(family, req)
        return got[family]

    def assertNoForeignKey(self, family: str, req: Request) -> None:
        seen = req.target + "\n" + "\n".join("%s: %s" % kv for kv in req.headers)
        for other, key in KEYS.items():
            if other != family:
                self.assertNotIn(key, seen, "%s's key reached %s" % (other, family))

    def send(self, method: str, path: str, headers: Dict[str, str], body: Optional[bytes] = None):
        return request(self.proxy.url, method, path, body, headers)


# How each SDK asks for a shared path (checked against anthropic 2.14 and 2.17, openai 3.57 and
# 3.63, google-genai 3.6: the Anthropic SDK sends its key as x-api-key or, lately, Authorization:
# Bearer, always with anthropic-version; google-genai sends x-goog-api-key to /v1/ by default).
ANTHROPIC_X_API_KEY = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": ANTHROPIC_VERSION}
ANTHROPIC_BEARER = {"Authorization": "Bearer " + ANTHROPIC_KEY, "anthropic-version": ANTHROPIC_VERSION}
GEMINI_HEADER = {"x-goog-api-key": GEMINI_KEY}
OPENAI_BEARER = {"Authorization": "Bearer " + OPENAI_KEY}


# Each row: a request as a client sends it, and the provider it must reach with its headers.
ROUTES = [
    # The Anthropic SDK's models.list() and models.retrieve(), with its key in x-api-key or
    # (anthropic 2.x, or an OAuth token) in Authorization.
    ("GET", "/v1/models", ANTHROPIC_X_API_KEY, "anthropic"),
    ("GET", "/v1/models?limit=20", ANTHROPIC_X_API_KEY, "anthropic"),
    ("GET", "/v1/models/claude-sonnet-4-5", ANTHROPIC_X_API_KEY, "anthropic"),
    ("GET", "/v1/models", ANTHROPIC_BEARER, "anthropic"),
    ("GET", "/v1/models/claude-sonnet-4-5", ANTHROPIC_BEARER, "anthropic"),
    ("GET", "/v1/files", ANTHROPIC_X_API_KEY, "anthropic"),
    ("GET", "/v1/models", {"x-api-key": ANTHROPIC_KEY}, "anthropic"),  # curl, without anthropic-version
    # google-genai's models.get() and models.list(), files, batches and caches: all under /v1/.
    ("GET", "/v1/models/gemini-2.5-flash", GEMINI_HEADER, "gemini"),
    ("GET", "/v1/models", GEMINI_HEADER, "gemini"),
    ("GET", "/v1/models?pageSize=50", GEMINI_HEADER, "gemini"),
    ("GET", "/v1/files", GEMINI_HEADER, "gemini"),
    ("GET", "/v1/batches", GEMINI_HEADER, "gemini"),
    ("GET", "/v1/cachedContents", GEMINI_HEADER, "gemini"),
    ("DELETE", "/v1/files/abc", GEMINI_HEADER, "gemini"),
    # Gemini's key in the query, its name percent-encoded too.
    ("GET", "/v1/models/gemini-2.5-flash?key=" + GEMINI_KEY, {}, "gemini"),
    ("GET", "/v1/models?pageSize=5&k%65y=" + GEMINI_KEY, {}, "gemini"),
    # OpenAI's stay with OpenAI.
    ("GET", "/v1/models", OPENAI_BEARER, "openai"),
    ("GET", "/v1/models/gpt-4o", OPENAI_BEARER, "openai"),
    ("GET", "/v1/models/ft:gpt-4o-mini:org:x:1", OPENAI_BEARER, "openai"),
    ("GET", "/v1/files", OPENAI_BEARER, "openai"),
    ("GET", "/v1/batches/batch_1", OPENAI_BEARER, "openai"),
    # An OpenAI path is OpenAI's whatever the headers say: the hot path looks at none.
    ("POST", "/v1/chat/completions", dict(OPENAI_BEARER, **{"anthropic-version": ANTHROPIC_VERSION}), "openai"),
]


class SharedPathRoutingTest(SharedPathCase):
    def test_each_request_reaches_the_provider_of_its_api_with_its_credential(self):
        for method, path, headers, family in ROUTES:
            with self.subTest(method=method, path=path, headers=sorted(headers)):
                body = b'{"messages": []}' if method == "POST" else None
                status, _, answer = self.send(method, path, dict(headers, **{"Content-Type": "application/json"}), body)
                self.assertEqual(status, 200, answer)
                req, = self.assertOnlyReached(family)
                self.assertEqual((req.method, req.target), (method, path))
                for name, value in headers.items():
                    self.assertEqual(req.header(name), value)
                if path.startswith("/v1/models"):
                    self.assertIn(("from-" + family).encode(), answer)

    def test_the_record_names_the_provider(self):
        self.send("GET", "/v1/models", ANTHROPIC_X_API_KEY)
        self.send("GET", "/v1/models/gemini-2.5-flash", GEMINI_HEADER)
        self.received()
        recs = self.proxy.records()
        self.assertEqual([(r["provider"], r["endpoint"]) for r in recs],
                         [("anthropic", "/v1/models"), ("gemini", "/v1/models/gemini-2.5-flash")])


class FamilyOfTest(unittest.TestCase):
    """errors.family_of: the path first; the headers only for a path it cannot place."""

    def test_the_path_places_what_it_can_without_the_headers(self):
        from proxy_llm.errors import family_of
        anthropic_headers = list(ANTHROPIC_X_API_KEY.items())
        for path, family in (("/v1/chat/completions", "openai"), ("/v1/responses", "openai"),
                             ("/v1/embeddings", "openai"), ("/v1/messages", "anthropic"),
                             ("/v1beta/models", "gemini"), ("/v1/models/gemini-2.5-flash:generateContent", "gemini"),
                             # An API version's root of Gemini's is Gemini's: /v1beta went to OpenAI.
                             ("/v1beta", "gemini"), ("/v1alpha", "gemini")):
            with self.subTest(path=path):
                self.assertEqual(family_of(path, list(GEMINI_HEADER.items()) if family != "gemini" else
                                           anthropic_headers, "key=x"), family)

    def test_a_shared_path_is_placed_by_its_headers(self):
        from proxy_llm.errors import family_of
        for headers, query, family in (
                ([("Anthropic-Version", "2023-06-01"), ("X-Goog-Api-Key", "k")], "key=x", "anthropic"),
                ([("Authorization", "Bearer k"), ("anthropic-version", "2023-06-01")], "", "anthropic"),
                ([("X-API-Key", "k")], "", "anthropic"),
                ([("x-api-key", "k"), ("authorization", "Bearer k")], "", "openai"),
                ([("x-goog-api-key", "k"), ("authorization", "Bearer k")], "", "gemini"),
                ([("x-api-key", "k")], "alt=sse;key=x", "gemini"),
                ([], "pageSize=5&%6B%65%79=x", "gemini"),
                ([], "apikey=x&keys=1&key", "openai"),
                ([("authorization", "Bearer k")], "", "openai"), ([], "", "openai")):
            with self.subTest(headers=headers, query=query):
                self.assertEqual(family_of("/v1/models", headers, query), family)
                self.assertEqual(family_of("/v1/files/file-1", headers, query), family)
        self.assertEqual(family_of("/v1/models"), "openai")  # no headers given: the default


class NoProviderOfTheFamilyTest(SharedPathCase):
    families = ("openai",)

    def test_an_anthropic_listing_is_refused_in_anthropic_shape_not_sent_to_openai(self):
        for headers in (ANTHROPIC_X_API_KEY, ANTHROPIC_BEARER):
            with self.subTest(headers=sorted(headers)):
                status, _, body = self.send("GET", "/v1/models", headers)
                self.assertEqual(status, 404, body)
                answer = json.loads(body)
                self.assertEqual(answer["type"], "error")  # Anthropic's error shape
                self.assertEqual(answer["error"]["type"], "not_found_error")
                self.assertEqual(self.received()["openai"], [])

    def test_a_gemini_lookup_is_refused_in_gemini_shape(self):
        status, _, body = self.send("GET", "/v1/models/gemini-2.5-flash", GEMINI_HEADER)
        self.assertEqual(status, 404, body)
        self.assertEqual(json.loads(body)["error"]["status"], "NOT_FOUND")
        self.assertEqual(self.received()["openai"], [])


def cross_providers(upstreams: Dict[str, FakeUpstream]) -> List[dict]:
    """Providers whose model globs route a request away from its API's type: an openai-type
    "local" (a server speaking every API, as vLLM, Ollama or LiteLLM do) for qwen-* and gpt-*."""
    return [provider("local", "openai", upstreams["openai"].url, models=["qwen-*", "gpt-*"]),
            provider("anthropic", "anthropic", upstreams["anthropic"].url, models=["claude-*"]),
            provider("gemini", "gemini", upstreams["gemini"].url, models=["gemini-*"])]


class ForeignCredentialTest(SharedPathCase):
    """Whatever routes a request to a provider of another type than its API's (here, model
    globs), the client's credential of its own API does not go with it; a provider's own
    credentials do. The openai-type provider stands for a local server that speaks every API
    (vLLM, Ollama, LiteLLM)."""

    def providers(self) -> List[dict]:
        return cross_providers(self.upstreams)

    def forward(self, method: str, path: str, headers: Dict[str, str], model: Optional[str], to: str) -> Request:
        body = json.dumps({"model": model, "max_tokens": 5, "messages": []}).encode() if model else b"{}"
        status, _, answer = self.send(method, path, dict(headers, **{"Content-Type": "application/json"}), body)
        self.assertEqual(status, 200, answer)
        got = self.received()
        self.assertEqual({f: len(r) for f, r in got.items()}, {f: int(f == to) for f in FAMILIES})
        return got[to][0]

    def test_an_anthropic_request_routed_to_another_type_carries_no_anthropic_key(self):
        for headers in (ANTHROPIC_X_API_KEY, ANTHROPIC_BEARER,
                        dict(ANTHROPIC_X_API_KEY, **{"Authorization": "Bearer " + ANTHROPIC_KEY})):
            with self.subTest(headers=sorted(headers)):
                req = self.forward("POST", "/v1/messages", headers, "qwen-3", "openai")
                self.assertIsNone(req.header("x-api-key"))
                self.assertIsNone(req.header("authorization"))
                self.assertEqual(req.header("anthropic-version"), ANTHROPIC_VERSION)  # not a credential
                self.assertNoForeignKey("openai", req)
        with self.subTest("to a gemini provider"):
            req = self.forward("POST", "/v1/messages", ANTHROPIC_BEARER, "gemini-2.5-flash", "gemini")
            self.assertIsNone(req.header("authorization"))
        with self.subTest("a token of the server's own goes on"):
            # A key that is not another API's (a local server's own, given to an Anthropic
            # client as its auth token) passes through: only another API's credentials stay.
            req = self.forward("POST", "/v1/messages", {"Authorization": "Bearer local-server-key",
                                                        "anthropic-version": ANTHROPIC_VERSION}, "qwen-3", "openai")
            self.assertEqual(req.header("authorization"), "Bearer local-server-key")

    def test_a_gemini_request_routed_to_another_type_carries_no_gemini_key(self):
        path = "/v1beta/models/qwen-3:generateContent?alt=json&key=%s&x=1" % GEMINI_KEY
        req = self.forward("POST", path, dict(GEMINI_HEADER, **{"api-key": "azure-key-1"}), None, "openai")
        self.assertEqual(req.target, "/v1beta/models/qwen-3:generateContent?alt=json&x=1")
        self.assertIsNone(req.header("x-goog-api-key"))
        self.assertEqual(req.header("api-key"), "azure-key-1")  # Azure's: an openai provider's own
        self.assertNoForeignKey("openai", req)
        for query, left in (("k%65y=" + GEMINI_KEY, ""), ("alt=json;key=" + GEMINI_KEY, "?alt=json"),
                            ("alt=json?key=" + GEMINI_KEY, "?alt=json")):
            with self.subTest(query=query):
                req = self.forward("POST", "/v1/models/claude-x:generateContent?" + query, GEMINI_HEADER, None,
                                   "anthropic")
                self.assertEqual(req.target, "/v1/models/claude-x:generateContent" + left)
                self.assertIsNone(req.header("x-goog-api-key"))

    def test_each_provider_gets_the_credentials_it_takes_and_no_other(self):
        """OpenAI clients of Anthropic's and Google's OpenAI-compatible endpoints send those
        providers' keys as Bearer tokens: to an anthropic or gemini provider, or to an openai one
        (which may be that endpoint), they go on; the other APIs' own headers do not. Each API's
        own requests keep their credentials."""
        req = self.forward("POST", "/v1/messages", dict(ANTHROPIC_X_API_KEY, **{"api-key": ANTHROPIC_KEY}),
                           "claude-x", "anthropic")  # (the Anthropic SDK on Azure Foundry sends both)
        self.assertEqual((req.header("x-api-key"), req.header("api-key")), (ANTHROPIC_KEY, ANTHROPIC_KEY))
        req = self.forward("POST", "/v1beta/models/gemini-2.5-flash:generateContent?key=" + GEMINI_KEY,
                           GEMINI_HEADER, None, "gemini")
        self.assertEqual((req.header("x-goog-api-key"), req.query), (GEMINI_KEY, "key=" + GEMINI_KEY))
        for model, to, key in (("claude-x", "anthropic", ANTHROPIC_KEY), ("gemini-2.5-flash", "gemini", GEMINI_KEY),
                               ("gpt-x", "openai", GEMINI_KEY), ("gpt-x", "openai", ANTHROPIC_KEY)):
            with self.subTest(model=model, key=key[:6]):
                req = self.forward("POST", "/v1/chat/completions",
                                   {"Authorization": "Bearer " + key, "x-api-key": ANTHROPIC_KEY,
                                    "x-goog-api-key": GEMINI_KEY, "api-key": "azure-key-1"}, model, to)
                self.assertEqual(req.header("authorization"), "Bearer " + key)
                self.assertEqual(req.header("x-api-key"), ANTHROPIC_KEY if to == "anthropic" else None)
                self.assertEqual(req.header("x-goog-api-key"), GEMINI_KEY if to == "gemini" else None)
                self.assertEqual(req.header("api-key"), None if to == "gemini" else "azure-key-1")

@unittest.skipUnless(anthropic is not None and openai is not None and genai is not None,
                     "the official SDKs (anthropic, openai, google-genai) are not installed")
class SDKSharedPathTest(SharedPathCase):
    """The official SDKs, through the proxy as a subprocess."""

    def start_proxy(self):
        proxy = ProxyProcess(base_config(self.providers(), os.path.join(self.tmp, "data")))
        self.addCleanup(proxy.cleanup)
        return proxy

    def test_each_sdk_lists_and_gets_models_from_its_own_provider(self):
        for kwargs in ({"api_key": ANTHROPIC_KEY}, {"auth_token": ANTHROPIC_KEY}):
            with self.subTest(sdk="anthropic", auth=sorted(kwargs)):
                client = anthropic.Anthropic(base_url=self.proxy.url, max_retries=0, timeout=10.0, **kwargs)
                self.addCleanup(client.close)
                self.assertEqual([m.id for m in client.models.list()], ["claude-from-anthropic"])
                self.assertEqual(client.models.retrieve("claude-sonnet-4-5").id, "claude-sonnet-4-5-from-anthropic")
                for req in self.assertOnlyReached("anthropic", 2):
                    self.assertIn(ANTHROPIC_KEY, (req.header("x-api-key") or "") + (req.header("authorization") or ""))
        with self.subTest(sdk="google-genai"):
            client = genai.Client(api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(
                base_url=self.proxy.url, timeout=10000, retry_options=genai_types.HttpRetryOptions(attempts=1)))
            self.addCleanup(client.close)
            self.assertEqual(client.models.get(model="gemini-2.5-flash").name, "models/gemini-2.5-flash-from-gemini")
            self.assertEqual([m.name for m in client.models.list()], ["models/gemini-from-gemini"])
            for req in self.assertOnlyReached("gemini", 2):
                self.assertEqual(req.header("x-goog-api-key"), GEMINI_KEY)
        with self.subTest(sdk="openai"):
            client = openai.OpenAI(base_url=self.proxy.url + "/v1", api_key=OPENAI_KEY, max_retries=0, timeout=10.0)
            self.addCleanup(client.close)
            self.assertEqual([m.id for m in client.models.list()], ["gpt-from-openai"])
            self.assertEqual(client.models.retrieve("gpt-4o").id, "gpt-4o-from-openai")
            for req in self.assertOnlyReached("openai", 2):
                self.assertEqual(req.header("authorization"), "Bearer " + OPENAI_KEY)


@unittest.skipUnless(anthropic is not None and genai is not None,
                     "the official SDKs (anthropic, google-genai) are not installed")
class SDKForeignCredentialTest(SharedPathCase):
    """The official SDKs, through the proxy as a subprocess, asking for a model that an
    openai-type provider serves: their keys stay behind."""

    def providers(self) -> List[dict]:
        return cross_providers(self.upstreams)

    start_proxy = SDKSharedPathTest.start_proxy

    def test_sdk_requests_routed_to_another_type_carry_no_key_of_their_api(self):
        for kwargs in ({"api_key": ANTHROPIC_KEY}, {"auth_token": ANTHROPIC_KEY}):
            with self.subTest(sdk="anthropic", auth=sorted(kwargs)):
                client = anthropic.Anthropic(base_url=self.proxy.url, max_retries=0, timeout=10.0, **kwargs)
                self.addCleanup(client.close)
                message = client.messages.create(model="qwen-3", max_tokens=5,
                                                 messages=[{"role": "user", "content": "hi"}])
                self.assertEqual(message.content[0].text, "from-openai")
                req, = self.assertOnlyReached("openai")
                self.assertEqual(req.path, "/v1/messages")
                self.assertIsNone(req.header("x-api-key"))
                self.assertIsNone(req.header("authorization"))
        with self.subTest(sdk="google-genai"):
            client = genai.Client(api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(
                base_url=self.proxy.url, timeout=10000, retry_options=genai_types.HttpRetryOptions(attempts=1)))
            self.addCleanup(client.close)
            self.assertEqual(client.models.generate_content(model="qwen-3", contents="hi").text, "from-openai")
            req, = self.assertOnlyReached("openai")
            self.assertTrue(req.path.endswith("/models/qwen-3:generateContent"), req.path)
            self.assertIsNone(req.header("x-goog-api-key"))


if __name__ == "__main__":
    unittest.main()
