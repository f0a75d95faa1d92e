"""The JAX and PyTorch backends mirror each other file for file.

For every module pair ``algorithms/jax/X.py`` ↔ ``algorithms/torch/X.py`` and
``problems/jax/ops.py`` ↔ ``problems/torch/ops.py`` the public top-level names (functions,
classes, module-level values; not imports) are the same, and every public function and
public method has the same signature on both sides: parameter names, order, kinds and
defaults (annotations may differ: they name each backend's array type; a module-level
alias such as ``sum = jnp.sum`` counts by its name only). The comparison
reads the source with :mod:`ast`, so it imports neither torch nor jax, and it is run on
a copy with one function renamed to prove that it catches a drift.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hypersweep

PACKAGE = Path(hypersweep.__file__).parent
ALGORITHMS = PACKAGE / "algorithms"


def _pairs() -> list[tuple[Path, Path]]:
    modules = sorted(p.name for p in (ALGORITHMS / "jax").glob("*.py"))
    pairs = [(ALGORITHMS / "jax" / m, ALGORITHMS / "torch" / m) for m in modules]
    return pairs + [(PACKAGE / "problems" / "jax" / "ops.py",
                     PACKAGE / "problems" / "torch" / "ops.py")]


def _signature(args: ast.arguments) -> str:
    """``(a, b=1, *, c, **kw)``-style text of a definition's parameters."""
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    parts = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        parts.append(arg.arg + ("" if default is None else f"={ast.unparse(default)}"))
        if args.posonlyargs and i == len(args.posonlyargs) - 1:
            parts.append("/")
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(arg.arg + ("" if default is None else f"={ast.unparse(default)}"))
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return f"({', '.join(parts)})"


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def public_api(source: str) -> dict[str, str]:
    """Public top-level name -> what it is: ``def (sig)``, ``class`` plus one entry per
    public method (``Class.method``), or ``value`` for a module-level assignment."""
    api: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            api[node.name] = "def " + _signature(node.args)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            api[node.name] = "class"
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and _public(item.name):
                    api[f"{node.name}.{item.name}"] = "def " + _signature(item.args)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and not target.id.startswith("_"):
                    api[target.id] = "value"
    return api


def drift(jax_source: str, torch_source: str) -> list[str]:
    """Every difference between the public APIs of two mirrored modules (empty: none).

    A module-level value matches a definition of the same name: ``sum = jnp.sum`` on one
    side and ``def sum(x, axis=None)`` on the other bind the same public name, and the
    source does not say the aliased function's signature.
    """
    a, b = public_api(jax_source), public_api(torch_source)
    out = [f"only in jax: {n}" for n in sorted(set(a) - set(b))]
    out += [f"only in torch: {n}" for n in sorted(set(b) - set(a))]
    out += [f"{n}: jax {a[n]} != torch {b[n]}" for n in sorted(set(a) & set(b))
            if a[n] != b[n] and "value" not in (a[n], b[n])]
    return out


def test_every_backend_module_has_its_mirror():
    jax_modules = {p.name for p in (ALGORITHMS / "jax").glob("*.py")}
    torch_modules = {p.name for p in (ALGORITHMS / "torch").glob("*.py")}
    assert jax_modules == torch_modules
    assert {"_core.py", "aid.py", "itd.py", "online.py", "stochastic.py"} <= jax_modules


@pytest.mark.parametrize("jax_path,torch_path", _pairs(),
                         ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_backends_have_the_same_public_api(jax_path, torch_path):
    found = drift(jax_path.read_text(), torch_path.read_text())
    assert found == [], f"{jax_path.name}: " + "; ".join(found)


def test_a_renamed_function_is_reported():
    """The check fails on drift: rename one solver, change one default, on copies."""
    jax_src = (ALGORITHMS / "jax" / "_core.py").read_text()
    torch_src = (ALGORITHMS / "torch" / "_core.py").read_text()
    assert "\ndef cg(" in jax_src and drift(jax_src, torch_src) == []
    renamed = jax_src.replace("\ndef cg(", "\ndef conjugate_gradient(")
    assert drift(renamed, torch_src) == ["only in jax: conjugate_gradient",
                                         "only in torch: cg"]
    changed = torch_src.replace("def fixed_point(matvec, b, *, max_iter, tol, v0=None)",
                                "def fixed_point(matvec, b, max_iter, tol, v0=None)")
    assert changed != torch_src
    assert drift(jax_src, changed) == [
        "fixed_point: jax def (matvec, b, *, max_iter, tol, v0=None) != "
        "torch def (matvec, b, max_iter, tol, v0=None)"]
    method = torch_src.replace("    def hvp(self, v):", "    def hvp(self, u):")
    assert drift(jax_src, method) == [
        "Linearization.hvp: jax def (self, v) != torch def (self, u)"]
