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


def _extension():
    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform != "darwin":
        # at::parallel_for is a header template that opens an OpenMP region in the caller's object
        # file: without -fopenmp here it would silently run on one thread.
        cxx_flags.append("-fopenmp")
    if _want_cuda():
        cu = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
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
