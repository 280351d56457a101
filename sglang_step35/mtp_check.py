"""MTP request checks that need no SGLang import (run by the plugin in the launcher, and by
Step3p5MTP): does the checkpoint have the MTP layers `--speculative-num-steps` asks for?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from sglang_step35.checkpoint import layer_index
from sglang_step35.config import cfg_get


class Step35MTPError(ValueError):
    """MTP speculative decoding was requested but the checkpoint/config cannot provide it."""


def num_mtp_layers(cfg) -> int:
    return int(cfg_get(cfg, "num_nextn_predict_layers", 0) or 0)


def mtp_layer_ids_in_names(names: Iterable[str], num_hidden_layers: int) -> set[int]:
    """Indices >= num_hidden_layers that have at least one tensor (any nesting) among `names`."""
    return {i for i in map(layer_index, names) if i is not None and i >= num_hidden_layers}


def checkpoint_tensor_names(model_dir) -> Optional[list[str]]:
    """Tensor names of a local safetensors checkpoint, from its index or file headers (no tensor
    data is read); None when `model_dir` is not a local safetensors checkpoint."""
    d = Path(str(model_dir))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:  # reads the header only
            names += list(fh.keys())
    return names


def check_mtp_request(cfg, num_steps: Optional[int], model_dir=None) -> None:
    """Raise Step35MTPError when `--speculative-num-steps` MTP layers cannot be served from this
    config/checkpoint. Called by the plugin before SGLang starts (fast, clear error) and by
    Step3p5MTP itself (covers launches that bypass the plugin's policy hook)."""
    n = int(cfg_get(cfg, "num_hidden_layers"))
    m = num_mtp_layers(cfg)
    if m <= 0:
        raise Step35MTPError(
            f"checkpoint has no MTP layers (model.layers.{n}...): config num_nextn_predict_layers is "
            f"{cfg_get(cfg, 'num_nextn_predict_layers', None)!r}; serve without --speculative-algorithm"
        )
    if num_steps is not None and num_steps > m:
        raise Step35MTPError(
            f"--speculative-num-steps {num_steps} needs {num_steps} MTP layers, but the checkpoint has "
            f"{m} (num_nextn_predict_layers={m}); use --speculative-num-steps <= {m} and "
            f"--speculative-num-draft-tokens = steps + 1"
        )
    if model_dir is not None:
        names = checkpoint_tensor_names(model_dir)
        if names is not None:
            present = mtp_layer_ids_in_names(names, n)
            wanted = range(n, n + (num_steps if num_steps is not None else m))
            missing = [i for i in wanted if i not in present]
            if missing:
                raise Step35MTPError(
                    f"checkpoint has no MTP layers (model.layers.{missing[0]}...): config declares "
                    f"{m} MTP layer(s) after {n} main layers but the tensors of "
                    f"{', '.join(f'model.layers.{i}' for i in missing)} are missing (re-quantized "
                    f"checkpoints sometimes drop them); serve without --speculative-algorithm"
                )


def mtp_acceptance(meta_info: dict) -> dict:
    """MTP metrics of one response from SGLang's meta_info (which reports `spec_verify_ct`,
    `spec_accept_length` and `spec_correct_drafts_histogram`: histogram[k] = verify steps in which
    exactly k drafts were accepted; the scheduler also logs a per-batch "accept len").

    Returns the mean accepted length per verify step (accepted drafts + the bonus token) and the
    acceptance of each MTP layer: P(draft i accepted | drafts < i accepted), i.e. the share of
    verify steps that reached layer i's draft in which it was accepted (greedy chain verification
    stops at the first rejection, so later layers are only judged when earlier ones were right)."""
    hist = list(meta_info.get("spec_correct_drafts_histogram") or [])
    verify = int(meta_info.get("spec_verify_ct") or sum(hist))
    per_layer = []
    for i in range(max(len(hist) - 1, 0)):
        reached = sum(hist[i:])
        per_layer.append(sum(hist[i + 1:]) / reached if reached else None)
    accepted = sum(k * c for k, c in enumerate(hist))
    return {
        "verify_steps": verify,
        "accept_length": (accepted + verify) / verify if verify else None,
        "sglang_accept_length": meta_info.get("spec_accept_length"),
        "acceptance_per_layer": per_layer,
        "histogram": hist,
    }
