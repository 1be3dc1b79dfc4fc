"""The engine the commands share: one metrics.json layout and the same numbers from training and
`pixelwise evaluate`, old files migrated, registries that the CLI and configs cannot drift from, and
library errors that the front ends translate into their own flag and key names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_camvid

from pixelwise.cli import INFERENCE_FLAGS, build_parser, main
from pixelwise.config import choices, load_config
from pixelwise.crf import CRF_PRESETS, CRFParams
from pixelwise.engine import InferenceSpec, read_metrics
from pixelwise.engine.state import CHECKPOINT_VERSION, read_checkpoint
from pixelwise.errors import ArgumentError, UserError, translated
from pixelwise.inference import DEEPLAB_SCALES, MODES
from pixelwise.losses import LOSSES
from pixelwise.segment import LARGE_KINDS
from pixelwise.train import train

TINY_CAMVID = [
    "data.dataset=camvid",
    "data.crop_size=[20, 28]",
    "data.batch_size=2",
    "data.workers=0",
    "model.name=unet",
    "model.kwargs={padding: same, base_channels: 4, depth: 2}",
    "train.optimizer=adamw",
    "train.lr=0.01",
    "train.epochs=1",
    "train.amp=none",
    "train.channels_last=false",
    "output.progress=false",
    "output.report=false",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _camvid(root, n=4):
    return write_camvid(root, splits={"train": n, "val": n})


def test_train_and_evaluate_write_one_layout_with_the_same_numbers(tmp_path, capsys):
    data = _camvid(tmp_path / "camvid")
    run = tmp_path / "run"
    train(load_config(None, [*TINY_CAMVID, f"data.root={data}", f"output.dir={run}"]))
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(run / "best.safetensors"),
                "--data",
                str(data),
                "--dataset",
                "camvid",
                "--split",
                "val",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((run / "eval_camvid_val" / "metrics.json").read_text())  # not over the run's own
    assert set(trained) == set(evaluated) and set(trained["scores"]) == set(evaluated["scores"])
    assert trained["scores"] == evaluated["scores"]
    for key in ("model", "classes", "num_images", "dataset", "split", "inference", "trained"):
        assert trained[key] == evaluated[key], key
    assert "boundary_f1" in trained["scores"] and list(trained["scores"]["per_class_iou"]) == trained["classes"]
    capsys.readouterr()


def test_version_1_metrics_files_are_read_in_the_current_layout(tmp_path):
    classes = ["a", "b"]
    old_train = {"model": "unet", "val": {"miou": 0.5, "per_class_iou": {"a": 0.4, "b": 0.6}}}
    old_eval = {"miou": 0.5, "per_class_iou": [0.4, 0.6], "dice": [0.5, None], "classes": classes, "split": "val"}
    for name, record in (("train.json", old_train), ("eval.json", old_eval)):
        (tmp_path / name).write_text(json.dumps(record))
        m = read_metrics(tmp_path / name)
        assert m["scores"]["miou"] == 0.5 and m["scores"]["per_class_iou"] == {"a": 0.4, "b": 0.6}
        assert m["classes"] == classes
    assert read_metrics(tmp_path / "eval.json")["scores"]["per_class_dice"] == {"a": 0.5, "b": None}


def test_a_version_1_checkpoint_resumes(tmp_path):
    cfg = [
        *TINY_CAMVID,
        f"data.root={_camvid(tmp_path / 'camvid')}",
        f"output.dir={tmp_path / 'run'}",
        "train.epochs=2",
    ]
    train(load_config(None, cfg), stop_at_step=2)
    path = tmp_path / "run" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(version=1, scheduler={"schedule": "poly", "step": ckpt["step"]})  # the layout before the engine
    del ckpt["elapsed_s"], ckpt["digest"]  # neither existed in version 1
    torch.save(ckpt, path)
    assert read_checkpoint(path)["version"] == CHECKPOINT_VERSION
    result = train(load_config(None, cfg), resume=True)
    assert not result["interrupted"] and result["epoch"] == 2


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"version": 2, "step": "7"}, path)
    with pytest.raises(UserError, match="missing model_name") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    torch.save([1, 2], path)
    with pytest.raises(UserError, match="not a pixelwise checkpoint"):
        read_checkpoint(path)


def _choices(parser, command: str, flag: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


def test_cli_and_config_choices_come_from_the_registries():
    parser = build_parser()
    for command in ("evaluate", "predict"):
        assert tuple(_choices(parser, command, "--mode").choices) == MODES
        assert list(_choices(parser, command, "--crf-preset").choices) == list(CRF_PRESETS)
        assert tuple(_choices(parser, command, "--scales").default) == DEEPLAB_SCALES
    allowed = choices()
    assert allowed["loss.name"] == tuple(LOSSES) and allowed["eval.mode"] == MODES
    assert allowed["crf.preset"] == tuple(CRF_PRESETS)
    assert set(INFERENCE_FLAGS) >= {"mode", "window", "stride", "scales"}
    for command in ("predict", "serve"):
        large = _choices(parser, command, "--large")
        assert tuple(large.choices) == LARGE_KINDS and large.default == LARGE_KINDS[0] == "slide"


def test_library_errors_name_arguments_and_front_ends_name_flags_and_keys():
    with pytest.raises(ArgumentError) as info:
        InferenceSpec(mode="slide", window=(0, 8))
    assert info.value.argument == "window" and "--" not in str(info.value)
    with pytest.raises(UserError, match=r"^--window 0 8: give two positive sizes"):
        with translated(INFERENCE_FLAGS, flags=True):
            InferenceSpec(mode="slide", window=(0, 8))
    with pytest.raises(UserError, match=r"^eval\.window=\[0, 8\]: give two positive sizes"):
        with translated({"window": "eval.window"}):
            InferenceSpec(mode="slide", window=(0, 8))


def test_a_bad_eval_key_is_named_before_training(tmp_path):
    cfg = load_config(
        None,
        [
            *TINY_CAMVID,
            f"data.root={_camvid(tmp_path / 'camvid')}",
            f"output.dir={tmp_path / 'run'}",
            "eval.mode=slide",
            "eval.window=[8, 8]",
            "eval.stride=[9, 9]",
        ],
    )
    with pytest.raises(UserError, match=r"^eval\.stride=\[9, 9\]: must be positive and at most the window"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_crf_params_round_trip_and_validate():
    vgg = CRFParams.preset("deeplab_vgg", iterations=3)
    assert CRFParams.from_dict(vgg.to_dict()) == vgg and vgg.iterations == 3
    assert CRF_PRESETS["deeplab_resnet"].name() == "deeplab_resnet" and vgg.name() == "custom"
    with pytest.raises(ArgumentError, match="bilateral_sxy=-1"):
        vgg.replace(bilateral_sxy=-1)
    with pytest.raises(ArgumentError, match="preset='deeplab'"):
        CRFParams.preset("deeplab")


def test_builtin_weights_carry_their_chosen_crf():
    from pixelwise.weights import read_weights_meta

    crf = CRFParams.from_dict(read_weights_meta("segnet_basic_camvid").extra["crf"])
    assert (crf.bilateral_weight, crf.bilateral_sxy, crf.bilateral_srgb) == (3.0, 100.0, 3.0)


def test_isbi_challenge_metric_streams_through_the_engine():
    from pixelwise.metrics import ISBIChallenge

    labels = torch.ones(2, 12, 12, dtype=torch.long)
    labels[:, :, 5] = 0  # a membrane line between two cells in each slice
    perfect = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()  # (B, 2, H, W)
    metric = ISBIChallenge(cell_class=1)
    metric.update(perfect[:1], labels[:1])
    metric.update(perfect[1:], labels[1:])
    scores = metric.compute()["isbi_challenge"]
    assert scores["v_rand"] == pytest.approx(1.0) and scores["v_info"] == pytest.approx(1.0)
    assert scores["pixel_error"] == pytest.approx(0.0)


ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


@pytest.mark.skipif(not ISBI.is_dir(), reason="needs ../shared/data/isbi2012")
def test_evaluate_isbi2012_prints_the_challenge_scores(tmp_path, capsys):
    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    kwargs = {"padding": "same", "base_channels": 4, "depth": 2}
    torch.manual_seed(0)
    save_weights(
        tmp_path / "w.safetensors",
        get_model("unet", num_classes=2, **kwargs),
        model_name="unet",
        model_kwargs=kwargs,
        classes=["membrane", "cell"],
    )
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(tmp_path / "w.safetensors"),
                "--data",
                str(ISBI),
                "--dataset",
                "isbi2012",
                "--split",
                "val",
                "--precision",
                "fp32",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert "ISBI 2012 challenge: V_Rand" in capsys.readouterr().out
    c = json.loads((tmp_path / "ev" / "metrics.json").read_text())["scores"]["isbi_challenge"]
    assert all(0 <= c[k] <= 1 for k in ("v_rand", "v_info", "pixel_error"))


def test_multiscale_runs_each_scale_whole_unless_a_window_is_asked_for():
    from pixelwise.cli import inference_spec

    parser = build_parser()
    base = ["evaluate", "--weights", "w", "--data", "d", "--dataset", "camvid"]
    crop = {"crop_size": [240, 320]}
    assert inference_spec(parser.parse_args([*base, "--mode", "multiscale"]), crop, None).window is None
    asked = parser.parse_args([*base, "--mode", "multiscale", "--window", "64", "64"])
    assert inference_spec(asked, crop, None).window == (64, 64)
    assert inference_spec(parser.parse_args([*base, "--mode", "slide"]), crop, None).window == (240, 320)


def test_crf_flag_takes_the_recorded_crf_else_the_helps_default_preset():
    # `--crf` alone on weights that record no CRF used to die with "--crf-preset None: unknown CRF preset"
    from pixelwise.cli import inference_spec
    from pixelwise.crf import CRFParams

    parser = build_parser()
    base = ["predict", "--weights", "w", "x.png", "--out", "o", "--crf"]
    assert inference_spec(parser.parse_args(base), {}, None).crf == CRFParams.preset("deeplab_vgg")
    recorded = CRFParams.preset("deeplab_resnet").replace(iterations=3)
    assert inference_spec(parser.parse_args(base), {"crf": recorded.to_dict()}, None).crf == recorded
    named = parser.parse_args([*base, "--crf-preset", "pydensecrf", "--crf-iterations", "2"])
    assert inference_spec(named, {"crf": recorded.to_dict()}, None).crf == CRFParams.preset("pydensecrf", iterations=2)


def test_bad_file_reports_escape_names_and_a_run_of_only_bad_files_lists_them(tmp_path, capsys):
    from pixelwise.evaluate import write_bad_files

    write_bad_files(tmp_path, [("a\nb.png", "bad\tbytes"), ("c.png", "truncated")])
    lines = (tmp_path / "bad_files.txt").read_text().splitlines()
    assert lines == ["a\\nb.png\tbad\\tbytes", "c.png\ttruncated"]  # one record per line, whatever the name
    data = _camvid(tmp_path / "camvid", n=2)
    for f in (data / "val").iterdir():
        f.write_bytes(b"not an image")
    weights = tmp_path / "w.safetensors"
    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    kwargs = {"padding": "same", "base_channels": 4, "depth": 2}
    save_weights(
        weights,
        get_model("unet", num_classes=11, **kwargs),
        model_name="unet",
        model_kwargs=kwargs,
        classes=[f"c{i}" for i in range(11)],
    )
    out = tmp_path / "ev"
    args = ["evaluate", "--weights", str(weights), "--data", str(data), "--dataset", "camvid", "--skip-bad"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "f0.png" in err and str(out / "bad_files.txt") in err
    assert len((out / "bad_files.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("override", "words"),
    [("output.dir=''", "output.dir is empty"), ("data.crop_size=[100000, 100000]", "larger than 16384")],
)
def test_config_refuses_an_empty_output_dir_and_an_absurd_crop(override, words):
    with pytest.raises(UserError, match=words):
        load_config(None, [override])
