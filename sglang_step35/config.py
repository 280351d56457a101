"""Step-3.5 configuration: the HF config class, validation with named errors, per-layer views.

transformers 5.19 maps ``model_type: step3p5`` to its own Step3p7 text config, which turns the
sliding-layer head counts into "per-layer attributes" and makes every global read of
``num_attention_heads`` raise ``AmbiguousGlobalPerLayerAttributeError`` (a RuntimeError, so even
``getattr(cfg, k, default)`` blows up inside SGLang's loader). :class:`Step35Config` is a plain
``PretrainedConfig`` that keeps the checkpoint's keys as they are; ``plugin.register()`` installs it
for ``step3p5`` so unedited real checkpoints load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import PretrainedConfig

FULL = "full_attention"
SLIDING = "sliding_attention"

# Keys without which no Step-3.5 forward can be built; each is read by the model.
REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_attention_groups",
    "head_dim",
    "vocab_size",
    "layer_types",
    "moe_num_experts",
    "moe_top_k",
    "moe_intermediate_size",
    "share_expert_dim",
)


class Step35ConfigError(ValueError):
    """A Step-3.5 config.json that cannot be served; the message names the key and the fix."""


FLASH_CONFIG = "data/step3p5_flash_config.json"  # Step-3.5-Flash's config.json, shipped in the package


def config_json_path(source) -> Optional[Path]:
    """Where the config.json of ``source`` is: a config.json file, a checkpoint directory, or a repo
    id whose config is in the Hugging Face cache (nothing is downloaded). None when there is none."""
    path = Path(str(source))
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json")
    except Exception:  # not a repo id (e.g. an absolute path that does not exist): nothing to read
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_config(source=None, *, missing_ok: bool = False) -> Optional[dict]:
    """The one reader of Step configs, as a dict: Step-3.5-Flash's shipped config when ``source`` is
    None, else the config.json of ``source`` (see :func:`config_json_path`). A config that is not
    there or not JSON raises :class:`Step35ConfigError` naming the path, or gives None with
    ``missing_ok`` (the launcher's case: a model that is not a local Step checkpoint is not ours)."""
    if source is None:
        return json.loads(resources.files("sglang_step35").joinpath(FLASH_CONFIG).read_text())
    path = config_json_path(source)
    if path is None:
        if missing_ok:
            return None
        raise Step35ConfigError(f"no config.json at {source} (a file, a checkpoint directory or a cached repo id)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if missing_ok:
            return None
        raise Step35ConfigError(f"cannot read the Step config from {path}: {e}") from e


class Step35Config(PretrainedConfig):
    """Step-3.5 config that stores every checkpoint key verbatim (lists are never cropped)."""

    model_type = "step3p5"

    def __init__(self, num_hidden_layers: int = 45, layer_types: Optional[list] = None, **kwargs):
        # transformers validates len(layer_types) == num_hidden_layers inside super().__init__, but
        # real checkpoints ship 48 entries (45 + 3 MTP) for 45 layers: align during the check only.
        self.layer_types = layer_types
        self.num_hidden_layers = len(layer_types) if layer_types else num_hidden_layers
        kwargs.setdefault("architectures", ["Step3p5ForCausalLM"])
        kwargs.setdefault("pad_token_id", None)  # absent in Step configs (sglang #22076)
        # transformers would "standardize" these into one global rope_parameters dict, losing the
        # per-layer theta list and the full-layers-only scaling; keep them verbatim instead.
        rope_theta = kwargs.pop("rope_theta", 10000.0)
        rope_scaling = kwargs.pop("rope_scaling", None)
        # Derived (see the property below); a checkpoint that states it must agree with its layers.
        stated_heads = kwargs.pop("num_attention_heads_per_layer", None)
        super().__init__(**kwargs)
        self.layer_types = layer_types
        self.num_hidden_layers = num_hidden_layers
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        if stated_heads is not None and list(stated_heads) != self.num_attention_heads_per_layer:
            raise Step35ConfigError(
                f"config key 'num_attention_heads_per_layer'={list(stated_heads)} disagrees with the heads "
                f"'layer_types' and 'attention_other_setting' give ({self.num_attention_heads_per_layer}); "
                "remove the key (it is derived)"
            )

    @property
    def num_attention_heads_per_layer(self) -> Optional[list[int]]:
        """Query heads of every layer (main, then MTP). SGLang sizes per-layer-agnostic attention
        state from the max of this list (`ModelConfig.get_max_num_attention_heads`: triton's decode
        buffers, flashinfer's planned `num_qo_heads`); without it they use `num_attention_heads`,
        the full layers' 64, while sliding and MTP layers run 96. `num_attention_heads` itself stays
        the full layers' value: fa3 plans the full layers with it. A property, so it is never
        written back into a saved config.json."""
        return attention_heads_per_layer(self) if self.__dict__.get("layer_types") else None


@dataclass(frozen=True)
class LayerSpec:
    """Everything one decoder layer (main or MTP) needs, resolved from the per-layer lists."""

    index: int
    sliding: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: Optional[int]  # None on full-attention layers
    rope_theta: float
    rotary_dim: int
    use_rope_scaling: bool  # yarn/llama3 scaling applies only to `yarn_only_types`
    is_moe: bool
    swiglu_limit: float  # routed experts; 0 = off
    swiglu_limit_shared: float  # shared expert / dense MLP; 0 = off


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`key` of a dict or an object (a config, ServerArgs, a namespace), `default` where it is missing
    or None, without tripping transformers' attribute hooks. The package's one "attribute or key"
    reader: the config, the MoE launch guard and the PP guard all read through it."""
    # collections.abc.Mapping, not typing.Mapping: the planner calls this ~10^6 times per grid of
    # plans and typing's isinstance hook made it half of `step35 plan`'s time.
    if isinstance(cfg, Mapping):
        value = cfg.get(key)
    elif key in cfg.__dict__:
        value = cfg.__dict__[key]
    else:
        try:  # properties such as PretrainedConfig.rope_scaling
            value = getattr(cfg, key, None)
        except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
            value = None
    return default if value is None else value


def moe_layer_ids(cfg: Any) -> set[int]:
    """`moe_layers_enum` is a comma-separated string in real configs; tuples/lists are accepted."""
    raw = cfg_get(cfg, "moe_layers_enum")
    if raw is None:
        return set(range(cfg_get(cfg, "num_hidden_layers")))
    if isinstance(raw, str):
        items = [s for s in raw.replace(" ", "").split(",") if s]
    else:
        items = list(raw)
    try:
        return {int(x) for x in items}
    except ValueError as e:
        raise Step35ConfigError(f"config key 'moe_layers_enum' must list layer indices, got {raw!r}") from e


def _per_layer(cfg: Any, key: str, index: int, default: Any) -> Any:
    value = cfg_get(cfg, key, default)
    if isinstance(value, (list, tuple)):
        v = value[index]
        return default if v is None else v
    return default if value is None else value


def _attention_shape(cfg: Any, sliding: bool) -> tuple:
    """(query heads, KV heads, head dim) of a sliding or full layer: sliding layers take
    `attention_other_setting`'s values where it has them."""
    keys = ("num_attention_heads", "num_attention_groups", "head_dim")
    other = (cfg_get(cfg, "attention_other_setting") or {}) if sliding else {}
    return tuple(other.get(k, cfg_get(cfg, k)) for k in keys)


def layer_spec(cfg: Any, index: int) -> LayerSpec:
    """Resolve layer `index` (0..num_hidden_layers-1 main, then the MTP layers)."""
    types = cfg_get(cfg, "layer_types")
    sliding = types[index] == SLIDING
    heads, kv, head_dim = _attention_shape(cfg, sliding)
    partial = float(_per_layer(cfg, "partial_rotary_factors", index, 1.0))
    yarn_types = cfg_get(cfg, "yarn_only_types") or []
    return LayerSpec(
        index=index,
        sliding=sliding,
        num_heads=int(heads),
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        window=int(cfg_get(cfg, "sliding_window")) if sliding else None,
        rope_theta=float(_per_layer(cfg, "rope_theta", index, 10000.0)),
        rotary_dim=int(head_dim * partial),
        use_rope_scaling=cfg_get(cfg, "rope_scaling") is not None and types[index] in yarn_types,
        is_moe=index < cfg_get(cfg, "num_hidden_layers") and index in moe_layer_ids(cfg),
        swiglu_limit=float(_per_layer(cfg, "swiglu_limits", index, 0.0)),
        swiglu_limit_shared=float(_per_layer(cfg, "swiglu_limits_shared", index, 0.0)),
    )


def attention_heads_per_layer(cfg: Any) -> list[int]:
    """Query heads of each entry of `layer_types` (the main layers, then the MTP layers)."""
    return [int(_attention_shape(cfg, t == SLIDING)[0]) for t in cfg_get(cfg, "layer_types")]


def validate(cfg: Any, tp_size: int = 1) -> None:
    """Raise :class:`Step35ConfigError` naming the first problem that would break serving."""
    missing = [k for k in REQUIRED_KEYS if cfg_get(cfg, k) is None]
    if missing:
        raise Step35ConfigError(f"config.json is missing required Step-3.5 key(s): {', '.join(missing)}")
    n = int(cfg_get(cfg, "num_hidden_layers"))
    n_mtp = int(cfg_get(cfg, "num_nextn_predict_layers", 0) or 0)
    types: Sequence[str] = cfg_get(cfg, "layer_types")
    if len(types) < n:
        raise Step35ConfigError(
            f"config key 'layer_types' has {len(types)} entries but num_hidden_layers is {n} "
            f"(expected {n} or {n + n_mtp} with the MTP layers)"
        )
    bad = sorted({t for t in types if t not in (FULL, SLIDING)})
    if bad:
        raise Step35ConfigError(f"config key 'layer_types' has unknown type(s) {bad}; use {FULL!r} or {SLIDING!r}")
    for key in ("rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        v = cfg_get(cfg, key)
        if isinstance(v, (list, tuple)) and len(v) < len(types):
            raise Step35ConfigError(
                f"config key '{key}' has {len(v)} entries but 'layer_types' has {len(types)}: "
                "per-layer lists must cover every layer, MTP layers included (do not crop them)"
            )
    if SLIDING in types and not cfg_get(cfg, "sliding_window"):
        raise Step35ConfigError("config has sliding_attention layers but no positive 'sliding_window'")
    moe = moe_layer_ids(cfg)
    out_of_range = sorted(i for i in moe if not 0 <= i < n)
    if out_of_range:
        raise Step35ConfigError(
            f"config key 'moe_layers_enum' lists layer(s) {out_of_range} outside 0..{n - 1} (num_hidden_layers={n})"
        )
    top_k, experts = int(cfg_get(cfg, "moe_top_k")), int(cfg_get(cfg, "moe_num_experts"))
    if not 0 < top_k <= experts:
        raise Step35ConfigError(f"config key 'moe_top_k'={top_k} must be in 1..moe_num_experts ({experts})")
    for i in range(len(types)):
        spec = layer_spec(cfg, i)
        if spec.num_heads % spec.num_kv_heads:
            raise Step35ConfigError(
                f"layer {i}: {spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} KV heads"
            )
        if spec.num_heads % tp_size:
            where = "attention_other_setting.num_attention_heads" if spec.sliding else "num_attention_heads"
            raise Step35ConfigError(
                f"config key '{where}'={spec.num_heads} is not divisible by --tp-size {tp_size}; "
                f"choose a TP size that divides it"
            )
        if spec.rotary_dim % 2 or spec.rotary_dim > spec.head_dim:
            raise Step35ConfigError(
                f"layer {i}: partial_rotary_factors gives rotary dim {spec.rotary_dim} for head_dim "
                f"{spec.head_dim}; it must be even and <= head_dim"
            )
