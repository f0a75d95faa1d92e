"""Array operations in numpy, with the same names as the jax and torch ``ops`` modules.

Problem math is written once against an ``ops`` namespace so that numpy (the float64
oracles), JAX and PyTorch evaluate *identical* formulas.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax as _log_softmax, logsumexp as _logsumexp

name = "numpy"


def asarray(x, dtype="float64"):
    return np.asarray(x, dtype=dtype)


def to_numpy(x):
    return np.asarray(x, dtype=np.float64)


def zeros(shape, dtype="float64"):
    return np.zeros(shape, dtype=dtype)


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return expit(x)


def log_softmax(x, axis=-1):
    return _log_softmax(x, axis=axis)


def logsumexp(x, axis=-1):
    return _logsumexp(x, axis=axis)


def take_rows(x, idx):
    return x[idx]


def sqdist(a, b):
    """Squared Euclidean distances between the rows of a and b."""
    aa = np.sum(a * a, axis=1)[:, None]
    bb = np.sum(b * b, axis=1)[None, :]
    return np.maximum(aa + bb - 2.0 * a @ b.T, 0.0)


def vdot(a, b):
    return np.sum(a * b)


exp = np.exp
log = np.log
log1p = np.log1p
sum = np.sum
mean = np.mean
square = np.square
sqrt = np.sqrt
where = np.where
einsum = np.einsum
eye = np.eye
reshape = np.reshape


def device_name() -> str:
    return "cpu"


def block(x):
    return x


def compile_seconds() -> float:
    """Seconds spent compiling: always 0 (eager execution compiles nothing)."""
    return 0.0
