"""Real data sets at real scale: svmlight/libsvm and MNIST-format loaders, and offline
generators at the published shapes (20 Newsgroups, ijcnn1, covtype, MNIST).

numpy, scipy and scikit-learn only; nothing happens at import. Every function returns the
dict every problem reads, ``X_train, y_train, X_val, y_val[, X_test, y_test]``; sparse
inputs stay scipy CSR (float64, sorted indices, no duplicates) and are never densified
here. See ``docs/data.md`` for the formats, the splits and the labels.

svmlight files are parsed by :func:`sklearn.datasets.load_svmlight_file`, always as
**1-based** (libsvm's convention; ``zero_based=True`` for files that start at 0). Never
``"auto"``: it shifts a 0-based file whose column 0 happens to be empty by one column,
and it decides differently for two files of one data set. sklearn's errors name neither
the file nor the line, so when it (or a check after it) fails, the file is scanned once
more in Python, streaming, to name the first bad line; a good file is read once, by sklearn
alone (the scan costs 2-3× sklearn's parse, see ``docs/data.md``).
"""
from __future__ import annotations

import bz2
import gzip
import os
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np
import scipy.sparse as sp

from hypersweep.problems.data import is_svmlight, rng

LABEL_MODES = ("binary", "multiclass", "any")
SPLITS = ("train", "val", "test")
#: shown in place of long tokens in an error message
_TOKEN_CHARS = 40
#: sklearn's parser holds an index in a C int
_MAX_INDEX = 2**31 - 1


# --- svmlight ----------------------------------------------------------------------------


