"""The closed-form per-sample hooks (``inner_grad_rows`` / ``outer_grad_rows``, problems/base.py)
against autodiff of the one-row losses, in both backends; SABA (the solver that reads them)
with and without them; the HOOKS rules for the pair.

Every problem whose module declares the pair is checked (read from the catalog and the
modules, not listed here). The reference is independent of the hook: the gradient, Hessian-
vector product and cross product of ``inner_loss_batch(w, λ, [i])`` row by row, by
``jax.grad``/``jax.vjp`` or ``torch.func``.
"""
from __future__ import annotations

import importlib
import types

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.problems import base

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

#: small instances (the catalog's defaults are larger than these tests need)
SMALL = {"quadratic_sum": dict(n_samples=96, n_samples_outer=80, dim_inner=6, dim_outer=4)}


def hooked_problems() -> list[str]:
    return [name for name in problems.names()
            if "inner_grad_rows" in importlib.import_module(problems.spec(name).impl).HOOKS]


HOOKED = hooked_problems()


def test_the_catalog_has_a_problem_with_the_hooks():
    assert "quadratic_sum" in HOOKED  # the test below must not pass over an empty list


def _make(name, backend, **params):
    return problems.make(name, backend=backend, dtype="float64", seed=3,
                         **{**SMALL.get(name, {}), **params})


def _point(problem, seed=0):
    g = np.random.default_rng(seed)
    w = g.standard_normal(int(np.prod(problem.w_shape))).reshape(problem.w_shape)
    lam = problem.lam_numpy(problem.initial_hyperparams()) + 0.3 * g.standard_normal(
        problem.lam_shape)
    v = g.standard_normal(problem.w_shape)
    return w, lam, v


def _reference_rows(problem, w, lam, v, idx):
    """Per row, by autodiff of the one-row losses (JAX, float64, a Python loop)."""
    fns, arrays = problem.fns, problem.arrays
    w, lam, v = (jax.numpy.asarray(x) for x in (w, lam, v))
    rows = {k: [] for k in ("g", "hv", "cv", "gw", "gl")}
    for i in np.asarray(idx):
        row = jax.numpy.asarray([i])
        grad_w = lambda w_, l_: jax.grad(fns.inner_loss_batch)(w_, l_, arrays, row)  # noqa: E731
        g, pullback = jax.vjp(grad_w, w, lam)
        hv, cv = pullback(v)
        gw, gl = jax.grad(fns.outer_loss_batch, argnums=(0, 1))(w, lam, arrays, row)
        for key, val in zip(rows, (g, hv, cv, gw, gl)):
            rows[key].append(np.asarray(val).ravel())
    return {k: np.stack(x) for k, x in rows.items()}


def _hook_rows(problem, w, lam, v, idx):
    ops = problem.ops
    if problem.backend == "torch":
        conv = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
        i = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
    else:
        conv, i = jax.numpy.asarray, jax.numpy.asarray(np.asarray(idx))
    g, hv, cv = problem.fns.inner_grad_rows(conv(w), conv(lam), conv(v), problem.arrays, i)
    gw, gl = problem.fns.outer_grad_rows(conv(w), conv(lam), problem.arrays, i)
    b = len(idx)
    return {k: np.asarray(ops.to_numpy(x)).reshape(b, -1)
            for k, x in zip(("g", "hv", "cv", "gw", "gl"), (g, hv, cv, gw, gl))}


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name", HOOKED)
def test_the_hooks_equal_autodiff_of_the_one_row_losses(name, backend):
    problem = _make(name, backend)
    reference = _make(name, "jax")
    idx = np.array([0, 5, 5, 17, 40, 79])  # a repeated row too
    for seed in range(3):
        w, lam, v = _point(problem, seed)
        got = _hook_rows(problem, w, lam, v, idx)
        want = _reference_rows(reference, w, lam, v, idx)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} {backend} {key}")


