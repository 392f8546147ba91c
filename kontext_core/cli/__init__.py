"""The `kontext` command line (also `python -m kontext_core`): demo, edit, generate, inspect, fetch."""