def load_svmlight_data(spec, *, n_train=None, n_val=None, n_test=0, seed=None,
                       stratify=True, labels="any", n_features=None,
                       zero_based=False) -> dict:
    """Read svmlight/libsvm data into CSR splits.

    ``spec``: one path (``.svm``, ``.libsvm``, ``.svmlight``, ``.txt``, each optionally
    ``.bz2`` or ``.gz``), cut into ``n_train``/``n_val``/``n_test`` rows by a permutation
    from ``rng(seed, "svmlight", "split")``, stratified by label when ``stratify`` and every
    label has ≥ 2 rows (each split then holds each class within one row of its share), or a
    mapping ``{"train": p, "val": p[, "test": p]}`` of files used as given (the sizes and
    seed are then ignored). Every split gets the same columns: ``n_features`` if given (a
    larger index is an error naming its line), else the largest index over the files.

    ``labels``: ``"binary"``, exactly two distinct values over all files, the smaller → −1.0,
    the larger → +1.0; ``"multiclass"``, integer labels mapped in sorted order to 0..C−1
    (int64, C ≥ 2); ``"any"``, float64 as written.

    Raises ``ValueError`` in one line naming the file, and the line where one is at fault:
    a bad token, a non-integer, zero (1-based) or unsorted index, a value or label that is
    not a finite number, a label set of the wrong size, sizes the file cannot hold.
    Cost: one sklearn parse of each file (a Python scan more on error), O(nnz) memory.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}. Got: {labels!r}")
    if n_features is not None:
        n_features = _positive_int("n_features", n_features)
    if not isinstance(spec, (str, os.PathLike, Mapping)) or not is_svmlight(spec):
        raise ValueError(f"{spec!r} is not an svmlight spec: a path ending in .svm, .libsvm, "
                         ".svmlight or .txt (optionally .bz2 or .gz), or a mapping "
                         "{train: path, val: path[, test: path]} of such paths")
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SPLITS))
        if unknown or not {"train", "val"} <= set(spec):
            raise ValueError(f"svmlight files must be keyed train, val[, test]; got "
                             f"{', '.join(map(str, spec))}")
        paths = {split: os.fspath(spec[split]) for split in SPLITS if split in spec}
    else:
        paths = {"train": os.fspath(spec)}
        if n_train is None or n_val is None or seed is None:
            raise ValueError(f"{paths['train']}: one svmlight file is split by n_train, n_val "
                             "(n_test) and seed; pass all of them")
        n_train = _positive_int("n_train", n_train)
        n_val = _positive_int("n_val", n_val)
        n_test = _positive_int("n_test", n_test, minimum=0)
    parsed = {split: _parse_svmlight(path, zero_based=zero_based, n_features=n_features)
              for split, path in paths.items()}
    width = n_features or max(X.shape[1] for X, _ in parsed.values())
    ys = _map_labels([(paths[s], y) for s, (_, y) in parsed.items()], labels)
    arrays = {}
    for (split, (X, _)), y in zip(parsed.items(), ys):
        arrays[f"X_{split}"] = sp.csr_matrix((X.data, X.indices, X.indptr),
                                             shape=(X.shape[0], width))
        arrays[f"y_{split}"] = y
    if isinstance(spec, Mapping):
        return arrays
    return split_rows(arrays["X_train"], arrays["y_train"], n_train=n_train, n_val=n_val,
                      n_test=n_test, gen=rng(seed, "svmlight", "split"),
                      stratify=stratify, source=paths["train"])


def _parse_svmlight(path: str, *, zero_based: bool, n_features: int | None):
    """(X, y) of one file, CSR float64 with sorted, unique indices and no stored zeros."""
    from sklearn.datasets import load_svmlight_file

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        X, y = load_svmlight_file(path, dtype=np.float64, zero_based=bool(zero_based))
    except (ValueError, OverflowError, TypeError) as exc:
        raise ValueError(_located(path, zero_based, n_features, fallback=str(exc))) from None
    except (OSError, EOFError) as exc:  # a truncated or corrupt .bz2/.gz
        raise ValueError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if X.shape[0] == 0:
        raise ValueError(f"{path}: holds no data rows")
    too_wide = n_features is not None and X.shape[1] > n_features
    if too_wide or not (np.all(np.isfinite(X.data)) and np.all(np.isfinite(y))):
        fallback = (f"an index exceeds n_features={n_features}" if too_wide
                    else "a value or label is not finite")
        raise ValueError(_located(path, zero_based, n_features, fallback=fallback))
    X = sp.csr_matrix(X)
    X.sum_duplicates()  # sklearn refuses duplicates already; this also sorts the indices
    X.eliminate_zeros()
    return X, np.asarray(y, dtype=np.float64)


def _located(path, zero_based, n_features, *, fallback: str) -> str:
    """``"path: line N: what"`` for the first bad line, or ``"path: fallback"``."""
    try:
        found = first_bad_line(path, zero_based=zero_based, n_features=n_features)
    except (OSError, EOFError) as exc:
        return f"{path}: cannot be read ({_one_line(exc)})"
    if found is None:
        return f"{path}: {_one_line(fallback)} (sklearn's parser; no line located)"
    line, what = found
    return f"{path}: line {line}: {what}"


def first_bad_line(path: str, *, zero_based=False, n_features=None) -> tuple[int, str] | None:
    """The first line of an svmlight file that sklearn would refuse or that the checks after
    it refuse, as ``(line number, what is wrong)``, or None.

    Streams the file (bz2/gz by their suffix), one physical line at a time; the numbers
    count every line, comments and blank ones included, from 1. Cost: O(file) time, one
    line of memory; 2-3× sklearn's own parse, so it runs only after a failure.
    """
    low = 0 if zero_based else 1
    for number, tokens in _data_lines(path):
        label = _token(tokens[0])
        value = _float(tokens[0])
        if value is None:
            return number, f"label {label!r} is not a number"
        if not np.isfinite(value):
            return number, f"label {label!r} is not finite"
        features = tokens[1:]
        if features and features[0].startswith(b"qid:"):
            features = features[1:]  # sklearn skips it unread (query_id=False)
        previous = None
        for raw in features:
            index_text, colon, value_text = raw.partition(b":")
            if not colon:
                return number, f"bad token {_token(raw)!r} (expected index:value)"
            index = _int(index_text)
            if index is None:
                return number, (f"bad token {_token(raw)!r} (index "
                                f"{_token(index_text)!r} is not an integer)")
            if index > _MAX_INDEX:
                return number, f"index {index} is too large (sklearn's limit: {_MAX_INDEX})"
            if index < low:
                return number, (f"index {index} in {_token(raw)!r} is below {low} (the file is "
                                f"read as {'0' if zero_based else '1'}-based)")
            if previous is not None and index <= previous:
                return number, (f"index {index} follows {previous} (indices must increase "
                                "along a line)")
            previous = index
            value = _float(value_text)
            if value is None:
                return number, f"bad token {_token(raw)!r} (value is not a number)"
            if not np.isfinite(value):
                return number, f"value in {_token(raw)!r} is not finite"
            if n_features is not None and index - low >= n_features:
                return number, (f"index {index} exceeds n_features={n_features} "
                                f"({'0' if zero_based else '1'}-based)")
    return None


def _data_lines(path: str) -> Iterator[tuple[int, list[bytes]]]:
    """(line number, whitespace-split tokens) of each line holding data, as sklearn reads
    them: a ``#`` starts a comment, blank lines hold no row."""
    with _open_binary(path) as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split(b"#", 1)[0].split()
            if tokens:
                yield number, tokens


