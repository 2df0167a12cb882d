"""The fault-injection suite: real processes, each case bounded in time (`pytest -m faults`)."""
