"""The floors of ``tools/``: a module imports from its own package or from a lower floor, never from a higher one.

Each top-level part of ``tools/`` stands on one floor (:data:`FLOORS`, lowest first). An import from the same floor but
another part counts as an arrow sideways and is refused too, so that the order stays a ladder. Imports are read from the
source (``ast``), wherever they are written (top of the module or inside a function); nothing is imported here.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO_ROOT, "tools")

#: floor -> the parts of tools/ standing on it (a part is a sub-package or a top-level module)
FLOORS: Dict[int, Tuple[str, ...]] = {
    0: ("tools.common",),  # what several floors above share; imports nothing from tools/
    1: ("tools.data", "tools.weights", "tools.monailabel"),  # data preparation, weight import, the MONAI Label wrapper
    2: ("tools.bundles",),  # generating, verifying, packing and running the bundles
    3: ("tools.benchmarks", "tools.demo"),  # measurements; the quick start
    4: ("tools.experiments", "tools.gpu_check"),  # the paper's experiments (on the demo's presets); the GPU check
}
PART_FLOOR = {part: floor for floor, parts in FLOORS.items() for part in parts}


def part_of(module: str) -> Optional[str]:
    """``tools.data.fetch_demo_ct`` -> ``tools.data``; ``tools.demo`` -> ``tools.demo``; ``tools`` -> ``None``."""
    names = module.split(".")
    return ".".join(names[:2]) if names[0] == "tools" and len(names) > 1 else None


def tools_modules() -> Iterator[Tuple[str, str]]:
    """``(dotted name, path)`` of every ``.py`` file under ``tools/``."""
    for root, dirs, files in os.walk(TOOLS):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                yield ".".join(rel), path


def imported_tools_modules(module: str, path: str) -> List[Tuple[int, str]]:
    """``(line, dotted name)`` of each ``tools.*`` module that ``path`` imports (relative imports resolved;
    ``from tools import demo`` counts as ``tools.demo``)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "tools":  # from tools import demo, data
                found += [(node.lineno, f"tools.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if part_of(name)]


def test_every_part_of_tools_stands_on_a_floor():
    parts = {part_of(module) for module, _ in tools_modules()} - {None}
    missing = sorted(parts - set(PART_FLOOR))
    assert not missing, f"parts of tools/ on no floor: {missing}; add each to FLOORS in {__file__}"
    stale = sorted(set(PART_FLOOR) - parts)
    assert not stale, f"FLOORS names parts that tools/ no longer has: {stale}"


def test_no_import_from_a_higher_floor_or_a_sibling_on_the_same_floor():
    arrows = []
    for module, path in tools_modules():
        part = part_of(module)
        if part is None:  # tools/__init__.py
            continue
        for line, name in imported_tools_modules(module, path):
            target = part_of(name)
            if target == part:
                continue
            if target not in PART_FLOOR or PART_FLOOR[target] >= PART_FLOOR[part]:
                arrows.append(f"{os.path.relpath(path, REPO_ROOT)}:{line}: {part} (floor {PART_FLOOR[part]}) imports "
                              f"{name} (floor {PART_FLOOR.get(target, '?')})")
    assert not arrows, ("imports that do not go down the floors of tools/ (move what both need to a lower floor, "
                        "e.g. tools/common):\n" + "\n".join(arrows))


def test_the_import_reader_sees_function_level_relative_and_package_imports(tmp_path):
    source = "\n".join([
        "from tools import demo, data",
        "import tools.bundles.bundle_runner",
        "from .runner import x",
        "from . import tables",
        "def f():",
        "    from tools.experiments.visualize_reconstruction import region_offset",
        "import numpy",
    ])
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert [name for _, name in imported_tools_modules("tools.experiments.mod", str(path))] == [
        "tools.demo", "tools.data", "tools.bundles.bundle_runner", "tools.experiments.runner", "tools.experiments",
        "tools.experiments.visualize_reconstruction"]
