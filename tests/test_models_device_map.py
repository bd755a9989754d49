"""Device-map resolution (unsloth_dist.models.device_map) for distributed and single-process
launches, planned on this CPU machine with a fake GPU count and an explicit max_memory."""
from __future__ import annotations

import pytest
import torch

from unsloth_dist.models.device_map import DeviceMapError, resolve_device_map


@pytest.fixture(scope="module")
def cfg():
    from transformers import LlamaConfig

    # 4 decoder layers of ~147 KiB each (fp32), embeddings and head 32 KiB each: ~642 KiB in all
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2)


def plan(cfg, device_map="auto", **kw):
    kw.setdefault("world_size", 1)
    kw.setdefault("n_gpus", 2)
    return resolve_device_map(cfg, device_map, **kw)


def device_of(p, name):
    """The device of module `name`: the entry of its longest prefix in the map."""
    best = max((k for k in p.device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    return p.device_map[best]


def layer_devices(p, n=4):
    return [device_of(p, f"model.layers.{i}") for i in range(n)]


# ---------------------------------------------------------------- distributed: one replica per rank


@pytest.mark.parametrize("local_rank", [0, 1])
def test_distributed_auto_puts_whole_replica_on_local_gpu(cfg, local_rank):
    p = plan(cfg, "auto", world_size=2, local_rank=local_rank, max_memory={0: "1MiB", 1: "1MiB"})
    assert p.device_map == {"": local_rank}
    assert "distributed" in p.reason and p.model_bytes > 0


def test_distributed_without_gpus_uses_cpu(cfg):
    assert plan(cfg, "auto", world_size=2, local_rank=1, n_gpus=0).device_map == {"": "cpu"}
    assert plan(cfg, None, world_size=2, local_rank=1, n_gpus=0).device_map == {"": "cpu"}


def test_distributed_more_ranks_than_gpus_per_node_wrap(cfg):
    # 4 local ranks on 2 GPUs: rank 3 -> GPU 1 (the trainer's launch check rejects this later)
    assert plan(cfg, "auto", world_size=4, local_rank=3).device_map == {"": 1}


@pytest.mark.parametrize("strategy", ["balanced", "sequential"])
def test_distributed_refuses_splitting_a_replica(cfg, strategy):
    with pytest.raises(DeviceMapError, match="distributed launch"):
        plan(cfg, strategy, world_size=2, local_rank=0)


def test_distributed_dict_must_be_this_ranks_single_device(cfg):
    assert plan(cfg, {"": 1}, world_size=2, local_rank=1).device_map == {"": 1}
    with pytest.raises(DeviceMapError, match="local rank 1 owns cuda:1"):
        plan(cfg, {"": 0}, world_size=2, local_rank=1)
    with pytest.raises(DeviceMapError, match="one whole replica"):
        plan(cfg, {"model": 0, "lm_head": 1}, world_size=2, local_rank=0)


def test_distributed_replica_too_big_for_max_memory(cfg):
    with pytest.raises(DeviceMapError, match=r"needs .* but max_memory allows .* on cuda:1"):
        plan(cfg, "auto", world_size=2, local_rank=1, max_memory={0: "1MiB", 1: "100KiB"})


# ---------------------------------------------------------------- one process


def test_single_process_auto_splits_evenly_without_splitting_layers(cfg):
    p = plan(cfg, "auto", max_memory={0: "1MiB", 1: "1MiB"})
    devs = layer_devices(p)
    assert devs == [0, 0, 1, 1], p.device_map
    # a decoder layer is one entry, never its submodules
    assert not any(k.startswith("model.layers.0.") for k in p.device_map)
    assert set(p.bytes_per_device) == {0, 1}
    assert abs(p.bytes_per_device[0] - p.bytes_per_device[1]) < 0.35 * p.model_bytes
    assert "cuda:0" in str(p) and "cuda:1" in str(p)


def test_balanced_equals_auto_and_sequential_fills_gpu0_first(cfg):
    mm = {0: "1MiB", 1: "1MiB"}
    assert plan(cfg, "balanced", max_memory=mm).device_map == plan(cfg, "auto", max_memory=mm).device_map
    seq = plan(cfg, "sequential", max_memory=mm)
    assert seq.device_map == {"": 0}  # everything fits on GPU 0
    # accelerate keeps room for the largest layer on GPU 0: 400 KiB - 147 KiB holds embeddings + layer 0
    seq = plan(cfg, "sequential", max_memory={0: "400KiB", 1: "1MiB"})
    devs = layer_devices(seq)
    assert devs == [0, 1, 1, 1], seq.device_map


def test_four_gpus_and_4bit_sizing(cfg):
    p = plan(cfg, "auto", n_gpus=4, max_memory={i: "1MiB" for i in range(4)})
    devs = layer_devices(p)
    assert len(set(devs)) >= 3 and devs == sorted(devs), p.device_map
    q = plan(cfg, "auto", max_memory={0: "1MiB", 1: "1MiB"}, dtype=torch.bfloat16, quant_bits=4)
    full = plan(cfg, "auto", max_memory={0: "1MiB", 1: "1MiB"}, dtype=torch.bfloat16)
    assert q.model_bytes < 0.5 * full.model_bytes


def test_one_gpu_and_no_gpu(cfg):
    assert plan(cfg, "auto", n_gpus=1, max_memory={0: "1MiB"}).device_map == {"": 0}
    assert plan(cfg, "auto", n_gpus=0).device_map == {"": "cpu"}
    assert plan(cfg, "cpu", n_gpus=0).device_map == {"": "cpu"}
    assert plan(cfg, "cuda:1").device_map == {"": 1}
    assert plan(cfg, 0).device_map == {"": 0}


def test_dict_used_as_given_and_checked(cfg):
    given = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "model.rotary_emb": 1, "lm_head": "cuda:1"}
    p = plan(cfg, given)
    assert p.device_map == {**given, "lm_head": 1}
    with pytest.raises(DeviceMapError, match="'cuda:3' does not exist: 2 GPU"):
        plan(cfg, {**given, "lm_head": "cuda:3"})


@pytest.mark.parametrize("device_map, n_gpus, match", [
    ("cuda:3", 2, "does not exist: 2 GPU"),
    ("cuda", 0, "none is visible"),
    ("cuda:0", 0, "none is visible"),
    (5, 2, "does not exist"),
    ("disk", 2, "not supported for training"),
    ("gpu-please", 2, "is not a device"),
])
def test_impossible_devices(cfg, device_map, n_gpus, match):
    with pytest.raises(DeviceMapError, match=match):
        plan(cfg, device_map, n_gpus=n_gpus)


def test_model_larger_than_all_gpus(cfg):
    with pytest.raises(DeviceMapError, match=r"needs .* max_memory allows .* on cuda:0 \+ cuda:1"):
        plan(cfg, "auto", max_memory={0: "100KiB", 1: "100KiB"})


def test_fits_in_total_but_not_in_whole_layers(cfg):
    # 642 KiB in all, 147 KiB per layer: 4 x 200 KiB GPUs hold the total but whole layers do not pack
    with pytest.raises(DeviceMapError, match="does not fit in max_memory .*largest block that cannot be split"):
        plan(cfg, "sequential", n_gpus=4, max_memory={i: "200KiB" for i in range(4)})


def test_cpu_offload_only_when_max_memory_names_cpu(cfg):
    p = plan(cfg, "sequential", max_memory={0: "250KiB", 1: "250KiB", "cpu": "10MiB"})
    assert "cpu" in p.devices
    with pytest.raises(DeviceMapError):
        plan(cfg, "sequential", max_memory={0: "250KiB", 1: "250KiB"})


def test_bad_max_memory(cfg):
    with pytest.raises(DeviceMapError, match="does not exist"):
        plan(cfg, "auto", max_memory={0: "1MiB", 3: "1MiB"})
    with pytest.raises(DeviceMapError, match="is not a size"):
        plan(cfg, "auto", max_memory={0: "lots", 1: "1MiB"})


def test_environment_defaults(cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    p = resolve_device_map(cfg, "auto", n_gpus=2)
    assert p.device_map == {"": 1}
    monkeypatch.setenv("UNSLOTH_FORCE_SINGLE_GPU", "1")
    assert resolve_device_map(cfg, "auto", n_gpus=0).device_map == {"": "cpu"}
