"""Every registered problem: oracles vs finite differences, analytic derivatives vs
autodiff, JAX ↔ torch parity, contraction at λ₀, float32 sanity, hostile inputs, user data.

Each problem is tested on its catalog ``small`` instance (``ProblemSpec.small``), which
keeps the file well under a minute on 2 cores; a problem added to the catalog (or by a
plugin) is picked up with no edit here.
"""
from __future__ import annotations

import numpy as np
import pytest

from hypersweep import problems
from hypersweep.algorithms.common import minibatch_sizes
from hypersweep.problems import numpy_ops

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

ALL = problems.names()
MINIBATCH = [n for n in ALL if "minibatch" in problems.spec(n).capabilities]


@pytest.fixture(scope="session")
def tiny_multiclass(tmp_path_factory) -> str:
    """A 3-class, 4-feature npz: data_cleaning on user data, with a 15-dimensional W."""
    g = np.random.default_rng(7)
    centers = 1.5 * g.standard_normal((3, 4))
    arrays = {}
    for split, n in (("train", 40), ("val", 30), ("test", 30)):
        y = g.integers(0, 3, size=n)
        arrays[f"X_{split}"] = centers[y] + g.standard_normal((n, 4))
        arrays[f"y_{split}"] = y
    path = tmp_path_factory.mktemp("data") / "tiny_multiclass.npz"
    np.savez(path, **arrays)
    return str(path)


def make(name, backend="jax", dtype="float64", seed=0, **extra):
    """The catalog's small instance of ``name`` (updated by ``extra``)."""
    return problems.make(name, backend=backend, seed=seed, dtype=dtype,
                         **{**problems.spec(name).small, **extra})


def random_point(problem, seed=0):
    """A random (w, λ) near λ₀ (λ perturbed so per-coordinate formulas are exercised)."""
    g = np.random.default_rng(seed)
    w = 0.5 * g.standard_normal(problem.w_shape)
    lam = problem.initial_hyperparams() + 0.3 * g.standard_normal(problem.lam_shape)
    return w, lam


# -- oracles -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_exact_hypergradient_matches_finite_differences(name):
    _check_oracle_against_finite_differences(make(name))


def _check_oracle_against_finite_differences(p):
    _, lam = random_point(p, seed=1)
    grad = p.exact_hypergradient(lam)
    assert grad.shape == p.lam_shape
    g = np.random.default_rng(2)
    for _ in range(3):
        direction = g.standard_normal(p.lam_shape)
        # Central differences, eps = 1e-5: truncation eps²|F'''| ~ 1e-10 and rounding
        # 1e-16|F|/eps ~ 1e-11; the Newton oracles stop at ‖∇‖ ≤ 1e-12 (quadratic
        # convergence leaves far less). rtol 1e-6 of ‖∇F‖‖d‖ is 4 orders above that noise
        # and far below any formula error (a missing term or factor is O(1)).
        eps = 1e-5
        fd = (p.value(lam + eps * direction) - p.value(lam - eps * direction)) / (2 * eps)
        scale = np.linalg.norm(grad) * np.linalg.norm(direction)
        assert abs(fd - np.sum(grad * direction)) <= 1e-6 * scale, (fd, grad @ direction)


@pytest.mark.parametrize("name", ALL)
def test_exact_inner_solution_is_stationary(name):
    p = make(name)
    _, lam = random_point(p, seed=3)
    w = p.exact_inner_solution(lam)
    assert w.shape == p.w_shape
    grad = p.module.inner_grad(w, lam, p.arrays_np, p.static, numpy_ops)
    # Newton's stopping rule is 1e-12; closed forms solve to ~cond·1e-16.
    assert np.linalg.norm(grad) <= 1e-10


# -- analytic derivatives vs autodiff ----------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_inner_grad_matches_jax_autodiff(name):
    p = make(name, backend="jax")
    w_np, lam_np = random_point(p, seed=4)
    w, lam = jnp.asarray(w_np), jnp.asarray(lam_np)
    # jit: one compile is cheaper than op-by-op dispatch; arrays go in as arguments.
    analytic = np.asarray(jax.jit(p.fns.inner_grad)(w, lam, p.arrays))
    auto = np.asarray(jax.jit(jax.grad(p.fns.inner_loss))(w, lam, p.arrays))
    # Same float64 sums in a different order: agreement to ~1e-14 relative; 1e-10 leaves room.
    np.testing.assert_allclose(analytic, auto, rtol=0, atol=1e-10 * np.abs(auto).max())
    np.testing.assert_allclose(
        p.module.inner_grad(w_np, lam_np, p.arrays_np, p.static, numpy_ops), auto,
        rtol=0, atol=1e-10 * np.abs(auto).max())


