"""`step35 doctor [--json] [-- <sglang serve args>]`: what sglang-step35 does on this node, and why.

Reports the SGLang version (and whether it is the supported one), the platform as the launch policy
probes it (`platform.current_platform`), every touchpoint of `sglang_step35/touchpoints.py` with
whether it applied in this process and whether the installed SGLang still needs it, and, for a
`sglang serve` command line, what the launch policy decided.

The process loads plugins the way SGLang does (`sglang.srt.plugins.load_plugins()`: our `register()`,
then `HookRegistry.apply_hooks()`), so "applied" is measured, not assumed. The decisions run only
our policy (`launch.apply_server_policy`) on the record SGLang's own parser builds: `resolve_once()`
would add SGLang's resolution on top and hide which field was ours. Fields the policy changed, the
variables it set (restored afterwards) and the error it raised are reported.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from sglang_step35 import __version__


def sglang_info() -> dict:
    from sglang_step35.plugin import SUPPORTED_SGLANG

    try:
        installed = version("sglang")
    except PackageNotFoundError:
        installed = None
    return {"installed": installed, "supported": SUPPORTED_SGLANG, "ok": installed == SUPPORTED_SGLANG}


def platform_info() -> dict:
    from sglang_step35.platform import current_platform

    p = current_platform()
    return {"kind": p.kind, "arch": p.arch, "device_name": p.device_name, "aiter": p.aiter_available,
            "use_aiter": p.aiter, "flashinfer": p.flashinfer_available, "accelerator": p.has_accelerator}


def load_plugins() -> dict:
    """Load plugins as every SGLang process does; a refused registration is reported, not raised."""
    from sglang.srt.plugins import load_plugins as sglang_load_plugins

    from sglang_step35 import plugin

    try:
        sglang_load_plugins()
        plugin.register()  # idempotent; re-raises a stop that load_plugins' caller did not see
    except plugin.Step35RegistrationError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **{k: v for k, v in plugin.registration.items()}}


def parse_serve_args(argv: list[str]):
    """A ServerArgs record from `sglang serve` arguments, built by SGLang's own parser (unresolved)."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def launch_decisions(argv: list[str]) -> dict:
    """What the launch policy decides for `sglang serve ARGV`: changed fields, variables set, error, and
    per step of the policy (`launch.policy.STEPS`, in order) the fields it changed or the refusal it made."""
    from sglang.srt.arg_groups.arg_utils import record_fields

    from sglang_step35 import launch

    out: dict = {"argv": list(argv), "changed": {}, "env": {}, "error": None, "steps": [], "refused_by": None}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parse_serve_args(argv)
    except SystemExit:
        out["error"] = "sglang serve rejects the command line: " + " ".join(err.getvalue().split())[-400:]
        return out
    fields = [f.name for f in record_fields(type(args))]
    before = {f: getattr(args, f, None) for f in fields}
    env_before = dict(os.environ)
    seen = dict(before)

    def record(step: str, _launch) -> None:
        now = {f: getattr(args, f, None) for f in fields}
        out["steps"].append([step, {f: [seen[f], now[f]] for f in fields if now[f] != seen[f]}])
        seen.update(now)

    try:
        launch.run_steps(args, after_step=record)
    except Exception as e:  # noqa: BLE001 - the refusal is the decision being reported
        out["error"] = f"{type(e).__name__}: {e}"
        out["refused_by"] = launch.STEPS[len(out["steps"])].__name__
    finally:
        out["env"] = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
        os.environ.clear()
        os.environ.update(env_before)  # the report must not leave the policy's variables behind
    out["changed"] = {f: [before[f], getattr(args, f, None)] for f in fields if getattr(args, f, None) != before[f]}
    return out


def report(serve_args: Optional[list[str]] = None) -> dict:
    from sglang_step35 import touchpoints

    rep = {"sglang_step35": __version__, "sglang": sglang_info(), "platform": platform_info(),
           "register": load_plugins()}
    host = touchpoints.platform_scope()
    rep["touchpoints"] = [touchpoints.status(tp, host) for tp in touchpoints.TOUCHPOINTS]
    rep["decisions"] = launch_decisions(serve_args) if serve_args else None
    return rep


def _yn(v) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[v]


def format_report(rep: dict) -> str:
    s, p, r = rep["sglang"], rep["platform"], rep["register"]
    lines = [f"sglang-step35 {rep['sglang_step35']} doctor",
             f"SGLang {s['installed']}: {'supported' if s['ok'] else 'NOT the supported ' + s['supported']}",
             f"platform: {p['kind']} (arch {p['arch'] or '-'}{', ' + p['device_name'] if p['device_name'] else ''}; "
             f"AITER {_yn(p['aiter'])}, flashinfer {_yn(p['flashinfer'])})",
             f"register(): {'ok, model classes from ' + str(r.get('model_classes')) if r['ok'] else 'FAILED: ' + r['error']}",
             "", f"{'touchpoint':30} {'kind':10} {'applied':8} {'needed':7} target"]
    for t in rep["touchpoints"]:
        applied = "armed" if t["applied"] and t["applied_detail"].startswith("armed") else _yn(t["applied"])
        lines.append(f"{t['name']:30} {t['kind']:10} {applied:8} {_yn(t['needed']):7} {t['target']}")
        lines.append(f"{'':32}applied: {t['applied_detail']}")
        lines.append(f"{'':32}needed: {t['needed_detail']}")
    gone = [t["name"] for t in rep["touchpoints"] if t["needed"] is False]
    lines.append("")
    lines.append("not needed on this SGLang (can be deleted): " + (", ".join(gone) if gone else "none"))
    d = rep["decisions"]
    if d is not None:
        lines += ["", "launch policy for: sglang serve " + " ".join(d["argv"])]
        lines += [f"  {step}: {k}: {a!r} -> {b!r}" for step, changed in d["steps"] for k, (a, b) in changed.items()] \
            or ["  no field changed"]
        lines += [f"  env {k}={v}" for k, v in d["env"].items()]
        lines.append(f"  refused by the {d['refused_by']} step: {d['error']}" if d["error"] else "  accepted")
    return "\n".join(lines)


def cmd_doctor(args) -> int:
    serve_args = list(args.serve_args or [])
    if serve_args[:1] == ["--"]:
        serve_args = serve_args[1:]
    rep = report(serve_args or None)
    print(json.dumps(rep, indent=2, default=repr) if args.json else format_report(rep))
    return 0 if rep["register"]["ok"] and rep["sglang"]["ok"] else 1


def add_doctor_parser(sub) -> None:
    import argparse

    d = sub.add_parser("doctor", help="SGLang version, platform, each SGLang touchpoint (applied? still needed?) "
                                       "and the launch policy's decisions for `-- <sglang serve args>`")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `sglang serve` arguments")
    d.set_defaults(func=cmd_doctor)
