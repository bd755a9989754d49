"""Model-side helpers: loading (`FastLanguageModel`), device maps, LoRA / QLoRA, exports, and
patching the Triton kernels of `unsloth_dist.kernels` into HF causal LMs."""
from .patching import ARCHS, PatchReport, patch_model, unpatch_model


def __getattr__(name):
    # loading / export pull in transformers, peft and accelerate: import them when asked for
    if name == "FastLanguageModel":
        from .loader import FastLanguageModel

        return FastLanguageModel
    if name in ("resolve_device_map", "DeviceMapError", "DeviceMapPlan"):
        from . import device_map

        return getattr(device_map, name)
    if name in ("save_lora_adapter", "save_merged"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCHS", "PatchReport", "patch_model", "unpatch_model", "FastLanguageModel", "resolve_device_map",
    "DeviceMapError", "DeviceMapPlan", "save_lora_adapter", "save_merged",
]
