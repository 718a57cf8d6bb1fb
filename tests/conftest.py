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


@pytest.fixture
def world_tmp():
    """A temp dir the unprivileged user can traverse (pytest's tmp_path is
    root-only 0700 when tests run as root). Removed afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="upparat-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
