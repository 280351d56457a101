"""What sglang-step35 serves: the allow-list of combinations, in one home (a data table + lookups).

A combination is the platform (``nvidia`` / ``amd`` / ``cpu``) and the values of the settings that
change what computes Step-3.5's MoE: ``--moe-runner-backend``, ``--moe-a2a-backend``, the
quantization (with ``SGLANG_USE_AITER``) and expert-parallel load balancing
(``--ep-num-redundant-experts``, ``--enable-eplb``, ``--init-expert-location``). Each :class:`Row`
names values and the platforms it covers and is either *served* (with what computes Step's sigmoid
router and SwiGLU clamp there, and the test that verifies it through its contract) or *refused*
(what would go wrong, and what to use instead). The first row that matches decides; a value no row
serves is refused by name (allow-list: a value SGLang adds later is refused until a row serves it).

Who asks it, so a refusal happens wherever a model can be started:
- the launch policy: :func:`sglang_step35.moe.policy.guard_moe_layout` (``launch.apply_server_policy``
  calls it before SGLang resolves its arguments) takes :func:`refusals` of the user's flags;
- model construction (``Engine(...)``, anything else that skips the CLI, and values SGLang resolved
  itself, e.g. ``auto`` -> ``deep_gemm`` under ``--moe-a2a-backend pplx``): ``Step35MoE`` builds each
  layer through :func:`sglang_step35.moe.policy.routed_plan`, which raises :class:`NotServedError`
  from :func:`refusals` of SGLang's runtime values;
- ``step35 plan`` (:func:`sglang_step35.plan.make_plan`) for every command it emits.

The other axes of a served combination have their own homes, which the rendered table in
docs/correctness.md reads rather than restates (``scripts/gen_served_docs.py``): attention backends
per phase (prefill, decode, draft) in :mod:`sglang_step35.attention.select` and
:mod:`sglang_step35.attention.window`, pipeline parallelism and MTP in
:mod:`sglang_step35.launch.parallel_guard` and :mod:`sglang_step35.mtp_check`.
"""

from __future__ import annotations

from typing import Any, Optional

from sglang_step35.served_setting import (  # noqa: F401 - the allow-list's vocabulary, re-exported
    PLATFORMS,
    GPUS,
    RUNNER,
    A2A,
    QUANT,
    REDUNDANT,
    EPLB,
    INIT_LOCATION,
    FLAGS,
    NotServedError,
    Setting,
    Condition,
    CONDITIONS,
    Row,
)
from sglang_step35.served_int4 import INT4_ROWS, W4A16_OFF_TRITON, W4A16_OTHER_GROUPS  # noqa: F401 - re-exported

_CONTRACT = "tests/test_moe_gpu_contract.py"
_SERVED_RUNNERS = "tests/test_served_moe.py::test_served_runner_backend_routes_with_step_router_and_clamp"
_REFUSED_RUNNERS = "tests/test_served_moe.py::test_refused_runner_backend_is_refused_at_launch_and_construction"
_AUTO = "use --moe-runner-backend auto (or triton on GPUs), which SGLang's Triton runner serves with Step's clamp"
_NO_A2A = ("drop --moe-a2a-backend: SGLang's standard dispatcher serves every layout, the shared expert replicated "
           "where TP would cut its quantization blocks")
_FP4_REFUSED = "tests/test_quant_fp4_load.py::test_fp4_experts_are_refused_on_gpus_by_name"
_FP4_INSTEAD = "serve the BF16 or the block-FP8 (128x128, Step-3.5-Flash-FP8) checkpoint"
_CT_NVFP4_REFUSED = "tests/test_quant_nvfp4_ct_load.py::test_nvfp4_ct_is_refused_on_gpus_by_name_and_served_on_cpu"
_UNVERIFIED_KERNEL = "unverified with Step's sigmoid + bias router and min(silu(gate), L) * clamp(up, ±L) clamp"
_EPLB_REFUSED = "tests/test_served_moe.py::test_eplb_is_refused_at_launch_and_construction"


def _default_only(flag: str, default: str, meaning: str, other: str, why: str, instead: str) -> tuple[Row, Row]:
    """The rows of a flag served at its default value only, on every platform: the default (verified
    through the MoE contract) and the refusal of ``other`` (every other value, pinned by one test)."""
    return (Row(flag, (default,), PLATFORMS, True, meaning, _CONTRACT),
            Row(flag, (other,), PLATFORMS, False, why, _EPLB_REFUSED, instead))


