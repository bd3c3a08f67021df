"""Python blocks of the docs: their imports and module attributes resolved, and the block run on tiny models
(tests/test_docs.py; the conventions are in docs/reliability.md, "Docs that are tested").

A block runs in a fresh namespace and a fresh working folder holding the fixtures below, made once per session
from tiny random models. The SD 1.5 and SDXL hub ids stand for the tiny pipelines of the same family, so a
block shows the names a user types and still runs offline. ```python no-run blocks are only resolved.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import types
from pathlib import Path

from conftest import randomize_adapters
from docs_markdown import Block

STAND_INS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny-sd15",
             "stabilityai/stable-diffusion-xl-base-1.0": "tiny-sdxl"}
ADAPTERS = {"outputs/sks-dog": ("a photo of sks dog", 1), "outputs/zwx-cat": ("a photo of zwx cat", 2)}


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise LookupError(f"`import {name}` fails: {err}") from None


def _attribute(owner, owner_name: str, name: str):
    """owner.name, importing a submodule of a package when that is what the name is."""
    if hasattr(owner, name):
        return getattr(owner, name)
    if hasattr(owner, "__path__"):  # a package: the name may be a submodule not imported yet
        try:
            return importlib.import_module(f"{owner.__name__}.{name}")
        except ModuleNotFoundError:
            pass
    raise LookupError(f"{owner_name} has no {name!r}")


def _bound_imports(tree: ast.AST) -> tuple[dict[str, object], list[tuple[int, str]]]:
    """{name: module or object} the block's imports bind, and (line, problem) for each that fails."""
    bound, problems = {}, []
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = _module(alias.name)
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module(alias.name.split(".")[0]))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                module = _module(node.module)
                for alias in node.names:
                    if alias.name != "*":
                        bound[alias.asname or alias.name] = _attribute(module, node.module, alias.name)
        except LookupError as err:
            problems.append((node.lineno, str(err)))
    return bound, problems


def resolution_problems(block: Block) -> list[str]:
    """`<file>:<line>: ...` for a syntax error, an import that fails, or an attribute of an imported module
    (`md.load_adapter`, `mole.attach_mole`) that does not exist. Names the block assigns are left alone."""
    try:
        tree = ast.parse(block.text)
    except SyntaxError as err:
        return [f"{block.where((err.lineno or 1) - 1)}: syntax error: {err.msg}"]
    bound, found = _bound_imports(tree)
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    modules = {name: value for name, value in bound.items() if name not in assigned}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in modules:
            continue
        owner, owner_name = modules[inner.id], inner.id
        try:
            for name in chain:
                if not isinstance(owner, types.ModuleType):
                    break  # past the modules: attributes of objects are the block's own business when it runs
                owner, owner_name = _attribute(owner, owner_name, name), f"{owner_name}.{name}"
        except LookupError as err:
            found.append((node.lineno, str(err)))
    return [f"{block.where(line - 1)}: {problem}" for line, problem in sorted(set(found))]


def _write_adapter(model: Path, folder: Path, prompt: str, seed: int) -> None:
    """A training output folder's adapter, with non-zero up weights so it changes what the model draws."""
    from diffusers import StableDiffusionPipeline

    import moslora_diffusion as md

    pipe = StableDiffusionPipeline.from_pretrained(model)
    md.attach_to_pipeline(pipe, md.AdapterConfig(kind="moslora", rank=4, alpha=4), unet_targets="attn",
                          text_targets="attn")
    randomize_adapters(pipe, seed=seed, std=0.1)
    md.save_adapter(pipe, folder / "moslora.safetensors", info={"instance_prompt": prompt})


def build_fixtures(root: Path, repo: Path, needed: set[str]) -> Path:
    """The fixtures a block may name, under root: tiny-sd15 always, tiny-sdxl only when `needed` has it."""
    from PIL import Image

    from moslora_diffusion.models.tiny import save_tiny_pipeline

    save_tiny_pipeline("sd15", root / "tiny-sd15")
    if "tiny-sdxl" in needed:
        save_tiny_pipeline("sdxl", root / "tiny-sdxl")
    (root / "photos").mkdir()
    for i in range(3):
        Image.effect_noise((48, 48), 60).convert("RGB").save(root / "photos" / f"{i}.png")
    for name, (prompt, seed) in ADAPTERS.items():
        (root / name).mkdir(parents=True)
        _write_adapter(root / "tiny-sd15", root / name, prompt, seed)
    shutil.copytree(root / "outputs" / "sks-dog", root / "tiny-run")
    return root


def workdir_for(fixtures: Path, repo: Path, folder: Path) -> Path:
    """A fresh working folder whose fixture names point (symlinks) at the shared fixtures."""
    folder.mkdir(parents=True)
    for entry in fixtures.iterdir():
        if entry.name != "outputs":
            os.symlink(entry, folder / entry.name, target_is_directory=entry.is_dir())
    (folder / "outputs").mkdir()
    for adapter in (fixtures / "outputs").iterdir():
        os.symlink(adapter, folder / "outputs" / adapter.name, target_is_directory=True)
    os.symlink(repo / "assets", folder / "assets", target_is_directory=True)
    return folder


def runnable_source(block: Block) -> str:
    """The block's code with the hub ids standing for the tiny models, padded so that line numbers in a
    traceback are the Markdown file's."""
    text = block.text
    for hub_id, stand_in in STAND_INS.items():
        text = text.replace(hub_id, stand_in)
    return "\n" * (block.line - 1) + text


def run_block(block: Block, workdir: Path) -> None:
    """Runs the block in `workdir` (the caller's working folder is restored); its exception propagates."""
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        code = compile(runnable_source(block), block.label, "exec")
        exec(code, {"__name__": "__docs__"})  # noqa: S102 - running the docs' own code is the point
    finally:
        os.chdir(previous)
