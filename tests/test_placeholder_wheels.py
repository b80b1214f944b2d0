"""tools/placeholder_wheels.py: metadata-only wheels that meet a requirement without installing any code."""

import base64
import hashlib
import pathlib
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import placeholder_wheels  # noqa: E402


def test_wheel_has_name_version_and_no_code(tmp_path):
    wheel = placeholder_wheels.write_wheel("llama-cpp-python", "0.3.36", tmp_path)
    assert wheel.name == "llama_cpp_python-0.3.36+placeholder-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = "llama_cpp_python-0.3.36+placeholder.dist-info"
        assert sorted(names) == [f"{info}/METADATA", f"{info}/RECORD", f"{info}/WHEEL"]
        metadata = archive.read(f"{info}/METADATA").decode().splitlines()
        assert "Name: llama-cpp-python" in metadata and "Version: 0.3.36+placeholder" in metadata
        # RECORD: every other file with its sha256 and size (pip checks them on install).
        for line in archive.read(f"{info}/RECORD").decode().splitlines():
            path, digest, size = line.split(",")
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = archive.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data)


def test_lists_in_the_repository_parse():
    entries = [e for f in sorted((ROOT / "tools" / "placeholders").glob("*.txt"))
               for e in placeholder_wheels.read_list(f)]
    assert ("torchvision", "0.28.0") in entries and ("llm", "0.36") in entries


def test_bad_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "list.txt"
    bad.write_text("# comment\ntorchvision>=0.28\n")
    with pytest.raises(ValueError, match=r"list.txt:2: expected 'name==version'"):
        placeholder_wheels.read_list(bad)
