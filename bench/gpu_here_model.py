"""`model` step of bench/gpu_check_here.py: whether SGLang's model runtime and our Step3p5ForCausalLM
import on this image (SGLang from the carried bundle, its CUDA-only packages absent). Where the import
fails, the step reports the missing piece (the first module that could not be found and the chain of
SGLang modules that needed it); that is the finding the borrowed machine can give today."""

from __future__ import annotations

import traceback

from gpu_here_common import CannotRun


def run(device: str) -> dict:
    try:
        import sglang.srt.model_executor.model_runner  # noqa: F401

        import sglang_step35.models.step3p5  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the reason is the result
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/sglang/" in f.filename]
        chain = " <- ".join(f"{f.filename.split('/sglang/', 1)[1]}:{f.lineno}" for f in reversed(frames[-4:]))
        raise CannotRun(f"SGLang's model runtime does not import here: {type(e).__name__}: {e} (via {chain})") from e
    # Running the model needs a ModelRunner with an attention backend, KV pools and SGLang's CUDA-graph
    # runner; on this image those reach sgl_kernel/flashinfer, which cannot travel. Say so, not pass.
    raise CannotRun(f"SGLang's model runtime imports on {device}; building a ModelRunner for a decode run "
                    "is not part of this check yet (its attention/sampling backends need sgl_kernel or flashinfer)")
