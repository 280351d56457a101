"""A Step-3.5 model is built only in a launch the launch policy decided on (sglang_step35/launch/marker.py).

When the policy cannot read a hub repo id's config.json (offline, no network, a gated repo) it used to
log a warning and let SGLang go on without any of its checks; SGLang's own fetch moments later may
succeed. The policy now records its outcome in the environment SGLang's processes inherit, and our
model classes refuse at construction unless it applied. The served case (a real `sglang serve` against
a hub whose first config.json answer is "no access") is in tests/test_launch_hub.py.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest

import gpu_contract
from sglang_step35.launch import marker, policy
from sglang_step35.launch.marker import ALLOW_ENV, MARKER_ENV, Step35LaunchPolicyError, require_launch_policy


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    from sglang_step35.config import Step35Config

    gpu_contract.sglang_world_of_one()
    return Step35Config(**json.loads((tiny_dir / "config.json").read_text()))


def test_the_policy_records_its_outcome_for_the_spawned_processes(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0")  # keep the CPU binding out of this test
    args = SimpleNamespace(model_path=str(tiny_dir), tp_size=1, pp_size=1, ep_size=1)
    policy.apply_server_policy(args)
    assert (MARKER_ENV, f"applied:{tiny_dir}") in os.environ.items()
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    policy.apply_server_policy(SimpleNamespace(model_path=str(tmp_path), tp_size=1))
    assert os.environ[MARKER_ENV] == f"not-step:{tmp_path}"
    # HF_HUB_OFFLINE=1 (tests/conftest.py) and nothing cached: the fetch fails, as on an offline node.
    policy.apply_server_policy(SimpleNamespace(model_path="stepfun-test/never-downloaded", tp_size=1))
    value = os.environ[MARKER_ENV]
    assert value.startswith("unread:stepfun-test/never-downloaded: ") and "Error" in value


@pytest.mark.parametrize("cls_name", ["Step3p5ForCausalLM", "Step3p5MTP"])
def test_our_classes_refuse_to_build_when_the_fetch_failed(cfg, monkeypatch, cls_name):
    from sglang_step35.models.step3p5 import Step3p5ForCausalLM
    from sglang_step35.models.step3p5_mtp import Step3p5MTP

    cls = {"Step3p5ForCausalLM": Step3p5ForCausalLM, "Step3p5MTP": Step3p5MTP}[cls_name]
    marker.record(marker.UNREAD, "stepfun-ai/Step-3.5-Flash", "OSError: we could not reach huggingface.co")
    with pytest.raises(Step35LaunchPolicyError) as e:
        cls(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{cls_name} for ")
    assert "could not read the config.json of stepfun-ai/Step-3.5-Flash" in msg
    assert "OSError: we could not reach huggingface.co" in msg
    for fix in ("local checkpoint directory as --model-path", "HF_HUB_OFFLINE=1", "HF_TOKEN", f"{ALLOW_ENV}=1"):
        assert fix in msg


def test_a_build_outside_any_launch_or_on_a_non_step_decision_is_refused(monkeypatch):
    monkeypatch.delenv(MARKER_ENV)
    with pytest.raises(Step35LaunchPolicyError, match="launch policy did not run for this launch"):
        require_launch_policy("Step3p5ForCausalLM")
    marker.record(marker.NOT_STEP, "/ckpt")
    with pytest.raises(Step35LaunchPolicyError, match="decided that /ckpt is not a Step-3.5 checkpoint"):
        require_launch_policy("Step3p5MTP")
    marker.record(marker.APPLIED, "/ckpt")
    require_launch_policy("Step3p5MTP")


def test_the_escape_variable_builds_with_a_warning(monkeypatch, caplog):
    marker.record(marker.UNREAD, "stepfun-ai/Step-3.5-Flash", "OSError: offline")
    monkeypatch.setenv(ALLOW_ENV, "1")
    logger = logging.getLogger("sglang_step35")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="sglang_step35"):
        require_launch_policy("Step3p5ForCausalLM")
    assert "building anyway" in caplog.text and "stepfun-ai/Step-3.5-Flash" in caplog.text


def test_sglangs_placeholder_resolution_is_no_launch_and_leaves_the_marker_alone():
    """SGLang's runtime_context.override_server_args resolves ServerArgs(model_path="dummy") (its
    absent-model sentinel) through the policy's hook; before, the policy looked "dummy" up on the hub,
    recorded the failure, and every Step-3.5 model built afterwards in that process was refused."""
    marker.record(marker.APPLIED, "/ckpt")
    for placeholder in ("dummy", "None"):
        policy.apply_server_policy(SimpleNamespace(model_path=placeholder, tp_size=1))
        assert os.environ[MARKER_ENV] == "applied:/ckpt"
    require_launch_policy("Step3p5ForCausalLM")
