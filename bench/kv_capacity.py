"""KV tokens per GiB for Step-3.5-Flash: SGLang's default --swa-full-tokens-ratio vs the planned one.

Every figure comes from SGLang 0.5.23's own ``HybridSWAPoolConfigurator`` (through
:func:`sglang_step35.swa_ratio.pool_tokens`, which hands it Step-3.5-Flash's config.json as SGLang's
ModelConfig reads it) on ``--gib`` GiB of KV memory per GPU, bf16 KV, page size 1; the planned ratio
is the one sglang-step35's launch policy sets when the flag is left unset
(:func:`sglang_step35.swa_ratio.plan_swa_ratio`: SGLang's ``compute_swa_request_cap`` for one
full-context request with the chunked prefill SGLang may pick, plus one cached window). Ratio 1.0 is
listed too: the same bytes per token as one pool (``--disable-hybrid-swa-memory``).

    python bench/kv_capacity.py            # prints a table, writes bench/out/kv_capacity.json
    make kv-capacity
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as `python bench/kv_capacity.py`

OUT_DIR = ROOT / "bench" / "out"
GIB = 1 << 30
# (label, tp, MTP layers): one GPU, the seed's TP4 deployment, and TP4 with MTP-3 (the draft's
# sliding layers add to the SWA pool's bytes per token, and its chain to the request cap).
DEPLOYMENTS = [("tp1", 1, 0), ("tp4", 4, 0), ("tp4-mtp3", 4, 3)]


def capacity(cfg: dict, gib: float, tp: int, mtp: int) -> dict:
    from sglang_step35.swa_ratio import SGLANG_DEFAULT_RATIO, plan_swa_ratio, pool_tokens

    spec = ({"speculative_algorithm": "EAGLE", "speculative_num_steps": mtp, "speculative_eagle_topk": 1,
             "speculative_num_draft_tokens": mtp + 1} if mtp else None)
    plan = plan_swa_ratio(window=int(cfg["sliding_window"]), context_len=int(cfg["max_position_embeddings"]),
                          speculative=spec)
    rows = {}
    for name, ratio in (("sglang_default", SGLANG_DEFAULT_RATIO), ("planned", plan.ratio), ("ratio_1", 1.0)):
        full, swa = pool_tokens(cfg, int(gib * GIB), ratio, tp=tp, mtp_layers=mtp)
        rows[name] = {"swa_full_tokens_ratio": ratio, "full_tokens": full, "swa_tokens": swa,
                      "full_tokens_per_gib": round(full / gib)}
    rows["planned_over_default"] = round(rows["planned"]["full_tokens"] / rows["sglang_default"]["full_tokens"], 3)
    rows["plan"] = {"swa_tokens_needed": plan.swa_tokens_needed, "per_full_tokens": plan.full_tokens,
                    "request_cap": plan.request_cap, "chunked_prefill": plan.chunked_prefill}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config.json (default: Step-3.5-Flash's, shipped in the package)")
    p.add_argument("--gib", type=float, default=64.0, help="KV memory per GPU handed to the configurator")
    p.add_argument("--out", type=Path, default=OUT_DIR / "kv_capacity.json")
    args = p.parse_args(argv)

    import sglang

    from sglang_step35.config import read_config

    cfg = read_config(args.config)
    results = {label: capacity(cfg, args.gib, tp, mtp) | {"tp": tp, "mtp_layers": mtp}
               for label, tp, mtp in DEPLOYMENTS}
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "sglang_version": sglang.__version__, "config": args.config or "Step-3.5-Flash (shipped)",
              "kv_gib_per_gpu": args.gib, "kv_dtype": "bf16", "page_size": 1, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"KV tokens per GiB per GPU (SGLang {sglang.__version__} HybridSWAPoolConfigurator, {args.gib:g} GiB, bf16):")
    print(f"{'deployment':<10} {'default 0.8':>14} {'planned':>18} {'ratio 1.0':>12} {'planned/default':>16}")
    for label, r in results.items():
        print(f"{label:<10} {r['sglang_default']['full_tokens_per_gib']:>14,} "
              f"{r['planned']['full_tokens_per_gib']:>10,} (r {r['planned']['swa_full_tokens_ratio']:.3f}) "
              f"{r['ratio_1']['full_tokens_per_gib']:>12,} {r['planned_over_default']:>15.3f}x")
    print(f"[kv-capacity] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
