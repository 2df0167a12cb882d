"""Small real artefacts (a tokenizer trained here) for tests and benchmarks on a machine without the hub."""