ROWS: tuple[Row, ...] = (
    # --- --moe-runner-backend: every value SGLang 0.5.23 accepts has a row (tests/test_served_moe.py) ---
    Row(RUNNER, ("auto",), ("nvidia",), True,
        "SGLang's Triton fused MoE on every layer (clamp from gemm1_clamp_limit); TopK bound to the STANDARD "
        "format calls our sigmoid + bias router (custom_routing_function)",
        f"{_CONTRACT}::test_sglang_triton_fused_moe_matches_reference"),
    Row(RUNNER, ("auto",), ("amd",), True,
        "AITER's MoE on unclamped layers with SGLANG_USE_AITER=1, SGLang's Triton runner on clamped ones "
        "(moe/runner.py ClampHonouring*); our router",
        f"{_CONTRACT}::test_aiter_keeps_clamped_layers_on_triton_in_triton_layout"),
    Row(RUNNER, ("auto",), ("cpu",), True,
        "SGLang's CPU MoE on unclamped layers, our expert loop on clamped ones and under EP; our router",
        "tests/test_parity_served.py"),
    Row(RUNNER, ("triton",), GPUS, True,
        "SGLang's Triton fused MoE on every layer, AITER off for the MoE (clamp from gemm1_clamp_limit); our router",
        _SERVED_RUNNERS),
    Row(RUNNER, ("triton",), ("cpu",), False,
        "on a CPU: SGLang's CPU engine has no Triton MoE; only auto is verified there (SGLang's CPU MoE and our "
        "expert loop on the clamped layers)",
        _REFUSED_RUNNERS, "use --moe-runner-backend auto"),
    Row(RUNNER, ("triton_kernel",), PLATFORMS, False,
        "binds SGLang's TopK to the TRITON_KERNEL output format, which routes with softmax top-k on the raw "
        "logits (layers/moe/topk.py) and never calls Step's sigmoid + bias router, and its runner passes the "
        "clamp only with expert biases: every MoE layer would get the wrong experts",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("deep_gemm",), PLATFORMS, False,
        "runs the experts on DeepGEMM, which drops gemm1_clamp_limit: its swiglu_limit is DeepSeek-V4's "
        "silu(min(gate, L)) * clamp(up, ±L) (silu_and_mul_masked_post_quant.cuh), not Step's "
        "min(silu(gate), L) * clamp(up, ±L)",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("aiter",), PLATFORMS, False,
        "makes SGLang raise in the scheduler, not fall back to Triton, on every layer AITER's CK MoE cannot run "
        "(the SwiGLU-clamped layers; N per GPU not a multiple of 128), and does nothing without SGLANG_USE_AITER=1",
        _REFUSED_RUNNERS,
        "use --moe-runner-backend auto: with SGLANG_USE_AITER=1 on ROCm it runs AITER's MoE on every layer AITER "
        "computes exactly and SGLang's Triton runner on the clamped ones"),
    Row(RUNNER, ("flashinfer_trtllm", "experimental_sgl_trtllm", "flashinfer_trtllm_routed"), PLATFORMS, False,
        "FlashInfer TRT-LLM MoE may bypass TopK to route itself (_can_bypass_trtllm_routing) and keeps its own "
        f"[up, gate] weight layout: {_UNVERIFIED_KERNEL}",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("flashinfer_cutlass",), PLATFORMS, False,
        "FlashInfer CUTLASS MoE loads W13 as [up, gate] and takes its own swiglu alpha/beta/limit "
        f"(_cutlass_swiglu_params): {_UNVERIFIED_KERNEL}",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("cutlass", "marlin", "experimental_sgl_marlin", "humming", "hpc_ops", "flashinfer_mxfp4",
                 "flashinfer_cutedsl", "flashinfer_megamoe", "megamoe"), PLATFORMS, False,
        "kernels for quantization formats Step-3.5's checkpoints do not ship (FP4, MXFP8, int4 repacks, "
        f"Hopper-only FP8), or megamoe's dispatch: {_UNVERIFIED_KERNEL}",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("lora_triton", "lora_cutedsl", "lora_marlin"), PLATFORMS, False,
        "LoRA MoE runners: sglang-step35 serves no LoRA adapters on Step-3.5's experts",
        _REFUSED_RUNNERS, _AUTO),
    Row(RUNNER, ("ascend", "intel_xpu"), PLATFORMS, False,
        "Ascend NPU / Intel XPU runners: sglang-step35 serves NVIDIA, AMD and CPU only",
        _REFUSED_RUNNERS, _AUTO),
    # --- --moe-a2a-backend ---
    Row(A2A, ("none",), PLATFORMS, True,
        "SGLang's standard dispatcher: every rank routes every token with our router; one TP all-reduce "
        "(shared expert replicated where TP would cut its quantization blocks)",
        f"{_CONTRACT}, tests/test_plan_constructs.py"),
    Row(A2A, ("deepep", "mori"), ("cpu",), False,
        "needs GPUs (SGLang's all-to-all dispatchers are CUDA/ROCm only)",
        "tests/test_moe_placement.py::test_guard_refuses_what_our_class_cannot_serve",
        "drop --moe-a2a-backend"),
    Row(A2A, ("mori",), ("nvidia",), False, "does not run on nvidia GPUs",
        "tests/test_moe_placement.py::test_guard_refuses_what_our_class_cannot_serve", "use deepep"),
    Row(A2A, ("deepep",), ("amd",), False, "does not run on amd GPUs",
        "tests/test_served_moe.py::test_a2a_rows", "use mori"),
    Row(A2A, ("deepep",), ("nvidia",), False,
        "with {quant} experts would run the SwiGLU-clamped layers {layers} on DeepGEMM, which drops "
        "gemm1_clamp_limit and applies DeepSeek-V4's silu(min(gate, L)) instead of Step's min(silu(gate), L)",
        "tests/test_moe_placement.py::test_guard_refuses_all_to_all_on_clamped_layers_with_the_command_to_use",
        _NO_A2A, when="clamped"),
    Row(A2A, ("mori",), ("amd",), False,
        "with {quant} experts would run the SwiGLU-clamped layers {layers} on AITER's MoE, which has no "
        "clamped SwiGLU (and our Triton fallback is unverified under mori)",
        "tests/test_moe_placement.py::test_guard_refuses_all_to_all_on_clamped_layers_with_the_command_to_use",
        _NO_A2A, when="clamped"),
    Row(A2A, ("deepep",), ("nvidia",), True,
        "each attention-TP rank routes its token slice with our router, the combine completes it (no "
        "all-reduce), shared expert replicated (checkpoints without clamped layers)",
        "tests/test_moe_a2a.py"),
    Row(A2A, ("mori",), ("amd",), True,
        "as deepep, on ROCm (checkpoints without clamped layers)", "tests/test_moe_a2a.py"),
    # --- quantization (the checkpoint's quantization_config, or --quantization) ---
    Row(QUANT, ("fp8-per-tensor",), ("amd",), False,
        "experts on the SwiGLU-clamped Step-3.5 layers {layers} under SGLANG_USE_AITER=1: AITER's FP8 MoE drops "
        "the clamp and only block-FP8 layers have a per-layer Triton fallback",
        "tests/test_moe_placement.py::test_guard_reads_fp8_from_the_checkpoint_config",
        "serve the block-FP8 (128x128) or BF16 checkpoint, or set SGLANG_USE_AITER=0", when="aiter+clamped"),
    Row(QUANT, ("bf16",), PLATFORMS, True, "unquantized experts", f"{_CONTRACT}, tests/test_parity_served.py"),
    Row(QUANT, ("fp8-block",), GPUS, True,
        "SGLang's Fp8MoEMethod with its 128x128 block scales; clamp from gemm1_clamp_limit on Triton",
        "tests/test_fp8_moe_gpu_contract.py, tests/test_fp8_moe_aiter_contract.py"),
    Row(QUANT, ("fp8-block",), ("cpu",), True, "dequantized to the server dtype at load (no AMX FP8 kernels)",
        "tests/test_weights_loading.py, tests/test_fp8_dequant.py"),
    Row(QUANT, ("w8a8-int8",), ("nvidia",), True,
        "SGLang's W8A8Int8MoEMethod: Triton INT8 fused MoE (per-channel weight, per-token activation scales), "
        "clamp from gemm1_clamp_limit; compressed-tensors INT8 checkpoints with --quantization w8a8_int8",
        "tests/test_quant_int8_moe.py, tests/test_quant_int8_load.py"),
    Row(QUANT, ("w8a8-int8",), ("amd",), False,
        "SGLang 0.5.23's W8A8Int8LinearMethod imports sgl_kernel's int8_scaled_mm only on CUDA "
        "(w8a8_int8.py), so the dense INT8 linears (attention, shared expert) cannot run on ROCm",
        "tests/test_quant_int8_load.py::test_int8_is_refused_on_rocm_by_name",
        "serve the BF16 or the block-FP8 (128x128) checkpoint"),
    Row(QUANT, ("w8a8-int8",), ("cpu",), True,
        "dequantized to the server dtype at load (SGLang's INT8 kernels need AMX, Arm64 or a GPU; sglang_step35/quant)",
        "tests/test_quant_served.py, tests/test_quant_formats.py"),
    Row(QUANT, ("fp8-per-tensor",), PLATFORMS, False,
        "no test verifies Step's router and SwiGLU clamp through SGLang's per-tensor Fp8MoEMethod (online "
        "`--quantization fp8` of BF16 weights) with our layers (issue #25)",
        "tests/test_served_moe.py::test_unverified_quantizations_are_refused_at_launch_and_construction",
        "serve the BF16 or the block-FP8 (128x128, Step-3.5-Flash-FP8) checkpoint without --quantization"),
    # 4-bit integer experts (AWQ, GPTQ, compressed-tensors W4A16, AutoRound): sglang_step35/served_int4.py.
    *INT4_ROWS,
    # FP4 experts: SGLang 0.5.23 has CUDA / CK kernels only (read from its code, issue #25).
    Row(QUANT, ("nvfp4",), ("nvidia",), False,
        "on the SwiGLU-clamped layers {layers}: SGLang's ModelOpt NVFP4 MoE would drop or change Step's "
        "min(silu(gate), L) * clamp(up, ±L) on every kernel it has — Marlin (auto on sm80-sm90) passes a clamp only "
        "with a GPT-OSS gemm1_alpha (moe_runner/marlin.py), FlashInfer TRT-LLM (auto on Blackwell) and CUTLASS clamp "
        "the raw gate before silu (GPT-OSS style), CuTe DSL has no clamp",
        _FP4_REFUSED, _FP4_INSTEAD, when="clamped"),
    Row(QUANT, ("mxfp4",), ("amd",), False,
        "on the SwiGLU-clamped layers {layers}: SGLang's Quark MXFP4 MoE runs only on AITER, which gets "
        "swiglu_limit 0 for Step's clamp (aiter_swiglu_oai_limit takes only GPT-OSS's gemm1_alpha), and our "
        "per-layer Triton fallback cannot run MXFP4 weights",
        _FP4_REFUSED, _FP4_INSTEAD, when="clamped"),
    Row(QUANT, ("nvfp4", "mxfp4"), GPUS, False,
        "run on SGLang's CUDA / CK FP4 kernels only (ModelOpt NVFP4: Marlin, FlashInfer; Quark MXFP4: AITER, "
        "ROCm only), which no test here verifies with Step's sigmoid + bias router",
        _FP4_REFUSED, _FP4_INSTEAD),
    # compressed-tensors NVFP4 (LLM Compressor): SGLang's CompressedTensorsConfig picks other kernels than ModelOpt's.
    Row(QUANT, ("nvfp4-ct",), ("nvidia",), False,
        "on the SwiGLU-clamped layers {layers}: SGLang's compressed-tensors NVFP4 MoE would drop or change Step's "
        "min(silu(gate), L) * clamp(up, ±L) on every kernel it has — below sm100 CompressedTensorsW4A16Nvfp4MoE runs "
        "FP4 Marlin (MoeRunner MARLIN, which passes a clamp only with a GPT-OSS gemm1_alpha: moe_runner/marlin.py), on "
        "sm100 CompressedTensorsW4A4Nvfp4MoE runs FlashInfer CUTLASS (clamps the raw gate before silu, GPT-OSS style: "
        "materialize_swiglu_params_for_cutlass) or TRT-LLM (its own routing and [up, gate] layout)",
        _CT_NVFP4_REFUSED, _FP4_INSTEAD, when="clamped"),
    Row(QUANT, ("nvfp4-ct",), GPUS, False,
        "run on SGLang's CUDA FP4 kernels only (compressed-tensors NVFP4: FP4 Marlin, FlashInfer CUTLASS / TRT-LLM), "
        "which no test here verifies with Step's sigmoid + bias router",
        _CT_NVFP4_REFUSED, _FP4_INSTEAD),
    Row(QUANT, ("nvfp4-ct",), ("cpu",), True,
        "dequantized to the server dtype at load (SGLang's FP4 kernels need a GPU; sglang_step35/quant/nvfp4_ct.py)",
        "tests/test_quant_served.py, tests/test_quant_nvfp4_ct_load.py"),
    Row(QUANT, ("nvfp4",), ("cpu",), True,
        "dequantized to the server dtype at load (SGLang's FP4 kernels need a GPU; sglang_step35/quant)",
        "tests/test_quant_served.py, tests/test_quant_fp4_load.py"),
    Row(QUANT, ("mxfp4",), ("cpu",), True,
        "dequantized to the server dtype at load (SGLang's FP4 kernels need a GPU; sglang_step35/quant/mxfp4.py)",
        "tests/test_quant_served.py, tests/test_quant_fp4_load.py"),
    # --- expert-parallel load balancing: each flag served at its default only ---
    *_default_only(REDUNDANT, "0", "one physical slot per logical expert", "N > 0",
                   "our FusedMoE holds the config's logical experts only, while SGLang's dispatcher addresses "
                   "moe_num_experts + N physical slots (the built-in class builds that many)",
                   "drop --ep-num-redundant-experts (0)"),
    *_default_only(EPLB, "off", "experts stay where they were loaded", "on",
                   "SGLang's rebalancer moves expert weights through model.routed_experts_weights_of_layer "
                   "(eplb/eplb_manager.py), which Step3p5ForCausalLM does not provide, and needs redundant slots "
                   "it lacks",
                   "drop --enable-eplb"),
    *_default_only(INIT_LOCATION, "trivial", "logical expert e in physical slot e", "a file or json",
                   "remaps routed experts to other physical slots, which our MoE block and its CPU expert loop do "
                   "not follow (verified only with the trivial layout)",
                   "drop --init-expert-location (trivial)"),
)


