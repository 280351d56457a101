"""Tiny Step-3.5 checkpoints: config + safetensors in the real layout + a locally built tokenizer.

Every architectural feature of Step-3.5-Flash is present at toy size, so each code path of the real
model runs on a laptop: full and sliding layers in the 3:1 pattern with their own head counts,
head-wise attention gate, q/k norms, per-layer rope theta / partial rotary, llama3 rope scaling on full
layers only, leading dense layers then MoE layers (sigmoid router, fp32 router bias, scaling factor,
shared expert), per-layer SwiGLU limits that actually trigger, and 3 MTP layers after the main ones.
Tensor names and layouts (stacked expert tensors) are those of the real checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.config import FULL, SLIDING

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
# Markup the parsers read from the decoded text: added tokens that are NOT special (as in Qwen3's
# tokenizer). SGLang decodes chat output with skip_special_tokens=True (kept only for a few named
# parsers, not step3p5), which would otherwise delete `</think>` and leave the parser nothing to split on.
TEXT_MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# ChatML turns with Step-3.5's think block and XML tool calls. The generation prompt opens the think
# block, as Step-3.5's template does, so the model's output starts inside its reasoning.
CHAT_TEMPLATE = r"""{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}
{%- if tools or sys -%}
<|im_start|>system
{% if sys %}{{ sys }}{% if tools %}

{% endif %}{% endif %}{% if tools %}# Tools
You may call one or more functions. Available tools:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a tool with:
<tool_call>
<function=NAME>
<parameter=KEY>
VALUE
</parameter>
</function>
</tool_call>{% endif %}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' and loop.first -%}
{%- elif m.role == 'assistant' -%}
<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>
{% endif %}{{ m.content or '' }}
{%- for tc in (m.tool_calls or []) -%}
{%- set args = tc.function.arguments -%}
<tool_call>
<function={{ tc.function.name }}>
{% if args is mapping %}{% for k, v in args.items() %}<parameter={{ k }}>
{{ v if v is string else (v | tojson) }}
</parameter>
{% endfor %}{% else %}{{ args }}
{% endif %}</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>tool
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
<think>
{% endif -%}"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny checkpoint; the defaults are the embedded default model."""

    num_hidden_layers: int = 5  # full, sliding x3, full -> 3:1; layers 0-1 dense, 2-4 MoE
    num_mtp_layers: int = 3
    hidden_size: int = 64
    intermediate_size: int = 128
    full_heads: int = 4
    sliding_heads: int = 6  # sliding layers have their own head count, as in the real model
    kv_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 16
    num_dense_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 32
    share_expert_dim: int = 32
    vocab_size: int = 1024
    # Routed/shared SwiGLU limits on the last main layer, as in Step-3.5-Flash (layers 43-44),
    # small enough that they clip with these weights. 0 disables.
    routed_limit: float = 0.5
    shared_limit: float = 1.0
    init_std: float = 0.1


# The FP8 tiny model: every quantized projection holds whole 128x128 blocks (hidden 128, q 4x64 /
# 6x64, kv 2x64, experts and shared expert 128, dense 256), as SGLang's block-FP8 layers require at
# construction ("... is not divisible by weight quantization block_n = 128") and as the real
# Step-3.5-Flash-FP8 shapes are at TP1 (4096, 1280, 11264, heads x 128).
FP8_TINY_SPEC = TinySpec(
    hidden_size=128, intermediate_size=256, head_dim=64, moe_intermediate_size=128, share_expert_dim=128,
    init_std=0.08,
)


# Every quantized tiny (`step35 tiny --quant NAME`) uses these sizes: whole 128-wide blocks / groups in
# every projection, as the formats' GPU kernels require at construction.
QUANT_TINY_SPEC = FP8_TINY_SPEC


def fp8_block_problems(cfg: dict, block: tuple[int, int] = (128, 128)) -> list[str]:
    """Quantized checkpoint tensors of `cfg` whose [N, K] are not whole blocks (empty: FP8-servable at TP1)."""
    from sglang_step35.fp8 import block_problems

    return block_problems(checkpoint_shapes(cfg), block)


def tiny_config(spec: TinySpec, vocab_size: int, special_ids: dict[str, int]) -> dict:
    n, m = spec.num_hidden_layers, spec.num_mtp_layers
    types = [FULL if i % 4 == 0 else SLIDING for i in range(n)] + [SLIDING] * m
    last = n - 1
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "torch_dtype": "bfloat16",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": n,
        "max_seq_len": 4096,
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "num_attention_heads": spec.full_heads,
        "num_attention_groups": spec.kv_heads,
        "head_dim": spec.head_dim,
        "att_impl_type": "GQA",
        "use_qk_norm": True,
        "use_head_wise_attn_gate": True,
        "attention_other_setting": {
            "attention_type": SLIDING,
            "num_attention_heads": spec.sliding_heads,
            "num_attention_groups": spec.kv_heads,
            "head_dim": spec.head_dim,
            "true_head_dim": spec.head_dim,
        },
        "layer_types": types,
        "sliding_window": spec.sliding_window,
        "rope_theta": [5_000_000.0 if t == FULL else 10_000.0 for t in types],
        "partial_rotary_factors": [0.5 if t == FULL else 1.0 for t in types],
        "yarn_only_types": [FULL],
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "original_max_position_embeddings": 2048,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "use_moe": True,
        "moe_layers_enum": ",".join(str(i) for i in range(spec.num_dense_layers, n)),
        "moe_num_experts": spec.num_experts,
        "moe_top_k": spec.top_k,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "share_expert_dim": spec.share_expert_dim,
        "norm_expert_weight": True,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 2.5,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "swiglu_limits": [spec.routed_limit if i == last else 0.0 for i in range(n + m)],
        "swiglu_limits_shared": [spec.shared_limit if i == last else 0.0 for i in range(n + m)],
        "num_nextn_predict_layers": m,
        "tie_word_embeddings": False,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
    }