@pytest.mark.parametrize("name", ALL)
def test_inner_grad_and_hessian_match_torch_autograd(name):
    p = make(name, backend="torch")
    w_np, lam_np = random_point(p, seed=5)
    w = torch.tensor(w_np, requires_grad=True)
    lam = torch.tensor(lam_np)
    (auto,) = torch.autograd.grad(p.inner_loss(w, lam), w)
    analytic = p.fns.inner_grad(w.detach(), lam, p.arrays)
    auto, analytic = auto.numpy(), analytic.numpy()
    np.testing.assert_allclose(analytic, auto, rtol=0, atol=1e-10 * np.abs(auto).max())
    # The dense numpy Hessian against autograd's (torch eager: milliseconds at these sizes).
    size = int(np.prod(p.w_shape))
    hess_auto = torch.autograd.functional.hessian(
        lambda w_: p.inner_loss(w_, lam), torch.tensor(w_np)).reshape(size, size).numpy()
    hess = p.module.inner_hessian(w_np, lam_np, p.arrays_np, p.static)
    assert hess.shape == (size, size)
    np.testing.assert_allclose(hess, hess_auto, rtol=0, atol=1e-10 * np.abs(hess_auto).max())


@pytest.mark.parametrize("name", ALL)
def test_jax_torch_numpy_evaluate_the_same_losses(name):
    pj, pt = make(name, backend="jax"), make(name, backend="torch")
    w, lam = random_point(pj, seed=6)
    for loss in ("inner_loss", "outer_loss"):
        ref = float(getattr(pj.module, loss)(w, lam, pj.arrays_np, pj.static, numpy_ops))
        via_jax = float(jax.jit(getattr(pj.fns, loss))(jnp.asarray(w), jnp.asarray(lam),
                                                        pj.arrays))
        via_torch = float(getattr(pt, loss)(torch.tensor(w), torch.tensor(lam)))
        # float64, identical formulas: only summation order differs.
        assert via_jax == pytest.approx(ref, rel=1e-12), loss
        assert via_torch == pytest.approx(ref, rel=1e-12), loss


