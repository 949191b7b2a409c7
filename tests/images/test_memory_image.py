"""The memory image: its entrypoint renders redis.conf and becomes a REAL redis-server (the harness's Debian
build, the same version the image installs), which is then checked from outside: persistence on, maxmemory as
sized, clients without the password refused, the password in no process argument and in a 0600 file only.

No Docker engine runs here, so the Dockerfile itself is checked statically (the last tests).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from borg_operator.tls import make_memory_tls
from borgdqn.memory.redis.acl import ADMIN, AGENT, MONITOR, USERS, acl_config
from borgdqn.memory.redis.client import connect
from borgdqn.memory.redis.sizing import BASE_BYTES, PER_CHUNK_OVERHEAD, size_memory
from tests.harness.cache import Progress
from tests.harness.errors import HarnessError
from tests.harness.process import ServerProcess, free_port, make_workdir, start_server, wait_until
from tests.harness.redis import RedisInstall, ensure_redis

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "memory_image"
ENTRYPOINT = IMAGE / "entrypoint.py"
DEFAULT_SECRET = Path("/var/run/secrets/borg/redis-password")
# Space, quotes, a backslash, a dollar and non-ASCII: every way a naive renderer could mangle a password.
TRICKY_PASSWORD = 'pw with "quotes" \\ $HOME ünï-' + "x" * 16


# ------------------------------------------------------------------------------------------------ sizing
def test_sizing_follows_the_formula() -> None:
    pong = size_memory(250_000, 32, bytes_per_step=1024, headroom=0.5)
    chunks = 7813  # ceil(250000 / 32)
    chunk = 32 * 1024 + PER_CHUNK_OVERHEAD
    assert (pong.chunks, pong.chunk_bytes) == (chunks, chunk)
    assert pong.data_bytes == chunks * chunk
    assert pong.maxmemory == -(-(chunks * chunk) * 3 // 2) + BASE_BYTES
    # More steps, worse compression or more headroom never ask for less memory.
    assert size_memory(500_000).maxmemory > size_memory(250_000).maxmemory
    assert size_memory(250_000, bytes_per_step=2000).maxmemory > pong.maxmemory
    assert size_memory(250_000, headroom=1.0).maxmemory > pong.maxmemory
    # The agents' model store shares the Redis: its budget is added as it is.
    assert size_memory(250_000, 32, bytes_per_step=1024, headroom=0.5, model_store_bytes=1 << 30).maxmemory == \
        pong.maxmemory + (1 << 30)
    for bad in ({"capacity": 0}, {"chunk_length": 0}, {"bytes_per_step": 0.0}, {"headroom": -0.1},
                {"bytes_per_step": float("nan")}, {"model_store_bytes": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            size_memory(**{"capacity": 1000, **bad})  # type: ignore[arg-type]


def test_the_docs_worked_example_is_what_the_code_computes() -> None:
    doc = (ROOT / "docs" / "memory-image.md").read_text()
    for bytes_per_step in (1024, 256):
        sizing = size_memory(250_000, 32, bytes_per_step=bytes_per_step, headroom=0.5)
        assert f"{sizing.maxmemory:,}" in doc, (bytes_per_step, sizing.maxmemory)
        assert f"{sizing.data_bytes:,}" in doc, (bytes_per_step, sizing.data_bytes)


# ------------------------------------------------------------------------------------------------ the entrypoint
@pytest.fixture(scope="module")
def install() -> RedisInstall:
    try:
        return ensure_redis(Progress())
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class ImageRedis:
    """redis-server as the memory image starts it: the entrypoint, which renders the config and execs."""

    install: RedisInstall
    workdir: Path
    env: dict[str, str]
    port: int
    password: str
    username: str | None = None  # the user launch() checks with (None: Redis' default user)
    proc: ServerProcess | None = None

    @property
    def conf(self) -> Path:
        return Path(self.env["BORG_REDIS_CONF"])

    def client(self, password: str | None = None, username: str | None = None) -> redis.Redis:
        # No retries of its own: launch() polls, and a refused connection should fail at once.
        return redis.Redis(host="127.0.0.1", port=self.port, username=username, password=password, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0))  # fmt: skip

    def launch(self) -> None:
        proc = start_server("memory-image", [sys.executable, ENTRYPOINT], self.workdir / "redis.log", env=self.env)
        self.proc = proc
        wait_until(proc, lambda: bool(self.client(self.password, self.username).ping()), "answering PING",
                   timeout_s=30)


def image_env(install: RedisInstall, workdir: Path, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in install.env().items() if not k.startswith("BORG_")}
    return {
        **env, "PYTHONPATH": str(ROOT), "BORG_REDIS_SERVER": str(install.server), "BORG_REDIS_BIND": "127.0.0.1",
        "BORG_REDIS_PORT": str(port), "BORG_REDIS_DATA_DIR": str(workdir / "data"),
        "BORG_REDIS_CONF": str(workdir / "run" / "redis.conf"), **settings,
    }  # fmt: skip


@contextmanager
def started(install: RedisInstall, password: str, username: str | None = None, **settings: str) -> Iterator[ImageRedis]:
    """Starts the entrypoint's redis-server on a free port in a temp dir; stops it and removes the dir after."""
    assert not DEFAULT_SECRET.exists(), f"{DEFAULT_SECRET} exists on this machine: the entrypoint would use it"
    workdir = make_workdir("memory-image")
    port = free_port()
    server = ImageRedis(install=install, workdir=workdir, env={}, port=port, password=password, username=username)
    try:
        secret = settings.pop("secret_file", None)
        if secret is not None:
            path = workdir / "secret" / "redis-password"
            path.parent.mkdir()
            path.write_text(secret)
            settings["BORG_REDIS_PASSWORD_FILE"] = str(path)
        server.env = image_env(install, workdir, port, **settings)
        server.launch()
        yield server
    finally:
        if server.proc is not None:
            server.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def image_redis(install: RedisInstall, request: pytest.FixtureRequest) -> Iterator[ImageRedis]:
    """The entrypoint's redis-server; ``request.param`` says where its password comes from (file or env)."""
    sizing = {"BORG_MEMORY_CAPACITY": "100000", "BORG_MEMORY_CHUNK_LENGTH": "16",
              "BORG_MEMORY_BYTES_PER_STEP": "300", "BORG_MEMORY_HEADROOM": "0.25",
              "BORG_MEMORY_MODEL_STORE_BYTES": str(96 << 20)}  # fmt: skip
    source = {"secret_file": TRICKY_PASSWORD} if request.param == "file" else {"BORG_REDIS_PASSWORD": TRICKY_PASSWORD}
    with started(install, TRICKY_PASSWORD, **source, **sizing) as server:
        yield server


