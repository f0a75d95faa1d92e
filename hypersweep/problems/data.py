"""Data for problems: synthetic generators, sklearn's bundled sets, user files. numpy only."""
from __future__ import annotations

import os

import numpy as np

from hypersweep.seeding import seed_from_text

REQUIRED = ("X_train", "y_train", "X_val", "y_val")
OPTIONAL = ("X_test", "y_test")


def rng(seed: int, *salt: str) -> np.random.Generator:
    """A numpy generator from (seed, salt) via a stable hash (never Python's ``hash``).

    The message is ``repr((seed, *salt))``, not canonical JSON: every problem's data, and
    so ``benchmarks/baseline.parquet``, depends on it (see :mod:`hypersweep.seeding`)."""
    return np.random.default_rng(seed_from_text(repr((int(seed),) + salt), bits=64))


def load_user_data(path: str) -> dict[str, np.ndarray]:
    """Read ``X_train, y_train, X_val, y_val[, X_test, y_test]`` from ``.npz`` or ``.parquet``.

    Parquet: one row per example, with a ``split`` column (train/val/test), a ``y``
    column and feature columns (every other column). Raises ``ValueError`` on a malformed
    file, naming the missing array or the mismatched shapes.
    """
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
        raise ValueError(f"data file {path!r}: unsupported format. Valid choices: .npz, .parquet")
    return validate_arrays(arrays, source=path)


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
