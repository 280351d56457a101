"""The vocabulary of the allow-list (sglang_step35/served.py): platforms, the flags a row judges, one
combination (:class:`Setting`), what a row may require (:class:`Condition`) and the row itself
(:class:`Row`). served.py holds the table and its lookups and re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

PLATFORMS = ("nvidia", "amd", "cpu")
GPUS = ("nvidia", "amd")

RUNNER = "--moe-runner-backend"
A2A = "--moe-a2a-backend"
QUANT = "quantization"
REDUNDANT = "--ep-num-redundant-experts"
EPLB = "--enable-eplb"
INIT_LOCATION = "--init-expert-location"
FLAGS = (RUNNER, A2A, QUANT, REDUNDANT, EPLB, INIT_LOCATION)


class NotServedError(NotImplementedError):
    """A combination outside the allow-list; the message names the setting and what to use instead."""


@dataclass(frozen=True)
class Setting:
    """One combination, as the launch policy reads it from the flags or the model from SGLang's
    runtime. ``quant``: :func:`quant_label`; ``clamped_layers``: the MoE layers with a SwiGLU clamp
    (at construction, the layer being built if it clamps)."""

    platform: str
    moe_runner_backend: str = "auto"
    moe_a2a_backend: str = "none"
    quant: str = "bf16"
    aiter: bool = False
    clamped_layers: tuple[int, ...] = ()
    ep_num_redundant_experts: int = 0
    enable_eplb: bool = False
    init_expert_location: str = "trivial"
    # SGLang's quantization method: `--quantization` at launch, `quant_config.get_name()` when the
    # model is built ("" for none). Which int4 MoE SGLang runs depends on it (moe_wna16: Triton).
    quant_method: str = ""

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"unknown platform {self.platform!r}; expected one of {PLATFORMS}")

    def value(self, flag: str) -> str:
        """The setting's value for ``flag``, as the table names it."""
        if flag == REDUNDANT:
            return "0" if int(self.ep_num_redundant_experts or 0) == 0 else "N > 0"
        if flag == EPLB:
            return "on" if self.enable_eplb else "off"
        if flag == INIT_LOCATION:
            return "trivial" if (self.init_expert_location or "trivial") == "trivial" else "a file or json"
        return {RUNNER: self.moe_runner_backend, A2A: self.moe_a2a_backend, QUANT: self.quant}[flag]

    def shown(self, flag: str) -> str:
        """The value as the user wrote it (for messages)."""
        if flag == REDUNDANT:
            return str(self.ep_num_redundant_experts)
        if flag == INIT_LOCATION:
            return str(self.init_expert_location)
        return self.value(flag)


class Condition(NamedTuple):
    """What a row's ``when`` requires: ``meaning`` (for docs), ``holds`` (its test on a Setting) and,
    for a condition that is a launch flag, the Setting ``fields`` it sets and the `sglang serve`
    ``words`` that set it (what `step35 plan` adds to a format's command, :func:`serving_flags`)."""

    meaning: str
    holds: Callable[[Setting], bool]
    fields: tuple[tuple[str, str], ...] = ()
    words: tuple[str, ...] = ()


def _launch_flag(meaning: str, field: str, value: str, flag: str) -> Condition:
    """A condition that holds when ``flag value`` was given (the Setting's ``field`` is ``value``)."""
    return Condition(meaning, lambda s: getattr(s, field) == value, ((field, value),), (flag, value))


# Conditions a row may require (its ``when``), by name.
CONDITIONS: dict[str, Condition] = {
    "clamped": Condition("the checkpoint has SwiGLU-clamped MoE layers (Step-3.5-Flash: 43, 44)",
                         lambda s: bool(s.clamped_layers)),
    "aiter+clamped": Condition("SGLANG_USE_AITER=1 and SwiGLU-clamped MoE layers",
                               lambda s: s.aiter and bool(s.clamped_layers)),
    "moe_wna16": _launch_flag("--quantization moe_wna16 (SGLang's MoeWNA16 method)", "quant_method", "moe_wna16",
                              "--quantization"),
    "triton-runner": _launch_flag("--moe-runner-backend triton", "moe_runner_backend", "triton", RUNNER),
}


@dataclass(frozen=True)
class Row:
    """``values`` of ``flag`` on ``platforms`` (only when ``when`` holds): served or refused.

    ``note``: served, what computes Step's router and clamp; refused, what would go wrong (it may
    name ``{layers}`` and ``{quant}``). ``instead``: what to use (refused rows). ``test``: the test
    that verifies the served cell through its contract, or that pins the refusal."""

    flag: str
    values: tuple[str, ...]
    platforms: tuple[str, ...]
    served: bool
    note: str
    test: str
    instead: str = ""
    when: Optional[str] = None
