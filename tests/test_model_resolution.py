"""Our draft class or a refusal, never SGLang's next to our target (issue #23, item 3).

SGLang's model registry skips an external model module that raises on import and resolves the name
to its built-in class. For the MTP draft that silently paired SGLang's `Step3p5MTP` (other window
convention, other layer ids) with our target. The resolution hook must turn a failed import of any
of our modules into that import error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import sys
BROKEN = "sglang_step35.models.step3p5_mtp"

class BreakOnImport:  # our MTP module raises on import, as a bug in it or a moved SGLang name would
    def find_spec(self, name, path=None, target=None):
        if name == BROKEN:
            raise ImportError("Step3p5MTP module failed to import (injected)")
        return None

sys.meta_path.insert(0, BreakOnImport())
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.models.registry import ModelRegistry
for arch in ("Step3p5ForCausalLM", "Step3p5MTP"):
    cls, _ = ModelRegistry.resolve_model_cls([arch])
    print("RESOLVED", arch, cls.__module__, flush=True)
"""


def test_our_mtp_module_failing_to_import_fails_its_resolution_with_that_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_STEP35", "SGLANG_EXTERNAL"))}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert "RESOLVED Step3p5ForCausalLM sglang_step35.models.step3p5" in r.stdout, r.stderr[-3000:]
    assert "RESOLVED Step3p5MTP" not in r.stdout  # not SGLang's draft beside our target
    assert r.returncode != 0
    assert "ImportError: Step3p5MTP module failed to import (injected)" in r.stderr


def test_the_checked_architectures_are_our_entry_classes():
    """Every module of our package with an EntryClass is checked, under the class's name (read from
    the source: importing the modules needs the CPU stand-in register() installs)."""
    from sglang_step35 import plugin

    models_dir = Path(plugin.__file__).parent / "models"
    entries = {}
    for f in models_dir.glob("*.py"):
        m = re.search(r"(?m)^EntryClass = (\w+)$", f.read_text())
        if m:
            entries[m.group(1)] = f.stem
    assert entries == plugin.OUR_ARCHITECTURES
