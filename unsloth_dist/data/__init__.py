from .collate import IGNORE_INDEX, PadCollator, check_sample
from .sampler import GlobalBatchSampler

__all__ = ["IGNORE_INDEX", "PadCollator", "GlobalBatchSampler", "check_sample"]