def _line_of_row(path: str, row: int) -> int:
    for seen, (number, _) in enumerate(_data_lines(path)):
        if seen == row:
            return number
    raise IndexError(f"{path} has no row {row}")  # pragma: no cover - rows come from the file


def _open_binary(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _map_labels(files: list[tuple[str, np.ndarray]], mode: str) -> list[np.ndarray]:
    """Each file's labels mapped by ``mode`` from the classes of all files together; on a
    wrong label set, the line where the offending label first appears."""
    if mode == "any":
        return [y for _, y in files]
    if mode == "multiclass":
        for path, y in files:
            bad = np.flatnonzero(y != np.round(y))
            if bad.size:
                raise ValueError(f"{path}: line {_line_of_row(path, int(bad[0]))}: label "
                                 f"{y[bad[0]]:g} is not an integer (multiclass labels are "
                                 "class numbers)")
    classes = np.unique(np.concatenate([y for _, y in files]))
    names = ", ".join(dict.fromkeys(path for path, _ in files))
    if len(classes) < 2:
        wanted = "exactly 2" if mode == "binary" else "at least 2"
        rows = sum(len(y) for _, y in files)
        raise ValueError(f"{names}: {mode} labels need {wanted} distinct values; all {rows} "
                         f"rows have label {classes[0]:g}")
    if mode == "binary" and len(classes) > 2:
        path, row, label, seen = _third_label(files)
        raise ValueError(f"{path}: line {_line_of_row(path, row)}: label {label:g} is a "
                         f"third distinct label (binary labels need exactly 2; "
                         f"{'the files have' if ', ' in names else 'the file has'} "
                         f"{len(classes)}: {_short_list(classes)}); before it: "
                         f"{_short_list(seen)}")
    if mode == "binary":
        return [np.where(y == classes[1], 1.0, -1.0) for _, y in files]
    return [np.searchsorted(classes, y).astype(np.int64) for _, y in files]


def _third_label(files):
    """(path, row, label, the two labels before it) where a third distinct label first
    appears, reading the files in order."""
    seen: list[float] = []
    for path, y in files:
        values, first = np.unique(y, return_index=True)
        for row in np.sort(first[~np.isin(values, seen)]):
            if len(seen) == 2:
                return path, int(row), float(y[row]), sorted(seen)
            seen.append(float(y[row]))
    raise AssertionError("fewer than 3 labels")  # pragma: no cover - the caller counted


def _short_list(values) -> str:
    text = ", ".join(f"{v:g}" for v in values[:5])
    return text + (", ..." if len(values) > 5 else "")


def _token(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= _TOKEN_CHARS else text[:_TOKEN_CHARS] + "..."


def _float(raw: bytes):
    try:
        return float(raw)
    except ValueError:
        return None


def _int(raw: bytes):
    try:
        return int(raw)
    except ValueError:
        return None


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


# --- splits ------------------------------------------------------------------------------


def split_rows(X, y, *, n_train: int, n_val: int, n_test: int, gen: np.random.Generator,
               stratify: bool = True, source: str) -> dict:
    """Cut (X, y) into train/val[/test] rows of the asked sizes, each split's rows in
    random order; ``X`` is a dense array or CSR matrix (kept as it is).

    Stratified when ``stratify`` and every label has ≥ 2 rows: the count of each class in
    each split is within one row of its proportional share (an exact rounding of the
    table counts × sizes / n; the unused rows form one more column of it). Otherwise one
    permutation of all rows, cut in order.
    """
    rows = X.shape[0]
    need = n_train + n_val + n_test
    if need > rows:
        raise ValueError(f"{source} has {rows} rows; n_train + n_val + n_test = {n_train} + "
                         f"{n_val} + {n_test} = {need}")
    sizes = [n_train, n_val, n_test, rows - need]
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    if stratify and counts.min() >= 2:
        table = proportional_table(counts, sizes)
        by_class = gen.permutation(rows)
        by_class = by_class[np.argsort(inverse[by_class], kind="stable")]
        # within each class block: table[c, 0] train rows, then val, test, unused
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        position = np.arange(rows) - np.repeat(starts, counts)
        bounds = np.cumsum(table, axis=1)
        which = (position[:, None] >= np.repeat(bounds, counts, axis=0)).sum(axis=1)
        parts = [gen.permutation(by_class[which == j]) for j in range(3)]
    else:
        order = gen.permutation(rows)
        parts = [order[:n_train], order[n_train:n_train + n_val],
                 order[n_train + n_val:need]]
    out = {}
    for split, idx in zip(SPLITS, parts):
        if split == "test" and n_test == 0:
            continue
        out[f"X_{split}"] = X[idx]
        out[f"y_{split}"] = y[idx]
    return out


def proportional_table(counts, sizes) -> np.ndarray:
    """Integers a[c, j] with row sums ``counts``, column sums ``sizes`` (Σ equal), each
    ``a[c, j]`` the floor or the ceiling of counts[c]·sizes[j]/Σ.

    Such a rounding always exists (the real table is a fractional point of the
    transportation polytope, whose vertices are integral): floors first, then the missing
    units by a maximum flow through the cells with a fractional part.
    """
    from scipy.sparse.csgraph import maximum_flow

    counts = np.asarray(counts, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = counts.sum()
    if sizes.sum() != total:
        raise ValueError(f"sizes sum to {sizes.sum()}, counts to {total}")
    exact = counts[:, None] * sizes[None, :]
    table = exact // total
    row_short = counts - table.sum(1)
    col_short = sizes - table.sum(0)
    if not row_short.any():
        return table
    n_rows, n_cols = table.shape
    # nodes: 0 source, 1..C classes, C+1..C+K splits, C+K+1 sink
    sink = n_rows + n_cols + 1
    cls, col = np.nonzero(exact % total)
    tails = np.concatenate([np.zeros(n_rows, np.int64), 1 + cls,
                            1 + n_rows + np.arange(n_cols)])
    heads = np.concatenate([1 + np.arange(n_rows), 1 + n_rows + col,
                            np.full(n_cols, sink)])
    caps = np.concatenate([row_short, np.ones(len(cls), np.int64), col_short])
    graph = sp.csr_matrix((caps.astype(np.int32), (tails, heads)), shape=(sink + 1,) * 2)
    result = maximum_flow(graph, 0, sink)
    flow = result.flow
    if int(result.flow_value) != int(row_short.sum()):
        raise AssertionError("no rounding flow")  # pragma: no cover - see the docstring
    extra = np.asarray(flow[1:n_rows + 1, n_rows + 1:sink].todense())
    return table + np.maximum(extra, 0)


# --- MNIST format ------------------------------------------------------------------------

# IDX type codes (the third byte of the magic number) and their big-endian dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAMES = {"images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
              "labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")}


def load_mnist_data(spec, *, n_train, n_val, n_test=0, seed, stratify=True) -> dict:
    """Read MNIST-format data and split it like :func:`load_svmlight_data`.

    ``spec``: ``{"images": p, "labels": p}`` (IDX files, optionally ``.gz``); a directory
    holding ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (or the ``.idx3``
    spellings, optionally ``.gz``; ``t10k`` files there are not read); or an ``.npz`` with
    ``X`` (n, h·w) or (n, h, w) and ``y`` (n,). Returns dense float64 X scaled to [0, 1]
    (integer pixels, or floats above 1, are divided by 255) and int64 labels as written.
    All splits come from the one pool, by ``rng(seed, "mnist", "split")``, stratified as
    in :func:`split_rows`. Raises a one-line ``ValueError`` naming the file on a bad magic
    number, a size that does not match the header, images and labels of different
    counts, or pixels outside [0, 255].
    """
    n_train = _positive_int("n_train", n_train)
    n_val = _positive_int("n_val", n_val)
    n_test = _positive_int("n_test", n_test, minimum=0)
    if isinstance(spec, Mapping):
        if set(spec) != {"images", "labels"}:
            raise ValueError(f"an MNIST spec mapping must have keys images, labels; got "
                             f"{', '.join(map(str, spec))}")
        images_path, labels_path = os.fspath(spec["images"]), os.fspath(spec["labels"])
    elif isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        images_path, labels_path = (_find_idx(os.fspath(spec), kind)
                                    for kind in ("images", "labels"))
    elif isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(".npz"):
        return _split_mnist(*_read_mnist_npz(os.fspath(spec)), n_train, n_val, n_test, seed,
                            stratify, os.fspath(spec))
    else:
        raise ValueError(f"{spec!r} is not an MNIST spec: a directory of IDX files, a "
                         "mapping {images: path, labels: path} or an .npz with X and y")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected 3-D images (n, rows, cols); the header "
                         f"says shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected 1-D labels (n,); the header says shape "
                         f"{labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} "
                         f"holds {len(labels)} labels")
    X = _pixels(images.reshape(len(images), -1), images_path)
    y = _class_labels(labels, labels_path)
    return _split_mnist(X, y, n_train, n_val, n_test, seed, stratify, images_path)


