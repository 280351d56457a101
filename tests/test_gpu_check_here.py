"""`make gpu-check-here` (bench/gpu_check_here.py) and its bundle (scripts/prepare_gpu_bundle.py):
the whole check at tiny widths under the Triton interpreter, the capturable moe_align stand-in
against the contract tests' one, and the bundle + tree within the device tool's 64 MiB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_here_common  # noqa: E402
import prepare_gpu_bundle  # noqa: E402
from gpu_contract import HostSyncDetector  # noqa: E402
from gpu_contract import moe_align_block_size as contract_align  # noqa: E402


def _align(fn, ids, buckets, block):
    numel = ids.numel()
    cap = (numel + buckets * (block - 1) + 3) // 4 * 4
    out = (torch.empty(cap, dtype=torch.int32), torch.empty((cap + block - 1) // block, dtype=torch.int32),
           torch.empty(1, dtype=torch.int32), torch.empty(buckets + 1, dtype=torch.int32))
    fn(ids, buckets, block, *out, True, False)
    return out


@pytest.mark.parametrize("block", [16, 64])
def test_align_stand_in_matches_the_contract_one(block):
    # EP rank 0 of 4 with 72 local experts: -1 for other ranks' experts, as our layer hands them over.
    g = torch.Generator().manual_seed(block)
    ids = torch.randint(-1, 72, (37, 8), generator=g, dtype=torch.int32)
    ours = _align(gpu_here_common.moe_align_block_size, ids, 73, block)
    ref = _align(contract_align, ids, 73, block)
    total = int(ref[2][0])
    assert int(ours[2][0]) == total
    assert torch.equal(ours[0][:total], ref[0][:total])
    assert torch.equal(ours[1][: total // block], ref[1][: total // block])
    assert torch.equal(ours[3], ref[3])


def test_align_stand_in_has_no_host_sync():
    # What makes it capturable in a CUDA graph (the contract's version loops over experts in Python).
    ids = torch.randint(-1, 8, (5, 4), dtype=torch.int32)
    with HostSyncDetector() as det:
        _align(gpu_here_common.moe_align_block_size, ids, 9, 16)
    assert det.syncs == []
    with HostSyncDetector() as det:  # the contract's body (a Python loop over experts) for contrast
        _align(contract_align._init_fn, ids, 9, 16)
    assert "aten::_local_scalar_dense" in det.syncs


def test_tiny_run_passes_every_step(tmp_path):
    """The script end to end at tiny widths on CPU (Triton interpreter, fp32): the checks pass, and
    those that prove something (the window's keys, the clamp acting) are among them."""
    # As on the GPU machine: not SGLang's CPU engine (conftest sets it for in-process layer tests).
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_here.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check_here.json").read_text())
    status = {s["step"]: s for s in res["steps"]}
    assert [s for s in status if status[s]["status"] == "pass"] == ["kernels", "moe", "attention", "layers"]
    assert status["model"]["status"] in ("pass", "cannot run") and status["model"].get("reason")
    checks = [c["check"] for s in res["steps"] for c in s.get("checks", [])]
    assert any("differs from a 9-key window" in c for c in checks)
    assert any("clamp=7 differs from the unclamped" in c for c in checks)
    assert any(c.startswith("moe_clamped layer 44") for c in checks)
    assert (tmp_path / "gpu_check_here.md").read_text().count("| pass |") == 4


def test_bundle_and_tree_fit_the_device_limit(tmp_path):
    """The preparation's output, carried with the tracked tree, stays under 64 MiB; the command the
    docs give is the one the script prints, within the tool's 2,000 characters."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_gpu_bundle.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tree"]["total"] <= 64 * 2**20
    assert manifest["tree"]["carried"] >= (tmp_path / "sglang-src.zip").stat().st_size
    assert {w["wheel"].split("-")[0] for w in manifest["wheels"]} >= {"orjson", "pydantic", "pyzmq"}
    import zipfile

    names = zipfile.ZipFile(tmp_path / "sglang-src.zip").namelist()
    assert "sglang/srt/layers/moe/moe_runner/triton_utils/fused_moe.py" in names
    assert not [n for n in names if n.endswith(".so")]
    assert len(prepare_gpu_bundle.RUN_COMMAND) <= 2000
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert prepare_gpu_bundle.RUN_COMMAND in docs and json.dumps(prepare_gpu_bundle.CARRY) in docs
