"""No hidden global state: importing hypersweep changes no JAX setting, float32 and
float64 problems run in one process in either order, devices are chosen once per problem,
optional problem functions are declared (never probed), caches are bounded, and every
derived seed comes from :mod:`hypersweep.seeding`.

The import and dtype-order checks run in fresh interpreters: the order in which JAX first
sees a float32 and a float64 problem is the point, and this process has seen both.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.pipelines.common import LruCache
from hypersweep.problems.base import DEVICE_ENV, declared_hooks
from hypersweep.registry import ProblemSpec
from hypersweep.seeding import derive_seed, seed_from_text

SMALL_RIDGE = dict(n_features=3, n_train=20, n_val=10)


def _run(*parts: str) -> str:
    """Run the ``parts`` of a script, each dedented, in a fresh interpreter; its stdout
    (it fails the test if the script fails)."""
    import os

    code = "\n".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# JAX cells through the hypergradient_error pipeline (warm-up cache, problem cache) and the
# estimator called directly, for each dtype of DTYPES in turn, in one process. (PyTorch
# keeps no dtype state; its float32/float64 problems share this process in the tests below.)
_CELLS = """
    import json
    import numpy as np
    from hypersweep import algorithms, problems
    from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell

    PARAMS = dict(n_features=3, n_train=20, n_val=10)
    out = []
    for dtype in DTYPES:
        for backend in ("jax",):
            p = problems.make("ridge", backend=backend, dtype=dtype, **PARAMS)
            lam = p.initial_hyperparams()
            est = algorithms.get("aid_exact", backend)(p, p.as_lam(lam), t=200)
            g = p.ops.to_numpy(est.hypergrad)
            g_star = p.exact_hypergradient(lam)
            row = run_cell(Cell(study="dtypes", pipeline="hypergradient_error",
                                problem="ridge", algorithm="aid_exact", backend=backend,
                                t=200, K=None, seed=0, dtype=dtype,
                                problem_params=canonical_json(PARAMS)))[0]
            out.append(dict(dtype=dtype, backend=backend,
                            result=str(est.hypergrad.dtype), w=str(est.w_t.dtype),
                            arrays=str(p.arrays["X_train"].dtype),
                            rel=float(np.linalg.norm(g - g_star) / np.linalg.norm(g_star)),
                            status=row["status"], row_rel=row["hypergrad_rel_error"],
                            row_dtype=row["dtype"]))
    print(json.dumps(out))
"""


def _check_cells(stdout: str, dtypes: list[str]) -> None:
    import json

    rows = json.loads(stdout.strip().splitlines()[-1])
    assert [r["dtype"] for r in rows] == dtypes
    for r in rows:
        assert r["status"] == "ok" and r["row_dtype"] == r["dtype"], r
        for key in ("result", "w", "arrays"):
            assert r[key] == r["dtype"], (key, r)
        if r["dtype"] == "float64":
            # aid_exact at t = 200 on a well-conditioned ridge: converged to float64 rounding
            assert r["rel"] <= 1e-10 and r["row_rel"] <= 1e-10, r
        else:
            assert r["rel"] <= 1e-4 and r["row_rel"] <= 1e-4, r


def test_imports_leave_x64_off_then_float32_float64_float32_in_one_process():
    """Importing hypersweep (every JAX module included) changes no JAX setting and the
    user's own float32 program stays float32; then float32 → float64 → float32 cells."""
    out = _run("""
        import importlib, pkgutil
        import jax, jax.numpy as jnp
        import hypersweep, hypersweep.problems, hypersweep.algorithms
        import hypersweep.problems.jax.ops
        import hypersweep.algorithms.jax as backend
        for info in pkgutil.iter_modules(backend.__path__):
            importlib.import_module(f"hypersweep.algorithms.jax.{info.name}")
        import hypersweep.pipelines.hypergradient_error, hypersweep.pipelines.blackbox
        assert not jax.config.jax_enable_x64
        x = jnp.asarray([0.5, 1.5, 2.5])  # the user's own program, after the imports
        y = jax.jit(lambda v: jnp.sum(v * v) / 3.0)(x)
        assert x.dtype == jnp.float32 and y.dtype == jnp.float32, (x.dtype, y.dtype)
        assert jnp.zeros(2).dtype == jnp.float32
        DTYPES = ["float32"]
    """, _CELLS, """
        assert not jax.config.jax_enable_x64  # float32 problems and cells leave it off too
        DTYPES = ["float64", "float32"]
    """, _CELLS)
    first, second = out.strip().splitlines()[-2:]
    _check_cells(first, ["float32"])
    _check_cells(second, ["float64", "float32"])


def test_float64_first_switches_x64_at_build_never_silently_then_float32():
    out = _run("""
        import jax
        import numpy as np
        from hypersweep.problems.jax import ops
        try:
            ops.asarray(np.ones(2), "float64", device=jax.devices()[0])
        except RuntimeError as exc:
            print("refused:", "jax_enable_x64" in str(exc))
        from hypersweep import problems
        p = problems.make("ridge", backend="jax", dtype="float64", n_features=3,
                          n_train=20, n_val=10)
        print(jax.config.jax_enable_x64, p.arrays["X_train"].dtype, p.w_init.dtype,
              p.as_lam(p.initial_hyperparams()).dtype)
        DTYPES = ["float64", "float32"]
    """, _CELLS)
    assert out.split("\n")[:2] == ["refused: True", "True float64 float64 float64"]
    _check_cells(out, ["float64", "float32"])


