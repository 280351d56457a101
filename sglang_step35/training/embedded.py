"""The trained tiny checkpoint embedded in the package (made by `step35 train-tiny`, see RESULTS)."""

from __future__ import annotations

import shutil
from pathlib import Path

TRAINED_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-trained"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                    "tokenizer.json", "tokenizer_config.json")


def trained_checkpoint_dir() -> Path:
    if not (TRAINED_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded trained checkpoint is missing from {TRAINED_DIR}")
    return TRAINED_DIR


def write_trained_checkpoint(out) -> Path:
    """Copy the embedded trained checkpoint to `out` (what `step35 tiny OUT --trained` does)."""
    src, out = trained_checkpoint_dir(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        shutil.copy2(src / name, out / name)
    return out
