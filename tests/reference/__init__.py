"""Test helpers around the plain-PyTorch Step-3.5 reference (`sglang_step35.reference`, no SGLang
import), the oracle of the parity tests.

Tests import it as `from reference import Step35Reference` (pytest puts tests/ on sys.path).
"""

from sglang_step35.reference import Step35Reference, llama3_inv_freq, rope_inv_freq

__all__ = ["Step35Reference", "llama3_inv_freq", "rope_inv_freq"]
