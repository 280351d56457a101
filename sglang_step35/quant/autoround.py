"""AutoRound INT4 Step-3.5 checkpoints in AutoRound's own config (``quant_method: auto-round``; pure torch).

Intel's AutoRound (arXiv 2309.05516) rounds weights to 4-bit integers with tuned rounding and exports
them in a GPTQ or AWQ packing, named by ``packing_format``: ``auto_round:auto_gptq`` (what its
``--format auto_round`` writes by default) stores exactly GPTQ's v1 tensors — ``X.qweight`` int32
[K/8, N], ``X.qzeros`` int32 [K/g, N/8] (zero point minus one), ``X.scales`` fp16 [K/g, N], ``X.g_idx``
[K] — and ``auto_round:auto_awq`` AutoAWQ's GEMM tensors (see `quant/w4a16.py`, whose packing,
writers and dequantizers this module reuses). The config differs from GPTQ's: ``quant_method:
"auto-round"``, ``bits``, ``group_size``, ``sym``, ``data_type: "int"``, ``packing_format``,
``block_name_to_quantize``, and ``extra_config``: per-module overrides keyed by checkpoint module name
(or a regular expression), where ``{"bits": 16, "data_type": "float"}`` keeps a module unquantized.

SGLang 0.5.23 reads this config with its own ``AutoRoundConfig`` (``get_name() == "auto-round"``,
layers/quantization/auto_round.py), which builds GPTQ's or AWQ's methods per module from bits /
group_size / sym (``get_layer_config``: exact ``extra_config`` names first, then regex keys, fused
q/k/v and gate/up through ``packed_modules_mapping``). On CUDA with the ``auto`` backend it picks
Marlin wherever Marlin supports the layer (GPTQMarlinMoEMethod experts, GPTQMarlinLinearMethod
linears), else MoeWNA16's Triton MoE; ``--quantization moe_wna16`` is rejected for an ``auto-round``
checkpoint (ModelConfig: not a compatible method). On a CPU it needs AMX.

Which kernels SGLang runs follows from ``packing_format``, ``sym`` and the config's ``backend`` (also
``sglang_backend`` / ``vllm_backend``; "auto" by default): :func:`sglang_route` names the case, the
allow-list label (sglang_step35/served.py decides each).

The tiny (``step35 tiny --quant autoround``) writes the GPTQ packing, symmetric, group 128; ``--quant
autoround-awq`` the AWQ packing with zero points (``sym: false``, what AutoRound's ``auto_awq`` export is
for), AutoAWQ's GEMM tensors (the AWQ tiny's writer). Both quantize what the GPTQ tiny quantizes (attention q/k/v/o, dense MLPs, shared and routed experts per expert); kept
unquantized through ``extra_config``: each main layer's ``g_proj`` and router ``moe.gate`` (by name,
as AutoRound lists the modules it skipped) and the MTP layers (one regular expression: quantizers
never see them).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from sglang_step35.quant import w4a16

NAMES = ("autoround", "autoround-awq")
# SGLang's methods for some routes fail in the dense layers (GPTQLinearMethod's removed kernel), built
# before any MoE layer asks the allow-list: the model asks the quantization row first
# (models/quant_build.refuse_unservable_quant).
ALLOW_LIST_BEFORE_LAYERS = True
_METHODS = ("auto-round", "auto_round")
_PACKINGS = {"auto_round:auto_gptq": "gptq", "auto_round:auto_awq": "awq"}
_DEFAULT_PACKING = "auto_round:auto_gptq"  # SGLang's AutoRoundConfig default too
_PACKING_OF_TINY = {"autoround": "auto_round:auto_gptq", "autoround-awq": "auto_round:auto_awq"}
# SGLang 0.5.23 marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES; its Marlin int4 types: GPTQ's uint4b8 without
# zero points, AWQ's uint4 with them (query_marlin_supported_quant_types), on sm80 and newer.
_MARLIN_GROUPS = (-1, 32, 64, 128)


def _packing(qc: dict) -> Optional[str]:
    return _PACKINGS.get(str(qc.get("packing_format") or _DEFAULT_PACKING).lower())


def matches(quantization_config: dict) -> bool:
    """AutoRound's own config: 4-bit integer weights in the GPTQ or AWQ packing."""
    qc = quantization_config
    return (str(qc.get("quant_method", "")).lower() in _METHODS and int(qc.get("bits") or 0) == w4a16.BITS
            and str(qc.get("data_type") or "int").lower() == "int" and _packing(qc) is not None)


