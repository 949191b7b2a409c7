"""Draw docs/architecture.svg: how a BorgCollective becomes a running hive on Kubernetes.

    python docs/architecture.py            # (re)write docs/architecture.svg
    python docs/architecture.py --check    # exit 1 when the committed SVG is not what this script draws

Standard library only, and deterministic: the same source gives the same bytes (no timestamps, coordinates
rounded to one decimal). The children's names are not typed here: they are read from the operator's
`operator/borg_operator/names.py` (its one-line `return f"{cr}-part"` functions) for the collective `pong`, so a
renamed child makes `--check` fail until the picture is drawn again. tests/repo/test_architecture_picture.py runs the
check and compares every (kind, name) drawn with the operator's golden manifests.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
SVG_PATH = ROOT / "docs" / "architecture.svg"
NAMES_PY = ROOT / "operator" / "borg_operator" / "names.py"

CR = "pong"  # the collective drawn: examples/borgcollective-pong.yaml
WIDTH, HEIGHT = 1040, 816

SANS = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, 'Noto Sans', 'DejaVu Sans', sans-serif"
MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'Liberation Mono', 'DejaVu Sans Mono', monospace"

# Text styles: (font size, family, weight, fill).
STYLES = {
    "group": (13.0, SANS, "700", "#1f2328"),
    "sub": (11.0, SANS, "400", "#57606a"),
    "kind": (10.5, SANS, "600", "#57606a"),
    "name": (12.0, MONO, "700", "#1f2328"),
    "text": (11.0, SANS, "400", "#3d444d"),
    "code": (11.0, MONO, "400", "#1f2328"),
    "label": (11.0, SANS, "600", "#3d444d"),
}

# Arrows: (stroke colour, dash pattern or "", legend text).
ARROWS = {
    "control": ("#8250df", "6 4", "control: watch, apply, status"),
    "replay": ("#0969da", "", "experience (protobuf)"),
    "telemetry": ("#bc4c00", "", "telemetry and dashboards"),
    "mount": ("#6e7781", "2 3", "mounted config"),
}

# Group fills: (fill, stroke, dash).
GROUPS = {
    "plane": ("#f5f0ff", "#a991e6", ""),
    "namespace": ("#f6f8fa", "#8c959f", ""),
    "gpu": ("#e9f7ec", "#4ac26b", "5 3"),
    "memory": ("#eef5ff", "#80b3f0", ""),
    "eck": ("#fff4e8", "#f0a860", ""),
    "you": ("#ffffff", "#8c959f", ""),
}


def num(value: float) -> str:
    """A coordinate as the SVG writes it: at most one decimal, no trailing zero, never `-0`."""
    text = f"{round(value, 1):.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def text_width(text: str, style: str) -> float:
    """A generous estimate of a line's width (DejaVu's wide capitals and digits count more)."""
    size, family, weight, _ = STYLES[style]
    if family == MONO:
        return len(text) * size * 0.64
    em = sum(0.72 if char.isupper() or char.isdigit() else 0.62 for char in text)
    spacing = 0.6 * len(text) if style == "kind" else 0.0
    return em * size * (1.08 if weight >= "600" else 1.0) + spacing


def child_names(cr: str, source: Path = NAMES_PY) -> dict[str, str]:
    """{function: name} for names.py's functions that return `f"{cr}-part"` (or `cr` itself)."""
    found: dict[str, str] = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.FunctionDef) and len(node.body) == 1 and len(node.args.args) == 1):
            continue
        arg, value = node.args.args[0].arg, getattr(node.body[0], "value", None)
        if isinstance(value, ast.Name) and value.id == arg:
            found[node.name] = cr
        elif isinstance(value, ast.JoinedStr):
            parts = []
            for part in value.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    parts.append(part.value)
                elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id == arg:
                    parts.append(cr)
                else:
                    break
            else:
                found[node.name] = "".join(parts)
    return found


def children(cr: str = CR) -> list[tuple[str, str]]:
    """(kind, name) of every child the picture shows, in drawing order."""
    n = child_names(cr)
    return [
        ("StatefulSet", n["agents"]),
        ("ConfigMap", n["config"]),
        ("StatefulSet", n["memory"]),
        ("Service", n["memory"]),
        ("Secret", n["redis_secret"]),
        ("StatefulSet", n["kafka"]),
        ("Kafka", n["kafka"]),
        ("Deployment", n["indexer"]),
        ("Elasticsearch", n["elasticsearch"]),
        ("Kibana", n["kibana"]),
        ("Job", n["kibana_setup"]),
        ("Ingress", n["kibana_ingress"]),
        ("NetworkPolicy", n["memory"]),
        ("NetworkPolicy", n["kafka"]),
    ]


