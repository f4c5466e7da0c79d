"""Imports run one way: a module may import its own package and packages in lower layers, never higher.

Parses every module of lucid_megatron (and lucid_triton) with ``ast``, so it sees lazy imports inside
functions too.  The layers are docs/architecture.md's; ``KNOWN_UPWARD`` lists the edges that still point the
wrong way, each to be removed (issue 15), never added to.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    {"errors", "atomic", "timing"},
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


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                yield target
                if node.module is None:  # from . import x
                    yield from (f"{target}.{alias.name}" for alias in node.names)
            else:
                yield node.module


def _edges():
    for top, prefix in ((ROOT / "lucid_megatron", "lucid_megatron"), (ROOT / "kernels" / "lucid_triton", "lucid_triton")):
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top).with_suffix("")
            module = ".".join([prefix, *rel.parts]).removesuffix(".__init__")
            for target in _imports(path, module):
                if target and target.split(".")[0] in ("lucid_megatron", "lucid_triton") and target != "lucid_megatron":
                    yield str(path.relative_to(ROOT)), _unit(module), _unit(target)


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


def test_convert_and_eval_never_reach_into_the_training_driver():
    """Checkpoints are their own package, the local launcher is the runtime's: convert and eval need no train."""
    edges = {(src, dst) for _, src, dst in _edges()}
    assert {("convert", "train"), ("eval", "train")} & edges == set()


def test_known_exceptions_still_exist():
    """An exception that was fixed must leave the list, so it cannot come back silently."""
    edges = {(src, dst) for _, src, dst in _edges()}
    assert KNOWN_UPWARD <= edges, KNOWN_UPWARD - edges
