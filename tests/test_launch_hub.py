"""A hub repo id gets the launch decisions of the same checkpoint on disk (issue #23, item 1).

`sglang serve --model-path stepfun-ai/Step-3.5-Flash` names a repo. The launch policy must fetch its
config.json the way SGLang does moments later (same revision, the real huggingface_hub client and
its cache) and decide exactly as for a checkpoint directory. A stand-in hub on 127.0.0.1
(tests/hub_standin.py, through HF_ENDPOINT, with an empty HF_HOME) serves the tiny checkpoint; every
launch runs through SGLang's own `load_plugins()` and `ServerArgs(...).resolve_once()` in a fresh
process (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn

FLASH_CONFIG = Path(__file__).resolve().parents[1] / "sglang_step35" / "data" / "step3p5_flash_config.json"
PROBE = Path(__file__).parent / "launch_probe.py"
EAGLE = {"speculative_algorithm": "EAGLE", "speculative_eagle_topk": 1}
TOKEN = "hf_standin_token"

# name -> (checkpoint, ServerArgs fields, faked platform); "broken" is served as revision "broken"
# of the tiny repo, so the hub side also shows that --revision is the revision read.
CASES = {
    "cpu_accepted": ("tiny", {}, None),
    "mtp_refused": ("tiny", {**EAGLE, "speculative_num_steps": 4, "speculative_num_draft_tokens": 5}, None),
    "pp_refused": ("tiny", {**EAGLE, "speculative_num_steps": 3, "speculative_num_draft_tokens": 4,
                            "pp_size": 2}, None),
    "invalid_config": ("broken", {}, None),
    "window_refused": ("tiny", {"attention_backend": "flex_attention"}, "nvidia"),
    "amd_moe_layout": ("flash", {"tp_size": 4}, "amd"),
}


def _run_probe(cases: list[dict], env: dict) -> dict:
    r = subprocess.run([sys.executable, str(PROBE), json.dumps(cases)], capture_output=True, text=True,
                       env=env, timeout=600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("LAUNCH-DECISIONS ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("hub-checkpoints")
    broken = root / "broken"
    shutil.copytree(tiny_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["moe_layers_enum"] = ",".join(str(i) for i in range(cfg["num_hidden_layers"] + 1))  # one layer too many
    (broken / "config.json").write_text(json.dumps(cfg))
    flash = root / "flash"
    flash.mkdir()
    shutil.copy(FLASH_CONFIG, flash / "config.json")
    return {"tiny": Path(tiny_dir), "broken": broken, "flash": flash}


@pytest.fixture(scope="module")
def decisions(checkpoints, tmp_path_factory):
    """Every case launched twice in one process: from the directory and from its repo id."""
    ckpt_of = {name: ckpt for name, (ckpt, _, _) in CASES.items()}
    # One repo per case: SGLang memoizes configs per model path, and the hub log then shows what
    # each launch fetched.
    repos = {f"stepfun-test/{name}": {"main": checkpoints["tiny" if ckpt == "broken" else ckpt]}
             for name, ckpt in ckpt_of.items()}
    repos["stepfun-test/invalid_config"]["broken"] = checkpoints["broken"]
    cases = []
    for name, (ckpt, args, platform) in CASES.items():
        cases.append({"name": f"dir:{name}", "model_path": str(checkpoints[ckpt]), "args": args, "platform": platform})
        hub_args = {**args, "revision": "broken"} if ckpt == "broken" else args
        cases.append({"name": f"hub:{name}", "model_path": f"stepfun-test/{name}", "args": hub_args,
                      "platform": platform})
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE", "SGLANG_STEP35", "SGLANG_EXTERNAL"))}
    home = tmp_path_factory.mktemp("hf-home")
    # Private repos: the token rule is huggingface_hub's own (HF_TOKEN), for SGLang and for us.
    with HubStandIn(repos, token=TOKEN) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        out = _run_probe(cases, env)
        fetched = hub.fetched_files()
    return out, fetched, cases, env


@pytest.mark.parametrize("name", list(CASES))
def test_repo_id_gets_the_decisions_of_the_checkpoint_directory(decisions, name):
    out = decisions[0]
    assert out[f"hub:{name}"] == out[f"dir:{name}"]


def test_the_decisions_are_the_policys(decisions):
    """What the equal decisions are: a refusal per refused case, EP switch on AMD, CPU defaults."""
    out = decisions[0]
    # `sglang serve` refuses it the same way: its launcher resolves the arguments through resolve_once, as here.
    assert "Step35MTPError" in out["hub:mtp_refused"]["error"]
    assert "--speculative-num-steps 4 needs 4 MTP layers, but the checkpoint has 3" in out["hub:mtp_refused"]["error"]
    assert "--pp-size 2 with --speculative-algorithm EAGLE" in out["hub:pp_refused"]["error"]
    assert "Step35ConfigError" in out["hub:invalid_config"]["error"] and "moe_layers_enum" in out["hub:invalid_config"]["error"]
    assert "flex_attention" in out["hub:window_refused"]["error"]
    assert (out["hub:amd_moe_layout"]["attention_backend"], out["hub:amd_moe_layout"]["ep_size"]) == ("aiter", 4)
    accepted = out["hub:cpu_accepted"]
    assert accepted["error"] is None and accepted["attention_backend"] == "torch_native"


def test_a_refused_launch_fetched_config_json_only_and_at_the_asked_revision(decisions):
    fetched = decisions[1]

    def only_config(repo, revision):  # transformers pins the revision to its commit before fetching
        return [f"{repo}@{HubStandIn.commit(repo, revision)}/config.json"]

    for name in ("mtp_refused", "pp_refused", "window_refused"):
        repo = f"stepfun-test/{name}"
        assert [f for f in fetched if f.startswith(f"{repo}@")] == only_config(repo, "main")
    repo = "stepfun-test/invalid_config"
    assert [f for f in fetched if f.startswith(f"{repo}@")] == only_config(repo, "broken")


def test_modelscope_repo_id_gets_the_decisions_of_the_checkpoint_directory(checkpoints, tmp_path):
    """With SGLANG_USE_MODELSCOPE, SGLang serves a repo id from the ModelScope cache when it is there
    (arg_groups/model_path_hook.handle_modelscope_paths); the policy reads the same copy."""
    cache = tmp_path / "modelscope"
    for name, ckpt in (("mtp_refused", "tiny"), ("invalid_config", "broken")):
        shutil.copytree(checkpoints[ckpt], cache / "models" / "stepfun-test" / name)
    cases = []
    for name in ("mtp_refused", "invalid_config"):
        ckpt, args, _ = CASES[name]
        cases += [{"name": f"dir:{name}", "model_path": str(checkpoints[ckpt]), "args": args},
                  {"name": f"ms:{name}", "model_path": f"stepfun-test/{name}", "args": args}]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_STEP35", "SGLANG_EXTERNAL"))}
    env.update(SGLANG_USE_MODELSCOPE="1", MODELSCOPE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = _run_probe(cases, env)
    assert "Step35MTPError" in out["ms:mtp_refused"]["error"]
    assert "moe_layers_enum" in out["ms:invalid_config"]["error"]
    for name in ("mtp_refused", "invalid_config"):
        assert out[f"ms:{name}"] == out[f"dir:{name}"]


def test_offline_the_cached_config_gives_the_same_decisions(decisions):
    """HF_HUB_OFFLINE=1 with the hub gone: the config cached by the online launch (at the revision
    asked for) is what both SGLang and the policy read."""
    out, _, cases, env = decisions
    names = ("mtp_refused", "invalid_config", "window_refused")
    offline = _run_probe([c for c in cases if c["name"].split(":")[1] in names],
                         dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"))
    for name in names:
        assert offline[f"hub:{name}"] == out[f"dir:{name}"]


@pytest.mark.server
def test_a_server_whose_policy_could_not_fetch_the_config_refuses_to_serve_step(tiny_dir, tmp_path):
    """`sglang serve --model-path <repo id>` where the policy's fetch of config.json fails (the hub
    answers "no access" once, as for a gated repo or a token not yet accepted) and SGLang's own fetch
    moments later succeeds: before, the server started without any of the policy's checks and
    defaults; now our model class refuses at construction, naming the repo, the failure and the fixes."""
    from reference.serving import CPU_ARGS, start_expecting_exit

    from sglang_step35.launch.marker import ALLOW_ENV
    from sglang_step35.server import SGLangServer

    repo = "stepfun-test/config-denied-once"
    with HubStandIn({repo: {"main": tiny_dir}}, deny_config_first={repo: 1}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        server = SGLangServer(repo, [*CPU_ARGS, "--dtype", "bfloat16"], env=env, startup_timeout=400)
        log = start_expecting_exit(server)
        fetched = hub.fetched_files()
    assert f"{repo}@{HubStandIn.commit(repo, 'main')}/config.json" in fetched  # SGLang's own fetch succeeded
    assert "Step35LaunchPolicyError: Step3p5ForCausalLM for " in log, log[-3000:]
    assert f"could not read the config.json of {repo}" in log
    assert "RepositoryNotFoundError" in log or "OSError" in log  # the failure, named
    assert "HF_HUB_OFFLINE=1" in log and f"{ALLOW_ENV}=1" in log
