"""Config handling: the real Step-3.5-Flash config loads unedited; bad configs give one named error."""

import copy
import json
import subprocess
import sys

import pytest

from sglang_step35.config import Step35ConfigError, layer_spec, read_config, validate



@pytest.fixture
def real_cfg():
    return read_config()  # Step-3.5-Flash's config.json, shipped in the package


def _write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


LOAD_WITH_SGLANG = """
import sys
from sglang.srt.utils.hf_transformers.config import get_config
c = get_config(sys.argv[1], trust_remote_code=False)
print(type(c).__module__, c.num_attention_heads, len(c.layer_types), len(c.swiglu_limits), c.num_hidden_layers)
"""


def test_real_flash_config_loads_unedited_through_sglang(real_cfg, tmp_path):
    # In this process: register() is idempotent and what every SGLang process runs first.
    from sglang.srt.utils.hf_transformers.config import get_config

    from sglang_step35.plugin import register

    register()
    c = get_config(_write(tmp_path, real_cfg), trust_remote_code=False)
    assert type(c).__module__ == "sglang_step35.config"
    # 48-entry per-layer lists (45 + 3 MTP) are kept whole, not cropped to 45 (vllm #40000).
    assert (c.num_attention_heads, len(c.layer_types), len(c.swiglu_limits), c.num_hidden_layers) == (64, 48, 48, 45)


def test_without_our_plugin_transformers_clash_breaks_sglang_loader(real_cfg, tmp_path):
    # Documents why the fix exists: SGLang 0.5.23 + transformers 5.19 alone cannot read the config.
    path = _write(tmp_path, real_cfg)
    out = subprocess.run([sys.executable, "-c", LOAD_WITH_SGLANG, path], capture_output=True, text=True, timeout=300,
                         env={"SGLANG_PLUGINS": "none", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0
    assert "AmbiguousGlobalPerLayerAttributeError" in out.stderr


def test_layer_specs_of_the_real_config(real_cfg):
    full, sliding = layer_spec(real_cfg, 0), layer_spec(real_cfg, 1)
    assert (full.sliding, full.num_heads, full.num_kv_heads, full.window) == (False, 64, 8, None)
    assert (sliding.sliding, sliding.num_heads, sliding.num_kv_heads, sliding.window) == (True, 96, 8, 512)
    assert full.rotary_dim == 64 and sliding.rotary_dim == 128  # partial rotary 0.5 on full layers
    assert full.use_rope_scaling and not sliding.use_rope_scaling  # yarn_only_types
    assert (full.rope_theta, sliding.rope_theta) == (5e6, 1e4)
    assert not layer_spec(real_cfg, 2).is_moe and layer_spec(real_cfg, 3).is_moe
    assert layer_spec(real_cfg, 43).swiglu_limit == 7 and layer_spec(real_cfg, 44).swiglu_limit_shared == 16
    assert layer_spec(real_cfg, 42).swiglu_limit == 0
    assert not layer_spec(real_cfg, 45).is_moe  # MTP layers are dense
    validate(real_cfg, tp_size=8)


@pytest.mark.parametrize(
    "mutate, tp, message",
    [
        (lambda c: c.update(layer_types=c["layer_types"][:40]), 1, "'layer_types' has 40 entries"),
        (lambda c: c.update(moe_layers_enum="3,4,45"), 1, "'moe_layers_enum' lists layer(s) [45]"),
        (lambda c: c.pop("moe_num_experts"), 1, "missing required Step-3.5 key(s): moe_num_experts"),
        (lambda c: None, 5, "'num_attention_heads'=64 is not divisible by --tp-size 5"),
        (lambda c: c["attention_other_setting"].update(num_attention_heads=100), 1, "not a multiple of 8 KV heads"),
        (lambda c: c.update(swiglu_limits=c["swiglu_limits"][:45]), 1, "'swiglu_limits' has 45 entries"),
        (lambda c: c.update(layer_types=["global"] * 48), 1, "unknown type(s) ['global']"),
        (lambda c: c.update(moe_top_k=300), 1, "'moe_top_k'=300"),
    ],
)
def test_bad_configs_raise_one_named_error(real_cfg, mutate, tp, message):
    cfg = copy.deepcopy(real_cfg)
    mutate(cfg)
    with pytest.raises(Step35ConfigError) as e:
        validate(cfg, tp_size=tp)
    assert message in str(e.value)


def test_one_config_reader_for_files_directories_and_the_shipped_flash_config(tmp_path):
    """config.read_config is what the launcher (plugin), the planner and the tiny builders read with:
    a checkpoint directory or its config.json give the same dict, None the shipped Step-3.5-Flash
    config; a missing or malformed config is a named error, or None for the launcher (missing_ok)."""
    from sglang_step35.config import read_config

    flash = read_config()
    assert flash["model_type"] == "step3p5" and flash["num_hidden_layers"] == 45
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "step3p5", "hidden_size": 8}))
    assert read_config(tmp_path) == read_config(tmp_path / "config.json") == {"model_type": "step3p5", "hidden_size": 8}
    missing = tmp_path / "nowhere"
    with pytest.raises(Step35ConfigError, match="nowhere"):
        read_config(missing)
    assert read_config(missing, missing_ok=True) is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Step35ConfigError, match="cannot read the Step config"):
        read_config(tmp_path)
    assert read_config(tmp_path, missing_ok=True) is None