@pytest.mark.parametrize("name", MINIBATCH)
def test_minibatch_losses_match_full_losses_on_the_rows(name):
    if name == "sparse_logreg":  # CSR arrays are not cut by row with v[idx]
        pytest.skip("checked on its CSR rows by tests/test_sparse_logreg.py::"
                    "test_minibatch_product_equals_the_dense_rows")
    p = make(name, backend="torch")
    w, lam = random_point(p, seed=8)
    n_train, n_val = minibatch_sizes(p)
    idx_train = np.random.default_rng(0).choice(n_train, size=n_train // 3, replace=False)
    idx_val = np.arange(n_val)[::2]

    def restrict(split, idx):
        # rows of X_<split>/y_<split>; quadratic_sum: per-sample "inner_*"/"outer_*" arrays
        # and their means (the full losses read the means)
        side = {"train": "inner_", "val": "outer_"}[split]
        out = {k: (v[idx] if k.endswith(f"_{split}") or (k.startswith(side) and
                                                          not k.endswith("_mean")) else v)
               for k, v in p.arrays_np.items()}
        for k in list(out):
            if k.startswith(side) and k.endswith("_mean"):
                out[k] = out[k.removesuffix("_mean")].mean(axis=0)
        return out

    # λ is per training example only for data_cleaning; there the batch takes λ[idx] too.
    per_example = p.lam_shape == (n_train,)
    lam_sub = lam[idx_train] if per_example else lam
    expect_in = p.module.inner_loss(w, lam_sub, restrict("train", idx_train), p.static, numpy_ops)
    expect_out = p.module.outer_loss(w, lam, restrict("val", idx_val), p.static, numpy_ops)
    w_t, lam_t = torch.tensor(w), torch.tensor(lam)
    got_in = p.fns.inner_loss_batch(w_t, lam_t, p.arrays, torch.as_tensor(idx_train))
    got_out = p.fns.outer_loss_batch(w_t, lam_t, p.arrays, torch.as_tensor(idx_val))
    assert float(got_in) == pytest.approx(float(expect_in), rel=1e-12)
    assert float(got_out) == pytest.approx(float(expect_out), rel=1e-12)
    everything = torch.arange(n_train)
    assert float(p.fns.inner_loss_batch(w_t, lam_t, p.arrays, everything)) == pytest.approx(
        float(p.inner_loss(w_t, lam_t)), rel=1e-12)


# -- contraction and step size -----------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_default_instance_contracts_at_lam0(name):
    p = problems.make(name, backend="jax", seed=0, dtype="float64")
    q = p.contraction_factor()
    assert 0.0 < q < 1.0


def test_quadratic_contraction_factor_is_one_minus_one_over_cond():
    for cond in (10.0, 250.0):
        p = problems.make("quadratic", backend="jax", dtype="float64", cond=cond, mu=0.5)
        # eigvalsh of an explicitly rotated diagonal: relative error ~1e-15 · cond.
        assert p.contraction_factor(np.ones(p.lam_shape)) == pytest.approx(1 - 1 / cond,
                                                                           rel=1e-12)


# -- float32 -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name", ALL)
def test_float32_instances_are_finite_and_stay_float32(name, backend):
    p = make(name, backend=backend, dtype="float32")
    lam = p.as_lam(p.initial_hyperparams())
    w = p.w_init

    def phi(w_, lam_, arrays):
        return w_ - p.inner_lr * p.fns.inner_grad(w_, lam_, arrays)

    fns = (phi, p.fns.inner_loss, p.fns.outer_loss)
    # jax: jit with the arrays as arguments (one compile beats op-by-op dispatch).
    step, inner_loss, outer_loss = map(jax.jit, fns) if backend == "jax" else fns
    start = float(inner_loss(w, lam, p.arrays))
    for _ in range(20):
        w = step(w, lam, p.arrays)
    assert str(w.dtype).endswith("float32")
    for value in (inner_loss(w, lam, p.arrays), outer_loss(w, lam, p.arrays)):
        assert str(value.dtype).endswith("float32")
        assert np.isfinite(float(value))
    # Φ with η = 1/L is a descent step: 20 steps cannot increase L_in.
    assert float(inner_loss(w, lam, p.arrays)) <= start + 1e-6 * abs(start)


# -- data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_data_depend_on_seed_only(name):
    a, b, c = (make(name, seed=s).arrays_np for s in (3, 3, 4))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_data_cleaning_on_a_multiclass_file(tiny_multiclass):
    """User data (3 classes, 4 features): the oracle still matches finite differences, and
    only the corruption moves with the seed."""
    p = make("data_cleaning", data=tiny_multiclass, corruption=0.2, reg=0.05)
    assert p.w_shape == (5, 3)
    _check_oracle_against_finite_differences(p)
    a, c = (make("data_cleaning", seed=s, data=tiny_multiclass, corruption=0.2,
                 reg=0.05).arrays_np for s in (3, 4))
    for key in ("X_train", "X_val", "y_val"):
        np.testing.assert_array_equal(a[key], c[key])
    assert not np.array_equal(a["y_train"], c["y_train"])


def test_data_cleaning_corrupts_the_asked_fraction_of_training_labels_only():
    p = problems.make("data_cleaning", backend="jax", dtype="float64", n_train=200,
                      n_val=50, n_test=50, corruption=0.25)
    clean = problems.make("data_cleaning", backend="jax", dtype="float64", n_train=200,
                          n_val=50, n_test=50, corruption=0.0)
    changed = p.arrays_np["y_train"] != clean.arrays_np["y_train"]
    np.testing.assert_array_equal(changed, p.built.info["corrupted"])
    assert changed.sum() == 50
    np.testing.assert_array_equal(p.arrays_np["y_val"], clean.arrays_np["y_val"])
    assert p.arrays_np["y_train"].dtype == np.int64 and p.arrays["y_train"].dtype == jnp.int64
    np.testing.assert_array_equal(p.arrays_np["X_train"][:, -1], 1.0)  # the bias feature


def test_breast_cancer_is_standardized_and_fits_default_sizes():
    p = problems.make("logreg", backend="jax", dtype="float64", dataset="breast_cancer")
    X = p.arrays_np["X_train"]
    assert X.shape == (200, 30)
    np.testing.assert_allclose(X.mean(0), 0, atol=1e-12)
    assert set(np.unique(p.arrays_np["y_train"])) == {-1.0, 1.0}
    m = p.metrics(p.exact_inner_solution(p.initial_hyperparams()), p.initial_hyperparams())
    assert m["test_accuracy"] > 0.9  # an easy set: a sanity floor, not a benchmark


def _save_parquet(arrays: dict, path, labels=None):
    import pandas as pd

    frames = []
    for split in ("train", "val", "test"):
        if f"X_{split}" not in arrays:
            continue
        X = arrays[f"X_{split}"]
        frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])
        y = arrays[f"y_{split}"]
        frame["y"] = y if labels is None else labels(y)
        frame["split"] = split
        frames.append(frame)
    pd.concat(frames).to_parquet(path)