def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; ``.gz`` by suffix) as a numpy array of the shape
    and type its header states. Raises ``ValueError`` naming the file on a bad magic number
    or a payload of the wrong size."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'} "
                         f"(expected 0000 then a type code "
                         f"{'/'.join(f'{t:02x}' for t in _IDX_TYPES)} and the rank; "
                         "MNIST images 00000803, labels 00000801)")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    rank = raw[3]
    header = 4 + 4 * rank
    if rank == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header of rank {rank} does not fit the file's "
                         f"{len(raw)} bytes")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} of {dtype.name} "
                         f"({expected} bytes with the header) but the file has {len(raw)} "
                         "bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def _find_idx(directory: str, kind: str) -> str:
    names = [name + suffix for name in _IDX_NAMES[kind] for suffix in ("", ".gz")]
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ValueError(f"{directory}: no MNIST {kind} file; looked for {', '.join(names)}")


def _read_mnist_npz(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files if k in ("X", "y")}
            names = list(f.files)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:  # not a zip, cut
        raise ValueError(f"{path}: cannot be read as .npz ({_one_line(exc)})") from None
    if len(arrays) != 2:
        raise ValueError(f"{path}: an MNIST .npz needs arrays X and y; it has "
                         f"{', '.join(names) or 'none'}")
    X, y = arrays["X"], arrays["y"]
    if X.ndim not in (2, 3) or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{path}: X must be (n, pixels) or (n, rows, cols) and y (n,); got "
                         f"X {X.shape}, y {y.shape}")
    return _pixels(X.reshape(len(X), -1), path), _class_labels(y, path)


