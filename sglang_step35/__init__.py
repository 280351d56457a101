"""sglang-step35: an SGLang 0.5.23 extension serving StepFun Step-3.5 / Step-3.5-Flash.

Importing this package has no side effects; SGLang calls :func:`sglang_step35.plugin.register`
through the ``sglang.srt.plugins`` entry point.
"""

__version__ = "0.1.0"