class Canvas:
    """SVG elements in drawing order: groups first, then boxes, arrows and labels on top."""

    def __init__(self) -> None:
        self.elements: list[str] = []

    def text(self, x: float, y: float, content: str, style: str, anchor: str = "start") -> None:
        attrs = f'x="{num(x)}" y="{num(y)}" class="{style}"'
        if anchor != "start":
            attrs += f' text-anchor="{anchor}"'
        self.elements.append(f"<text {attrs}>{escape(content)}</text>")

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        fill: str,
        stroke: str,
        dash: str = "",
        radius: float = 8,
        width: float = 1.2,
    ) -> None:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        self.elements.append(
            f'<rect x="{num(x)}" y="{num(y)}" width="{num(w)}" height="{num(h)}" rx="{num(radius)}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{num(width)}"{dashed}/>'
        )

    def group(self, x: float, y: float, w: float, h: float, kind: str, title: str, subtitle: str = "") -> None:
        fill, stroke, dash = GROUPS[kind]
        self.rect(x, y, w, h, fill, stroke, dash, radius=12, width=1.4)
        self.text(x + 14, y + 21, title, "group")
        if subtitle:
            self.text(x + 14 + text_width(title, "group") + 8, y + 21, subtitle, "sub")

    def box(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        kind: str,
        name: str,
        lines: Sequence[str] = (),
        fill: str = "#ffffff",
        stroke: str = "#8c959f",
    ) -> None:
        """A Kubernetes object: its kind (small caps), its name (monospace), then a few lines; `code:` lines are
        set in monospace. Refuses text that would not fit, the one rule that keeps the picture free of overlaps."""
        self.rect(x, y, w, h, fill, stroke)
        rows = [(kind.upper(), "kind", 16.0), (name, "name", 17.0)] if kind else [(name, "name", 17.0)]
        rows += [(line.removeprefix("code:"), "code" if line.startswith("code:") else "text", 15.0) for line in lines]
        baseline = y + 6
        for content, style, step in rows:
            baseline += step
            if text_width(content, style) > w - 20 or baseline > y + h - 5:
                raise ValueError(f"text does not fit its box ({x}, {y}, {w}x{h}): {content!r}")
            self.text(x + 10, baseline, content, style)

    def arrow(self, points: list[tuple[float, float]], kind: str) -> None:
        """A polyline with a triangular head at its last point, in the colour and dash of its kind."""
        colour, dash, _ = ARROWS[kind]
        (x0, y0), (x1, y1) = points[-2], points[-1]
        length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
        ux, uy = (x1 - x0) / length, (y1 - y0) / length
        bx, by = x1 - ux * 9, y1 - uy * 9
        head = [(x1, y1), (bx - uy * 4.5, by + ux * 4.5), (bx + uy * 4.5, by - ux * 4.5)]
        line = [*points[:-1], (x1 - ux * 6, y1 - uy * 6)]  # stops inside the head: no stroke past the tip
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        self.elements.append(
            f'<polyline points="{" ".join(f"{num(px)},{num(py)}" for px, py in line)}" fill="none" '
            f'stroke="{colour}" stroke-width="1.8"{dashed}/>'
        )
        self.elements.append(
            f'<polygon points="{" ".join(f"{num(px)},{num(py)}" for px, py in head)}" fill="{colour}"/>'
        )

    def label(self, x: float, y: float, lines: list[str], kind: str, anchor: str = "start") -> None:
        """A short arrow label in the arrow's colour, one row per line."""
        for row, content in enumerate(lines):
            self.elements.append(
                f'<text x="{num(x)}" y="{num(y + 13 * row)}" class="label" fill="{ARROWS[kind][0]}"'
                + (f' text-anchor="{anchor}"' if anchor != "start" else "")
                + f">{escape(content)}</text>"
            )

    def svg(self) -> str:
        css = "\n".join(
            f".{name} {{ font: {weight} {num(size)}px {family}; fill: {fill}; }}"
            for name, (size, family, weight, fill) in STYLES.items()
        )
        css += "\n.kind { letter-spacing: 0.6px; }"
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="title desc">\n'
            '<title id="title">Borg-DQN on Kubernetes</title>\n'
            '<desc id="desc">A BorgCollective resource, the borg-operator that reconciles it, and the children it '
            "creates: GPU agents, the Redis replay memory, Kafka, the indexer, Elasticsearch and Kibana.</desc>\n"
            f"<style>\n{css}\n</style>\n"
            f'<rect width="{WIDTH}" height="{HEIGHT}" rx="14" fill="#ffffff"/>\n'
            + "\n".join(self.elements)
            + "\n</svg>\n"
        )


