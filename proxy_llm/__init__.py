"""proxy_llm: a recording proxy for LLM APIs, standard library only."""

__version__ = "0.1.0"