@pytest.mark.parametrize("name", ["ridge", "logreg"])
def test_user_data_round_trips_through_npz_and_parquet(name, tmp_path):
    original = make(name)
    arrays = original.arrays_np
    np.savez(tmp_path / "d.npz", **arrays)
    # logreg's parquet file uses {0, 1} labels, which must map back to {−1, +1}.
    to01 = (lambda y: (y > 0).astype(np.int64)) if name == "logreg" else None
    _save_parquet(arrays, tmp_path / "d.parquet", labels=to01)
    lam = original.initial_hyperparams()
    for path in (tmp_path / "d.npz", tmp_path / "d.parquet"):
        loaded = make(name, data=str(path))
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded.arrays_np[key], value, err_msg=key)
        # Equal arrays, but parquet hands back Fortran-ordered X: BLAS may sum in another
        # order, so the oracles agree to rounding, not bit for bit.
        assert loaded.value(lam) == pytest.approx(original.value(lam), rel=1e-13)
        np.testing.assert_allclose(loaded.exact_hypergradient(lam),
                                   original.exact_hypergradient(lam), rtol=1e-10)


@pytest.mark.parametrize("name", ["biased_reg", "hyper_rep"])
def test_multitask_user_data_are_task_major_rows(name, tmp_path):
    original = make(name)
    flat = {k: v.reshape(-1, v.shape[-1]) if v.ndim == 3 else v.reshape(-1)
            for k, v in original.arrays_np.items()}
    np.savez(tmp_path / "tasks.npz", **flat)
    loaded = make(name, data=str(tmp_path / "tasks.npz"))
    lam = loaded.initial_hyperparams()
    assert loaded.value(lam) == pytest.approx(original.value(lam), rel=1e-14)
    with pytest.raises(ValueError, match=r"not a multiple of n_tasks=5"):
        make(name, n_tasks=5, data=str(tmp_path / "tasks.npz"))


# -- hostile input -------------------------------------------------------------------------

def test_unknown_problem_lists_the_choices():
    with pytest.raises(ValueError, match=r"'ridgee'.*Valid choices: .*logreg.*quadratic"):
        problems.make("ridgee", backend="jax")


@pytest.mark.parametrize("name", ALL)
def test_unknown_param_names_the_key_and_the_choices(name):
    with pytest.raises(ValueError, match=r"'n_hiden'.*Valid choices: .*inner_lr"):
        problems.make(name, backend="jax", n_hiden=3)


@pytest.mark.parametrize("name", ALL)
def test_wrong_lam_shape_names_the_expected_shape(name):
    p = make(name)
    bad = np.zeros(int(np.prod(p.lam_shape)) + 1)
    with pytest.raises(ValueError, match=r"lam for problem .* must have shape"):
        p.exact_hypergradient(bad)


@pytest.mark.parametrize("name, bad", [
    ("logreg", dict(lam0=[0.0, 1.0, 2.0])),
    ("logreg", dict(dataset="mnist")),
    ("data_cleaning", dict(dataset="mnist")),
    ("data_cleaning", dict(corruption=1.5)),
    ("kernel_ridge", dict(lam0=(1.0, 2.0, 3.0))),
    ("quadratic", dict(cond=0.5)),
    ("quadratic", dict(data="x.npz")),
    ("hyper_rep", dict(n_hidden=0)),
    ("biased_reg", dict(mu=-1.0)),
])
def test_bad_params_raise_value_error_naming_the_key(name, bad):
    key = next(iter(bad))
    pattern = r"dataset 'mnist'\. Valid choices: " if key == "dataset" else key
    with pytest.raises(ValueError, match=pattern):
        problems.make(name, backend="jax", **bad)