def tiny_weights(cfg: dict, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Random weights under the real Step-3.5 tensor names and shapes, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name == "model.embed_tokens.weight":
            scale = 1.0
        elif name.endswith("router_bias"):
            scale = 0.5
        elif len(shape) == 1:  # Gemma-form norm weights are offsets from 1
            scale = 0.1
        else:
            scale = std
        t = torch.randn(*shape, generator=g) * scale
        # Real checkpoints keep the router bias in fp32; everything else is bf16.
        out[name] = (t if name.endswith("router_bias") else t.to(torch.bfloat16)).contiguous()
    return out


def build_tokenizer(vocab_size: int, corpus: list[str]):
    """Byte-level BPE trained on `corpus` (deterministic), with Step-3.5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    data = json.loads(tok.to_str())  # ids stay those the trainer gave; only the `special` flag changes
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in TEXT_MARKUP_TOKENS
    return Tokenizer.from_str(json.dumps(data))


def save_tokenizer(tok, out: Path, max_length: int) -> None:
    """Write `tok` (a `tokenizers.Tokenizer` from build_tokenizer) as a transformers fast tokenizer
    with Step-3.5's special tokens and chat template: tokenizer.json, tokenizer_config.json,
    chat_template.jinja (what AutoTokenizer and SGLang read)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def default_corpus() -> list[str]:
    """Text the tokenizer is trained on: the GSM8K copy shipped with the package plus chat markup."""
    here = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"
    lines: list[str] = []
    if here.exists():
        with open(here) as f:
            for k, line in enumerate(f):
                if k >= 2000:
                    break
                row = json.loads(line)
                lines += [row["question"], row["answer"]]
    lines += [
        "<tool_call>\n<function=get_weather>\n<parameter=location>\nBeijing\n</parameter>\n</function>\n</tool_call>",
        "The answer is 42. Let me think step by step.",
    ] * 20
    return lines


def write_tiny_checkpoint(
    out: os.PathLike | str,
    seed: int = 0,
    spec: Optional[TinySpec] = None,
    corpus: Optional[list[str]] = None,
    fp8: bool = False,
    quant: Optional[str] = None,
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to `out`.

    `quant` (a name of `sglang_step35.quant.tiny_names()`, e.g. "fp8", "w8a8-int8") writes that
    format's layout instead: same seed and spec -> same bf16 weights, then the format module's
    `write_checkpoint_tensors` (its tensor names, quantization_config and side files), with
    QUANT_TINY_SPEC sizes by default, whose projections are whole blocks as the formats' GPU layers
    need; the format refuses a `spec` it could not serve. `fp8=True` is `quant="fp8"`
    (Step-3.5-Flash-FP8: 128x128 block FP8 e4m3 with `weight_scale_inv`)."""
    from safetensors.torch import save_file

    if fp8:
        if quant not in (None, "fp8"):
            raise ValueError(f"fp8=True and quant={quant!r} exclude each other")
        quant = "fp8"
    fmt = None
    if quant is not None:
        from sglang_step35.quant import format_for_tiny

        fmt = format_for_tiny(quant)
    spec = spec or (QUANT_TINY_SPEC if fmt else TinySpec())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.vocab_size, corpus if corpus is not None else default_corpus())
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = tiny_config(spec, tok.get_vocab_size(), special_ids)
    weights = tiny_weights(cfg, seed, spec.init_std)
    if fmt is not None:
        weights, extra = fmt.write_checkpoint_tensors(weights, cfg, quant)
        cfg["quantization_config"] = extra["quantization_config"]
        for fname, content in extra.get("files", {}).items():
            (out / fname).write_text(json.dumps(content, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n"
    )
    save_tokenizer(tok, out, cfg["max_position_embeddings"])
    return out


# The trained tiny checkpoint shipped with the package (`step35 train-tiny`, sglang_step35/training):
# same architecture at TRAINED_SPEC sizes, weights that write GSM8K solutions and tool calls.
TRAINED_TINY_DIR = Path(__file__).parent / "data" / "tiny-trained"
TRAINED_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                 "tokenizer.json", "tokenizer_config.json")


def write_trained_checkpoint(out: os.PathLike | str) -> Path:
    """Copy the embedded trained checkpoint (and its training log and loss curves) to `out`."""
    import shutil

    missing = [f for f in TRAINED_FILES if not (TRAINED_TINY_DIR / f).exists()]
    if missing:
        raise FileNotFoundError(f"the embedded trained checkpoint at {TRAINED_TINY_DIR} lacks {missing}; "
                                "reinstall sglang-step35 or rebuild it with `step35 train-tiny DIR`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(TRAINED_TINY_DIR.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out
