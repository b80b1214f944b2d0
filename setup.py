"""Builds `ism_ext._C`: a CUDA extension when torch has CUDA and nvcc is found, else CPU only.

Environment switches:
  ISM_EXT_FORCE_CPU=1     build the CPU-only extension even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (read by torch's BuildExtension),
                          e.g. "9.0a" for Hopper or "8.0;9.0a"
  CUTLASS_INCLUDE_DIR     the CUTLASS/CuTe headers (the folder that holds cute/ and cutlass/); without
                          it they are looked for in the installed `nvidia-cutlass` package
                          (cutlass_library/source/include; tools/find_cutlass.py, which CMake runs
                          too). The CI build needs neither.
  MAX_JOBS                parallel compile jobs (ninja)

The Hopper forward kernel (csrc/cuda/hopper_*.cu: TMA, wgmma, warp specialisation) is compiled only
into CUDA builds whose TORCH_CUDA_ARCH_LIST names 9.0a (wgmma and setmaxnreg need the arch-specific
target; plain 9.0 is not enough) and that find the CUTLASS headers; it then defines ISM_WITH_HOPPER_FWD
and runs when ISM_EXT_HOPPER_FWD=1 asks for it. Otherwise those files are left out, the build says why,
and the FA2-class kernel serves every GPU as before.
"""

import glob
import os
import re
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from find_cutlass import cutlass_include  # noqa: E402  (the CUTLASS search CMakeLists.txt runs too)


def _want_cuda() -> bool:
    if os.environ.get("ISM_EXT_FORCE_CPU", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _arch_list_has_sm90a() -> bool:
    """True when TORCH_CUDA_ARCH_LIST names 9.0a ("9.0a", "9.0a+PTX", among others split by ; or space)."""
    archs = re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    return any(a.split("+")[0].lower() == "9.0a" for a in archs if a)


def _hopper_sources() -> tuple[list[str], list[str]]:
    """(sources, flags) of the Hopper forward kernel for this build: both empty when it is left out."""
    cu = _sources("csrc/cuda/hopper_*.cu")
    include = cutlass_include()
    if not _arch_list_has_sm90a():
        print("ism_ext: Hopper forward kernel not built: TORCH_CUDA_ARCH_LIST does not name 9.0a "
              f"({os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')!r}); e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0a'")
        return [], []
    if include is None:
        print("ism_ext: Hopper forward kernel not built: no CUTLASS headers (set CUTLASS_INCLUDE_DIR or "
              "pip install nvidia-cutlass==4.2.0.0)")
        return [], []
    print(f"ism_ext: Hopper forward kernel built for sm_90a with CUTLASS from {include}")
    return cu, [f"-I{include}", "-DISM_WITH_HOPPER_FWD"]


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
        hopper_cu, hopper_flags = _hopper_sources()
        cu = [f for f in _sources("csrc/cuda/*.cu") if not os.path.basename(f).startswith("hopper_")] + hopper_cu
        cu += [f for f in _sources("csrc/cuda/*.cpp") if f not in cpp]
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *_abi_flag()]
        return CUDAExtension(
            "ism_ext._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx_flags + ["-DISM_WITH_CUDA", *hopper_flags],
                                "nvcc": nvcc_flags + ["-DISM_WITH_CUDA", *hopper_flags]},
        )
    return CppExtension("ism_ext._C", cpp, extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
