"""Run launches through SGLang's own entry points and print what was decided (one JSON line).

Usage: python launch_probe.py CASES_JSON. Each case: {"name", "model_path", "args": ServerArgs
fields, "platform": null | "amd" | "nvidia"}. For each, `ServerArgs(...).resolve_once()` runs after
`sglang.srt.plugins.load_plugins()` (as `sglang serve` does); the outcome is the error it raised (the
model path replaced by <MODEL>) and the server-argument fields the launch policy decides. A faked
platform is `sglang_step35.platform.forced` for that case only, as tests/test_launch_policy.py does
in process.
"""

import json
import sys

FIELDS = ("device", "attention_backend", "max_total_tokens", "disable_hybrid_swa_memory", "tp_size", "ep_size", "dtype")


def main(cases):
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.server_args import ServerArgs

    from sglang_step35 import platform
    from sglang_step35.platform import Platform

    platforms = {"amd": Platform(kind="amd", gcn_arch="gfx942", aiter_available=True),
                 "nvidia": Platform(kind="nvidia", compute_capability=(9, 0))}
    out = {}
    for case in cases:
        platform.forced = platforms.get(case.get("platform"))
        try:
            args = ServerArgs(model_path=case["model_path"], **case.get("args", {}))
            try:
                args.resolve_once()
                error = None
            except Exception as e:  # noqa: BLE001 - the outcome is what is compared
                error = f"{type(e).__name__}: {e}".replace(case["model_path"], "<MODEL>")
            out[case["name"]] = {"error": error, **{f: getattr(args, f, None) for f in FIELDS}}
        finally:
            platform.forced = None
    print("LAUNCH-DECISIONS " + json.dumps(out))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
