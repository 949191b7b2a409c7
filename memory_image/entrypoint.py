"""Entrypoint of the memory image: render redis.conf from the environment and the Secret, then exec redis-server.

    entrypoint.py [redis-server [ARG...]]   render the config and become redis-server (the default command)
    entrypoint.py COMMAND [ARG...]          run anything else as given (the monitor sidecar, the indexer, a shell)
    entrypoint.py --help                    this text

The rendered config is the template beside this script (``redis.conf``) with its placeholders filled in,
``maxmemory`` sized from the memory's capacity (``borgdqn.memory.redis.sizing``) and who may connect appended:
- with ``BORG_REDIS_USERS_DIR`` (the operator's way): the memory's users (``borgdqn.memory.redis.acl``:
  borg-agent, borg-monitor, borg-admin, each with its least privilege on ``BORG_MEMORY_NAME``'s keys), their
  passwords read from the files agent-password, monitor-password and admin-password there (the collective's
  Secret, mounted) and written as SHA-256 digests only; Redis' default user is off;
- else one password for Redis' default user (``requirepass``, every command), from the Secret's file or
  ``BORG_REDIS_PASSWORD``: a memory of your own outside a collective.
It is written with mode 0600 to ``BORG_REDIS_CONF``, and redis-server gets only that file's path: no password
is in any process's arguments, and ``BORG_REDIS_PASSWORD`` is removed from redis-server's environment.

Environment (defaults in brackets; docs/memory-image.md has the full story):
    BORG_MEMORY_CAPACITY        steps the memory holds, replay.capacity [250000]
    BORG_MEMORY_CHUNK_LENGTH    steps per chunk, replay.chunk_length [32]
    BORG_MEMORY_BYTES_PER_STEP  stored bytes per step, as the memory monitor reports it [1024]
    BORG_MEMORY_HEADROOM        fraction added to the computed data size [0.5]
    BORG_MEMORY_MODEL_STORE_BYTES  the agents' model store, added to maxmemory, replay.model_store_bytes [1 GiB]
    BORG_MEMORY_MAXMEMORY       bytes (or 512mb, 2gb, ...): overrides the computed maxmemory
    BORG_REDIS_USERS_DIR        the users' passwords, one file each (the collective's Secret mounted) [unset]
    BORG_MEMORY_NAME            with BORG_REDIS_USERS_DIR: the memory's name (replay.redis_name), whose keys
                                the agents and the monitor may touch
    BORG_REDIS_TLS_DIR          ca.crt, tls.crt, tls.key (the collective's TLS Secret, mounted): the port speaks
                                TLS only, with that certificate [unset: plaintext]
    BORG_REDIS_PASSWORD_FILE    without users: the Secret mounted as a file [/var/run/secrets/borg/redis-password]
    BORG_REDIS_PASSWORD         without users: the password itself, used when no password file exists
    BORG_REDIS_BIND [* -::*]  BORG_REDIS_PORT [6379]  BORG_REDIS_DATA_DIR [/data]
    BORG_REDIS_CONF [/run/borg/redis.conf]  BORG_REDIS_SERVER [redis-server]  BORG_REDIS_TEMPLATE [./redis.conf]

Bad settings end with one line on stderr and exit code 2, before redis-server starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from borgdqn.memory.redis.acl import USERS, acl_config
from borgdqn.memory.redis.sizing import (
    DEFAULT_BYTES_PER_STEP,
    DEFAULT_CHUNK_LENGTH,
    DEFAULT_HEADROOM,
    DEFAULT_MODEL_STORE_BYTES,
    MemorySizing,
    size_memory,
)

log = logging.getLogger("borgdqn.memory_image")

EXIT_BAD_INPUT = 2
DEFAULT_CAPACITY = 250_000  # replay.capacity's default (borgdqn/config.py)
DEFAULT_PASSWORD_FILE = "/var/run/secrets/borg/redis-password"
PASSWORD_ENV = "BORG_REDIS_PASSWORD"
_FORBIDDEN_ARGS = ("--requirepass", "--masterauth", "--include", "--user", "--aclfile")
_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


class BadSetting(Exception):
    """A setting that cannot work; the message is one line for a person."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    maxmemory: int
    sizing: MemorySizing | None  # None when BORG_MEMORY_MAXMEMORY overrides the computation
    password_from: str  # where the passwords came from (a path or the variable's name), for the log
    tls: bool  # the port speaks TLS only


