"""The import contract of the two packages, read from the source (every import statement,
those inside functions too):

- mace_core is the method alone: it imports no ray, boto3/botocore, typer/click, and nothing
  of mace_ray;
- there are no import cycles between the project's modules;
- no module imports another module's private (``_name``) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("mace_core", "mace_ray")
FORBIDDEN_IN_CORE = ("ray", "boto3", "botocore", "typer", "click", "mace_ray")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [a.name for a in node.names]))
    return out


def project_edges() -> dict[str, set[str]]:
    mods = sources()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names in imports(path, name):
            # `from mace_ray.erase import artefacts` imports the module mace_ray.erase.artefacts.
            for n in names:
                if f"{target}.{n}" in mods:
                    edges[name].add(f"{target}.{n}")
            if target in mods and not any(f"{target}.{n}" in mods for n in names):
                edges[name].add(target)
    for name in edges:
        edges[name].discard(name)
    return edges


def test_mace_core_imports_no_orchestration():
    bad = []
    for name, path in sources().items():
        if not name.startswith("mace_core"):
            continue
        for target, _ in imports(path, name):
            if target.split(".")[0] in FORBIDDEN_IN_CORE:
                bad.append(f"{name} imports {target}")
    assert not bad, bad


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph (depth-first search; each found once per back edge)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(project_edges())
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_private_names_across_modules():
    mods = sources()
    bad = []
    for name, path in mods.items():
        for target, names in imports(path, name):
            if target in mods and target != name:
                bad += [
                    f"{name} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"
                ]
    assert not bad, bad


# The layers of mace_ray, lowest first: a package imports only from its own layer and the
# ones below it (storage <- engine <- erase <- eval <- audit <- cli). eval reads nothing of
# erase today, but may (an erase run is what it evaluates); audit builds on both.
LAYERS = ("storage", "engine", "erase", "eval", "audit", "cli")
MAX_LINES = 450


def layer(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "mace_ray" and len(parts) >= 3, f"{module} is not inside a mace_ray package"
    return LAYERS.index(parts[1])


def test_mace_ray_is_made_of_its_layer_packages():
    top = sorted(p.name for p in (ROOT / "mace_ray").iterdir() if not p.name.startswith(("_", ".")))
    assert top == sorted(LAYERS), top
    assert [p.name for p in (ROOT / "mace_ray").glob("*.py")] == ["__init__.py"]


def test_no_import_goes_up_a_layer():
    bad = []
    for name, targets in project_edges().items():
        if not name.startswith("mace_ray.") or name.count(".") < 2:
            continue
        for target in targets:
            if target.startswith("mace_ray.") and target.count(".") >= 2 and layer(target) > layer(name):
                bad.append(f"{name} imports {target}")
    assert not bad, bad


def test_the_layer_check_sees_an_upward_import():
    assert layer("mace_ray.storage.s3") < layer("mace_ray.engine.pool") < layer("mace_ray.cli.main")


def test_no_module_is_over_the_line_limit():
    long = {n: len(p.read_text().splitlines()) for n, p in sources().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, {
        n: k for n, k in long.items() if k > MAX_LINES
    }
