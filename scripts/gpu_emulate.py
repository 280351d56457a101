"""`make gpu-emulate`: an emulation of the borrowed GPU machine's image, less the GPU, to run
`make gpu-check-here` against before spending device time.

A Python 3.12 venv (build/gpu-emulate/venv) with the image's versions from PyPI (torch 2.11.0,
triton 3.6.0, transformers 5.17.0, torchvision 0.26.0) and the image packages SGLang's kernel modules
import (IMAGE_EXTRAS, all on the image's list), then every installed package that is NOT on the
image's list (scripts/gpu_image_packages.txt, e.g. pydantic, which pip brings with typer) removed, so
the carried bundle must supply it as it must there. No SGLang and no repo install: like the device
tool, the check runs from the tree with build/gpu-bundle. Then:

1. `import sglang` fails in the venv (no SGLang sneaked in);
2. bench/gpu_check_here.py --device cpu --bundle require (tiny widths, Triton interpreter), with a
   fresh unpack directory: the bundle imports and every required step passes.

    python scripts/gpu_emulate.py [--python python3.12] [--keep-venv]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "gpu-emulate" / "venv"
PINS = ["torch==2.11.0", "triton==3.6.0", "transformers==5.17.0", "torchvision==0.26.0"]
# numpy < 2.4: the image has 2.5.2, but Triton 3.6's interpreter (what the emulation runs instead of a
# GPU) fails from numpy 2.4 on ("only 0-dimensional arrays can be converted to Python scalars": `int()`
# of a size-1 array as a loop bound in SGLang's decode kernel); compiled kernels never take that path.
IMAGE_EXTRAS = ["numpy<2.4", "safetensors", "psutil", "requests", "pillow", "aiohttp", "attrs", "einops",
                "sentencepiece"]
STAMP_KEY = " ".join(PINS + IMAGE_EXTRAS)


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def image_packages() -> set[str]:
    lines = (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
    return {norm(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def find_python312(explicit: str | None) -> str:
    for cand in [explicit, shutil.which("python3.12"), *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]:
        if cand and subprocess.run([str(cand), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True).returncode == 0:
            return str(cand)
    raise SystemExit("no working python3.12 found: pass --python /path/to/python3.12")


def ensure_venv(python: str) -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / ".emulate-stamp"
    if not (stamp.exists() and stamp.read_text() == STAMP_KEY):
        if not py.exists():
            subprocess.run([python, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS, *IMAGE_EXTRAS], check=True)
        stamp.write_text(STAMP_KEY)
    listed = json.loads(subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True,
                                       text=True, check=True).stdout)
    allowed = image_packages() | {"pip", "setuptools", "wheel"}
    extra = sorted(p["name"] for p in listed if norm(p["name"]) not in allowed and not norm(p["name"]).startswith("nvidia-"))
    if extra:  # not on the image: the check must not lean on them
        print(f"removing packages the image does not have: {extra}", flush=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
    return py


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="a Python 3.12 interpreter (default: python3.12 on PATH or pyenv's)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-emulate" / "out")
    args = ap.parse_args(argv)
    if not (ROOT / "build" / "gpu-bundle" / "sglang-src.zip").is_file():
        raise SystemExit("build/gpu-bundle missing: run `make gpu-bundle` first")
    py = ensure_venv(find_python312(args.python))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    probe = subprocess.run([str(py), "-c", "import sglang"], cwd="/", capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        raise SystemExit("the emulation venv can import sglang without the bundle: it does not emulate the image")
    versions = subprocess.run([str(py), "-c", "import sys, torch, triton, transformers; print(sys.version.split()[0], "
                               "torch.__version__, triton.__version__, transformers.__version__)"],
                              capture_output=True, text=True, env=env, check=True).stdout.strip()
    print(f"emulated image: python/torch/triton/transformers = {versions}; `import sglang` alone fails "
          f"({probe.stderr.strip().splitlines()[-1]})", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        env["GPU_BUNDLE_CACHE"] = cache  # unpack afresh, as on a bare machine
        rc = subprocess.run([str(py), "bench/gpu_check_here.py", "--device", "cpu", "--bundle", "require",
                             "--out", str(args.out)], cwd=ROOT, env=env).returncode
    print(f"emulation {'passed' if rc == 0 else 'FAILED'} (results in {args.out})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
