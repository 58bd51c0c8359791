"""The images the node agent "has", with the defaults a container runtime takes from an image's
config: ENTRYPOINT, CMD, USER, WORKDIR and ENV, read from this checkout's Dockerfile target that
builds each image (`operator`, `jobs`). Every image is this checkout on this machine's interpreter.

What the Dockerfile does not say is not known here: the base images' own ENTRYPOINT and CMD (the CUDA
image's entrypoint wrapper prints a banner and execs its arguments; the Python image's CMD is
overridden by the `operator` target's own). A stage in a target inherits from an earlier stage it
names in FROM.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from idpo_operator.spec import DEFAULT_STAGE_IMAGE

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "idpo"
STAGE_TARGET = "jobs"  # the target of an `--image NAME` given without one


@dataclass(frozen=True)
class ImageConfig:
    """What a runtime reads from an image's config (`docker inspect`'s Config)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """What a kubelet runs: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args else self.cmd)]

    def uid_gid(self) -> tuple[int, int]:
        """USER as numbers (`1000:1000`, or `1000` with group 0); root when the image sets none."""
        user, _, group = self.user.partition(":")
        if not user:
            return 0, 0
        if not user.isdigit() or not (group or "0").isdigit():
            raise ValueError(f"USER {self.user!r}: the node agent knows numeric users only")
        return int(user), int(group or 0)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue  # a comment or parser directive; inside a continued instruction Docker drops it too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if whole:
            keyword, _, rest = whole.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    """The JSON (exec) form as written; the shell form runs under `/bin/sh -c`, as Docker runs it."""
    if value.startswith("["):
        return list(json.loads(value))
    return ["/bin/sh", "-c", value]


def _env(value: str, env: dict[str, str]) -> dict[str, str]:
    """`ENV k=v k2="v 2"` (or the old `ENV k v`), with `$VAR` / `${VAR}` from earlier variables."""

    def expand(text: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text)

    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: expand(" ".join(words[1:]))}
    out = {}
    for word in words:
        key, _, val = word.partition("=")
        out[key] = expand(val)
        env = {**env, key: out[key]}
    return out


def dockerfile_targets(text: str) -> dict[str, ImageConfig]:
    """The config each named stage (`FROM ... AS name`) of a Dockerfile gives its image."""
    targets: dict[str, ImageConfig] = {}
    current: ImageConfig | None = None
    name = ""
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            found = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            if not found:
                raise ValueError(f"FROM {rest!r}: not understood")
            base, name = found.group(1), found.group(2) or ""
            current = targets.get(base, ImageConfig())
        elif current is None:
            continue  # ARG before the first FROM
        elif keyword == "ENTRYPOINT":
            current = replace(current, entrypoint=_exec_form(rest), cmd=[])  # a new ENTRYPOINT resets CMD
        elif keyword == "CMD":
            current = replace(current, cmd=_exec_form(rest))
        elif keyword == "USER":
            current = replace(current, user=rest)
        elif keyword == "WORKDIR":
            current = replace(current, workdir=str(Path(current.workdir or "/") / rest))
        elif keyword == "ENV":
            current = replace(current, env={**current.env, **_env(rest, current.env)})
        if name:
            targets[name] = current
    return targets


def default_images() -> dict[str, str]:
    """Image -> Dockerfile target: the spec's stage image and the chart's operator image."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    operator = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    return {DEFAULT_STAGE_IMAGE: STAGE_TARGET, operator: "operator"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--image` and `--layer`, as `python -m tests.controlplane up` and the node agent both take them."""
    parser.add_argument(
        "--image",
        action="append",
        help="an image the nodes have, built by the Dockerfile's TARGET (default jobs); repeatable "
        "(default: the spec's stage image and the chart's operator image)",
    )
    parser.add_argument("--layer", action="append", help="IMAGE=DIR: a virtualenv layered over IMAGE (repeatable)")


def parse_images(specs: list[str] | None) -> dict[str, str]:
    """`--image NAME[=TARGET]` options (TARGET defaults to the stage image's) as image -> target."""
    if not specs:
        return default_images()
    return {name: target or STAGE_TARGET for name, _, target in (s.partition("=") for s in specs)}


def parse_layers(specs: list[str] | None, known: dict[str, ImageConfig]) -> dict[str, Path]:
    """`--layer IMAGE=DIR` options as image -> DIR, each for an image the node has."""
    layers = {}
    for spec in specs or []:
        image, _, layer = spec.partition("=")
        if not layer or image not in known:
            raise ValueError(f"--layer {spec!r}: want IMAGE=DIR for one of the images ({', '.join(known)})")
        layers[image] = Path(layer).resolve()
    return layers


def load(images: dict[str, str], dockerfile: Path = DOCKERFILE) -> dict[str, ImageConfig]:
    """Each image's config, from its target in the Dockerfile."""
    targets = dockerfile_targets(dockerfile.read_text())
    missing = sorted({t for t in images.values() if t not in targets})
    if missing:
        raise ValueError(f"no Dockerfile target {', '.join(missing)} (targets: {', '.join(targets)})")
    return {image: targets[target] for image, target in images.items()}
