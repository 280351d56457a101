"""`step35 train-tiny OUT`: train the tiny Step-3.5 architecture on GSM8K + synthetic tool calls (CPU).

Two phases, deterministic for a seed and step counts (fixed data order, fixed thread count):
1. the main model learns next-token prediction on assistant tokens (`steps`);
2. the MTP layers learn, on the frozen main model, the token 2+k ahead as the main model would
   write it (its greedy token), through the chain (layer 0 reads the main model's pre-norm hidden
   state, layer k reads layer k-1's), each with its own loss (`mtp_steps`). A frozen trunk needs no
   backward pass, so an MTP step costs about one main step; the default recipe measured 29.6 minutes
   on 2 cores (bench/RESULTS.md).
Matmuls run under CPU bf16 autocast (fp32 master weights). Writes the checkpoint in the real layout
plus `train_log.json` and `loss_curves.png`.
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
from tqdm import tqdm

from sglang_step35.config import read_config
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


def _selected_ce(head, h: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the positions the mask selects; the vocabulary head runs on those rows only
    (prompt and padding rows are most of a batch and the heads are most of the compute)."""
    sel = mask > 0
    return F.cross_entropy(head(h[sel]).float(), targets[sel])


def _cosine(opt, steps: int):
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


def _run_phase(desc, steps, params, lr, batches, loss_fn, after_step, progress):
    if steps <= 0:
        return
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = _cosine(opt, steps)
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        ids, mask = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        after_step()


def mtp_loss(model: TrainableStep35, ids: torch.Tensor, mask: torch.Tensor, log: dict) -> torch.Tensor:
    """Layer k at position t learns token t+2+k as the frozen main model predicts it (greedy, given the
    data up to t+1+k): at serving time a draft is accepted exactly when it equals the main model's
    greedy token, so that is the target that raises the accept length (self-distillation, as EAGLE
    and Medusa-2 train their heads)."""
    with torch.no_grad():
        x = model.trunk(ids)
        greedy = model.main_head(x).argmax(-1)  # [B, T]: the main model's next token after position t
    total = 0.0
    for k, h in enumerate(model.mtp_states(ids, x)):
        n = h.shape[1] - 1
        if n <= 0 or mask[:, 2 + k: 2 + k + n].sum() == 0:
            continue
        lk = _selected_ce(lambda z, k=k: model.mtp_head(k, z), h[:, :n], greedy[:, 1 + k: 1 + k + n],
                          mask[:, 2 + k: 2 + k + n])
        log[f"mtp{k}"].append(lk.item())
        total = total + lk
    return total


def _is_mtp(model: TrainableStep35, param_name: str) -> bool:
    layer = param_name.split("__")[2] if param_name.startswith("model__layers__") else None
    return layer is not None and int(layer) >= model.n


@torch.no_grad()
def warm_start_mtp(model: TrainableStep35) -> None:
    """Start each MTP layer from trained main-model parts of the same shape: attention and norms from the
    last sliding main layer, the MLP from the last dense main layer, the head from lm_head / final norm.
    Only `eh_proj` (and the enorm/hnorm scales) start from scratch, so 500 steps go much further."""
    specs = model.specs[: model.n]
    sliding = max(i for i, s in enumerate(specs) if s.window)
    dense = max(i for i, s in enumerate(specs) if not s.is_moe)
    for k in range(model.m):
        p = f"model.layers.{model.n + k}."
        for name in model.names:
            if not name.startswith(p):
                continue
            part = name[len(p):]
            if part.startswith(("self_attn.", "input_layernorm.", "post_attention_layernorm.")):
                src = f"model.layers.{sliding}.{part}"
            elif part.startswith("mlp."):
                src = f"model.layers.{dense}.{part}"
            elif part == "shared_head.output.weight":
                src = "lm_head.weight"
            elif part == "shared_head.norm.weight":
                src = "model.norm.weight"
            else:
                continue
            model.w[name].copy_(model.w[src])


def train_mtp(model: TrainableStep35, batches, steps: int, lr: float, log: dict, progress: bool) -> None:
    """Phase 2: only the MTP layers learn; the main model is frozen (no backward through it)."""
    warm_start_mtp(model)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(_is_mtp(model, name))
        if p.requires_grad:
            params.append(p)
    mtp_layers = set(range(model.n, model.n + model.m))
    _run_phase("train-tiny MTP", steps, params, lr, batches, lambda ids, mask: mtp_loss(model, ids, mask, log),
               lambda: model.update_router_bias(1e-3, mtp_layers), progress)


def train_tiny(out, seed: int = 0, steps: int = 2500, mtp_steps: int = 500, batch_size: int = 16,
               lr: float = 3e-3, mtp_lr: float = 2e-3, max_len: int = 384, threads: int = 2,
               progress: bool = True) -> dict:
    """Phase 1 trains the main model (`steps`); phase 2 trains the MTP layers on the frozen main model
    (`mtp_steps`). Deterministic: the same arguments give bit-identical weights on one machine."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # Without this, CPU autograd's parallel accumulation differs from run to run in the last bits and
    # two runs drift apart after ~50 steps; with it the recipe is bit-reproducible (cost: ~2 %).
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out, seed, steps, mtp_steps, batch_size, lr, mtp_lr, max_len, threads, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(out, seed, steps, mtp_steps, batch_size, lr, mtp_lr, max_len, threads, progress) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = Path(out)
    write_tiny_checkpoint(out, seed=seed, spec=TRAINED_SPEC, corpus=tokenizer_corpus())
    cfg = read_config(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = TrainableStep35(cfg, load_file(str(out / "model.safetensors")))
    examples = training_examples(tok, max_len=max_len, seed=seed)
    batches = _batches(examples, batch_size, random.Random(seed))
    main_params = [p for name, p in model.named_parameters() if not _is_mtp(model, name)]
    log = {"main": [], **{f"mtp{k}": [] for k in range(model.m)}}
    t0 = time.time()

    def main_loss(ids, mask):
        loss = _selected_ce(model.main_head, model.trunk(ids)[:, :-1], ids[:, 1:], mask[:, 1:])
        log["main"].append(loss.item())
        return loss

    main_layers = set(range(model.n))
    _run_phase("train-tiny main", steps, main_params, lr, batches, main_loss,
               lambda: model.update_router_bias(1e-3, main_layers), progress)
    train_mtp(model, batches, mtp_steps, mtp_lr, log, progress)
    weights = {
        k: (v if k.endswith("router_bias") else v.to(torch.bfloat16)).contiguous()
        for k, v in model.state_in_checkpoint_layout().items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    summary = {
        "seed": seed, "steps": steps, "mtp_steps": mtp_steps, "batch_size": batch_size, "lr": lr,
        "mtp_lr": mtp_lr, "max_len": max_len, "threads": threads, "examples": len(examples),
        "train_seconds": round(time.time() - t0, 1), "spec": asdict(TRAINED_SPEC),
        "final_loss": {k: (sum(v[-50:]) / max(1, len(v[-50:]))) for k, v in log.items()},
    }
    (out / "train_log.json").write_text(json.dumps({**summary, "loss": log}) + "\n")
    _plot(log, steps, out / "loss_curves.png")
    return summary


def _plot(log: dict, mtp_start: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in log.items():
        if values:
            k = 20  # moving average: per-batch losses are noisy
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
            x0 = 0 if name == "main" else mtp_start  # MTP layers train after the main model
            ax.plot(range(x0, x0 + len(smooth)), smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats, 20-step mean)")
    ax.set_title("tiny Step-3.5: main head and MTP layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
