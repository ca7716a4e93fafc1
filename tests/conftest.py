"""Shared fixtures: the real data in ../shared/data (tests skip with a reason without it)."""
import os
import subprocess
import sys

import pytest

from tests.slides import SHARED_REASON, has_shared, shared

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_shared = pytest.mark.skipif(not has_shared(), reason=SHARED_REASON)


@pytest.fixture
def shared_path():
    if not has_shared():
        pytest.skip(SHARED_REASON)
    return shared


def run_script(script, *args, cwd=REPO, timeout=600):
    """Run an entry script as a user would; return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
