"""Elasticsearch from Maven Central's integ-test-zip distribution, run single-node with security off.

The integ-test-zip has no bundled JDK and only the core modules (no ML, no security realms, no geoip), which
makes it small (~110 MB) and runnable on the machine's own Java 17. 8.19 is the newest line that still runs on
Java 17 (9.x needs Java 21); the Python client is pinned to 8.x because client 9 sends a compatibility header
that an 8.x server refuses.

Elasticsearch refuses to run as root. Tests here and in CI run as root, so then the server runs as `nobody`
(see `_RunAs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.cache import Progress, cache_root, installed, maven_repo, require_tool, run_maven
from tests.harness.errors import HarnessError
from tests.harness.process import RunningPart, free_port, make_workdir, start_server, wait_until

VERSION = "8.19.21"
MIN_JAVA = 17
POM_DIR = Path(__file__).parent / "maven" / "elasticsearch"
ARTIFACT_PATH = Path("org", "elasticsearch", "distribution", "integ-test-zip", "elasticsearch")
# A small heap, not touched up front (Elasticsearch's default pre-touches it: ~100 MB more resident), and only
# the C1 compiler, which halves the start on 2 busy cores (23 s -> 11 s measured); tests index little.
JVM_OPTIONS = ("-Xms256m", "-Xmx512m", "-XX:-AlwaysPreTouch", "-XX:TieredStopAtLevel=1")
START_TIMEOUT_S = 180.0  # a cold JVM on 2 busy cores can take a minute
# Variables the launcher scripts read that would otherwise leak in from the caller's shell.
_ENV_DROP = ("JAVA_HOME", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JAVA_OPTS", "ES_JAVA_OPTS", "CLI_JAVA_OPTS",
             "ES_HOME", "ES_PATH_CONF", "ES_TMPDIR")


@dataclass(frozen=True)
class EsInstall:
    root: Path
    java_home: Path


def _java_home() -> Path:
    """The Java home of `java` on PATH, checked to be new enough (from its `release` file: no JVM start)."""
    java = Path(require_tool("java", "run Elasticsearch")).resolve()
    home, version = java.parent.parent, ""
    with contextlib.suppress(OSError):
        for line in (home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                version = line.split("=", 1)[1].strip().strip('"')
    if not version:  # a JDK without a release file: ask the JVM
        out = subprocess.run([java, "-XshowSettings:properties", "-version"], capture_output=True, text=True,
                             timeout=60, check=False).stderr
        props = {key.strip(): value.strip() for key, _, value in (line.partition(" = ") for line in out.splitlines())}
        home, version = Path(props.get("java.home", home)), props.get("java.specification.version", "")
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_JAVA:
        raise HarnessError(f"elasticsearch {VERSION} needs Java {MIN_JAVA} or newer; {java} is Java {version or '?'}")
    return home


def _unzip(archive: Path, dest: Path) -> None:
    """Unpacks the distribution without its top folder, keeping the executable bits (zipfile drops them)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts[1:]
            if not parts or ".." in parts:
                continue
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            # Read access for everyone: the server may run as another user (see _RunAs).
            target.chmod((mode or 0o644) | 0o444)
    for directory in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)


def ensure_elasticsearch(progress: Progress) -> EsInstall:
    java_home = _java_home()
    target = cache_root() / f"elasticsearch-{VERSION}"

    def install(scratch: Path) -> None:
        download = scratch / "download"
        log = scratch / "install.log"
        with progress.step(f"Fetching Elasticsearch {VERSION} from Maven Central", expect="~20 s"):
            run_maven(POM_DIR / "pom.xml", ["dependency:copy-dependencies", f"-Delasticsearch.version={VERSION}",
                                            "-DexcludeTransitive=true", "-DincludeTypes=zip",
                                            f"-DoutputDirectory={download}"],
                      log, f"fetch Elasticsearch {VERSION}")
            archives = sorted(download.glob("*.zip"))
            if len(archives) != 1:
                raise HarnessError(f"elasticsearch: Maven fetched {archives or 'no zip'}; log {log}")
            _unzip(archives[0], scratch)
            shutil.rmtree(download)
            # The unpacked tree is what is cached; a second 107 MB copy of the zip in Maven's repo would only
            # double the cache (Maven fetches it again should the install ever be redone).
            shutil.rmtree(maven_repo() / ARTIFACT_PATH / VERSION, ignore_errors=True)
        if not (scratch / "bin" / "elasticsearch").is_file():
            raise HarnessError(f"elasticsearch: the {VERSION} zip has no bin/elasticsearch")

    return EsInstall(root=installed(target, install, "elasticsearch"), java_home=java_home)


@dataclass(frozen=True)
class _RunAs:
    """Who the server runs as, and what that takes.

    As root the server runs as `nobody`, through `setpriv` (which execs, so the process group the harness
    kills is still the launcher's). `nobody` cannot read the cached install: it lies under root's home, which
    is mode 700, and opening that up would change the machine for every other user. So the install is
    hard-linked into the part's workdir (about 240 links, a few milliseconds; the files stay root-owned and
    read-only to the server, so the cache is never written to) and copied only where the workdir is on
    another file system. Changing credentials clears the parent-death signal that `start_server` set;
    `--pdeathsig keep` has setpriv set it again after the switch.
    """

    uid: int
    gid: int

    @staticmethod
    def current() -> _RunAs | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam("nobody")
            return _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)
        except KeyError:
            return _RunAs(uid=65534, gid=65534)

    def wrap(self) -> list[str]:
        setpriv = require_tool("setpriv", "run Elasticsearch as an unprivileged user (it refuses root)")
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--pdeathsig", "keep",
                "--"]

    def give(self, *paths: Path) -> None:
        for top in paths:
            for path in [top, *top.rglob("*")]:
                os.chown(path, self.uid, self.gid, follow_symlinks=False)


