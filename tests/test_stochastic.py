"""stocbio's minibatches: unbiased conditional on w_t, counted, and O(batch) per step.

* Statistics: conditional on w_t (which depends on the inner batches only), the
  validation batch, the K Hessian batches and the cross-term batch are independent
  uniform draws, so E[stocbio | w_t] is the full-batch AID-Neumann(K) estimate at that
  w_t. The reference is computed here in float64 numpy from the problem's dense
  ``inner_hessian`` and a hand-written validation gradient (nothing of stocbio's code
  path), and the mean difference over many seeds must be within a few standard errors.
  The instance is built so that the test has power against the two likely bugs: the
  validation labels contradict the training ones (an outer gradient taken on training
  rows points the other way), and batches of two rows of fixed norm with a Neumann step
  η_N = 1/max ‖H_row‖ and a tiny penalty make each I − η_N H_B nearly a projection, so
  one Hessian batch reused for all K factors gives E[(I − η_N H_B)^q] far from
  (I − η_N H)^q. No minibatch factor expands (eigenvalues in [0, 1)), so the differences
  have light tails and the standard error means what it says. Checked by hand on both
  backends and seven base seeds: the correct code gives max |z| ≤ 1.6; the outer
  gradients on a batch of training rows give |z| ≈ 40; one Hessian batch reused for
  all K factors gives |z| ≈ 9–13; validation indices drawn from range(n_train) raise in
  torch (index out of range) but give only |z| ≈ 3–5 in JAX (its gather clamps).
* Counts: the formula of the ``Hypergrad`` convention, equal on both backends.
* Scale: 200,000 training rows. No step may produce an array with as many elements as
  the training split (a permutation, an ``arange(n)``, a full-data product): checked on
  the JAX program (its jaxpr) and on every aten op torch runs — no timing involved.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from hypersweep import algorithms, problems

BACKENDS = ("jax", "torch")

# -- the statistical test ------------------------------------------------------------------
# n_train ≠ n_val, and n_val < n_train: validation indices drawn from the training range
# would run past the validation rows.
N_TRAIN, N_VAL, DIM = 80, 48, 3
RADIUS = 2.0          # ‖x_i‖ for every row
VAL_SPREAD = 0.3      # validation rows: one cluster around +u, all labelled −1
LAM0 = -6.0           # penalty e^-6: H ≈ the data curvature, whose minibatch noise matters
INNER_LR = 0.05       # small inner steps keep w_t near 0, where the curvature σσ' ≈ ¼
BATCH, T, K = 2, 10, 8
N_SEEDS = 300
MAX_Z = 4.0           # |mean| ≤ 4 standard errors per component
# η_N = 1/max_i λ_max(H_{row i}), λ_max ≤ ¼‖x‖² + e^λ (logistic curvature ≤ ¼): every
# factor I − η_N H_B has eigenvalues in [0, 1), close to 0 along the batch's rows.
NEUMANN_LR = 1.0 / (0.25 * RADIUS ** 2 + math.exp(LAM0))


def _on_sphere(x):
    return RADIUS * x / np.linalg.norm(x, axis=1, keepdims=True)


def write_disagreeing_data(path) -> str:
    """Logreg data (an ``.npz`` at ``path``) where train and validation clearly differ.

    Training labels sign(xᵀu) on uniform directions; validation rows clustered around +u
    and labelled −1, i.e. the opposite of what the training rows teach (an outer gradient
    on training rows points the other way), with little row-to-row variation (so the
    Hessian batches, not the validation batch, dominate the noise of the estimate).
    """
    g = np.random.default_rng(20261201)
    u = g.standard_normal(DIM)
    u /= np.linalg.norm(u)
    X_train = _on_sphere(g.standard_normal((N_TRAIN, DIM)))
    X_val = _on_sphere(u + VAL_SPREAD * g.standard_normal((N_VAL, DIM)))
    np.savez(path, X_train=X_train, y_train=np.where(X_train @ u >= 0, 1.0, -1.0),
             X_val=X_val, y_val=-np.ones(N_VAL))
    return str(path)


@pytest.fixture(scope="module")
def disagreeing_data(tmp_path_factory):
    return write_disagreeing_data(tmp_path_factory.mktemp("stochastic") / "disagree.npz")


def _make_disagreeing(backend, path):
    problem = problems.make("logreg", backend=backend, seed=0, dtype="float64", data=path,
                            lam0=LAM0)
    return problem.with_inner_lr(INNER_LR)


def _full_batch_neumann(problem, lam, w):
    """Full-batch AID-Neumann(K) at w in stocBiO's convention, float64 numpy.

    v = η_N Σ_{q=0}^{K} (I − η_N H)^q ∇_w L_out(w); logreg's L_out ignores λ and
    ∂_λ ∇_w L_in = diag(e^λ ⊙ w), so the estimate is −e^λ ⊙ w ⊙ v.
    """
    from scipy.special import expit

    arrays = problem.arrays_np
    H = problem.module.inner_hessian(w, lam, arrays, problem.static)
    X, y = arrays["X_val"], arrays["y_val"]
    term = -(X.T @ (y * expit(-y * (X @ w)))) / X.shape[0]
    v = term.copy()
    for _ in range(K):
        term = term - NEUMANN_LR * (H @ term)
        v += term
    return -np.exp(lam) * w * (NEUMANN_LR * v)


def _differences(backend, path, base_seed):
    problem = _make_disagreeing(backend, path)
    lam_np = problem.initial_hyperparams()
    lam = problem.as_lam(lam_np)
    stocbio = algorithms.get("stocbio", backend)
    ops = problem.ops
    out = []
    for s in range(N_SEEDS):
        est = stocbio(problem, lam, t=T, K=K, seed=base_seed + s, batch_size=BATCH,
                      neumann_lr=NEUMANN_LR)
        w = ops.to_numpy(est.w_t)
        out.append(ops.to_numpy(est.hypergrad) - _full_batch_neumann(problem, lam_np, w))
    return np.asarray(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minibatch_estimate_is_unbiased_given_w_t(backend, disagreeing_data):
    d = _differences(backend, disagreeing_data, base_seed=1000)
    assert np.all(np.isfinite(d))
    mean = d.mean(axis=0)
    se = d.std(axis=0, ddof=1) / math.sqrt(len(d))
    assert np.all(se > 0), "no minibatch noise at all: the batches are not sampled"
    z = mean / se
    assert np.all(np.abs(z) <= MAX_Z), (
        f"mean(stocbio − full-batch Neumann at w_t) = {mean} is {z} standard errors "
        f"from 0 ({N_SEEDS} seeds)")


# -- counts --------------------------------------------------------------------------------
COUNT_PARAMS = dict(n_train=40, n_val=30, n_test=0, n_features=3)


@functools.lru_cache(maxsize=None)
def _count_problem(backend):
    return problems.make("logreg", backend=backend, seed=0, dtype="float64", **COUNT_PARAMS)


@pytest.mark.parametrize("batch_size,b_train,b_val", [(8, 8, 8), (35, 35, 30),
                                                      (10 ** 6, 40, 30)])
def test_counts_follow_the_formula_on_both_backends(batch_size, b_train, b_val):
    t, K = 7, 3
    costs = {}
    for backend in BACKENDS:
        problem = _count_problem(backend)
        lam = problem.as_lam(problem.initial_hyperparams())
        est = algorithms.get("stocbio", backend)(problem, lam, t=t, K=K, seed=3,
                                                  batch_size=batch_size)
        assert (est.n_inner_grad_evals, est.n_hvp_evals, est.n_cross_evals,
                est.n_outer_grad_evals, est.solver_iters) == (t, K, 1, 1, K)
        assert est.n_samples_touched == t * b_train + K * b_train + b_train + b_val
        assert est.n_oracle_calls == t + K + 2
        costs[backend] = est.costs()
    assert costs["torch"] == costs["jax"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_batches_do_not_depend_on_K(backend):
    problem = _count_problem(backend)
    lam = problem.as_lam(problem.initial_hyperparams())
    stocbio = algorithms.get("stocbio", backend)
    a = stocbio(problem, lam, t=9, K=2, seed=4, batch_size=5)
    b = stocbio(problem, lam, t=9, K=6, seed=4, batch_size=5)
    np.testing.assert_array_equal(problem.ops.to_numpy(a.w_t), problem.ops.to_numpy(b.w_t))


# -- scale: no O(n) work per step ----------------------------------------------------------
BIG_N = 200_000
BIG_PARAMS = dict(n_train=BIG_N, n_val=500, n_test=0, n_features=3)


@functools.lru_cache(maxsize=None)
def _big_problem(backend):
    return problems.make("logreg", backend=backend, seed=0, dtype="float64", **BIG_PARAMS)


def _large_outputs(jaxpr, limit):
    """(primitive, shape) of every equation, nested ones included, with ≥ limit elements."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if math.prod(shape) >= limit:
                found.append((eqn.primitive.name, shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _large_outputs(sub, limit)
    return found


def test_jax_program_has_no_training_set_sized_array():
    import jax
    import jax.numpy as jnp

    from hypersweep.algorithms.jax import stochastic

    problem = _big_problem("jax")
    lam = problem.as_lam(problem.initial_hyperparams())
    batch = 64
    closed = jax.make_jaxpr(stochastic._stocbio, static_argnums=(0, 1, 2, 3))(
        problem.fns, BIG_N, BIG_PARAMS["n_val"], batch, problem.w_init, lam, problem.arrays,
        jnp.asarray(problem.inner_lr), jnp.asarray(problem.inner_lr), jnp.asarray(5),
        jnp.asarray(3), jax.random.PRNGKey(0))
    assert _large_outputs(closed.jaxpr, BIG_N) == []
    # The check sees arrays of that size where they exist: the data passed in.
    assert any(math.prod(v.aval.shape) >= BIG_N for v in closed.jaxpr.invars)

    est = stochastic.stocbio(problem, lam, t=30, K=4, seed=0, batch_size=batch)
    assert np.all(np.isfinite(problem.ops.to_numpy(est.hypergrad)))
    assert est.n_samples_touched == (30 + 4 + 1) * batch + batch


def test_torch_runs_no_training_set_sized_op():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from hypersweep.algorithms.torch import stochastic

    class LargeOutputs(TorchDispatchMode):
        """Records every aten op whose output has at least BIG_N elements."""

        def __init__(self):
            super().__init__()
            self.ops, self.seen = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += 1
            for x in out if isinstance(out, (list, tuple)) else (out,):
                if isinstance(x, torch.Tensor) and x.numel() >= BIG_N:
                    self.ops.append((str(func), tuple(x.shape)))
            return out

    problem = _big_problem("torch")
    lam = problem.as_lam(problem.initial_hyperparams())
    with LargeOutputs() as mode:
        est = stochastic.stocbio(problem, lam, t=30, K=4, seed=0, batch_size=64)
    assert mode.seen > 100, "the dispatch mode saw no ops: the check would be vacuous"
    assert mode.ops == []
    assert np.all(np.isfinite(problem.ops.to_numpy(est.hypergrad)))
    assert est.n_samples_touched == (30 + 4 + 1) * 64 + 64
