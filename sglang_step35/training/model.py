"""The trainable Step-3.5 (main layers + chained MTP layers) used by `step35 train-tiny`.

The forward is the plain reference model's (`sglang_step35.reference`, batched over [batch, time]);
this module adds only what training needs: the checkpoint tensors as trainable parameters (under the
real checkpoint names, so the trained weights are saved in the real layout), and the router bias,
which is not learned by gradient: like Step's aux-loss-free balancing it is nudged after each step
toward equal expert load (`update_router_bias`), from the loads the router recorded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sglang_step35.config import layer_spec
from sglang_step35.reference import Step35Reference


class _Tensors(Mapping):
    """Checkpoint name -> the module's live parameter / buffer (what the reference reads as `w`)."""

    def __init__(self, module: "TrainableStep35"):
        self._module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self._module, TrainableStep35._key(name))

    def __iter__(self):
        return iter(self._module.names)

    def __len__(self) -> int:
        return len(self._module.names)


class TrainableStep35(Step35Reference, nn.Module):
    """Step35Reference over fp32 trainable parameters; `model(ids)` -> (main logits, MTP logits)."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor]):
        nn.Module.__init__(self)
        self.n, self.m = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
        self.specs = [layer_spec(cfg, i) for i in range(self.n + self.m)]
        self.names = list(weights)
        for name, t in weights.items():
            if name.endswith("router_bias"):
                self.register_buffer(self._key(name), t.float().clone())
            else:
                self.register_parameter(self._key(name), nn.Parameter(t.float().clone()))
        self.setup(cfg, _Tensors(self), torch.float32)
        self.last_load: dict[int, torch.Tensor] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def state_in_checkpoint_layout(self) -> dict[str, torch.Tensor]:
        return {n: self.w[n].detach().clone() for n in self.names}

    def route(self, i: int, x: torch.Tensor):
        """The reference's router, recording each expert's load for `update_router_bias`."""
        ids, weights = super().route(i, x)
        self.last_load[i] = torch.bincount(ids.flatten(), minlength=self.cfg["moe_num_experts"]).float()
        return ids, weights

    @torch.no_grad()
    def update_router_bias(self, rate: float, layers=None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        for i, load in self.last_load.items():
            if layers is None or i in layers:
                bias = self.w[f"model.layers.{i}.moe.router_bias"]
                bias += rate * torch.sign(load.mean() - load)
