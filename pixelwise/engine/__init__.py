"""The engine every command shares: scoring (`evaluation`), the training loop (`training`) and the
training state it saves and restores (`state`). The commands (`pixelwise train|evaluate|predict|serve`)
and the benchmarks are front ends over it; see docs/architecture.md.
"""

from pixelwise.engine.evaluation import (
    EvalResult,
    InferenceSpec,
    dataset_metrics,
    evaluate,
    format_table,
    metrics_record,
    read_metrics,
    segment,
    weights_source,
)
from pixelwise.engine.state import CHECKPOINT_VERSION, TrainState

__all__ = [
    "CHECKPOINT_VERSION",
    "EvalResult",
    "InferenceSpec",
    "TrainState",
    "dataset_metrics",
    "evaluate",
    "format_table",
    "metrics_record",
    "read_metrics",
    "segment",
    "weights_source",
]