def quote(value: str) -> str:
    """``value`` as one argument of a redis.conf line: double-quoted, with \\", \\\\ and \\xHH escapes."""
    out = []
    for byte in value.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise BadSetting(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadSetting(f"{name}={value} must be {bounds}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise BadSetting(f"{name}={raw!r} is not a number") from None


def parse_bytes(name: str, raw: str) -> int:
    """``1073741824``, ``512mb``, ``2gb`` (Redis' units: k = 1000, kb = 1024, ...) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]b?)?\s*", raw, flags=re.IGNORECASE)
    if not match:
        raise BadSetting(f"{name}={raw!r} is not a size (bytes, or a number with k, kb, m, mb, g, gb)")
    value = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1 << 20:
        raise BadSetting(f"{name}={raw!r} is below 1 MiB: the memory could not even hold its arrays")
    return value


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise BadSetting(f"cannot read the Redis password from {path}: {reason}") from None


def read_password(environ: Mapping[str, str]) -> tuple[str, str]:
    """(password, where it came from): the Secret's file if there is one, else BORG_REDIS_PASSWORD."""
    explicit = environ.get("BORG_REDIS_PASSWORD_FILE", "").strip()
    path = Path(explicit or DEFAULT_PASSWORD_FILE)
    if explicit or path.exists():
        password, source = _read_file(path), str(path)
    else:
        password, source = environ.get(PASSWORD_ENV, ""), PASSWORD_ENV
    if not password:
        raise BadSetting(
            f"no Redis password: mount the Secret at {DEFAULT_PASSWORD_FILE} (or point "
            f"BORG_REDIS_PASSWORD_FILE at it), or set {PASSWORD_ENV}; the memory never runs without one"
        )
    _check_printable(password, source)
    return password, source


def _check_printable(password: str, source: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in password):
        # A trailing newline is the usual slip (`echo pw > file`); agents would send the password with it.
        raise BadSetting(
            f"the Redis password from {source} holds a control character (a trailing newline?): "
            "create the Secret with `kubectl create secret generic ... --from-literal`"
        )


TLS_FILES = ("ca.crt", "tls.crt", "tls.key")  # the Secret's keys (borg_operator.tls)


def listen_config(environ: Mapping[str, str], port: int) -> str:
    """The port lines: plaintext ``port``, or with BORG_REDIS_TLS_DIR a TLS-only port with its certificate."""
    raw = environ.get("BORG_REDIS_TLS_DIR", "").strip()
    if not raw:
        return f"port {port}"
    directory = Path(raw)
    for name in TLS_FILES:
        path = directory / name
        if not os.access(path, os.R_OK):
            raise BadSetting(f"BORG_REDIS_TLS_DIR: cannot read {path} (the TLS Secret's key {name!r})")
    ca, cert, key = (quote(str(directory / name)) for name in TLS_FILES)
    # Clients prove who they are with their user's password, not a certificate (tls-auth-clients no).
    return "\n".join([
        "port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {ca}",
        "tls-auth-clients no", 'tls-protocols "TLSv1.2 TLSv1.3"', "tls-prefer-server-ciphers yes",
    ])  # fmt: skip


def users_config(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(the users' redis.conf lines, where their passwords came from), or None without BORG_REDIS_USERS_DIR."""
    raw = environ.get("BORG_REDIS_USERS_DIR", "").strip()
    if not raw:
        return None
    directory = Path(raw)
    memory = environ.get("BORG_MEMORY_NAME", "").strip()
    if not memory:
        raise BadSetting("BORG_REDIS_USERS_DIR needs BORG_MEMORY_NAME: the memory whose keys its users may touch")
    passwords = {}
    for user in USERS:
        path = directory / user.secret_key
        if not path.exists():
            raise BadSetting(
                f"no password for the Redis user {user.name}: {path} is missing (a key "
                f"{user.secret_key!r} of the collective's Secret)"
            )
        passwords[user.secret_key] = _read_file(path)
        _check_printable(passwords[user.secret_key], str(path))
    try:
        return acl_config(memory, passwords), str(directory)
    except ValueError as err:
        raise BadSetting(f"Redis users from {directory}: {err}") from None


def render(environ: Mapping[str, str], template: Path, out: Path) -> Rendered:
    """Write the final redis.conf to ``out`` (mode 0600, replaced atomically) and say what went in."""
    port = _int(environ, "BORG_REDIS_PORT", 6379, 1, 65535)
    bind = environ.get("BORG_REDIS_BIND", "").strip() or "* -::*"
    if not re.fullmatch(r"[-0-9A-Za-z:.*%]+( [-0-9A-Za-z:.*%]+)*", bind):
        raise BadSetting(f"BORG_REDIS_BIND={bind!r} is not a list of addresses separated by spaces")
    data_dir = Path(environ.get("BORG_REDIS_DATA_DIR", "").strip() or "/data")
    override = environ.get("BORG_MEMORY_MAXMEMORY", "").strip()
    sizing = None
    if override:
        maxmemory = parse_bytes("BORG_MEMORY_MAXMEMORY", override)
    else:
        try:
            sizing = size_memory(
                capacity=_int(environ, "BORG_MEMORY_CAPACITY", DEFAULT_CAPACITY, 1),
                chunk_length=_int(environ, "BORG_MEMORY_CHUNK_LENGTH", DEFAULT_CHUNK_LENGTH, 1, 4096),
                bytes_per_step=_float(environ, "BORG_MEMORY_BYTES_PER_STEP", DEFAULT_BYTES_PER_STEP),
                headroom=_float(environ, "BORG_MEMORY_HEADROOM", DEFAULT_HEADROOM),
                model_store_bytes=_int(environ, "BORG_MEMORY_MODEL_STORE_BYTES", DEFAULT_MODEL_STORE_BYTES, 0),
            )
        except ValueError as err:
            raise BadSetting(f"memory sizing: {err}") from None
        maxmemory = sizing.maxmemory
    users = users_config(environ)
    if users is None:
        password, source = read_password(environ)
        access = f"\n# --- from the Secret ({source}); this file is mode 0600\nrequirepass {quote(password)}\n"
    else:
        lines, source = users
        access = f"\n# --- the memory's users (borgdqn/memory/redis/acl.py), passwords from {source} hashed\n{lines}"
    try:
        text = string.Template(template.read_text()).substitute(
            bind=bind, listen=listen_config(environ, port), data_dir=quote(str(data_dir)), maxmemory=maxmemory
        )
    except OSError as err:
        raise BadSetting(f"cannot read the config template {template}: {err.strerror or err}") from None
    except (KeyError, ValueError) as err:
        raise BadSetting(f"the config template {template} has a bad placeholder: {err}") from None
    if re.search(r"^\s*(requirepass|include|user|aclfile)\b", text, flags=re.MULTILINE | re.IGNORECASE):
        raise BadSetting(
            f"the config template {template} sets requirepass, user, aclfile or include itself; the entrypoint does"
        )
    text += access
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(out, text)
    except OSError as err:
        raise BadSetting(f"cannot write {err.filename or out}: {err.strerror or err}") from None
    return Rendered(path=out, maxmemory=maxmemory, sizing=sizing, password_from=source, tls="tls-port" in text)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte (a temp file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__, end="")
        return 0
    if argv and argv[0] != "redis-server":
        if shutil.which(argv[0]) is None:
            raise BadSetting(f"{argv[0]!r}: no such command in the image (entrypoint.py --help shows the usage)")
        os.execvp(argv[0], list(argv))  # another command of the image: run it as given
    extra = list(argv[1:])
    for arg in extra:
        if arg.split("=", 1)[0].lower() in _FORBIDDEN_ARGS:
            raise BadSetting(
                f"{arg.split('=', 1)[0]} must not be a redis-server argument: users and passwords belong in "
                "the Secret (process arguments are visible to every user)"
            )
    server = environ.get("BORG_REDIS_SERVER", "").strip() or "redis-server"
    executable = shutil.which(server)
    if executable is None:
        raise BadSetting(f"BORG_REDIS_SERVER: {server!r} not found")
    template = Path(environ.get("BORG_REDIS_TEMPLATE", "").strip() or Path(__file__).with_name("redis.conf"))
    out = Path(environ.get("BORG_REDIS_CONF", "").strip() or "/run/borg/redis.conf")
    rendered = render(environ, template, out)
    sizing = rendered.sizing
    how = (
        "BORG_MEMORY_MAXMEMORY"
        if sizing is None
        else f"capacity={sizing.capacity} chunk_length={sizing.chunk_length} chunks={sizing.chunks} "
        f"bytes_per_step={sizing.bytes_per_step:g} headroom={sizing.headroom:g} "
        f"model_store_bytes={sizing.model_store_bytes}"
    )
    log.info(
        "memory image: config=%s maxmemory=%d (%s) password_from=%s tls=%s",
        rendered.path,
        rendered.maxmemory,
        how,
        rendered.password_from,
        "on" if rendered.tls else "off",
    )
    child_env = {k: v for k, v in environ.items() if k != PASSWORD_ENV}
    sys.stderr.flush()
    os.execve(executable, [executable, str(rendered.path), *extra], child_env)
    return 0  # not reached


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:], dict(os.environ)))
    except BadSetting as err:
        print(f"memory image: error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
