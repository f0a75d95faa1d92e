"""svmlight and MNIST-format loaders, the splits, and the generators at published shapes.

Round trips go through scikit-learn's own writer (``dump_svmlight_file``) at the size the
issue names (5,000 × 50,000, density 0.1 %); malformed files must fail in one line naming
the file and the line; the generators must build without an n × d dense array and give
data that a linear model learns from.
"""
from __future__ import annotations

import bz2
import gzip
import struct
import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from sklearn.datasets import dump_svmlight_file
from sklearn.linear_model import LogisticRegression

from hypersweep.problems import data as data_module
from hypersweep.problems import datasets as ds
from hypersweep.problems.data import is_svmlight, load_user_data

N_BIG, D_BIG, DENSITY = 5000, 50_000, 0.001


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS/OpenMP thread: on two cores shared with other test runs, spinning BLAS
    threads made the small classifier fits ~100× slower (10 s instead of 0.1 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _same_csr(a, b):
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float64
    assert np.array_equal(a.indptr, b.indptr)
    assert np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data, b.data)


def _canonical(X):
    """CSR float64 with sorted, unique indices per row and no stored zeros."""
    assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float64
    assert X.has_canonical_format
    for i in range(min(X.shape[0], 500)):
        row = X.indices[X.indptr[i]:X.indptr[i + 1]]
        assert np.all(np.diff(row) > 0)
    assert np.all(X.data != 0)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(X, path): a random 5,000 × 50,000 CSR at density 0.1 % written 1-based by sklearn,
    each row's label its own row number (so that a split's rows can be told apart)."""
    gen = np.random.default_rng(0)
    # values of 6 decimals: sklearn writes "%.16g", one digit short of float64's 17, so
    # arbitrary doubles come back within an ulp rather than bit for bit
    X = sp.random(N_BIG, D_BIG, density=DENSITY, format="csr", random_state=gen,
                  data_rvs=lambda k: np.round(gen.uniform(0.5, 2.0, size=k)
                                              * gen.choice([-1, 1], size=k), 6))
    # the last column is used, so that the width read back is D_BIG
    X = sp.csr_matrix(X + sp.csr_matrix(([1.5], ([0], [D_BIG - 1])), shape=X.shape))
    X.sort_indices()
    path = tmp_path_factory.mktemp("big") / "big.svm"
    dump_svmlight_file(X, np.arange(N_BIG, dtype=np.float64), str(path), zero_based=False)
    return X, str(path)


# --- round trips -------------------------------------------------------------------------


def test_round_trip_identical_csr(big):
    X, path = big
    start = time.perf_counter()
    out = ds.load_svmlight_data({"train": path, "val": path})
    seconds = time.perf_counter() - start
    _same_csr(out["X_train"], X)
    _same_csr(out["X_val"], X)
    assert np.array_equal(out["y_train"], np.arange(N_BIG))
    assert seconds < 10, seconds  # ~0.2 s a file on a quiet machine


def test_one_file_split_sizes_and_rows(big):
    X, path = big
    out = ds.load_svmlight_data(path, n_train=3000, n_val=1500, n_test=500, seed=3)
    assert [out[f"X_{s}"].shape for s in ("train", "val", "test")] == \
        [(3000, D_BIG), (1500, D_BIG), (500, D_BIG)]
    for split in ("train", "val", "test"):
        _canonical(out[f"X_{split}"])
    # every row once, unchanged: the labels are the row numbers
    rows = np.concatenate([out[f"y_{s}"] for s in ("train", "val", "test")]).astype(int)
    assert np.array_equal(np.sort(rows), np.arange(N_BIG))
    stacked = sp.vstack([out[f"X_{s}"] for s in ("train", "val", "test")]).tocsr()
    _same_csr(stacked[np.argsort(rows)], X)


def test_split_is_seeded(big):
    _, path = big
    first = ds.load_svmlight_data(path, n_train=100, n_val=50, seed=1)
    again = ds.load_svmlight_data(path, n_train=100, n_val=50, seed=1)
    other = ds.load_svmlight_data(path, n_train=100, n_val=50, seed=2)
    assert set(first) == {"X_train", "y_train", "X_val", "y_val"}  # no test when n_test=0
    assert np.array_equal(first["y_train"], again["y_train"])
    _same_csr(first["X_val"], again["X_val"])
    assert not np.array_equal(first["y_train"], other["y_train"])


def test_sizes_larger_than_the_file(big):
    _, path = big
    with pytest.raises(ValueError, match=r"has 5000 rows; n_train \+ n_val \+ n_test = "
                                         r"4000 \+ 1000 \+ 1 = 5001"):
        ds.load_svmlight_data(path, n_train=4000, n_val=1000, n_test=1, seed=0)
    with pytest.raises(ValueError, match="split by n_train, n_val"):
        ds.load_svmlight_data(path, n_train=10, n_val=10)  # no seed


@pytest.mark.parametrize("suffix, pack", [(".bz2", bz2.compress), (".gz", gzip.compress)])
def test_compressed(tmp_path, big, suffix, pack):
    X, path = big
    packed = tmp_path / f"big.svm{suffix}"
    with open(path, "rb") as handle:
        packed.write_bytes(pack(handle.read()))
    out = ds.load_svmlight_data({"train": str(packed), "val": path})
    _same_csr(out["X_train"], X)


# --- stratification ----------------------------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return str(path)


def _labelled(tmp_path, labels, name="labels.svm"):
    lines = [f"{y:g} {1 + i % 7}:1.0" for i, y in enumerate(labels)]
    return _write(tmp_path / name, "\n".join(lines) + "\n")


@pytest.mark.parametrize("counts, sizes", [
    ((3000, 1500, 500), (3000, 1000, 500)),
    ((4500, 500), (2500, 1500, 999)),
    ((1201, 7, 2, 2790), (1000, 999, 2000)),
])
def test_stratified_within_one_row(tmp_path, counts, sizes):
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    path = _labelled(tmp_path, labels + 1)
    out = ds.load_svmlight_data(path, n_train=sizes[0], n_val=sizes[1], n_test=sizes[2],
                                seed=0, labels="multiclass")
    total = sum(counts)
    for split, size in zip(("train", "val", "test"), sizes):
        y = out[f"y_{split}"]
        assert y.dtype == np.int64 and len(y) == size
        got = np.bincount(y, minlength=len(counts))
        share = size * np.asarray(counts) / total
        assert np.all(np.abs(got - share) < 1), (split, got, share)
        # rows of a split are shuffled, not grouped by class
        assert len(counts) == 1 or np.count_nonzero(np.diff(y)) > len(counts)


def test_proportional_table_property():
    gen = np.random.default_rng(7)
    for _ in range(200):
        counts = gen.integers(1, 300, gen.integers(1, 40))
        cuts = np.sort(gen.integers(0, counts.sum() + 1, 3))
        sizes = np.diff(np.concatenate([[0], cuts, [counts.sum()]]))
        table = ds.proportional_table(counts, sizes)
        exact = counts[:, None] * sizes[None, :] / counts.sum()
        assert np.array_equal(table.sum(1), counts) and np.array_equal(table.sum(0), sizes)
        assert np.all(np.abs(table - exact) < 1) and table.min() >= 0


def test_a_singleton_class_falls_back_to_a_shuffle(tmp_path):
    path = _labelled(tmp_path, [1] * 30 + [2] * 29 + [3])
    out = ds.load_svmlight_data(path, n_train=40, n_val=20, seed=0, labels="multiclass")
    assert len(out["y_train"]) == 40 and len(out["y_val"]) == 20
    again = ds.load_svmlight_data(path, n_train=40, n_val=20, seed=0, labels="multiclass",
                                  stratify=False)
    assert np.array_equal(out["y_train"], again["y_train"])  # the same plain shuffle


# --- separate files, n_features ----------------------------------------------------------


def test_separate_files_share_the_widest_width(tmp_path):
    train = _write(tmp_path / "a.svm", "1 1:1 10:2\n-1 3:1\n")
    val = _write(tmp_path / "b.svm", "1 7:1\n")
    test = _write(tmp_path / "c.libsvm", "-1 2:4\n")
    out = ds.load_svmlight_data({"train": train, "val": val, "test": test}, labels="binary")
    assert [out[f"X_{s}"].shape for s in ("train", "val", "test")] == [(2, 10), (1, 10), (1, 10)]
    assert out["X_val"].toarray()[0, 6] == 1.0 and out["X_test"].toarray()[0, 1] == 4.0
    assert out["y_val"].tolist() == [1.0] and out["y_test"].tolist() == [-1.0]
    wide = ds.load_svmlight_data({"train": train, "val": val}, n_features=12)
    assert wide["X_train"].shape == (2, 12) and wide["X_val"].shape == (1, 12)
    with pytest.raises(ValueError) as err:
        ds.load_svmlight_data({"train": val, "val": train}, n_features=8)
    assert str(err.value) == f"{train}: line 1: index 10 exceeds n_features=8 (1-based)"
    with pytest.raises(ValueError, match="keyed train, val"):
        ds.load_svmlight_data({"train": train, "valid": val})


def test_zero_based_is_an_explicit_choice(tmp_path):
    path = _write(tmp_path / "z.svm", "1 0:1 2:3\n-1 1:1\n")
    with pytest.raises(ValueError, match=r"line 1: index 0 in '0:1' is below 1"):
        ds.load_svmlight_data({"train": path, "val": path})
    out = ds.load_svmlight_data({"train": path, "val": path}, zero_based=True)
    assert out["X_train"].toarray().tolist() == [[1, 0, 3], [0, 1, 0]]


# --- malformed files ---------------------------------------------------------------------

GOOD_HEAD = "# a comment line\n1 1:0.5 3:2\n\n-1 2:1 # trailing comment\n"  # lines 1-4
MALFORMED = [  # (id, line 5, what the message says after "line 5: ")
    ("bad_value", "1 1:0.5 3:abc", "bad token '3:abc' (value is not a number)"),
    ("bare_word", "1 1:0.5 x", "bad token 'x' (expected index:value)"),
    ("bare_number", "1 3", "bad token '3' (expected index:value)"),
    ("float_index", "1 1.5:2", "bad token '1.5:2' (index '1.5' is not an integer)"),
    ("negative_index", "1 -2:1", "index -2 in '-2:1' is below 1"),
    ("zero_index", "-1 0:1", "index 0 in '0:1' is below 1 (the file is read as 1-based)"),
    ("unsorted", "1 3:1 2:1", "index 2 follows 3 (indices must increase along a line)"),
    ("duplicate", "1 3:1 3:2", "index 3 follows 3"),
    ("bad_label", "abc 1:1", "label 'abc' is not a number"),
    ("multilabel", "1,2 1:1", "label '1,2' is not a number"),
    ("nan_value", "1 1:nan", "value in '1:nan' is not finite"),
    ("huge_index", "1 99999999999:1", "index 99999999999 is too large"),
]


@pytest.mark.parametrize("case, line, what", MALFORMED, ids=[c[0] for c in MALFORMED])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "bz2"])
def test_malformed_names_file_and_line(tmp_path, case, line, what, packed):
    text = GOOD_HEAD + line + "\n1 2:1\n"
    if packed:
        path = str(tmp_path / f"{case}.svm.bz2")
        with open(path, "wb") as handle:
            handle.write(bz2.compress(text.encode()))
    else:
        path = _write(tmp_path / f"{case}.svm", text)
    with pytest.raises(ValueError) as err:
        ds.load_svmlight_data(path, n_train=2, n_val=1, seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 5: {what}"), message


def test_bad_file_of_a_mapping_is_named(tmp_path):
    train = _write(tmp_path / "train.svm", "1 1:1\n-1 2:1\n")
    val = _write(tmp_path / "val.svm", "1 1:1\n1 2:x\n")
    with pytest.raises(ValueError) as err:
        ds.load_svmlight_data({"train": train, "val": val})
    assert str(err.value).startswith(f"{val}: line 2: bad token '2:x'")


def test_unreadable_and_empty_files(tmp_path):
    truncated = tmp_path / "cut.svm.bz2"
    truncated.write_bytes(bz2.compress(("1 1:1\n" * 5000).encode())[:-20])
    empty = _write(tmp_path / "empty.svm", "# nothing\n\n")
    for path, fragment in ((str(truncated), "cannot be read"), (empty, "holds no data rows"),
                           (str(tmp_path / "none.svm"), "no such file")):
        with pytest.raises(ValueError) as err:
            ds.load_svmlight_data({"train": path, "val": path})
        assert str(err.value).startswith(f"{path}: {fragment}") and "\n" not in str(err.value)


# --- labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ([0, 1, 1, 0], [-1, 1, 1, -1]), ([1, 2, 2, 1], [-1, 1, 1, -1]),
    ([-1, 1, 1, -1], [-1, 1, 1, -1]), ([0.5, 3, 3, 0.5], [-1, 1, 1, -1]),
])
def test_binary_labels(tmp_path, raw, expected):
    path = _labelled(tmp_path, raw)
    out = ds.load_svmlight_data({"train": path, "val": path}, labels="binary")
    assert out["y_train"].dtype == np.float64 and out["y_train"].tolist() == expected


def test_multiclass_and_any_labels(tmp_path):
    path = _labelled(tmp_path, [7, 1, 3, 3, 1])
    multi = ds.load_svmlight_data({"train": path, "val": path}, labels="multiclass")
    assert multi["y_train"].dtype == np.int64 and multi["y_train"].tolist() == [2, 0, 1, 1, 0]
    raw = ds.load_svmlight_data({"train": path, "val": path}, labels="any")
    assert raw["y_train"].tolist() == [7.0, 1.0, 3.0, 3.0, 1.0]
    # classes come from all files together
    train = _labelled(tmp_path, [1, 2, 1], "t.svm")
    val = _labelled(tmp_path, [3, 2], "v.svm")
    both = ds.load_svmlight_data({"train": train, "val": val}, labels="multiclass")
    assert both["y_train"].tolist() == [0, 1, 0] and both["y_val"].tolist() == [2, 1]


def test_wrong_label_sets(tmp_path):
    three = _write(tmp_path / "three.svm", "# c\n1 1:1\n-1 1:1\n\n1 2:1\n2 1:1\n")
    with pytest.raises(ValueError) as err:
        ds.load_svmlight_data({"train": three, "val": three}, labels="binary")
    assert str(err.value).startswith(f"{three}: line 6: label 2 is a third distinct label "
                                     "(binary labels need exactly 2")
    train = _labelled(tmp_path, [1, -1, 1], "t.svm")
    val = _write(tmp_path / "v.svm", "1 1:1\n0 1:1\n")
    with pytest.raises(ValueError, match=rf"^{val}: line 2: label 0 is a third"):
        ds.load_svmlight_data({"train": train, "val": val}, labels="binary")
    one = _labelled(tmp_path, [4, 4, 4], "one.svm")
    for mode, wanted in (("binary", "exactly 2"), ("multiclass", "at least 2")):
        with pytest.raises(ValueError, match=f"^{one}: {mode} labels need {wanted} distinct "
                                             "values; all 6 rows have label 4$"):
            ds.load_svmlight_data({"train": one, "val": one}, labels=mode)
    fraction = _write(tmp_path / "f.svm", "1 1:1\n2.5 1:1\n")
    with pytest.raises(ValueError, match=rf"^{fraction}: line 2: label 2.5 is not an integer"):
        ds.load_svmlight_data({"train": fraction, "val": fraction}, labels="multiclass")
    with pytest.raises(ValueError, match="labels must be one of binary, multiclass, any"):
        ds.load_svmlight_data({"train": one, "val": one}, labels="two")


# --- MNIST format ------------------------------------------------------------------------


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if code == 0x08 else ">f4").tobytes()


@pytest.fixture
def idx_files(tmp_path):
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (60, 28, 28)).astype(np.uint8)
    labels = np.repeat(np.arange(10), 6).astype(np.uint8)
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    return images, labels, folder


def test_idx_round_trip(idx_files):
    images, labels, folder = idx_files
    out = ds.load_mnist_data(str(folder), n_train=40, n_val=10, n_test=10, seed=0)
    X = np.concatenate([out[f"X_{s}"] for s in ("train", "val", "test")])
    y = np.concatenate([out[f"y_{s}"] for s in ("train", "val", "test")])
    assert X.dtype == np.float64 and y.dtype == np.int64 and X.shape == (60, 784)
    assert 0.0 <= X.min() and X.max() <= 1.0
    # the rows are the images /255, each with its own label
    flat = images.reshape(60, -1) / 255.0
    where = [int(np.flatnonzero((flat == row).all(1))[0]) for row in X]
    assert sorted(where) == list(range(60)) and np.array_equal(labels[where], y)
    assert np.array_equal(np.bincount(out["y_train"]), np.full(10, 4))  # stratified
    same = ds.load_mnist_data({"images": str(folder / "train-images-idx3-ubyte.gz"),
                               "labels": str(folder / "train-labels-idx1-ubyte")},
                              n_train=40, n_val=10, n_test=10, seed=0)
    assert np.array_equal(same["X_val"], out["X_val"])


def test_mnist_npz(tmp_path):
    gen = np.random.default_rng(1)
    X = gen.integers(0, 256, (50, 784)).astype(np.uint8)
    y = np.repeat(np.arange(5), 10)
    path = tmp_path / "m.npz"
    np.savez(path, X=X, y=y)
    out = ds.load_mnist_data(str(path), n_train=30, n_val=20, seed=0)
    assert out["X_train"].shape == (30, 784) and out["X_train"].max() <= 1.0
    np.savez(path, images=X, labels=y)
    with pytest.raises(ValueError, match=r"needs arrays X and y; it has images, labels"):
        ds.load_mnist_data(str(path), n_train=30, n_val=20, seed=0)
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=rf"^{path}: cannot be read as .npz"):
        ds.load_mnist_data(str(path), n_train=30, n_val=20, seed=0)


def test_idx_errors(tmp_path, idx_files):
    images, labels, folder = idx_files
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x08\x03" + _idx(images)[2:])
    short = tmp_path / "short"
    short.write_bytes(_idx(images)[:-5])
    few = tmp_path / "few"
    few.write_bytes(_idx(labels[:50]))
    cases = [
        ({"images": str(bad_magic), "labels": str(few)}, f"{bad_magic}: bad IDX magic number"),
        ({"images": str(short), "labels": str(few)},
         f"{short}: IDX header says shape (60, 28, 28) of uint8"),
        ({"images": str(folder / "train-images-idx3-ubyte.gz"), "labels": str(few)},
         "holds 60 images but"),
        ({"images": str(few), "labels": str(few)}, f"{few}: expected 3-D images (n, rows, "
                                                    "cols); the header says shape (50,)"),
        (str(tmp_path), f"{tmp_path}: no MNIST images file"),
    ]
    for spec, fragment in cases:
        with pytest.raises(ValueError) as err:
            ds.load_mnist_data(spec, n_train=5, n_val=5, seed=0)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


# --- load_user_data and the plan-time check ----------------------------------------------


def test_is_svmlight():
    for yes in ("a.svm", "a.libsvm", "A.SVMLIGHT", "news.txt.bz2", "x.svm.gz",
                {"train": "a.svm", "val": "b.txt"}):
        assert is_svmlight(yes), yes
    for no in ("a.npz", "a.parquet", "a.bz2", {"train": "a.svm", "val": "b.npz"}, {}, 3, None):
        assert not is_svmlight(no), no


def test_load_user_data_densifies_only_when_asked(tmp_path):
    path = _write(tmp_path / "s.svm", "1 1:1 3:2\n-1 2:1\n1 3:1\n-1 1:4\n")
    with pytest.raises(ValueError) as err:
        load_user_data(path)
    assert str(err.value).startswith(f"{path}: svmlight data are read sparse")
    dense = load_user_data(path, densify=True, n_train=2, n_val=2, seed=0, labels="binary")
    sparse = ds.load_svmlight_data(path, n_train=2, n_val=2, seed=0, labels="binary")
    for key in ("X_train", "X_val"):
        assert isinstance(dense[key], np.ndarray)
        assert np.array_equal(dense[key], sparse[key].toarray())
    npz = tmp_path / "d.npz"
    np.savez(npz, X_train=np.ones((2, 3)), y_train=np.ones(2), X_val=np.ones((1, 3)),
             y_val=np.ones(1))
    assert load_user_data(str(npz), densify=True, n_train=5)["X_train"].shape == (2, 3)


def test_densify_is_bounded(tmp_path, monkeypatch):
    path = _write(tmp_path / "s.svm", "1 1:1 300:2\n-1 2:1\n")
    monkeypatch.setattr(data_module, "DENSE_LIMIT_BYTES", 4000)
    with pytest.raises(ValueError, match=r"densifying 1200 float64 entries .* exceeds"):
        load_user_data({"train": path, "val": path}, densify=True)


HPO = dict(study="data-check", pipeline="hpo", backend="jax", algorithms=["itd"], t=[5],
           seeds=1, output="out", mlflow={"tracking_uri": "sqlite:///mlflow.db"})


def _plan(problem: dict):
    from hypersweep.orchestrator.spec import parse_study

    return parse_study(yaml.safe_dump({**HPO, "problems": [problem]}, sort_keys=False))


def _reads_svmlight(seed, *, data, n_train, n_val, n_test, **_):
    """A problem build that reads svmlight data sparse, as the sparse problems will."""
    return ds.load_svmlight_data(data, n_train=n_train, n_val=n_val, n_test=n_test,
                                 seed=seed, labels="binary")


def test_plan_names_the_file_and_the_line(tmp_path, monkeypatch):
    from hypersweep.orchestrator.spec import StudyError
    from hypersweep.problems import logreg

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logreg, "build", _reads_svmlight)
    _write(tmp_path / "bad.svm", "1 1:1\n-1 2:1\n1 3:abc\n")
    sizes = {"n_train": 1, "n_val": 1, "n_test": 0}
    with pytest.raises(StudyError) as err:
        _plan({"name": "logreg", "params": {"data": "bad.svm", **sizes}})
    assert str(err.value) == ("problems[0].params.data: problem 'logreg' cannot use data file "
                              "'bad.svm': line 3: bad token '3:abc' (value is not a number)")
    _write(tmp_path / "ok.svm", "1 1:1\n-1 2:1\n")
    _write(tmp_path / "wide.svm", "1 1:1\n-1 9:1\n1 2:1\n")
    _plan({"name": "logreg", "params": {"data": {"train": "ok.svm", "val": "ok.svm"}}})
    with pytest.raises(StudyError) as err:
        _plan({"name": "logreg", "params": {"data": {"train": "ok.svm", "val": "three.svm"}}})
    assert "data file 'three.svm' (val) of problem 'logreg' does not exist" in str(err.value)
    _write(tmp_path / "three.svm", "1 1:1\n-1 2:1\n2 1:1\n")
    with pytest.raises(StudyError) as err:
        _plan({"name": "logreg", "params": {"data": {"train": "ok.svm", "val": "three.svm"}}})
    assert str(err.value) == (
        "problems[0].params.data: problem 'logreg' cannot use data files train='ok.svm', "
        "val='three.svm': three.svm: line 3: label 2 is a third distinct label (binary "
        "labels need exactly 2; the files have 3: -1, 1, 2); before it: -1, 1")


def test_plan_refuses_svmlight_for_a_dense_problem(tmp_path, monkeypatch):
    from hypersweep.orchestrator.spec import StudyError

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "x.svm", "1 1:1\n")
    with pytest.raises(StudyError) as err:
        _plan({"name": "ridge", "params": {"data": "x.svm"}})
    assert str(err.value).startswith("problems[0].params.data: problem 'ridge' cannot use "
                                     "data file 'x.svm': svmlight data are read sparse, and "
                                     "this problem reads dense arrays only")
    with pytest.raises(StudyError) as err:
        _plan({"name": "ridge", "params": {"data": {"train": "x.svm", "val": "x.svm"}}})
    assert str(err.value).startswith("problems[0].params.data: problem 'ridge' cannot use "
                                     "data files train='x.svm', val='x.svm': svmlight data "
                                     "are read sparse")


# --- generators --------------------------------------------------------------------------


def test_news20_shaped_at_full_size_without_a_dense_array():
    tracemalloc.start()
    start = time.perf_counter()
    out = ds.news20_shaped(0)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    X = out["X_train"]
    assert X.shape == (11314, 130107) and out["X_val"].shape == (3766, 130107)
    assert out["X_test"].shape == (3766, 130107)
    _canonical(X)
    assert abs(X.nnz / (X.shape[0] * X.shape[1]) - 0.001) < 0.0001
    dense_bytes = 11314 * 130107 * 8  # 11.8 GB
    assert peak < dense_bytes / 50, peak  # measured ~0.1 GB
    assert seconds < 30, seconds  # ~2 s on a quiet machine (tracemalloc on)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
    assert np.allclose(norms, 1.0, rtol=0, atol=1e-12)
    # power-law document frequencies: a few columns in most documents, most in few
    df = np.sort(np.bincount(X.indices, minlength=X.shape[1]))[::-1]
    assert df[0] > 0.5 * X.shape[0] and df[1000] < 0.05 * X.shape[0] and df[20000] < 10
    lengths = np.diff(X.indptr)
    assert np.quantile(lengths, 0.95) > 5 * np.quantile(lengths, 0.05)
    assert set(np.unique(out["y_train"])) == {-1.0, 1.0}


def test_news20_shaped_small_learnable_and_seeded():
    kw = dict(n=1500, d=20000, density=0.005, n_val=1000, n_test=0)
    out = ds.news20_shaped(1, **kw)
    assert set(out) == {"X_train", "y_train", "X_val", "y_val"}
    again = ds.news20_shaped(1, **kw)
    _same_csr(out["X_train"], again["X_train"])
    assert np.array_equal(out["y_val"], again["y_val"])
    other = ds.news20_shaped(2, **kw)
    assert other["X_train"].nnz != out["X_train"].nnz or \
        not np.array_equal(other["X_train"].indices, out["X_train"].indices)
    model = LogisticRegression(C=10.0, max_iter=1000).fit(out["X_train"], out["y_train"])
    assert model.score(out["X_val"], out["y_val"]) > 0.75  # chance 0.5; measured 0.89


def test_ijcnn1_shaped():
    out = ds.ijcnn1_shaped(0, n=8000, n_val=4000, n_test=100)
    X, y = out["X_train"], out["y_train"]
    assert X.shape == (8000, 22) and out["X_test"].shape == (100, 22)
    assert np.array_equal(X[:, :10].sum(1), np.ones(8000))  # the one-hot block
    assert np.abs(X).max() < 1.0 + 1e-12 and set(np.unique(y)) == {-1.0, 1.0}
    assert 0.07 < np.mean(y == 1) < 0.13
    model = LogisticRegression(max_iter=1000).fit(X, y)
    from sklearn.metrics import balanced_accuracy_score

    balanced = balanced_accuracy_score(out["y_val"], model.predict(out["X_val"]))
    assert balanced > 0.7  # chance 0.5; measured 0.81
    again = ds.ijcnn1_shaped(0, n=8000, n_val=4000, n_test=100)
    assert np.array_equal(again["X_test"], out["X_test"])
    assert not np.array_equal(ds.ijcnn1_shaped(1, n=8000, n_val=4000, n_test=100)["y_train"], y)


def test_covtype_shaped():
    out = ds.covtype_shaped(0, n=12000, n_val=4000, n_test=0)
    X, y = out["X_train"], out["y_train"]
    assert X.shape == (12000, 54) and y.dtype == np.int64 and set(np.unique(y)) == set(range(7))
    assert X[:, :10].min() >= 0 and X[:, :10].max() <= 1
    assert np.array_equal(X[:, 10:14].sum(1), np.ones(12000))
    assert np.array_equal(X[:, 14:].sum(1), np.ones(12000))
    assert abs(np.mean(y == 1) - 283301 / 581012) < 0.02
    model = LogisticRegression(max_iter=2000).fit(X, y)
    majority = np.mean(out["y_val"] == 1)
    assert model.score(out["X_val"], out["y_val"]) > majority + 0.15  # measured +0.26
    assert np.array_equal(ds.covtype_shaped(0, n=12000, n_val=4000, n_test=0)["X_val"],
                          out["X_val"])


def test_mnist_shaped():
    out = ds.mnist_shaped(0, n=3000, n_val=1000, n_test=10)
    X, y = out["X_train"], out["y_train"]
    assert X.shape == (3000, 784) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert X.min() == 0.0 and X.max() <= 1.0 and 0.1 < np.mean(X > 0) < 0.35
    model = LogisticRegression(max_iter=500).fit(X, y)
    assert model.score(out["X_val"], out["y_val"]) > 0.6  # chance 0.1; measured ~0.85
    assert np.array_equal(ds.mnist_shaped(0, n=3000, n_val=1000, n_test=10)["X_test"],
                          out["X_test"])


@pytest.mark.parametrize("make, kw, fragment", [
    (ds.news20_shaped, dict(n=0), "n must be an integer >= 1"),
    (ds.news20_shaped, dict(density=0.0), "density must be in (0, 0.5]"),
    (ds.news20_shaped, dict(d=4100, topic_words=1005), "2 * topic_words must be <= d // 2 - "
                                                      "d // 100 = 2009"),
    (ds.ijcnn1_shaped, dict(positive=1.5), "positive must be in (0, 1)"),
    (ds.covtype_shaped, dict(n_test=-1), "n_test must be an integer >= 0"),
    (ds.mnist_shaped, dict(side=4), "side must be an integer >= 8"),
])
def test_generator_arguments(make, kw, fragment):
    with pytest.raises(ValueError) as err:
        make(0, **kw)
    assert fragment in str(err.value)


def test_module_is_numpy_scipy_sklearn_only():
    import subprocess
    import sys

    code = ("import sys, hypersweep.problems.datasets as d; "
            "print(sorted(m for m in ('torch', 'jax', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"  # sklearn is imported when a file is read, not before


def test_the_scan_reads_what_sklearn_reads(tmp_path):
    # comments, blank lines, CRLF line ends and a leading qid token are all fine
    path = tmp_path / "crlf.svm"
    path.write_bytes(b"# c\r\n1 qid:4 1:1 2:2\r\n\r\n-1 3:1 # x\r\n")
    assert ds.first_bad_line(str(path)) is None
    out = ds.load_svmlight_data({"train": str(path), "val": str(path)}, labels="binary")
    assert out["X_train"].toarray().tolist() == [[1, 2, 0], [0, 0, 1]]


def test_data_cleaning_runs_on_the_mnist_shaped_generator():
    """The stocBiO hyper-cleaning shape, small: 784 pixels + bias, 10 classes, corrupted
    training labels only; the oracle is a stationary point of the inner problem."""
    from hypersweep import problems
    from hypersweep.problems import numpy_ops

    p = problems.make("data_cleaning", backend="jax", dtype="float64", seed=0,
                      dataset="mnist_shaped", n_train=40, n_val=30, n_test=30, reg=0.5,
                      corruption=0.25)
    assert p.w_shape == (785, 10) and p.lam_shape == (40,)
    assert p.built.info["corrupted"].sum() == 10
    lam = p.initial_hyperparams()
    w = p.exact_inner_solution(lam)
    grad = p.module.inner_grad(w, lam, p.arrays_np, p.static, numpy_ops)
    assert np.linalg.norm(grad) < 1e-10
