"""Shared fixtures: the real data in ../shared/data (tests skip with a reason without it)."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.slides import SHARED_REASON, has_shared, shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests' set-up: they read test_net's CSVs, whose RLE fields are megabytes long
csv.field_size_limit(1 << 31)

requires_shared = pytest.mark.skipif(not has_shared(), reason=SHARED_REASON)


def pytest_configure(config):
    """test_net's default backend (auto) caches ONNX exports in the user's cache folder: the tests
    (and every process they start) use a folder of their own, shared by the session and removed
    after it."""
    config._glomeruli_cache = tempfile.mkdtemp(prefix="glomeruli_test_cache_")
    os.environ["XDG_CACHE_HOME"] = config._glomeruli_cache


def pytest_unconfigure(config):
    folder = getattr(config, "_glomeruli_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def shared_path():
    if not has_shared():
        pytest.skip(SHARED_REASON)
    return shared


def free_port() -> int:
    """A TCP port that nothing listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(script, *args, cwd=REPO, timeout=600):
    """Run an entry script as a user would; return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def start_script(script, *args, cwd=REPO, pause_at=None, pause_file=None):
    """Start an entry script in the background (output discarded); return the Popen. With
    ``pause_at`` (``"<point>@<n>"``, see ``utils.setup.pause_point``) it stops there, writes
    ``pause_file`` and waits to be killed (:func:`kill_9_at_pause`)."""
    env = dict(os.environ)
    if pause_at:
        env.update(GLOMERULI_PAUSE_AT=pause_at, GLOMERULI_PAUSE_FILE=str(pause_file))
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def kill_9_at_pause(proc, pause_file, timeout=600):
    """SIGKILL ``proc`` once it has stopped at its pause point (``pause_file`` written): the same
    point on every machine, however fast. Fails the test if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not os.path.exists(pause_file):
        time.sleep(0.02)
    if proc.poll() is not None or not os.path.exists(pause_file):
        pytest.fail(f"{' '.join(map(str, proc.args[1:2]))} never reached its pause point "
                    f"(exit code {proc.poll()})")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


