"""Training under faults: SIGKILL at random moments and inside checkpoint writes, SIGINT/SIGTERM, a NaN
loss, an unwritable output folder, a torn log line. Each interrupted run is resumed with
`pixelwise train CONFIG --resume` and must end bit-identical (CPU, deterministic) to an uninterrupted run;
no kill may leave a checkpoint or weights file that fails to load.

Runs are real `pixelwise train` command lines (`pixelwise.cli.main`) in child processes forked from one
"zygote" process that has imported torch and pixelwise and trained once, so a run costs its training
time, not an interpreter start. Hooks that pause a checkpoint write half-way or just before its rename
are patched into the child only; pixelwise itself has no test hooks. Every child uses one thread.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixelwise.engine.state import digest
from pixelwise.errors import UserError
from pixelwise.weights import load_checkpoint, load_weights

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the zygote forks (POSIX only)"),
]

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, EPOCHS = 8, 2, 3  # 4 steps per epoch, 12 steps; checkpoints after every step and epoch
STEPS = N_TRAIN // BATCH * EPOCHS
CONFIG = f"""\
model:
  name: unet
  kwargs: {{base_channels: 4, depth: 2, padding: same}}
data:
  dataset: synthetic
  kwargs: {{num_images: {N_TRAIN}, size: [16, 16], num_classes: 3}}
  crop_size: [16, 16]
  scale_range: [0.5, 2.0]   # random scale, crop and flip: the augmentation RNG must resume exactly too
  flip: true
  batch_size: {BATCH}
  workers: 0
  max_val_images: 2
train:
  epochs: {EPOCHS}
  optimizer: adamw          # moment buffers: the optimiser state must resume exactly too
  lr: 0.003
  schedule: poly
  device: cpu
  deterministic: true
  seed: 3
eval:
  every_epochs: 1
output:
  dir: runs/unused
  checkpoint_every_steps: 1
  log_every_steps: 1
  report: false
  progress: false
"""

# The zygote: imports and warms up once, then forks one child per job. It reaps a child only when told
# ("wait"), so the pid the test signals can never have been reused by another process.
ZYGOTE = r"""
import contextlib, io, json, os, sys, threading, time, traceback
import torch
torch.set_num_threads(1)
import tqdm
import pixelwise.cli, pixelwise.train, pixelwise.fileio, pixelwise.data.synthetic
tqdm.tqdm.monitor_interval = 0  # no monitor thread: fork only from a single-threaded process

