"""Builds adam_ext._C, the fused pruned-InfoNCE op (csrc/).

    pip install --no-build-isolation -e .        # CUDA + CPU when a CUDA toolkit is found, else CPU only

The CUDA kernels are built whenever nvcc is found - not when a GPU is visible, because build
machines (CI's included) have the toolkit but no GPU. Where nvcc is found and compiling the .cu
fails, the build fails: a CUDA build break must not pass silently as a CPU-only build.
Environment:
  CUDA_HOME=/usr/local/cuda-13.0   the toolkit (else: nvcc on PATH, resolving wrapper scripts; else /usr/local/cuda)
  ADAM_EXT_CPU_ONLY=1              skip CUDA even when a toolkit is present (quick CPU-only builds)
  TORCH_CUDA_ARCH_LIST="8.0;9.0"   GPU archs (this default when unset: A100 and H100)
"""
import importlib.util
import os
import sys

from setuptools import setup


# adam_ext/_build.py by path: importing the package would need the extension we are building.
_spec = importlib.util.spec_from_file_location("adam_ext_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "adam_ext", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

cuda_home = _build.find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cxx_flags = ["-O3"]
if cuda_home:
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = _build.cuda_defines(archs)
    print(f"adam_ext: building CPU + CUDA with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs}", file=sys.stderr)
    ext = CUDAExtension(
        "adam_ext._C",
        ["csrc/info_nce.cpp", "csrc/info_nce_cuda.cu"],
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": ["-O3", "-lineinfo"] + defines},
    )
else:
    print("adam_ext: no CUDA toolkit found (or ADAM_EXT_CPU_ONLY=1): building the CPU kernel only", file=sys.stderr)
    ext = CppExtension("adam_ext._C", ["csrc/info_nce.cpp"], extra_compile_args={"cxx": cxx_flags})

# Name, version, dependencies and the modules installed: pyproject.toml. Here: the extension only.
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
