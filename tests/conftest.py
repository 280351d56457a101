"""Shared fixtures: tiny checkpoints and `sglang serve` processes (one per configuration per session).

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). A session-scoped
server fixture lives in one worker process, so every test that uses it is put into that server's
xdist group (SERVER_GROUPS): the server starts once per run, not once per worker. A test sharing a
module-scoped fixture (a module's own servers, a launch probe, a checkpoint) is grouped by module, so
module-scoped fixtures are built once as well; one that starts its own server per test runs on any
worker. Explicit
`@pytest.mark.xdist_group` marks win. Groups reach the scheduler through tests/xdist_groups.py.
"""

from __future__ import annotations

import os

# One OpenMP thread per process, waiting passively: on the 2-core CI machine two test workers each run
# in-process tests or drive a `sglang serve` whose scheduler, at torch's default, runs one thread per
# core; libgomp's active wait then spins on cores another process needs. Measured on 6 quantized
# servers on 2 workers: 15 % less wall and CPU time. Set before torch is imported here, inherited by
# the servers; a value already in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from sglang_step35.platform import current_platform  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What plugin.register() sets in every SGLang process on a GPU-less machine, set before any test
# module imports SGLang: SGLang reads it at import time (module-level `_is_cpu = is_cpu()`), so
# in-process layer tests (test_moe_gpu_contract) see the same platform as a served model.
if not current_platform().has_accelerator:
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

# Servers the tests start unpickle test-support classes sent with requests (the forced-output logit
# processor, tests/reference/forced_output.py) by module name: they need tests/ on their path too.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH")) if p)

from sglang_step35.tiny import TRAINED_TINY_DIR, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _triton_interpreter_restores_language():
    """Interpreted kernels must not leave triton.language patched for later GPU-target compiles."""
    from gpu_contract import scoped_device_function_patches

    with scoped_device_function_patches():
        yield


@pytest.fixture(scope="session", autouse=True)
def _launch_policy_applied_in_session():
    """Tests that build Step3p5ForCausalLM / Step3p5MTP in-process (SGLang's loader functions, the
    classes themselves) stand where a launch policy accepted the launch: its marker is set for the
    whole session — session-scoped, so module- and session-scoped fixtures that build a model see it
    too (a test of the refusal removes it with monkeypatch). A server a test starts runs its own
    policy, which overwrites the inherited value (sglang_step35/launch/marker.py)."""
    from sglang_step35.launch import marker

    before = os.environ.get(marker.MARKER_ENV)
    os.environ[marker.MARKER_ENV] = f"{marker.APPLIED}:in-process test"
    yield
    if before is None:
        os.environ.pop(marker.MARKER_ENV, None)
    else:
        os.environ[marker.MARKER_ENV] = before


@pytest.fixture(autouse=True)
def _launch_policy_applied(monkeypatch):
    """Per test as well: a test that runs the launch policy in-process (which records its own outcome
    in os.environ) or removes the marker leaves the next test the session's value (monkeypatch
    restores it at teardown)."""
    from sglang_step35.launch import marker

    monkeypatch.setenv(marker.MARKER_ENV, f"{marker.APPLIED}:in-process test")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The default tiny checkpoint (seed 0)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-seed0"), seed=0)


@pytest.fixture(scope="session")
def trained_dir():
    """The embedded trained tiny checkpoint (`step35 tiny OUT --trained`): writes GSM8K solutions and tool calls."""
    return TRAINED_TINY_DIR