def raw_reply(port: int, command: bytes) -> bytes:
    """What the server answers a client that sends ``command`` and nothing else (no AUTH)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command)
        return sock.recv(4096)


@pytest.mark.integration
@pytest.mark.parametrize("image_redis", ["file", "env"], indirect=True)
def test_the_rendered_config_runs_a_protected_persistent_redis(image_redis: ImageRedis) -> None:
    server = image_redis
    assert server.proc is not None
    pid = server.proc.pgid
    # The entrypoint exec'd: the process it started IS redis-server now.
    assert Path(f"/proc/{pid}/exe").resolve() == server.install.server.resolve()

    # A client without the password, or with a wrong one, is refused; with it, it works.
    assert raw_reply(server.port, b"PING\r\n").startswith(b"-NOAUTH")
    assert raw_reply(server.port, b"SET k v\r\n").startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        server.client().get("k")
    with pytest.raises(redis.AuthenticationError):
        server.client("guess").ping()
    client = server.client(server.password)
    assert client.set("kept", b"across a crash") and client.get("kept") == b"across a crash"

    # Persistence and memory as the image promises.
    settings = {name: client.config_get(name)[name] for name in
                ("appendonly", "appendfsync", "save", "maxmemory", "maxmemory-policy", "protected-mode", "bind",
                 "dir")}  # fmt: skip
    expected = size_memory(100_000, 16, bytes_per_step=300, headroom=0.25, model_store_bytes=96 << 20).maxmemory
    assert settings == {
        "appendonly": "yes", "appendfsync": "everysec", "save": "", "maxmemory": str(expected),
        "maxmemory-policy": "noeviction", "protected-mode": "yes", "bind": "127.0.0.1",
        "dir": str(server.workdir / "data"),
    }  # fmt: skip

    # The password: in no argument, not in redis-server's environment, in the config file only, mode 0600.
    secret = server.password.encode()
    assert b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    conf = server.conf
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and conf.stat().st_uid == os.getuid()
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
    assert "requirepass " in conf.read_text() and "maxmemory " in conf.read_text()
    assert [p.name for p in conf.parent.iterdir()] == [conf.name]  # no temp file left beside it
    assert secret not in (server.workdir / "redis.log").read_bytes()  # the entrypoint's and redis' log

    # A crash of the process (SIGKILL) loses nothing it has written to the AOF (fsynced every second against a
    # crash of the machine); a restart through the entrypoint (config rendered again, over the old file) loads it.
    aof_dir = server.workdir / "data" / "appendonlydir"
    wait_until(
        server.proc,
        lambda: any(b"across a crash" in f.read_bytes() for f in aof_dir.glob("*.aof")),
        "writing the key to the AOF",
        timeout_s=10,
    )
    server.proc.kill()
    server.launch()
    assert server.client(server.password).get("kept") == b"across a crash"


# Tricky, and each its own: a user must not get in with another's password.
USER_PASSWORDS = {user.secret_key: f"{TRICKY_PASSWORD}-{user.name}" for user in USERS}


@pytest.mark.integration
def test_with_users_each_client_gets_least_privilege_and_redis_gets_no_password(
        install: RedisInstall, tmp_path: Path) -> None:  # fmt: skip
    users_dir = tmp_path / "secret"  # the collective's Secret, mounted
    users_dir.mkdir()
    for key, password in USER_PASSWORDS.items():
        (users_dir / key).write_text(password)
    with started(install, USER_PASSWORDS[MONITOR.secret_key], MONITOR.name, BORG_REDIS_USERS_DIR=str(users_dir),
                 BORG_MEMORY_NAME="pong", BORG_REDIS_PASSWORD="ignored-with-users") as server:  # fmt: skip
        agent = server.client(USER_PASSWORDS[AGENT.secret_key], AGENT.name)
        monitor = server.client(USER_PASSWORDS[MONITOR.secret_key], MONITOR.name)
        admin = server.client(USER_PASSWORDS[ADMIN.secret_key], ADMIN.name)
        own, other = "borg:{pong}:config", "borg:{other}:config"

        # Redis' default user is off: no AUTH, a bare password, or a user with another's password get nothing.
        assert raw_reply(server.port, b"PING\r\n").startswith(b"-NOAUTH")
        for password, username in ((USER_PASSWORDS[ADMIN.secret_key], None), ("ignored-with-users", None),
                                   (USER_PASSWORDS[AGENT.secret_key], ADMIN.name)):  # fmt: skip
            with pytest.raises(redis.AuthenticationError):
                server.client(password, username).ping()

        # The agent: the memory's commands on its own memory's keys, and nothing else.
        assert agent.set(own, b"{}") and agent.xadd("borg:{pong}:log", {"d": b"x"}, id="1-1") == b"1-1"
        assert agent.register_script("return redis.call('GET', KEYS[1])")(keys=[own]) == b"{}"
        for refused in (agent.flushall, lambda: agent.config_get("maxmemory"), lambda: agent.keys("*"),
                        lambda: agent.get(other), lambda: agent.set(other, b"x"), lambda: agent.publish("c", "m"),
                        lambda: agent.acl_setuser("borg-agent", commands=["+@all"]), agent.shutdown):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        with pytest.raises(redis.ResponseError, match="can't access"):  # a script is held to the caller's ACL
            agent.register_script("return redis.call('SET', 'borg:{other}:x', 'x')")(keys=[own])

        # The monitor: reads of the memory's keys and INFO; no write.
        assert monitor.get(own) == b"{}" and monitor.xlen("borg:{pong}:log") == 1 and monitor.info("memory")
        for refused in (lambda: monitor.set(own, b"x"), lambda: monitor.xadd("borg:{pong}:log", {"d": b"y"}),
                        lambda: monitor.delete(own), lambda: monitor.get(other)):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()

        # The administrator: everything.
        assert admin.set(other, b"x") and admin.config_get("maxmemory")["maxmemory"] != "0"
        assert admin.acl_whoami() == ADMIN.name

        # The rendered config holds each user's SHA-256, no password.
        conf = server.conf.read_text()
        assert "\nrequirepass" not in conf and "\nuser default reset off " in conf
        for user in USERS:
            password = USER_PASSWORDS[user.secret_key]
            assert password not in conf and hashlib.sha256(password.encode()).hexdigest() in conf
        assert not any(p in (server.workdir / "redis.log").read_text() for p in USER_PASSWORDS.values())

        # What the agents wrote through scripts and transactions (MULTI/EXEC in the append-only file) comes back
        # after a crash: Redis replays the file as its default user, whose rights must cover it.
        written = ["borg:{pong}:s1", "borg:{pong}:s2", "borg:{pong}:t1", "borg:{pong}:t2"]
        agent.register_script("redis.call('SET', KEYS[1], 'a'); redis.call('SET', KEYS[2], 'b')")(keys=written[:2])
        agent.pipeline(transaction=True).set(written[2], "c").set(written[3], "d").execute()
        assert server.proc is not None
        aof_dir = server.workdir / "data" / "appendonlydir"
        wait_until(server.proc, lambda: any(b"borg:{pong}:t2" in f.read_bytes() for f in aof_dir.glob("*.incr.aof")),
                   "the transaction in the AOF", timeout_s=10)
        server.proc.kill()
        server.launch()
        reloaded = server.client(USER_PASSWORDS[MONITOR.secret_key], MONITOR.name)
        assert [reloaded.get(key) for key in written] == [b"a", b"b", b"c", b"d"]
        assert reloaded.get(own) == b"{}" and reloaded.xlen("borg:{pong}:log") == 1
        assert "CRITICAL" not in (server.workdir / "redis.log").read_text()


@pytest.mark.integration
def test_with_tls_the_port_speaks_tls_only_and_clients_verify_the_operators_certificate(
        install: RedisInstall, tmp_path: Path) -> None:  # fmt: skip
    tls_dir = tmp_path / "tls"  # the collective's TLS Secret, mounted, as the operator makes it
    tls_dir.mkdir()
    for key, text in make_memory_tls("pong", "borg").items():
        (tls_dir / key).write_text(text)
    ca = tls_dir / "ca.crt"
    port = free_port()
    env = image_env(install, tmp_path, port, BORG_REDIS_PASSWORD="s3cret-pw", BORG_REDIS_TLS_DIR=str(tls_dir))
    proc = start_server("memory-image-tls", [sys.executable, ENTRYPOINT], tmp_path / "redis.log", env=env)
    try:
        def tls_client(**extra: object) -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=port, password="s3cret-pw", ssl=True, socket_timeout=5,
                               retry=Retry(NoBackoff(), 0), **extra)  # type: ignore[arg-type]

        verified = tls_client(ssl_ca_certs=str(ca), ssl_check_hostname=True)
        wait_until(proc, lambda: bool(verified.ping()), "answering PING over TLS", timeout_s=30)
        assert verified.set("k", b"v") and verified.get("k") == b"v"
        assert "tls=on" in (tmp_path / "redis.log").read_text()
        # No plaintext on the port: the password never crosses the network in clear.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=port, password="s3cret-pw", socket_timeout=5,
                        retry=Retry(NoBackoff(), 0)).ping()
        # A client that trusts only the system's CAs, or another collective's CA, refuses the certificate.
        other = tmp_path / "other-ca.crt"
        other.write_text(make_memory_tls("other", "borg")["ca.crt"])
        for refused in (tls_client(ssl_check_hostname=True), tls_client(ssl_ca_certs=str(other))):
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                refused.ping()
        # borgdqn's clients: the right CA connects; a wrong one is bad input in one line (exit 2), no retry loop.
        url = f"rediss://127.0.0.1:{port}/0"
        assert connect(url.replace("rediss://", "rediss://:s3cret-pw@"), ca_file=ca).ping()
        wrong = subprocess.run([sys.executable, "-m", "borgdqn", "train", "--env", "CartPole-v1", "--steps", "100",
                                "--out", str(tmp_path / "train-out"), "--no-live", "--memory", url,
                                "--set", f"replay.redis_ca_file={other}"],
                               env={**os.environ, "BORG_REDIS_PASSWORD": "s3cret-pw"}, capture_output=True,
                               text=True, timeout=120, check=False)  # fmt: skip
        last = wrong.stderr.strip().splitlines()[-1]
        assert wrong.returncode == 2 and "TLS certificate did not verify" in last, wrong.stderr[-2000:]
        assert last.endswith("(check replay.redis_ca_file)") and not (tmp_path / "train-out").exists()
    finally:
        proc.stop()


def test_the_operators_certificate_names_the_memory_and_its_ca_signs_nothing_else() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    material = make_memory_tls("pong", "borg")
    assert sorted(material) == ["ca.crt", "tls.crt", "tls.key"]  # the CA's key is not kept
    ca, cert = (x509.load_pem_x509_certificate(material[key].encode()) for key in ("ca.crt", "tls.crt"))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns, ips = names.get_values_for_type(x509.DNSName), [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert {"pong-memory", "pong-memory.borg.svc", "pong-memory.borg.svc.cluster.local",
            "*.pong-memory-headless.borg.svc", "localhost"} <= set(dns)
    assert ips == ["127.0.0.1", "::1"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=4 * 365)
    assert make_memory_tls("pong", "borg")["ca.crt"] != material["ca.crt"]  # a new CA each time


def test_the_users_rules_refuse_a_missing_or_shared_password() -> None:
    with pytest.raises(ValueError, match="no password for admin-password"):
        acl_config("pong", {AGENT.secret_key: "a", MONITOR.secret_key: "m"})
    with pytest.raises(ValueError, match="must differ"):
        acl_config("pong", {user.secret_key: "same" for user in USERS})
    with pytest.raises(ValueError, match="not a memory name"):
        acl_config("pong *", {user.secret_key: user.name for user in USERS})


@pytest.mark.integration
def test_a_torn_append_only_file_is_repaired_at_its_tail_and_refused_in_its_middle(install: RedisInstall) -> None:
    """A crash mid-write tears the AOF's last command: Redis drops that command, keeps the rest and says so
    (aof-load-truncated). Damage before the end is no tear but corruption: Redis refuses to start and says why,
    rather than serve a memory with a hole in it."""
    with started(install, "s3cret-pw", BORG_REDIS_PASSWORD="s3cret-pw", BORG_MEMORY_MAXMEMORY="96mb") as server:
        assert server.proc is not None
        client = server.client("s3cret-pw")
        for i in range(100):
            client.set(f"kept-{i}", b"x" * 100)
        aof_dir = server.workdir / "data" / "appendonlydir"
        wait_until(server.proc, lambda: any(b"kept-99" in f.read_bytes() for f in aof_dir.glob("*.incr.aof")),
                   "the last key in the AOF", timeout_s=10)
        server.proc.kill()
        (incr,) = aof_dir.glob("*.incr.aof")
        whole = incr.read_bytes()
        incr.write_bytes(whole + b"*3\r\n$3\r\nSET\r\n$4\r\ntorn")  # a command cut off mid-write

        server.launch()
        log = server.proc.log.read_text() if server.proc else ""
        assert "Truncating the AOF appendonly.aof.1.incr.aof" in log, log[-2000:]
        assert "loaded anyway because aof-load-truncated is enabled" in log, log[-2000:]
        client = server.client("s3cret-pw")
        assert client.dbsize() == 100 and client.get("kept-99") == b"x" * 100

        server.proc.kill()
        command = whole.rindex(b"*", 0, whole.index(b"kept-50"))  # the SET of kept-50: not a command any more
        incr.write_bytes(whole[:command] + b"!" + whole[command + 1 :])
        refused = start_server("memory-image", [sys.executable, ENTRYPOINT], server.workdir / "refused.log",
                               env=server.env)
        try:
            assert refused.popen is not None and refused.popen.wait(timeout=30) != 0
        finally:
            refused.kill()
        said = (server.workdir / "refused.log").read_text()
        assert "Bad file format reading the append only file" in said, said[-2000:]
        server.proc = None  # nothing left running


def run_entrypoint(
    install: RedisInstall, tmp_path: Path, *args: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = image_env(install, tmp_path, free_port(), **settings)
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.integration
def test_redis_server_is_given_the_config_path_only_and_no_password_variable(
    install: RedisInstall, tmp_path: Path
) -> None:
    # redis-server rewrites its own title and environment area (/proc/PID/cmdline and environ show little of
    # what it was given), so a probe in its place records exactly what the entrypoint execs it with.
    probe = tmp_path / "probe.sh"
    probe.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\nenv > "$0.env"\n')
    probe.chmod(0o700)
    result = run_entrypoint(install, tmp_path, "redis-server", "--loglevel", "verbose",
                            BORG_REDIS_PASSWORD=TRICKY_PASSWORD, BORG_REDIS_SERVER=str(probe))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "probe.sh.args").read_text().splitlines() == [
        str(tmp_path / "run" / "redis.conf"), "--loglevel", "verbose"]  # fmt: skip
    env = (tmp_path / "probe.sh.env").read_text()
    assert "BORG_REDIS_PORT=" in env  # the environment did arrive...
    assert "BORG_REDIS_PASSWORD" not in env and TRICKY_PASSWORD not in env  # ...without the password
    assert TRICKY_PASSWORD not in result.stderr + result.stdout
    assert "requirepass" in (tmp_path / "run" / "redis.conf").read_text()


@pytest.mark.integration
@pytest.mark.parametrize(("args", "settings", "message"), [
    ((), {}, "no Redis password"),
    ((), {"BORG_REDIS_PASSWORD": "pw-from-echo\n"}, "control character"),
    ((), {"BORG_REDIS_PASSWORD_FILE": "/nonexistent/redis-password"}, "cannot read the Redis password"),
    (("redis-server", "--requirepass", "hunter2"), {"BORG_REDIS_PASSWORD": "s3cret-pw"}, "--requirepass must not"),
    ((), {"BORG_REDIS_PASSWORD": "s3cret-pw", "BORG_MEMORY_CAPACITY": "lots"}, "BORG_MEMORY_CAPACITY='lots'"),
    ((), {"BORG_REDIS_PASSWORD": "s3cret-pw", "BORG_MEMORY_HEADROOM": "-1"}, "headroom must be"),
    ((), {"BORG_REDIS_PASSWORD": "s3cret-pw", "BORG_MEMORY_MAXMEMORY": "12kb"}, "below 1 MiB"),
    ((), {"BORG_REDIS_PASSWORD": "s3cret-pw", "BORG_REDIS_BIND": "0.0.0.0\nrequirepass x"}, "BORG_REDIS_BIND"),
    ((), {"BORG_REDIS_USERS_DIR": "/nonexistent"}, "BORG_REDIS_USERS_DIR needs BORG_MEMORY_NAME"),
    ((), {"BORG_REDIS_USERS_DIR": "/nonexistent", "BORG_MEMORY_NAME": "pong"},
     "borg-agent: /nonexistent/agent-password is missing"),
    ((), {"BORG_REDIS_USERS_DIR": "/nonexistent", "BORG_MEMORY_NAME": "pong name"}, "no password for the Redis"),
    (("redis-server", "--user", "x on +@all"), {"BORG_REDIS_PASSWORD": "s3cret-pw"}, "--user must not"),
])  # fmt: skip
def test_the_entrypoint_refuses_bad_settings_in_one_line(
    install: RedisInstall, tmp_path: Path, args: tuple[str, ...], settings: dict[str, str], message: str
) -> None:
    assert not DEFAULT_SECRET.exists(), f"{DEFAULT_SECRET} exists on this machine: the entrypoint would use it"
    result = run_entrypoint(install, tmp_path, *args, **settings)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    for secret in ("pw-from-echo", "s3cret-pw", "hunter2"):
        assert secret not in result.stderr
    assert not (tmp_path / "run" / "redis.conf").exists()  # nothing rendered, no redis-server started


@pytest.mark.integration
def test_maxmemory_can_be_given_outright_and_other_commands_run_as_given(install: RedisInstall, tmp_path: Path) -> None:
    with started(install, "s3cret-pw", BORG_REDIS_PASSWORD="s3cret-pw", BORG_MEMORY_MAXMEMORY="96mb") as server:
        assert server.client("s3cret-pw").config_get("maxmemory")["maxmemory"] == str(96 << 20)
    # The sidecar's command (any command but redis-server) runs as given, with nothing rendered.
    result = run_entrypoint(install, tmp_path, sys.executable, "-c", "print('sidecar ran')")
    assert (result.returncode, result.stdout) == (0, "sidecar ran\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_help_shows_the_usage_and_an_unknown_command_is_one_line(install: RedisInstall, tmp_path: Path) -> None:
    helped = run_entrypoint(install, tmp_path, "--help")
    assert helped.returncode == 0 and "entrypoint.py COMMAND [ARG...]" in helped.stdout, helped.stderr
    assert "BORG_MEMORY_CAPACITY" in helped.stdout and not helped.stderr
    unknown = run_entrypoint(install, tmp_path, "no-such-command-here", "--flag")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "'no-such-command-here': no such command" in unknown.stderr and "Traceback" not in unknown.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ the Dockerfile
def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile's last stage, continuation lines joined, comments dropped."""
    text = (IMAGE / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    instructions = [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_dockerfile_runs_as_a_non_root_user_and_keeps_secrets_out() -> None:
    stage = dockerfile_final_stage()
    users = [args for op, args in stage if op == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER (runAsNonRoot can only check a number)"
    everything = (IMAGE / "Dockerfile").read_text()
    for op, args in stage:
        if op in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"pass(word)?\s*=|requirepass", args, re.IGNORECASE), args
    assert "requirepass" not in everything.lower()


def test_dockerfile_ships_the_entrypoint_the_template_and_a_light_borgdqn() -> None:
    stage = dockerfile_final_stage()
    copies = " ".join(args for op, args in stage if op == "COPY")
    assert "memory_image/entrypoint.py" in copies and "memory_image/redis.conf" in copies
    target = re.search(r"memory_image/redis\.conf\s+(\S+)", copies)
    assert target is not None
    entrypoint = next(args for op, args in stage if op == "ENTRYPOINT")
    # The template sits beside the entrypoint, where the entrypoint looks for it by default.
    assert f"{target.group(1).rstrip('/')}/entrypoint.py" in entrypoint
    runs = " ".join(args for op, args in stage if op == "RUN")
    assert re.search(r"apt-get install .*redis-server", runs)
    assert "torch" not in runs.replace("find_spec('torch')", "") and "[rl]" not in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = [re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0] for dep in pyproject["project"]["dependencies"]]
    assert "redis" in core and "torch" not in core  # `pip install borgdqn` is the light install the image needs
    ignore = (IMAGE / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] == "*" and "!borgdqn" in ignore  # a small build context: only what the image copies


def test_memory_image_scripts_are_lint_clean() -> None:
    for args in (["ruff", "check", "memory_image"], ["ruff", "format", "--check", "memory_image"],
                 ["mypy", "memory_image/entrypoint.py"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