def _pixels(X: np.ndarray, path: str) -> np.ndarray:
    if not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)):
        raise ValueError(f"{path}: pixels must be numbers; got dtype {X.dtype}")
    X = X.astype(np.float64)
    if X.size and not np.all(np.isfinite(X)):
        raise ValueError(f"{path}: pixels must be finite")
    low, high = (X.min(), X.max()) if X.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise ValueError(f"{path}: pixels must lie in [0, 255] (or [0, 1]); got "
                         f"[{low:g}, {high:g}]")
    return X / 255.0 if high > 1 else X


def _class_labels(y: np.ndarray, path: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise ValueError(f"{path}: labels must be non-negative integers; got dtype "
                         f"{y.dtype}" + (f", min {y.min()}" if y.size else ""))
    return y.astype(np.int64)


def _split_mnist(X, y, n_train, n_val, n_test, seed, stratify, source):
    if seed is None:
        raise ValueError(f"{source}: MNIST data are split by seed; pass one")
    return split_rows(X, y, n_train=n_train, n_val=n_val, n_test=n_test,
                      gen=rng(seed, "mnist", "split"), stratify=stratify, source=source)


# --- generators at the published shapes ---------------------------------------------------


def news20_shaped(seed: int, *, n=11314, d=130107, density=0.001, n_val=3766, n_test=3766,
                  zipf=1.0, topic_words=1000, topic_share=0.15, label_noise=0.1) -> dict:
    """A sparse corpus shaped like 20 Newsgroups' tf-idf (stocBiO's logistic regression):
    ``n`` training, ``n_val``, ``n_test`` rows (defaults: the 11,314 "bydate" training
    documents; its 7,532 test ones halved) × ``d`` features, CSR.

    Model: document j's number of distinct terms is log-normal (σ = 0.8) with mean
    ``density``·d; its words are drawn with replacement from a Zipf(``zipf``) law over the
    features (column order shuffled, as a vocabulary is alphabetical, not by frequency),
    except a ``topic_share`` of them, drawn from its class's ``topic_words`` informative
    features (two disjoint sets among the mid-frequency ranks), until it holds its number of
    distinct terms; value (1 + log tf)·idf with sklearn's smooth idf, rows L2-normalized.
    Labels ±1.0, balanced, then ``label_noise`` of them flipped. So document frequencies
    follow a power law, lengths vary over about two decades, and a linear classifier learns
    the label from the sparse informative features.

    Cost: O(nnz log nnz) time (about 2 s at the default size), O(nnz) memory; never an
    n × d array.
    """
    n, n_val, n_test = (_positive_int(k, v, minimum=m) for k, v, m in
                        (("n", n, 1), ("n_val", n_val, 1), ("n_test", n_test, 0)))
    d = _positive_int("d", d, minimum=4)
    if not 0 < density <= 0.5:
        raise ValueError(f"density must be in (0, 0.5]; got {density!r}")
    topic_words = _positive_int("topic_words", topic_words)
    mid_ranks = d // 2 - d // 100  # the informative words are drawn among [d/100, d/2)
    if 2 * topic_words > mid_ranks:
        raise ValueError(f"2 * topic_words must be <= d // 2 - d // 100 = {mid_ranks} (the "
                         f"mid-frequency ranks); got topic_words={topic_words} for d={d}")
    g = rng(seed, "news20_shaped")
    rows = n + n_val + n_test
    column_of_rank = g.permutation(d)
    background = _cumulative(np.arange(1, d + 1, dtype=np.float64) ** -float(zipf))
    # informative words: two disjoint sets drawn among ranks [d/100, d/2), Zipf within
    ranks = g.choice(np.arange(d // 100, d // 2), size=2 * topic_words, replace=False)
    topics = column_of_rank[ranks].reshape(2, topic_words)
    within_topic = _cumulative(np.arange(1, topic_words + 1, dtype=np.float64) ** -0.7)
    sigma = 0.8
    distinct = np.exp(sigma * g.standard_normal(rows) - sigma ** 2 / 2) * density * d
    distinct = np.clip(np.rint(distinct), 1, d // 2).astype(np.int64)
    label = g.integers(0, 2, size=rows)
    # in blocks of documents, so that the word streams never hold more than ~1M words
    parts = [_draw_documents(g, np.arange(start, min(start + 4096, rows)), distinct, label,
                             background, column_of_rank, topics, within_topic,
                             topic_share, d)
             for start in range(0, rows, 4096)]
    keys = np.concatenate([k for k, _ in parts])
    tf = np.concatenate([t for _, t in parts])
    del parts
    row, col = np.divmod(keys, d)
    del keys
    idf = np.log((1.0 + rows) / (1.0 + np.bincount(col, minlength=d))) + 1.0
    values = (1.0 + np.log(tf)) * idf[col]
    values /= np.sqrt(np.bincount(row, weights=values ** 2, minlength=rows))[row]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=rows))])
    del row
    X = sp.csr_matrix((values, col.astype(np.int32), indptr), shape=(rows, d))
    X.has_sorted_indices = True  # keys were sorted, so each row's columns are
    y = np.where(label == 1, 1.0, -1.0)
    y[g.random(rows) < label_noise] *= -1.0
    return _cut({"X": X, "y": y}, n, n_val, n_test)


