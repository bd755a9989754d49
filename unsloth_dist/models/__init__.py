"""Model-side helpers: patching the Triton kernels of `unsloth_dist.kernels` into HF causal LMs."""
from .patching import ARCHS, PatchReport, patch_model, unpatch_model

__all__ = ["ARCHS", "PatchReport", "patch_model", "unpatch_model"]
