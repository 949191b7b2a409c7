"""Strimzi's CustomResourceDefinitions (`Kafka`, `KafkaNodePool`, `KafkaUser`), generated the way Strimzi
generates them.

No package registry carries Strimzi's CRD YAML files (Maven Central's `io.strimzi:api` jar holds the annotated
model classes only; the YAML is a release asset on GitHub). But those CRDs are *generated*: Strimzi's build runs
`io.strimzi:crd-generator` over the classes of `io.strimzi:api`, and Maven Central carries both. So the harness
fetches the two with Maven and runs the generator, which yields the same CRDs as Strimzi's release, schema,
printer columns and all, at the pinned version.

Strimzi 1.x serves `kafka.strimzi.io/v1` only (v1beta2 went with 1.0) and is compiled for Java 21: the
generator needs a Java 21 or newer, found on PATH, in `$JAVA_HOME` or under /usr/lib/jvm (the Kafka broker of
the harness runs on Java 17, so the first `java` on PATH may be too old).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tests.harness.cache import Progress, cache_root, installed, run_logged, run_maven
from tests.harness.errors import HarnessError
from tests.harness.kafka import java_major

VERSION = "1.2.0"  # keep in step with strimzi.version in maven/strimzi/pom.xml
POM = Path(__file__).resolve().parent / "maven" / "strimzi" / "pom.xml"
MIN_JAVA = 21  # Strimzi 1.x's classes are Java 21 bytecode (class file version 65)
GENERATOR = "io.strimzi.crdgenerator.CrdGenerator"
# model class -> the file name Strimzi's release gives the CRD
CRDS = {
    "io.strimzi.api.kafka.model.kafka.Kafka": "040-Crd-kafka.yaml",
    "io.strimzi.api.kafka.model.nodepool.KafkaNodePool": "045-Crd-kafkanodepool.yaml",
    "io.strimzi.api.kafka.model.user.KafkaUser": "044-Crd-kafkauser.yaml",
}
# The labels Strimzi's own build puts on its CRDs (its install files select on strimzi.io/crd-install).
LABELS = ("app:strimzi", "strimzi.io/crd-install:true")
KUBE_TARGET = "1.25+"


def _java_candidates() -> list[Path]:
    found: list[Path] = []
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        found.append(Path(java_home) / "bin" / "java")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if directory:
            found.append(Path(directory) / "java")
    # Newest first by name is a guess; the version check below decides.
    found.extend(sorted(Path("/usr/lib/jvm").glob("*/bin/java"), reverse=True))
    return [path for path in dict.fromkeys(found) if path.is_file() and os.access(path, os.X_OK)]


def find_java(min_major: int = MIN_JAVA) -> str:
    """The first Java of at least `min_major` among PATH, $JAVA_HOME and /usr/lib/jvm; HarnessError if none."""
    seen: list[str] = []
    for java in _java_candidates():
        try:
            major = java_major(str(java))
        except HarnessError:
            continue
        if major >= min_major:
            return str(java)
        seen.append(f"{java} (Java {major})")
    have = "; found " + ", ".join(seen) if seen else ""
    raise HarnessError(f"strimzi: generating Strimzi {VERSION}'s CRDs needs Java {min_major} or newer on PATH, "
                       f"in $JAVA_HOME or under /usr/lib/jvm{have}")


def strimzi_crds(progress: Progress) -> list[Path]:
    """Strimzi's CRDs of CRDS (`Kafka`, `KafkaNodePool`, `KafkaUser`) at the pinned version, generated into the
    cache once."""
    # The pom's and the list's digest are in the name too, so that editing either refetches and regenerates.
    digest = hashlib.sha256(POM.read_bytes() + repr(sorted(CRDS.items())).encode()).hexdigest()[:8]
    target = cache_root() / f"strimzi-crds-{VERSION}-{digest}"

    def install(scratch: Path) -> None:
        java = find_java()
        with progress.step(f"Fetching Strimzi {VERSION}'s API model and CRD generator from Maven Central",
                           expect="~20 s"):
            run_maven(POM, ["dependency:copy-dependencies", "-DincludeScope=runtime",
                            f"-DoutputDirectory={scratch / 'libs'}"],
                      scratch / "install.log", f"fetch Strimzi {VERSION}", cwd=scratch)
        outputs = {model: scratch / "crds" / name for model, name in CRDS.items()}
        outputs[next(iter(outputs))].parent.mkdir()
        labels = [arg for label in LABELS for arg in ("--label", label)]
        with progress.step(f"Generating Strimzi {VERSION}'s CRDs", expect="~5 s"):
            run_logged([java, "-cp", str(scratch / "libs" / "*"), GENERATOR, "--yaml", "--crd-api-version", "v1",
                        "--target-kube", KUBE_TARGET, *labels,
                        *(f"{model}={path}" for model, path in outputs.items())],
                       scratch / "install.log", f"generate Strimzi {VERSION}'s CRDs", cwd=scratch)
        missing = [str(path) for path in outputs.values() if not path.is_file() or path.stat().st_size == 0]
        if missing:
            raise HarnessError(f"strimzi: the CRD generator finished but wrote no {', '.join(missing)}")
        shutil.rmtree(scratch / "libs")  # 37 jars, still in the Maven repository; only the CRDs are kept

    crds = sorted((installed(target, install, "strimzi") / "crds").glob("*.yaml"))
    if len(crds) != len(CRDS):
        raise HarnessError(f"strimzi: expected {len(CRDS)} CRDs under {target / 'crds'}, found {len(crds)}")
    return crds
