"""Standard reasoning-budget fields for Step-3.5: ``reasoning_effort`` and
``chat_template_kwargs.thinking_budget`` on ``/v1/chat/completions``.

SGLang 0.5.23 parses both fields but nothing acts on them for Step-3.5, whose chat template
has no effort switch and which can reason for a very long time (endless reasoning in agent
harnesses: llama.cpp #24181, #25238). Two hooks, installed by the plugin, turn them into a
budget without any client-side processor string or ``--enable-custom-logit-processor``:

1. after ``OpenAIServingChat._convert_to_internal_request`` (tokenizer-manager process): the
   request's budget goes into ``sampling_params.custom_params["thinking_budget"]``, the key
   SGLang itself uses for budgets (``max_thinking_tokens``, ``ThinkingBudgetLogitProcessor``);
2. after ``GrammarManager.process_req_with_grammar`` (scheduler process): a request carrying
   that key, and no grammar or custom processor of its own, gets our
   ``Step35BudgetGrammar`` (reasoning_budget.py) as its grammar object, which SGLang applies
   in normal decoding and in MTP verification alike.

Both act only when the server runs ``--reasoning-parser step3p5``. Mapping of effort to
budget (tokens; absent = no cap), configurable with ``SGLANG_STEP35_REASONING_EFFORT_BUDGETS``:
see ``DEFAULT_BUDGETS`` and docs/parsers.md.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

from sglang_step35.reasoning_budget import BUDGET_KEY, Step35BudgetGrammar, special_ids

logger = logging.getLogger(__name__)

PARSER = "step3p5"
ENV = "SGLANG_STEP35_REASONING_EFFORT_BUDGETS"
# Reasoning tokens per effort tier; a tier absent here is not capped. "numeric" scales
# SGLang's numeric effort (0.0 to 0.99): budget = round(effort * numeric).
DEFAULT_BUDGETS: Dict[str, Optional[int]] = {
    "none": 0,
    "minimal": 256,
    "low": 1024,
    "medium": 4096,
    "high": None,
    "xhigh": None,
    "max": None,
    "ultra": None,
    "numeric": 8192,
}


def effort_budgets(env: Optional[str] = None) -> Dict[str, Optional[int]]:
    """DEFAULT_BUDGETS with the overrides of ``SGLANG_STEP35_REASONING_EFFORT_BUDGETS``.

    Format: ``tier=N`` pairs separated by commas, ``N`` a token count or ``none`` (no cap):
    ``low=512,medium=2048,high=16384``.
    """
    text = os.environ.get(ENV, "") if env is None else env
    budgets = dict(DEFAULT_BUDGETS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in budgets:
            raise ValueError(f"{ENV}: {item!r} is not TIER=N with TIER one of {', '.join(DEFAULT_BUDGETS)}")
        if value.lower() == "none":
            if key == "numeric":
                raise ValueError(f"{ENV}: numeric needs a token count (the budget of effort 1.0), not none")
            budgets[key] = None
            continue
        try:
            budgets[key] = int(value)
        except ValueError:
            budgets[key] = -1
        if budgets[key] < 0:
            raise ValueError(f"{ENV}: {key}={value!r} must be a non-negative token count or 'none' (no cap)")
    return budgets


def effort_budget(effort, budgets: Optional[Dict[str, Optional[int]]] = None) -> Optional[int]:
    """The budget for a ``reasoning_effort`` as SGLang's ChatCompletionRequest holds it
    (a tier string, or a float in [0, 0.99] its validator already range-checked)."""
    budgets = effort_budgets() if budgets is None else budgets
    if effort is None:
        return None
    if isinstance(effort, str):
        if effort not in budgets or effort == "numeric":
            raise ValueError(f"reasoning_effort={effort!r}: use one of {', '.join(k for k in budgets if k != 'numeric')}")
        return budgets[effort]
    return round(float(effort) * budgets["numeric"])


def requested_budget(request, budgets: Optional[Dict[str, Optional[int]]] = None) -> Optional[int]:
    """A chat request's reasoning budget: ``chat_template_kwargs.thinking_budget`` (tokens;
    negative = no cap) if given, else the one its ``reasoning_effort`` maps to."""
    kwargs = request.chat_template_kwargs or {}
    if kwargs.get(BUDGET_KEY) is not None:
        budget = kwargs[BUDGET_KEY]
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise ValueError(f"chat_template_kwargs.{BUDGET_KEY} must be an integer number of reasoning "
                             f"tokens (negative: no cap), got {budget!r}")
        return budget if budget >= 0 else None
    return effort_budget(request.reasoning_effort, budgets)


def budget_into_sampling_params(result, serving, request, raw_request=None):  # noqa: ARG001  (hook signature)
    """AFTER hook of ``OpenAIServingChat._convert_to_internal_request``."""
    if serving.reasoning_parser != PARSER or request.custom_logit_processor:
        return None  # another model, or a client driving its own processor
    budget = requested_budget(request)
    if budget is None:
        return None
    adapted = result[0]
    params_list = adapted.sampling_params if isinstance(adapted.sampling_params, list) else [adapted.sampling_params]
    for params in params_list:
        custom = dict(params.get("custom_params") or {})
        custom.setdefault(BUDGET_KEY, budget)  # an explicit custom_params budget wins
        params["custom_params"] = custom
    return None


def _request_budget(req) -> Optional[int]:
    custom = req.sampling_params.custom_params
    budget = custom.get(BUDGET_KEY) if isinstance(custom, dict) else None
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        return None
    return budget


def attach_budget_grammar(result, manager, req):  # noqa: ARG001  (hook signature)
    """AFTER hook of ``GrammarManager.process_req_with_grammar``."""
    if manager.server_args.reasoning_parser != PARSER or req.grammar is not None or req.custom_logit_processor:
        # A request with a grammar of its own (response_format, forced tool choice) keeps
        # it: SGLang's --enable-strict-thinking caps those with the same key.
        return None
    budget = _request_budget(req)
    if budget is None:
        return None
    ids = special_ids(getattr(manager.scheduler, "tokenizer", None))
    if ids is None:
        logger.warning("reasoning budget ignored: the tokenizer has no <think>/</think> tokens")
        return None
    req.grammar = Step35BudgetGrammar(list(req.origin_input_ids), ids, budget)
    return None


CHAT_TARGET = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request"
GRAMMAR_TARGET = "sglang.srt.constrained.grammar_manager.GrammarManager.process_req_with_grammar"


def install_reasoning_effort() -> None:
    """Register both hooks (SGLang applies them before serving); refuses a bad mapping."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    effort_budgets()  # a bad SGLANG_STEP35_REASONING_EFFORT_BUDGETS fails at start-up, by name
    HookRegistry.register(CHAT_TARGET, budget_into_sampling_params, HookType.AFTER)
    HookRegistry.register(GRAMMAR_TARGET, attach_budget_grammar, HookType.AFTER)
