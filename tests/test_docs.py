"""The docs tell the truth about the tree: every path and `ism_ext` name they give exists, and the layering
rule of docs/design.md holds for the package's imports."""

from __future__ import annotations

import ast
import glob
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# Where commands write their outputs: named in the docs, not part of the tree.
GENERATED = ("demo_out/", "build/", ".venv/", "out/", "runs/", "step-N/", "$OUT", "/tmp/")
SUFFIXES = (".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt", ".toml", ".json", ".jsonl", ".png", ".cfg")


def _names(doc: pathlib.Path) -> list[str]:
    text = doc.read_text()
    code_spans = re.findall(r"`([^`\n]+)`", text)
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    return code_spans + [str((doc.parent / link).resolve().relative_to(ROOT)) for link in links
                         if not link.startswith(("http", "#")) and (doc.parent / link).resolve().is_relative_to(ROOT)]


def _paths(doc: pathlib.Path) -> list[str]:
    found = []
    for name in _names(doc):
        token = name.split()[0].rstrip(".,:;")
        if "/" not in token or token.startswith(("http", "-", "torch.", "ism_ext.")) or token.startswith(GENERATED):
            continue
        if token.endswith("/") or token.endswith(SUFFIXES) or "*" in token:
            found.append(token)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    missing = []
    for path in _paths(doc):
        pattern = path.replace("{", "").replace("}", "")  # no brace sets in the docs' globs
        base = ROOT if not path.startswith(("cpu/", "cuda/")) else ROOT / "csrc"
        if not glob.glob(str(base / pattern)) and not glob.glob(str(ROOT / "csrc" / "cuda" / pattern)):
            missing.append(path)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_ism_ext_name_a_doc_gives_exists(doc):
    names = {m for name in _names(doc) for m in re.findall(r"\bism_ext(?:\.[A-Za-z_]\w*)+", name)}
    missing = sorted(n for n in names if not _resolve(n))
    assert not missing, f"{doc.name} names ism_ext modules or attributes that do not exist: {missing}"


# docs/design.md, "Layers": a layer imports only the layers above it in this list.
LAYERS = ["config", "perf", "masks", "ops", "turns", "cache", "integrations", "training", "integrations.trl",
          "inference", "cli"]
LOWEST = {"viz": "cli"}  # the last row of the list: commands and pictures


def _layer(parts: tuple[str, ...]) -> str | None:
    name = parts[0].removesuffix(".py")
    if name == "integrations" and len(parts) > 1 and parts[1].removesuffix(".py") == "trl":
        return "integrations.trl"  # TRL's trainers build on the project's training layer
    return LOWEST.get(name, name) if LOWEST.get(name, name) in LAYERS else None


def test_each_layer_imports_only_the_layers_above_it():
    package = ROOT / "ism_ext"
    wrong = []
    for file in package.rglob("*.py"):
        parts = file.relative_to(package).parts
        layer = _layer(parts)
        if layer is None or len(parts) == 1 and layer != "config":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                target = (list(parts[:-1])[: len(parts) - node.level] + (node.module or "").split("."))
                target = [t for t in target if t] or [alias.name for alias in node.names]
            elif node.module and node.module.startswith("ism_ext."):
                target = node.module.split(".")[1:]
            else:
                continue
            imported = _layer(tuple(target))
            if imported and LAYERS.index(imported) > LAYERS.index(layer):
                wrong.append(f"{file.relative_to(ROOT)} ({layer}) imports {'.'.join(target)} ({imported})")
    assert not wrong, "imports against the layering rule of docs/design.md:\n" + "\n".join(wrong)
