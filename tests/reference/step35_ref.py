"""The parity oracle lives in the package (`sglang_step35.reference`, SGLang-free); re-exported here
for the tests that import `reference.step35_ref`."""

from sglang_step35.reference import Step35Reference, apply_neox_rope, llama3_inv_freq, rope_inv_freq

__all__ = ["Step35Reference", "apply_neox_rope", "llama3_inv_freq", "rope_inv_freq"]