def _draw_documents(g, todo, distinct, label, background, column_of_rank, topics,
                    within_topic, topic_share, d):
    """Sorted keys row·d + column of every (document, term) of documents ``todo`` and the
    term counts: each document draws words until it holds ``distinct[i]`` different ones;
    documents that fall short are drawn again with a longer stream (a few rounds at most)."""
    keys_parts, tf_parts = [], []
    factor = 1.6
    while todo.size:
        want = distinct[todo]
        length = np.ceil(factor * want).astype(np.int64) + 8
        owner = np.repeat(todo, length)
        from_topic = g.random(owner.size) < topic_share
        word = column_of_rank[np.searchsorted(background, g.random(owner.size))]
        topic_rank = np.searchsorted(within_topic, g.random(int(from_topic.sum())))
        word[from_topic] = topics[label[owner[from_topic]], topic_rank]
        keys = owner * d + word
        unique, first, count = np.unique(keys, return_index=True, return_counts=True)
        # order each document's distinct words by first appearance; keep the first ones
        by_first = np.argsort(first, kind="stable")
        doc = unique[by_first] // d
        start = np.searchsorted(doc, todo)
        rank = np.arange(doc.size) - np.repeat(start, np.diff(np.append(start, doc.size)))
        got = np.diff(np.append(start, doc.size))
        done = got >= want
        keep = (rank < np.repeat(want, got)) & np.repeat(done, got)
        keys_parts.append(unique[by_first][keep])
        tf_parts.append(count[by_first][keep])
        todo = todo[~done]
        factor *= 1.5
    keys = np.concatenate(keys_parts)
    order = np.argsort(keys, kind="stable")
    return keys[order], np.concatenate(tf_parts)[order].astype(np.float64)


