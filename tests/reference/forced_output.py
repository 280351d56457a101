"""Make a served model emit a chosen token sequence, through SGLang's own custom-logit-processor hook.

A diagnostic for the serving surface (parsers, streaming, tool calls) when the model at hand cannot
produce the text itself, e.g. a random-weight tiny checkpoint. Needs
`sglang serve ... --enable-custom-logit-processor`; per request pass
`custom_logit_processor=ForcedTokens.to_str()` and `custom_params={"forced_ids": [...]}`. Step k of
the output (the k-th call for that request) gets every logit except `forced_ids[k]` set to -inf; after the list ends the model is free.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class ForcedTokens(CustomLogitProcessor):
    def __call__(self, logits: torch.Tensor, custom_param_list: Optional[List[Dict[str, Any]]] = None):
        for row, params in enumerate(custom_param_list or []):
            if not params or "forced_ids" not in params:
                continue
            # Count our own calls: with SGLang's overlap scheduler `req.output_ids` lags one step.
            step = params.get("_forced_step", 0)
            params["_forced_step"] = step + 1
            forced = params["forced_ids"]
            if step < len(forced):
                keep = logits[row, forced[step]].clone()
                logits[row, :] = -float("inf")
                logits[row, forced[step]] = keep if torch.isfinite(keep) else 0.0
        return logits
