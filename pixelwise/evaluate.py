"""`pixelwise evaluate`: the front end of `pixelwise.engine.evaluate` for a weights file.

Scores the weights on a data set split and writes metrics.json in the layout training writes (see
`pixelwise.engine.metrics_record`). A bad sample (unreadable image, size mismatch, bad label value)
stops the run with one line naming the file; with `--skip-bad` it is listed in `bad_files.txt` /
`bad_files.json` and skipped. The output goes where `--out` says; by default into a folder of its
own, never over a training run's files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pixelwise.errors import UserError, translated
from pixelwise.fileio import atomic_write_text


def write_bad_files(out: Path, bad: list[tuple[str, str]]) -> None:
    """`bad_files.txt` (file<TAB>reason per line; a tab, newline or backslash inside a name or reason is
    written as \\t, \\n, \\\\) and `bad_files.json` in `out`, atomically."""

    def escaped(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    atomic_write_text(out / "bad_files.txt", "".join(f"{escaped(f)}\t{escaped(msg)}\n" for f, msg in bad))
    atomic_write_text(out / "bad_files.json", json.dumps([{"file": f, "error": m} for f, m in bad], indent=2))


def default_out(weights: str, dataset: str, split: str) -> Path:
    """`eval_<dataset>_<split>` beside a weights file (a training run's own files stay untouched);
    `eval_<folder>_<dataset>_<split>` beside a save_pretrained folder (which stays as saved, ready to push);
    for built-in weights (inside the installed package) `./eval_<name>_<dataset>_<split>`."""
    path = Path(weights)
    if path.is_file():
        return path.resolve().parent / f"eval_{dataset}_{split}"
    if path.is_dir():
        return path.resolve().parent / f"eval_{path.resolve().name}_{dataset}_{split}"
    return Path(f"eval_{weights}_{dataset}_{split}")


def evaluate_command(args: argparse.Namespace) -> int:
    """`pixelwise evaluate --weights W --data ROOT --dataset NAME --split SPLIT`."""
    from pixelwise.cli import inference_spec
    from pixelwise.engine import dataset_metrics, evaluate, format_table, metrics_record, weights_source
    from pixelwise.inference import resolve_device, resolve_dtype
    from pixelwise.weights import load_weights

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    model, meta = load_weights(args.weights, device)
    spec = inference_spec(args, meta.extra, dtype)  # bad flags fail before any data is read
    dataset = _dataset(args, meta)
    out = Path(args.out) if args.out else default_out(args.weights, args.dataset, args.split)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for metrics.json")
    extra = dataset_metrics(args.dataset, meta.classes)  # e.g. ISBI 2012's challenge scores
    with translated({"batch_size": "--batch-size", "workers": "--workers"}, flags=True):
        result = evaluate(
            model,
            dataset,
            spec,
            mean=meta.mean,
            std=meta.std,
            num_classes=meta.num_classes,
            ignore_index=dataset.ignore_index,
            batch_size=args.batch_size,
            workers=args.workers,
            skip_bad=args.skip_bad,
            progress=True,
            extra_metrics=extra,
        )
    if result.num_images == 0:
        write_bad_files(out, result.bad)  # the message points at it
        first = f", first {result.bad[0][0]}" if result.bad else ""
        raise UserError(
            f"no sample of {args.dataset}/{args.split} could be read ({len(result.bad)} bad{first}; all listed "
            f"in {out / 'bad_files.txt'}); fix or replace those files"
        )
    record = metrics_record(
        result, meta.classes, spec, **weights_source(Path(args.weights), meta), dataset=args.dataset, split=args.split
    )
    atomic_write_text(out / "metrics.json", json.dumps(record, indent=2) + "\n")
    if result.bad:
        write_bad_files(out, result.bad)
    print(format_table(record["scores"]))
    if "isbi_challenge" in record["scores"]:
        c = record["scores"]["isbi_challenge"]
        print(
            f"ISBI 2012 challenge: V_Rand {c['v_rand']:.4f} (t={c['v_rand_threshold']:.1f})  V_Info "
            f"{c['v_info']:.4f} (t={c['v_info_threshold']:.1f})  pixel error {c['pixel_error']:.4f}"
        )
    print(
        f"{result.num_images} images; wrote {out / 'metrics.json'}"
        + (f"; skipped {len(result.bad)} bad files, listed in {out / 'bad_files.txt'}" if result.bad else "")
    )
    return 0


def _dataset(args: argparse.Namespace, meta: Any) -> Any:
    """The split to score, as uint8 images, checked against the weights' classes."""
    from pixelwise.data import build_dataset, raw_transforms

    kw: dict[str, Any] = {}
    if args.dataset == "folder":
        kw = {"classes": meta.classes, "palette": meta.palette}
    elif args.dataset == "synthetic":
        kw = {"num_classes": meta.num_classes}
        if "synthetic_size" in meta.extra:
            kw["size"] = tuple(meta.extra["synthetic_size"])
    with translated({"name": "--dataset"}, flags=True):
        dataset = build_dataset(args.dataset, args.data, args.split, transforms=raw_transforms(), **kw)
    if dataset.num_classes != meta.num_classes:
        raise UserError(
            f"{args.weights} predicts {meta.num_classes} classes but data set {args.dataset!r} has "
            f"{dataset.num_classes}; evaluate on the data the weights were trained for"
        )
    return dataset
