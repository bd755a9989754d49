"""2 ranks (torchrun): every backend starts from rank 0's weights even when the ranks built
different ones, and the ranks draw different dropout masks (independent micro-batches, as in
one process). argv: output dir, backends (comma-separated). Prints RESULT lines rank 0 checks."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny import tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.distributed import shutdown  # noqa: E402

out, backends = sys.argv[1], sys.argv[2].split(",")
rank = int(os.environ["RANK"])


def data(n=16, length=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (length,), generator=g).tolist()} for _ in range(n)]


def run(backend: str) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(100 + rank)  # a rank-dependent init of the base and of the adapters
    model = get_peft_model(tiny_llama(seed=100 + rank),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "up_proj"],
                                      init_lora_weights="gaussian"))
    torch.manual_seed(100)
    ref = {k: v.clone() for k, v in get_peft_model(tiny_llama(seed=100), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "up_proj"],
        init_lora_weights="gaussian")).state_dict().items()}
    masks = []
    drop = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
    drop.register_forward_hook(lambda mod, i, o: masks.append(((o == 0) & (i[0] != 0)).flatten()[:64].int()))
    args = dict(output_dir=os.path.join(out, backend), per_device_train_batch_size=2, max_steps=1,
                learning_rate=1e-3, precision="fp32", seed=3, disable_tqdm=True)
    trainer = Trainer(model, data(), args=args, backend=backend)
    start = trainer.full_state_dict()  # before any update: the consolidated weights
    trainer.train()
    mine = torch.stack(masks)
    both = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    res = {"same_masks": bool(torch.equal(both[0], both[1]))}
    if rank == 0:
        wrong = [k for k, v in start.items() if k in ref and not torch.equal(v.float(), ref[k].float())]
        res.update(start_is_rank0=not wrong, compared=sum(k in ref for k in start), wrong=wrong[:3])
    return res


results = {b: run(b) for b in backends}
if rank == 0:
    print("RESULT " + json.dumps(results), flush=True)
shutdown()