# -- devices -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_device_is_chosen_once_per_problem_and_carried_by_its_ops(backend, monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    p = problems.make("ridge", backend=backend, dtype="float64", device="cpu", **SMALL_RIDGE)
    assert p.ops.device == p.device and p.ops.device_name() == "cpu"

    def place(array):
        return array.device if backend == "torch" else next(iter(array.devices()))

    for array in (p.arrays["X_train"], p.w_init, p.ops.asarray(np.ones(3)), p.ops.zeros(3)):
        assert place(array) == p.device
    assert "device='cpu'" in repr(p)
    monkeypatch.setenv(DEVICE_ENV, "cuda:7")  # read when a problem is built, not later
    assert place(p.ops.asarray(np.ones(3))) == p.device
    with pytest.raises(ValueError, match="cuda:7"):
        problems.make("ridge", backend=backend, dtype="float64", **SMALL_RIDGE)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    q = problems.make("ridge", backend=backend, dtype="float64", **SMALL_RIDGE)
    assert q.ops.device_name() == "cpu"


def test_warm_start_copy_carries_its_own_w_init():
    p = problems.make("ridge", backend="torch", dtype="float64", **SMALL_RIDGE)
    w = p.ops.asarray(np.arange(3.0))
    q = p.with_w_init(w)
    assert q.w_init is w and float(p.w_init.abs().sum()) == 0.0
    assert q.arrays is p.arrays and q.fns is p.fns and "w_init" in vars(p)


# -- optional problem functions are declared ----------------------------------------------

def _spec(*capabilities: str) -> ProblemSpec:
    return ProblemSpec(name="toy", summary="", reference="", impl="toy",
                       lam_parametrization="", capabilities=frozenset(capabilities))


def _module(hooks=None, **functions) -> types.ModuleType:
    module = types.ModuleType("toy")
    if hooks is not None:
        module.HOOKS = hooks
    for name, fn in functions.items():
        setattr(module, name, fn)
    return module


def _f(*args):
    return 0.0


def test_every_registered_problem_declares_its_hooks():
    for name in problems.names():
        p = problems.make(name, backend="torch", dtype="float64", **problems.spec(name).small)
        assert p.hooks == p.module.HOOKS and p.fns.has_inner_grad == ("inner_grad" in p.hooks)


def test_hooks_must_be_declared_and_agree_with_the_module_and_the_catalog():
    assert declared_hooks(_module(frozenset({"inner_grad"}), inner_grad=_f),
                          _spec()) == {"inner_grad"}
    both = dict(inner_loss_batch=_f, outer_loss_batch=_f)
    assert declared_hooks(_module(frozenset(both), **both), _spec("minibatch")) == set(both)
    with pytest.raises(TypeError, match="must declare HOOKS"):
        declared_hooks(_module(), _spec())
    with pytest.raises(ValueError, match="unknown HOOKS"):
        declared_hooks(_module(frozenset({"inner_gard"})), _spec())
    with pytest.raises(ValueError, match="'lipschitz' is declared but not defined"):
        declared_hooks(_module(frozenset({"lipschitz"})), _spec())
    with pytest.raises(ValueError, match="'inner_grad' is defined but not declared"):
        declared_hooks(_module(frozenset(), inner_grad=_f), _spec())
    with pytest.raises(ValueError, match="capabilit"):
        declared_hooks(_module(frozenset(both), **both), _spec())
    with pytest.raises(ValueError, match="capabilit"):
        declared_hooks(_module(frozenset()), _spec("minibatch"))


# -- caches and seeds ----------------------------------------------------------------------

def test_lru_cache_is_bounded_and_keyed_by_value():
    cache = LruCache("test", maxsize=3)
    assert [cache.first_time(k) for k in ("a", "b", "a")] == [True, True, False]
    assert cache.get(("x", 1), lambda: 10) == 10 and cache.get(("x", 1), lambda: 11) == 10
    for k in range(10):
        cache.get(k, lambda: k)
    assert len(cache) == 3 and cache.first_time("a")  # evicted, least recently used first
    cache.clear()
    assert len(cache) == 0


def test_derive_seed_is_blake2b_of_canonical_json():
    text = '["hpo",3,{"a":1,"b":[2,"x"]}]'
    expected = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(),
                              "little") >> 1
    assert derive_seed("hpo", 3, {"b": [2, "x"], "a": 1}) == expected
    assert derive_seed("hpo", np.int64(3), {"a": 1, "b": [2, "x"]}) == expected
    assert derive_seed("hpo", 3, bits=31) == derive_seed("hpo", 3) >> 32 < 2**31
    assert derive_seed("hpo", 3) != derive_seed("hpo", 4) != derive_seed("hp", 4)
    with pytest.raises(TypeError):
        derive_seed(object())
    with pytest.raises(ValueError):
        derive_seed(1, bits=65)


def test_historical_seed_messages_keep_their_values():
    """The problem data and torch stocbio's batches are in benchmarks/baseline.parquet: the
    formulas they used before seeding.py existed, written out."""
    from hypersweep.problems.data import rng

    old_data = int.from_bytes(hashlib.blake2b(repr((5, "ridge")).encode(), digest_size=8)
                              .digest(), "little")
    assert rng(5, "ridge").integers(2**62) == np.random.default_rng(old_data).integers(2**62)
    old_stream = int.from_bytes(hashlib.blake2b(b"stocbio/5/inner", digest_size=8).digest(),
                                "little") >> 1
    assert seed_from_text("stocbio/5/inner", bits=63) == old_stream
