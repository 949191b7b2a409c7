"""No stray server processes or temp dirs, however a session ends; and the `up`/`down` CLI.

Each test runs an inner pytest session (a real one, in a subprocess, with its own TMPDIR) whose test holds
the harness's Redis, ends that session the way the case names, and then looks for what is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.harness.process import group_pids, sweep_stale_workdirs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

INNER_CONFTEST = "from tests.conftest import *  # noqa: F403 - the fixtures and hooks under test\n"
INNER_TEST = '''
import json
import os
import time
from pathlib import Path


def test_holds_redis(redis_server):
    marker = Path(os.environ["MARKER"])
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps({"pgid": redis_server.processes[0].pgid, "workdir": str(redis_server.workdir)}))
    partial.rename(marker)  # whole or absent: the outer test polls for it
    # Hold Redis until the outer test has seen it running, whatever the ending.
    seen, deadline = marker.with_suffix(".seen"), time.monotonic() + 120
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.environ["MODE"] == "fail":
        raise AssertionError("this inner test fails on purpose")
    if os.environ["MODE"] == "hold":
        time.sleep(300)  # held until the outer test ends this session
'''


def _wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _inner_session(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path, Path]:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text(INNER_TEST)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    marker = tmp_path / "marker.json"
    env = {**os.environ, "TMPDIR": str(tmpdir), "MARKER": str(marker), "MODE": mode,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(inner), str(inner)],
        cwd=inner, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, marker, tmpdir


def _held(marker: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    def ready() -> bool:
        return marker.exists() or proc.poll() is not None

    _wait_for(ready, "the inner session to start Redis", timeout_s=120)
    assert marker.exists(), proc.communicate()[0]
    held: dict[str, object] = json.loads(marker.read_text())
    assert group_pids(int(str(held["pgid"]))), "Redis should be running while the inner test holds it"
    marker.with_suffix(".seen").write_text("")  # the inner test may now end the way its case says
    return held


@pytest.mark.parametrize("ending", ["passes", "fails", "SIGINT", "SIGTERM"])
def test_a_session_leaves_no_process_and_no_temp_dir(tmp_path: Path, ending: str) -> None:
    mode = {"passes": "pass", "fails": "fail"}.get(ending, "hold")
    proc, marker, tmpdir = _inner_session(tmp_path, mode=mode)
    held = _held(marker, proc)
    if ending in ("SIGINT", "SIGTERM"):
        proc.send_signal(getattr(signal, ending))
    output = proc.communicate(timeout=120)[0]
    expected_code = {"passes": 0, "fails": 1, "SIGINT": 2, "SIGTERM": 2}[ending]
    assert proc.returncode == expected_code, output
    assert not group_pids(int(str(held["pgid"]))), output
    assert not Path(str(held["workdir"])).exists(), output
    assert list(tmpdir.iterdir()) == [], output


def test_a_killed_session_takes_its_servers_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no finalizer: the kernel kills the servers (PDEATHSIG); the next session sweeps the dir."""
    proc, marker, tmpdir = _inner_session(tmp_path, mode="hold")
    held = _held(marker, proc)
    proc.kill()
    proc.communicate(timeout=30)
    _wait_for(lambda: not group_pids(int(str(held["pgid"]))), "the kernel to kill Redis", timeout_s=10)
    workdir = Path(str(held["workdir"]))
    assert workdir.exists()
    assert sweep_stale_workdirs(tmpdir, min_age_s=0) == [workdir]
    assert list(tmpdir.iterdir()) == []


def test_up_down_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "BORGDQN_HARNESS_STATE": str(tmp_path / "state.json")}

    def harness(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tests.harness", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    up = harness("up", "--redis")
    assert up.returncode == 0, up.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    assert set(exports) == {"REDIS_URL"}
    assert "redis is up" in up.stderr
    client = redis.Redis.from_url(exports["REDIS_URL"].strip("'"))
    assert client.ping()
    state = json.loads((tmp_path / "state.json").read_text())
    pgid = state[0]["processes"][0]["pgid"]
    workdir = Path(state[0]["workdir"])
    assert group_pids(pgid)
    status = harness("status")
    assert "redis: up" in status.stdout
    down = harness("down")
    assert down.returncode == 0, down.stderr
    assert not group_pids(pgid)
    assert not workdir.exists()
    assert not (tmp_path / "state.json").exists()
    assert harness("status").stdout.strip() == "nothing is up"


def test_up_without_a_part_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.harness", "up"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "BORGDQN_HARNESS_STATE": str(tmp_path / "s")})
    assert result.returncode == 2
    assert "choose what to start" in result.stderr


def test_a_part_that_cannot_install_errors_its_tests_with_the_reason(tmp_path: Path) -> None:
    """Never a skip: the inner test errors, and the report names what is missing."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST)
    (inner / "test_inner.py").write_text("def test_needs_redis(redis_server):\n    pass\n")
    bin_dir = tmp_path / "bin"  # a PATH without apt-get
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir), "BORGDQN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(inner), str(inner)],
        cwd=inner, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout
    assert "skipped" not in result.stdout
    assert "apt-get is not on PATH; it is needed to download Debian's redis-server package" in result.stdout


def test_a_server_that_dies_at_start_fails_with_its_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.harness import redis as harness_redis
    from tests.harness.cache import Progress
    from tests.harness.errors import HarnessError

    install = harness_redis.ensure_redis(Progress())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # Hand redis a port that is in use, as a race with another process would.
        monkeypatch.setattr(harness_redis, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(HarnessError) as failure:
            harness_redis.start_redis(install)
    message = str(failure.value)
    assert message.startswith("redis: exited (code 1) before answering PING; log ")
    assert "Address already in use" in message
    kept_log = Path(message.split("; log ", 1)[1].split(":\n", 1)[0])
    assert "Address already in use" in kept_log.read_text()  # kept after the workdir was removed
