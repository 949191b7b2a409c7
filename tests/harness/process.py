"""Server processes: each in its own process group, logged to a file, waited for, and killed as a group.

A server started for a pytest session also gets PR_SET_PDEATHSIG, so that the kernel kills it if the pytest
process dies without running its finalizers (SIGKILL, a crash). Servers started by `python -m tests.harness up`
must outlive that command, so they do not.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.cache import cache_root, log_tail
from tests.harness.errors import HarnessError

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group (read from /proc, so grandchildren are found too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _socket_inodes(pids: Sequence[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):  # closed while we looked
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:["):-1])
    return inodes


def _proc_address(hex_address: str) -> IpAddress:
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    # A JVM listens on an IPv6 socket even for an IPv4 address: ::ffff:127.0.0.1 is 127.0.0.1.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def listening_sockets(pids: Sequence[int] | None = None) -> set[tuple[IpAddress, int]]:
    """(address, port) of the TCP sockets in LISTEN state, of the given processes or of the whole machine."""
    inodes = _socket_inodes(pids) if pids is not None else None
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] != "0A" or (inodes is not None and fields[9] not in inodes):
                    continue
                address, port_hex = fields[1].rsplit(":", 1)
                found.add((_proc_address(address), int(port_hex, 16)))
    return found


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class ServerProcess:
    """One server: its process group id is its pid (it leads a new session)."""

    name: str
    popen: subprocess.Popen[bytes] | None
    pgid: int
    log: Path

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return bool(group_pids(self.pgid))

    def rss(self) -> int:
        return rss_bytes(group_pids(self.pgid))

    def fail(self, reason: str) -> HarnessError:
        """The error for a server that did not come up; its log is kept, since stopping removes the workdir."""
        kept = cache_root() / "logs" / f"{self.name}-failed-{time.strftime('%Y%m%d-%H%M%S')}-{self.pgid}.log"
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log, kept)
        except OSError:
            kept = self.log
        return HarnessError(f"{self.name}: {reason}; log {kept}:\n{log_tail(kept)}")

    def kill(self) -> None:
        """SIGKILL to the whole group at once (a crash: no shutdown handler runs); returns when it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        deadline = time.monotonic() + 5
        while group_pids(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left after `grace_s`; returns when the group is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_pids(self.pgid):
            if self.popen is not None:
                self.popen.poll()  # reap the leader so that it does not linger as a zombie
            time.sleep(0.05)
        self.kill()


def start_server(name: str, cmd: Sequence[str | os.PathLike[str]], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, detach: bool = False) -> ServerProcess:
    """Starts `cmd` as the leader of a new process group, stdout and stderr to `log`, stdin closed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        try:
            popen = subprocess.Popen(
                list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                env=env, start_new_session=True, preexec_fn=None if detach else _die_with_parent,
            )
        except FileNotFoundError as exc:
            raise HarnessError(f"{name}: cannot run {exc.filename}: not found") from exc
    return ServerProcess(name=name, popen=popen, pgid=popen.pid, log=log)


def wait_until(proc: ServerProcess, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Polls `ready` until it is true; fails with the log tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            code = proc.popen.returncode if proc.popen is not None else "?"
            raise proc.fail(f"exited (code {code}) before {what}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise proc.fail(f"not {what} after {timeout_s:.0f}s")


@dataclass
class RunningPart:
    """A started part: its processes (started in order, stopped in reverse), its temp dir, what to export."""

    name: str
    workdir: Path
    processes: list[ServerProcess] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)

    def rss(self) -> int:
        return sum(proc.rss() for proc in self.processes)

    def listening(self) -> set[tuple[IpAddress, int]]:
        """Every (address, port) that a process of this part listens on."""
        return listening_sockets([pid for proc in self.processes for pid in group_pids(proc.pgid)])

    def hang(self, hung: bool = True) -> None:
        """SIGSTOP every process (a server that hangs: connections stay open, nothing answers), or SIGCONT."""
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pgid, signal.SIGSTOP if hung else signal.SIGCONT)

    def stop(self) -> None:
        self.hang(False)  # a stopped process would not hear SIGTERM
        for proc in reversed(self.processes):
            proc.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


WORKDIR_PREFIX = "borgdqn-"
_CREATOR_FILE = ".creator-pid"


def make_workdir(part: str) -> Path:
    """A fresh temp dir for one running part; removed by `RunningPart.stop`.

    First sweeps the temp dirs that an earlier session could not remove (it was SIGKILLed: the kernel killed
    its servers through PDEATHSIG, but nobody removed their dirs).
    """
    sweep_stale_workdirs(Path(tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{part}-"))
    (workdir / _CREATOR_FILE).write_text(str(os.getpid()))
    return workdir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_paths() -> set[str]:
    """Every path that a live process has open (its servers keep their logs open in their workdir)."""
    paths = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    paths.add(os.readlink(f"/proc/{entry}/fd/{fd}"))
    return paths


def sweep_stale_workdirs(tmp_root: Path, min_age_s: float = 300.0) -> list[Path]:
    """Removes harness workdirs older than `min_age_s` whose creator is dead and in which no live process
    holds a file open (a detached `up` outlives its creator, but its servers keep their logs open)."""
    candidates = []
    for workdir in tmp_root.glob(f"{WORKDIR_PREFIX}*"):
        try:
            creator = int((workdir / _CREATOR_FILE).read_text())
            age = time.time() - (workdir / _CREATOR_FILE).stat().st_mtime
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if age >= min_age_s and not _pid_alive(creator):
            candidates.append(workdir)
    if not candidates:
        return []
    open_paths = _open_paths()
    removed = []
    for workdir in candidates:
        prefix = f"{workdir}/"
        if not any(path.startswith(prefix) for path in open_paths):
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir)
    return removed