def _xdist_group(item) -> str | None:
    shared = {SERVER_GROUPS[name] for name in item.fixturenames if name in SERVER_GROUPS}
    if len(shared) > 1:
        raise pytest.UsageError(f"{item.nodeid} uses servers of the xdist groups {sorted(shared)}: one test, one "
                                "group (merge the groups in tests/conftest.py SERVER_GROUPS)")
    if shared:
        return shared.pop()
    module = getattr(item, "module", None)
    if module is None:
        return None
    # A test that shares a module-scoped fixture (a module's own server or pool, a launch probe's
    # subprocess, a checkpoint) runs on that fixture's worker: xdist would otherwise build the fixture
    # once on every worker that gets one of the module's tests (the launch-decision probes of
    # test_launch_quant / test_launch_hub, 20-30 s each, ran twice). One that builds its own (the
    # servers of test_quant_served: one per format) is free to run on any worker.
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    shares = any(d.scope == "module" for name in item.fixturenames for d in defs.get(name, ()))
    return module.__name__ if shares else None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the groups into scopes
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None and (group := _xdist_group(item)):
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        # The groups reach xdist's scheduler on every pytest (tests/xdist_groups.py says why).
        from xdist_groups import XdistGroups

        config.pluginmanager.register(XdistGroups(config), "sglang-step35-xdist-groups")


# The tiny seed-0 checkpoint in fp32 behind plain `sglang serve`: the parity reference comparisons,
# the one-rank run the parallel layouts are compared with, and the hybrid SWA pool under load all
# read this one server. Its SWA pool is a quarter of a 2048-token full pool, so the load test runs
# under SWA pressure (tests/test_swa_pool_cpu.py).
TINY_FP32_FULL_TOKENS, TINY_FP32_SWA_RATIO = 2048, 0.25
TINY_FP32_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", str(TINY_FP32_FULL_TOKENS),
                  "--swa-full-tokens-ratio", str(TINY_FP32_SWA_RATIO), "--skip-server-warmup"]


@pytest.fixture(scope="session")
def served_tiny(tiny_dir):
    """`tiny_dir` behind `sglang serve` (TINY_FP32_ARGS)."""
    from sglang_step35.server import SGLangServer

    server = SGLangServer(str(tiny_dir), TINY_FP32_ARGS)
    server.start()
    yield server
    server.stop()


# The trained checkpoint's servers: fp32, so plain and MTP decoding round alike (the MTP tests compare
# them token for token), with the step3p5 parsers; one of each per session, shared by every file.
TRAINED_SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096",
                       "--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5"]
MTP3_ARGS = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
             "--speculative-num-draft-tokens", "4", "--enable-multi-layer-eagle"]
# The effort -> reasoning-token mapping the MTP server runs with (tests/test_parsers_reasoning_effort_e2e.py).
REASONING_EFFORT_BUDGETS = {"low": 8, "medium": 24}


@pytest.fixture(scope="session")
def served_trained(trained_dir):
    """The trained checkpoint behind plain `sglang serve --device cpu` with the step3p5 parsers."""
    from sglang_step35.server import SGLangServer

    # --enable-custom-logit-processor lets tests force the model's output text
    # (tests/reference/forced_output.py) to drive the parsers; --enable-cache-report gives the cached
    # share of each prompt to the agent-sessions bench's smoke run (tests/test_bench_agent.py).
    server = SGLangServer(str(trained_dir), [*TRAINED_SERVER_ARGS, "--enable-custom-logit-processor",
                                             "--enable-cache-report"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def served_trained_mtp3(trained_dir):
    """The same server with MTP-3 (multi-layer EAGLE) and no custom logit processors, the reasoning
    effort mapping set through its environment variable."""
    from sglang_step35.reasoning_effort import ENV
    from sglang_step35.server import SGLangServer

    server = SGLangServer(str(trained_dir), [*TRAINED_SERVER_ARGS, *MTP3_ARGS],
                          env={ENV: ",".join(f"{k}={v}" for k, v in REASONING_EFFORT_BUDGETS.items())})
    server.start()
    yield server
    server.stop()


# Session-scoped server fixture -> the xdist group of every test using it (a test using two of these
# servers needs them in one group).
SERVER_GROUPS = {"served_tiny": "served-tiny-fp32", "served_trained": "served-trained",
                 "served_trained_mtp3": "served-trained-mtp3"}
