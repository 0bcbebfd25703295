"""The CLI as a user runs it: the redis-cli walk-through of docs/protocol.md, and `voxqueue demo`."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.harness import Stack
from worker.emulator import speech_available
from worker.redis_server import RedisServer, child_env

ROOT = Path(__file__).resolve().parent.parent


def walkthrough_script() -> str:
    text = (ROOT / "docs" / "protocol.md").read_text()
    block = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    match = re.search(r"```sh\n(.*?)```", block, re.S)
    assert match, "docs/protocol.md lost its walk-through block"
    return match.group(1)


needs_redis_cli = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
# bash in its strict mode, and plain sh (dash on Debian): the walk-through promises POSIX shell.
SHELLS = {"bash": ["bash", "-euo", "pipefail", "-c"], "sh": ["sh", "-eu", "-c"]}


def run_walkthrough(shell: str, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHELLS[shell], walkthrough_script()],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "REDIS_PORT": str(port), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_redis_cli
@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_redis_cli_walkthrough_in_protocol_doc_works(tmp_path: Path, shell: str) -> None:
    stack = Stack(tmp_path).start()
    try:
        stack.start_worker("walk")
        expected = [" ".join(f"f{n}" for n in range(25)), " ".join(f"f{n}" for n in range(25, 50))]
        # Twice: the second run is a new session and prints its own finals, not the first one's.
        for _ in range(2):
            result = run_walkthrough(shell, stack.redis.port)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip().splitlines()[-2:] == expected
            assert "ERR" not in result.stdout + result.stderr
        keys = stack.keys
        with redis.Redis.from_url(stack.redis.url) as r:
            states = [k for k in r.scan_iter(match=keys.session("cli-demo-*").state)]
        assert len(states) == 2
    finally:
        stack.stop()


@needs_redis_cli
def test_redis_cli_walkthrough_gives_up_when_no_worker_runs(tmp_path: Path) -> None:
    with RedisServer() as server:
        started = time.monotonic()
        result = run_walkthrough("sh", server.port, VQ_WAIT="1")
    assert result.returncode != 0 and time.monotonic() - started < 30
    assert "did not end: is a worker running against this Redis" in result.stderr
    assert result.stdout.count("\n") <= 3  # the XADD ids only, no results


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


EXAMPLE = ROOT / "examples" / "transcribe.py"


def test_readme_python_example_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert EXAMPLE.read_text() in blocks, "README's Python example differs from examples/transcribe.py"


@pytest.mark.skipif(not speech_available(), reason="pocketsphinx is not installed")
def test_python_example_transcribes_the_sample(tmp_path: Path) -> None:
    """examples/transcribe.py (shown in the README) as a user runs it: a worker and the speech
    emulator, the bundled sample, words printed."""
    stack = Stack(tmp_path, emulator_args=["--engine", "speech"]).start()
    try:
        stack.start_worker("example")
        result = subprocess.run(
            [sys.executable, str(EXAMPLE)],
            env=child_env(VOXQUEUE_REDIS_URL=stack.redis.url, PYTHONPATH=str(ROOT)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stack.stop()
    assert result.returncode == 0, result.stderr
    words = set(result.stdout.lower().replace(".", " ").split())
    assert words & {"hello", "sentence", "travels", "through", "streams"}, result.stdout
