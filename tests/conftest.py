import pytest

from tests.support import start_mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto on a free port; yields the port. Stopped by PID."""
    proc, port = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield port
    finally:
        proc.stop()
