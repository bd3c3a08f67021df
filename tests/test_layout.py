"""The package's layering: every import points down, and no module imports itself back in a cycle.

Layers, bottom to top (a module may import its own subpackage and any lower layer, nothing else):
checks, console, files -> models, data -> moslora -> formats, generation -> toy -> evaluation -> training -> mole
-> composition -> app -> the package face and the commands (moslora_diffusion/*.py).
Inside training/, the rooms, bottom to top (a module may import its own room and any lower room):
settings -> run_folder -> model -> step -> trainer -> training/__init__ (the face).
docs/code-layout.md states the same tables. A TYPE_CHECKING import counts as a module-level import.
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
# Subpackages split into rooms, bottom to top; the subpackage's __init__ (its face) sits above every room.
ROOMS = {"training": {"settings": 0, "run_folder": 1, "model": 2, "step": 3, "trainer": 4}}
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
    # inside a function: imported when called. Everything else (a TYPE_CHECKING block too) is module level.
    lazy = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for inner in ast.walk(node)}
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
            found += [(t, node.lineno, id(node) not in lazy) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) not in lazy) for a in node.names]
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
    _fail_on_a_cycle(_sources())


def _fail_on_a_cycle(paths: list[Path]) -> None:
    graph = {_module_name(p): {t for t, _, top in _imports(p) if top} for p in paths}
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


def _room(module: str) -> tuple[str, str, int] | None:
    """(subpackage, room, rank) of a module of a subpackage with rooms; None for any other module."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in ROOMS:
        return None
    rooms = ROOMS[parts[1]]
    if len(parts) == 2:
        return parts[1], "__init__", len(rooms)
    assert parts[2] in rooms, f"{module}: not in any room of {parts[1]}/; add its folder to ROOMS (and the docs)"
    return parts[1], parts[2], rooms[parts[2]]


def _upward_room_imports(paths: list[Path]) -> list[str]:
    upward = []
    for path in paths:
        here = _room(_module_name(path))
        for target, line, _ in _imports(path):
            there = _room(target)
            if here and there and here[0] == there[0] and here[1] != there[1] and there[2] >= here[2]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here[1]}) imports {target} ({there[1]})")
    return upward


def test_every_import_between_rooms_points_down():
    upward = _upward_room_imports(_sources())
    assert not upward, "imports that do not point down between rooms:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", sorted(ROOMS))
def test_a_package_with_rooms_holds_its_face_and_its_rooms_only(package):
    folder = PACKAGE / package
    assert sorted(p.stem for p in folder.glob("*.py")) == ["__init__"]
    rooms = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert rooms == sorted(ROOMS[package])
    for room in rooms:  # each room says in one line what it holds, and hands nothing on
        tree = ast.parse((folder / room / "__init__.py").read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc.strip() and len(tree.body) == 1, f"{package}/{room}/__init__.py"


def test_the_room_table_sees_an_upward_import(monkeypatch):
    """The check can fail: a settings module importing the trainer's loop is reported; the reverse is not."""
    fake_low, fake_high = PACKAGE / "training" / "settings" / "x.py", PACKAGE / "training" / "trainer" / "x.py"
    sources = {fake_low: "from ..trainer.loop import train\n", fake_high: "from ..settings.config import TrainConfig\n"}
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: sources[self])
    assert _upward_room_imports([fake_high]) == []
    assert _upward_room_imports([fake_low]) == ["moslora_diffusion/training/settings/x.py:1 (settings) imports "
                                                "moslora_diffusion.training.trainer.loop (trainer)"]


def test_the_cycle_check_sees_a_type_checking_import(monkeypatch):
    """The check can fail: two modules that import each other, one only for type checking, are a cycle."""
    a, b = PACKAGE / "training" / "trainer" / "a.py", PACKAGE / "training" / "trainer" / "b.py"
    sources = {a: "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
               b: "from .a import A\n"}
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: sources[self])
    assert _imports(a) == [("moslora_diffusion.training.trainer.b", 3, True)]
    _fail_on_a_cycle([b])  # one side alone is no cycle
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*trainer.a -> .*trainer.b -> .*trainer.a"):
        _fail_on_a_cycle([a, b])
