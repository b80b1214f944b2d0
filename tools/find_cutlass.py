"""Where the CUTLASS/CuTe headers of the Hopper forward kernel are: the one search that setup.py
(imported) and CMakeLists.txt (run as a script) share.

The folder holds cute/ and cutlass/ (it is recognised by cute/tensor.hpp). Searched in order: the
folders given (setup.py gives none, CMake its ISM_CUTLASS_INCLUDE cache variable), the environment's
CUTLASS_INCLUDE_DIR, then the nvidia-cutlass wheel of the running interpreter
(cutlass_library/source/include; found, not imported).

    python tools/find_cutlass.py [FOLDER ...]   prints the folder, or nothing when there is none
"""

import importlib.util
import os
import sys

MARKER = os.path.join("cute", "tensor.hpp")


def candidate_folders(extra: list[str]) -> list[str]:
    """The folders to try, in order: `extra`, $CUTLASS_INCLUDE_DIR, the installed nvidia-cutlass wheel."""
    candidates = [path for path in extra if path]
    if os.environ.get("CUTLASS_INCLUDE_DIR"):
        candidates.append(os.environ["CUTLASS_INCLUDE_DIR"])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    return candidates


def cutlass_include(extra: list[str] | None = None) -> str | None:
    """The absolute CUTLASS include folder (the first candidate holding cute/tensor.hpp), or None."""
    for path in candidate_folders(extra or []):
        if os.path.isfile(os.path.join(path, MARKER)):
            return os.path.abspath(path)
    return None


if __name__ == "__main__":
    print(cutlass_include(sys.argv[1:]) or "")
