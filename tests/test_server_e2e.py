"""Plain `sglang serve --device cpu` on the tiny checkpoint through our plugin, end to end."""

import pytest
import requests
from openai import OpenAI

pytestmark = pytest.mark.server

PROMPT = [{"role": "user", "content": "What is 12 + 30?"}]


def test_health_and_log_names_our_model_class(served_trained):
    assert requests.get(served_trained.base_url + "/health", timeout=10).status_code == 200
    log = served_trained.log_text()
    assert "serving with model class sglang_step35.models.step3p5.Step3p5ForCausalLM" in log
    # SGLang's hybrid SWA KV pool, as on GPUs (sliding layers' slots translated on CPU: tests/test_swa_pool_cpu.py).
    assert "Use sliding window memory pool" in log and "hybrid_swa=True" in log


def test_generate_is_deterministic_at_temperature_zero(served_trained):
    body = {"text": "Natalia sold 48 clips", "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    a = requests.post(served_trained.base_url + "/generate", json=body, timeout=120).json()
    b = requests.post(served_trained.base_url + "/generate", json=body, timeout=120).json()
    assert a["meta_info"]["completion_tokens"] == 12
    assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]


def test_chat_non_stream_and_stream_agree_and_split_reasoning(served_trained):
    client = OpenAI(base_url=served_trained.base_url + "/v1", api_key="none")
    full = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0)
    msg = full.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
    assert full.usage.completion_tokens == 24
    # The generation prompt opens <think>, so without a </think> all text is reasoning, none is lost.
    raw = requests.post(served_trained.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": PROMPT, "max_tokens": 24, "temperature": 0,
        "separate_reasoning": False}).json()["choices"][0]["message"]["content"]
    if "</think>" not in raw:
        assert reasoning == raw and not msg.content
    else:  # the split loses nothing either: reasoning before the tag, content after it
        before, after = raw.split("</think>", 1)
        assert reasoning.strip() == before.strip() and (msg.content or "").strip() == after.strip()
    stream = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0, stream=True)
    s_reasoning, s_content = "", ""
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            s_reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            s_content += d.content or ""
    assert s_reasoning == reasoning and s_content == (msg.content or "")


def test_malformed_config_fails_at_launch_with_one_named_error(tiny_dir, tmp_path):
    import json
    import shutil

    from reference.serving import start_expecting_exit
    from sglang_step35.server import SGLangServer

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moe_layers_enum"] = "2,3,4,9"  # layer 9 does not exist
    (bad / "config.json").write_text(json.dumps(cfg))
    server = SGLangServer(str(bad), ["--device", "cpu"])
    log = start_expecting_exit(server)
    assert "Step35ConfigError: config key 'moe_layers_enum' lists layer(s) [9] outside 0..4" in log
    assert "scheduler" not in log.lower()  # refused in the launcher, before any worker started
