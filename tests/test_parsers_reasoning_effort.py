"""``reasoning_effort`` / ``chat_template_kwargs.thinking_budget`` for Step-3.5
(sglang_step35/reasoning_effort.py) and the budget's grammar object
(reasoning_budget.Step35BudgetGrammar), in process:

* the effort -> budget mapping and its environment override, on SGLang's own
  ChatCompletionRequest (its validators decide which efforts reach us);
* the grammar object driven as SGLang's sampler drives it (mask, apply, accept): the same tokens
  as the custom-logit-processor budget of test_parsers_reasoning_budget.py;
* speculative decoding: drafts verified through SGLang's own ``generate_token_bitmask`` (the
  tree walk of MTP/EAGLE verify) give exactly the tokens of plain decoding;
* the two hooks on stand-ins of the objects SGLang passes them.

tests/test_parsers_reasoning_effort_e2e.py runs it through ``sglang serve`` with MTP on.
"""

from types import SimpleNamespace

import pytest
import torch

from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang_step35.reasoning_budget import Step35BudgetGrammar, special_ids
from sglang_step35.reasoning_effort import (
    DEFAULT_BUDGETS,
    ENV,
    attach_budget_grammar,
    budget_into_sampling_params,
    effort_budgets,
    requested_budget,
)
from test_parsers_reasoning_budget import ANSWER, CLOSE, END, NEWLINE, PROMPT, REASONING, TOK, generate
from test_parsers_public_api import reasoning_modes, registered  # noqa: F401  (fixture)

IDS = special_ids(TOK)
VOCAB = len(TOK)


@pytest.fixture(scope="module", autouse=True)
def sglang_on_cpu():
    """SGLang's speculative utilities import sgl_kernel; the plugin installs its CPU stand-in."""
    from sglang_step35.plugin import register

    register()


def chat(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


# -- mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, budget", [
    ({}, None),
    ({"reasoning_effort": "low"}, DEFAULT_BUDGETS["low"]),
    ({"reasoning_effort": "medium"}, DEFAULT_BUDGETS["medium"]),
    ({"reasoning_effort": "high"}, None),
    ({"reasoning_effort": "max"}, None),
    ({"reasoning_effort": "none"}, 0),
    # SGLang's numeric form: a float in [0, 0.99], scaled by the "numeric" entry.
    ({"reasoning_effort": 0.5}, DEFAULT_BUDGETS["numeric"] // 2),
    ({"reasoning_effort": 0}, 0),
    # The OpenAI Responses-style object, normalized by SGLang's validator.
    ({"reasoning": {"effort": "low"}}, DEFAULT_BUDGETS["low"]),
    # SGLang moves chat_template_kwargs.reasoning_effort to the field (serving_chat) before our hook.
    ({"chat_template_kwargs": {"thinking_budget": 77}}, 77),
    ({"chat_template_kwargs": {"thinking_budget": 0}}, 0),
    ({"chat_template_kwargs": {"thinking_budget": -1}}, None),  # negative: no cap
    ({"chat_template_kwargs": {"thinking_budget": None}, "reasoning_effort": "low"}, DEFAULT_BUDGETS["low"]),
    # An explicit token count is more precise than a tier: it wins.
    ({"chat_template_kwargs": {"thinking_budget": 50}, "reasoning_effort": "low"}, 50),
])
def test_request_budget(kw, budget):
    assert requested_budget(chat(**kw)) == budget


@pytest.mark.parametrize("bad", ["256", 2.5, True, [1]])
def test_bad_thinking_budget_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="chat_template_kwargs.thinking_budget must be an integer"):
        requested_budget(chat(chat_template_kwargs={"thinking_budget": bad}))


def test_mapping_is_server_configurable(monkeypatch):
    monkeypatch.setenv(ENV, "low=8, medium=32,high=100,numeric=10,minimal=none")
    b = effort_budgets()
    assert (b["low"], b["medium"], b["high"], b["minimal"], b["none"]) == (8, 32, 100, None, 0)
    assert requested_budget(chat(reasoning_effort="low")) == 8
    assert requested_budget(chat(reasoning_effort=0.99)) == 10


