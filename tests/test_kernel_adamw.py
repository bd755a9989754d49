"""fused_master_adamw: the Triton AdamW-on-fp32-masters kernel (Triton's CPU interpreter) against
torch.optim.AdamW run on fp32 copies with clip_grad_norm_, step by step; the Trainer with the option
against the Trainer without it; and the config / launch errors."""
from __future__ import annotations

import copy

import pytest
import torch

from unsloth_dist.kernels import LAUNCHES
from unsloth_dist.kernels._utils import triton_interpreter_ready

pytestmark = pytest.mark.skipif(not triton_interpreter_ready(),
                                reason="triton was imported in compiled mode (a GPU machine): tests/test_gpu_kernels.py")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    from test_kernels import _rne_bf16_casts

    _rne_bf16_casts(monkeypatch)  # the interpreter truncates fp32 -> bf16; a GPU rounds to nearest even
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


def _setup(shapes, decay=(0.1, 0.0)):
    """bf16 model params, their fp32 masters in a torch AdamW (two groups: with / without decay),
    and an independent fp32 reference copy with its own torch AdamW."""
    params = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    masters = [p.float().clone().requires_grad_(True) for p in params]
    ref = [p.float().clone().requires_grad_(True) for p in params]
    half = len(shapes) // 2

    def groups(ts):
        return [{"params": ts[:half], "weight_decay": decay[0]}, {"params": ts[half:], "weight_decay": decay[1]}]

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    return params, masters, torch.optim.AdamW(groups(masters), **kw), ref, torch.optim.AdamW(groups(ref), **kw)


def test_master_adamw_matches_torch_adamw_with_clipping_and_a_schedule():
    from unsloth_dist.kernels import adamw as A

    # odd sizes: tails shorter than a block, several blocks, a scalar-like tensor
    shapes = [(3, 5), (2049,), (64, 70), (1,), (5000,), (7, 3, 11)]
    params, masters, opt, ref, ref_opt = _setup(shapes)
    no_grad = 3  # this parameter gets no gradient in the first step: skipped, as AdamW skips it
    for step, (max_norm, lr) in enumerate([(1e9, 1e-2), (0.5, 5e-3), (2.0, 2e-3)]):
        for g in opt.param_groups + ref_opt.param_groups:
            g["lr"] = lr  # what a scheduler does between steps
        for i, p in enumerate(params):
            p.grad = None if (step == 0 and i == no_grad) else torch.randn(p.shape).to(torch.bfloat16)
        grads = [p.grad for p in params if p.grad is not None]
        norm, coef = A.grad_norm_and_coef(grads, max_norm)
        for r, p in zip(ref, params):
            r.grad = None if p.grad is None else p.grad.float()
        ref_norm = torch.nn.utils.clip_grad_norm_([r for r in ref if r.grad is not None], max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        if max_norm == 0.5:
            assert coef.item() < 0.1, "the clip must be active in this step"
        before = LAUNCHES["master_adamw"]
        A.master_adamw_step(opt, params, masters, coef)
        assert LAUNCHES["master_adamw"] - before == len(grads)
        ref_opt.step()
        for i, (p, m, r) in enumerate(zip(params, masters, ref)):
            torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-5, atol=1e-6, msg=lambda s: f"step {step} param {i}: {s}")
            assert torch.equal(p, m.detach().to(torch.bfloat16)), f"step {step} param {i}: bf16 weight != its master"
            if r in ref_opt.state:
                st, rst = opt.state[m], ref_opt.state[r]
                assert float(st["step"]) == float(rst["step"]) and st["step"].device.type == "cpu"
                torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(opt.state[masters[no_grad]].get("step", 0)) == step  # skipped once


def test_master_adamw_state_loads_into_torch_adamw_and_continues_the_same():
    """The state the kernel leaves is torch's: state_dict() -> a plain AdamW -> the next step agrees."""
    from unsloth_dist.kernels import adamw as A

    params, masters, opt, _, _ = _setup([(33, 9), (100,)])
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    A.master_adamw_step(opt, params, masters, torch.ones(()))
    twin = [m.detach().clone().requires_grad_(True) for m in masters]
    twin_opt = torch.optim.AdamW([{"params": twin[:1], "weight_decay": 0.1}, {"params": twin[1:], "weight_decay": 0.0}],
                                 lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, t in zip(params, twin):
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
        t.grad = p.grad.float()
    A.master_adamw_step(opt, params, masters, torch.ones(()))
    twin_opt.step()
    for m, t in zip(masters, twin):
        torch.testing.assert_close(m.detach(), t.detach(), rtol=1e-5, atol=1e-6)


def test_supports_names_what_it_cannot_run():
    from unsloth_dist.kernels import adamw as A

    params, masters, opt, _, _ = _setup([(4, 4), (8,)])
    assert A.supports(opt, params, masters) is None
    sgd = torch.optim.SGD(masters, lr=0.1)
    assert "SGD" in A.supports(sgd, params, masters)
    ams = torch.optim.AdamW(masters, amsgrad=True)
    assert "amsgrad" in A.supports(ams, params, masters)
    assert "contiguous" in A.supports(opt, [params[0].t(), params[1]], masters)


def _train(fused: bool, tmp_path, backend="single", resume=None, **extra):
    from tiny import ragged_dataset, tiny_llama
    from unsloth_dist import Trainer

    model = tiny_llama(seed=0, vocab=128, hidden=64, layers=2)
    data = ragged_dataset(n=24, seed=5, vocab=128, max_len=16, min_len=6)
    trainer = Trainer(model, data, backend=backend, args={
        "output_dir": str(tmp_path / f"fused{fused}"), "per_device_train_batch_size": 4, "max_steps": 5,
        "learning_rate": 5e-3, "weight_decay": 0.1, "precision": "bf16", "seed": 3, "disable_tqdm": True,
        "max_grad_norm": 0.5, "fused_master_adamw": fused, **extra})
    before = LAUNCHES["master_adamw"]
    result = trainer.train(resume_from_checkpoint=resume)
    masters = [m.detach().clone() for m in trainer.backend._master]
    return result, masters, LAUNCHES["master_adamw"] - before


@pytest.mark.parametrize("gas", [1, 2])
def test_trainer_with_fused_master_adamw_trains_like_torch_adamw(tmp_path, gas):
    plain, plain_masters, n_plain = _train(False, tmp_path, gradient_accumulation_steps=gas)
    fused, fused_masters, n_fused = _train(True, tmp_path, gradient_accumulation_steps=gas)
    assert n_plain == 0 and n_fused >= 5 * len(fused_masters) - 2  # every trainable tensor, every step
    # same data, same start: same losses and grad norms (clipped at 0.5 in most steps), same weights.
    # The first update is exact (the second loss equal to 1e-6). After it the norm of the bf16
    # gradients is summed in another order than clip_grad_norm_ over their fp32 copies (with gas 2 the
    # accumulated ones): ~1e-6 apart, which bf16 weight rounding carries to 1e-4..1e-3 by step 5 -- how
    # far depends on the CPU's vector paths (gas 1 was bit-identical on one machine, 1.1e-3 apart on
    # another), so both take the same bound
    tol, mtol = 3e-3, 5e-3
    assert fused.losses == pytest.approx(plain.losses, rel=tol)
    assert fused.grad_norms == pytest.approx(plain.grad_norms, rel=tol)
    assert fused.losses[:2] == pytest.approx(plain.losses[:2], rel=1e-6)
    assert plain.losses[-1] < plain.losses[0]
    for a, b in zip(fused_masters, plain_masters):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=mtol)


