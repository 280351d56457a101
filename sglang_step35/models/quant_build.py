"""What Step3p5ForCausalLM and Step3p5MTP build under a checkpoint's quantization config.

SGLang hands our model classes the quantization method its loader chose for the checkpoint. On a CPU
that method's kernels cannot run (every format but block FP8 on an AMX CPU), so the classes build
unquantized and the loader (models/weights.py) dequantizes with the format's Dequantizer; elsewhere
SGLang's method builds the layers, refused by name where a registered format says it cannot serve
the checkpoint, and SGLang's W8A8-INT8 ignore list is mapped to our module names first.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from sglang_step35 import fp8, quant

logger = logging.getLogger(__name__)


def cpu_dequant_fallback(quant_config, hf_config) -> Optional[dict]:
    """The checkpoint's quantization_config when the model must be built unquantized and the loader
    must dequantize (a registered format whose SGLang kernels cannot run here: on a CPU, any format
    but block FP8 on an AMX CPU); None otherwise (SGLang's quantization methods run as they are)."""
    if quant_config is None:
        return None
    from sglang_step35.platform import current_platform

    if current_platform().has_accelerator:
        return None
    qc = quant.checkpoint_quantization_config(hf_config)
    fmt = quant.format_for(qc)
    if fmt is None:
        return None  # not a checkpoint format of ours: SGLang's method, judged by the allow-list
    if fmt is fp8:
        from sglang.srt.utils import cpu_has_amx_support

        if cpu_has_amx_support():
            return None
    label = fmt.NAMES[0].upper()
    logger.warning(
        "%s checkpoint on a CPU (SGLang's kernels for it need a GPU%s): dequantizing %s weights at "
        "load; the model runs unquantized in the server dtype", label, " or AMX" if fmt is fp8 else "", label)
    return qc


def refuse_unservable_quant(quant_config, hf_config) -> None:
    """At construction, on the path where SGLang's quantization method runs (not the CPU dequant
    fallback): a registered format whose module names problems with the method SGLang chose
    (`quant.method_refusal`), or whose ignore list names single routed experts (`quant.single_expert_ignores`),
    is refused with them, before SGLang's own layers or the loader fail less clearly."""
    if quant_config is None:
        return
    from sglang_step35.platform import current_platform

    qc = quant.checkpoint_quantization_config(hf_config)
    if getattr(quant.format_for(qc), "ALLOW_LIST_BEFORE_LAYERS", False):
        # The quantization row for what SGLang's config will build (its parsed settings, e.g. AutoRound's
        # backend), before SGLang's own dense layers fail less clearly; the MoE layers ask it again.
        from sglang_step35 import served
        from sglang_step35.moe.quant import quant_spec_of

        served.check(served.Setting(current_platform().kind, quant=served.quant_label(quant_spec_of(quant_config)),
                                    quant_method=str(quant_config.get_name()).lower()), (served.QUANT,))
    found = [why for why in (quant.method_refusal(qc, str(quant_config.get_name()).lower(), current_platform().kind),
                             quant.single_expert_ignores(qc, hf_config)) if why]
    if found:
        from sglang_step35.config import Step35ConfigError

        raise Step35ConfigError("; ".join(w.replace(" checkpoint: ", " checkpoint cannot be served as built: ", 1)
                                          for w in found))


def quant_config_to_build(quant_config, hf_config) -> tuple[Optional[dict], Any]:
    """(the CPU dequant fallback's quantization_config or None, the quant config to build with): what
    Step3p5ForCausalLM and Step3p5MTP build — unquantized where the loader dequantizes, else SGLang's
    method, refused by name where it cannot serve the checkpoint."""
    cpu_dequant = cpu_dequant_fallback(quant_config, hf_config)
    if cpu_dequant is not None:
        quant_config = None
    refuse_unservable_quant(quant_config, hf_config)
    map_w8a8_int8_ignore(quant_config, hf_config)
    return cpu_dequant, quant_config


def map_w8a8_int8_ignore(quant_config, hf_config) -> None:
    """SGLang's loader hands each quantization config the class's ``hf_to_sglang_mapper``
    (``apply_weight_name_mapper``, models/step3p5.py) so that names a quantization_config writes as the
    checkpoint does match our module prefixes; ``CompressedTensorsConfig`` maps its ``ignore`` list
    with it, but SGLang 0.5.23's ``W8A8Int8Config`` (also the method of compressed-tensors INT8 served
    with ``--quantization w8a8_int8``) inherits the no-op, so an ignored
    ``model.layers.N.share_expert.*`` (ours: ``model.layers.N.moe.share_expert.*``) was built INT8 and
    its BF16 tensors refused. Map its list the way CompressedTensorsConfig maps its own (idempotent:
    the mapper keeps a name already in our form). A list that keeps a MoE layer's routed experts
    unquantized is refused by name: W8A8Int8Config hands an ignored FusedMoE a linear method, which
    fails in FusedMoE's create_weights with a TypeError."""
    from sglang.srt.layers.quantization.compressed_tensors.utils import should_ignore_layer
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config

    if not isinstance(quant_config, W8A8Int8Config) or not quant_config.ignore:
        return
    from sglang_step35.config import Step35ConfigError, moe_layer_ids
    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    quant_config.ignore = Step3p5ForCausalLM.hf_to_sglang_mapper.apply_list(list(quant_config.ignore))
    kept = sorted(i for i in moe_layer_ids(hf_config) if should_ignore_layer(
        f"model.layers.{i}.moe.experts", ignore=quant_config.ignore, fused_mapping=quant_config.packed_modules_mapping))
    if kept:
        raise Step35ConfigError(
            f"W8A8-INT8 checkpoint whose quantization_config.ignore keeps the routed experts of MoE layers {kept} "
            "unquantized: SGLang 0.5.23's W8A8Int8Config cannot build an ignored FusedMoE (it hands it a linear "
            "method); re-export with those experts quantized, or serve the BF16 checkpoint")


def quant_format_of(model: torch.nn.Module) -> tuple:
    """(format module, quantization_config) of the checkpoint `model` was built for with SGLang's
    quantization methods; (None, None) for BF16 or the CPU dequant fallback (built unquantized)."""
    if getattr(model, "cpu_dequant", None) or getattr(model, "quant_config", None) is None:
        return None, None
    qc = quant.checkpoint_quantization_config(model.config)
    return quant.format_for(qc), qc