def backend(quantization_config: dict) -> str:
    """The config's kernel choice as SGLang's AutoRoundConfig.from_config reads it."""
    qc = quantization_config
    return str(next((qc[k] for k in ("backend", "vllm_backend", "sglang_backend") if qc.get(k)), "auto")).lower()


def sglang_route(quantization_config: dict) -> str:
    """Which of SGLang 0.5.23's methods AutoRoundConfig builds a 4-bit checkpoint with on CUDA (sm80+),
    as its ``get_quant_method`` decides (layers/quantization/auto_round.py), named as the allow-list's
    label: its GPTQ path whenever ``packing_format`` *or* ``backend`` names gptq, else its AWQ path; on
    either, Marlin when the backend is auto or names marlin and Marlin has the type (GPTQ symmetric, AWQ
    with zero points) and group size, else MoeWNA16's Triton MoE for the experts and the path's
    non-Marlin linear method for the dense layers.
    - ``autoround``: GPTQ packing on GPTQ-Marlin (GPTQMarlinMoEMethod, GPTQMarlinLinearMethod);
    - ``autoround-gptq-nomarlin``: GPTQ packing off Marlin: MoeWNA16 experts, GPTQLinearMethod dense;
    - ``autoround-awq``: AWQ packing on AWQ-Marlin (AWQMoEMethod with AWQMarlinConfig);
    - ``autoround-awq-nomarlin``: AWQ packing with zero points off Marlin (backend awq): MoeWNA16
      experts, AWQLinearMethod dense — the methods ``--quantization moe_wna16`` builds for AWQ;
    - ``autoround-awq-sym``: symmetric AWQ packing (never Marlin: no AWQ type without zero points);
    - ``autoround-awq-as-gptq``: AWQ packing with a gptq backend, which SGLang reads with GPTQ's layouts."""
    qc = quantization_config
    packing, be = _packing(qc), backend(qc)
    sym, group = bool(qc.get("sym", True)), int(qc.get("group_size") or w4a16.GROUP_SIZE)
    marlin_backend = be == "auto" or "marlin" in be
    if "gptq" in str(qc.get("packing_format") or _DEFAULT_PACKING).lower() or "gptq" in be:
        if packing == "awq":
            return "autoround-awq-as-gptq"
        return "autoround" if marlin_backend and sym and group in _MARLIN_GROUPS else "autoround-gptq-nomarlin"
    if sym:
        return "autoround-awq-sym"
    return "autoround-awq" if marlin_backend and group in _MARLIN_GROUPS else "autoround-awq-nomarlin"


def equivalent_config(quantization_config: dict) -> dict:
    """The GPTQ / AWQ quantization_config describing the same tensors (what `w4a16.Dequantizer`
    reads): the packing's method with the checkpoint's bits, group_size and symmetry."""
    qc = quantization_config
    group, sym = int(qc.get("group_size") or w4a16.GROUP_SIZE), bool(qc.get("sym", True))
    if _packing(qc) == "awq":
        return {"quant_method": "awq", "bits": w4a16.BITS, "group_size": group, "zero_point": not sym, "version": "gemm"}
    return {"quant_method": "gptq", "bits": w4a16.BITS, "group_size": group, "sym": sym, "desc_act": False,
            "checkpoint_format": "gptq"}


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:
    """Shape of checkpoint tensor `<module>.<leaf>` (GPTQ's / AWQ's for the global group size)."""
    return w4a16.checkpoint_shape(leaf, bf16_shape, equivalent_config(quantization_config))


class Dequantizer(w4a16.Dequantizer):
    """CPU path: the packing's GPTQ / AWQ dequantizer. ``extra_config`` may give a module its own
    group size, so the global one is not enforced (each weight's scales give its groups)."""

    def __init__(self, quantization_config: dict, **_: Any):
        qc = dict(quantization_config or {})
        if not matches(qc):
            raise ValueError(f"not an AutoRound 4-bit GPTQ/AWQ-packed quantization_config: {qc!r}")
        super().__init__(equivalent_config(qc))
        if any(isinstance(v, dict) and "group_size" in v for v in (qc.get("extra_config") or {}).values()):
            self.group_size = None