def serving_flags(quant_label_: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(Setting fields, `sglang serve` words) a format needs to be served, for `step35 plan`'s
    commands: the launch flag its served row requires (its ``when``), read from :data:`ROWS` so a
    new served row brings its flag along; none for most. SGLang's defaults run the int4 formats on
    Marlin, which changes Step's clamp (the refused rows)."""
    for row in ROWS:
        if row.flag == QUANT and row.served and quant_label_ in row.values and row.when:
            cond = CONDITIONS[row.when]
            if cond.words:
                return dict(cond.fields), cond.words
    return {}, ()


def quant_label(quant: Any) -> str:
    """'bf16' | 'fp8-block' | 'fp8-per-tensor' | 'int4' | 'nvfp4' | 'mxfp4' (...) from anything moe.quant.parse_quant reads."""
    from sglang_step35.moe.quant import parse_quant

    q = parse_quant(quant)
    if q.name == "fp8":
        return "fp8-block" if q.block else "fp8-per-tensor"
    if q.name == "w4a16" and (q.group_size != 128 or q.zero_bits or q.act_order):
        # SGLang picks its W4A16 MoE kernel by group size, zero points and act-order
        # (compressed_tensors.py: _is_wna16_triton_moe_supported): one label for all let a checkpoint
        # its Triton MoE cannot take through the served symmetric group-128 row.
        group = "channel" if q.per_channel else f"g{q.group_size}"
        return f"w4a16-{group}" + ("-asym" if q.zero_bits else "") + ("-actorder" if q.act_order else "")
    if q.name == "int4" and q.act_order:
        return "int4-actorder"  # GPTQ desc_act: SGLang's MoeWNA16 takes GPTQ without act-order only
    return q.name


def match(flag: str, setting: Setting) -> Optional[Row]:
    """The row that decides ``flag`` for ``setting`` (None: no row, i.e. refused)."""
    value = setting.value(flag)
    for row in ROWS:
        if row.flag == flag and value in row.values and setting.platform in row.platforms:
            if row.when is None or CONDITIONS[row.when].holds(setting):
                return row
    return None


def served_values(flag: str, platform: str) -> list[str]:
    """Values of ``flag`` some row serves on ``platform`` (conditions aside), in table order."""
    out: list[str] = []
    for row in ROWS:
        if row.flag == flag and row.served and platform in row.platforms:
            out += [v for v in row.values if v not in out]
    return out


def refusal(flag: str, setting: Setting) -> Optional[str]:
    """Why ``setting``'s value of ``flag`` is not served (a message that starts with the flag and
    says what to use instead), or None when it is served."""
    row = match(flag, setting)
    if row is not None and row.served:
        return None
    head = f"{setting.quant} experts" if flag == QUANT else f"{flag} {setting.shown(flag)}"
    if row is None:
        served = ", ".join(served_values(flag, setting.platform)) or "none"
        return f"{head} is not supported by sglang-step35 on {setting.platform} (served there: {served})"
    note = row.note.format(layers=", ".join(map(str, setting.clamped_layers)), quant=setting.quant)
    return f"{head} {note}" + (f" ({row.instead})" if row.instead else "")


def refusals(setting: Setting, flags: tuple[str, ...] = FLAGS) -> list[str]:
    """Every refusal of ``setting`` (empty: served), in the order of ``flags``."""
    return [why for why in (refusal(f, setting) for f in flags) if why]


def check(setting: Setting, flags: tuple[str, ...] = FLAGS) -> None:
    """Raise :class:`NotServedError` naming every setting outside the allow-list."""
    found = refusals(setting, flags)
    if found:
        raise NotServedError("; ".join(found))


def sglang_moe_runner_backends() -> list[str]:
    """Every ``--moe-runner-backend`` value SGLang accepts: its CLI choices and its MoeRunnerBackend enum."""
    from sglang.srt.arg_groups.choices import MOE_RUNNER_BACKEND_CHOICES
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    return sorted(set(MOE_RUNNER_BACKEND_CHOICES) | {b.value for b in MoeRunnerBackend})


def sglang_moe_a2a_backends() -> list[str]:
    """Every ``--moe-a2a-backend`` value SGLang's MoeA2ABackend enum knows."""
    from sglang.srt.layers.moe.utils import MoeA2ABackend

    return sorted(b.value for b in MoeA2ABackend)


def check_draft_attention(server_args: Any, cfg: Any, platform: Any = None) -> None:
    """Refuse, at launch, a ``--speculative-draft-attention-backend`` under which the MTP draft's
    sliding layers would not see exactly ``sliding_window`` keys. The draft builds its layers for that
    backend (``attention.window.configured_backends(draft=True)``), so the rule is the one the target's
    backends pass (:func:`sglang_step35.attention.window.radix_sliding_window_size`); without this the
    draft's construction would fail in the scheduler instead of the launcher. ``platform``: the
    launcher's :class:`~sglang_step35.platform.Platform` (None: CPU), for the alternatives."""
    from sglang_step35.attention.select import NO_WINDOW, window_capable_backends
    from sglang_step35.platform import Platform
    from sglang_step35.attention.window import radix_sliding_window_size
    from sglang_step35.config import SLIDING, cfg_get

    backend = getattr(server_args, "speculative_draft_attention_backend", None)
    if not backend or not getattr(server_args, "speculative_algorithm", None):
        return
    draft_layers = list(cfg_get(cfg, "layer_types") or [])[int(cfg_get(cfg, "num_hidden_layers")):]
    if SLIDING not in draft_layers:
        return
    try:
        radix_sliding_window_size(backend, 2)
    except ValueError:
        why = NO_WINDOW.get(backend, "not known to apply sliding windows in SGLang 0.5.23")
        raise ValueError(
            f"--speculative-draft-attention-backend {backend} cannot serve the sliding-window layers of "
            f"Step-3.5's MTP draft ({why}); drop the flag (the draft then uses the target's backend) or use "
            f"one that applies the window: {', '.join(window_capable_backends(platform or Platform('cpu')))}"
        ) from None
