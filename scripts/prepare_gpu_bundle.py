"""`make gpu-bundle`: prepare what must travel to the borrowed GPU machine for `make gpu-check-here`.

That machine (Python 3.12, torch 2.11, triton 3.6, transformers 5.17; no SGLang, no registry) gets
the working tree plus up to 8 ignored paths, 64 MiB in all. This writes build/gpu-bundle/ (ignored,
carried as one path):

- sglang-src.zip: SGLang 0.5.23's pure-Python sources and data files (kernel-config JSONs) from its
  wheel, without compiled extensions (*.so: built for CPython 3.11, useless there) and the parts the
  check never imports (EXCLUDE); unpacked under /tmp there by bench/gpu_here_common.activate_bundle;
- wheels/: the few packages SGLang's kernel modules import at module level that the image lacks
  (CARRIED, pinned; pure Python or manylinux x86-64 CPython 3.12 builds), unpacked the same way;
- manifest.json: versions, sha256 and sizes.

Then it checks that tracked + untracked-not-ignored files + the bundle stay under 64 MiB and prints
the device tool's `run` command and carry list (docs/benchmarks.md has the same).

    python scripts/prepare_gpu_bundle.py [--wheel PATH] [--out build/gpu-bundle]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "gpu-bundle"
SGLANG_VERSION = "0.5.23"
LIMIT = 64 * 2**20
# Members of the wheel left out: compiled extensions (for CPython 3.11) and subpackages the check's
# imports never reach (the diffusion runtime, the Rust extensions' folder).
EXCLUDE_PREFIXES = ("sglang/multimodal_gen/", "sglang/srt/rust_extensions/")
EXCLUDE_SUFFIXES = (".so", ".pyc")
# Packages that `import sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe`, `...moe.topk`, the Triton
# attention modules and `ServerArgs` reach at module level and that the image lacks (KINDS.md package
# list; found one by one with `make gpu-emulate`, whose venv holds only the image's packages); versions
# as SGLang 0.5.23 pins them where it does (openai, compressed-tensors, apache-tvm-ffi). SGLang's model
# runtime needs more (uvicorn, ...): the check's optional `model` step reports the first one missing.
CARRIED = ["orjson==3.13.0", "pybase64==1.5.1", "starlette==1.10.0", "msgspec==0.23.0", "pydantic==2.14.4",
           "pydantic-core==2.50.5", "typing-inspection==0.4.5", "annotated-types==0.8.0", "pyzmq==27.3.0",
           "ipython==9.19.1", "traitlets==5.16.1", "dill==0.4.1", "apache-tvm-ffi==0.1.11",
           "compressed-tensors==0.18.0", "loguru==0.7.3", "gguf==0.19.0", "openai==2.8.0", "sniffio==1.3.1",
           "distro==1.9.0", "jiter==0.19.0", "partial-json-parser==0.2.1.1.post7"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]

RUN_COMMAND = ("export PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name,memory.total --format=csv; "
               "python3 bench/gpu_check_here.py --bundle require 2>&1 | tee $OUT/gpu_check_here.log")
CARRY = ["build/gpu-bundle"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_wheel(explicit: Path | None) -> Path:
    if explicit:
        return explicit
    cache = ROOT / "build" / "wheels"
    found = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"sglang=={SGLANG_VERSION}",
                    "-d", str(cache)], check=True)
    found = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not found:
        raise SystemExit(f"no sglang-{SGLANG_VERSION} wheel in {cache} after pip download")
    return found[-1]


def kept(name: str) -> bool:
    return (name.startswith("sglang/") and not name.startswith(EXCLUDE_PREFIXES)
            and not name.endswith(EXCLUDE_SUFFIXES) and "/__pycache__/" not in name)


def write_sources(wheel: Path, dest: Path) -> dict:
    n = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for info in src.infolist():
            if kept(info.filename) and not info.is_dir():
                out.writestr(info.filename, src.read(info.filename))
                n += 1
    return {"wheel": wheel.name, "wheel_sha256": sha256(wheel), "files": n, "bytes": dest.stat().st_size}


def download_wheels(dest: Path) -> list[dict]:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + CARRIED, check=True)
    return [{"wheel": w.name, "sha256": sha256(w), "bytes": w.stat().st_size} for w in sorted(dest.glob("*.whl"))]


def tree_bytes(carried_paths=None, root: Path = ROOT) -> dict:
    """What the device tool sends: tracked and untracked-not-ignored files, plus the carried paths
    (default: CARRY under the checkout)."""
    def listed(*args):
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True).stdout
        return [root / p for p in out.decode().split("\0") if p]

    def size(paths):
        return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())

    tracked = size(listed())
    untracked = size(listed("--others", "--exclude-standard"))
    paths = [Path(c) if Path(c).is_absolute() else root / c for c in (carried_paths or CARRY)]
    carried = sum(size(p.rglob("*")) if p.is_dir() else size([p]) for p in paths)
    return {"tracked": tracked, "untracked": untracked, "carried": carried, "total": tracked + untracked + carried,
            "limit": LIMIT}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help=f"the sglang-{SGLANG_VERSION} wheel (default: build/wheels, else pip download)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--skip-wheels", action="store_true", help="keep the carried wheels already in --out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"sglang_version": SGLANG_VERSION, "sources": write_sources(find_wheel(args.wheel), args.out / "sglang-src.zip")}
    if args.skip_wheels:
        manifest["wheels"] = [{"wheel": w.name, "sha256": sha256(w), "bytes": w.stat().st_size}
                              for w in sorted((args.out / "wheels").glob("*.whl"))]
    else:
        manifest["wheels"] = download_wheels(args.out / "wheels")
    sizes = tree_bytes([args.out])
    manifest["tree"] = sizes
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()}
    print(f"bundle: {args.out} (sources {manifest['sources']['bytes'] / 2**20:.1f} MiB zipped, "
          f"{len(manifest['wheels'])} wheels)")
    print(f"tree that travels: tracked {mib['tracked']} + untracked {mib['untracked']} + carried {mib['carried']} "
          f"= {mib['total']} of {mib['limit']}")
    if sizes["total"] > LIMIT:
        print("over the device tool's 64 MiB limit: carry less (EXCLUDE_PREFIXES) or clean untracked files",
              file=sys.stderr)
        return 1
    print(f"device run command ({len(RUN_COMMAND)} chars):\n  {RUN_COMMAND}\ncarry: {json.dumps(CARRY)}\n"
          "timeout_s: 480 (leaves room for a rerun inside the 15-minute device time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
