"""The package's shape: no import cycles, imports run one way between the parts, the map in the docs is true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import sfd_fast

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sfd_fast"
KERNELS = ROOT / "kernels"  # installed as sfd_fast.kernels

# Which parts each part may import (top to bottom; cli may use everything). Function-level
# imports count too: a lazy import is still a dependency.
ALLOWED = {
    "kernels": set(),
    "io": set(),
    "models": {"io"},
    "core": {"io", "models", "kernels"},
    "train": {"io", "models", "core"},
    "baselines": {"io", "models", "core"},
    "eval": {"io", "models", "core", "baselines"},  # the comparison trains the baselines
    "serve": {"io", "models"},
    "cli": {"io", "models", "core", "kernels", "train", "baselines", "eval", "serve"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((PACKAGE, "sfd_fast"), (KERNELS, "sfd_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of this package it imports (anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import module` depends on the module, `from module import name` on it
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 40, "the walk found too few modules: is the test reading the right tree?"
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    # The detector itself must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parts_import_one_way():
    bad = []
    for module, targets in _import_graph().items():
        part = _part(module)
        if part is None:  # sfd_fast/__init__.py: the public surface re-exports from every part
            continue
        assert part in ALLOWED, f"{module} is in an unknown part {part!r}: add it to ALLOWED and to the docs"
        for target in targets:
            other = _part(target)
            if other not in (None, part) and other not in ALLOWED[part]:
                bad.append(f"{module} -> {target}")
    assert bad == [], "imports against the layering (see docs/architecture.md):\n" + "\n".join(bad)


def test_architecture_doc_maps_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = {m for m in re.findall(r"`([a-z0-9_]+/[a-z0-9_]+\.py)`", doc) if m.split("/")[0] in ALLOWED}
    actual = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    actual |= {f"kernels/{p.name}" for p in KERNELS.glob("*.py") if p.name != "__init__.py"}
    assert sorted(actual - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - actual) == [], "docs/architecture.md names modules that do not exist"


def test_public_api_is_importable_and_documented():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in sfd_fast.__all__:
        assert getattr(sfd_fast, name) is not None
        assert f"`{name}`" in doc, f"sfd_fast.{name} is public but not in docs/architecture.md"
    for name in ("train_step", "SFDConfig", "SFDState", "StepOptions", "load_denoiser", "save_generator",
                 "load_generator"):
        assert name in sfd_fast.__all__


def test_repository_kernels_dir_imported_as_top_level_kernels_registers_nothing():
    """From the repository root, ``kernels/`` is also importable as a top-level ``kernels`` (python -m
    puts the working directory on sys.path), and transformers imports that name to probe for the
    Hugging Face package. Running our modules a second time re-registered every sfd_fast:: custom
    op and freed the first registration under the ops already bound (``ValueError: vector::reserve``
    or a segfault on their first call, at random). Under that name the package runs none of our
    modules: it is the real Hugging Face package where one is installed (transformers >= 5.25
    depends on it and imports from it), and empty otherwise."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.setdefault('TRITON_INTERPRET', '1')\n"
        "import torch._library.custom_ops as co, sfd_fast.kernels\n"
        "libs = {k: id(v) for k, v in co.OPDEF_TO_LIB.items() if k.startswith('sfd_fast::')}\n"
        "import kernels\n"
        "after = {k: id(v) for k, v in co.OPDEF_TO_LIB.items() if k.startswith('sfd_fast::')}\n"
        "assert libs and after == libs, 'custom ops were registered again'\n"
        "assert not hasattr(kernels, 'sid_generator_loss')\n"
        "import importlib.metadata as md, os\n"
        "try:\n"
        "    md.version('kernels')\n"
        "except md.PackageNotFoundError:\n"
        "    assert kernels.__path__ == []\n"
        "else:\n"
        "    assert not os.path.realpath(kernels.__file__).startswith(os.path.realpath(os.getcwd()))\n"
        "    from diffusers import UNet2DModel  # imports transformers' hub_kernels, which imports kernels\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
