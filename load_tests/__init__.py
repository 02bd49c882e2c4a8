"""Load generator for a running loraplex (or any OpenAI-compatible) server: `python -m load_tests --help`."""
