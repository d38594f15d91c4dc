"""The whole recipe in one command (`python -m pipeline`): see `pipeline/__main__.py`."""
