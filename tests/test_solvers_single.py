"""The single-loop solvers saba, srba, ttsa, ma_soba: the deterministic limit, identities,
torch ↔ JAX parity, the oracle counts (checked against the calls a step makes), and the
variance-reduced methods' target on the shared quadratic instance.

Parameters set here beyond the defaults, and why:

* TTSA, deterministic limit: ``decay_offset=None`` (constant steps: the decreasing
  schedule is there for the noise, and with whole splits and the expected Neumann sum
  there is none; with the default m = 1, β_k = β/(k+1)^0.6 leaves ridge at 0.18 after
  5,000 iterations) and ``n_hia_steps`` raised until the Neumann bias (I − ηH)^K is below the
  target: 30 on ridge (q ≈ 0.55), 100 on quadratic_sum (q ≈ 0.9) and logreg.
* MA-SOBA on quadratic_sum: ``outer_ratio=4``. λ steps along the average *before* it
  absorbs the new direction (the paper's order), so in the deterministic limit λ is
  stable only for β·L_F < 1 (SOBA: < 2); here L_F = 1.30 and the default β = η = 1.0.
* logreg (the small per-feature instance) has no finite stationary point (F decreases
  as λ₁, λ₃ → −∞): the deterministic limit on logreg is tested on a shared-penalty
  instance that has one, for every solver, in tests/test_solvers_logreg.py.
"""
from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.algorithms import plans_single
from hypersweep.algorithms.common import add_costs, cost_columns
from hypersweep.algorithms.solvers_common import Sampler, make_config

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from hypersweep.algorithms.solver_run import SolverRun  # noqa: E402

SOLVERS = ("saba", "srba", "ttsa", "ma_soba")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "bb_quadratic_n1024.npz"
QUADRATIC_SUM = Path(problems.__file__).parent / "quadratic_sum.py"
INSTANCES = {"ridge": dict(n_features=5, n_train=30, n_val=20),
             "logreg": dict(n_train=40, n_val=40, n_test=10, n_features=5),
             "quadratic_sum": dict(data=str(SHARED))}
FULL = {"batch_size": 10 ** 6}  # clamped to the splits: the deterministic limit
#: per problem: params of every solver, then per solver (see the module docstring)
DETERMINISTIC = {
    "ridge": ({}, {"ttsa": {"n_hia_steps": 30, "decay_offset": None}}),
    "quadratic_sum": ({}, {"ttsa": {"n_hia_steps": 100, "decay_offset": None},
                           "ma_soba": {"outer_ratio": 4.0}}),
}
needs_shared = pytest.mark.skipif(
    not (SHARED.exists() and QUADRATIC_SUM.exists()),
    reason=f"the quadratic_sum problem or its instance {SHARED} is absent")


def make(problem, backend, dtype="float64"):
    return problems.make(problem, backend=backend, dtype=dtype, seed=0, **INSTANCES[problem])


def deterministic_params(problem_name, name):
    common, own = DETERMINISTIC[problem_name]
    return {**FULL, **common, **own.get(name, {})}


def ratio(problem, lam, g0):
    return float(np.linalg.norm(problem.exact_hypergradient(problem.lam_numpy(lam))) / g0)


def run_until(problem, name, params, *, target, max_its=5000, chunk=50):
    """(iterations until ‖∇F(λ_k)‖/‖∇F(λ₀)‖ ≤ target or None, the last ratio)."""
    run = SolverRun(problem, name, seed=0, params=params)
    g0 = np.linalg.norm(problem.exact_hypergradient(problem.initial_hyperparams()))
    r = 1.0
    while run.k < max_its:
        r = ratio(problem, run.advance(chunk).lam, g0)
        if not math.isfinite(r):
            break
        if r <= target:
            return run.k, r
    return None, r


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))


def as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# -- 1. the deterministic limit ----------------------------------------------------------
@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name", SOLVERS)
def test_deterministic_limit_ridge(name, backend):
    problem = make("ridge", backend)
    k, r = run_until(problem, name, deterministic_params("ridge", name), target=1e-4)
    assert k is not None, (name, backend, r)


@needs_shared
# JAX only: torch follows the same trajectory (tests/test_solvers.py::test_full_batch_trajectories_agree_in_torch_and_jax)
@pytest.mark.parametrize("name,backend", [(name, "jax") for name in SOLVERS])
def test_deterministic_limit_quadratic_sum(name, backend):
    problem = make("quadratic_sum", backend)
    k, r = run_until(problem, name, deterministic_params("quadratic_sum", name),
                     target=1e-4)
    assert k is not None, (name, backend, r)


