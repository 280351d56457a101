"""Plain-PyTorch Step-3.5 reference (no SGLang import), the oracle of the parity tests.

Tests import it as `from reference import Step35Reference` (pytest puts tests/ on sys.path).
"""

from .step35_ref import Step35Reference, llama3_inv_freq, rope_inv_freq

__all__ = ["Step35Reference", "llama3_inv_freq", "rope_inv_freq"]
