"""proxy_llm's benchmark: ``python -m tests.bench`` (see run.py). Not part of unittest discovery
(tests/test_bench_smoke.py runs a seconds-long pass of the same code)."""
