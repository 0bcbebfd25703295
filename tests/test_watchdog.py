"""The suite's last line of defence against hangs (tests/conftest.py): a teardown that hangs after
pytest-timeout has already failed the test still ends the run, with every thread's stack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HANGING = textwrap.dedent(
    """
    import time
    import pytest

    @pytest.fixture
    def hangs_in_teardown():
        yield
        time.sleep(120)  # pytest-timeout's one-shot timer has already fired: nothing bounds this

    @pytest.mark.timeout(1)
    def test_times_out(hangs_in_teardown):
        time.sleep(30)
    """
)


def test_a_teardown_hanging_after_the_timeout_still_ends_the_run(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    (tests / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tests / "harness.py").write_text((Path(__file__).parent / "harness.py").read_text())
    (tests / "test_hang.py").write_text(HANGING)
    env = dict(os.environ, VOXQUEUE_TEST_WATCHDOG_GRACE="2", PYTHONPATH=os.getcwd())
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hang.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=60,
    )
    took = time.monotonic() - started
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert took < 30, f"the run took {took:.1f}s: the watchdog did not end it\n{output[-2000:]}"
    assert proc.returncode != 0
    assert "most recent call first" in output, output[-2000:]
    assert "hangs_in_teardown" in output  # the dump shows where it hung
    # ... and the last line names the test and the phase, for logs read from their tail.
    last = output.rstrip().splitlines()[-1]
    assert last.startswith("watchdog: tests/test_hang.py::test_times_out (teardown)"), last
