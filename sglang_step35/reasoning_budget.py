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
from sglang.srt.constrained.base_grammar_backend import BaseGrammarObject
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


# -- the same budget as a grammar object (what `reasoning_effort` / `thinking_budget` use) ----

_REASONING = "reasoning"
_FORCED_CLOSE = "forced_close"  # we just forced </think>: its "\n" comes next
_BANNED = "banned"  # after a forced close: free, except that </think> stays banned
_FREE = "free"  # the model closed the block itself (or the prompt did): nothing to do
_FINAL = (_BANNED, _FREE)


def _int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 the bitmask tensor holds."""
    return ((value + 2**31) % 2**32) - 2**31


class Step35BudgetGrammar(BaseGrammarObject):
    """The reasoning budget as a per-request grammar object.

    Custom logit processors are not applied when SGLang verifies MTP/EAGLE drafts
    (``eagle_sample`` applies penalties, logit bias and grammar masks only), so a processor
    would cap nothing once MTP is on. Grammar objects are SGLang's own per-request
    constraint: the scheduler advances them over every committed token (``accept_token``),
    asks them for the next token's mask in normal decoding, and walks each MTP verify tree
    through them (``accept_token`` / ``fill_vocab_mask`` / ``rollback``). The state here is a
    function of the accepted tokens, so overlap scheduling and speculation need nothing more.

    Output is the processor's: N reasoning tokens, then ``\\n</think>\\n`` (the first newline
    skipped when the N-th token was one), then the answer with ``</think>`` banned.
    The mask is xgrammar's token bitmask, the format of SGLang's default grammar backend, so
    a batch may mix these objects with xgrammar grammars.
    """

    def __init__(self, prompt_ids, ids: tuple, budget: int):
        super().__init__()
        self.open_id, self.close_id, self.newline_id = ids
        self.budget = budget
        phase = _REASONING if _reasoning_open_after(prompt_ids, self.open_id, self.close_id) else _FREE
        # (phase, reasoning tokens so far, last token): the last token decides whether the
        # forced close needs its own newline first.
        self.state = (phase, 0, prompt_ids[-1] if len(prompt_ids) else None)
        self.history: List[tuple] = []  # states before each token accepted outside _FINAL
        self.steps_in_final = 0  # tokens accepted since a _FINAL phase began (state unchanged)

    def forced(self) -> Optional[int]:
        """The only token allowed next, or None."""
        phase, count, last = self.state
        if phase == _FORCED_CLOSE:
            return self.newline_id
        if phase == _REASONING and count >= self.budget:
            needs_newline = self.newline_id is not None and last != self.newline_id
            return self.newline_id if needs_newline else self.close_id
        return None

    def accept_token(self, token: int) -> None:
        self.current_token = token
        phase, count, _ = self.state
        if phase in _FINAL:
            self.steps_in_final += 1
            return
        self.history.append(self.state)
        if phase == _FORCED_CLOSE:
            phase = _BANNED
        elif token == self.close_id:
            # Within the budget the model closed the block itself; past it, we did.
            phase = _FREE if count < self.budget else _FORCED_CLOSE
            if phase == _FORCED_CLOSE and self.newline_id is None:
                phase = _BANNED
        elif token == self.open_id and count < self.budget:
            count = 0  # the model opened the block itself: its tag is not reasoning
        else:
            count += 1
        self.state = (phase, count, token)

    def rollback(self, k: int) -> None:
        for _ in range(k):
            if self.steps_in_final:
                self.steps_in_final -= 1
            else:
                self.state = self.history.pop()

    def fill_vocab_mask(self, vocab_mask: torch.Tensor, idx: int) -> None:
        row = vocab_mask[idx]
        token = self.forced()
        if token is not None:
            row.zero_()
            row[token // 32] = _int32(1 << (token % 32))
            return
        row.fill_(-1)
        if self.state[0] == _BANNED:
            row[self.close_id // 32] = _int32(~(1 << (self.close_id % 32)) & 0xFFFFFFFF)

    # The bitmask helpers are xgrammar's, as SGLang's XGrammarGrammar uses them (same
    # functions, so mixed batches share one mask format).
    def allocate_vocab_mask(self, vocab_size: int, batch_size: int, device) -> torch.Tensor:
        from sglang.srt.constrained.xgrammar_backend import XGrammarGrammar

        return XGrammarGrammar.allocate_vocab_mask(self, vocab_size, batch_size, device)

    @staticmethod
    def move_vocab_mask(vocab_mask: torch.Tensor, device) -> torch.Tensor:
        from sglang.srt.constrained.xgrammar_backend import XGrammarGrammar

        return XGrammarGrammar.move_vocab_mask(vocab_mask, device)

    def apply_vocab_mask(self, logits: torch.Tensor, vocab_mask: torch.Tensor) -> None:
        from sglang.srt.constrained.xgrammar_backend import XGrammarGrammar

        XGrammarGrammar.apply_vocab_mask(self, logits, vocab_mask)
