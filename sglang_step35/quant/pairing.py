"""The CPU dequantizers' tensor pairing, as a checkpoint streams in (any order, any shard):

- :class:`WeightScalePairs`, formats whose quantized weight has exactly one scale tensor (block FP8,
  W8A8-INT8, MXFP4): pairs ``X.weight`` with its scale;
- :class:`ModuleParts`, formats whose quantized weight comes as several tensors per module (ModelOpt
  and compressed-tensors NVFP4): collects module X's parts until those its decode needs are in.

Each yields the fp32 weight under ``X.weight``; every other tensor passes through. A format subclasses
one with its suffixes, its weight dtype and its decode."""

from __future__ import annotations

from typing import Optional

import torch


class WeightScalePairs:
    FORMAT = ""  # the format's name in messages
    SCALE = ""  # the scale's suffix after the module name X (e.g. ".weight_scale")
    WEIGHT_DTYPE: torch.dtype
    ERROR_AT = ".weight"  # which part a decode error (mis-shaped scale) is reported under

    def __init__(self) -> None:
        self._w: dict[str, torch.Tensor] = {}
        self._s: dict[str, torch.Tensor] = {}
        self._problems: list[str] = []

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pair(self, base: str, q: torch.Tensor, scale: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        try:
            return [(base + ".weight", self.decode(q, scale))]
        except ValueError as e:
            self._problems.append(f"{base}{self.ERROR_AT}: {e}")
            return []

    def feed(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.endswith(self.SCALE):
            base = name[: -len(self.SCALE)]
            if base in self._w:
                return self._pair(base, self._w.pop(base), tensor)
            self._s[base] = tensor
            return []
        if name.endswith(".weight") and tensor.dtype == self.WEIGHT_DTYPE:
            base = name[: -len(".weight")]
            if base in self._s:
                return self._pair(base, tensor, self._s.pop(base))
            self._w[base] = tensor
            return []
        return [(name, tensor)]

    def problems(self) -> list[str]:
        return (list(self._problems)
                + [f"{k}.weight: {self.FORMAT} weight without {k}{self.SCALE}" for k in sorted(self._w)]
                + [f"{k}{self.SCALE}: scale without its {self.FORMAT} weight" for k in sorted(self._s)])


def split_part(name: str, parts: tuple[str, ...]) -> tuple[str, str]:
    """(module, part) of a checkpoint tensor name by the first of `parts` it ends with (list the
    longest suffix first); (name, "") for none."""
    for part in parts:
        if name.endswith(part):
            return name[: -len(part)], part
    return name, ""


class ModuleParts:
    """Collects each module's parts (``PARTS``, longest suffix first) and decodes the module once the
    parts :meth:`needs` names are in; ``DROPPED`` (a scale only GPU kernels read) may come before or
    after and is dropped. A decode error, or a second copy of a part, is reported under ``WEIGHT``."""

    PARTS: tuple[str, ...] = ()
    DROPPED = ""
    WEIGHT = ".weight"

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, torch.Tensor]] = {}
        self._done: set[str] = set()
        self._problems: list[str] = []

    def needs(self, parts: dict[str, torch.Tensor]) -> Optional[tuple[str, ...]]:
        """The parts the module's decode needs, given those in so far; None while that is not known."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def passes(self, part: str, tensor: torch.Tensor) -> bool:  # noqa: ARG002 (a format's dtype rule)
        """Whether a tensor is not a quantized module's part and passes through unchanged."""
        return not part

    def incomplete(self, base: str, parts: dict[str, torch.Tensor], needs: Optional[tuple[str, ...]]) -> str:
        raise NotImplementedError

    def feed(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        base, part = split_part(name, self.PARTS)
        if self.passes(part, tensor):
            return [(name, tensor)]
        if base in self._done:
            if part != self.DROPPED:
                self._problems.append(f"{name}: a second {part.lstrip('.')} for {base}")
            return []
        parts = self._parts.setdefault(base, {})
        parts[part] = tensor
        needs = self.needs(parts)
        if needs is None or any(p not in parts for p in needs):
            return []
        del self._parts[base]
        self._done.add(base)
        try:
            return [(base + ".weight", self.decode(parts))]
        except ValueError as e:
            self._problems.append(f"{base}{self.WEIGHT}: {e}")
            return []

    def problems(self) -> list[str]:
        return list(self._problems) + [self.incomplete(base, parts, self.needs(parts))
                                       for base, parts in sorted(self._parts.items())]
