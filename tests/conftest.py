"""Tests see mltk's built-ins only, unless a test installs a plugin on purpose (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["MLTK_LOAD_PLUGINS"] = ""  # before mltk.plugins is first imported

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_mltk(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m mltk ARGS`` in a fresh process; plugin loading follows ``env`` (None unsets)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "mltk", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def mltk_cli():
    return run_mltk