def gpu_chip(c: Canvas, x: float, y: float) -> None:
    """A small GPU: a board with pins above and below."""
    for pin in range(4):
        c.rect(x + 5 + pin * 8, y - 3, 3, 3, "#4ac26b", "none", radius=0, width=0)
        c.rect(x + 5 + pin * 8, y + 20, 3, 3, "#4ac26b", "none", radius=0, width=0)
    c.rect(x, y, 38, 20, "#1a7f37", "#116329", radius=3)
    c.elements.append(
        f'<text x="{num(x + 19)}" y="{num(y + 14)}" text-anchor="middle" '
        f'style="font: 700 10px {SANS}; fill: #ffffff;">GPU</text>'
    )


def draw(cr: str = CR) -> str:
    n = child_names(cr)
    c = Canvas()

    # --- You, the control plane, your browser --------------------------------------------------------------
    c.group(16, 24, 264, 134, "you", "you")
    for row, command in enumerate(
        [f"helm install {cr} borg-collective", f"kubectl apply -f {cr}.yaml", f"kubectl scale borg/{cr} --replicas=8"]
    ):
        c.text(30, 70 + 22 * row, "$ " + command, "code")
    c.text(30, 138, "or edit spec.agents.replicas", "sub")

    c.group(316, 24, 412, 134, "plane", "control plane", "kube-apiserver + operator")
    c.box(332, 54, 168, 90, "BorgCollective", cr, ["borg.dev/v1alpha1", "spec · status · scale"])
    c.box(556, 54, 160, 90, "Deployment", "borg-operator", ["kopf: pure builders,", "server-side apply"])
    c.arrow([(280, 99), (332, 99)], "control")
    c.label(306, 92, ["spec"], "control", "middle")
    c.arrow([(500, 86), (556, 86)], "control")
    c.label(528, 79, ["watch"], "control", "middle")
    c.arrow([(556, 120), (500, 120)], "control")
    c.label(528, 136, ["status"], "control", "middle")

    c.group(764, 24, 260, 134, "you", "your browser")
    c.box(
        778,
        52,
        232,
        92,
        "",
        "Kibana",
        ["dashboard “Borg collective”:", "returns, epsilon, loss,", "memory fill and shares"],
        stroke="#f0a860",
    )

    # --- The collective's namespace -------------------------------------------------------------------------
    c.group(16, 196, 1008, 560, "namespace", "namespace borg", f"every child is owned by BorgCollective {cr}")
    c.arrow([(612, 144), (612, 196)], "control")
    c.label(604, 176, ["apply · prune"], "control", "end")
    c.arrow([(664, 196), (664, 144)], "control")
    c.label(672, 176, ["watch"], "control")

    # GPU agents.
    c.group(32, 232, 224, 382, "gpu", "GPU nodes")
    c.text(46, 270, "one nvidia.com/gpu per agent pod", "sub")
    c.box(44, 282, 200, 320, "StatefulSet", n["agents"], ["N = spec.agents.replicas"])
    for top, title in [(352, "agent pod 0"), (418, "agent pod 1"), (532, "agent pod N-1")]:
        c.rect(56, top, 176, 54, "#ffffff", "#4ac26b", radius=6)
        c.text(66, top + 20, title, "kind")
        c.text(66, top + 40, "borgdqn train", "code")
        gpu_chip(c, 184, top + 17)
    c.text(144, 508, "⋮", "group", "middle")
    c.box(32, 650, 224, 90, "ConfigMap", n["config"], ["code:borgdqn.yaml", "mounted at /etc/borgdqn"])
    c.arrow([(144, 650), (144, 602)], "mount")

    # The replay memory: one Redis pod with the monitor beside it, its volume, password and Service.
    c.group(368, 232, 264, 264, "memory", "replay memory", "Redis")
    c.box(380, 262, 240, 150, "StatefulSet", n["memory"], stroke="#80b3f0")
    c.box(392, 306, 164, 44, "", "redis-server", ["chunks · priorities"], stroke="#80b3f0")
    c.box(392, 358, 164, 44, "", "memory-monitor", ["sidecar: fill, shares"], stroke="#80b3f0")
    c.elements.append(  # the volume: a cylinder beside Redis
        '<path d="M566 316 v28 a21 5 0 0 0 42 0 v-28 a21 5 0 0 0 -42 0 a21 5 0 0 0 42 0" '
        'fill="#ffffff" stroke="#80b3f0" stroke-width="1.2"/>'
    )
    c.elements.append('<line x1="556" y1="330" x2="566" y2="330" stroke="#80b3f0" stroke-width="1.2"/>')
    c.text(587, 337, "PVC", "kind", "middle")
    c.text(587, 366, "data", "sub", "middle")
    c.box(380, 422, 108, 62, "Secret", n["redis_secret"], ["password"], stroke="#80b3f0")
    c.box(512, 422, 108, 62, "Service", n["memory"], [":6379"], stroke="#80b3f0")

    # Agents <-> memory, agents -> Kafka.
    c.arrow([(244, 320), (392, 320)], "replay")
    c.label(318, 300, ["trajectory chunks", "+ priorities"], "replay", "middle")
    c.arrow([(392, 340), (244, 340)], "replay")
    c.label(318, 358, ["sampled batches", "protobuf · LZ4"], "replay", "middle")

    # Kafka.
    c.box(
        368,
        548,
        264,
        96,
        "Kafka :9092",
        n["kafka"],
        [
            "managed: StatefulSet (KRaft)",
            "strimzi: Kafka + KafkaNodePool",
            "external: your bootstrapServers",
        ],
        stroke="#f0a860",
    )
    c.arrow([(244, 585), (368, 585)], "telemetry")
    c.label(306, 564, ["episodes,", "training reports"], "telemetry", "middle")
    c.arrow([(500, 402), (500, 548)], "telemetry")
    c.label(508, 526, ["memory reports"], "telemetry")

    # Elasticsearch, Kibana, the indexer.
    c.box(704, 232, 140, 62, "Ingress", n["kibana_ingress"], ["host · TLS"], stroke="#f0a860")
    c.box(856, 232, 152, 62, "Job", n["kibana_setup"], ["imports dashboards"], stroke="#f0a860")
    c.group(692, 316, 324, 200, "eck", "Elastic (ECK)")
    c.box(704, 346, 300, 62, "Kibana", n["kibana"], ["ECK serves it over HTTPS, :5601"], stroke="#f0a860")
    c.box(704, 442, 300, 62, "Elasticsearch", n["elasticsearch"], ["one index per event kind, :9200"], stroke="#f0a860")
    c.box(
        704,
        548,
        300,
        74,
        "Deployment",
        n["indexer"],
        ["code:borgdqn indexer", "bulk writes, ids from (source, seq)"],
        stroke="#f0a860",
    )
    c.arrow([(632, 585), (704, 585)], "telemetry")
    c.label(668, 577, ["events"], "telemetry", "middle")
    c.arrow([(856, 548), (856, 504)], "telemetry")
    c.label(864, 530, ["bulk index"], "telemetry")
    c.arrow([(856, 442), (856, 408)], "telemetry")
    c.label(864, 428, ["search"], "telemetry")
    c.arrow([(776, 346), (776, 294)], "telemetry")
    c.arrow([(776, 232), (776, 144)], "telemetry")
    c.label(784, 180, ["HTTPS"], "telemetry")
    c.arrow([(934, 294), (934, 346)], "telemetry")
    c.label(942, 326, ["import"], "telemetry")

    # Network policies: who may reach the memory and Kafka.
    c.rect(368, 676, 640, 64, "#ffffff", "#8c959f")
    c.text(378, 698, "NETWORKPOLICY", "kind")
    for row, (name, rule) in enumerate(
        [
            (n["memory"], "Redis :6379 only from the agents, the memory pod and the operator"),
            (n["kafka"], "Kafka :9092 only from the agents, the memory pod and the indexer (managed)"),
        ]
    ):
        c.text(378, 716 + 16 * row, name, "code")
        c.text(378 + 104, 716 + 16 * row, rule, "text")

    # --- Legend ---------------------------------------------------------------------------------------------
    x = 24.0
    for kind, (_, _, text) in ARROWS.items():
        c.arrow([(x, 790), (x + 36, 790)], kind)
        c.text(x + 44, 794, text, "text")
        x += 44 + text_width(text, "text") + 26
    return c.svg()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw docs/architecture.svg from the operator's names.")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/architecture.svg is stale")
    args = parser.parse_args(argv)
    drawn = draw()
    if args.check:
        committed = SVG_PATH.read_text(encoding="utf-8") if SVG_PATH.exists() else ""
        if committed != drawn:
            print(f"{SVG_PATH.name} is stale: run `python tools/regenerate.py` and commit it", file=sys.stderr)
            return 1
        return 0
    SVG_PATH.write_text(drawn, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
