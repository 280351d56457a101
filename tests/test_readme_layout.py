"""The README's Layout section is checked against the tree: every module and package of sglang_step35
(and every top-level source folder) is named there, and every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout\n"):]
    block = block[:block.find("\n## ", 5)] if "\n## " in block[5:] else block
    return {p.rstrip("/") for line in block.splitlines() for p in re.findall(r"^\s{4}(\S+)", line)
            if "/" in p or p.endswith(".py")} | {p for p in re.findall(r"\b(kernels_\w+)/", block)}


def test_every_module_and_folder_is_in_the_readme_layout():
    named = _layout_paths()
    package = ROOT / "sglang_step35"
    have = {f"sglang_step35/{p.name}" for p in package.iterdir()
            if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())}
    have |= {p.name for p in ROOT.iterdir() if p.is_dir() and p.name in ("bench", "scripts", "kernels_cuda", "kernels_rocm")}
    missing = sorted(have - named - {n + "/" for n in named})
    assert not missing, f"README.md ## Layout does not name: {missing}"


def test_every_path_the_readme_layout_names_exists():
    gone = sorted(p for p in _layout_paths() if not (ROOT / p).exists())
    assert not gone, f"README.md ## Layout names paths that do not exist: {gone}"
