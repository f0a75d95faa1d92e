"""The matrix-free oracle of the multinomial problems (Newton–CG and CG on Hessian-vector
products, used beyond ``helpers.DENSE_NEWTON_MAX_DIM`` inner variables) against the dense
one (Newton with the formed Hessian and a direct solve) on instances both can solve, and
at MNIST's shape (785 × 10 inner variables, n = 20,000), where only the matrix-free one
is affordable, against a finite difference of F."""
from __future__ import annotations

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.problems import helpers

CASES = [("data_cleaning", dict(dataset="digits", n_train=200, n_val=100, n_test=0)),
         ("multiclass_logreg", dict(n_train=300, n_val=150, n_test=0))]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name, params", CASES, ids=[c[0] for c in CASES])
def test_matrix_free_oracle_equals_the_dense_one(name, params, monkeypatch):
    _, module, built = problems.build(name, seed=1, **params)
    g = np.random.default_rng(2)
    lam = built.lam0 + 0.3 * g.standard_normal(built.lam0.shape)
    static = dict(built.static)
    w_dense = module.exact_inner_solution(lam, built.arrays, static)
    grad_dense = module.exact_hypergradient(lam, built.arrays, static)
    assert w_dense.size <= helpers.DENSE_NEWTON_MAX_DIM
    monkeypatch.setattr(helpers, "DENSE_NEWTON_MAX_DIM", 0)  # every instance matrix-free
    module._SOLUTIONS.clear()  # else w*(λ) comes back from the dense solve
    w_free = module.exact_inner_solution(lam, built.arrays, static)
    grad_free = module.exact_hypergradient(lam, built.arrays, static)
    assert _rel(w_free, w_dense) <= 1e-10
    assert _rel(grad_free, grad_dense) <= 1e-8
    module._SOLUTIONS.clear()


def test_a_solution_is_cached_per_lambda_and_data():
    _, module, built = problems.build("data_cleaning", seed=1, dataset="digits", n_train=120,
                                      n_val=60, n_test=0)
    static, calls = dict(built.static), []
    cache = helpers.SolutionCache(("X_train", "Y_train"), size=2)

    def solve():
        calls.append(1)
        return np.ones(3)

    lam = built.lam0
    cache.get(lam, built.arrays, static, solve)
    out = cache.get(lam.copy(), built.arrays, static, solve)
    out[:] = 7  # a copy: the kept solution is untouched
    assert len(calls) == 1 and cache.get(lam, built.arrays, static, solve)[0] == 1
    other = {**built.arrays, "X_train": built.arrays["X_train"] * 2}
    cache.get(lam, other, static, solve)
    cache.get(lam + 1, built.arrays, static, solve)
    assert len(calls) == 3
    cache.get(lam, built.arrays, static, solve)  # the oldest, evicted (size 2): solved again
    assert len(calls) == 4


def test_operator_is_the_dense_hessian():
    g = np.random.default_rng(3)
    X, w = g.standard_normal((40, 6)), g.standard_normal((6, 4))
    weights, pen = g.random(40), g.random((1, 4)) + 0.1
    H = helpers.multinomial_hessian(X, w, weights) + np.diag(np.tile(pen[0], 6))
    matvec, diag = helpers.multinomial_operator(X, w, weights, pen)
    v = g.standard_normal(24)
    np.testing.assert_allclose(matvec(v), H @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(diag, np.diag(H), rtol=1e-12)


@pytest.mark.slow
def test_mnist_shaped_cleaning_oracle_is_matrix_free_and_matches_finite_differences():
    """n = 10,000, 785 × 10: the dense path would form a 7,850² Hessian at O(n·7,850²)
    ≈ 6·10¹¹ flops per Newton step. F along a random direction u: (F(λ+εu) − F(λ−εu))/2ε
    equals ∇F·u. (n was 20,000 until the suite needed the time; the shape, what makes
    the dense path impossible, is MNIST's.)"""
    _, module, built = problems.build("data_cleaning", seed=0, dataset="mnist_shaped",
                                      n_train=10000, n_val=1000, n_test=0, corruption=0.4)
    static = dict(built.static)
    assert built.w_shape[0] * built.w_shape[1] > helpers.DENSE_NEWTON_MAX_DIM
    lam = built.lam0
    grad = module.exact_hypergradient(lam, built.arrays, static)
    u = np.random.default_rng(4).standard_normal(lam.shape)
    u /= np.linalg.norm(u)
    eps = 1e-1

    def F(l):
        w = module.exact_inner_solution(l, built.arrays, static)
        return module.outer_loss(w, l, built.arrays, static, __import__(
            "hypersweep.problems.numpy_ops", fromlist=["x"]))

    fd = (F(lam + eps * u) - F(lam - eps * u)) / (2 * eps)
    assert fd == pytest.approx(float(grad @ u), rel=1e-3)