@pytest.mark.parametrize("env, message", [
    ("lo=8", "'lo=8' is not TIER=N"), ("low", "'low' is not TIER=N"), ("low=-3", "low='-3' must be a non-negative"),
    ("low=abc", "low='abc' must be"), ("numeric=none", "numeric needs a token count"),
])
def test_bad_mapping_is_refused_by_name(env, message):
    with pytest.raises(ValueError, match=ENV) as err:
        effort_budgets(env)
    assert message in str(err.value)


# -- the grammar object as SGLang's sampler drives it --------------------------------------


def scripted_logits(out, reasoning=REASONING, rows=1):
    """The scripted model of test_parsers_reasoning_budget.generate: its reasoning, then (once
    the block is closed) ANSWER and <|im_end|>."""
    want_reasoning = TOK.encode(reasoning, add_special_tokens=False)
    want_answer = TOK.encode(ANSWER, add_special_tokens=False) + [END]
    if CLOSE in out:
        tail = out[out.index(CLOSE) + 1:]
        while tail[:1] == NEWLINE:
            tail = tail[1:]
        want = want_answer[min(len(tail), len(want_answer) - 1)]
    else:
        want = want_reasoning[len(out)] if len(out) < len(want_reasoning) else END
    logits = torch.zeros(rows, VOCAB)
    logits[:, want] = 5.0
    return logits


def grammar_generate(budget, reasoning=REASONING, prompt=PROMPT, max_steps=200):
    grammar = Step35BudgetGrammar(TOK.encode(prompt, add_special_tokens=False), IDS, budget)
    out = []
    for _ in range(max_steps):
        logits = scripted_logits(out, reasoning)
        mask = grammar.allocate_vocab_mask(VOCAB, 1, "cpu")
        grammar.fill_vocab_mask(mask, 0)
        grammar.apply_vocab_mask(logits, grammar.move_vocab_mask(mask, "cpu"))
        token = int(logits.argmax(-1))
        grammar.accept_token(token)
        out.append(token)
        if token == END:
            break
    return out[:-1] if out[-1] == END else out


@pytest.mark.parametrize("budget", [0, 1, 5, 17, 1000])
def test_grammar_gives_the_processors_tokens(budget):
    out = grammar_generate(budget)
    assert out == generate(budget)  # the custom-logit-processor budget, without overlap lag
    non, stream = reasoning_modes(TOK.decode(out))
    capped = budget < len(TOK.encode(REASONING, add_special_tokens=False))
    # Capped: the answer follows; else this scripted model reasons until it stops.
    assert non == stream and non[1] == (ANSWER if capped else "")
    assert len(TOK.encode(non[0], add_special_tokens=False)) <= budget


def test_grammar_edge_cases_match_the_processor():
    ids = TOK.encode(REASONING, add_special_tokens=False)
    at_newline = next(i + 1 for i, t in enumerate(ids) if TOK.decode([t]) == "\n")
    assert grammar_generate(at_newline) == generate(at_newline)  # no doubled newline
    short = "Short.\n</think>"
    assert grammar_generate(50, short) == generate(50, reasoning=short)  # closed within budget
    closed = PROMPT + "Done.\n</think>\n"  # continue_final_message after the block
    assert grammar_generate(0, prompt=closed) == TOK.encode(REASONING, add_special_tokens=False)
    opened = PROMPT.removesuffix("<think>\n")  # the model opens the block itself
    assert grammar_generate(4, "<think>" + REASONING, opened) == generate(4, "<think>" + REASONING, prompt=opened)


