"""Redis from Debian's packages, unpacked (not installed) into the cache, started with a password.

`apt-get download` + `dpkg -x` needs no root and starts no system service; the libraries redis-server links
to that a slim machine may lack (jemalloc, lzf) are unpacked beside it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.cache import Progress, cache_root, installed, locked, require_tool, run_logged
from tests.harness.errors import HarnessError
from tests.harness.process import RunningPart, free_port, make_workdir, start_server, wait_until

PACKAGES = ("redis-server", "redis-tools", "libjemalloc2", "liblzf1")


@dataclass(frozen=True)
class RedisInstall:
    root: Path

    @property
    def server(self) -> Path:
        return self.root / "usr" / "bin" / "redis-server"

    @property
    def cli(self) -> Path:
        return self.root / "usr" / "bin" / "redis-cli"

    def env(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self.root / "usr" / "lib" / "x86_64-linux-gnu")}


def _candidate_version() -> str:
    out = subprocess.run(["apt-cache", "policy", "redis-tools"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    return ""


def ensure_redis(progress: Progress) -> RedisInstall:
    require_tool("apt-get", "download Debian's redis-server package")
    version = _candidate_version()
    if not version:
        if os.geteuid() != 0:
            raise HarnessError("redis: apt has no package lists; run `apt-get update` as root once")
        with locked("apt"), progress.step("Updating apt package lists"):
            run_logged(["apt-get", "update"], cache_root() / "logs" / "apt-update.log", "apt-get update")
        version = _candidate_version()
        if not version:
            raise HarnessError("redis: Debian's package redis-tools is not available from apt")
    target = cache_root() / f"redis-{version.replace(':', '_')}"

    def install(scratch: Path) -> None:
        debs = scratch / "debs"
        debs.mkdir()
        with progress.step(f"Downloading Debian's redis {version}", expect="a few seconds"):
            run_logged(["apt-get", "download", *PACKAGES], scratch / "install.log", "apt-get download redis",
                       cwd=debs)
            for deb in sorted(debs.glob("*.deb")):
                run_logged(["dpkg", "-x", deb, scratch], scratch / "install.log", f"dpkg -x {deb.name}")

    return RedisInstall(installed(target, install, "redis"))


@dataclass
class RedisServer(RunningPart):
    install: RedisInstall | None = None
    port: int = 0
    password: str = ""
    detach: bool = False

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def config(self) -> Path:
        return self.workdir / "redis.conf"

    def launch(self) -> None:
        """Starts redis-server from the config in the workdir and waits until it answers PING."""
        assert self.install is not None
        install = self.install
        proc = start_server("redis", [install.server, self.config], self.workdir / "redis.log", env=install.env(),
                            detach=self.detach)
        self.processes = [proc]

        def pong() -> bool:
            result = subprocess.run(
                [install.cli, "-h", "127.0.0.1", "-p", str(self.port), "--no-auth-warning", "ping"],
                env={**install.env(), "REDISCLI_AUTH": self.password}, capture_output=True, text=True, timeout=5,
                check=False)
            return result.stdout.strip() == "PONG"

        wait_until(proc, pong, "answering PING", timeout_s=30)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown save; the workdir (AOF, config) stays for `launch`."""
        for proc in self.processes:
            proc.kill()


def start_redis(install: RedisInstall, *, aof: bool = False, appendfsync: str = "everysec",
                detach: bool = False) -> RedisServer:
    """A redis-server on 127.0.0.1 with a random password; AOF persistence when `aof`."""
    part = RedisServer(name="redis", workdir=make_workdir("redis"), install=install, port=free_port(),
                       password=secrets.token_urlsafe(24), detach=detach)
    try:
        # The password goes in the config file, never on the command line where `ps` shows it.
        part.config.write_text("\n".join([
            "bind 127.0.0.1",
            f"port {part.port}",
            f"dir {part.workdir}",
            f"requirepass {part.password}",
            'save ""',
            f"appendonly {'yes' if aof else 'no'}",
            f"appendfsync {appendfsync}",
            "protected-mode yes",
            "daemonize no",
            "",
        ]))
        part.config.chmod(0o600)
        part.launch()
        part.exports = {"REDIS_URL": part.url}
        return part
    except BaseException:
        part.stop()
        raise
