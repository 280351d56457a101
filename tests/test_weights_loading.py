"""Weight loading: a checkpoint that does not match its config fails the load with ONE Step35WeightError
naming every bad tensor with expected/actual shapes (in-process, through SGLang's own model builder and
our `load_weights`, as SGLang's scheduler loads; that an error our model raises in SGLang's scheduler
stops `sglang serve` with its message is the hub refusal server's, tests/test_launch_hub.py), and,
through a real `sglang serve --device cpu`, a block-FP8 checkpoint (Step-3.5-Flash-FP8 layout, `step35 tiny --fp8`) serves on CPU; stopping
the server leaves none of its processes behind. The FP8 tiny is served without its MTP layers, as
re-quantized exports ship (eugr/spark-vllm-docker #268): the target model neither needs nor minds them.

SGLang 0.5.23's FP8 methods assert AMX on CPU (sglang/srt/layers/quantization/fp8.py: "Fp8LinearMethod
on CPU requires that CPU has AMX support"); our model then builds unquantized and the loader
dequantizes each FP8 weight with its weight_scale_inv (sglang_step35/models/weights.py). The served
FP8 model (bf16: SGLang allows no fp32 with fp8) must match the reference on the dequantized weights
(bf16 tolerance), and stay close to the bf16 checkpoint it was quantized from (FP8 tolerance).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import Step35Reference
from reference.serving import (CPU_ARGS, OUR_CLASS_LINE, full_sequence, generate, max_abs_diff, served_logprobs)
from sglang_step35 import fp8
from sglang_step35.server import SGLangServer
from sglang_step35.tiny import FP8_TINY_SPEC, write_tiny_checkpoint

BF16_TOL = 0.1  # bf16 server vs fp32 reference on the same weights (see test_parity_served.py)
# mean over positions of KL(bf16 checkpoint || served FP8 in bf16): FP8 rounding (mean KL ~0.009 in
# the reference alone, test_parity_reference.py; its max is set by rare top-k routing flips) plus
# bf16 activations.
FP8_MEAN_KL_TOL = 0.03
MISSING = "model.layers.1.self_attn.k_proj.weight"  # one shard of the fused qkv parameter
UNEXPECTED = "model.layers.0.self_attn.bogus_proj.weight"
MISSHAPED = "model.layers.2.moe.up_proj.weight"


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    edit(w)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mismatched_checkpoint_fails_with_one_error_listing_every_tensor(tiny_dir, tmp_path):
    import gpu_contract

    gpu_contract.sglang_world_of_one()  # register(), as SGLang's scheduler runs it first
    from sglang_step35.models.weights import Step35WeightError

    def edit(w):
        del w[MISSING]
        w[UNEXPECTED] = torch.zeros(4, 4, dtype=torch.bfloat16)
        e, i, h = w[MISSHAPED].shape
        w[MISSHAPED] = w[MISSHAPED][:, : i - 1].contiguous()

    ckpt = _copy_with(tiny_dir, tmp_path / "broken", edit)
    e, i, h = load_file(str(tiny_dir / "model.safetensors"))[MISSHAPED].shape
    kv_shape = list(load_file(str(tiny_dir / "model.safetensors"))[MISSING].shape)
    model, _ = gpu_contract.build_like_sglang(ckpt)
    with pytest.raises(Step35WeightError) as raised:
        model.load_weights(load_file(str(ckpt / "model.safetensors")).items())
    # One error, all three problems, each with its shapes.
    err = str(raised.value)
    assert f"{MISSHAPED}: expected [{e}, {i}, {h}], got [{e}, {i - 1}, {h}]" in err
    assert UNEXPECTED in err
    assert f"{MISSING}: expected {kv_shape}" in err  # a missing shard of a fused parameter is named


def _without_mtp_layers(ckpt):
    """Drop the MTP layers' tensors (model.layers.N.. N+2) from a tiny checkpoint, config unchanged."""
    cfg = json.loads((ckpt / "config.json").read_text())
    n, m = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    w = load_file(str(ckpt / "model.safetensors"))
    kept = {k: v for k, v in w.items() if not any(k.startswith(f"model.layers.{n + i}.") for i in range(m))}
    assert m > 0 and len(kept) < len(w)
    save_file(kept, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(bf16 checkpoint, the same weights in FP8 layout without the MTP layers), seed 5."""
    root = tmp_path_factory.mktemp("fp8")
    return (write_tiny_checkpoint(root / "bf16", seed=5, spec=FP8_TINY_SPEC),
            _without_mtp_layers(write_tiny_checkpoint(root / "fp8", seed=5, fp8=True)))


@pytest.mark.server
def test_fp8_checkpoint_serves_on_cpu_dequantized_at_load(fp8_pair):
    bf16_dir, fp8_dir = fp8_pair
    assert json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    w = load_file(str(fp8_dir / "model.safetensors"))
    ref_fp8 = Step35Reference(fp8_dir, weights=fp8.dequantize_checkpoint(w))
    ref_bf16 = Step35Reference(bf16_dir)
    V = int(ref_fp8.cfg["vocab_size"])
    prompt = [(53 * i + 7) % 900 + 20 for i in range(30)]
    # bf16: SGLang refuses fp32 for quant method fp8 ("torch.float32 is not supported for
    # quantization method fp8"), before our model is built.
    with SGLangServer(str(fp8_dir), [*CPU_ARGS, "--dtype", "bfloat16"]) as server:
        log = server.log_text()
        resp = generate(server, prompt, 12, V)
        pgid = server.proc.pid  # its own process group (SGLangServer starts a new session)
    # A clean shutdown stops every server process: no scheduler or detokenizer left behind, and the
    # server was stopped, not crashed (a SIGTERM to the group took SGLang's crash path, 6 s a stop).
    assert _live_processes_in_group(pgid) == []
    stop_log = server.log_text()[len(log):]
    assert "SIGQUIT received" not in stop_log and "crash diagnostics" not in stop_log, stop_log[-2000:]
    assert OUR_CLASS_LINE in log and "dequantizing FP8 weights at load" in log
    seq = full_sequence(prompt, resp)
    got = served_logprobs(resp, V)
    diff = max_abs_diff(got, ref_fp8.logprobs(seq[:-1]))
    kl = _kl(ref_bf16.logprobs(seq[:-1]), got)
    print(f"fp8 served: max |Δ| vs dequantized reference {diff:.4f}; mean KL vs bf16 checkpoint {kl:.4f}")
    assert diff <= BF16_TOL
    assert kl <= FP8_MEAN_KL_TOL
    # Teeth: a loader that skipped the scales would be far off.
    no_scale = {k: (v.to(torch.bfloat16) if v.dtype == fp8.FP8_DTYPE else v) for k, v in w.items()}
    assert max_abs_diff(got, Step35Reference(fp8_dir, weights=no_scale).logprobs(seq[:-1])) > 4 * BF16_TOL


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    p_log, q_log = p_log.double(), q_log.double()
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def _live_processes_in_group(pgid):
    live = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":  # zombies are dead, awaiting their reaper
                live.append(int(d))
    return live
