"""Container images for the real node, built here without a Docker engine or a registry.

- The base: a Debian bookworm root file system made by `debootstrap` from Debian's archive (python3, venv,
  CA certificates), with a venv on PATH so that `python` and `pip` exist as in the official Python images the
  Dockerfiles name by default.
- The pause image (the pod sandbox): `pause.c` from the Kubernetes module the harness pins, compiled statically.
- Ours: `buildah bud` on the repository's own Dockerfiles, unchanged but for the base image argument.

Each image is saved as a docker-archive under `~/.cache/borgdqn/images/`, named by a hash of everything that goes
into it, so it is built again only when one of its inputs changes; the node imports the archives into its
containerd (as OCI archives without the layers containerd already holds: a rebuilt agent image differs from the
last one in one small layer), and pods run them with `imagePullPolicy: Never`. buildah keeps its working
storage where it keeps it by default (`/var/lib/containers/storage`): the archives are the cache, that storage
is scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.harness.cache import Progress, cache_root, installed, locked, require_tool, run_logged
from tests.harness.errors import HarnessError

REPO = Path(__file__).resolve().parents[2]
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# buildah's names for the two base stages; only the second (with the venv) is handed to our Dockerfiles.
_DEBIAN_IMAGE = "localhost/borgdqn-test/debian:bookworm"
BASE_IMAGE = "localhost/borgdqn-test/debian-python:bookworm"
PAUSE_IMAGE = "localhost/borgdqn-test/pause:3.10"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip inside the Dockerfiles' RUN steps verifies PyPI with the machine's CA bundle, lent read-only to the build.
_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class ImageSpec:
    """One of our images: its Dockerfile, what goes into it (paths in the repository), its base argument."""

    name: str
    dockerfile: str
    inputs: tuple[str, ...]
    base_arg: str
    # The Python images' stand-in has a venv on PATH; the agent's (for NVIDIA's CUDA base, which has no Python)
    # is plain Debian, and its Dockerfile installs python3 itself.
    base_image: str = ""
    # When set, only a change of the Dockerfile or of these keys of pyproject.toml (what pip installs; not its
    # comments, its version or its tool settings) builds the image from its Dockerfile again; between such builds
    # the current borgdqn wheel is installed over the last one (see `_overlay`).
    full_build_on: tuple[str, ...] = ()

    @property
    def repository(self) -> str:
        return f"localhost/borgdqn-{self.name}"


IMAGES: dict[str, ImageSpec] = {
    "memory": ImageSpec("memory", "memory_image/Dockerfile",
                        ("pyproject.toml", "README.md", "borgdqn", "memory_image"), "PYTHON_IMAGE"),
    "operator": ImageSpec("operator", "operator/Dockerfile",
                          ("pyproject.toml", "README.md", "borgdqn", "operator/pyproject.toml",
                           "operator/borg_operator", "operator/Dockerfile"), "PYTHON_IMAGE"),
    # torch comes from PyPI with its CUDA libraries: a 5 GB image, built from its Dockerfile again only when the
    # Dockerfile or the dependencies change; borgdqn's own code is layered on (a few seconds) otherwise.
    "agent": ImageSpec("agent", "agent_image/Dockerfile", ("pyproject.toml", "README.md", "borgdqn"), "CUDA_IMAGE",
                       base_image="debian", full_build_on=("build-system", "project.dependencies",
                                                           "project.optional-dependencies", "project.requires-python")),
}


@dataclass(frozen=True)
class BuiltImage:
    """An image ready for the node: the name pods use and the archive the node imports."""

    name: str
    reference: str
    archive: Path


def _images_dir() -> Path:
    path = cache_root() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(name: str) -> Path:
    return cache_root() / "logs" / f"image-{name}.log"


def _buildah() -> str:
    return require_tool("buildah", "build the test images (apt-get install buildah)")


def _files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for relative in paths:
        path = REPO / relative
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*"))
                         if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        else:
            raise HarnessError(f"image input {relative} does not exist in {REPO}")
    return files


def inputs_hash(paths: Sequence[str], *extra: str) -> str:
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for path in _files(paths):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def pyproject_keys(text: str, keys: Sequence[str]) -> str:
    """The values of ``keys`` (dotted) in a pyproject.toml, as canonical JSON: an edit elsewhere leaves it alone."""
    data = tomllib.loads(text)
    picked: dict[str, object] = {}
    for key in keys:
        node: object = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return json.dumps(picked, sort_keys=True)


def _has_image(reference: str) -> bool:
    return subprocess.run([_buildah(), "inspect", "--type", "image", reference], capture_output=True,
                          check=False).returncode == 0


def _buildah_out(args: Sequence[str], log: Path, what: str) -> str:
    """Runs buildah, returns its stdout (a container or image id); its stderr goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        result = subprocess.run([_buildah(), *args], stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"{what} failed (exit {result.returncode}); log {log}")
    return result.stdout.strip()


