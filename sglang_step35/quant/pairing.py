"""The CPU dequantizer of the formats whose quantized weight has exactly one scale tensor (block FP8,
W8A8-INT8, MXFP4): pairs ``X.weight`` with its scale as they stream in, in either order, and yields
the fp32 weight under ``X.weight``; every other tensor passes through. A format subclasses it with
its scale suffix, its weight dtype and its decode (formats with more parts keep their own class)."""

from __future__ import annotations

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
