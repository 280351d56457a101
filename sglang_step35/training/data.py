"""Training and evaluation data for the trained tiny checkpoint.

- GSM8K (the copy shipped in sglang_step35/data/gsm8k, MIT licence beside it) in two forms: chat
  turns rendered with the Step-3.5 chat template (question -> think block holding the worked
  solution -> short answer ending in `#### N`), and the plain `Question: ...\nAnswer: ...` completion
  form SGLang's `few_shot_gsm8k` prompts with.
- A small synthetic tool-calling set: a few tools, templated user requests, and the assistant turn
  `<think>...</think>` + one XML `<tool_call>`; prompts are split into train / held-out by value, so
  held-out prompts name cities, numbers and people the model never saw in a call.
Each example is (token ids, loss mask): only assistant tokens are learned in chat turns.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

GSM8K_DIR = Path(__file__).resolve().parent.parent / "data" / "gsm8k"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string"}, "days": {"type": "integer"}}, "required": ["location"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"}}, "required": ["to", "subject"]}}},
]

CITIES = ["Beijing", "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo",
          "Seoul", "Delhi", "Dublin", "Vienna", "Prague", "Lisbon", "Sydney", "Toronto", "Chicago", "Boston",
          "Shanghai", "Mumbai", "Nairobi", "Athens"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
SUBJECTS = ["lunch", "the report", "the meeting", "holiday plans", "the budget", "our trip", "the invoice"]


def read_gsm8k(split: str) -> list[dict]:
    with open(GSM8K_DIR / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def final_answer(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def worked_solution(answer: str) -> str:
    """The solution lines without the `#### N` line and the `<<a*b=c>>` calculator annotations."""
    body = answer.split("####")[0].strip()
    return re.sub(r"<<[^>]*>>", "", body)


def gsm8k_chat_turn(row: dict) -> tuple[list[dict], str]:
    """(messages, assistant output text after the template's `<think>\n`)."""
    n = final_answer(row["answer"])
    out = f"{worked_solution(row['answer'])}\n</think>\n\nThe answer is {n}.\n#### {n}"
    return [{"role": "user", "content": row["question"]}], out


def gsm8k_completion(rows: list[dict]) -> str:
    return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows)


@dataclass(frozen=True)
class ToolPrompt:
    messages: list
    tool: str
    arguments: dict
    output: str  # assistant text after `<think>\n`


def _tool_call_xml(name: str, args: dict) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def tool_prompts(held_out: bool, seed: int = 0) -> list[ToolPrompt]:
    """Templated tool requests; train and held-out sets use disjoint cities, people and numbers."""
    rng = random.Random(seed + (1 if held_out else 0))
    cities = CITIES[len(CITIES) * 3 // 4:] if held_out else CITIES[: len(CITIES) * 3 // 4]
    people = PEOPLE[len(PEOPLE) * 3 // 4:] if held_out else PEOPLE[: len(PEOPLE) * 3 // 4]
    nums = range(60, 99) if held_out else range(2, 59)
    out: list[ToolPrompt] = []
    for _ in range(60 if held_out else 1200):
        kind = rng.randrange(3)
        if kind == 0:
            city, days = rng.choice(cities), rng.randint(1, 7)
            q = rng.choice([f"What's the weather in {city} for the next {days} days?",
                            f"Weather forecast for {city}, {days} days please.",
                            f"Will it rain in {city} in the coming {days} days?"])
            args, name, why = {"location": city, "days": days}, "get_weather", f"a {days}-day forecast for {city}"
        elif kind == 1:
            a, b = rng.choice(nums), rng.choice(nums)
            op = rng.choice(["+", "*", "-"])
            q = rng.choice([f"Compute {a} {op} {b} with the calculator.", f"What is {a} {op} {b}?",
                            f"Use a tool to work out {a} {op} {b}."])
            args, name, why = {"expression": f"{a} {op} {b}"}, "calculator", f"the value of {a} {op} {b}"
        else:
            who, subj = rng.choice(people), rng.choice(SUBJECTS)
            q = rng.choice([f"Email {who} about {subj}.", f"Send {who} an email about {subj}.",
                            f"Please write to {who}@example.com regarding {subj}."])
            args, name, why = {"to": f"{who}@example.com", "subject": subj}, "send_email", f"an email to {who}"
        output = f"The user wants {why}. I will call {name}.\n</think>\n\n{_tool_call_xml(name, args)}"
        out.append(ToolPrompt([{"role": "user", "content": q}], name, args, output))
    return out


def encode_chat(tokenizer, messages: list[dict], output: str, tools=None) -> tuple[list[int], list[int]]:
    """Prompt (template with generation prompt) + output + <|im_end|>; loss on output tokens only."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    p = tokenizer.encode(prompt, add_special_tokens=False)
    o = tokenizer.encode(output, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return p + o, [0] * len(p) + [1] * len(o)


def training_examples(tokenizer, max_len: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """All training sequences (ids, loss mask), each at most `max_len` tokens, in a fixed order."""
    rng = random.Random(seed)
    rows = read_gsm8k("train")
    examples = []
    for row in rows:
        msgs, out = gsm8k_chat_turn(row)
        examples.append(encode_chat(tokenizer, msgs, out))
    # Few-shot completion form (what `few_shot_gsm8k` prompts with), two problems per sequence so the
    # model learns to start the next "Question:" (a stop string) after an answer; a third of the rows.
    for k in range(0, len(rows) // 3 - 1, 2):
        ids = tokenizer.encode(gsm8k_completion(rows[k:k + 2]), add_special_tokens=False)[:max_len]
        examples.append((ids, [1] * len(ids)))
    for tp in tool_prompts(held_out=False, seed=seed):
        examples.append(encode_chat(tokenizer, tp.messages, tp.output, tools=TOOLS))
    # Chat turns are dropped rather than cut: a cut turn would teach a think block that never closes.
    examples = [(i, m) for i, m in examples if len(i) <= max_len]
    rng.shuffle(examples)
    return examples


def tokenizer_corpus() -> list[str]:
    """Text the trained checkpoint's tokenizer is fit on: GSM8K train + the tool vocabulary."""
    rows = read_gsm8k("train")
    lines = [r["question"] for r in rows] + [r["answer"] for r in rows]
    lines += [tp.output for tp in tool_prompts(held_out=False)]
    # The tools system prompt is in every tool-calling sequence: frequent enough here, its JSON merges
    # into few tokens, which keeps those sequences short.
    lines += [json.dumps(t) for t in TOOLS] * 100
    lines += ["You may call one or more functions. Available tools:", "Call a tool with:"] * 100
    lines += ["Question:", "Answer:", "The answer is", "#### "] * 50
    return lines
