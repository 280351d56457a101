"""Every command `step35 plan` emits builds our model class, with the per-rank shapes the plan counted.

For each feasible plan (every GPU, 1/2/4/8 GPUs, BF16 and FP8, MTP 0/1/3) the model is constructed
on the meta device under those server args: SGLang's parallel state faked to the plan's TP/EP size
and one rank (first and last), the platform faked for our runner policy (CUDA, or ROCm with AITER on
where the plan sets SGLANG_USE_AITER=1), SGLang's real `Fp8Config` from the FP8 checkpoint's
quantization_config (no CPU dequantize fallback, as on a GPU). Depth is reduced to the real widths
with four main layers (a dense one, an unclamped MoE one, the two clamped ones of layers 43-44) and
the MTP layers; the memory plan (`weight_breakdown`) is evaluated on that same reduced config with
the layout the plan chose, and must equal the constructed parameters' bytes component by component.
The MTP draft layers are counted by the plan in BF16 as an upper bound (re-quantized checkpoints
differ), so for FP8 the constructed bytes must not exceed it. Buffers count too: every buffer the
rank allocates (main model and MTP drafts together, shared ones once, as SGLang's get_rope shares
rotary caches across layers and drafts in one process) must belong to a component of
`buffer_breakdown` and equal it, with the rotary caches in fp32 as on CUDA/HIP.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_step35.fp8 import QUANTIZATION_CONFIG
from sglang_step35.config import read_config
from sglang_step35.plan import make_plan
from sglang_step35.plan_hardware import GPUS
from sglang_step35.plan_memory import buffer_breakdown, weight_breakdown
import gpu_contract

KEEP = [0, 3, 43, 44]  # dense, MoE, the clamped MoE layers


def _reduced_config(cfg: dict) -> dict:
    n = cfg["num_hidden_layers"]
    idx = KEEP + list(range(n, n + int(cfg["num_nextn_predict_layers"])))
    out = dict(cfg)
    for k, v in cfg.items():
        if isinstance(v, list) and len(v) == len(cfg["layer_types"]):
            out[k] = [v[i] for i in idx]
    out["num_hidden_layers"] = len(KEEP)
    moe = {int(i) for i in cfg["moe_layers_enum"].split(",")}
    out["moe_layers_enum"] = ",".join(str(i) for i, o in enumerate(KEEP) if o in moe)
    return out


FLASH = read_config()
REDUCED = _reduced_config(FLASH)


def _planned():
    seen = {}
    for gpu, spec in GPUS.items():
        for n in (1, 2, 4, 8):
            for quant in ("bf16", "fp8"):
                for mtp in (0, 1, 3):
                    p = make_plan(gpu, n, quant, mtp=mtp, context=32768)
                    if p.feasible:
                        key = (spec.vendor, p.tp, p.ep, quant, mtp, p.moe_a2a_backend, tuple(sorted(p.env.items())))
                        seen.setdefault(key, p)
    return seen


PLANNED = _planned()


def test_the_matrix_covers_both_vendors_quantizations_and_mtp():
    keys = set(PLANNED)
    assert {k[0] for k in keys} == {"nvidia", "amd"}
    assert {k[3] for k in keys} == {"bf16", "fp8"}
    assert {k[4] for k in keys} == {0, 1, 3}
    assert {(k[1], k[3]) for k in keys} >= {(8, "fp8"), (4, "fp8"), (4, "bf16"), (8, "bf16")}


@pytest.fixture(scope="module")
def sglang_state():
    gpu_contract.sglang_world_of_one()


def _component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    if ".moe.experts." in name:
        return "routed_experts"
    if ".moe.share_expert." in name:
        return "shared_experts"
    if ".moe.gate." in name or name.endswith("moe.router_bias"):
        return "router"
    if "norm" in name:
        return "norms"
    raise AssertionError(f"parameter {name} belongs to no component of the memory plan")


def _buffer_component(name: str) -> str:
    if name.endswith(".rotary_emb.cos_sin_cache"):
        return "rope_cos_sin_cache"
    if name.endswith("norm.gemma_weight"):
        return "norm_weight_copies"
    raise AssertionError(f"buffer {name} belongs to no component of the memory plan")


def _buffer_bytes(model, mtp) -> dict[str, int]:
    """Bytes per buffer component over the rank's main model and MTP drafts; a buffer shared by
    several modules (one rotary cache per get_rope key) is allocated once and counted once."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for prefix, module in [("", model)] + [(f"mtp.{k}.", m) for k, m in enumerate(mtp)]:
        for name, b in module.named_buffers():
            if id(b) in seen:
                continue
            seen.add(id(b))
            c = _buffer_component(prefix + name)
            out[c] = out.get(c, 0) + b.numel() * b.element_size()
    return out


def _bytes_by_component(named_params) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in named_params:
        out[_component(name)] = out.get(_component(name), 0) + p.numel() * p.element_size()
    return out


