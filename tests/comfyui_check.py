"""Checks a ComfyUI API-format workflow against the node list in tests/data/comfyui_nodes.json (the core nodes of
the ComfyUI snapshot named there): every class exists, every required input is given, no input is unknown, every
link [node id, output index] resolves to an existing node's output of the type the input takes, and literal values
have their input's type (and lie in a COMBO's fixed options or a number's range)."""

from __future__ import annotations

import json
from pathlib import Path

NODE_LIST = Path(__file__).resolve().parent / "data" / "comfyui_nodes.json"
LITERAL = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def load_node_list() -> dict:
    return json.loads(NODE_LIST.read_text(encoding="utf-8"))


def _link_problem(workflow: dict, nodes: dict, where: str, value: list, expected: str) -> str | None:
    if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int):
        return f"{where}: a link is [node id (string), output index], got {value!r}"
    source = workflow.get(value[0])
    if source is None:
        return f"{where}: dangling link to node {value[0]!r}, which is not in the workflow"
    outputs = nodes.get(source["class_type"], {}).get("outputs", [])
    if not 0 <= value[1] < len(outputs):
        return f"{where}: node {value[0]} ({source['class_type']}) has no output {value[1]}"
    if outputs[value[1]] != expected:
        return f"{where}: takes {expected}, linked to a {outputs[value[1]]} output of node {value[0]}"
    return None


def _literal_problem(where: str, value, spec: dict) -> str | None:
    kind = spec["type"]
    if kind == "COMBO":
        if not isinstance(value, str):
            return f"{where}: a choice is a string, got {value!r}"
        if "options" in spec and value not in spec["options"]:
            return f"{where}: {value!r} is not one of its options"
        return None
    if kind not in LITERAL:
        return f"{where}: takes a {kind} link, got the literal {value!r}"
    if not isinstance(value, LITERAL[kind]) or (kind != "BOOLEAN" and isinstance(value, bool)):
        return f"{where}: takes {kind}, got {value!r}"
    if kind in ("INT", "FLOAT") and not spec.get("min", value) <= value <= spec.get("max", value):
        return f"{where}: {value} outside {spec.get('min')}..{spec.get('max')}"
    return None


def workflow_problems(workflow: dict, node_list: dict | None = None) -> list[str]:
    """Every problem found (empty: the workflow fits the node list)."""
    nodes = (node_list or load_node_list())["nodes"]
    problems = []
    for node_id, node in workflow.items():
        class_type = node.get("class_type")
        if class_type not in nodes:
            problems.append(f"node {node_id}: unknown class {class_type!r}")
            continue
        spec = nodes[class_type]
        accepted = spec["required"] | spec["optional"]
        inputs = node.get("inputs", {})
        problems += [f"node {node_id} ({class_type}): missing required input {name!r}"
                     for name in spec["required"] if name not in inputs]
        for name, value in inputs.items():
            where = f"node {node_id} ({class_type}) input {name!r}"
            if name not in accepted:
                problems.append(f"{where}: no such input")
                continue
            problem = (_link_problem(workflow, nodes, where, value, accepted[name]["type"]) if isinstance(value, list)
                       else _literal_problem(where, value, accepted[name]))
            if problem:
                problems.append(problem)
    return problems