def ijcnn1_shaped(seed: int, *, n=49990, n_val=45850, n_test=45851, positive=0.0971) -> dict:
    """Dense binary data shaped like libsvm's ijcnn1 (benchmark_bilevel): ``n`` training
    rows (49,990 as the file), ``n_val`` and ``n_test`` (its 91,701 test rows halved) × 22:
    a one-hot block of 10 columns and 12 correlated continuous ones in (−1, 1). Labels
    ±1.0, a ``positive`` share of +1 (about 10 %), from a noisy score that is linear in
    the continuous features plus a quadratic term and a per-category offset (so a linear
    model learns much, not all). Cost: O(n · 22)."""
    n, n_val, n_test = (_positive_int(k, v, minimum=m) for k, v, m in
                        (("n", n, 1), ("n_val", n_val, 1), ("n_test", n_test, 0)))
    if not 0 < positive < 1:
        raise ValueError(f"positive must be in (0, 1); got {positive!r}")
    g = rng(seed, "ijcnn1_shaped")
    rows = n + n_val + n_test
    n_cat, n_cont = 10, 12
    mixing = g.standard_normal((n_cont, n_cont)) / np.sqrt(n_cont) + np.eye(n_cont)
    weights = g.standard_normal(n_cont)
    quadratic = g.standard_normal((n_cont, n_cont)) / n_cont
    category_offset = g.normal(0.0, 1.0, n_cat)
    category = g.choice(n_cat, size=rows, p=g.dirichlet(np.full(n_cat, 2.0)))
    cont = np.tanh(0.6 * g.standard_normal((rows, n_cont)) @ mixing)
    score = (2.0 * cont @ weights + np.einsum("ij,jk,ik->i", cont, quadratic, cont)
             + category_offset[category] + g.logistic(0.0, 0.5, rows))
    y = np.where(score > np.quantile(score, 1.0 - positive), 1.0, -1.0)
    X = np.zeros((rows, n_cat + n_cont))
    X[np.arange(rows), category] = 1.0
    X[:, n_cat:] = cont
    return _cut({"X": X, "y": y}, n, n_val, n_test)


#: covtype's class counts (classes 1..7 of the 581,012 rows)
COVTYPE_COUNTS = (211840, 283301, 35754, 2747, 9493, 17367, 20510)


def covtype_shaped(seed: int, *, n=464809, n_val=58101, n_test=58102) -> dict:
    """Dense 7-class data shaped like covtype (581,012 × 54; defaults split it 80/10/10):
    10 continuous columns in [0, 1] (as libsvm's ``covtype.scale``), then a one-hot block of
    4 (wilderness area) and one of 40 (soil type). Labels int64 0..6 with covtype's class
    shares (48.8 % class 1 down to 0.5 % class 4); each class has its own means for the
    continuous columns (shifted by the wilderness area) and its own Dirichlet law over
    the areas and soils, with overlapping classes (a linear model reaches about 75 %; on
    the real set about 71 %). Cost: O(rows · 54), about 0.3 s per 100k rows."""
    n, n_val, n_test = (_positive_int(k, v, minimum=m) for k, v, m in
                        (("n", n, 1), ("n_val", n_val, 1), ("n_test", n_test, 0)))
    g = rng(seed, "covtype_shaped")
    rows = n + n_val + n_test
    n_classes, n_cont, n_area, n_soil = 7, 10, 4, 40
    prior = np.asarray(COVTYPE_COUNTS, dtype=np.float64) / sum(COVTYPE_COUNTS)
    class_mean = 0.5 + g.normal(0.0, 0.055, (n_classes, n_cont))
    area_shift = g.normal(0.0, 0.08, (n_area, n_cont))
    # each class's law over areas and soils: half its own, half one shared by all classes
    area_law = _cumulative(0.5 * g.dirichlet(np.full(n_area, 0.7), n_classes)
                           + 0.5 * g.dirichlet(np.full(n_area, 2.0)))
    soil_law = _cumulative(0.5 * g.dirichlet(np.full(n_soil, 0.3), n_classes)
                           + 0.5 * g.dirichlet(np.full(n_soil, 1.0)))
    y = np.searchsorted(_cumulative(prior), g.random(rows)).astype(np.int64)
    area = np.empty(rows, np.int64)
    soil = np.empty(rows, np.int64)
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        area[members] = np.searchsorted(area_law[c], g.random(members.size))
        soil[members] = np.searchsorted(soil_law[c], g.random(members.size))
    X = np.zeros((rows, n_cont + n_area + n_soil))
    X[:, :n_cont] = np.clip(class_mean[y] + area_shift[area]
                            + g.normal(0.0, 0.15, (rows, n_cont)), 0.0, 1.0)
    X[np.arange(rows), n_cont + area] = 1.0
    X[np.arange(rows), n_cont + n_area + soil] = 1.0
    return _cut({"X": X, "y": y}, n, n_val, n_test)


