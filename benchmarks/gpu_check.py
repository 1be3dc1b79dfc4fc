"""The GPU check (issue 14): everything pixelwise can only measure or test on a CUDA device, in one command.

Steps, each a subprocess with its own time budget (together at most 8 minutes on one H100/H200):

- ``install``: the peers missing here (segmentation-models-pytorch, pydensecrf2) from the files in
  ``--wheels`` (default ``.whl/``), pip ``--no-index``: nothing is downloaded (only when needed);
- ``tests``: every test marked ``cuda`` (CRF on CUDA vs CPU, bf16/fp16 autocast training, SyncBatchNorm +
  DDP over NCCL under torchrun with one process per GPU, at most 2);
- ``speed``: the speed table on the GPU with ``--fast`` (every pair; without smp the torchvision pairs);
- ``speed_compile``: ``--fast --compile`` on DeepLabv3+ separable vs smp (deeplabv3_resnet50 without smp);
- ``mfu``: DeepLabv3-ResNet-101 inference and training step, 512x512, batch 16, bf16, against the peak;
- ``crf``: the dense CRF on the GPU against pydensecrf on the CPU (skipped without pydensecrf).

Writes ``gpu_summary.json`` (every step: command, budget, seconds, status), ``gpu_tests.json``,
``gpu_speed.json``, ``gpu_speed_compile.json``, ``gpu_mfu.json``, ``gpu_crf.json`` and ``gpu_check.log``
(every step's output) into ``--out`` (default benchmarks/results): 7 files, so the device tool's ``$OUT``
(at most 8) takes them all. No data travels: the tests train on synthetic images, the speed table times
random tensors, the CRF refines synthetic blobs (CamVid where ../shared/data is beside the clone).

``--dry-run`` (on any CPU, and in the test suite): checks every step's command against its script's parser,
that the ``cuda`` tests are collected, and runs the speed, MFU and CRF steps at tiny size on the CPU.

    bash benchmarks/gpu_check.sh --fetch-wheels     # here, with the package index: peers into .whl/
    bash benchmarks/gpu_check.sh --out "$OUT"       # on the GPU machine (carry .whl)
    bash benchmarks/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_crf.py")  # every file with a `cuda` mark (a test checks)
BUDGET_S = 8 * 60 - 20  # the steps' budgets together: 8 minutes, less the driver's own start
INSTALL_BUDGET_S = 75  # pip --no-index: smp's wheel, pydensecrf2's sdist compiled (no cp312 wheel on PyPI)
PEERS = {"smp": "segmentation_models_pytorch", "pydensecrf": "pydensecrf"}  # what a step needs: its module
WHEELS = {"segmentation-models-pytorch": "0.6.0", "pydensecrf2": "1.1"}  # --fetch-wheels when not installed here


@dataclass(frozen=True)
class Step:
    """One subprocess: ``python ARGV`` in the repository root, stopped after ``budget_s`` seconds."""

    name: str
    budget_s: int
    argv: tuple[str, ...]
    tiny: tuple[str, ...] | None  # the same script at tiny size on the CPU for --dry-run; None: checked only
    needs: str | None = None  # a key of PEERS: skipped when that peer is missing


def speed_steps(out: Path, have_smp: bool) -> list[Step]:
    """The speed table (--fast), its --compile run on one pair, and MFU: three runs of speed.py."""
    from speed import PAIRS

    pairs = [n for n, p in PAIRS.items() if have_smp or not p.peer_name.startswith("smp")]
    compiled = "deeplabv3plus_resnet50_separable" if have_smp else "deeplabv3_resnet50"
    gpu = ("benchmarks/speed.py", "--device", "cuda")
    tiny = ("benchmarks/speed.py", "--device", "cpu", "--threads", "1", "--warmup", "0", "--reps", "1")
    tiny += ("--reps-large", "1", "--size", "32", "32", "--batch-sizes", "1", "--train-batch", "1")
    speed = ("--fast", "--no-mfu", "--out", str(out / "gpu_speed.json"))
    compile_ = ("--fast", "--compile", "--no-mfu", "--pairs", compiled, "--batch-sizes", "1", "--train-batch", "0")
    mfu = ("--pairs", "--mfu", "--out", str(out / "gpu_mfu.json"))
    return [
        Step("speed", 80, (*gpu, *speed, "--pairs", *pairs), (*tiny, *speed, "--pairs", "fcn_resnet50")),
        # compiling on a CPU takes minutes and a C++ compiler: --dry-run checks this step's arguments only
        Step(
            "speed_compile", 100, (*gpu, *compile_, "--reps", "10", "--out", str(out / "gpu_speed_compile.json")), None
        ),
        Step("mfu", 40, (*gpu, *mfu), (*tiny, *mfu, "--mfu-batch", "1", "--mfu-size", "32")),
    ]


def plan(out: Path, have: dict[str, bool], junit: Path) -> list[Step]:
    """Every step after the install, in order, with the peers found."""
    tests = ("-m", "pytest", "-m", "cuda", *CUDA_TEST_FILES, "-p", "no:cacheprovider")
    crf = ("benchmarks/crf_speed.py", "--out", str(out / "gpu_crf.json"))
    return [
        Step("tests", 90, (*tests, f"--junitxml={junit}"), (*tests, "--collect-only")),
        *speed_steps(out, have["smp"]),
        Step(
            "crf",
            75,
            (*crf, "--device", "cuda", "--batch", "8", "--reps", "5"),
            (*crf, "--device", "cpu", "--threads", "1", "--presets", "pydensecrf", "--iterations", "1")
            + ("--batch", "1", "--reps", "1"),
            needs="pydensecrf",
        ),
    ]


def cuda_test_files() -> list[str]:
    """The test files that mark a test ``cuda``, read as text (importing them costs seconds)."""
    files = sorted((ROOT / "tests").glob("test_*.py"))
    return [f"tests/{f.name}" for f in files if re.search(r"\bpytest\.mark\.cuda\b", f.read_text(encoding="utf-8"))]


def check_arguments(steps: list[Step]) -> list[str]:
    """Each step's commands against its script's own parser, the CUDA test files and the budget: the
    problems, one line each."""
    import crf_speed
    import speed

    parsers = {"benchmarks/speed.py": speed.build_parser, "benchmarks/crf_speed.py": crf_speed.build_parser}
    problems = []
    if cuda_test_files() != sorted(CUDA_TEST_FILES):
        problems.append(f"tests marked cuda are in {cuda_test_files()}, the tests step runs {list(CUDA_TEST_FILES)}")
    total = INSTALL_BUDGET_S + sum(s.budget_s for s in steps)
    if total > BUDGET_S:
        problems.append(f"the steps' budgets add up to {total} s with the install, over {BUDGET_S} s")
    for step in steps:
        for argv in (step.argv, step.tiny):
            if argv is None or argv[0] not in parsers:
                continue
            try:
                parsers[argv[0]]().parse_args(list(argv[1:]))
            except SystemExit:
                problems.append(f"{step.name}: {' '.join(argv)}: rejected by {argv[0]}'s parser")
    return problems


def run_step(step: Step, argv: tuple[str, ...], env: dict[str, str], log: Path) -> dict:
    """Run one step within its budget, its output appended to the log; its record for gpu_summary.json."""
    cmd = [sys.executable, *argv]
    with log.open("a") as f:
        f.write(f"\n===== {step.name}: {' '.join(cmd)} (budget {step.budget_s} s)\n")
        f.flush()
        start = time.perf_counter()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=step.budget_s)
            status = "ok" if code.returncode == 0 else f"failed (exit {code.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.budget_s} s"
    wall = time.perf_counter() - start
    print(f"gpu_check: {step.name}: {status} in {wall:.0f} s", file=sys.stderr, flush=True)
    return {**asdict(step), "ran": list(argv), "wall_s": round(wall, 1), "status": status}


def tests_report(junit: Path) -> dict:
    """gpu_tests.json from pytest's JUnit XML: every test with its outcome, seconds and message."""
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = {"skipped": "skipped"}.get(kind, "failed"), node.get("message", "")
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tests.append({"id": test_id, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def collected_report(log: Path) -> dict:
    """gpu_tests.json of a dry run: the ids pytest collected (from the log's last step)."""
    last = log.read_text().rsplit("===== ", 1)[-1]
    return {"dry_run": True, "collected": re.findall(r"^(tests/\S+::\S+)$", last, flags=re.M)}


def install_peers(wheels: Path, site: Path, log: Path, env: dict[str, str]) -> dict:
    """pip install --no-index the files in `wheels` into `site` (sdists build without isolation)."""
    files = sorted(str(p) for p in wheels.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    argv = ("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--target", str(site))
    step = Step("install", INSTALL_BUDGET_S, (*argv, *files), None)
    return run_step(step, step.argv, env, log)


def peers_found(env: dict[str, str]) -> dict[str, bool]:
    """Which peers import with this environment's PYTHONPATH (the install's target included)."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    importlib.invalidate_caches()
    return {key: importlib.util.find_spec(module) is not None for key, module in PEERS.items()}


def fetch_wheels(wheels: Path) -> int:
    """Download the peers (the versions installed here, else WHEELS') into `wheels`, to carry to the GPU."""
    specs = []
    for name, fallback in WHEELS.items():
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(f"{name}=={fallback}")
    # pydensecrf2 as its sdist: PyPI has no wheel for the GPU machine's Python, it compiles there (install)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pydensecrf2", "--dest", str(wheels)]
    cmd += specs
    code = subprocess.run(cmd).returncode
    if code == 0:
        print(f"gpu_check: {', '.join(specs)} in {wheels}; carry that folder to the GPU machine")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--out", type=Path, default=None, help="folder of the gpu_*.json files (default benchmarks/results)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="peers' wheels/sdists to install (.whl/)")
    p.add_argument("--dry-run", action="store_true", help="on a CPU: check every step's arguments, print the plan")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="with --dry-run: also run the steps at tiny size on the CPU (about a minute)",
    )
    p.add_argument("--fetch-wheels", action="store_true", help="download the peers into --wheels, then stop")
    return p


def prepare(args: argparse.Namespace, env: dict[str, str], log: Path) -> list[dict]:
    """The install step, when peers are missing and --wheels has files for them (never on a dry run)."""
    if args.dry_run or all(peers_found(env).values()):
        return []
    if not args.wheels.is_dir() or not any(args.wheels.iterdir()):
        return []
    site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return [install_peers(args.wheels, site, log, env)]


def skip_reason(step: Step, argv: tuple[str, ...] | None, problems: list[str], have: dict[str, bool]) -> str:
    """Why `step` does not run ('' when it does)."""
    if problems:
        return "the check found problems"
    if argv is None:
        return "not run on a CPU"
    if step.needs and not have[step.needs]:
        return f"{PEERS[step.needs]} is not installed (carry it: --fetch-wheels, then .whl)"
    return ""


def run_all(args: argparse.Namespace, out: Path) -> int:
    """Every step in order (the dry run's tiny ones), then gpu_tests.json and gpu_summary.json."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    log = out / "gpu_check.log"
    log.write_text("")
    records = prepare(args, env, log)
    have = peers_found(env)
    junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    steps = plan(out, have, junit)
    problems = check_arguments(steps)
    for step in steps:
        argv = step.tiny if args.tiny else step.argv
        why = skip_reason(step, argv, problems, have)
        if why or (args.dry_run and not args.tiny):
            records.append({**asdict(step), "status": f"skipped: {why}" if why else "checked"})
            print(f"gpu_check: {step.name} ({step.budget_s} s): {' '.join(step.argv)}", file=sys.stderr)
            continue
        records.append(run_step(step, argv, env, log))
        if step.name == "tests":
            report = collected_report(log) if args.dry_run else tests_report(junit) if junit.is_file() else {}
            (out / "gpu_tests.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = {"dry_run": args.dry_run, "peers": have, "budget_s": BUDGET_S, "problems": problems, "steps": records}
    (out / "gpu_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    bad = [r["name"] for r in records if not r["status"].startswith(("ok", "checked", "skipped"))]
    print(f"gpu_check: {'problems: ' + '; '.join(problems + bad) if problems or bad else 'all steps ok'}; see {out}")
    return 1 if problems or bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny and not args.dry_run:
        parser.error("--tiny goes with --dry-run")
    if args.fetch_wheels:
        return fetch_wheels(args.wheels)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        message = "no CUDA device here; use the GPU machine, or --dry-run on a CPU"
        print(f"gpu_check: error: {message}", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else RESULTS)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu_check: error: --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    return run_all(args, out)


if __name__ == "__main__":
    raise SystemExit(main())
