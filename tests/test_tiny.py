"""`step35 tiny`: deterministic, small, real layout, every Step-3.5 feature present."""

import hashlib
import json
import subprocess
import sys

from safetensors.torch import load_file
from transformers import AutoTokenizer

from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.config import layer_spec, validate
from sglang_step35.tiny import SPECIAL_TOKENS, write_tiny_checkpoint


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert _digest(a)["tokenizer.json"] == _digest(c)["tokenizer.json"]


def test_cli_writes_a_small_checkpoint_with_every_feature(tmp_path):
    out = tmp_path / "t"
    r = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(out), "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sum(f.stat().st_size for f in out.iterdir()) < 10_000_000
    cfg = json.loads((out / "config.json").read_text())
    validate(cfg)
    n, m = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    specs = [layer_spec(cfg, i) for i in range(n + m)]
    main = specs[:n]
    assert m == 3 and len(cfg["layer_types"]) == n + m
    assert [s.sliding for s in main[:4]] == [False, True, True, True]  # 3:1 pattern
    full, sliding = main[0], main[1]
    assert full.num_heads != sliding.num_heads  # attention_other_setting heads
    assert full.rotary_dim < full.head_dim and sliding.rotary_dim == sliding.head_dim
    assert full.use_rope_scaling and not sliding.use_rope_scaling and full.rope_theta != sliding.rope_theta
    assert not main[0].is_moe and main[-1].is_moe  # leading dense layers, then MoE
    assert any(s.swiglu_limit > 0 for s in main) and any(s.swiglu_limit_shared > 0 for s in main)
    assert cfg["use_head_wise_attn_gate"] and cfg["need_fp32_gate"] and cfg["use_moe_router_bias"]
    w = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == checkpoint_shapes(cfg)
    assert w[f"model.layers.{n - 1}.moe.gate_proj.weight"].dim() == 3  # stacked experts
    assert str(w[f"model.layers.{n - 1}.moe.router_bias"].dtype) == "torch.float32"
    assert f"model.layers.{n + 2}.eh_proj.weight" in w  # 3rd MTP layer


def test_tokenizer_has_step_special_tokens_and_chat_template(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "t", seed=0)
    tok = AutoTokenizer.from_pretrained(str(out))
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Beijing"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "<think>\nNeed the tool.\n</think>" in text
    assert "<tool_call>\n<function=get_weather>\n<parameter=location>\nBeijing\n</parameter>\n</function>\n</tool_call>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")  # generation opens the think block
    assert tok.decode(tok.encode("12 + 30 = 42 ünïcode", add_special_tokens=False)) == "12 + 30 = 42 ünïcode"


def test_cli_trained_writes_the_embedded_checkpoint(tmp_path):
    from sglang_step35.tiny import TRAINED_TINY_DIR

    out = tmp_path / "trained"
    r = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(out), "--trained"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _digest(out) == _digest(TRAINED_TINY_DIR)
    cfg = json.loads((out / "config.json").read_text())
    validate(cfg)
    w = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == checkpoint_shapes(cfg)
    bad = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(tmp_path / "x"), "--trained",
                          "--fp8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--trained" in bad.stderr and "--fp8" in bad.stderr


def test_think_and_tool_tags_survive_skip_special_tokens(tmp_path, trained_dir):
    # SGLang decodes chat output with skip_special_tokens=True; the parsers need these tags in the text.
    for ckpt in (write_tiny_checkpoint(tmp_path / "t", seed=0), trained_dir):
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        ids = tok.encode("a</think>\n\nb<tool_call>x</tool_call><|im_end|>", add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == "a</think>\n\nb<tool_call>x</tool_call>"