def mnist_shaped(seed: int, *, n=20000, n_val=5000, n_test=10000, side=28) -> dict:
    """Dense 10-class images shaped like MNIST for data hyper-cleaning (stocBiO: 20,000
    training, 5,000 validation, 10,000 test images): ``side``² pixels in [0, 1], mostly 0.

    Each class has 6 styles, each a stroke image (a smooth path of Gaussian dots through 5
    anchors, the class's own jittered); an image is one of its class's styles shifted by
    up to 2 pixels, dimmed by up to 30 %, plus a smooth random field (16 bumps) and pixel
    noise, clipped to [0, 1] with values below 0.2 set to 0 (about 21 % of the pixels are
    non-zero; MNIST: 19 %). Labels int64 0..9, clean (the cleaning problem corrupts them).
    Not digits, but about as hard for a linear model (≈ 93 % accuracy; MNIST: 92 %).
    Cost: O(rows · side²), built in chunks of 4096 rows.
    """
    n, n_val, n_test = (_positive_int(k, v, minimum=m) for k, v, m in
                        (("n", n, 1), ("n_val", n_val, 1), ("n_test", n_test, 0)))
    side = _positive_int("side", side, minimum=8)
    g = rng(seed, "mnist_shaped")
    rows = n + n_val + n_test
    n_classes, n_styles, max_shift = 10, 6, 2
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).astype(np.float64)

    def dots(centres, width):  # (k, 2) centres -> (side²,) image, peak ~1
        dist2 = ((grid[:, None, :] - centres[None]) ** 2).sum(-1)
        return np.exp(-dist2 / (2 * width ** 2)).sum(1)

    styles = np.empty((n_classes * n_styles, side * side))
    shape_of_class = g.uniform(0.2 * side, 0.8 * side, (n_classes, 5, 2))
    for k in range(n_classes * n_styles):
        anchors = shape_of_class[k // n_styles] + g.normal(0.0, 0.12 * side, (5, 2))
        t = np.linspace(0.0, 4.0, 40)
        path = np.stack([np.interp(t, np.arange(5), anchors[:, i]) for i in (0, 1)], -1)
        image = dots(path, 0.035 * side)
        styles[k] = np.clip(image / np.quantile(image[image > 0.05], 0.7), 0.0, 1.0)
    shifts = [(a, b) for a in range(-max_shift, max_shift + 1)
              for b in range(-max_shift, max_shift + 1)]
    templates = np.stack([np.roll(styles.reshape(-1, side, side), s, axis=(1, 2))
                          for s in shifts], 1).reshape(len(styles), len(shifts), -1)
    bumps = np.stack([dots(c[None], 0.15 * side)
                      for c in g.uniform(0.0, side, (16, 2))])
    y = g.integers(0, n_classes, size=rows)
    X = np.empty((rows, side * side))
    for start in range(0, rows, 4096):
        stop = min(start + 4096, rows)
        m = stop - start
        style = y[start:stop] * n_styles + g.integers(0, n_styles, m)
        chunk = templates[style, g.integers(0, len(shifts), m)]
        chunk *= g.uniform(0.7, 1.0, (m, 1))
        chunk += g.normal(0.0, 0.12, (m, len(bumps))) @ bumps
        chunk += g.normal(0.0, 0.05, chunk.shape)
        np.clip(chunk, 0.0, 1.0, out=chunk)
        chunk[chunk < 0.2] = 0.0
        X[start:stop] = chunk
    return _cut({"X": X, "y": y.astype(np.int64)}, n, n_val, n_test)


def _cut(data: dict, n: int, n_val: int, n_test: int) -> dict:
    """The generators' rows are i.i.d., so their splits are consecutive blocks."""
    X, y = data["X"], data["y"]
    out = {"X_train": X[:n], "y_train": y[:n],
           "X_val": X[n:n + n_val], "y_val": y[n:n + n_val]}
    if n_test:
        out["X_test"], out["y_test"] = X[n + n_val:], y[n + n_val:]
    return out


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """Cumulative distributions (along the last axis) for inverse-CDF draws, each ending
    at exactly 1 so that a uniform draw never falls past the end."""
    total = np.cumsum(weights, axis=-1)
    total /= total[..., -1:]
    total[..., -1] = 1.0
    return total


def _positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


#: the generators by name, for a problem's ``dataset=`` choice
SHAPED = {"news20_shaped": news20_shaped, "ijcnn1_shaped": ijcnn1_shaped,
          "covtype_shaped": covtype_shaped, "mnist_shaped": mnist_shaped}

__all__ = ["SHAPED", "load_svmlight_data", "load_mnist_data", "read_idx", "first_bad_line",
           "split_rows", "proportional_table", "news20_shaped", "ijcnn1_shaped",
           "covtype_shaped", "mnist_shaped", "LABEL_MODES"]