@pytest.mark.parametrize("name", ["ridge", "logreg", "kernel_ridge", "data_cleaning"])
def test_malformed_npz_names_the_array(name, tmp_path):
    g = np.random.default_rng(0)
    good = {"X_train": g.standard_normal((10, 3)), "y_train": np.arange(10) % 2,
            "X_val": g.standard_normal((6, 3)), "y_val": np.arange(6) % 2}
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in good.items() if k != "y_val"})
    with pytest.raises(ValueError, match=r"missing array\(s\) y_val; required: X_train"):
        problems.make(name, backend="jax", data=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "mismatch.npz", **{**good, "y_train": np.zeros(9)})
    with pytest.raises(ValueError, match=r"y_train must have shape \(10,\)"):
        problems.make(name, backend="jax", data=str(tmp_path / "mismatch.npz"))
    np.savez(tmp_path / "features.npz", **{**good, "X_val": g.standard_normal((6, 4))})
    with pytest.raises(ValueError, match=r"X_val has 4 features"):
        problems.make(name, backend="jax", data=str(tmp_path / "features.npz"))


def test_logreg_user_data_must_have_two_classes(tmp_path):
    g = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", X_train=g.standard_normal((9, 2)), y_train=np.arange(9) % 3,
             X_val=g.standard_normal((3, 2)), y_val=np.arange(3) % 3)
    with pytest.raises(ValueError, match="exactly 2 classes"):
        problems.make("logreg", backend="jax", data=str(tmp_path / "three.npz"))


def test_missing_twenty_newsgroups_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))  # an empty data home: not there
    with pytest.raises(ValueError, match=r"'twenty_newsgroups' is not available locally.*"
                                         r"Valid choices for dataset: synthetic, breast_cancer"):
        problems.make("logreg", backend="jax", dataset="twenty_newsgroups")
    assert not any(tmp_path.iterdir())  # and nothing was downloaded


def test_twenty_newsgroups_keeps_the_most_frequent_features_dense(monkeypatch):
    """The loader's logic on a stand-in corpus (the real one is never downloaded here)."""
    import scipy.sparse
    import sklearn.datasets
    from sklearn.utils import Bunch

    g = np.random.default_rng(0)
    counts = np.zeros((60, 8))
    counts[:, [1, 4, 6]] = g.random((60, 3))  # columns 1, 4, 6: in every document
    counts[:5, [0, 2]] = 1.0  # rare columns
    names = ["alt.atheism", "comp.graphics", "rec.autos", "sci.space"]

    def fake_fetch(*, subset, download_if_missing):
        assert subset == "all" and download_if_missing is False
        return Bunch(data=scipy.sparse.csr_matrix(counts), target=np.arange(60) % 4,
                     target_names=names)

    monkeypatch.setattr(sklearn.datasets, "fetch_20newsgroups_vectorized", fake_fetch)
    p = problems.make("logreg", backend="jax", dtype="float64", dataset="twenty_newsgroups",
                      n_train=30, n_val=15, n_test=15, n_features=3)
    X = np.concatenate([p.arrays_np[f"X_{s}"] for s in ("train", "val", "test")])
    assert X.shape == (60, 3)
    # Rows are shuffled and columns standardized (an increasing affine map): the sorted
    # values of kept column j are an affine image of the sorted values of column [1, 4, 6][j].
    for j, source_column in enumerate([1, 4, 6]):
        r = np.corrcoef(np.sort(X[:, j]), np.sort(counts[:, source_column]))[0, 1]
        assert r == pytest.approx(1.0, abs=1e-12)
    y = np.concatenate([p.arrays_np[f"y_{s}"] for s in ("train", "val", "test")])
    assert (y == 1).sum() == 30  # comp.graphics and sci.space are the technical half


def test_problem_modules_import_neither_torch_nor_jax():
    import subprocess
    import sys

    code = ("import sys\nfrom hypersweep import problems\n"
            "from hypersweep.problems import helpers\n"
            "for n in problems.names():\n"
            "    problems.spec(n); __import__(problems.spec(n).impl)\n"
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'jax'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
