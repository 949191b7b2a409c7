"""Where installed and built servers live between runs, and how slow install steps report progress.

Everything a part installs goes under `~/.cache/borgdqn/` (or `$BORGDQN_CACHE`), one directory per part and
version. An install writes into a scratch directory and renames it into place when it is complete, under a
file lock, so an interrupted install is redone and two sessions never build the same thing at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from tests.harness.errors import HarnessError

LOG_TAIL_LINES = 30


def cache_root() -> Path:
    root = Path(os.environ.get("BORGDQN_CACHE", Path.home() / ".cache" / "borgdqn"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class Progress:
    """Prints one line per install step to a terminal stream: what it does, a heartbeat, how long it took."""

    def __init__(self, stream: TextIO | None = None, heartbeat_s: float = 30.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.heartbeat_s = heartbeat_s

    def say(self, message: str) -> None:
        print(f"harness: {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, title: str, expect: str = "") -> Iterator[None]:
        hint = f" (expect {expect} on a fresh machine)" if expect else ""
        self.say(f"{title}{hint} ...")
        started = time.monotonic()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.say(f"  {title}: {time.monotonic() - started:.0f}s so far")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            self.say(f"{title}: failed after {time.monotonic() - started:.1f}s")
            raise
        finally:
            done.set()
            thread.join()
        self.say(f"{title}: done in {time.monotonic() - started:.1f}s")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(empty log)"


def run_logged(cmd: Sequence[str | os.PathLike[str]], log: Path, what: str, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> None:
    """Runs an install command with its output in `log`; on failure raises with the command's log tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        try:
            result = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError as exc:
            raise HarnessError(f"{what}: {exc.filename} is not installed") from exc
    if result.returncode != 0:
        raise HarnessError(f"{what} failed (exit {result.returncode}); log {log}:\n{log_tail(log)}")


def require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"{name} is not on PATH; it is needed to {why}")
    return path


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    lock_path = cache_root() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def installed(target: Path, install: Callable[[Path], None], lock_name: str) -> Path:
    """Returns `target`, first running `install(scratch)` and renaming scratch to target if it is missing."""
    if target.exists():
        return target
    with locked(lock_name):
        if target.exists():  # another session finished it while we waited
            return target
        scratch = target.with_name(target.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            install(scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        scratch.rename(target)
    return target


def run_maven(pom: Path, args: Sequence[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Runs Maven on one of the harness's fetch-only poms, with a local repository under the cache (nothing
    depends on ~/.m2) that one Maven at a time writes to (Maven 3.8's repository is not safe to share)."""
    mvn = require_tool("mvn", f"{what} from Maven Central")
    with locked("maven-repo"):
        run_logged([mvn, "-B", "-q", "-f", pom, *args, f"-Dmaven.repo.local={maven_repo()}"], log, what, cwd=cwd)


def maven_repo() -> Path:
    return cache_root() / "maven-repo"
