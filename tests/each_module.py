"""Runs every test module on its own, in a pytest process of its own, and reports each one's result and
time: a module that passes in the suite but not alone leans on another's side effects.

    python -m tests.each_module [-j 2] [--seed N] [test_foo.py ...]

Not part of CI (it runs the whole suite again, a module at a time); `-j` runs that many modules side by
side. The exit status is 0 when every module passed (or skipped all its tests).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent
OUTCOME = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def run_module(module: Path, root: Path, seed: int | None) -> tuple[str, int, float, float, str, str]:
    """(module, exit status, seconds, CPU seconds, pytest's summary line, output tail).

    The CPU seconds are the module's whole process tree as its pytest reaped it: its control plane, pods,
    local runs and servers included. They say what a module costs a CI machine, where wall time depends on
    what ran beside it."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={root / module.stem}"]
    if seed is not None:
        command.append(f"--randomly-seed={seed}")
    # The tools the tests run (kubectl, hadolint) are installed beside this interpreter: found as in an
    # activated virtualenv, however this script was started.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([*command, str(module.relative_to(ROOT))], cwd=ROOT, stdout=out, stderr=out, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's tree's rusage, not the whole runner's
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().strip().splitlines()
    summary = next((line.strip("= ") for line in reversed(lines) if OUTCOME.search(line)), "no summary")
    cpu = usage.ru_utime + usage.ru_stime
    return module.name, process.returncode, time.monotonic() - started, cpu, summary, "\n".join(lines[-30:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.each_module", description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=2, help="modules run side by side (default 2)")
    parser.add_argument("--seed", type=int, help="pytest-randomly's seed for every module (default: a new one each)")
    parser.add_argument("modules", nargs="*", help="test modules (default: every tests/test_*.py)")
    args = parser.parse_args(argv)
    modules = [TESTS / m for m in args.modules] if args.modules else sorted(TESTS.glob("test_*.py"))
    started = time.monotonic()
    (ROOT / ".pytest-tmp").mkdir(exist_ok=True)
    results: list[str] = []
    cpus: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="each-module-", dir=ROOT / ".pytest-tmp") as root,
        ThreadPoolExecutor(args.jobs) as pool,
    ):
        for name, code, seconds, cpu, summary, tail in pool.map(
            lambda m: run_module(m, Path(root), args.seed), modules
        ):
            verdict = "ok" if code in (0, 5) else "FAILED"  # 5: no test selected (every one skipped by a marker)
            print(f"{verdict:6} {seconds:7.1f} s {cpu:7.1f} cpu-s  {name:32} {summary}", flush=True)
            if verdict != "ok":
                print("    " + tail.replace("\n", "\n    "), flush=True)
            results.append(verdict)
            cpus.append(cpu)
    failed = results.count("FAILED")
    print(
        f"{len(results) - failed} of {len(results)} modules green alone, in {time.monotonic() - started:.0f} s,"
        f" {sum(cpus):.0f} CPU-s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