def _link_tree(src: Path, dest: Path) -> None:
    """A private copy of the install made of hard links (real copies across file systems)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(mode=0o755, exist_ok=True)
        for name in filenames:
            try:
                os.link(Path(dirpath) / name, dest / rel / name)
            except OSError:
                shutil.copy2(Path(dirpath) / name, dest / rel / name)
        if rel == Path() and "config" in dirnames:
            # The config dir is a real copy, handed to the server's user: linked, chown would change the cache.
            dirnames.remove("config")


@dataclass
class EsServer(RunningPart):
    port: int = 0
    cmd: list[str | os.PathLike[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    detach: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Starts the server from the workdir (config, data) and waits until the cluster is yellow; after
        `halt` or `kill` it comes back on the same port with the data it had."""
        proc = start_server("elasticsearch", self.cmd, self.workdir / "elasticsearch.log", env=self.env,
                            cwd=self.workdir, detach=self.detach)
        self.processes = [proc]
        wait_until(proc, lambda: _cluster_ready(self.url), "answering cluster health (yellow)", START_TIMEOUT_S)

    def halt(self) -> None:
        """A clean shutdown (SIGTERM); the workdir (config, data) stays for `launch`."""
        for proc in self.processes:
            proc.stop(grace_s=30.0)

    def kill(self) -> None:
        """SIGKILL, as a crash; the workdir stays for `launch` (acknowledged writes survive: the translog is
        fsynced per request by default)."""
        for proc in self.processes:
            proc.kill()


def _settings(part: EsServer, transport_port: int) -> dict[str, object]:
    return {
        "cluster.name": "borgdqn-test",
        "node.name": "borgdqn-es",
        "discovery.type": "single-node",
        "network.host": "127.0.0.1",
        "http.port": part.port,
        "transport.port": transport_port,
        "path.data": str(part.workdir / "data"),
        "path.logs": str(part.workdir / "logs"),
        "xpack.security.enabled": False,
        # A disk that fills up past the watermarks would otherwise turn every index read-only mid-test.
        "cluster.routing.allocation.disk.threshold_enabled": False,
        # No ML module in this distribution today; the setting keeps ML off should a later one bring it.
        "xpack.ml.enabled": False,
    }


def _cluster_ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/_cluster/health?wait_for_status=yellow&timeout=2s", timeout=5) as resp:
        return json.load(resp).get("status") in ("yellow", "green")


def start_elasticsearch(install: EsInstall, *, detach: bool = False,
                        jvm_options: tuple[str, ...] = JVM_OPTIONS) -> EsServer:
    """A single-node Elasticsearch on 127.0.0.1, security off, data and logs in its own temp dir.
    `jvm_options` replace the test defaults (small heap, C1 only), e.g. for a benchmark."""
    workdir = make_workdir("elasticsearch")
    part = EsServer(name="elasticsearch", workdir=workdir, port=free_port(), detach=detach)
    try:
        run_as = _RunAs.current()
        home = install.root
        if run_as is not None:
            home = workdir / "home"
            _link_tree(install.root, home)
        # A per-run config dir: Elasticsearch writes its keystore there, and the cached install stays untouched.
        conf = workdir / "config"
        shutil.copytree(install.root / "config", conf)
        (conf / "elasticsearch.yml").write_text(
            "".join(f"{key}: {json.dumps(value)}\n" for key, value in _settings(part, free_port()).items()))
        (conf / "jvm.options.d" / "borgdqn.options").write_text("\n".join(jvm_options) + "\n")
        tmp = workdir / "tmp"
        for path in (workdir / "data", workdir / "logs", tmp):
            path.mkdir()
        env = {key: value for key, value in os.environ.items() if key not in _ENV_DROP}
        # ES_TMPDIR in the workdir, so that all the server writes (JNA libraries, temp files) goes when it stops.
        # The launcher JVM stays up beside the server for its lifetime; C1 only trims it (100 -> 83 MB).
        env.update(ES_JAVA_HOME=str(install.java_home), ES_PATH_CONF=str(conf), ES_TMPDIR=str(tmp),
                   CLI_JAVA_OPTS="-XX:TieredStopAtLevel=1", HOME=str(workdir))
        cmd: list[str | os.PathLike[str]] = [home / "bin" / "elasticsearch"]
        if run_as is not None:
            run_as.give(workdir / "data", workdir / "logs", tmp, conf)
            workdir.chmod(0o711)  # traversable, not listable or writable, by the server's user
            cmd = [*run_as.wrap(), *cmd]
        part.cmd, part.env = cmd, env
        part.launch()
        part.exports = {"ES_URL": part.url}
        return part
    except BaseException:
        part.stop()
        raise
