"""Go programs built from source with the local Go toolchain, pinned by the wrapper modules in `gomod/`.

Each directory under `gomod/` is a module whose go.mod and go.sum pin one upstream project (and, for
Kubernetes, every staging module). `go build` runs inside it with `-mod=readonly`, so a build can only use
the exact module versions and hashes go.sum lists; a dependency that is not pinned fails the build instead
of being resolved. Modules come from the Go module proxy into the normal Go module cache, object files go to
the normal Go build cache, so a binary whose dependencies another binary already compiled links in seconds.

Every binary gets a cache directory of its own, `<name>-<version>-<hash>/<name>`: a run that needs only
kube-apiserver and kubectl never waits for kube-controller-manager. The hash covers the wrapper's go.mod,
go.sum, its own Go files (if any) and the linker flags, so changing a pin builds anew instead of reusing a stale binary.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.cache import Progress, cache_root, installed, require_tool, run_logged
from tests.harness.errors import HarnessError

GOMOD = Path(__file__).resolve().parent / "gomod"


@dataclass(frozen=True)
class GoTool:
    """One binary: the name it is installed as, its main package, how long a cold build takes here."""

    name: str
    package: str
    expect: str = ""


def _go() -> str:
    return require_tool("go", "build the Kubernetes test binaries from source (install Go >= 1.26 from https://go.dev/dl/)")


def go_env() -> dict[str, str]:
    """The environment every go command of the harness runs in."""
    return {
        **os.environ,
        # readonly: go.sum is the pin; buildvcs off: the wrapper sits in this repository's git checkout,
        # and stamping its commit into the binaries would make every commit a different build.
        "GOFLAGS": "-mod=readonly -buildvcs=false",
        # A go.work above the checkout must not swap in other module versions.
        "GOWORK": "off",
    }


def wrapper_dir(wrapper: str) -> Path:
    module_dir = GOMOD / wrapper
    if not (module_dir / "go.mod").is_file():
        raise HarnessError(f"no Go wrapper module {module_dir}")
    return module_dir


def _pin_hash(module_dir: Path, ldflags: str) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        path = module_dir / name
        digest.update(path.read_bytes() if path.exists() else b"")
    digest.update(ldflags.encode())
    # A wrapper with a main package of its own (CoreDNS's plugin list): its source is part of the build.
    for source in sorted(module_dir.glob("*.go")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:10]


def go_binaries(progress: Progress, wrapper: str, version: str, tools: Sequence[GoTool],
                ldflags: str = "") -> dict[str, Path]:
    """Builds (once) each of `tools` from the wrapper module `gomod/<wrapper>`; returns name -> binary path."""
    module_dir = wrapper_dir(wrapper)
    pin = _pin_hash(module_dir, ldflags)
    logs = cache_root() / "logs"
    binaries: dict[str, Path] = {}
    for tool in tools:
        target = cache_root() / f"{tool.name}-{version}-{pin}"

        def install(scratch: Path, tool: GoTool = tool) -> None:
            go = _go()
            log = logs / f"build-{tool.name}-{version}.log"
            log.unlink(missing_ok=True)
            with progress.step(f"Building {tool.name} {version} with Go", expect=tool.expect):
                run_logged([go, "build", "-trimpath", "-ldflags", ldflags, "-o", scratch / tool.name, tool.package],
                           log, f"go build {tool.package} (in {module_dir})", cwd=module_dir, env=go_env())
            if not (scratch / tool.name).is_file():
                raise HarnessError(f"go build {tool.package} wrote no binary {scratch / tool.name}")

        binaries[tool.name] = installed(target, install, f"go-{tool.name}") / tool.name
    return binaries


def _go_json(args: Sequence[str], module_dir: Path, what: str) -> dict[str, str]:
    try:
        result = subprocess.run([_go(), *args], cwd=module_dir, env=go_env(), capture_output=True, text=True,
                                timeout=600, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what}: no answer in 600s (is the Go module proxy reachable?)") from exc
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        info = {}
    if result.returncode != 0 or info.get("Error"):
        error = info.get("Error") or result.stderr.strip() or result.stdout.strip()
        raise HarnessError(f"{what} in {module_dir} failed (exit {result.returncode}): {error}")
    return info


def go_module_dir(progress: Progress, wrapper: str, module: str) -> Path:
    """The source of `module` at the version the wrapper pins, downloaded into the Go module cache if missing.

    Run inside the wrapper, `go mod download` checks the module's hash against the wrapper's go.sum.
    """
    module_dir = wrapper_dir(wrapper)
    # `go list -m` only reports Dir when the module is already extracted; it downloads nothing.
    info = _go_json(["list", "-m", "-json", module], module_dir, f"go list -m {module}")
    if not (info.get("Dir") and Path(info["Dir"]).is_dir()):
        with progress.step(f"Downloading Go module {module}@{info.get('Version', '?')}", expect="a few seconds"):
            info = _go_json(["mod", "download", "-json", module], module_dir, f"go mod download {module}")
    if not (info.get("Dir") and Path(info["Dir"]).is_dir()):
        raise HarnessError(f"go mod download {module} left no source directory (answer: {info})")
    return Path(info["Dir"])
