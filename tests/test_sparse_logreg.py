"""sparse_logreg: the segment-sum formulation against finite differences, against dense
``logreg`` on the same matrices (numpy, JAX, PyTorch), the padded minibatch product
against dense rows, the new ``ops`` in all three backends, a d = 100,000 instance
(memory and one stochastic step per backend) and one ``hpo`` cell per backend.

Tolerances (float64): finite differences 1e-6 of ‖∇F‖‖d‖ (as tests/test_problems.py);
sparse vs dense 1e-8 (the two sides are the same numbers summed in a different order,
plus the oracles' 1e-12 stopping rules: ~1e-12 expected); ops and products 1e-13.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from hypersweep import algorithms, problems
from hypersweep.problems import numpy_ops, sparse_logreg
from hypersweep.problems.base import Problem, load_ops

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

BACKENDS = ("jax", "torch")
SPARSE_VS_DENSE_RTOL = 1e-8


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def csr_splits(seed, *, n_train, n_val, n_test, d, density) -> dict:
    """{X_split: CSR, y_split: ±1} with a planted model; O(nnz) to draw (never n × d).
    Row 0 of every split is empty and column d − 1 never occurs (edge cases kept in)."""
    g = np.random.default_rng(seed)
    w_true = g.standard_normal(d)
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        nnz = max(1, int(round(n * d * density)))
        rows = g.integers(1, n, size=nnz) if n > 1 else np.zeros(nnz, np.int64)
        cols = g.integers(0, d - 1, size=nnz)
        X = sp.coo_matrix((g.random(nnz) + 0.1, (rows, cols)), shape=(n, d)).tocsr()
        X.sum_duplicates()
        margin = X @ w_true + 0.3 * g.standard_normal(n)
        out[f"X_{split}"], out[f"y_{split}"] = X, np.where(margin >= 0, 1.0, -1.0)
    return out


SPEC = problems.spec("sparse_logreg")


def bind(built, backend="jax", dtype="float64") -> Problem:
    """``built`` (a :class:`ProblemData`) as a sparse_logreg :class:`Problem`."""
    return Problem(SPEC, sparse_logreg, built, backend=backend, dtype=dtype, seed=0,
                   params={})


@pytest.fixture(scope="module")
def small_splits():
    return csr_splits(0, n_train=80, n_val=60, n_test=40, d=50, density=0.08)


@pytest.fixture(scope="module")
def small_built(small_splits):
    return sparse_logreg.problem_data(small_splits, lam0=-2.0)


# -- oracle -----------------------------------------------------------------------------------
def test_oracle_matches_finite_differences(small_built):
    p = bind(small_built)
    g = np.random.default_rng(1)
    lam = p.initial_hyperparams() + 0.5 * g.standard_normal(p.lam_shape)
    grad = p.exact_hypergradient(lam)
    w = p.exact_inner_solution(lam)
    assert np.linalg.norm(sparse_logreg.inner_grad(
        w, lam, p.arrays_np, p.static, numpy_ops)) <= 1e-12
    eps = 1e-5
    for _ in range(3):
        direction = g.standard_normal(p.lam_shape)
        fd = (p.value(lam + eps * direction) - p.value(lam - eps * direction)) / (2 * eps)
        # central differences: truncation eps²|F'''| ~ 1e-10, rounding 1e-16|F|/eps ~ 1e-11
        err = abs(fd - grad @ direction) / (np.linalg.norm(grad) * np.linalg.norm(direction))
        assert err <= 1e-6, err


def test_dense_hessian_only_for_small_d(small_built):
    p = bind(small_built)
    lam = p.initial_hyperparams()
    w = p.exact_inner_solution(lam)
    H = sparse_logreg.inner_hessian(w, lam, p.arrays_np, p.static)
    # H against its Hessian-vector products from the oracle's own formula
    v = np.random.default_rng(0).standard_normal(p.w_shape)
    X = sp.csr_matrix(sparse_logreg._csr(p.arrays_np, "train", p.static))
    z = X @ w
    c = 1 / (1 + np.exp(-z)) / (1 + np.exp(z)) / X.shape[0]
    np.testing.assert_allclose(H @ v, X.T @ (c * (X @ v)) + np.exp(lam) * v, rtol=1e-13)
    big = {**p.static, "n_features": sparse_logreg.DENSE_HESSIAN_MAX_D + 1}
    with pytest.raises(ValueError, match=r"only for n_features <= 4000 \(this instance has "
                                         r"4001"):
        sparse_logreg.inner_hessian(w, lam, p.arrays_np, big)


def test_bad_data_are_one_line_errors(small_splits):
    with pytest.raises(ValueError, match=r"X_val has 49 features, X_train has 50"):
        sparse_logreg.problem_data({**small_splits, "X_val": small_splits["X_val"][:, :49]})
    with pytest.raises(ValueError, match=r"y_train must hold labels ±1"):
        sparse_logreg.problem_data({**small_splits, "y_train": (small_splits["y_train"] > 0)
                                    .astype(float)})
    with pytest.raises(ValueError, match=r"missing 'y_val'"):
        sparse_logreg.problem_data({k: v for k, v in small_splits.items() if k != "y_val"})


def test_svmlight_files_give_the_same_instance(small_splits, small_built, tmp_path):
    """data={train, val, test} svmlight files (used as given) → the same problem as the
    matrices themselves (the files' width is their largest column: here d − 1)."""
    from sklearn.datasets import dump_svmlight_file

    files = {}
    for split in ("train", "val", "test"):
        files[split] = str(tmp_path / f"{split}.svm")
        dump_svmlight_file(small_splits[f"X_{split}"], small_splits[f"y_{split}"],
                           files[split], zero_based=False)
    p = problems.make("sparse_logreg", backend="torch", dtype="float64", data=files)
    width = p.static["n_features"]
    assert width == 49  # column 49 is empty in every split (csr_splits)
    ref = bind(sparse_logreg.problem_data(
        {k: (v[:, :width] if sp.issparse(v) else v) for k, v in small_splits.items()}))
    assert p.static == ref.static and p.inner_lr == pytest.approx(ref.inner_lr, rel=1e-12)
    lam = ref.initial_hyperparams()
    # sklearn writes values with 16 significant digits: equal to ~1e-16 relative
    assert rel(p.exact_hypergradient(lam), ref.exact_hypergradient(lam)) <= 1e-10


# -- sparse vs densified (dense logreg on the same matrices) ------------------------------------
@pytest.fixture(scope="module")
def dense_file(small_splits, tmp_path_factory):
    """The same matrices, densified, as a logreg ``.npz`` data file (used as given)."""
    path = tmp_path_factory.mktemp("dense") / "same.npz"
    np.savez(path, **{k: (v.toarray() if sp.issparse(v) else v)
                      for k, v in small_splits.items()})
    return str(path)


def test_oracles_equal_dense_logreg(small_built, dense_file):
    sparse = bind(small_built)
    dense = problems.make("logreg", backend="jax", dtype="float64", data=dense_file)
    assert dense.w_shape == sparse.w_shape
    assert dense.inner_lr == pytest.approx(sparse.inner_lr, rel=1e-12)
    lam = sparse.initial_hyperparams() + 0.4 * np.random.default_rng(3).standard_normal(
        sparse.lam_shape)
    assert rel(sparse.exact_inner_solution(lam), dense.exact_inner_solution(lam)) <= 1e-10
    assert rel(sparse.exact_hypergradient(lam), dense.exact_hypergradient(lam)) <= 1e-10
    assert sparse.value(lam) == pytest.approx(dense.value(lam), rel=1e-12)
    w = sparse.exact_inner_solution(lam)
    for key, value in dense.metrics(w, lam).items():
        assert sparse.metrics(w, lam)[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_math_and_estimates_equal_dense_logreg(backend, small_built, dense_file):
    g = np.random.default_rng(4)
    w_np = 0.5 * g.standard_normal(small_built.w_shape)
    lam_np = small_built.lam0 + 0.4 * g.standard_normal(small_built.lam0.shape)
    # One η for both, stable at λ (1/L(λ₀) may not be: λ has larger penalties). The dense
    # η comes from eigvalsh of XᵀX, the sparse one from the smaller Gram matrix: equal to
    # ~1e-15, but the estimates below should not depend on that.
    sparse = bind(small_built, backend)
    sparse = sparse.with_inner_lr(sparse.stable_inner_lr(lam_np))
    dense = problems.make("logreg", backend=backend, dtype="float64",
                          data=dense_file).with_inner_lr(sparse.inner_lr)
    w, lam = sparse.ops.asarray(w_np), sparse.ops.asarray(lam_np)
    to_np = sparse.ops.to_numpy
    for fn in ("inner_loss", "outer_loss", "inner_grad"):
        got, want = (to_np(getattr(p.fns, fn)(w, lam, p.arrays)) for p in (sparse, dense))
        assert rel(got, want) <= 1e-13, fn
    idx = sparse.ops.asarray(np.array([5, 0, 59, 5, 33]), "int64")  # < n_val = 60
    for fn in ("inner_loss_batch", "outer_loss_batch"):
        got, want = (to_np(getattr(p.fns, fn)(w, lam, p.arrays, idx)) for p in (sparse, dense))
        assert rel(got, want) <= 1e-13, fn
    exact = sparse.exact_hypergradient(lam_np)
    for algo, kw in (("aid_cg", dict(t=2000, K=200)), ("itd", dict(t=150)),
                     ("stocbio", dict(t=100, K=50, batch_size=16, seed=3))):
        a, b = (algorithms.get(algo, backend)(p, p.as_lam(lam_np), **kw)
                for p in (sparse, dense))
        err = rel(to_np(a.hypergrad), to_np(b.hypergrad))
        assert err <= SPARSE_VS_DENSE_RTOL, (algo, err)
        if algo == "aid_cg":  # and both reach the oracle at this t, K
            assert rel(to_np(a.hypergrad), exact) <= 1e-6


# -- the minibatch product ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("numpy",) + BACKENDS)
def test_minibatch_product_equals_the_dense_rows(backend, small_built, small_splits):
    ops = load_ops(backend)
    static = small_built.static
    w = np.random.default_rng(5).standard_normal(small_built.w_shape)
    if backend == "numpy":
        arrays, to_np, put = small_built.arrays, np.asarray, lambda x, dtype=None: x
    else:
        p = bind(small_built, backend)
        arrays, to_np, put = p.arrays, p.ops.to_numpy, p.ops.asarray
    for split, n in (("train", 80), ("val", 60)):
        idx = np.array([0, 3, 3, n - 1, 41, 0])  # an empty row (0), repeats, the last row
        X = small_splits[f"X_{split}"]
        want = X.toarray()[idx] @ w
        got = sparse_logreg._batch_product(put(w), arrays, split, static, ops,
                                           put(idx, "int64"))
        atol = 1e-13 * np.abs(want).max()
        np.testing.assert_allclose(to_np(got), want, rtol=0, atol=atol)
        full = sparse_logreg._product(put(w), arrays, split, ops)
        np.testing.assert_allclose(to_np(full), X @ w, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def skewed_built():
    """news20_shaped rows (log-normal lengths: the longest ~15× the mean) at n = 2,000, so
    a batch of 64 rows takes the flat block."""
    return problems.build("sparse_logreg", seed=3, n_train=2000, n_val=500, n_test=0,
                          n_features=3000, density=0.01)[2]


@pytest.mark.parametrize("backend", ("numpy",) + BACKENDS)
def test_flat_block_and_its_fallback_equal_the_dense_rows(backend, skewed_built):
    """A typical batch of 64 fits the flat budget; 64 draws of the longest row do not and
    take the padded block; at b = 1,000 the fallback is the whole split's product, and a
    batch of every row reads that product directly. All equal X[idx] @ w, in value and
    (JAX, torch) in ∇_w."""
    built, ops = skewed_built, load_ops(backend)
    static = built.static
    lens = np.diff(built.arrays["X_train_indptr"])
    budget = sparse_logreg.flat_budget(64, static, "train")
    assert budget is not None and budget < 64 * static["max_row_nnz_train"] / 4
    X = sp.csr_matrix((built.arrays["X_train_data"], built.arrays["X_train_indices"],
                       built.arrays["X_train_indptr"]), shape=(2000, 3000)).toarray()
    g = np.random.default_rng(7)
    w = g.standard_normal(3000)
    typical = g.integers(0, 2000, size=64)
    longest = np.full(64, int(np.argmax(lens)))
    assert lens[typical].sum() <= budget < lens[longest].sum()
    # b = 1,000 (b·μ < nnz < b·k): the flat block, and the whole split's product as its
    # fallback; b = 2,000 (b·μ ≥ nnz): the whole split's product gathered
    nnz = built.arrays["X_train_data"].size
    large, longest_large = g.integers(0, 2000, size=1000), np.full(1000, int(np.argmax(lens)))
    assert 1000 * static["row_nnz_mean_train"] < nnz < 1000 * static["max_row_nnz_train"]
    assert lens[large].sum() <= sparse_logreg.flat_budget(1000, static, "train") < \
        lens[longest_large].sum()
    whole = g.permutation(2000)
    assert 2000 * static["row_nnz_mean_train"] >= nnz
    if backend == "numpy":
        arrays, to_np, put = built.arrays, np.asarray, lambda x, dtype=None: x
    else:
        p = bind(built, backend)
        arrays, to_np, put = p.arrays, p.ops.to_numpy, p.ops.asarray
    for idx in (typical, longest, large, longest_large, whole):
        v = np.random.default_rng(idx.size).standard_normal(idx.size)
        want = X[idx] @ w
        got = sparse_logreg._batch_product(put(w), arrays, "train", static, ops,
                                           put(idx, "int64"))
        np.testing.assert_allclose(to_np(got), want, rtol=0, atol=1e-12 * np.abs(want).max())
        if backend == "jax":
            import jax

            grad = jax.grad(lambda w_: ops.vdot(sparse_logreg._batch_product(
                w_, arrays, "train", static, ops, put(idx, "int64")), put(v)))(put(w))
        elif backend == "torch":
            import torch

            w_t = put(w).requires_grad_(True)
            (grad,) = torch.autograd.grad(ops.vdot(sparse_logreg._batch_product(
                w_t, arrays, "train", static, ops, put(idx, "int64")), put(v)), w_t)
        else:
            continue
        np.testing.assert_allclose(to_np(grad), X[idx].T @ v, rtol=0, atol=1e-12)


def test_minibatch_block_is_batch_by_row_width(small_built):
    """The padded block is (b, k) and the flat one smaller: the cost does not grow with n
    or nnz."""
    import jax.numpy as jnp

    p = bind(small_built, "jax")
    k = p.static["max_row_nnz_train"]
    assert k == int(np.diff(p.arrays_np["X_train_indptr"]).max())
    jaxpr = jax.make_jaxpr(lambda w, idx: p.fns.inner_loss_batch(w, p.as_lam(
        p.initial_hyperparams()), p.arrays, idx))(p.w_init, jnp.arange(7))
    sizes = {int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    nnz = p.arrays_np["X_train_data"].size
    assert max(sizes) <= max(7 * k, p.w_shape[0]) < nnz


# -- ops ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_and_arange_agree_with_numpy(backend):
    g = np.random.default_rng(6)
    x, ids = g.standard_normal(40), g.integers(0, 9, size=40)
    want = numpy_ops.segment_sum(x, ids, 9)
    np.testing.assert_allclose(want, np.bincount(ids, x, minlength=9), rtol=1e-15)
    ops_mod = load_ops(backend)
    device = ops_mod.resolve_device("cpu")
    ops_mod.require_dtype("float64")
    got = ops_mod.segment_sum(ops_mod.asarray(x, device=device),
                              ops_mod.asarray(ids, "int64", device=device), 9)
    np.testing.assert_allclose(ops_mod.to_numpy(got), want, rtol=1e-14)
    like = ops_mod.asarray(x, device=device)
    np.testing.assert_array_equal(ops_mod.to_numpy(ops_mod.arange(5, like)), np.arange(5))


def test_torch_segment_sum_has_second_derivatives():
    """Out-of-place index_add: autograd differentiates it twice (the Hessian products)."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0])
    ops = load_ops("torch")
    out = ops.segment_sum(x * x, ids, 2)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all() and x.grad is None


# -- at scale -----------------------------------------------------------------------------------
LARGE = dict(n_train=5000, n_val=2000, n_test=1000, n_features=100_000, density=1e-3)


@pytest.fixture(scope="module")
def large_built():
    """The catalog problem at d = 100,000 (news20_shaped: ~4.9e5 training non-zeros),
    its oracles at λ₀, and the tracemalloc peak of building it and running them."""
    tracemalloc.start()
    _, _, built = problems.build("sparse_logreg", seed=0, **LARGE)
    lam = built.lam0
    w = sparse_logreg.exact_inner_solution(lam, built.arrays, built.static)
    grad = sparse_logreg.exact_hypergradient(lam, built.arrays, built.static)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return built, w, grad, peak


def test_large_instance_oracle_is_finite_and_memory_is_sparse(large_built):
    built, w, grad, peak = large_built
    assert grad.shape == (LARGE["n_features"],) and np.all(np.isfinite(grad))
    assert np.any(grad != 0)
    assert np.linalg.norm(sparse_logreg.inner_grad(
        w, built.lam0, built.arrays, built.static, numpy_ops)) <= 1e-10
    dense_bytes = LARGE["n_train"] * LARGE["n_features"] * 8  # one n × d float64: 4 GB
    # the generator's O(nnz) work arrays, the data (18 MB), one CSR copy and X² in the
    # oracle, a few d-vectors: ~71 MB measured
    assert peak < dense_bytes / 20, f"peak {peak / 2**20:.0f} MB"


def test_large_instance_process_peak_rss():
    """In a fresh interpreter (no other test's memory counts), the growth of the peak RSS
    (``VmHWM``: ``ru_maxrss`` would carry the forking pytest process's peak over the exec)
    from after the imports to after building the instance and running both oracles:
    ~65 MB measured, against 3.7 GiB for one n × d float64 array."""
    code = ("import sys\n"
            "from hypersweep import problems\n"
            "from hypersweep.problems import sparse_logreg as m\n"
            "import scipy.sparse, scipy.sparse.linalg, scipy.special\n"
            "def kib(field):\n"
            "    with open('/proc/self/status') as f:\n"
            "        return next(int(x.split()[1]) for x in f if x.startswith(field))\n"
            "before = kib('VmRSS:')\n"
            f"_, _, b = problems.build('sparse_logreg', seed=0, **{LARGE!r})\n"
            "m.exact_hypergradient(b.lam0, b.arrays, b.static)\n"
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules\n"
            "print(before, kib('VmHWM:'))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    before, peak = (1024 * int(v) for v in out.stdout.split()[-2:])
    dense_bytes = LARGE["n_train"] * LARGE["n_features"] * 8
    assert peak - before < dense_bytes / 20, f"peak RSS grew by {(peak - before) / 2**20:.0f} MB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_instance_stochastic_steps(backend, large_built):
    from hypersweep.algorithms.solver_run import SolverRun

    built = large_built[0]
    p = bind(built, backend)
    lam = p.as_lam(p.initial_hyperparams())
    stocbio = algorithms.get("stocbio", backend)
    out = stocbio(p, lam, t=10, K=10, batch_size=64, seed=0)
    assert np.all(np.isfinite(p.ops.to_numpy(out.hypergrad)))
    assert out.n_samples_touched == 21 * 64 + 64
    run = SolverRun(p, "soba", seed=0, params={"batch_size": 64})
    snap = run.advance(2)
    assert snap.k == 2 and np.all(np.isfinite(p.ops.to_numpy(snap.lam)))
    assert np.all(np.isfinite(p.ops.to_numpy(snap.w)))


# -- the catalog instance and an hpo cell ---------------------------------------------------------
HPO_PARAMS = dict(n_train=200, n_val=100, n_test=100, n_features=2000, density=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hpo_cell_runs(backend):
    from hypersweep.orchestrator.cell import Cell, run_cell

    cell = Cell(study="sparse", pipeline="hpo", problem="sparse_logreg", algorithm="aid_cg",
                backend=backend, t=20, K=10, seed=0, problem_params=json.dumps(HPO_PARAMS),
                pipeline_params=json.dumps({"outer_steps": 5}))
    row, _ = run_cell(cell)
    assert row["status"] == "ok", row.get("error")


@pytest.mark.ray
@pytest.mark.slow
def test_cli_runs_an_hpo_study_on_an_sklearn_svmlight_file(tmp_path):
    """The issue's file: ``sklearn.datasets.dump_svmlight_file`` (0-based indices), sparse
    n = 5,000 × d = 50,000 at 0.1 % density, one file split by the problem; ``hypersweep
    run`` (a real CLI process, its own embedded Ray) with stocbio and aid_cg on both
    backends; every cell ok with a finite ‖∇F(λ_final)‖ from the sparse oracle."""
    import pandas as pd
    from sklearn.datasets import dump_svmlight_file

    g = np.random.default_rng(11)
    n, d = 5000, 50_000
    nnz = int(n * d * 1e-3)
    rows, cols = g.integers(0, n, nnz), g.integers(0, d, nnz)
    X = sp.csr_matrix((g.random(nnz) + 0.1, (rows, cols)), shape=(n, d))
    X.sum_duplicates()
    y = np.where(X @ g.standard_normal(d) + 0.3 * g.standard_normal(n) >= 0, 1.0, -1.0)
    path = tmp_path / "big.svmlight"
    dump_svmlight_file(X, y, str(path))  # zero_based=True, sklearn's default
    study = tmp_path / "study.yaml"
    study.write_text(
        "study: svmlight-big\npipeline: hpo\nbackend: [jax, torch]\ndtype: float64\n"
        "problems:\n  - name: sparse_logreg\n"
        f"    params: {{data: {str(path)!r}, zero_based: true, n_train: 3000, n_val: 1000, "
        "n_test: 1000}\n"
        "algorithms: [aid_cg, {name: stocbio, params: {batch_size: 64}}]\n"
        "t: [10]\nK: [10]\nseeds: 1\npipeline_params: {outer_steps: 4}\n"
        f"output: {str(tmp_path / 'out')!r}\nmlflow: {{enabled: false}}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "hypersweep", "run", str(study), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "out" / "results")
    assert sorted(zip(table.algorithm, table.backend)) == [
        ("aid_cg", "jax"), ("aid_cg", "torch"), ("stocbio", "jax"), ("stocbio", "torch")]
    assert set(table.status) == {"ok"}, table.error_message.tolist()
    assert np.all(np.isfinite(table.outer_grad_norm)) and np.all(table.outer_grad_norm > 0)
    problem_params = json.loads(table.problem_params.iloc[0])
    assert problem_params["zero_based"] is True


def test_catalog_instance_is_sparse_and_seeded():
    p = problems.make("sparse_logreg", backend="jax", dtype="float64",
                      **problems.spec("sparse_logreg").small)
    assert not any(k in p.arrays_np for k in ("X_train", "X_val"))
    assert p.built.info["n_train"] == len(p.arrays_np["y_train"])
    for split in ("train", "val"):
        indptr = p.arrays_np[f"X_{split}_indptr"]
        assert indptr[-1] == p.arrays_np[f"X_{split}_data"].size
        np.testing.assert_array_equal(p.arrays_np[f"X_{split}_rows"],
                                      np.repeat(np.arange(indptr.size - 1), np.diff(indptr)))


def test_step_time_scales_with_the_batch_not_n(large_built):
    """Time of one JAX minibatch gradient vs one full-batch gradient on the large
    instance: the minibatch one must be much cheaper (it reads 64 rows, not 5000)."""
    import jax.numpy as jnp

    p = bind(large_built[0], "jax")
    lam = p.as_lam(p.initial_hyperparams())
    idx = jnp.arange(64) * 7
    batch = jax.jit(jax.grad(p.fns.inner_loss_batch))
    full = jax.jit(p.fns.inner_grad)
    timings = {}
    for name, fn in (("batch", lambda: batch(p.w_init, lam, p.arrays, idx)),
                     ("full", lambda: full(p.w_init, lam, p.arrays))):
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        for _ in range(10):
            jax.block_until_ready(fn())
        timings[name] = (time.perf_counter() - t0) / 10
    assert timings["batch"] < timings["full"], timings
