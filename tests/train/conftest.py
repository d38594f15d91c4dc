from tests.helpers.fixtures import one_thread  # noqa: F401 (autouse fixture)
