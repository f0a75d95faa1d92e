"""The math vocabulary of the problems in numpy: the names the jax and torch ``ops`` share.

Problem math is written once against an ``ops`` namespace so that numpy (the float64
oracles), JAX and PyTorch evaluate *identical* formulas. The math builds no arrays of its
own (it transforms its inputs), so the backends' array constructors, which need a device,
are not part of this vocabulary: they live on :class:`hypersweep.problems.base.Problem`'s
``ops``. ``sqdist`` is a numpy-only helper for building data.
"""
from __future__ import annotations

import numpy as np

name = "numpy"


def softplus(x):
    return np.logaddexp(0.0, x)


# scipy.special is imported on first use: importing it costs 0.2–0.3 s, and the driver
# imports the problem modules (hence this one) to validate a study before Ray starts
def sigmoid(x):
    from scipy.special import expit

    return expit(x)


def log_softmax(x, axis=-1):
    from scipy.special import log_softmax as _log_softmax

    return _log_softmax(x, axis=axis)


def logsumexp(x, axis=-1):
    from scipy.special import logsumexp as _logsumexp

    return _logsumexp(x, axis=axis)


def take_rows(x, idx):
    return x[idx]


def vdot(a, b):
    """Σ a ⊙ b as a scalar; a method call, so the jax and torch ops share this function."""
    return (a * b).sum()


def segment_sum(x, segment_ids, num_segments):
    """out[s] = Σ_{i: segment_ids[i] = s} x[i] for s < ``num_segments`` (1-D ``x``): the
    sparse products of :mod:`hypersweep.problems.sparse_logreg` (X w and Xᵀ r)."""
    out = np.bincount(segment_ids, weights=x, minlength=num_segments)
    return out.astype(np.result_type(x), copy=False)


def arange(n, like):
    """0, 1, …, n − 1 as integers, where ``like`` lives (numpy: the host)."""
    return np.arange(n)


def cumsum(x):
    return np.cumsum(x)


def cond(pred, true_fn, false_fn):
    """``true_fn()`` if ``pred`` else ``false_fn()``: one spelling for every backend (JAX's
    is ``lax.cond``)."""
    return true_fn() if bool(pred) else false_fn()


def sqdist(a, b):
    """Squared Euclidean distances between the rows of a and b."""
    aa = np.sum(a * a, axis=1)[:, None]
    bb = np.sum(b * b, axis=1)[None, :]
    return np.maximum(aa + bb - 2.0 * a @ b.T, 0.0)


exp = np.exp
log = np.log
log1p = np.log1p
sum = np.sum
mean = np.mean
square = np.square
sqrt = np.sqrt
where = np.where
einsum = np.einsum
reshape = np.reshape
