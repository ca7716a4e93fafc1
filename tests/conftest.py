"""Shared fixtures: the real data in ../shared/data (tests skip with a reason without it)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.slides import SHARED_REASON, has_shared, shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_shared = pytest.mark.skipif(not has_shared(), reason=SHARED_REASON)


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


def start_script(script, *args, cwd=REPO):
    """Start an entry script in the background (output discarded); return the Popen."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_9_when(proc, ready, timeout=300, poll=0.02):
    """SIGKILL ``proc`` as soon as ``ready()`` is true (or at ``timeout``); fail the test if
    the process ended by itself first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    if proc.poll() is not None:
        pytest.fail(f"{' '.join(map(str, proc.args[1:2]))} finished before it could be interrupted; "
                    "make the input larger")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
