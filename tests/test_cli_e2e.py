"""The CLI as a user runs it: the redis-cli walk-through of docs/protocol.md, and `voxqueue demo`."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Stack

ROOT = Path(__file__).resolve().parent.parent


def walkthrough_script() -> str:
    text = (ROOT / "docs" / "protocol.md").read_text()
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    match = re.search(r"```sh\n(.*?)```", block, re.S)
    assert match, "docs/protocol.md lost its walk-through block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
def test_redis_cli_walkthrough_in_protocol_doc_works(tmp_path: Path) -> None:
    stack = Stack(tmp_path).start()
    try:
        stack.start_worker("walk")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough_script()],
            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "REDIS_PORT": str(stack.redis.port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        finals = result.stdout.strip().splitlines()[-2:]
        assert finals == [" ".join(f"f{n}" for n in range(25)), " ".join(f"f{n}" for n in range(25, 50))]
    finally:
        stack.stop()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_and_leaves_nothing_behind() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # nothing configured: no Redis URL, no key
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--engine", "marker", "--speed", "0"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout
    assert "frames 386" in result.stdout  # the bundled sample: 7.72 s
    port = int(re.search(r"redis-server on port (\d+)", result.stderr).group(1))  # type: ignore[union-attr]
    assert not port_open(port), "the demo left its redis-server running"
    assert "Traceback" not in result.stderr
