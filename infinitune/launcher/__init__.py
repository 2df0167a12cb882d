"""The `infinitune` command line and the root job config. May import every other part; nothing imports it."""