def test_grammar_bans_a_second_close_after_the_forced_one():
    grammar = Step35BudgetGrammar(TOK.encode(PROMPT, add_special_tokens=False), IDS, 0)
    for token in TOK.encode("</think>\nThe", add_special_tokens=False):
        grammar.accept_token(token)
    mask = grammar.allocate_vocab_mask(VOCAB, 1, "cpu")
    grammar.fill_vocab_mask(mask, 0)
    logits = torch.zeros(1, VOCAB)
    grammar.apply_vocab_mask(logits, mask)
    assert logits[0, CLOSE] == float("-inf") and torch.isfinite(logits[0, :CLOSE]).all()


def test_mask_bits_at_word_edges():
    # Token ids whose bit is the sign bit of their int32 word: forced and banned alike.
    for token in (31, 63, 0, 32):
        grammar = Step35BudgetGrammar([1], (10**6, token, None), 0)
        mask = grammar.allocate_vocab_mask(VOCAB, 1, "cpu")
        grammar.fill_vocab_mask(mask, 0)
        logits = torch.zeros(1, VOCAB)
        grammar.apply_vocab_mask(logits, mask)
        assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [token]
        grammar.accept_token(token)  # past the budget: ours; </think> is banned from now on
        grammar.fill_vocab_mask(mask, 0)
        logits = torch.zeros(1, VOCAB)
        grammar.apply_vocab_mask(logits, mask)
        assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [token]


# -- speculative decoding through SGLang's verify-tree walk -------------------------------


def spec_generate(budget, num_draft=4, draft_errors=(), max_steps=120):
    """Greedy EAGLE/MTP decoding (top-k 1, a chain of ``num_draft - 1`` drafts) of the scripted
    model: drafts are what the model would write unconstrained, except at ``draft_errors``
    positions (wrong guesses); the target's logits of every tree position are masked with
    SGLang's ``generate_token_bitmask``, the accepted run and its bonus token then go through
    ``accept_token`` as the scheduler commits them."""
    from sglang.srt.speculative.spec_utils import generate_token_bitmask

    grammar = Step35BudgetGrammar(TOK.encode(PROMPT, add_special_tokens=False), IDS, budget)
    req = SimpleNamespace(grammar=grammar)
    out = []
    for _ in range(max_steps):
        if out and out[-1] == END:
            break
        # The tree: position 0 is the last committed token, then the drafts.
        drafts, guess = [], list(out)
        for _k in range(num_draft - 1):
            token = int(scripted_logits(guess).argmax(-1))
            if len(guess) in draft_errors:
                token = (token + 1) % VOCAB
            drafts.append(token)
            guess.append(token)
        tree = torch.tensor([[out[-1] if out else 0] + drafts])
        next_token = torch.tensor([[*range(1, num_draft), -1]])
        sibling = torch.full((1, num_draft), -1)
        mask, _ = generate_token_bitmask([req], next_token, sibling, tree, VOCAB)
        accepted = []
        for pos in range(num_draft):
            logits = scripted_logits(out + accepted)
            grammar.apply_vocab_mask(logits, mask[pos:pos + 1])
            target = int(logits.argmax(-1))
            accepted.append(target)
            if pos == num_draft - 1 or target != drafts[pos] or target == END:
                break
        for token in accepted:
            grammar.accept_token(token)
        out += accepted
    return out[:-1] if out[-1] == END else out


@pytest.mark.parametrize("budget", [0, 1, 5, 17])
@pytest.mark.parametrize("draft_errors", [(), (3, 9, 18)], ids=["drafts_right", "drafts_wrong"])
def test_mtp_verify_gives_the_tokens_of_plain_decoding(budget, draft_errors):
    assert spec_generate(budget, draft_errors=draft_errors) == grammar_generate(budget)


