from .collate import IGNORE_INDEX, PadCollator, WithLabels, check_sample, is_packed, model_inputs, uses_varlen_attention
from .sampler import GlobalBatchSampler

__all__ = [
    "IGNORE_INDEX", "PadCollator", "WithLabels", "GlobalBatchSampler", "check_sample", "is_packed", "model_inputs",
    "uses_varlen_attention",
    "DataConfig", "DataError", "DataReport", "TokenizedDataset", "build_datasets",
]


def __getattr__(name):
    # the pipeline pulls in numpy / the config; load it only when asked for
    if name == "DataConfig":
        from .config import DataConfig

        return DataConfig
    if name in ("DataError", "DataReport", "TokenizedDataset", "build_datasets"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
