"""The trainable Step-3.5 used by `step35 train-tiny`: same math as the reference, learns, deterministic."""

import json

import torch
from safetensors.torch import load_file

from sglang_step35.tiny import TRAINED_TINY_DIR
from sglang_step35.training.data import TOOLS, gsm8k_chat_turn, read_gsm8k, tool_prompts
from sglang_step35.training.model import TrainableStep35
from sglang_step35.training.train import train_tiny
from reference.step35_ref import Step35Reference


def _model(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    return TrainableStep35(cfg, load_file(str(tiny_dir / "model.safetensors")))


def test_trainable_forward_matches_the_reference(tiny_dir):
    model, ref = _model(tiny_dir), Step35Reference(tiny_dir, dtype=torch.float32)
    tokens = list(range(5, 5 + 40))  # 40 tokens > 2x the sliding window (16)
    with torch.no_grad():
        logits, mtp = model(torch.tensor([tokens]))
    assert torch.allclose(logits[0], ref.logits(tokens), atol=2e-4, rtol=1e-4)
    for k, (ours, theirs) in enumerate(zip(mtp, ref.mtp_chain_logits(tokens))):
        assert torch.allclose(ours[0], theirs, atol=2e-4, rtol=1e-4), f"MTP layer {k}"


def test_a_few_steps_on_one_batch_reduce_the_loss(tiny_dir):
    torch.manual_seed(0)
    model = _model(tiny_dir)
    ids = torch.randint(10, 500, (2, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits, _ = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias(1e-3)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_training_data_formats():
    msgs, out = gsm8k_chat_turn(read_gsm8k("train")[0])
    assert out.count("</think>") == 1 and out.rstrip().splitlines()[-1].startswith("#### ")
    assert "<<" not in out  # calculator annotations stripped from the think block
    train, held = tool_prompts(held_out=False), tool_prompts(held_out=True)
    train_args = {json.dumps(t.arguments, sort_keys=True) for t in train}
    assert not any(json.dumps(t.arguments, sort_keys=True) in train_args for t in held)
    assert {t.tool for t in held} == {t["function"]["name"] for t in TOOLS}


def test_recipe_is_deterministic_and_reproduces_the_embedded_checkpoints_start(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        train_tiny(out, steps=3, mtp_steps=2, progress=False)
    a, b = (load_file(str(r / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed -> bit-identical weights
    embedded = load_file(str(TRAINED_TINY_DIR / "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in embedded.items()}
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in embedded.items()}
    # Same tokenizer, same data, same initial weights and first batch as the embedded checkpoint's run:
    # its logged first loss (before any update) is reproduced.
    assert _same_tokenizer(runs[0] / "tokenizer.json", TRAINED_TINY_DIR / "tokenizer.json")
    log = json.loads((runs[0] / "train_log.json").read_text())
    committed = json.loads((TRAINED_TINY_DIR / "train_log.json").read_text())
    assert log["examples"] == committed["examples"]
    assert abs(log["loss"]["main"][0] - committed["loss"]["main"][0]) < 1e-3
    assert len(log["loss"]["main"]) == 3 and all(len(log["loss"][f"mtp{k}"]) == 2 for k in range(3))
    assert (runs[0] / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _same_tokenizer(a, b) -> bool:
    """Same vocabulary, merges, added tokens and encodings (the files' bytes may differ: transformers'
    save_pretrained adds an empty TemplateProcessing post-processor to what tokenizers wrote)."""
    from tokenizers import Tokenizer

    ta, tb = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    ja, jb = json.loads(ta.to_str()), json.loads(tb.to_str())
    text = "Natalia sold clips to 48 of her friends.<|im_start|>user\n<think>\n</think>\n<tool_call>"
    return (ja["model"] == jb["model"] and ja["added_tokens"] == jb["added_tokens"]
            and ta.encode(text).ids == tb.encode(text).ids)