# ------------------------------------------------------------------------------------------------
# Writing tiny checkpoints
# ------------------------------------------------------------------------------------------------
def quantization_config(cfg: dict, group: int = w4a16.GROUP_SIZE, name: str = "autoround") -> dict:
    """config.json `quantization_config` of an AutoRound export: ``auto_round:auto_gptq`` symmetric
    (``autoround``) or ``auto_round:auto_awq`` with zero points (``autoround-awq``)."""
    n, m = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers") or 0)
    keep = {"bits": 16, "data_type": "float"}
    extra = {f"model.layers.{i}.{mod}": dict(keep) for i in range(n) for mod in ("self_attn.g_proj", "moe.gate")
             if not _dense_layer(cfg, i) or mod == "self_attn.g_proj"}
    if m:
        extra[rf"model\.layers\.({'|'.join(str(i) for i in range(n, n + m))})\..*"] = dict(keep)
    return {"quant_method": "auto-round", "packing_format": _PACKING_OF_TINY[name], "bits": w4a16.BITS,
            "group_size": group, "sym": name == "autoround", "data_type": "int", "iters": 200, "nsamples": 128, "seqlen": 2048,
            "batch_size": 8, "lr": 0.005, "minmax_lr": 0.005, "low_gpu_mem_usage": False,
            "autoround_version": "0.5.1", "block_name_to_quantize": "model.layers", "extra_config": extra}


def _dense_layer(cfg: dict, i: int) -> bool:
    """Whether decoder layer `i` has a dense MLP (no router): Step-3.5's first layers and the
    config's moe_layers_enum say which are MoE."""
    enum = cfg.get("moe_layers_enum")
    moe = {int(x) for x in str(enum).split(",")} if enum else set(range(int(cfg.get("first_k_dense_replace", 0) or 0),
                                                                          int(cfg["num_hidden_layers"])))
    return i not in moe


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:
    """BF16 Step-3.5 tensors -> the AutoRound export: GPTQ's (``autoround``) or AWQ's (``autoround-awq``)
    tensors (the GPTQ / AWQ tiny's writer, which keeps g_proj, routers and MTP layers BF16) under
    AutoRound's config."""
    if name not in NAMES:
        raise ValueError(f"AutoRound format: unknown name {name!r}; use one of {NAMES}")
    tensors, _ = w4a16.write_checkpoint_tensors(weights, cfg, _packing({"packing_format": _PACKING_OF_TINY[name]}))
    return tensors, {"quantization_config": quantization_config(cfg, name=name)}


def _is_regex(key: str) -> bool:
    """SGLang's AutoRoundConfig reads an extra_config key as a regular expression when it holds one of these."""
    return any(c in key for c in r"*+?^$()[]{}|\\")


def gptq_config(quantization_config: dict) -> dict:
    """The GPTQ quantization_config that describes the same ``auto_round:auto_gptq`` tensors, for
    serving on GPUs with ``--quantization moe_wna16`` (MoeWNA16's Triton MoE applies Step's clamp;
    SGLang rejects that flag for quant_method auto-round). extra_config's unquantized modules become
    GPTQModel ``dynamic`` "-:" rules (exact names anchored, regular expressions matched whole, as
    AutoRound's fullmatch). ValueError for what GPTQ's config cannot say here (AWQ packing, a module
    quantized with other bits / group size than the rest)."""
    qc = dict(quantization_config)
    if not matches(qc) or _packing(qc) != "gptq":
        raise ValueError(f"not an auto_round:auto_gptq 4-bit checkpoint: {qc.get('packing_format')!r}")
    base = equivalent_config(qc)
    dynamic = {}
    for key, over in (qc.get("extra_config") or {}).items():
        if int(over.get("bits", 16)) < 16:
            if (int(over["bits"]), over.get("group_size", base["group_size"]), over.get("sym", base["sym"])) != (
                    base["bits"], base["group_size"], base["sym"]):
                raise ValueError(f"extra_config[{key!r}] = {over!r}: a module quantized unlike the rest")
            continue
        dynamic["-:" + (f"^(?:{key})$" if _is_regex(key) else f"^{re.escape(key)}$")] = {}
    return {**base, "lm_head": False, "true_sequential": True, "dynamic": dynamic}
