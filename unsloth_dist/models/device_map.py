"""Where a model's weights go when it is loaded: device-map resolution, checked before any weight
is read.

:func:`resolve_device_map` is a pure function of the model's *config* (the model is sized on the
meta device with ``accelerate.init_empty_weights``), the ``device_map`` asked for, the memory
limits and the launch (world size, local rank, GPU count). Nothing here touches a GPU, so every
case can be tested on a CPU machine with a fake GPU count and an explicit ``max_memory``.

Policy:

* **Distributed launch (WORLD_SIZE > 1)**: every rank holds one whole replica (data parallel).
  ``"auto"`` (and ``None``, ``"local"``) puts the whole model on this rank's device
  (``cuda:LOCAL_RANK`` or ``cpu`` without GPUs). ``"balanced"`` / ``"sequential"`` (splitting a
  model across GPUs) are refused: the ranks' GPUs are already taken by the other replicas. A dict
  or a device must name a single device, and a GPU that is not this rank's is refused (two ranks
  on one GPU is almost always a mistake: ``{"": 0}`` copied from a single-GPU script).
* **One process**: ``"auto"`` and ``"balanced"`` spread the decoder layers evenly over the GPUs
  (``accelerate.utils.get_balanced_memory`` then ``infer_auto_device_map``); ``"sequential"`` fills
  GPU 0 first, then GPU 1, ... A decoder layer (``model._no_split_modules``) is never split. With
  one GPU the whole model goes to GPU 0; without GPUs to the CPU. A dict is used as given (its
  devices must exist); ``"cpu"``, ``"cuda"``, ``"cuda:K"`` or an int put the whole model there.
* **Memory**: ``max_memory`` (``{0: "20GiB", 1: 20 * 2**30, "cpu": "64GiB"}``) bounds each
  device; by default the free memory of each GPU. Weights are never offloaded to the CPU or to
  disk unless ``max_memory`` names ``"cpu"`` explicitly: a model that does not fit in the GPUs'
  ``max_memory`` is an error that gives its size and the room there is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

logger = logging.getLogger("unsloth_dist")

DeviceMap = dict[str, Union[int, str]]
SPLIT_STRATEGIES = ("auto", "balanced", "sequential")


class DeviceMapError(ValueError):
    """The device map asked for cannot be realised on this machine / launch."""


@dataclass
class DeviceMapPlan:
    """A resolved device map and how it was reached (``str(plan)`` is what gets logged)."""

    device_map: DeviceMap
    strategy: str  # what was asked for ("auto", "balanced", "dict", "cuda:1", ...)
    reason: str  # why this map (distributed replica, split over N GPUs, ...)
    model_bytes: int = 0
    bytes_per_device: dict[Union[int, str], int] = field(default_factory=dict)

    @property
    def devices(self) -> list[Union[int, str]]:
        seen: list[Union[int, str]] = []
        for d in self.device_map.values():
            if d not in seen:
                seen.append(d)
        return seen

    @property
    def single_device(self) -> Optional[Union[int, str]]:
        devs = self.devices
        return devs[0] if len(devs) == 1 else None

    def __str__(self) -> str:
        head = f"device_map={self.strategy!r} -> {self.reason}; model {_gib(self.model_bytes)}"
        if self.single_device is not None:
            return f"{head} on {_dev_name(self.single_device)}"
        lines = [head + ":"]
        for dev in self.devices:
            mods = [k for k, v in self.device_map.items() if v == dev]
            shown = ", ".join(mods[:4]) + (f", ... ({len(mods)} modules)" if len(mods) > 4 else "")
            size = self.bytes_per_device.get(dev)
            lines.append(f"  {_dev_name(dev)}{f' ({_gib(size)})' if size is not None else ''}: {shown}")
        return "\n".join(lines)


def _gib(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def _dev_name(d: Union[int, str]) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


# --------------------------------------------------------------------------- sizing


def _to_bytes(value: Union[int, float, str], what: str) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        from accelerate.utils import convert_file_size_to_int

        try:
            return int(convert_file_size_to_int(value))
        except ValueError:
            pass
    raise DeviceMapError(f"max_memory[{what!r}] = {value!r} is not a size; give bytes or a string like '20GiB'")


def meta_model(config_or_model: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model on the meta device (no memory): a module is returned as is, a config (or a
    directory / hub id whose config can be read) is instantiated under ``init_empty_weights``."""
    if isinstance(config_or_model, nn.Module):
        return config_or_model
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = config_or_model
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(str(config), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def no_split_classes(model: nn.Module) -> list[str]:
    names: list[str] = []
    for m in model.modules():
        for n in getattr(m, "_no_split_modules", None) or []:
            if n not in names:
                names.append(n)
    return names


def _quantized_dtypes(model: nn.Module, dtype: torch.dtype, quant_bits: Optional[int]):
    """(dtype, special_dtypes) for accelerate's sizing: under 4/8-bit loading the decoder's Linear
    weights take 4/8 bits, everything else (embeddings, norms, lm_head) stays in `dtype`."""
    if not quant_bits:
        return dtype, None
    from accelerate.utils import CustomDtype

    qdtype = CustomDtype.INT4 if quant_bits == 4 else torch.int8
    special: dict[str, torch.dtype] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            quantized = isinstance(module, nn.Linear) and module is not head and pname == "weight"
            special[full] = qdtype if quantized else dtype
    return dtype, special


def model_size_bytes(model: nn.Module, dtype: torch.dtype, quant_bits: Optional[int] = None) -> int:
    from accelerate.utils import compute_module_sizes

    dtype, special = _quantized_dtypes(model, dtype, quant_bits)
    return int(compute_module_sizes(model, dtype=dtype, special_dtypes=special)[""])


# --------------------------------------------------------------------------- devices


def _parse_device(value: Any, n_gpus: int, what: str) -> Union[int, str]:
    """A device as accelerate/transformers device maps write it: GPU index (int) or 'cpu'/'disk'."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool):
        raise DeviceMapError(f"{what}: {value!r} is not a device")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str):
        v = value.strip().lower()
        if v in ("cpu", "disk", "meta"):
            if v != "cpu":
                raise DeviceMapError(
                    f"{what}: {value!r} is not supported for training (weights on {v} are not trainable); "
                    "use GPUs or 'cpu'")
            return "cpu"
        if v == "cuda":
            idx = 0
        elif v.startswith("cuda:") and v[5:].isdigit():
            idx = int(v[5:])
        elif v.isdigit():
            idx = int(v)
        else:
            raise DeviceMapError(
                f"{what}: {value!r} is not a device; use 'auto', 'balanced', 'sequential', 'cpu', 'cuda', 'cuda:K', "
                "a GPU index or a dict of module name -> device")
    else:
        raise DeviceMapError(f"{what}: {value!r} ({type(value).__name__}) is not a device")
    if n_gpus == 0:
        raise DeviceMapError(
            f"{what}: {value!r} asks for a CUDA GPU but none is visible on this machine; "
            "use device_map='cpu' or 'auto' (which picks the CPU here)")
    if not 0 <= idx < n_gpus:
        raise DeviceMapError(
            f"{what}: {value!r} does not exist: {n_gpus} GPU(s) are visible (cuda:0..cuda:{n_gpus - 1}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return idx


def _launch(world_size: Optional[int], local_rank: Optional[int], n_gpus: Optional[int]):
    if world_size is None:
        forced = str(os.environ.get("UNSLOTH_FORCE_SINGLE_GPU", "")).lower() in ("1", "true", "yes", "on")
        world_size = 1 if forced else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) if world_size > 1 else 0
    if n_gpus is None:
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return world_size, local_rank, n_gpus


def _max_memory(max_memory: Optional[Mapping], n_gpus: int, fake: bool) -> tuple[dict, bool]:
    """Bytes per device; the second value says whether the CPU may hold weights."""
    if max_memory is None:
        if n_gpus == 0:
            return {}, True
        if fake:
            # a fake GPU count (tests) without limits: unbounded GPUs
            return {i: 2**62 for i in range(n_gpus)}, False
        out = {}
        for i in range(n_gpus):
            free, _ = torch.cuda.mem_get_info(i)
            out[i] = int(free)
        return out, False
    out: dict[Union[int, str], int] = {}
    cpu_ok = False
    for key, value in max_memory.items():
        if isinstance(key, str) and key.strip().lower() == "cpu":
            out["cpu"] = _to_bytes(value, "cpu")
            cpu_ok = True
            continue
        dev = _parse_device(key, n_gpus, f"max_memory key {key!r}")
        out[dev] = _to_bytes(value, str(key))
    return out, cpu_ok


def _check_fits(size: int, room: Optional[int], where: str, hint: str) -> None:
    if room is not None and size > room:
        raise DeviceMapError(
            f"the model needs {_gib(size)} for its weights but max_memory allows {_gib(room)} on {where}; {hint}")


# --------------------------------------------------------------------------- resolution


def resolve_device_map(
    config_or_model: Any,
    device_map: Any = "auto",
    *,
    max_memory: Optional[Mapping] = None,
    world_size: Optional[int] = None,
    local_rank: Optional[int] = None,
    n_gpus: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    quant_bits: Optional[int] = None,
    no_split_module_classes: Optional[list[str]] = None,
    trust_remote_code: bool = False,
) -> DeviceMapPlan:
    """Resolve `device_map` for loading the model described by `config_or_model` (a
    ``PretrainedConfig``, a meta/real module, or a model directory).

    ``world_size``, ``local_rank`` and ``n_gpus`` default to the launch environment and the visible
    GPUs; pass them (with ``max_memory``) to plan for another machine. ``dtype`` / ``quant_bits``
    (4 or 8) size the weights as they will be loaded. Raises :class:`DeviceMapError` for a map that
    cannot work here. See the module docstring for the policy."""
    fake = n_gpus is not None and not (torch.cuda.is_available() and n_gpus <= torch.cuda.device_count())
    world_size, local_rank, n_gpus = _launch(world_size, local_rank, n_gpus)
    if n_gpus < 0 or world_size < 1:
        raise DeviceMapError(f"invalid launch: world_size={world_size}, n_gpus={n_gpus}")
    mem, cpu_ok = _max_memory(max_memory, n_gpus, fake)
    model = meta_model(config_or_model, trust_remote_code=trust_remote_code)
    size = model_size_bytes(model, dtype, quant_bits)
    strategy = device_map if isinstance(device_map, str) or device_map is None else (
        "dict" if isinstance(device_map, Mapping) else str(device_map))
    strategy = "auto" if strategy is None else strategy
    hint_q = "" if quant_bits == 4 else " load_in_4bit=True,"

    def whole(dev: Union[int, str], reason: str) -> DeviceMapPlan:
        room = mem.get(dev)
        split = ", or split it over GPUs in one process with device_map='balanced'" if world_size == 1 else ""
        smaller = hint_q.strip(" ,") or "a smaller model"
        _check_fits(size, room, _dev_name(dev), f"raise max_memory[{dev!r}], or load it smaller ({smaller}){split}")
        return DeviceMapPlan({"": dev}, str(strategy), reason, size, {dev: size})

    # ---------------------------------------------------------------- distributed: one replica per rank
    if world_size > 1:
        local = _parse_device(local_rank % n_gpus, n_gpus, "local rank") if n_gpus else "cpu"
        if device_map is None or (isinstance(device_map, str) and device_map in ("auto", "local")):
            return whole(local, f"distributed launch (world size {world_size}): the whole replica on this rank's "
                                f"device (local rank {local_rank})")
        if isinstance(device_map, str) and device_map in ("balanced", "sequential", "balanced_low_0"):
            raise DeviceMapError(
                f"device_map={device_map!r} splits one model over several GPUs, but this is a distributed launch "
                f"(WORLD_SIZE={world_size}) where every rank holds a whole replica on its own GPU; use "
                "device_map='auto' (one replica per rank), or run one process (python script.py) to split the model")
        if isinstance(device_map, Mapping):
            devs = {_parse_device(v, n_gpus, f"device_map[{k!r}]") for k, v in device_map.items()}
            if len(devs) != 1:
                raise DeviceMapError(
                    f"device_map puts modules on {sorted(map(_dev_name, devs))} but under a distributed launch "
                    f"(WORLD_SIZE={world_size}) each rank holds one whole replica on one device; use device_map='auto'")
            dev = devs.pop()
        else:
            dev = _parse_device(device_map, n_gpus, "device_map")
        if dev != local:
            raise DeviceMapError(
                f"device_map puts this rank's replica on {_dev_name(dev)}, but local rank {local_rank} owns "
                f"{_dev_name(local)} (every rank would load onto the same device); use device_map='auto'")
        return whole(dev, f"distributed launch (world size {world_size}), as given")

    # ---------------------------------------------------------------- one process
    if isinstance(device_map, Mapping):
        checked: DeviceMap = {}
        for k, v in device_map.items():
            checked[str(k)] = _parse_device(v, n_gpus, f"device_map[{k!r}]")
        return DeviceMapPlan(checked, "dict", "as given", size)
    if device_map is not None and not (isinstance(device_map, str) and device_map in (*SPLIT_STRATEGIES, "balanced_low_0", "local")):
        dev = _parse_device(device_map, n_gpus, "device_map")
        return whole(dev, "the whole model on one device, as given")
    if n_gpus == 0:
        return whole("cpu", "no GPU visible: the whole model on the CPU")
    gpus = [i for i in range(n_gpus) if mem.get(i, 0) > 0]
    if not gpus:
        raise DeviceMapError(f"max_memory gives no memory to any of the {n_gpus} GPU(s): {dict(mem)}")
    if len(gpus) == 1 and not cpu_ok:
        return whole(gpus[0], "one GPU: the whole model on it")

    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    nosplit = list(no_split_module_classes) if no_split_module_classes is not None else no_split_classes(model)
    qdtype, special = _quantized_dtypes(model, dtype, quant_bits)
    budget = {d: m for d, m in mem.items() if d in gpus or (d == "cpu" and cpu_ok)}
    total_room = sum(budget.values())
    _check_fits(size, total_room, " + ".join(_dev_name(d) for d in budget),
                f"give the GPUs more max_memory, use more GPUs, or load the model smaller ({hint_q.strip(' ,') or 'fewer layers'})")
    acc_log = logging.getLogger("accelerate.utils.modeling")
    old_level = acc_log.level
    acc_log.setLevel(logging.ERROR)  # "Device k is not available" when planning for fake GPUs
    try:
        if device_map in ("auto", "balanced", "balanced_low_0", None, "local"):
            gpu_budget = {d: m for d, m in budget.items() if d != "cpu"}
            balanced = get_balanced_memory(model, max_memory=dict(gpu_budget), no_split_module_classes=nosplit,
                                           dtype=qdtype, special_dtypes=special,
                                           low_zero=device_map == "balanced_low_0")
            # balancing only lowers each GPU's budget, never above what was allowed
            plan_mem = {d: min(int(balanced.get(d, budget[d])), budget[d]) for d in gpu_budget}
            if cpu_ok:
                plan_mem["cpu"] = budget["cpu"]
            reason = f"split evenly over {len(gpu_budget)} GPUs (decoder layers never split)"
        else:
            plan_mem = dict(budget)
            reason = f"GPUs filled in order (sequential) over {len(gpus)} GPUs (decoder layers never split)"
        dmap = infer_auto_device_map(model, max_memory=plan_mem, no_split_module_classes=nosplit,
                                     dtype=qdtype, special_dtypes=special)
        if any(v in ("disk",) or (v == "cpu" and not cpu_ok) for v in dmap.values()) and plan_mem != budget:
            # balancing left too little room somewhere (large non-splittable blocks): fill in order instead
            dmap = infer_auto_device_map(model, max_memory=dict(budget), no_split_module_classes=nosplit,
                                         dtype=qdtype, special_dtypes=special)
            reason += "; balancing did not fit, GPUs filled in order"
    finally:
        acc_log.setLevel(old_level)
    bad = sorted({str(v) for v in dmap.values() if v == "disk" or (v == "cpu" and not cpu_ok)})
    if bad:
        largest = _largest_block(model, nosplit, qdtype, special)
        raise DeviceMapError(
            f"the model ({_gib(size)}) does not fit in max_memory {_fmt_mem(budget)}: accelerate would put "
            f"{[k for k, v in dmap.items() if str(v) in bad][:3]} on {'/'.join(bad)} (the largest block that "
            f"cannot be split is {_gib(largest)}); give the GPUs more max_memory, use more GPUs,{hint_q} or add "
            "'cpu' to max_memory to allow CPU offload")
    dmap = {k: (int(v) if isinstance(v, int) else str(v)) for k, v in dmap.items()}
    per = _bytes_per_device(model, dmap, qdtype, special)
    return DeviceMapPlan(dmap, str(strategy), reason, size, per)


def _fmt_mem(mem: Mapping) -> str:
    return "{" + ", ".join(f"{_dev_name(k)}: {_gib(v)}" for k, v in mem.items()) + "}"


def _largest_block(model: nn.Module, nosplit: list[str], dtype, special) -> int:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    best = 0
    for name, m in model.named_modules():
        if type(m).__name__ in nosplit:
            best = max(best, int(sizes.get(name, 0)))
    return best


def _bytes_per_device(model: nn.Module, dmap: Mapping, dtype, special) -> dict:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    out: dict[Union[int, str], int] = {}
    for name, dev in dmap.items():
        out[dev] = out.get(dev, 0) + int(sizes.get(name, 0))
    return out


def torch_device(dev: Union[int, str]) -> torch.device:
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
