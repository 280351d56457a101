"""Pure-torch stand-ins for the `sgl_kernel` ops SGLang 0.5.23's CPU engine calls.

`sgl_kernel` ships only CUDA builds, so on a machine without a GPU it cannot even be imported, yet
SGLang's CPU engine imports a few `*_cpu` ops from it. `kernel_ops.py` holds our implementations (each
tested against a plain reference), `standin.py` the module/namespace objects that expose them as
`sgl_kernel.<op>` and `torch.ops.sgl_kernel.<op>`, and `overlay/` a directory that `plugin.py` puts
first on `sys.path` so spawned SGLang processes import the stand-in too.
"""