def test_mtp_tree_walk_leaves_the_state_as_it_found_it():
    from sglang.srt.speculative.spec_utils import generate_token_bitmask

    grammar = Step35BudgetGrammar(TOK.encode(PROMPT, add_special_tokens=False), IDS, 3)
    for token in TOK.encode("I add", add_special_tokens=False):
        grammar.accept_token(token)
    before = (grammar.state, list(grammar.history), grammar.steps_in_final)
    drafts = TOK.encode(" two.\n</think>\nThe answer", add_special_tokens=False)[:5]
    tree = torch.tensor([[drafts[0]] + drafts[1:]])
    generate_token_bitmask([SimpleNamespace(grammar=grammar)], torch.tensor([[1, 2, 3, 4, -1]]),
                           torch.full((1, 5), -1), tree, VOCAB)
    assert (grammar.state, grammar.history, grammar.steps_in_final) == before


# -- the hooks --------------------------------------------------------------------------------


def test_chat_hook_puts_the_budget_in_custom_params():
    serving = SimpleNamespace(reasoning_parser="step3p5")
    adapted = SimpleNamespace(sampling_params={"max_new_tokens": 5, "custom_params": {"other": 1}})
    budget_into_sampling_params((adapted, None), serving, chat(reasoning_effort="low"))
    assert adapted.sampling_params["custom_params"] == {"other": 1, "thinking_budget": DEFAULT_BUDGETS["low"]}
    # No field, another parser, or a client's own processor: untouched.
    for serving_parser, kw in (("step3p5", {}), ("qwen3", {"reasoning_effort": "low"}),
                               ("step3p5", {"reasoning_effort": "low", "custom_logit_processor": "x"})):
        adapted = SimpleNamespace(sampling_params={"max_new_tokens": 5})
        budget_into_sampling_params((adapted, None), SimpleNamespace(reasoning_parser=serving_parser), chat(**kw))
        assert adapted.sampling_params == {"max_new_tokens": 5}
    # The client's own custom_params budget wins over its effort.
    adapted = SimpleNamespace(sampling_params={"custom_params": {"thinking_budget": 3}})
    budget_into_sampling_params((adapted, None), serving, chat(reasoning_effort="low"))
    assert adapted.sampling_params["custom_params"] == {"thinking_budget": 3}


def _req(custom_params, grammar=None, processor=None):
    return SimpleNamespace(sampling_params=SimpleNamespace(custom_params=custom_params), grammar=grammar,
                           custom_logit_processor=processor, origin_input_ids=TOK.encode(PROMPT))


def test_grammar_hook_attaches_the_budget_to_unconstrained_step35_requests():
    manager = SimpleNamespace(server_args=SimpleNamespace(reasoning_parser="step3p5"),
                              scheduler=SimpleNamespace(tokenizer=TOK))
    req = _req({"thinking_budget": 7})
    attach_budget_grammar(False, manager, req)
    assert isinstance(req.grammar, Step35BudgetGrammar) and req.grammar.budget == 7
    own = object()
    for req in (_req(None), _req({"thinking_budget": -1}), _req({"thinking_budget": "7"}),
                _req({"thinking_budget": 7}, grammar=own), _req({"thinking_budget": 7}, processor="p")):
        before = req.grammar
        attach_budget_grammar(False, manager, req)
        assert req.grammar is before
    other = SimpleNamespace(server_args=SimpleNamespace(reasoning_parser="qwen3"), scheduler=manager.scheduler)
    req = _req({"thinking_budget": 7})
    attach_budget_grammar(False, other, req)
    assert req.grammar is None


def test_register_installs_both_hooks():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_step35.reasoning_effort import CHAT_TARGET, GRAMMAR_TARGET

    assert any(fn is budget_into_sampling_params for _, fn, _ in HookRegistry._hooks[CHAT_TARGET])
    assert any(fn is attach_budget_grammar for _, fn, _ in HookRegistry._hooks[GRAMMAR_TARGET])


def test_a_bad_mapping_stops_the_install(monkeypatch):
    from sglang_step35.reasoning_effort import install_reasoning_effort

    monkeypatch.setenv(ENV, "low=lots")
    with pytest.raises(ValueError, match=f"{ENV}: low='lots'"):
        install_reasoning_effort()
