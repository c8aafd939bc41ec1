import pytest

from tests import fixtures


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    """name -> decompressed copy of ../shared/fixtures/<name> (skips/fails when absent)."""
    root = tmp_path_factory.mktemp("releases")
    return lambda name: fixtures.release_copy(name, root)
