"""The package's layering: every import points down, and no module imports itself back in a cycle.

Layers, bottom to top (a module may import its own subpackage and any lower layer, nothing else):
checks, console, files -> models, data -> moslora -> formats, generation -> toy -> evaluation -> training -> mole
-> composition -> app -> the package face and the commands (moslora_diffusion/*.py). The README's "Code layout"
section states the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moslora_diffusion"
LAYERS = {"_version": 0, "checks": 0, "console": 0, "files": 0, "models": 1, "data": 1, "moslora": 2, "formats": 3,
          "generation": 3, "toy": 4, "evaluation": 5, "training": 6, "mole": 7, "composition": 8, "app": 9}
# evaluation/ scores with toy/'s checker and is used by training/ (--validation_metrics); mole/ trains its gates
# with training/'s loop.
TOP = 10  # __init__ (the public API) and the command modules at the root
COMMANDS = {"evaluate", "export", "generate", "tiny"}
# Command modules inside a package (`python -m moslora_diffusion.<package>`) sit at the top like the root commands.
PACKAGE_COMMANDS = {"moslora_diffusion.mole.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of this package in `path`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if target == "moslora_diffusion" or target.startswith("moslora_diffusion."):
                # `from pkg import module` imports the module itself
                targets = [f"{target}.{a.name}" if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")
                                                    ).with_suffix(".py").exists()
                           or (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()
                           else target for a in node.names]
            found += [(t, node.lineno, id(node) in top_level) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
    return [(t, line, top) for t, line, top in found if t.split(".")[0] == "moslora_diffusion"]


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 1 or module in PACKAGE_COMMANDS:
        return "face", TOP
    head = parts[1]
    if head in LAYERS:
        return head, LAYERS[head]
    assert head in COMMANDS, f"{module}: not in any layer; add its folder to LAYERS (and the README)"
    return head, TOP


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_points_down():
    upward = []
    for path in _sources():
        here, rank = _layer(_module_name(path))
        for target, line, _ in _imports(path):
            there, target_rank = _layer(target)
            if there != here and target_rank >= rank:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {_module_name(p): {t for t, _, top in _imports(p) if top} for p in _sources()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            nxt = nxt if nxt in graph else nxt.rpartition(".")[0]  # `from pkg.mod import name`
            if nxt not in graph or nxt == node:
                continue
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):  # a package's own __init__ is no cycle
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_root_holds_the_face_and_the_commands_only():
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert root == sorted({"__init__", "_version"} | COMMANDS)


def test_the_layer_table_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a formats module importing the app is reported."""
    fake = PACKAGE / "formats" / "x.py"
    assert _layer("moslora_diffusion.formats.x") == ("formats", 3)
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from ..app import ui\n")
    assert _imports(fake) == [("moslora_diffusion.app.ui", 1, True)]
    assert _layer("moslora_diffusion.app.ui")[1] > _layer("moslora_diffusion.formats.x")[1]