@pytest.mark.slow
def test_the_hooks_at_scale_a_whole_split_of_20000_rows():
    """The full pass SABA's init makes (every row of both splits at once) on an instance
    of 20,000 + 20,000 rows: equal to autodiff of the row losses, vmapped (the solver's
    own fallback, not the hook) in one call."""
    params = dict(n_samples=20_000, n_samples_outer=20_000, dim_inner=5, dim_outer=3)
    problem = _make("quadratic_sum", "jax", **params)
    w, lam, v = (jax.numpy.asarray(x) for x in _point(problem))
    idx = jax.numpy.arange(20_000)
    g, hv, cv = problem.fns.inner_grad_rows(w, lam, v, problem.arrays, idx)
    gw, gl = problem.fns.outer_grad_rows(w, lam, problem.arrays, idx)
    fns, arrays = problem.fns, problem.arrays

    def one_row(i):
        row = i[None]
        grad_w = lambda w_, l_: jax.grad(fns.inner_loss_batch)(w_, l_, arrays, row)  # noqa: E731
        g_i, pullback = jax.vjp(grad_w, w, lam)
        gw_i, gl_i = jax.grad(fns.outer_loss_batch, argnums=(0, 1))(w, lam, arrays, row)
        return (g_i, *pullback(v), gw_i, gl_i)

    want = jax.vmap(one_row)(idx)
    for got, ref in zip((g, hv, cv, gw, gl), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-11, atol=1e-11)


def _saba_lams(problem, n_steps=50):
    from hypersweep.algorithms.solver_run import SolverRun

    run = SolverRun(problem, "saba", seed=1, params={"batch_size": 8, "step_size": 0.5})
    out = []
    for _ in range(n_steps // 10):
        out.append(np.asarray(problem.ops.to_numpy(run.advance(10).lam), dtype=np.float64))
    return np.stack(out)


def _clear_jax_solver_caches():
    from hypersweep.algorithms.jax import _solver_core

    _solver_core.run_chunk.clear_cache()
    _solver_core.run_init.clear_cache()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_saba_with_the_hooks_follows_saba_without_them(backend, monkeypatch):
    """The hook changes how SABA computes its per-sample values, not the trajectory: 50
    minibatch steps with and without it agree to rounding (float64)."""
    problem = _make("quadratic_sum", backend)
    with_hooks = _saba_lams(problem)
    _clear_jax_solver_caches()  # the compiled step is keyed on the problem's functions
    monkeypatch.setattr(base.ProblemFns, "has_grad_rows", property(lambda self: False))
    try:
        without = _saba_lams(problem)
    finally:
        _clear_jax_solver_caches()
    assert np.isfinite(with_hooks).all()
    assert np.abs(with_hooks[-1] - with_hooks[0]).max() > 1e-3  # λ moved
    np.testing.assert_allclose(with_hooks, without, rtol=1e-10, atol=1e-12)


def _module(hooks, *, minibatch=True):
    mod = types.ModuleType("hypersweep.problems.fake_rows")
    mod.HOOKS = frozenset(hooks)
    for hook in hooks:
        setattr(mod, hook, lambda *a: None)
    spec = types.SimpleNamespace(capabilities=frozenset({"minibatch"} if minibatch else ()))
    return mod, spec


@pytest.mark.parametrize("hooks,minibatch", [
    ({"inner_loss_batch", "outer_loss_batch", "inner_grad_rows"}, True),  # half the pair
    ({"inner_loss_batch", "outer_loss_batch", "outer_grad_rows"}, True),
    ({"inner_grad_rows", "outer_grad_rows"}, False),  # without the minibatch pair
])
def test_the_row_hooks_come_as_a_pair_with_the_minibatch_hooks(hooks, minibatch):
    mod, spec = _module(hooks, minibatch=minibatch)
    with pytest.raises(ValueError, match="per-sample hooks come as the pair"):
        base.declared_hooks(mod, spec)


def test_the_pair_with_the_minibatch_hooks_is_accepted():
    mod, spec = _module({"inner_loss_batch", "outer_loss_batch", "inner_grad_rows",
                         "outer_grad_rows"})
    assert "inner_grad_rows" in base.declared_hooks(mod, spec)
