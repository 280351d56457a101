"""The allow-list rows (sglang_step35/served.py) of 4-bit integer experts: AWQ / GPTQ (SGLang's
``moe_wna16``, ``awq_marlin``, ``gptq_marlin``), compressed-tensors W4A16 and AutoRound's own config.

SGLang 0.5.23 runs these experts on one of two kernels: its Triton int4 fused MoE (MoeWNA16Method,
CompressedTensorsWNA16TritonMoE), which applies Step's clamp from ``gemm1_clamp_limit``, or Marlin's MoE,
which does not; which one depends on the method, the runner flag, the group size, zero points and, for
AutoRound, the config's backend. :data:`INT4_ROWS` sits in served.ROWS in table order (first match decides).
"""

from __future__ import annotations

from sglang_step35.served_setting import GPUS, PLATFORMS, QUANT, Row

_W4A16_SERVED = "tests/test_quant_w4a16_moe.py, tests/test_quant_w4a16_load.py"
_W4A16_REFUSED = "tests/test_quant_w4a16_load.py::test_int4_off_the_triton_path_is_refused_at_launch_and_construction"
_MARLIN_CLAMP = ("SGLang's Marlin MoE, which drops Step's clamp: it reads gemm1_clamp_limit only with GPT-OSS's "
                 "gemm1_alpha, else swiglu_limit, which Step's layers leave unset (moe_runner/marlin.py; "
                 "CompressedTensorsWNA16MoE.apply_weights passes swiglu_limit), and its own clamp is "
                 "silu(min(gate, L)) * clamp(up, ±L) (fused_marlin_moe.swiglu_limit_func), not Step's "
                 "min(silu(gate), L) * clamp(up, ±L)")
_W4A16_VARIANTS = ("tests/test_quant_w4a16_moe.py::test_sglangs_triton_w4a16_moe_takes_symmetric_unordered_groups_only, "
                   "tests/test_quant_w4a16_load.py::test_w4a16_variants_and_rocm_are_refused_by_name")
_W4A16_ROCM = "tests/test_quant_w4a16_load.py::test_w4a16_variants_and_rocm_are_refused_by_name"
# compressed-tensors W4A16 labels (served.quant_label) SGLang's Triton W4A16 MoE cannot take: zero points, act-order.
W4A16_OFF_TRITON = tuple(f"w4a16-g{g}{v}" for g in (128, 32) for v in ("-asym", "-actorder", "-asym-actorder"))
# compressed-tensors W4A16 with one scale per output row (strategy channel, group_size -1) or groups of 64,
# any symmetry / act-order: group sizes SGLang's Triton W4A16 MoE does not take.
W4A16_OTHER_GROUPS = tuple(f"w4a16-{g}{v}" for g in ("channel", "g64")
                           for v in ("", "-asym", "-actorder", "-asym-actorder"))
_W4A16_GROUPS = "tests/test_quant_w4a16_load.py::test_w4a16_channel_and_group_64_have_named_rows"
_W4A16_CPU_GROUPS = "tests/test_quant_w4a16.py::test_w4a16_channel_and_group_64_load_dequantized_on_a_cpu"
_W4A16_INSTEAD = ("serve a symmetric W4A16 export (groups of 128 or 32, no act-order) with --moe-runner-backend triton, "
                  "or an AWQ / GPTQ export with --quantization moe_wna16")
_AUTOROUND_REFUSED = ("tests/test_quant_autoround_load.py::"
                      "test_autoround_is_refused_on_gpus_with_the_route_that_serves_its_tensors")
_AUTOROUND_AWQ_TEST = "tests/test_quant_autoround_load.py::test_autoround_awq_kernels_follow_sglangs_autoround_config"
_AUTOROUND_GPTQ_INSTEAD = ("an auto_round:auto_gptq export stores GPTQ's tensors: rewrite its quantization_config as "
                           "GPTQ's (sglang_step35.quant.autoround.gptq_config) and add --quantization moe_wna16 "
                           "(SGLang's Triton int4 MoE)")


