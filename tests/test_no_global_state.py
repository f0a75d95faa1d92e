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


def _run(code: str, *, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter; its stdout (it fails the test if it fails)."""
    import os

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_hypersweep_leaves_jax_x64_off_and_user_code_float32():
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
        # the user's own float32 program, after importing hypersweep
        x = jnp.asarray([0.5, 1.5, 2.5])
        y = jax.jit(lambda v: jnp.sum(v * v) / 3.0)(x)
        assert x.dtype == jnp.float32 and y.dtype == jnp.float32, (x.dtype, y.dtype)
        assert jnp.zeros(2).dtype == jnp.float32
        # a float32 problem and estimator leave it so as well
        from hypersweep import algorithms, problems
        p = problems.make("ridge", backend="jax", dtype="float32", n_features=3,
                          n_train=20, n_val=10)
        g = algorithms.get("aid_cg", "jax")(p, p.as_lam(p.initial_hyperparams()), t=5, K=5)
        assert g.hypergrad.dtype == jnp.float32
        assert not jax.config.jax_enable_x64
        assert jnp.asarray([1.0]).dtype == jnp.float32
        print("ok")
    """)
    assert out.strip() == "ok"


# One process, float32 then float64 and the reverse: through the hypergradient_error
# pipeline (warm-up cache, problem cache) and the estimator directly; dtypes of the results
# and the float64 accuracy against the float64 oracle.
_BOTH_ORDERS = """
    import json, sys
    import numpy as np
    from hypersweep import algorithms, problems
    from hypersweep.orchestrator.cell import Cell, canonical_json, run_cell

    PARAMS = dict(n_features=3, n_train=20, n_val=10)
    out = []
    for dtype in sys.argv[1].split(","):
        for backend in ("jax", "torch"):
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


@pytest.mark.parametrize("order", ["float32,float64", "float64,float32"])
def test_float32_and_float64_cells_in_one_process_in_either_order(order):
    import json

    code = textwrap.dedent(_BOTH_ORDERS).replace("sys.argv[1]", repr(order))
    rows = json.loads(_run(code).strip().splitlines()[-1])
    assert [r["dtype"] for r in rows] == [d for d in order.split(",") for _ in range(2)]
    for r in rows:
        assert r["status"] == "ok" and r["row_dtype"] == r["dtype"], r
        for key in ("result", "w", "arrays"):
            assert r[key].endswith(r["dtype"]), (key, r)  # jax "float32", torch "torch.float32"
        if r["dtype"] == "float64":
            # aid_exact at t = 200 on a well-conditioned ridge: converged to float64 rounding
            assert r["rel"] <= 1e-10 and r["row_rel"] <= 1e-10, r
        else:
            assert r["rel"] <= 1e-4 and r["row_rel"] <= 1e-4, r


def test_float64_switch_happens_when_the_problem_is_built_and_never_silently():
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
    """)
    assert out.split("\n")[:2] == ["refused: True", "True float64 float64 float64"]


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