def hooks(h):
    real_save, real_replace = torch.save, os.replace
    saves = {"last.pt": 0, "best.safetensors": 0}
    def pause(marker):
        open(marker, "w").close()
        time.sleep(60)  # the test kills us here
    def save(obj, f, *a, **k):  # the checkpoint write, optionally paused with half of the bytes on disk
        if not str(f).endswith(".tmp") or ".last.pt." not in str(f):
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            if h.get("phase") == "half" and h.get("target") == "last.pt" and saves["last.pt"] + 1 == h["n"]:
                pause(h["marker"])
            fh.write(data[len(data) // 2:])
    def replace(src, dst, *a, **k):
        name = os.path.basename(str(dst))
        if name in saves:
            if h.get("phase") == "replace" and h.get("target") == name and saves[name] + 1 == h["n"]:
                pause(h["marker"])
            real_replace(src, dst, *a, **k)
            saves[name] += 1
            if h.get("notify") and name == "last.pt":
                open(os.path.join(h["notify"], f"save{saves[name]}"), "w").close()
            return None
        return real_replace(src, dst, *a, **k)
    torch.save, os.replace = save, replace
    if "nan_index" in h:
        cls = pixelwise.data.synthetic.SyntheticShapes
        orig = cls.__getitem__
        def getitem(self, i):
            image, mask = orig(self, i)
            if i == h["nan_index"] and self.seed == h["train_seed"]:
                image = torch.full_like(image, float("nan"))
            return image, mask
        cls.__getitem__ = getitem

def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    rc = 99
    # tqdm's lock is a multiprocessing semaphore created in the zygote and so shared by every child: a
    # child SIGKILLed while holding it (every bar takes it) would block the next child forever
    tqdm.tqdm.set_lock(threading.RLock())
    try:
        os.chdir(job["cwd"])
        hooks(job.get("hooks", {}))
        rc = pixelwise.cli.main(job["argv"])
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

warm = json.loads(sys.stdin.readline())  # one run here loads every lazy import and kernel before forking
os.chdir(warm["cwd"])
with open(warm["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    assert pixelwise.cli.main(warm["argv"]) == 0
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    assert threading.active_count() == 1, threading.enumerate()
    pid = os.fork()
    if pid == 0:
        child(job)
    print(json.dumps({"pid": pid}), flush=True)
    assert sys.stdin.readline().strip() == "wait"
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """A warmed-up Python process that forks `pixelwise` command lines on request."""

    def __init__(self, workdir: Path, config: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._buf = b""
        warm = {
            "argv": ["train", str(config), "--set", f"output.dir={workdir / 'warm'}"],
            "cwd": str(workdir),
            "log": str(workdir / "warm.log"),
        }
        self._send(json.dumps(warm))
        assert self._read(120).get("ready"), "the zygote did not start"

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"no answer from the zygote in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote died (exit {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], log: Path, hooks: dict | None = None) -> int:
        self._send(json.dumps({"argv": argv, "cwd": str(self.workdir), "log": str(log), "hooks": hooks or {}}))
        return self._read(30)["pid"]

    def wait(self, timeout: float = 60) -> int:
        """Reap the running child: its exit code, or -signal."""
        self._send("wait")
        return self._read(timeout)["rc"]

    def run(self, argv: list[str], log: Path, hooks: dict | None = None, timeout: float = 60) -> int:
        self.start(argv, log, hooks)
        return self.wait(timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(zygote, config path, work dir, reference run folder, reference wall time)."""
    work = tmp_path_factory.mktemp("faults")
    config = work / "tiny.yaml"
    config.write_text(CONFIG)
    zygote = Zygote(work, config)
    try:
        ref = work / "reference"
        t0 = time.perf_counter()
        rc = zygote.run(train_argv(config, ref), work / "reference.log")
        seconds = time.perf_counter() - t0
        assert rc == 0, (work / "reference.log").read_text()
        yield zygote, config, work, ref, seconds
    finally:
        zygote.close()


def train_argv(config: Path, out: Path, resume: bool = False) -> list[str]:
    return ["train", str(config), "--set", f"output.dir={out}"] + (["--resume"] if resume else [])


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


def check_loadable(out: Path) -> int | None:
    """Whatever a kill left must load: last.pt as a checkpoint, best.safetensors as weights. Returns the step."""
    step = None
    if (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt")
        step = ckpt["step"]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if (out / "best.safetensors").exists():
        load_weights(out / "best.safetensors")
    return step


def history(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")} for r in rows]


def assert_same_run(out: Path, ref: Path) -> None:
    """Bit-identical weights (best and last), identical final metrics and identical per-step log."""
    a, b = load_file(str(out / "best.safetensors")), load_file(str(ref / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = load_checkpoint(out / "last.pt"), load_checkpoint(ref / "last.pt")
    assert la["step"] == lb["step"] == STEPS and la["epoch"] == lb["epoch"] == EPOCHS
    assert all(torch.equal(la["model"][k], lb["model"][k]) for k in lb["model"])
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    assert history(out) == history(ref)


def finish(zygote: Zygote, config: Path, out: Path, log: Path) -> None:
    """Continue an interrupted run to the end, as a user would: --resume if a checkpoint exists, else anew."""
    resume = (out / "last.pt").exists()
    rc = zygote.run(train_argv(config, out, resume=resume), log)
    assert rc == 0, log.read_text()


# (name, hooks) of the trials; "random" ones are killed after a random delay, the others inside a write
KILL_TRIALS = [
    ("random-1", {"kills": 1}),
    ("random-2", {"kills": 1}),
    ("random-3", {"kills": 1}),
    ("random-4", {"kills": 1}),
    ("random-x3-a", {"kills": 3}),
    ("random-x3-b", {"kills": 3}),
    ("half-written-last.pt#1", {"phase": "half", "target": "last.pt", "n": 1}),  # the very first checkpoint
    ("half-written-last.pt#6", {"phase": "half", "target": "last.pt", "n": 6}),
    ("half-written-last.pt#11", {"phase": "half", "target": "last.pt", "n": 11}),
    ("before-rename-last.pt#5", {"phase": "replace", "target": "last.pt", "n": 5}),  # after epoch 1's validation
    ("before-rename-last.pt#15", {"phase": "replace", "target": "last.pt", "n": 15}),  # the final checkpoint
    ("before-rename-best#2", {"phase": "replace", "target": "best.safetensors", "n": 2}),
]


def test_sigkill_anywhere_then_resume_is_bit_identical(lab):
    zygote, config, work, ref, ref_seconds = lab
    rng = random.Random(20240601)
    landed = 0
    for name, spec in KILL_TRIALS:
        out = work / f"kill-{name}"
        kills = spec.get("kills", 1)
        for k in range(kills):
            log = work / f"kill-{name}-{k}.log"
            argv = train_argv(config, out, resume=(out / "last.pt").exists())
            if "phase" in spec:
                marker = work / f"kill-{name}.marker"
                pid = zygote.start(argv, log, {**spec, "marker": str(marker)})
                wait_for(marker)
            else:
                pid = zygote.start(argv, log)
                time.sleep(rng.uniform(0.0, 0.8 * ref_seconds))
            os.kill(pid, signal.SIGKILL)
            rc = zygote.wait()
            assert rc in (-signal.SIGKILL, 0), log.read_text()
            landed += rc == -signal.SIGKILL
            check_loadable(out)
            if (out / "metrics.json").exists() and rc == 0:
                break  # the run had finished before the kill
        if name == "before-rename-last.pt#5":  # a power cut can also tear the last log line
            with open(out / "metrics.jsonl", "a") as f:
                f.write('{"kind": "train", "epoch": 2, "st')
        finish(zygote, config, out, work / f"kill-{name}-finish.log")
        assert_same_run(out, ref)
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, leftovers  # a resume removes what a killed write left behind
    print(f"{len(KILL_TRIALS)} trials, {landed} SIGKILLs landed in a running training")
    assert landed >= 10, f"only {landed} kills hit a running training"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_finish_the_step_checkpoint_and_resume(lab, sig):
    zygote, config, work, ref, _ = lab
    out, notify = work / f"signal-{sig.name}", work / f"signal-{sig.name}-saves"
    notify.mkdir()
    log = work / f"signal-{sig.name}.log"
    pid = zygote.start(train_argv(config, out), log, {"notify": str(notify)})
    wait_for(notify / "save3")  # three checkpoints written: the run is mid-epoch
    os.kill(pid, sig)
    assert zygote.wait() == 130, log.read_text()
    text = log.read_text()
    step = load_checkpoint(out / "last.pt")["step"]
    assert 3 < step < STEPS
    assert f"{sig.name}: finishing the current step, then writing a checkpoint" in text
    assert f"{sig.name} received: wrote {out / 'last.pt'} at epoch " in text and f"step {step};" in text
    assert f"stopped at step {step}; continue with: pixelwise train {config} --set output.dir={out} --resume" in text
    assert "Traceback" not in text
    finish(zygote, config, out, work / f"signal-{sig.name}-resume.log")
    assert_same_run(out, ref)


def test_nan_loss_names_step_and_batch_and_keeps_the_last_good_checkpoint(lab):
    zygote, config, work, _, _ = lab
    out, log, bad = work / "nan", work / "nan.log", 5
    rc = zygote.run(train_argv(config, out), log, {"nan_index": bad, "train_seed": 0})
    assert rc == 2
    lines = log.read_text().strip().splitlines()
    errors = [line for line in lines if line.startswith("pixelwise train: error:")]
    assert len(errors) == 1 and "Traceback" not in log.read_text()
    # where sample 5 falls: epoch 0's order is randperm(seed * 100003) (train.py), 2 samples per step
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
    step = perm.index(bad) // BATCH + 1
    batch = perm[(step - 1) * BATCH : step * BATCH]
    assert f"loss is nan at step {step} (epoch 1, batch of data set indices {batch})" in errors[0]
    assert str(out / "last.pt") in errors[0]
    if step == 1:
        assert not (out / "last.pt").exists()
    else:
        assert check_loadable(out) == step - 1


def test_unwritable_output_folder_fails_before_training(lab, tmp_path):
    zygote, config, work, _, _ = lab
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    targets = [blocker / "run"]
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        targets.append(locked / "run")
    for i, out in enumerate(targets):
        log = work / f"unwritable-{i}.log"
        t0 = time.perf_counter()
        assert zygote.run(train_argv(config, out), log) == 2
        text = log.read_text()
        assert text.count("\n") == 1 and text.startswith(f"pixelwise train: error: output.dir={out}: cannot write")
        assert time.perf_counter() - t0 < 10
        assert "epoch" not in text


def test_resume_refuses_a_checkpoint_of_another_model_by_name(lab):
    zygote, config, work, ref, _ = lab
    out = work / "other-model"
    out.mkdir()
    ckpt = load_checkpoint(ref / "last.pt")
    ckpt["model_name"] = "segnet_basic"
    ckpt["digest"] = digest(ckpt)  # a whole checkpoint of another model, not a damaged one
    torch.save(ckpt, out / "last.pt")
    log = work / "other-model.log"
    assert zygote.run(train_argv(config, out, resume=True), log) == 2
    text = log.read_text()
    assert text.count("\n") == 1 and "segnet_basic" in text and str(out / "last.pt") in text


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=.inf", "train.lr"),
        ("train.grad_clip=.nan", "train.grad_clip"),
        ("data.std=[.inf, 1, 1]", "data.std"),
        ("loss.class_weights=[1, .nan, 1]", "loss.class_weights"),
        ("loss.aux_weight=-.inf", "loss.aux_weight"),
    ],
)
def test_non_finite_numbers_in_a_config_are_refused_before_training(override, key):
    """A NaN or inf knob would only surface as a NaN loss many steps later: the config loader refuses it."""
    from pixelwise.config import load_config

    with pytest.raises(UserError, match=key) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value) and ("finite" in str(e.value) or "nan" in str(e.value))
