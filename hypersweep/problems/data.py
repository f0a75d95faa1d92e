"""Data for problems: synthetic generators, sklearn's bundled sets, user files. numpy only
(svmlight files and the generators at real scale: :mod:`hypersweep.problems.datasets`)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from hypersweep.seeding import seed_from_text

REQUIRED = ("X_train", "y_train", "X_val", "y_val")
OPTIONAL = ("X_test", "y_test")


def rng(seed: int, *salt: str) -> np.random.Generator:
    """A numpy generator from (seed, salt) via a stable hash (never Python's ``hash``).

    The message is ``repr((seed, *salt))``, not canonical JSON: every problem's data, and
    so ``benchmarks/baseline.parquet``, depends on it (see :mod:`hypersweep.seeding`)."""
    return np.random.default_rng(seed_from_text(repr((int(seed),) + salt), bits=64))


#: svmlight/libsvm text files (each may end in .bz2 or .gz as well)
SVMLIGHT_SUFFIXES = (".svm", ".libsvm", ".svmlight", ".txt")
COMPRESSED_SUFFIXES = (".bz2", ".gz")
#: densifying svmlight data beyond this many bytes (all splits) is refused
DENSE_LIMIT_BYTES = 1 << 30


def is_svmlight(spec) -> bool:
    """Whether ``spec`` names svmlight data: a path ending in .svm, .libsvm, .svmlight or
    .txt (optionally .bz2/.gz), or a mapping from split names to such paths."""
    if isinstance(spec, Mapping):
        return bool(spec) and all(is_svmlight(p) for p in spec.values())
    if not isinstance(spec, (str, os.PathLike)):
        return False
    name = os.fspath(spec).lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(SVMLIGHT_SUFFIXES)


def load_user_data(path, *, densify: bool = False, **svmlight) -> dict[str, np.ndarray]:
    """Read ``X_train, y_train, X_val, y_val[, X_test, y_test]`` from ``.npz`` or ``.parquet``,
    or, when the caller asks with ``densify=True``, from svmlight data (:func:`is_svmlight`).

    Parquet: one row per example, with a ``split`` column (train/val/test), a ``y``
    column and feature columns (every other column). Raises ``ValueError`` on a malformed
    file, naming the missing array or the mismatched shapes.

    svmlight: ``svmlight`` are the keywords of
    :func:`hypersweep.problems.datasets.load_svmlight_data` (n_train, n_val, n_test, seed,
    labels, ...); the CSR splits are densified (refused above ``DENSE_LIMIT_BYTES``).
    Without ``densify=True`` an svmlight spec is refused in one line: sparse data are never
    densified behind a problem's back; problems that keep them sparse call
    ``load_svmlight_data`` themselves. The keywords are ignored for .npz and .parquet.
    """
    if is_svmlight(path):
        return _densified_svmlight(path, densify=densify, **svmlight)
    if isinstance(path, Mapping):
        raise ValueError(f"data {path!r}: a mapping must name svmlight files (.svm, .libsvm, "
                         ".svmlight, .txt, optionally .bz2/.gz) for train, val[, test]")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pandas()
        for col in ("split", "y"):
            if col not in table.columns:
                raise ValueError(f"data file {path!r}: missing column {col!r} "
                                 f"(needs 'split', 'y' and feature columns)")
        feats = [c for c in table.columns if c not in ("split", "y")]
        arrays = {}
        for split in ("train", "val", "test"):
            part = table[table["split"] == split]
            if len(part):
                arrays[f"X_{split}"] = part[feats].to_numpy(np.float64)
                arrays[f"y_{split}"] = part["y"].to_numpy()
    else:
        raise ValueError(f"data file {path!r}: unsupported format. Valid choices: .npz, "
                         f".parquet, {', '.join(SVMLIGHT_SUFFIXES)} (svmlight, for the "
                         "problems that read it)")
    return validate_arrays(arrays, source=path)


def _densified_svmlight(spec, *, densify: bool, **options) -> dict[str, np.ndarray]:
    source = os.fspath(spec) if not isinstance(spec, Mapping) else \
        ", ".join(f"{k}={os.fspath(v)}" for k, v in spec.items())
    if not densify:
        raise ValueError(f"{source}: svmlight data are read sparse, and this problem reads "
                         "dense arrays only (see docs/data.md for the problems that read "
                         "svmlight files)")
    from hypersweep.problems.datasets import load_svmlight_data

    arrays = load_svmlight_data(spec, **options)
    cells = sum(arrays[k].shape[0] * arrays[k].shape[1] for k in arrays if k[0] == "X")
    if 8 * cells > DENSE_LIMIT_BYTES:
        raise ValueError(f"{source}: densifying {cells} float64 entries "
                         f"({8 * cells / 2**30:.1f} GiB) exceeds the "
                         f"{DENSE_LIMIT_BYTES / 2**30:g} GiB limit; use a problem that keeps "
                         "svmlight data sparse")
    return validate_arrays({k: (v.toarray() if k[0] == "X" else v) for k, v in arrays.items()},
                           source=source)


def validate_arrays(arrays: dict, *, source: str = "data") -> dict[str, np.ndarray]:
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{source}: missing array(s) {', '.join(missing)}; "
                         f"required: {', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{source}: X_test and y_test must be given together")
    out = {}
    n_features = None
    for split in ("train", "val", "test"):
        if f"X_{split}" not in arrays:
            continue
        X = np.asarray(arrays[f"X_{split}"], dtype=np.float64)
        y = np.asarray(arrays[f"y_{split}"])
        if X.ndim != 2:
            raise ValueError(f"{source}: X_{split} must be 2-D (n, d); got shape {X.shape}")
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"{source}: y_{split} must have shape ({X.shape[0]},) to match "
                             f"X_{split} {X.shape}; got {y.shape}")
        if n_features is None:
            n_features = X.shape[1]
        elif X.shape[1] != n_features:
            raise ValueError(f"{source}: X_{split} has {X.shape[1]} features, X_train has "
                             f"{n_features}")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{source}: X_{split} contains NaN or inf")
        out[f"X_{split}"], out[f"y_{split}"] = X, y
    return out


def split_arrays(X: np.ndarray, y: np.ndarray, n_train: int, n_val: int, n_test: int,
                 gen: np.random.Generator, *, source: str) -> dict[str, np.ndarray]:
    """Shuffle (X, y) with ``gen`` and cut train/val/test of the asked sizes."""
    need = n_train + n_val + n_test
    if need > len(X):
        raise ValueError(f"{source} has {len(X)} examples; n_train + n_val + n_test = {need}")
    perm = gen.permutation(len(X))
    X, y = X[perm], y[perm]
    out = {"X_train": X[:n_train], "y_train": y[:n_train],
           "X_val": X[n_train:n_train + n_val], "y_val": y[n_train:n_train + n_val]}
    if n_test:
        out["X_test"] = X[n_train + n_val:need]
        out["y_test"] = y[n_train + n_val:need]
    return out


def standardize(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scale features by the training mean and std (columns with zero std left at 0)."""
    mu = arrays["X_train"].mean(0)
    sd = arrays["X_train"].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    out = dict(arrays)
    for k in ("X_train", "X_val", "X_test"):
        if k in out:
            out[k] = (out[k] - mu) / sd
    return out