# -- 2. identities -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("problem_name", ["ridge", "logreg"])
def test_saba_and_srba_are_soba_in_the_deterministic_limit(problem_name, backend):
    """Whole splits: every SAGA estimate is the full-batch direction, and SRBA's period is
    ⌈n/n⌉ = 1 (a refresh every iteration): both follow SOBA's trajectory."""
    problem = make(problem_name, backend)
    ref = SolverRun(problem, "soba", seed=0, params=FULL).advance(200)
    for name in ("saba", "srba"):
        snap = SolverRun(problem, name, seed=0, params=FULL).advance(200)
        for a, b in ((ref.lam, snap.lam), (ref.w, snap.w), (ref.v, snap.v)):
            assert rel(as_numpy(a), as_numpy(b)) <= 1e-10, name


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_srba_refreshing_every_iteration_is_soba_with_minibatches(backend):
    """period = 1: every direction is the full-batch one, whatever the minibatches."""
    problem = make("ridge", backend)
    ref = SolverRun(problem, "soba", seed=0, params=FULL).advance(100)
    snap = SolverRun(problem, "srba", seed=0, params={"batch_size": 4, "period": 1}
                     ).advance(100)
    assert rel(as_numpy(ref.lam), as_numpy(snap.lam)) <= 1e-10


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ttsa_full_batch_adjoint_is_the_neumann_sum(backend):
    """Deterministic limit, one step from (w₀, λ₀) on ridge, against float64 numpy:
    w₁ = w₀ − α ∇_w L_in, v = −η Σ_{i<K} (I − ηH)^i ∇_w L_out(w₁), λ₁ = λ₀ − β (∇_λ L_out
    + (∂_λ ∇_w L_in)ᵀ v) with H and the gradients written out for ridge (L_out has no λ)."""
    problem = make("ridge", backend)
    K = 7
    run = SolverRun(problem, "ttsa", seed=0, params={**FULL, "n_hia_steps": K})
    snap = run.advance(1)
    a = problem.arrays_np
    Xt, yt, Xv, yv = a["X_train"], a["y_train"], a["X_val"], a["y_val"]
    lam0 = problem.lam_numpy(problem.initial_hyperparams())
    w0 = as_numpy(problem.w_init).astype(np.float64)
    e = np.exp(lam0[0])
    alpha = eta = run.cfg.inner_step
    w1 = w0 - alpha * (2 / len(yt) * Xt.T @ (Xt @ w0 - yt) + e * w0)
    H = 2 / len(yt) * Xt.T @ Xt + e * np.eye(len(w0))
    term = 2 / len(yv) * Xv.T @ (Xv @ w1 - yv)
    total = term.copy()
    for _ in range(K - 1):
        term = term - eta * H @ term
        total += term
    v = -eta * total
    lam1 = lam0 - run.cfg.outer_step * np.array([e * w1 @ v])  # ∂_h ∇_w L_in = e^h w
    assert rel(w1, as_numpy(snap.w)) <= 1e-12
    assert rel(v, as_numpy(snap.v)) <= 1e-12
    assert rel(lam1, as_numpy(snap.lam)) <= 1e-12


def test_ttsa_truncation_is_uniform_and_the_same_in_jax():
    """p_k = mix32(k + salt) mod K: the JAX step computes the Python function's values,
    and over 20,000 iterations each of the K values occurs 1/K of the time (±10%)."""
    from hypersweep.algorithms.jax.solvers_single import _truncation

    jnp = jax.numpy
    K = 10
    cfg = make_config("ttsa", {"n_hia_steps": K, "batch_size": 4}, inner_lr=0.1,
                      n_train=30, n_val=20)
    ks = np.arange(20000)
    host = np.array([plans_single.ttsa_truncation(cfg, int(k)) for k in ks])
    device = np.asarray(jax.jit(jax.vmap(lambda k: _truncation(k, K)))(
        jnp.asarray(ks, jnp.int32)))
    np.testing.assert_array_equal(host, device)
    freq = np.bincount(host, minlength=K) / ks.size
    assert np.all(np.abs(freq * K - 1) <= 0.1), freq
    full = make_config("ttsa", {"n_hia_steps": K, "batch_size": 100}, inner_lr=0.1,
                       n_train=30, n_val=20)
    assert {plans_single.ttsa_truncation(full, k) for k in range(50)} == {K - 1}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_saba_running_means_are_the_means_of_its_memories(backend):
    """Batches of 8 of 30 rows drawn with replacement (repeats are frequent): after 300
    steps the O(b) running means equal the memories' exact means, the repeat counters are
    back to 0, and a memory row holds the per-sample value at the point it was drawn."""
    problem = make("ridge", backend)
    run = SolverRun(problem, "saba", seed=1, params={"batch_size": 8})
    run.advance(300)
    s = run.state
    for memory, mean in ((s.memory_train, s.mean_train), (s.memory_val, s.mean_val)):
        assert rel(as_numpy(memory).mean(axis=0), as_numpy(mean)) <= 1e-12
    assert not as_numpy(s.count_train).any() and not as_numpy(s.count_val).any()
    # the last step's train rows: ∇_w ℓ_i at (w_299, λ_299) (ridge: 2 x_i(x_iᵀw − y_i) + e^h w)
    idx = run.sampler.chunk(299, 1)[0][0]
    prev = SolverRun(problem, "saba", seed=1, params={"batch_size": 8})
    prev.advance(299)
    w, lam = as_numpy(prev.state.inner), problem.lam_numpy(prev.state.outer)
    X, y = problem.arrays_np["X_train"], problem.arrays_np["y_train"]
    expected = 2 * X[idx] * (X[idx] @ w - y[idx])[:, None] + np.exp(lam[0]) * w
    assert rel(expected, as_numpy(s.memory_train)[idx, :w.size]) <= 1e-12