INT4_ROWS: tuple[Row, ...] = (
    # 4-bit weight-only experts: served where SGLang runs them on its Triton int4 fused MoE.
    Row(QUANT, ("int4",), ("nvidia",), True,
        "AWQ / GPTQ experts on SGLang's MoeWNA16Method: Triton int4 fused MoE (use_int4_w4a16, group scales, "
        "zero points), clamp from gemm1_clamp_limit", _W4A16_SERVED, when="moe_wna16"),
    Row(QUANT, ("int4", "int4-actorder"), ("amd",), False,
        "on ROCm: SGLang 0.5.23 refuses --quantization moe_wna16 there (configs/model_config.py: "
        "rocm_supported_quantization lacks it), and without it gptq is not a ROCm method either and plain awq "
        "builds no int4 MoE (AWQConfig has a MoE method on NPU only)",
        _W4A16_ROCM, "serve the BF16 or the block-FP8 (128x128) checkpoint"),
    Row(QUANT, ("int4-actorder",), ("nvidia",), False,
        "GPTQ with desc_act: SGLang takes --quantization moe_wna16 for GPTQ without act-order only (moe_wna16.py: "
        "is_moe_wna16_compatible; ModelConfig then raises the method mismatch), and gptq_marlin would run "
        f"{_MARLIN_CLAMP}", _W4A16_ROCM, "re-export GPTQ without desc_act (or AWQ) and add --quantization moe_wna16"),
    Row(QUANT, ("int4",), ("nvidia",), False,
        f"without --quantization moe_wna16 would run on {_MARLIN_CLAMP} (awq_marlin / gptq_marlin, SGLang's "
        "default on CUDA), or build no int4 MoE (plain awq / gptq)", _W4A16_REFUSED,
        "add --quantization moe_wna16 (SGLang's Triton int4 MoE)"),
    Row(QUANT, ("w4a16", "w4a16-g32"), ("nvidia",), True,
        "compressed-tensors W4A16 experts (symmetric, groups of 128 or 32, no act-order) on SGLang's "
        "CompressedTensorsWNA16TritonMoE: Triton int4 fused MoE (block_shape [0, group]), clamp from "
        "gemm1_clamp_limit", _W4A16_SERVED, when="triton-runner"),
    Row(QUANT, ("w4a16", "w4a16-g32"), ("nvidia",), False,
        f"with SGLang's auto runner would run on {_MARLIN_CLAMP} (CompressedTensorsWNA16MoE)", _W4A16_REFUSED,
        "add --moe-runner-backend triton"),
    Row(QUANT, W4A16_OFF_TRITON, ("nvidia",), False,
        "have zero points or act-order, which SGLang's Triton W4A16 MoE cannot take: under --moe-runner-backend "
        "triton get_moe_scheme raises (compressed_tensors.py: _is_wna16_triton_moe_supported; "
        "CompressedTensorsWNA16TritonMoE passes no zero points and sorts no g_idx), and the auto runner is "
        f"{_MARLIN_CLAMP}", _W4A16_VARIANTS, _W4A16_INSTEAD),
    Row(QUANT, W4A16_OTHER_GROUPS, ("nvidia",), False,
        "have one scale per output row (channel-wise) or groups of 64, which SGLang's Triton W4A16 MoE does not take "
        "(compressed_tensors.py: _is_wna16_triton_moe_supported accepts symmetric groups of 32 or 128 only): under "
        "--moe-runner-backend triton get_moe_scheme raises, and the auto runner (CompressedTensorsWNA16MoE) is "
        f"{_MARLIN_CLAMP}", _W4A16_GROUPS, _W4A16_INSTEAD),
    Row(QUANT, ("w4a16-channel", "w4a16-g64"), ("cpu",), True,
        "dequantized to the server dtype at load (sglang_step35/quant/w4a16.py reads the groups from weight_scale's "
        "shape: one per row, or per 64 inputs)", _W4A16_CPU_GROUPS),
    Row(QUANT, W4A16_OTHER_GROUPS, ("cpu",), False,
        "with zero points or act-order are not verified on a CPU: the dequantize-at-load path "
        "(sglang_step35/quant/w4a16.py) is tested channel-wise and with groups of 64 symmetric and unordered only",
        _W4A16_GROUPS, _W4A16_INSTEAD),
    Row(QUANT, ("w4a16", "w4a16-g32", *W4A16_OFF_TRITON, *W4A16_OTHER_GROUPS), ("amd",), False,
        "on ROCm: SGLang 0.5.23 builds compressed-tensors W4A16 dense linears (attention, shared expert, dense "
        "MLP) as CompressedTensorsWNA16, which runs Marlin (gptq_marlin_repack / gptq_marlin_gemm, imported only "
        "on CUDA: compressed_tensors_wNa16.py, marlin_utils.py); its experts get CompressedTensorsWNA16TritonMoE "
        "whatever the runner, without the CUDA check, so zero points and act-order would be dropped",
        _W4A16_VARIANTS, "serve the BF16 or the block-FP8 (128x128) checkpoint"),
    # AutoRound's own config (quant_method auto-round): SGLang's AutoRoundConfig picks the kernels per layer,
    # from packing_format, sym and the config's backend (labels: sglang_step35/quant/autoround.sglang_route).
    Row(QUANT, ("autoround",), GPUS, False,
        "(AutoRound's own config, quant_method auto-round) are built by SGLang's AutoRoundConfig, which on CUDA runs "
        f"them on GPTQ-Marlin's MoE (GPTQMarlinMoEMethod) wherever Marlin supports the layer, i.e. on {_MARLIN_CLAMP}; "
        "SGLang rejects --quantization moe_wna16 for quant_method auto-round (ModelConfig: not a compatible method); "
        "on ROCm (no Marlin) its experts would take MoeWNA16's Triton MoE but its dense int4 layers GPTQLinearMethod, "
        "whose kernel SGLang 0.5.23 removed (gptq/schemes/gptq_linear.py raises 'The non-Marlin GPTQ CUDA kernel has "
        "been removed'); a config backend that avoids Marlin (gptq, awq) is that same dead end on CUDA "
        "(autoround-gptq-nomarlin)",
        _AUTOROUND_REFUSED, _AUTOROUND_GPTQ_INSTEAD),
    Row(QUANT, ("autoround-gptq-nomarlin",), GPUS, False,
        "(AutoRound's GPTQ packing where SGLang's AutoRoundConfig does not pick Marlin: config backend gptq or awq, or "
        "zero points, sym false) would take MoeWNA16's Triton MoE for the experts, which applies Step's clamp, but "
        "GPTQLinearMethod for the dense int4 layers (attention, shared expert, dense MLP), whose kernel SGLang 0.5.23 "
        "removed: its construction raises 'The non-Marlin GPTQ CUDA kernel has been removed' "
        "(gptq/schemes/gptq_linear.py)", _AUTOROUND_REFUSED, _AUTOROUND_GPTQ_INSTEAD),
    Row(QUANT, ("autoround-awq",), ("nvidia",), False,
        "(AutoRound's AWQ packing with zero points, config backend auto / marlin / awq:marlin) are built by SGLang's "
        "AutoRoundConfig on AWQ-Marlin's MoE (AWQMoEMethod with AWQMarlinConfig) wherever Marlin supports the layer, "
        f"i.e. on {_MARLIN_CLAMP}",
        _AUTOROUND_AWQ_TEST, 'add "backend": "awq" to its quantization_config: AutoRoundConfig then builds the '
        "experts with MoeWNA16's Triton int4 MoE and the dense layers with AWQ's GEMM (served: autoround-awq-nomarlin)"),
    Row(QUANT, ("autoround-awq-nomarlin",), ("nvidia",), True,
        "AutoRound's AWQ packing with zero points and config backend awq: SGLang's AutoRoundConfig builds the experts "
        "with MoeWNA16Method (Triton int4 fused MoE, zero points, block_shape [0, group]; clamp from gemm1_clamp_limit) "
        "and the dense int4 layers with AWQLinearMethod (awq_dequantize + GEMM) — the methods --quantization "
        "moe_wna16 builds for an AWQ checkpoint",
        f"{_AUTOROUND_AWQ_TEST}, tests/test_quant_w4a16_moe.py"),
    Row(QUANT, ("autoround-awq-as-gptq",), GPUS, False,
        "(AutoRound's AWQ packing with a gptq config backend) would be read with GPTQ's layouts: SGLang's "
        "AutoRoundConfig.get_quant_method takes its GPTQ path whenever the backend names gptq, before it looks at "
        "the packing, and builds GPTQ's [K/8, N] qweight and g_idx parameters for AWQ's [K, N/8] tensors",
        _AUTOROUND_AWQ_TEST, 'set the quantization_config\'s "backend" to "awq"'),
    Row(QUANT, ("autoround-awq-sym",), PLATFORMS, False,
        "(AutoRound's AWQ packing without zero points, sym true) are unverified: SGLang's AutoRoundConfig builds "
        "MoeWNA16 experts that drop the stored qzeros (has_zp false: the kernel subtracts 8) and AWQ dense layers that "
        "read them (AWQ-Marlin has no type without zero points), and no tiny writes this export",
        _AUTOROUND_AWQ_TEST, "re-export with sym false (AutoRound's auto_awq default use) or the GPTQ packing"),
    Row(QUANT, ("autoround-awq", "autoround-awq-nomarlin"), ("amd",), False,
        "on ROCm are unverified: no test here runs SGLang's AutoRoundConfig AWQ methods on ROCm (Marlin's kernels are "
        "CUDA-only; off Marlin, MoeWNA16's Triton int4 MoE and AWQ's Triton dequantize), and SGLang itself refuses "
        "--quantization moe_wna16 there (configs/model_config.py)", _AUTOROUND_AWQ_TEST, "serve the BF16 or the block-FP8 (128x128) checkpoint"),
    Row(QUANT, ("autoround", "autoround-gptq-nomarlin", "autoround-awq", "autoround-awq-nomarlin",
                "autoround-awq-as-gptq"), ("cpu",), True,
        "dequantized to the server dtype at load by the packing's tensors, whatever the config's backend (SGLang's "
        "AutoRound CPU path needs AMX; sglang_step35/quant/autoround.py)",
        "tests/test_quant_served.py, tests/test_quant_autoround_load.py"),
    Row(QUANT, ("int4", "w4a16", "w4a16-g32"), ("cpu",), True,
        "dequantized to the server dtype at load (SGLang's int4 kernels need a GPU; sglang_step35/quant/w4a16.py)",
        "tests/test_quant_served.py, tests/test_quant_w4a16.py"),
)
