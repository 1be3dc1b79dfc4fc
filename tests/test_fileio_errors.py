"""File-system errors are one line naming the path (exit 2), and an atomic write leaves the old file or
nothing: a full disk, a read-only remount mid-run, a file where a folder should be. The disk faults use
a real tmpfs (skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.fileio import atomic_path, describe_os_error

pytestmark = pytest.mark.timeout(120)
KW = {"base_channels": 2, "depth": 1, "padding": "same"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(
        path, get_model("unet", num_classes=3, **KW), model_name="unet", model_kwargs=KW, classes=["a", "b", "c"]
    )
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real ENOSPC, and a real read-only remount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def noise_png(path: Path, side: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, *words: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_disk_full_during_predict_is_one_line_and_keeps_the_old_outputs(tmp_path, small_disk, weights, capsys):
    """A full disk was a traceback chain saying 'iostream error' or 'No space left', never which file."""
    out = small_disk / "out"
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    noise_png(small / "a.png", 16)
    noise_png(large / "a.png", 400)  # its overlay alone (~480 kB of noise) cannot fit on the disk
    assert cli(capsys, "predict", "--weights", weights, small / "a.png", "--out", out)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    rc, err = cli(capsys, "predict", "--weights", weights, large / "a.png", "--out", out)
    one_line(rc, err, "the disk is full [ENOSPC]", str(out))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written temporary stays
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}
    for name, data in after.items():  # each output is the old file or the new one, whole
        assert data == before[name] or Image.open(out / name).size == (400, 400)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_library_that_hides_enospc_is_reported_as_a_full_disk(small_disk, writer):
    """torch.save says 'iostream error' / 'file write failed' and safetensors wraps the cause: the file system
    is asked, and the error names the output, not its temporary."""
    from safetensors.torch import save_file

    target = small_disk / "last.pt"
    target.write_bytes(b"old")
    big = {"w": torch.zeros(200_000)}  # 800 kB
    with pytest.raises(OSError) as e, atomic_path(target) as tmp:
        torch.save(big, tmp) if writer == "torch.save" else save_file(big, str(tmp))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert describe_os_error(e.value) == (
        f"{target}: the disk is full [ENOSPC]; free some space or write to another disk"
    )
    assert target.read_bytes() == b"old" and sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]


def test_read_only_remount_mid_run_is_one_line(tmp_path, small_disk, weights, capsys):
    image = noise_png(tmp_path / "b.png", 16)
    out = small_disk / "out"
    assert cli(capsys, "predict", "--weights", weights, image, "--out", out)[0] == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    rc, err = cli(capsys, "predict", "--weights", weights, image, "--out", out)
    one_line(rc, err, "read-only", "[EROFS]", str(out / "masks" / "b.png"))


def test_a_file_where_a_folder_should_be_is_one_line(tmp_path, weights, capsys):
    image = noise_png(tmp_path / "c.png", 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").write_text("I am a file")
    rc, err = cli(capsys, "predict", "--weights", weights, image, "--out", out)
    one_line(rc, err, f"{out / 'masks'}: exists and is not a folder [EEXIST]")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    rc, err = cli(capsys, "predict", "--weights", weights, image, "--out", blocker / "sub")
    one_line(rc, err, "a part of this path is a file, not a folder [ENOTDIR]", str(blocker))


def test_other_os_errors_keep_their_traceback():
    assert describe_os_error(OSError(errno.ECONNRESET, "Connection reset by peer")) is None


def test_disk_full_during_training_is_one_line(tmp_path, small_disk, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {name: unet, kwargs: {base_channels: 32, depth: 2, padding: same}}\n"
        "data: {kwargs: {num_images: 4, size: [32, 32]}, crop_size: [32, 32], batch_size: 2, "
        "workers: 0}\ntrain: {epochs: 1, device: cpu}\noutput: {report: false, progress: false}\n"
    )
    rc, err = cli(capsys, "train", config, "--set", f"output.dir={small_disk / 'run'}")  # 1.9 MB of weights
    one_line(rc, err, "the disk is full [ENOSPC]", str(small_disk / "run"))
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
