import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for the whole session: starting it takes ~13 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
