"""Builds `ism_ext._C`: a CUDA extension when torch has CUDA and nvcc is found, else CPU only.

Environment switches:
  ISM_EXT_FORCE_CPU=1     build the CPU-only extension even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (read by torch's BuildExtension),
                          e.g. "9.0a" for Hopper or "8.0;9.0a"
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("ISM_EXT_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _abi_flag() -> list[str]:
    # The libstdc++ ABI must be torch's: std::string and friends cross into libc10 and must have the
    # same layout on both sides. torch's own value, stated explicitly, whatever the compiler's default
    # and whether or not this torch's BuildExtension passes the flag itself.
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return [] if abi is None else [f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}"]


def _extension():
    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", *_abi_flag()]
    if sys.platform != "darwin":
        # at::parallel_for is a header template that opens an OpenMP region in the caller's object
        # file: without -fopenmp here it would silently run on one thread.
        cxx_flags.append("-fopenmp")
    if _want_cuda():
        cu = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *_abi_flag()]
        return CUDAExtension(
            "ism_ext._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx_flags + ["-DISM_WITH_CUDA"], "nvcc": nvcc_flags + ["-DISM_WITH_CUDA"]},
        )
    return CppExtension("ism_ext._C", cpp, extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
