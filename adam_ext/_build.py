"""Where the CUDA toolkit is, shared by setup.py and adam_ext.load_jit (stdlib only: setup.py
loads this file by path, before torch.utils.cpp_extension is imported)."""
import os
import re
import shutil


def find_cuda_home():
    """The CUDA toolkit folder, or None (also None when ADAM_EXT_CPU_ONLY=1).

    torch.utils.cpp_extension guesses dirname(dirname(which nvcc)), which is wrong when nvcc on
    PATH is a wrapper script (/usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc "$@"`),
    so resolve wrappers here; callers export CUDA_HOME before torch reads it."""
    if os.environ.get("ADAM_EXT_CPU_ONLY") == "1":
        return None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            head = b""
        m = re.search(rb"(/\S+)/bin/nvcc\b", head) if head.startswith(b"#!") else None
        if m and os.path.isfile(m.group(1).decode() + "/bin/nvcc"):
            return m.group(1).decode()
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return "/usr/local/cuda" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None


def cuda_defines(arch_list):
    """Macros telling the C++ side it has CUDA kernels and for which archs (for build_info())."""
    token = "_".join("sm_" + a.replace(".", "").replace("+PTX", "")
                     for a in re.split(r"[;\s,]+", arch_list) if a)
    return ["-DADAM_WITH_CUDA", f"-DADAM_CUDA_ARCHS={token}"]
