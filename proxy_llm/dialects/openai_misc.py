"""OpenAI legacy completions (``/v1/completions``) and embeddings (``/v1/embeddings``).

Legacy completions stream ``text_completion`` chunks (``choices[].text``,
``logprobs`` with ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset`` lists, ``finish_reason``), ``data: [DONE]`` last; the
reassembled body is a ``text_completion`` with one choice per index, text
concatenated and logprobs lists extended. Embeddings are never streamed: only
their ``usage`` (``prompt_tokens``, ``total_tokens``) is read.
"""

from __future__ import annotations

from .base import Dialect, Result, error_from
from .openai_chat import OpenAIChat, merge_delta, openai_usage

__all__ = ["OpenAICompletions", "OpenAIEmbeddings"]


class _TextChoice(object):
    __slots__ = ("index", "fields")

    def __init__(self, index):
        self.index = index
        self.fields = {}  # type: dict

    def add(self, choice):
        merge_delta(self.fields, dict((k, v) for k, v in choice.items()
                                      if k not in ("index", "finish_reason")))
        if choice.get("finish_reason") is not None:
            self.fields["finish_reason"] = choice["finish_reason"]

    @property
    def finish_reason(self):
        return self.fields.get("finish_reason")

    def build(self):
        out = {"text": self.fields.get("text") or "", "index": self.index,
               "logprobs": self.fields.get("logprobs"),
               "finish_reason": self.fields.get("finish_reason")}
        for key, value in self.fields.items():
            if key not in out:
                out[key] = value
        return out


class OpenAICompletions(OpenAIChat):
    name = "openai_completions"
    object_name = "text_completion"
    choice_class = _TextChoice


class OpenAIEmbeddings(Dialect):
    name = "openai_embeddings"

    def _from_body(self, body):
        usage = body.get("usage") if isinstance(body, dict) else None
        return Result(body, openai_usage(usage), error_from(body), body is not None)
