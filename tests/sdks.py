"""The official client SDKs the tests drive the proxy with, each None when not installed (the
tests that need one skip themselves: `python -m unittest` runs with the standard library alone)."""

try:
    import anthropic
except ImportError:
    anthropic = None
try:
    import openai
except ImportError:
    openai = None
try:
    from google import genai
    from google.genai import types as genai_types
except ImportError:
    genai = genai_types = None

__all__ = ["anthropic", "openai", "genai", "genai_types"]
