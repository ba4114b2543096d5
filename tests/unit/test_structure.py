"""The house rules that a reader of docs/architecture.md relies on, checked on the source itself (static, no imports):

* no import cycle among seqpar's modules (module-level imports; ``if TYPE_CHECKING:`` blocks excluded);
* nothing under ``seqpar/ops/`` imports ``torch.distributed``; nothing under ``seqpar/parallel/`` imports
  ``seqpar.models``; ``seqpar/config/`` knows no Hydra / OmegaConf;
* backends are records in a registry: no ``importlib`` or signature inspection in the attention or ring code;
* nothing reads the environment at import time (module-level statements and decorators of ``seqpar/``);
* every Python file of the project is under 400 lines.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "seqpar"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level(body):
    """Statements that run at import: the module body, descending into if/try/with (not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level(block)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)
        else:
            yield node


def _imported(node: ast.stmt, module: str) -> list[str]:
    """Absolute names an import statement brings in (``from a import b`` gives ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if MODULES.get(module, Path()).name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def _import_edges(name: str, tree: ast.Module, anywhere: bool = False) -> set[str]:
    edges = set()
    for node in (ast.walk(tree) if anywhere else _top_level(tree.body)):
        for target in _imported(node, name):
            if target in MODULES and target != name:
                edges.add(target)
    return edges


def _all_imports(tree: ast.Module, module: str) -> set[str]:
    return {t for node in ast.walk(tree) for t in _imported(node, module)}


@pytest.mark.parametrize("anywhere", [False, True], ids=["module_level", "including_lazy_imports"])
def test_no_import_cycles(anywhere):
    # Lazy imports inside functions count too: a cycle hidden behind one is still two modules that
    # cannot be understood apart (the config/rope circle was one).
    graph = {name: _import_edges(name, tree, anywhere) for name, tree in TREES.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("prefix,forbidden", [
    ("seqpar.ops", "torch.distributed"),
    ("seqpar.parallel", "seqpar.models"),
    ("seqpar.config", "hydra"),
    ("seqpar.config", "omegaconf"),
])
def test_layering(prefix, forbidden):
    bad = [f"{name} imports {t}" for name, tree in TREES.items() if name == prefix or name.startswith(prefix + ".")
           for t in sorted(_all_imports(tree, name)) if t == forbidden or t.startswith(forbidden + ".")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("prefix", ["seqpar.ops.attention", "seqpar.parallel"])
def test_backends_are_not_found_by_name_or_signature(prefix):
    bad = []
    for name, tree in TREES.items():
        if not (name == prefix or name.startswith(prefix + ".")):
            continue
        imports = _all_imports(tree, name)
        if "importlib" in imports or "inspect" in imports:
            bad.append(f"{name} imports importlib/inspect")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith" \
                    and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("sdpa"):
                bad.append(f"{name}:{node.lineno} tests a backend name prefix")
    assert not bad, "\n".join(bad)


def _reads_environment(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "getenv") and \
                isinstance(sub.value, ast.Name) and sub.value.id == "os":
            return True
    return False


def test_nothing_reads_the_environment_at_import():
    bad = []
    for name, tree in TREES.items():
        for node in _top_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # decorators and default values run at import; class bodies too
                parts = list(node.decorator_list)
                if isinstance(node, ast.ClassDef):
                    parts += [s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
                else:
                    parts += node.args.defaults + node.args.kw_defaults
                if any(p is not None and _reads_environment(p) for p in parts):
                    bad.append(f"{name}:{node.lineno}")
            elif not isinstance(node, (ast.Import, ast.ImportFrom)) and _reads_environment(node):
                bad.append(f"{name}:{node.lineno}")
    assert not bad, "environment read at import time in: " + ", ".join(bad)


def test_files_are_under_400_lines():
    files = [p for d in ("seqpar", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / "train.py"]
    long = [f"{p.relative_to(ROOT)}: {n}" for p in files if (n := len(p.read_text().splitlines())) >= MAX_LINES]
    assert not long, "files of 400 lines or more (split by concept): " + ", ".join(long)


def test_the_map_names_every_package():
    text = (ROOT / "docs" / "architecture.md").read_text()
    packages = sorted({".".join(n.split(".")[:2]) for n in MODULES if n.count(".") >= 1 and
                       (MODULES[n].name == "__init__.py" or n.count(".") == 1)})
    missing = [p for p in packages if p.split(".")[-1] + "/" not in text and p.split(".")[-1] + ".py" not in text]
    assert not missing, f"docs/architecture.md does not mention {missing}"
    assert os.path.isfile(ROOT / "docs" / "architecture.md")
