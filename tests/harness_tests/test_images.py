"""How the harness hands an image to the real node's containerd: an OCI archive without the layers it holds.

The real-node tests import every image this way (and run pods from them); here, on a small docker-archive laid
out as buildah writes one, what goes into the archive and what is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.harness.errors import HarnessError
from tests.harness.images import IMAGES, REPO, BuiltImage, oci_archive_without, pyproject_keys

REFERENCE = "localhost/borgdqn-test/probe:test-1"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def docker_archive(path: Path, layers: list[bytes], *, name_layers_by_digest: bool = True) -> list[str]:
    """A docker-archive as `buildah push docker-archive:` writes it; returns the layers' digests."""
    digests = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": digests}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [(digest.removeprefix("sha256:") if name_layers_by_digest else f"layer{i}") + ".tar"
             for i, digest in enumerate(digests)]
    with tarfile.open(path, "w") as archive:
        for name, layer in zip(names, layers, strict=True):
            _add(archive, name, layer)
        _add(archive, config_name, config)
        _add(archive, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [REFERENCE],
                                                    "Layers": names}]).encode())
    return digests


def read_oci(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {member.name: archive.extractfile(member).read()  # type: ignore[union-attr]
                for member in archive.getmembers()}


def test_the_archive_holds_the_layers_containerd_lacks_and_names_the_image(tmp_path: Path) -> None:
    layers = [b"base layer " * 100, b"venv layer " * 50, b"new borgdqn"]
    digests = docker_archive(tmp_path / "image.tar", layers)
    out = io.BytesIO()

    sent = oci_archive_without(BuiltImage("probe", REFERENCE, tmp_path / "image.tar"), set(digests[:2]), out)

    files = read_oci(out.getvalue())
    assert sent == len(layers[2])
    blobs = {name.removeprefix("blobs/sha256/"): data for name, data in files.items() if name.startswith("blobs/")}
    assert digests[2].removeprefix("sha256:") in blobs and blobs[digests[2].removeprefix("sha256:")] == layers[2]
    assert not {d.removeprefix("sha256:") for d in digests[:2]} & set(blobs)
    for digest, data in blobs.items():  # every blob is stored under its own digest
        assert hashlib.sha256(data).hexdigest() == digest
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == REFERENCE
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(blobs[entry["digest"].removeprefix("sha256:")])
    assert [layer["digest"] for layer in manifest["layers"]] == digests  # all three, in order
    assert [layer["size"] for layer in manifest["layers"]] == [len(layer) for layer in layers]
    assert manifest["config"]["digest"].removeprefix("sha256:") in blobs


def test_nothing_present_sends_every_layer(tmp_path: Path) -> None:
    layers = [b"one", b"two"]
    docker_archive(tmp_path / "image.tar", layers)
    out = io.BytesIO()
    assert oci_archive_without(BuiltImage("probe", REFERENCE, tmp_path / "image.tar"), set(), out) == 6


def test_an_archive_whose_layer_names_are_not_their_digests_is_refused(tmp_path: Path) -> None:
    docker_archive(tmp_path / "image.tar", [b"one"], name_layers_by_digest=False)
    with pytest.raises(HarnessError, match="does not name its layers by their digests"):
        oci_archive_without(BuiltImage("probe", REFERENCE, tmp_path / "image.tar"), set(), io.BytesIO())


def test_the_agent_image_is_built_anew_only_when_what_pip_installs_changes() -> None:
    """The 6 GB agent image is keyed on pyproject.toml's dependencies, not its bytes: a comment, the version or a
    tool setting changes nothing (the current borgdqn is layered on), a dependency does."""
    keys = IMAGES["agent"].full_build_on
    text = (REPO / "pyproject.toml").read_text()
    before = pyproject_keys(text, keys)
    assert "torch>=" in before and "numpy>=" in before  # the real file's dependencies were read
    edited = text.replace("[tool.pytest.ini_options]", "# a comment\n[tool.pytest.ini_options]\nprobe = 1\n", 1)
    edited = edited.replace('version = "', 'version = "9', 1)
    assert edited != text and pyproject_keys(edited, keys) == before
    assert pyproject_keys(text.replace('"numpy', '"numpy>=0,', 1), keys) != before
