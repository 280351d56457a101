"""Per-request reasoning budget for Step-3.5, through SGLang's custom-logit-processor hook.

Step-3.5 in agent loops can reason for a very long time. With a budget of N tokens, once the
reasoning has N tokens this processor makes the next tokens ``\\n</think>\\n`` (the chat
template's own framing of the think block, so ``--reasoning-parser step3p5`` splits it as
usual), then leaves the model free to answer, except that it may not close the block again::

    sglang serve --model-path ... --reasoning-parser step3p5 --enable-custom-logit-processor

    client.chat.completions.create(..., extra_body={
        "custom_logit_processor": Step35ReasoningBudget.to_str(),
        "custom_params": {"thinking_budget": 256}})

The key is the one SGLang's own ThinkingBudgetLogitProcessor subclasses read. Those carry one
model's token ids as class constants; Step-3.5 checkpoints (and the tiny test checkpoints) do
not share ids, so ours looks ``<think>``, ``</think>`` and ``\\n`` up in the request's own
tokenizer on the server.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

BUDGET_KEY = "thinking_budget"
_STATE_KEY = "_step35_reasoning_budget"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_ids_by_tokenizer: Dict[int, Optional[tuple]] = {}


def special_ids(tokenizer) -> Optional[tuple]:
    """(``<think>``, ``</think>``, ``\\n``) ids, ``\\n`` None if it is not one token; None without tags."""
    key = id(tokenizer)
    if key not in _ids_by_tokenizer:
        ids = None
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        if THINK_OPEN in vocab and THINK_CLOSE in vocab:
            newline = tokenizer.encode("\n", add_special_tokens=False)
            ids = (vocab[THINK_OPEN], vocab[THINK_CLOSE], newline[0] if len(newline) == 1 else None)
        _ids_by_tokenizer[key] = ids
    return _ids_by_tokenizer[key]


def _reasoning_open_after(prompt_ids, open_id: int, close_id: int) -> bool:
    # Like the step3p5 reasoning parser: reasoning is forced unless the prompt itself
    # already closed the block it opened (a continued final message).
    for token in reversed(prompt_ids):
        if token == open_id:
            return True
        if token == close_id:
            return False
    return True


class BudgetState:
    """What one request has generated so far, as far as the budget cares.

    SGLang's overlap scheduler runs this one step ahead of ``req.output_ids``, so the
    count of generated tokens is our own (one call per sampled token), and the tokens
    forced here are known without waiting for them to appear in ``output_ids``.
    """

    def __init__(self, prompt_ids, ids: tuple):
        self.open_id, self.close_id, self.newline_id = ids
        self.step = 0  # tokens generated before the current call
        self.seen = 0  # how much of output_ids has been scanned
        self.reasoning_start = 0
        self.queue: List[int] = []
        self.forced_at: set = set()  # output positions we forced: not the model's own tags
        self.done = not _reasoning_open_after(prompt_ids, self.open_id, self.close_id)
        # Set once we closed the block: a model cut off mid-thought tends to close it a
        # second time, which would land in ``content``; that token stays banned.
        self.closed_by_budget = False
        self.last_prompt_id = prompt_ids[-1] if len(prompt_ids) else None

    def next_forced(self, output_ids, budget: int) -> Optional[int]:
        """The token this step must be, or None to leave the model free."""
        step, self.step = self.step, self.step + 1
        for i in range(self.seen, len(output_ids)):
            if i in self.forced_at:
                continue
            if output_ids[i] == self.close_id:
                self.done, self.queue = True, []  # the model closed the block itself
            elif output_ids[i] == self.open_id and not self.done:
                self.reasoning_start = i + 1  # the model opened it: the tag is not reasoning
        self.seen = len(output_ids)
        if self.done:
            return None
        if not self.queue and step - self.reasoning_start >= budget:
            self.queue = [self.close_id, self.newline_id]
            # The template writes "\n</think>\n"; a newline just generated is the first one.
            # Under the overlap scheduler the last token may not be known yet: then one
            # newline is forced, at worst doubling the model's own.
            if len(output_ids) == step:
                last = output_ids[-1] if step else self.last_prompt_id
            else:
                last = None
            if last != self.newline_id:
                self.queue.insert(0, self.newline_id)
            self.queue = [t for t in self.queue if t is not None]
        if not self.queue:
            return None
        token = self.queue.pop(0)
        self.forced_at.add(step)
        if token == self.close_id:
            self.closed_by_budget = True
        if not self.queue:
            self.done = True
        return token


class Step35ReasoningBudget(CustomLogitProcessor):
    """``custom_params={"thinking_budget": N}``: at most N reasoning tokens, then the answer."""

    def __call__(self, logits: torch.Tensor, custom_param_list: Optional[List[Dict[str, Any]]] = None):
        for row, params in enumerate(custom_param_list or []):
            if not params:
                continue
            budget = params.get(BUDGET_KEY)
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                continue
            req = params.get("__req__")
            if req is None:
                continue
            state = params.get(_STATE_KEY)
            if state is None:
                ids = special_ids(getattr(req, "tokenizer", None))
                if ids is None:
                    continue  # no think tags in this vocabulary: nothing to close
                # The request's custom_params dict lives as long as the request, so the
                # state does too.
                state = params[_STATE_KEY] = BudgetState(list(req.origin_input_ids), ids)
            token = state.next_forced(req.output_ids, budget)
            if token is not None:
                logits[row, :] = -float("inf")
                logits[row, token] = 0.0
            elif state.closed_by_budget:
                logits[row, state.close_id] = -float("inf")
        return logits
