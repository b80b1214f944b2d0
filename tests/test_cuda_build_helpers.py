"""tools/find_cutlass.py, the CUTLASS header search that setup.py imports and CMakeLists.txt runs: the
folders it tries, in order, and what it prints. Runs everywhere (no CUDA needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import find_cutlass  # noqa: E402


def _headers(folder: Path) -> Path:
    """A fake CUTLASS include folder: what the search recognises it by (cute/tensor.hpp)."""
    (folder / "cute").mkdir(parents=True)
    (folder / "cute" / "tensor.hpp").write_text("// marker\n")
    return folder


@pytest.fixture
def no_wheel(monkeypatch):
    """No nvidia-cutlass wheel installed, whatever this interpreter has."""
    monkeypatch.setattr(find_cutlass.importlib.util, "find_spec", lambda name: None)


def test_given_folder_first_then_environment(tmp_path, monkeypatch, no_wheel):
    given, env = _headers(tmp_path / "given"), _headers(tmp_path / "env")
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", str(env))
    assert find_cutlass.cutlass_include([str(given)]) == str(given)
    assert find_cutlass.cutlass_include([]) == str(env)
    assert find_cutlass.cutlass_include([""]) == str(env)  # CMake's unset cache variable


def test_folder_without_the_headers_is_skipped(tmp_path, monkeypatch, no_wheel):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", str(tmp_path / "empty"))
    assert find_cutlass.cutlass_include([str(tmp_path / "missing")]) is None


def test_installed_wheel_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "cutlass_library"
    _headers(package / "source" / "include")
    spec = type("Spec", (), {"origin": str(package / "__init__.py")})()
    monkeypatch.setattr(find_cutlass.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.delenv("CUTLASS_INCLUDE_DIR", raising=False)
    assert find_cutlass.cutlass_include() == str(package / "source" / "include")


def test_command_line_prints_the_folder_or_an_empty_line(tmp_path, monkeypatch):
    found = _headers(tmp_path / "found")
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", "")
    script = str(ROOT / "tools" / "find_cutlass.py")

    def run(*folders: Path) -> str:
        return subprocess.run([sys.executable, script, *map(str, folders)], capture_output=True, text=True,
                              env=dict(os.environ), check=True).stdout

    assert run(found) == f"{found}\n"
    # Nothing given: the wheel of this interpreter, if it has one, else an empty line.
    assert run(tmp_path / "none") == (find_cutlass.cutlass_include([]) or "") + "\n"