@pytest.mark.parametrize("name", SOLVERS)
def test_a_torch_step_never_writes_its_input_state(name):
    """SolverRun.warm_up runs a chunk from the current state and drops it: the memories,
    the previous point and the directions must be new tensors, never written in place."""
    problem = make("ridge", "torch")
    run = SolverRun(problem, name, seed=0, params={"batch_size": 8})
    before = [x.clone() for x in torch.utils._pytree.tree_leaves(tuple(run.state))
              if isinstance(x, torch.Tensor)]
    run.warm_up(7)
    after = [x for x in torch.utils._pytree.tree_leaves(tuple(run.state))
             if isinstance(x, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# -- 3. parity ---------------------------------------------------------------------------
PARITY = [("ridge", 8), ("logreg", 8), pytest.param("quadratic_sum", 64, marks=needs_shared)]


@pytest.mark.parametrize("problem_name,batch", PARITY)
@pytest.mark.parametrize("name", SOLVERS)
def test_torch_and_jax_trajectories_agree(name, problem_name, batch):
    """Same seed, minibatches smaller than the splits, 50 steps, float64."""
    params = {"batch_size": batch}
    snaps = [SolverRun(make(problem_name, backend), name, seed=3, params=params).advance(50)
             for backend in ("jax", "torch")]
    for field in ("lam", "w", "v"):
        a, b = (as_numpy(getattr(s, field)) for s in snaps)
        assert rel(a, b) <= 1e-8, (field, rel(a, b))
    assert snaps[0].costs == snaps[1].costs


# -- 4. counts ---------------------------------------------------------------------------
class CountingOracles:
    """Forwards to torch Oracles and counts the calls by cost column (rows read too)."""

    def __init__(self, oracles):
        self._o = oracles
        self.calls = collections.Counter()

    def __getattr__(self, name):
        return getattr(self._o, name)

    def _count(self, idx, split, **kinds):
        self.calls.update(kinds)
        self.calls[f"{split}_rows"] += int(idx.shape[0])

    def inner_grad(self, w, lam, idx):
        self._count(idx, "train", inner=1)
        return self._o.inner_grad(w, lam, idx)

    def inner_grads(self, w, lam, idx):
        self._count(idx, "train", inner=1, cross=1)
        return self._o.inner_grads(w, lam, idx)

    def outer_grads(self, w, lam, idx):
        self._count(idx, "val", outer=1)
        return self._o.outer_grads(w, lam, idx)

    def inner_vjp(self, w, lam, idx, v):
        self._count(idx, "train", inner=1, hvp=1, cross=1)
        return self._o.inner_vjp(w, lam, idx, v)

    def hvp(self, w, lam, idx, v):
        self._count(idx, "train", hvp=1)
        return self._o.hvp(w, lam, idx, v)

    def cross(self, w, lam, idx, v):
        self._count(idx, "train", cross=1)
        return self._o.cross(w, lam, idx, v)


def _costs(calls):
    return cost_columns(calls["inner"], calls["hvp"], calls["cross"], calls["outer"],
                        calls["train_rows"] + calls["val_rows"])


@pytest.fixture
def counted_torch_steps(monkeypatch):
    """(name, params) -> [cost columns of the calls of iteration k (k = 0 with init)]: the
    torch solver driven by hand on counting oracles. Per-sample evaluations (SABA's
    batched vmaps) and the products through TTSA's full-batch linearization are counted
    where they happen."""
    from hypersweep.algorithms.torch import _solver_core as core
    from hypersweep.algorithms.torch import solvers_single as mod

    def run(name, params, n_steps):
        problem = make("ridge", "torch")
        cfg = make_config(name, params, inner_lr=problem.inner_lr, n_train=30, n_val=20)
        oracles = CountingOracles(core.Oracles(problem.fns, problem.arrays, 30, 20))
        train, val = mod._per_sample_train, mod._per_sample_val

        def counted_train(o, w, lam, idx, v=None):
            kinds = {"inner": 1} if v is None else {"inner": 1, "hvp": 1, "cross": 1}
            oracles._count(idx, "train", **kinds)
            return train(o, w, lam, idx, v)

        def counted_val(o, w, lam, idx):
            oracles._count(idx, "val", outer=1)
            return val(o, w, lam, idx)

        class CountedLinearization(mod.Linearization):
            # as an oracle's hvp/cross: building g is part of the product, each product
            # reads the whole train split
            def hvp(self, v):
                oracles._count(oracles.all_train, "train", hvp=1)
                return super().hvp(v)

            def cross(self, v):
                oracles._count(oracles.all_train, "train", cross=1)
                return super().cross(v)

        monkeypatch.setattr(mod, "_per_sample_train", counted_train)
        monkeypatch.setattr(mod, "_per_sample_val", counted_val)
        monkeypatch.setattr(mod, "Linearization", CountedLinearization)
        solver = getattr(mod, name)
        draws = [torch.as_tensor(d) for d in
                 Sampler(cfg, solver.samples(cfg), seed=0).chunk(0, n_steps)]
        state = solver.init(oracles, problem.w_init, problem.as_lam(
            problem.initial_hyperparams()), cfg)
        out = []
        for k in range(n_steps):
            state = solver.step(oracles, state, tuple(d[k] for d in draws), cfg)
            out.append(_costs(oracles.calls))
            oracles.calls.clear()
        return cfg, solver, out

    return run


COUNT_CASES = [
    ("saba", {"batch_size": 8}), ("saba", FULL),
    ("srba", {"batch_size": 8}), ("srba", {"batch_size": 8, "period": 3}),
    ("ttsa", {"batch_size": 8}), ("ttsa", {**FULL, "n_hia_steps": 4}),
    ("ma_soba", {"batch_size": 8})]


@pytest.mark.parametrize("name,params", COUNT_CASES)
def test_counts_are_the_calls_the_step_makes(name, params, counted_torch_steps):
    cfg, solver, measured = counted_torch_steps(name, params, n_steps=12)
    for k, calls in enumerate(measured):
        assert solver.counts(cfg, k) == calls, (k, solver.counts(cfg, k), calls)


def test_counts_follow_the_docstrings():
    b, n_train, n_val = 8, 30, 20

    def cfg(name, **params):
        return make_config(name, {"batch_size": b, **params}, inner_lr=0.1,
                           n_train=n_train, n_val=n_val)

    saba = cfg("saba")
    assert plans_single.saba_counts(saba, 1) == cost_columns(1, 1, 1, 1, 2 * b)
    assert plans_single.saba_counts(saba, 0) == add_costs(
        cost_columns(1, 1, 1, 1, 2 * b), cost_columns(1, 0, 0, 1, n_train + n_val))
    srba = cfg("srba")
    assert plans_single.srba_period(srba) == math.ceil(n_train / b) == 4
    assert plans_single.srba_counts(srba, 8) == cost_columns(1, 1, 1, 1, n_train + n_val)
    assert plans_single.srba_counts(srba, 9) == cost_columns(2, 2, 2, 2, 4 * b)
    ttsa = cfg("ttsa")
    K = ttsa.get("n_hia_steps")
    assert plans_single.ttsa_samples(ttsa) == ("train",) * (K + 1) + ("val",)
    for k in range(20):
        p = plans_single.ttsa_truncation(ttsa, k)
        assert 0 <= p < K
        assert plans_single.ttsa_counts(ttsa, k) == cost_columns(1, p, 1, 1, (2 + p) * b + b)
    assert plans_single.ma_soba_counts(cfg("ma_soba"), 5) == cost_columns(1, 1, 1, 1, 2 * b)


# -- 5. the variance-reduced methods on the shared instance ------------------------------
@needs_shared
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["saba", "srba"])
def test_variance_reduction_reaches_the_peer_accuracy(name, dtype):
    """benchmark_bilevel's setting (batch 64, step 0.1, outer ratio 1, 6,400 iterations):
    ‖∇h‖² ≤ 1e-10 (the peer's SABA: 4.5e-14, SRBA: 1.6e-14; SOBA stays at ~5e-2)."""
    problem = make("quadratic_sum", "jax", dtype=dtype)
    run = SolverRun(problem, name, seed=0,
                    params={"batch_size": 64, "step_size": 0.1, "outer_ratio": 1.0})
    g = problem.exact_hypergradient(problem.lam_numpy(run.advance(6400).lam))
    assert float(g @ g) <= 1e-10