def _build(plan, rank: int, monkeypatch, pp_rank: int = 0):
    """Our Step3p5ForCausalLM (+ one Step3p5MTP per draft step) as TP rank `rank` of pipeline stage
    `pp_rank` of `plan` builds it."""
    import dataclasses

    import sglang_step35.models.step3p5 as model_mod
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang_step35 import platform
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang_step35.config import Step35Config
    from sglang_step35.models.step3p5_mtp import Step3p5MTP

    # The node the plan targets, as the one platform probe would report it, with the plan's AITER switch.
    node = platform.for_arch(GPUS[plan.gpu].arch)
    monkeypatch.setattr(platform, "forced", dataclasses.replace(node, use_aiter=plan.env.get("SGLANG_USE_AITER") == "1"))
    # On a GPU the CPU-only dequantize fallback never applies: SGLang's Fp8Config stays active.
    import sglang_step35.models.quant_build as quant_build_mod

    monkeypatch.setattr(quant_build_mod, "cpu_dequant_fallback", lambda *a, **k: None)
    # Rotary caches as on CUDA/HIP: fp32 (SGLang casts them to the model dtype only on other
    # devices), built fresh for this rank (get_rope's process-wide cache starts empty in a server).
    import sglang.srt.layers.rotary_embedding.factory as rope_factory

    monkeypatch.setenv("SGLANG_ROPE_CACHE_FP32", "1")
    monkeypatch.setattr(rope_factory, "_ROPE_DICT", {})
    quant = Fp8Config.from_config(dict(QUANTIZATION_CONFIG)) if plan.quant == "fp8" else None
    cfg = Step35Config(**REDUCED)
    tp, ep = plan.tp, plan.ep
    # Group stand-ins carrying one rank's coordinates: SGLang's linears read rank and size from them.
    tp_group = SimpleNamespace(world_size=tp, rank_in_group=rank, ranks=list(range(tp)), unique_name="tp",
                               cpu_group=None, device_group=None)  # fmt: skip
    moe_tp = tp // ep
    moe_tp_group = SimpleNamespace(world_size=moe_tp, rank_in_group=rank % moe_tp, ranks=list(range(moe_tp)),
                                   unique_name="moe_tp", cpu_group=None, device_group=None)  # fmt: skip
    ep_group = SimpleNamespace(world_size=ep, rank_in_group=rank // moe_tp, ranks=list(range(ep)), unique_name="ep",
                               cpu_group=None, device_group=None)  # fmt: skip
    pp = plan.pp
    pp_group = SimpleNamespace(world_size=pp, rank_in_group=pp_rank, is_first_rank=pp_rank == 0,
                               is_last_rank=pp_rank == pp - 1, ranks=list(range(pp)), unique_name="pp",
                               cpu_group=None, device_group=None)  # fmt: skip
    server = dict(device="cpu", tp_size=tp, ep_size=ep, pp_size=pp)
    if plan.moe_a2a_backend:
        server["moe_a2a_backend"] = plan.moe_a2a_backend
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the server's --dtype auto for these checkpoints
    try:
        with get_context().override_server_args(**server), get_parallel().override(
            tp_group=tp_group, attn_tp_group=tp_group, moe_ep_group=ep_group, moe_tp_group=moe_tp_group,
            tp_rank=rank, attn_tp_rank=rank, moe_ep_rank=rank // moe_tp, moe_tp_rank=rank % moe_tp,
            **(dict(pp_group=pp_group, pp_rank=pp_rank, pp_size=pp) if pp > 1 else {}),
        ), torch.device("meta"):  # fmt: skip
            model = model_mod.Step3p5ForCausalLM(cfg, quant)
            mtp = [Step3p5MTP(cfg, quant, draft_model_idx=k) for k in range(plan.mtp)]
    finally:
        torch.set_default_dtype(old)
    return model, mtp


@pytest.mark.parametrize("key", sorted(PLANNED, key=str), ids=lambda k: "-".join(map(str, k[:5])))
def test_planned_command_constructs_with_the_planned_per_rank_shapes(sglang_state, key, monkeypatch):
    plan = PLANNED[key]
    expected = weight_breakdown(
        REDUCED, plan.quant, plan.tp, plan.ep, plan.mtp, shared_expert_replicated=plan.shared_expert_replicated
    )
    for rank in sorted({0, plan.tp - 1}):
        model, mtp = _build(plan, rank, monkeypatch)
        got = _bytes_by_component(model.named_parameters())
        for k, v in expected.items():
            if k != "mtp":
                assert got.get(k, 0) == v, f"{plan.gpu} x{plan.tp} {plan.quant} rank {rank}: {k} {got.get(k, 0)} != {v}"
        moe = [layer.moe for layer in model.model.layers if layer.is_moe]
        assert [m.layout.shared_expert_replicated for m in moe] == [plan.shared_expert_replicated] * len(moe)
        assert all(m.experts.num_local_experts == int(REDUCED["moe_num_experts"]) // plan.ep for m in moe)
        got_buffers = _buffer_bytes(model, mtp)
        assert got_buffers == buffer_breakdown(REDUCED, plan.mtp), f"{plan.gpu} x{plan.tp} rank {rank} buffers"
        assert plan.memory["buffers"] == buffer_breakdown(FLASH, plan.mtp)
        rope = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
        assert all(layer.self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32 for layer in model.model.layers)
        assert len(rope) == 2  # dense layer 0 and clamped 44 are full (64 dims), 3 and 43 sliding (128)
        mtp_bytes = sum(p.numel() * p.element_size() for m in mtp for p in m.parameters())
        if plan.quant == "bf16":
            assert mtp_bytes == expected["mtp"]
        else:
            assert 0 < mtp_bytes <= expected["mtp"] or plan.mtp == 0


def test_todays_a2a_command_is_what_the_old_planner_could_not_construct(sglang_state, monkeypatch):
    """The command the planner used to emit for 8x H200 FP8 (`--moe-a2a-backend deepep`) is refused
    by the launch guard, with the command that constructs (checked above) as the fix."""
    from sglang_step35.moe import guard_moe_layout

    cfg = dict(FLASH, quantization_config=dict(QUANTIZATION_CONFIG))
    d = guard_moe_layout({"tp_size": 8, "ep_size": 8, "moe_a2a_backend": "deepep"}, cfg, "cuda")
    assert d.action == "refuse" and "--tp 8 --ep 8" in d.message
    plan = make_plan("h200", 8, "fp8", mtp=3)
    assert plan.feasible and "--moe-a2a-backend" not in plan.command and plan.shared_expert_replicated
