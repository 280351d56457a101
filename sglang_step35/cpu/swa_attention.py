"""SGLang's hybrid SWA KV pool under its torch_native attention backend: sliding layers read their
KV at SWA-pool slots.

SGLang 0.5.23's ``TorchNativeAttnBackend`` writes a sliding layer's K/V at SWA-pool slots (it
translates ``out_cache_loc`` with the pool's ``translate_loc_from_full_to_swa``) but reads them back
through ``req_to_token``, which holds *full*-pool slots. The two allocators agree only until the
SWA pool frees out-of-window tokens; after that sliding layers read other requests' KV, or index
past the (smaller) SWA buffer and crash the scheduler (``IndexError: index 615 is out of bounds for
dimension 0 with size 615``). Its ``intel_amx`` backend does the translation (``_swa_kv_indices``
in ``layers/attention/intel_amx_backend.py``), but SGLang swaps intel_amx for torch_native on CPUs
without AMX.

:class:`SWATranslatingTorchNativeBackend` is torch_native with that one read fixed: for a layer the
pool maps to its SWA side, the batch's ``req_to_token`` rows go through SGLang's own full->SWA
mapping (the SWA allocator's ``full_to_swa_index_mapping``, via the pool's
``translate_loc_from_full_to_swa``) before torch_native gathers K/V; everything else (masks,
writes, full layers) is SGLang's code unchanged. Slots freed out of the window map to 0 (SGLang's
padding slot); the sliding mask never selects them, because SGLang keeps ``R + 1`` >= W keys per
request (attention/window.py). :func:`build_attention_backend` (an AROUND hook on SGLang's
backend factory, installed by the plugin on CPU) swaps it in only where the pool is hybrid.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

# The hook target (SGLang's backend factory) is registered in every process at plugin load;
# importing SGLang's attention modules costs seconds there, so the class is built on first use.


@functools.cache
def translating_backend_class() -> type:
    """The translating torch_native backend class, built on first use (SGLang imported lazily)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    class SWATranslatingTorchNativeBackend(TorchNativeAttnBackend):
        """torch_native whose sliding layers gather K/V at SWA-pool slots (see the module notes)."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            self._reading_swa_layer = False
            # (req_to_token, req_pool_indices, seq_lens, translated rows, row indices) of this forward:
            # every sliding layer of one forward reads the same rows, so they are translated once.
            self._swa_rows: Optional[tuple] = None

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            self._swa_rows = None

        def _is_swa_layer(self, layer) -> bool:
            return (
                self.use_sliding_window_kv_pool
                and not layer.is_cross_attention
                and self.token_to_kv_pool.layers_mapping[layer.layer_id][1]
            )

        def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
            self._reading_swa_layer = self._is_swa_layer(layer)
            try:
                return super().forward_extend(q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                self._reading_swa_layer = False

        def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
            self._reading_swa_layer = self._is_swa_layer(layer)
            try:
                return super().forward_decode(q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                self._reading_swa_layer = False

        def swa_rows(self, req_to_token, req_pool_indices, seq_lens):
            """This batch's ``req_to_token`` rows in the SWA pool's slot space, and the row indices that
            address them (0..batch-1): torch_native reads ``req_to_token[req_pool_indices[i], :len]``."""
            cached = self._swa_rows
            if cached is not None and cached[0] is req_to_token and cached[1] is req_pool_indices and cached[2] is seq_lens:
                return cached[3], cached[4]
            width = int(seq_lens.max()) if seq_lens.numel() else 0
            rows = self.token_to_kv_pool.translate_loc_from_full_to_swa(req_to_token[req_pool_indices, :width])
            indices = torch.arange(rows.shape[0], device=rows.device)
            self._swa_rows = (req_to_token, req_pool_indices, seq_lens, rows, indices)
            return rows, indices

        def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                     *args, **kwargs):  # fmt: skip
            if self._reading_swa_layer:
                req_to_token, req_pool_indices = self.swa_rows(req_to_token, req_pool_indices, seq_lens)
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, *args, **kwargs
            )

        def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                     *args, **kwargs):  # fmt: skip
            if self._reading_swa_layer:
                req_to_token, req_pool_indices = self.swa_rows(req_to_token, req_pool_indices, seq_lens)
            return super()._run_sdpa_forward_decode(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, *args, **kwargs
            )

    return SWATranslatingTorchNativeBackend


def build_attention_backend(original, *args, **kwargs) -> Any:
    """AROUND hook on SGLang's ``_build_full_attention_backend_from_str``: SGLang builds the backend;
    a plain torch_native one over a hybrid SWA pool is replaced by the translating subclass."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = original(*args, **kwargs)
    if type(backend) is TorchNativeAttnBackend and backend.use_sliding_window_kv_pool:
        model_runner = kwargs["model_runner"] if "model_runner" in kwargs else args[0]
        backend = translating_backend_class()(model_runner)
    return backend
