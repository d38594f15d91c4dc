"""Markers for the optimizer tests (registered here so this directory owns them)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "deepspeed: needs DeepSpeed (CPU accelerator, gloo)")
    config.addinivalue_line("markers", "distributed: spawns real gloo processes")
