"""`step35 train-tiny OUT`: train the tiny Step-3.5 architecture on GSM8K + synthetic tool calls (CPU).

Deterministic for a seed and a step count (fixed data order, fixed thread count). The main head
learns next-token prediction on assistant tokens; MTP layer k learns the token 2+k ahead through
the chain (layer 0 reads the main model's pre-norm hidden state, layer k reads layer k-1's), each
with its own loss. Writes the checkpoint in the real layout plus `train_log.json` and
`loss_curves.png`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from sglang_step35.tiny import TinySpec, write_tiny_checkpoint
from sglang_step35.training.data import tokenizer_corpus, training_examples
from sglang_step35.training.model import TrainableStep35

# The embedded trained checkpoint: big enough to learn the formats, small enough to commit (< 20 MB).
TRAINED_SPEC = TinySpec(
    hidden_size=128,
    intermediate_size=384,
    full_heads=4,
    sliding_heads=6,
    kv_heads=2,
    head_dim=32,
    sliding_window=64,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=128,
    share_expert_dim=128,
    vocab_size=2048,
    routed_limit=7.0,
    shared_limit=16.0,
    init_std=0.02,
)
MTP_LOSS_WEIGHT = 0.3


def _batches(examples, batch_size: int, rng: random.Random):
    """Length-bucketed batches (little padding), in a seeded order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    while True:
        rng.shuffle(chunks)
        for c in chunks:
            T = max(len(examples[i][0]) for i in c)
            ids = torch.zeros(len(c), T, dtype=torch.long)
            mask = torch.zeros(len(c), T)
            for r, i in enumerate(c):
                e_ids, e_mask = examples[i]
                ids[r, : len(e_ids)] = torch.tensor(e_ids)
                mask[r, : len(e_mask)] = torch.tensor(e_mask, dtype=torch.float32)
            yield ids, mask


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def train_tiny(out, seed: int = 0, steps: int = 1500, batch_size: int = 16, lr: float = 3e-3,
               max_len: int = 320, threads: int = 2, progress: bool = True) -> dict:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    out = Path(out)
    write_tiny_checkpoint(out, seed=seed, spec=TRAINED_SPEC, corpus=tokenizer_corpus())
    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    model = TrainableStep35(cfg, load_file(str(out / "model.safetensors")))
    examples = training_examples(tok, max_len=max_len, seed=seed)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    batches = _batches(examples, batch_size, random.Random(seed))
    log = {"main": [], **{f"mtp{k}": [] for k in range(model.m)}}
    t0 = time.time()
    for step in tqdm(range(steps), desc="train-tiny", disable=not progress):
        ids, mask = next(batches)
        logits, mtp = model(ids)
        loss_main = _masked_ce(logits[:, :-1], ids[:, 1:], mask[:, 1:])
        loss = loss_main
        log["main"].append(loss_main.item())
        for k, lk in enumerate(mtp):  # layer k at position t predicts token t + 2 + k
            n = lk.shape[1] - 1
            if n <= 0:
                continue
            lk_loss = _masked_ce(lk[:, :n], ids[:, 2 + k: 2 + k + n], mask[:, 2 + k: 2 + k + n])
            loss = loss + MTP_LOSS_WEIGHT * lk_loss
            log[f"mtp{k}"].append(lk_loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        model.update_router_bias(1e-3)
    weights = {
        k: (v if k.endswith("router_bias") else v.to(torch.bfloat16)).contiguous()
        for k, v in model.state_in_checkpoint_layout().items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    summary = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "max_len": max_len,
        "threads": threads, "examples": len(examples), "train_seconds": round(time.time() - t0, 1),
        "spec": asdict(TRAINED_SPEC), "final_loss": {k: (sum(v[-50:]) / max(1, len(v[-50:]))) for k, v in log.items()},
    }
    (out / "train_log.json").write_text(json.dumps({**summary, "loss": log}) + "\n")
    _plot(log, out / "loss_curves.png")
    return summary


def _plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in log.items():
        if values:
            k = 20  # moving average: per-batch losses are noisy
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
            ax.plot(smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats, 20-step mean)")
    ax.set_title("tiny Step-3.5: main head and MTP layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