def test_fused_master_adamw_checkpoint_resume_goes_on_like_the_uninterrupted_run(tmp_path):
    """Master weights and Adam state the kernel keeps are saved and restored like torch AdamW's."""
    full, full_masters, _ = _train(True, tmp_path / "a", save_steps=3)
    resumed, resumed_masters, n = _train(True, tmp_path / "b", resume=str(tmp_path / "a" / "fusedTrue" / "checkpoint-3"))
    assert resumed.start_step == 3 and n == 2 * len(resumed_masters)
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-6)
    for a, b in zip(full_masters, resumed_masters):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_fused_master_adamw_config_errors(monkeypatch):
    from unsloth_dist.config import ConfigError, load_config

    for bad in ({"backend": "fsdp"}, {"backend": "zero2"}, {"precision": "fp32"}, {"precision": "bf16-mixed"}):
        with pytest.raises(ConfigError, match="fused_master_adamw"):
            load_config({"max_steps": 1, "precision": "bf16", "fused_master_adamw": True, **bad})
    assert load_config({"max_steps": 1, "precision": "bf16", "fused_master_adamw": True, "backend": "ddp"}).fused_master_adamw
    # on a CPU-only run without Triton's interpreter the kernel cannot run: refused before any process group
    monkeypatch.delenv("TRITON_INTERPRET")
    from tiny import tiny_llama
    from unsloth_dist import Trainer

    with pytest.raises(ConfigError, match="fused_master_adamw.*no GPU"):
        Trainer(tiny_llama(seed=0, vocab=128, hidden=64, layers=1), [{"input_ids": [1, 2, 3]}],
                args={"output_dir": "/tmp/never", "max_steps": 1, "precision": "bf16", "fused_master_adamw": True})


def test_unset_fused_master_adamw_is_on_only_where_it_runs_on_a_gpu(tmp_path):
    """Unset (the default) picks the kernel only for CUDA parameters: on CPU, even with Triton's
    interpreter available, torch's AdamW runs; fsdp / zero / fp32 configs stay valid."""
    from unsloth_dist.config import load_config

    assert load_config({"max_steps": 1}).fused_master_adamw is None
    for ok in ({"backend": "fsdp"}, {"backend": "zero2"}, {"precision": "fp32"}, {"precision": "bf16-mixed"}):
        load_config({"max_steps": 1, "precision": "bf16", **ok})
    result, masters, launches = _train(None, tmp_path)
    assert launches == 0 and len(result.losses) == 5


def test_unset_fused_master_adamw_picks_the_kernel_for_cuda_params(monkeypatch):
    """The choice itself: with parameters reported on CUDA, unset means the kernel, false means torch;
    an optimizer the kernel cannot run falls back to torch when unset and is refused when true."""
    import unsloth_dist.backends.base as B
    from unsloth_dist.config import ConfigError, load_config

    class FakeBackend(B.LocalOptimizerMixin):
        def __init__(self, fused, factory=lambda groups: torch.optim.AdamW(groups, lr=1e-3)):
            self.cfg = load_config({"max_steps": 1, "precision": "bf16", "fused_master_adamw": fused})
            self.device = torch.device("cpu")
            self.scaler = None
            self._build_optimizer(torch.nn.Linear(4, 4).to(torch.bfloat16), factory)

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert FakeBackend(None)._fused_adamw is True
    assert FakeBackend(False)._fused_adamw is False
    sgd = lambda groups: torch.optim.SGD(groups, lr=1e-3)  # noqa: E731
    assert FakeBackend(None, sgd)._fused_adamw is False
    with pytest.raises(ConfigError, match="fused_master_adamw: true cannot run here: the optimizer is SGD"):
        FakeBackend(True, sgd)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: False))
    assert FakeBackend(None)._fused_adamw is False
