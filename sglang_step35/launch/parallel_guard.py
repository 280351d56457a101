"""Launch-time refusal of pipeline-parallel layouts Step-3.5 cannot be served with.

`Step3p5ForCausalLM` runs under `--pp-size N` (models/step3p5.py). What SGLang 0.5.23 or our class
cannot run under it fails here, in the launcher, with the flag and what to use instead, rather than
as a bare assertion in a scheduler subprocess:

- more stages than main layers: SGLang's `make_layers` asserts `num_hidden_layers >= pp_size`;
- a SGLANG_PP_LAYER_PARTITION that does not split exactly the main layers (a common slip is to
  count the MTP layers stored after them): SGLang's `get_pp_indices` raises in every rank;
- PP with speculative decoding: SGLang turns on multi-layer EAGLE for every Step3p5ForCausalLM
  EAGLE run (arg_groups/overrides.py `_step3p_overrides`), and its pipeline parallelism supports
  only single-layer EAGLE (arg_groups/validation_hook.py `check_pipeline_parallel_compat`:
  "Pipeline parallelism currently only supports EAGLE (non-multi-layer) speculative decoding"),
  with or without SGLANG_ENABLE_PP_SPEC. Step's MTP drafts therefore cannot run on the last stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from sglang_step35.config import cfg_get

PARTITION_ENV = "SGLANG_PP_LAYER_PARTITION"  # read by sglang/srt/distributed/utils.py get_pp_indices


class PipelineParallelError(ValueError):
    """A --pp-size layout Step-3.5 cannot be served with; the message says what to use instead."""


PP_MTP_REASON = (
    "SGLang 0.5.23 runs Step-3.5's MTP only as multi-layer EAGLE (it sets --enable-multi-layer-eagle for "
    "Step3p5ForCausalLM), and its pipeline parallelism supports only single-layer EAGLE "
    "(check_pipeline_parallel_compat in sglang/srt/arg_groups/validation_hook.py)"
)


def pp_mtp_refusal(pp_size: int, drafting: Optional[str], *, drop: str, keep: str, pp_flag: str = "--pp-size") -> Optional[str]:
    """Why ``pp_size`` pipeline stages cannot draft with MTP (``drafting``: the caller's drafting flag,
    None when there is none), worded with the caller's flags: the launch guard's (--pp-size,
    --speculative-algorithm) or the planner's (--pp, --mtp). None when the combination runs."""
    if pp_size <= 1 or not drafting:
        return None
    return f"{pp_flag} {pp_size} with {drafting}: {PP_MTP_REASON}. {drop}, or {keep}"


def guard_pipeline_parallel(server_args: Any, cfg: Any, env: Mapping[str, str] = os.environ) -> None:
    """Raise PipelineParallelError if `server_args` (ServerArgs or a mapping: pp_size, tp_size,
    speculative_algorithm) ask for pipeline parallelism Step-3.5 (`cfg`: config dict or object)
    cannot run; return None otherwise (also for --pp-size 1). Changes nothing."""
    pp = int(cfg_get(server_args, "pp_size", 1))
    if pp <= 1:
        return
    n = int(cfg_get(cfg, "num_hidden_layers"))
    m = int(cfg_get(cfg, "num_nextn_predict_layers", 0) or 0)
    tp = int(cfg_get(server_args, "tp_size", 1))
    if pp > n:
        raise PipelineParallelError(
            f"--pp-size {pp}: this Step-3.5 checkpoint has {n} decoder layers, so at most --pp-size {n} "
            f"(every pipeline stage needs at least one layer; the {m} MTP layers are not pipelined). "
            f"Use --pp-size {n} or fewer, and --tp for the remaining GPUs")
    spec = cfg_get(server_args, "speculative_algorithm")
    why = pp_mtp_refusal(
        pp, f"--speculative-algorithm {spec}" if spec else None,
        drop=f"Drop --speculative-algorithm to serve with --pp-size {pp}",
        keep=f"keep MTP with --pp-size 1 and the GPUs in tensor/expert parallel (e.g. --tp {tp * pp}; "
             "`step35 plan` gives a command)")
    if why:
        raise PipelineParallelError(why)
    partition = env.get(PARTITION_ENV)
    if partition is not None:
        try:
            sizes = [int(x) for x in partition.split(",")]
        except ValueError:
            raise PipelineParallelError(
                f"{PARTITION_ENV}={partition!r}: expected {pp} comma-separated layer counts summing to {n}, "
                f"e.g. {PARTITION_ENV}={','.join(str(len(r)) for r in pp_stage_layers(n, pp))}") from None
        if len(sizes) != pp or sum(sizes) != n:
            hint = " (the MTP layers stored after the main ones are not pipelined: do not count them)" \
                if sum(sizes) == n + m and m else ""
            raise PipelineParallelError(
                f"{PARTITION_ENV}={partition!r} with --pp-size {pp}: expected {pp} layer counts "
                f"summing to num_hidden_layers={n}{hint}; e.g. "
                f"{PARTITION_ENV}={','.join(str(len(r)) for r in pp_stage_layers(n, pp))}, or unset it for "
                "SGLang's even split")


def pp_stage_layers(num_layers: int, pp_size: int) -> list[range]:
    """The main layers of each pipeline stage as SGLang 0.5.23 splits them by default
    (distributed/utils.py get_pp_indices without SGLANG_PP_LAYER_PARTITION): the last
    ``num_layers % pp_size`` stages take one layer more. The MTP layers are not pipelined.
    Written out (not SGLang's function) so the planner can use it without importing SGLang;
    tests compare it with get_pp_indices."""
    base, extra = divmod(num_layers, pp_size)
    out, start = [], 0
    for r in range(pp_size):
        size = base + (1 if r >= pp_size - extra else 0)
        out.append(range(start, start + size))
        start += size
    return out
