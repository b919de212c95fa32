"""The package layout: megatron_speech's packages import each other in one direction only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_speech"


def _unit(module: str) -> str | None:
    """The layout unit of a dotted module name: its sub-package of megatron_speech (checkpoint, training, ...),
    or the top-level module itself (pretrain, finetune, ...); None outside megatron_speech or for the root."""
    parts = module.split(".")
    if parts[0] != "megatron_speech" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # `from megatron_speech import config` names a unit; `from megatron_speech.training import step` stays in one
    return [f"{target}.{alias.name}" for alias in node.names] if target == "megatron_speech" else [target]


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """unit -> the other units it imports (at any depth, function-level imports included), and for each edge the
    first import that makes it ("path:line")."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        unit = _unit(module)
        if unit is None:
            continue
        edges = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                target = _unit(name)
                if target is not None and target != unit:
                    edges.add(target)
                    where.setdefault((unit, target), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return graph, where


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_packages():
    graph, where = import_graph()
    assert {"checkpoint", "training", "parallel", "compat"} <= graph.keys()
    cycle = find_cycle(graph)
    if cycle is not None:
        steps = "\n".join(f"  {a} -> {b}  ({where[a, b]})" for a, b in zip(cycle, cycle[1:]))
        edges = "\n".join(f"  {unit} -> {', '.join(sorted(targets))}" for unit, targets in sorted(graph.items()))
        raise AssertionError(f"import cycle between packages: {' -> '.join(cycle)}\n{steps}\nimport graph:\n{edges}")


def _module_imports(path: Path) -> list[tuple[str, int]]:
    module = _module_name(path)
    return [(name, node.lineno) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            for name in _imported(node, module, path.name == "__init__.py")]


def test_no_module_over_450_lines():
    """A module a reader can hold in their head; a longer one is two ideas (split it)."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_data_reads_at_run_time_and_imports_no_model_but_the_masker():
    """data/ is what training reads at run time: it may use the masker and LayerDrop's draw (masks, distractors and
    skipped layers are drawn in the workers; both modules are numpy only) and the neutral modules, never the model,
    the trainer or the checkpoints."""
    allowed = {"megatron_speech.models.wav2vec2.masker", "megatron_speech.models.wav2vec2.layerdrop"}
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
             for path in sorted((PACKAGE / "data").rglob("*.py")) for name, line in _module_imports(path)
             if _unit(name) in {"models", "training", "checkpoint", "parallel", "compat"} and name not in allowed]
    assert not found, "\n".join(found)


def test_every_design_reference_points_into_the_repository():
    """Comments cite docs/design.md §N; a design file outside the clone helps no one."""
    root = PACKAGE.parent
    design = (root / "docs/design.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", design, flags=re.M)}
    stale, missing = [], []
    for path in [*root.glob("megatron_speech/**/*.py"), *root.glob("tools/**/*.py"), *root.glob("bench/*.py"),
                 *root.glob("tests/**/*.py"), *root.glob("launch/*"), *root.glob("docs/*.md"), root / "README.md"]:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "DESIGN" in line and path.name != "test_layout.py":
                stale.append(f"{path.relative_to(root)}:{i}")
        for m in re.finditer(r"design\.md §(\d+)", text):
            if int(m.group(1)) not in sections:
                missing.append(f"{path.relative_to(root)}: §{m.group(1)}")
    assert not stale, f"references to a design file outside the repository: {stale}"
    assert not missing, f"sections docs/design.md does not have: {missing}"
