"""adam_ext: the fused purposive-pruning + InfoNCE op (docs/METHOD.md §4), CPU and CUDA.

    import adam_ext
    loss = adam_ext.info_nce(q, k, queue, temperature=0.2, threshold=0.8)
    loss, pruned_fraction = adam_ext.info_nce(q, k, queue, 0.2, 0.8, return_pruned=True)

Same contract as the readable reference `adam.info_nce` (tests/test_fused_op.py compares them;
`adam_ext.choose_path`, which adam.py calls, compares them again on the device before training).
The compiled library comes from `pip install --no-build-isolation -e .` (adam_ext._C). People
editing csrc/ can set ADAM_EXT_JIT=1 to compile it on import with ninja instead (load_jit()).
"""
import os

from . import ops

def load_jit(verbose=False):
    """Compile csrc/ with torch.utils.cpp_extension.load (ninja) and register the ops.
    Builds CUDA too when a toolkit is found (same rules as setup.py). Cached in
    TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), so a reload is quick.
    Call it only when adam_ext._C is not loaded: a namespace is registered once per process."""
    from torch.utils import cpp_extension

    from ._build import cuda_defines, find_cuda_home

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuda_home = find_cuda_home()
    sources = [os.path.join(root, "csrc", "info_nce.cpp")]
    cflags, cuda_flags = ["-O3"], ["-O3", "-lineinfo"]
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch read CUDA_HOME at its import; ours resolves wrappers
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        defines = cuda_defines(os.environ["TORCH_CUDA_ARCH_LIST"])
        sources.append(os.path.join(root, "csrc", "info_nce_cuda.cu"))
        cflags, cuda_flags = cflags + defines, cuda_flags + defines
    cpp_extension.load(name="adam_ext_jit_" + ("cuda" if cuda_home else "cpu"), sources=sources,
                       extra_cflags=cflags, extra_cuda_cflags=cuda_flags, with_cuda=bool(cuda_home),
                       is_python_module=False, verbose=verbose)


if os.environ.get("ADAM_EXT_JIT") == "1":
    load_jit(verbose=os.environ.get("ADAM_EXT_VERBOSE") == "1")
else:
    try:
        from . import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        ops.lib_error = e  # why the compiled op is missing, for build_info()

from .ops import build_info, info_nce, is_built  # noqa: E402
from .selfcheck import FusedOpError, choose_path, self_check  # noqa: E402

ops._register()


__all__ = ["info_nce", "is_built", "build_info", "load_jit", "self_check", "choose_path", "FusedOpError"]