@contextlib.contextmanager
def _working_container(image: str, log: Path) -> Iterator[str]:
    """A buildah working container from `image` ("scratch" for none), removed when done."""
    container = _buildah_out(["from", *([] if image == "scratch" else ["--pull=never"]), image], log,
                             f"buildah from {image}")
    try:
        yield container
    finally:
        subprocess.run([_buildah(), "rm", container], capture_output=True, check=False)


def _save(reference: str, archive: Path, log: Path) -> None:
    run_logged([_buildah(), "push", "--quiet", reference, f"docker-archive:{archive}:{reference}"], log,
               f"buildah push {reference} to an archive")


def oci_archive_without(image: BuiltImage, present: Collection[str], out: IO[bytes]) -> int:
    """Streams `image` to `out` as an OCI image-layout archive that leaves out the layers whose digests are in
    `present` (what the importing containerd holds already); returns the bytes of layers written.

    buildah's docker-archives hold uncompressed layers named by their digest (checked against the config's
    diff_ids), so a layer's digest is known without reading it. containerd's import reads the layers the archive
    holds and unpacks only layers whose snapshot it lacks.
    """
    with tarfile.open(image.archive) as source:
        (entry,) = json.loads(_member_bytes(source, "manifest.json"))
        config = _member_bytes(source, entry["Config"])
        image_config = json.loads(config)
        diff_ids = image_config["rootfs"]["diff_ids"]
        layers = [source.getmember(name) for name in entry["Layers"]]
        digests = ["sha256:" + Path(member.name).name.removesuffix(".tar") for member in layers]
        if digests != diff_ids:
            raise HarnessError(f"images: {image.archive.name} does not name its layers by their digests")
        platform = {key: image_config[key] for key in ("architecture", "os")}
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": member.size}
                       for digest, member in zip(digests, layers, strict=True)],
        }).encode()
        index = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{**_descriptor("application/vnd.oci.image.manifest.v1+json", manifest), "platform": platform,
                           "annotations": {"io.containerd.image.name": image.reference}}],
        }).encode()
        written = 0
        with tarfile.open(fileobj=out, mode="w|") as archive:
            for name, data in (("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index),
                               (_blob_path(manifest), manifest), (_blob_path(config), config)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            for digest, member in zip(digests, layers, strict=True):
                if digest in present:
                    continue
                info = tarfile.TarInfo("blobs/sha256/" + digest.removeprefix("sha256:"))
                info.size = member.size
                archive.addfile(info, source.extractfile(member))
                written += member.size
    return written


def _member_bytes(source: tarfile.TarFile, name: str) -> bytes:
    member = source.extractfile(name)
    if member is None:
        raise HarnessError(f"images: {name} is not a file in {os.fsdecode(source.name or '')}")
    return member.read()


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


def _blob_path(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def _base_rootfs(progress: Progress) -> Path:
    """The debootstrapped root file system as a tar (cached: debootstrap is most of a cold base build)."""
    key = hashlib.sha256(f"{DEBIAN_SUITE} {DEBIAN_MIRROR} {','.join(BASE_PACKAGES)}".encode()).hexdigest()[:10]
    log = _log("base")

    def install(scratch: Path) -> None:
        debootstrap = require_tool("debootstrap", "make the Debian base image (apt-get install debootstrap)")
        rootfs = scratch / "rootfs"
        with progress.step(f"Making a Debian {DEBIAN_SUITE} root file system with debootstrap", expect="~75 s"):
            run_logged([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", DEBIAN_SUITE,
                        rootfs, DEBIAN_MIRROR], log, "debootstrap")
            run_logged(["tar", "-C", rootfs, "--numeric-owner", "-cf", scratch / "rootfs.tar", "."], log,
                       "tar of the base root file system")
        shutil.rmtree(rootfs)

    return installed(cache_root() / f"debian-{DEBIAN_SUITE}-rootfs-{key}", install, "debian-rootfs") / "rootfs.tar"


def ensure_base(progress: Progress) -> str:
    """The base images in buildah's storage (made from the cached root file system if missing); the name of the
    one with the venv."""
    if _has_image(BASE_IMAGE) and _has_image(_DEBIAN_IMAGE):
        return BASE_IMAGE
    rootfs = _base_rootfs(progress)
    log = _log("base")
    with progress.step("Committing the Debian base image with a venv on PATH", expect="~15 s"):
        with _working_container("scratch", log) as container:
            _buildah_out(["add", container, str(rootfs), "/"], log, "buildah add (root file system)")
            _buildah_out(["config", "--env", f"PATH={_PATH}", "--env", "LANG=C.UTF-8", container], log,
                         "buildah config")
            _buildah_out(["commit", container, _DEBIAN_IMAGE], log, "buildah commit (debian)")
        with _working_container(_DEBIAN_IMAGE, log) as container:
            _buildah_out(["run", "--network", "host", container, "--", "python3", "-m", "venv", "/opt/venv"], log,
                         "python3 -m venv /opt/venv")
            _buildah_out(["config", "--env", f"PATH=/opt/venv/bin:{_PATH}", "--env", "VIRTUAL_ENV=/opt/venv",
                          container], log, "buildah config (venv)")
            _buildah_out(["commit", container, BASE_IMAGE], log, "buildah commit (base)")
    return BASE_IMAGE


def ensure_pause(progress: Progress, pause_source: Path) -> BuiltImage:
    """The pod sandbox image, compiled from Kubernetes' own `pause.c` (the harness's pinned module)."""
    key = hashlib.sha256(pause_source.read_bytes()).hexdigest()[:10]
    archive = _images_dir() / f"pause-{key}.tar"
    log = _log("pause")
    if not archive.exists():
        gcc = require_tool("gcc", "compile the pause image from Kubernetes' pause.c (apt-get install gcc)")
        with progress.step("Building the pause image from pause.c", expect="a few seconds"):
            work = _images_dir() / f"pause-{key}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                run_logged([gcc, "-Os", "-static", "-o", work / "pause", pause_source], log, "gcc pause.c")
                with _working_container("scratch", log) as container:
                    _buildah_out(["copy", container, str(work / "pause"), "/pause"], log, "buildah copy pause")
                    _buildah_out(["config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container], log,
                                 "buildah config (pause)")
                    _buildah_out(["commit", container, PAUSE_IMAGE], log, "buildah commit (pause)")
                _save(PAUSE_IMAGE, work / "image.tar", log)
                (work / "image.tar").rename(archive)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return BuiltImage("pause", PAUSE_IMAGE, archive)


def ensure_image(progress: Progress, name: str) -> BuiltImage:
    """One of our images built from its Dockerfile on the local base (or found in the cache by its inputs).

    Older builds of the same image (archives and buildah's copies) are removed: the disk holds one of each.
    """
    spec = IMAGES[name]
    tag = inputs_hash([*spec.inputs, spec.dockerfile], DEBIAN_SUITE, *BASE_PACKAGES)
    reference = f"{spec.repository}:test-{tag}"
    archive = _images_dir() / f"{name}-{tag}.tar"
    if archive.exists():
        return BuiltImage(name, reference, archive)
    if not _CA_BUNDLE.is_file():
        raise HarnessError(f"images: no CA bundle at {_CA_BUNDLE} for pip inside the build (apt-get install "
                           "ca-certificates)")
    log = _log(name)
    with locked(f"image-{name}"):
        if archive.exists():  # another session built it while we waited
            return BuiltImage(name, reference, archive)
        log.unlink(missing_ok=True)
        keep = {reference}
        if spec.full_build_on:
            installs = pyproject_keys((REPO / "pyproject.toml").read_text(), spec.full_build_on)
            full_tag = inputs_hash([spec.dockerfile], DEBIAN_SUITE, *BASE_PACKAGES, installs)
            full = f"{spec.repository}:full-{full_tag}"
            keep.add(full)
            if not _has_image(full):
                _build(progress, spec, full, log, layers=False,
                       expect="~6 min (torch and its CUDA libraries from PyPI)")
            with progress.step(f"Installing the current borgdqn into the {name} image", expect="~20 s"):
                _overlay(full, reference, log)
        else:
            _build(progress, spec, reference, log, layers=True, expect="~30 s")
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        with progress.step(f"Saving the {name} image to {archive.name}", expect="a few seconds per GB"):
            _save(reference, partial, log)
        partial.rename(archive)
        _forget_older(spec, keep, archive)
    return BuiltImage(name, reference, archive)


def _build(progress: Progress, spec: ImageSpec, reference: str, log: Path, *, layers: bool, expect: str) -> None:
    base = _DEBIAN_IMAGE if spec.base_image == "debian" else BASE_IMAGE
    if not _has_image(base):
        ensure_base(progress)
    with progress.step(f"Building the {spec.name} image from {spec.dockerfile}", expect=expect):
        run_logged([_buildah(), "bud", "--pull=never", "--network", "host", *(["--layers"] if layers else []),
                    "-v", f"{_CA_BUNDLE}:{_CA_BUNDLE}:ro", "--build-arg", f"{spec.base_arg}={base}",
                    "-f", spec.dockerfile, "-t", reference, "."], log, f"buildah bud {spec.dockerfile}", cwd=REPO,
                   env={**os.environ, "BUILDAH_FORMAT": "docker"})


def _overlay(full: str, reference: str, log: Path) -> None:
    """`full` (built from the Dockerfile) with the current source's borgdqn wheel installed over its own, in the
    image's venv and without dependencies (those are what `full` is keyed on), committed as `reference`."""
    wheels = _images_dir() / "overlay-wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    run_logged([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, "."], log,
               "pip wheel (borgdqn)", cwd=REPO)
    (wheel,) = wheels.glob("borgdqn-*.whl")
    try:
        with _working_container(full, log) as container:
            _buildah_out(["copy", container, str(wheel), f"/tmp/{wheel.name}"], log, "buildah copy (wheel)")
            _buildah_out(["run", "--user", "0:0", container, "--", "python", "-m", "pip", "install", "--quiet",
                          "--no-deps", "--no-cache-dir", "--force-reinstall", f"/tmp/{wheel.name}"], log,
                         "pip install borgdqn (in the image)")
            _buildah_out(["run", "--user", "0:0", container, "--", "rm", f"/tmp/{wheel.name}"], log, "rm (wheel)")
            # The Dockerfile's own last check, on the new code.
            _buildah_out(["run", container, "--", "python", "-c", "import torch, ale_py, gymnasium, borgdqn.cli"],
                         log, "the image's import check")
            _buildah_out(["commit", "--quiet", container, reference], log, f"buildah commit {reference}")
    finally:
        shutil.rmtree(wheels, ignore_errors=True)


def _forget_older(spec: ImageSpec, keep: set[str], archive: Path) -> None:
    """Removes the other archives of `spec` and buildah's other tags of its repository."""
    for old in _images_dir().glob(f"{spec.name}-*.tar"):
        if old != archive:
            old.unlink(missing_ok=True)
    listed = subprocess.run([_buildah(), "images", "--format", "{{.Name}}:{{.Tag}}"], capture_output=True,
                            text=True, check=False).stdout.split()
    for reference in listed:
        if reference.rpartition(":")[0] == spec.repository and reference not in keep:
            subprocess.run([_buildah(), "rmi", "--force", reference], capture_output=True, check=False)
