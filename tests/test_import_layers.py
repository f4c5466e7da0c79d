"""Imports run one way: a module may import its own package and packages in lower layers, never higher.

Parses every module of lucid_megatron (and lucid_triton) with ``ast``, so it sees lazy imports inside
functions too.  The layers are docs/architecture.md's; ``KNOWN_UPWARD`` lists the edges that still point the
wrong way, each to be removed (issue 15), never added to.  Inside one package the modules import each other
one way too: no cycle, however long.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"errors", "atomic", "timing", "numerics", "memory_estimate", "cli_args"},
    {"ops", "lucid_triton"},
    {"data"},
    {"config"},
    {"parallel"},
    {"model", "hf"},
    {"runtime"},
    {"checkpoint"},
    {"train"},
    {"convert"},
    {"eval", "launch"},
    {"experiment", "selftest", "demo"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

KNOWN_UPWARD: set = set()  # edges that still point the wrong way, to be removed; empty now


def _unit(module: str) -> str:
    """lucid_megatron.train.cli -> train; lucid_triton.solve -> lucid_triton; lucid_megatron -> __init__."""
    parts = module.split(".")
    if parts[0] == "lucid_triton":
        return "lucid_triton"
    return parts[1] if len(parts) > 1 else "__init__"


def _package(path: Path, module: str) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, relative levels resolved against ``package``."""
    if not node.level:
        return node.module
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, module: str):
    package = _package(path, module)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, package)
            yield target
            if node.level and node.module is None:  # from . import x
                yield from (f"{target}.{alias.name}" for alias in node.names)


def _modules():
    """(path, dotted module name) of every module; a package is named by its ``__init__.py``."""
    for top, prefix in ((ROOT / "lucid_megatron", "lucid_megatron"), (ROOT / "kernels" / "lucid_triton", "lucid_triton")):
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top).with_suffix("")
            yield path, ".".join([prefix, *rel.parts]).removesuffix(".__init__")


def _edges():
    for path, module in _modules():
        for target in _imports(path, module):
            if target and target.split(".")[0] in ("lucid_megatron", "lucid_triton") and target != "lucid_megatron":
                yield str(path.relative_to(ROOT)), _unit(module), _unit(target)


def _is_import_module_call(node: ast.AST) -> bool:
    """``importlib.import_module("a.b")`` or ``import_module(".b", __name__)`` with the name spelled out."""
    return (isinstance(node, ast.Call) and len(node.args) > 0 and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module")


def _module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports.  ``from P import x`` imports module ``P.x`` where
    there is one, else (x a name defined in P) module ``P``; ``import P.Q.R`` the longest prefix that is one."""
    modules = dict(_modules())
    known = set(modules.values())

    def longest_module(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for path, module in modules.items():
        package, targets = _package(path, module), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(longest_module(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else longest_module(base)
                               for alias in node.names)
            elif _is_import_module_call(node):  # importlib.import_module(".placement", __name__): lazy too
                name = node.args[0].value
                dots = len(name) - len(name.lstrip("."))
                base = package.split(".")[: len(package.split(".")) - dots + 1] if dots else []
                targets.add(longest_module(".".join(base + [name.lstrip(".")])))
        graph[module] = targets - {None, module}
    return graph


def _cycles_inside_packages(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among the modules of one package, each as [a, b, ..., a]; one per module not yet in a cycle."""
    cycles = []
    in_a_cycle: set[str] = set()
    for start in sorted(graph):
        if start in in_a_cycle:
            continue
        # breadth-first from `start` through its own package's modules, back to `start` (shortest cycle)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            targets = sorted(t for t in graph.get(path[-1], ()) if _unit(t) == _unit(start))
            if start in targets:
                cycles.append(path + [start])
                in_a_cycle.update(path)
                break
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    paths.append(path + [target])
    return cycles


def test_every_unit_has_a_layer():
    units = {u for _, src, dst in _edges() for u in (src, dst)}
    assert units - set(RANK) == set(), "add new packages to LAYERS (and docs/architecture.md)"


def test_no_upward_imports():
    upward = sorted({(path, src, dst) for path, src, dst in _edges()
                     if RANK[dst] > RANK[src] and (src, dst) not in KNOWN_UPWARD})
    assert upward == [], "module, its layer, the higher layer it imports"


def test_no_cycles_between_units_of_one_layer():
    edges = {(src, dst) for _, src, dst in _edges() if src != dst}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b and (a, b) not in KNOWN_UPWARD
                    and (b, a) not in KNOWN_UPWARD)
    assert cycles == []


def test_no_import_cycles_inside_a_package():
    """Module-level and lazy imports both count: a lazy import only hides a cycle until it runs."""
    cycles = _cycles_inside_packages(_module_graph())
    assert cycles == [], "import cycles inside a package: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_cycles():
    graph = {"lucid_megatron.convert.a": {"lucid_megatron.convert.b"},
             "lucid_megatron.convert.b": {"lucid_megatron.convert.c", "lucid_megatron.model.x"},
             "lucid_megatron.convert.c": {"lucid_megatron.convert.a"},
             "lucid_megatron.model.x": {"lucid_megatron.convert.a"}}
    cycle = ["lucid_megatron.convert.a", "lucid_megatron.convert.b", "lucid_megatron.convert.c"]
    assert _cycles_inside_packages(graph) == [cycle + cycle[:1]]


def test_convert_and_eval_never_reach_into_the_training_driver():
    """Checkpoints are their own package, the local launcher is the runtime's: convert and eval need no train."""
    edges = {(src, dst) for _, src, dst in _edges()}
    assert {("convert", "train"), ("eval", "train")} & edges == set()


def test_known_exceptions_still_exist():
    """An exception that was fixed must leave the list, so it cannot come back silently."""
    edges = {(src, dst) for _, src, dst in _edges()}
    assert KNOWN_UPWARD <= edges, KNOWN_UPWARD - edges
