"""Array operations in PyTorch (see ``hypersweep.problems.numpy_ops``)."""
from __future__ import annotations

import numpy as np
import torch

name = "torch"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "int32": torch.int32}


def device() -> "torch.device":
    """The device cells run on: the GPU Ray assigned (CUDA_VISIBLE_DEVICES) or the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def asarray(x, dtype="float64"):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=_DTYPES[str(dtype)], device=device())
    return torch.as_tensor(np.asarray(x), dtype=_DTYPES[str(dtype)], device=device())


def to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def zeros(shape, dtype="float64"):
    return torch.zeros(shape, dtype=_DTYPES[str(dtype)], device=device())


def softplus(x):
    # Not F.softplus: it returns x itself above its threshold 20, off by log1p(e^-x)
    # (7.6e-10 at x = 21), which breaks float64 parity with numpy and JAX.
    return torch.logaddexp(x, torch.zeros_like(x))


def log_softmax(x, axis=-1):
    return torch.log_softmax(x, dim=axis)


def logsumexp(x, axis=-1):
    return torch.logsumexp(x, dim=axis)


def sum(x, axis=None):
    return torch.sum(x) if axis is None else torch.sum(x, dim=axis)


def mean(x, axis=None):
    return torch.mean(x) if axis is None else torch.mean(x, dim=axis)


def take_rows(x, idx):
    # index_select is ~50x faster than x[idx] for a 1-D index tensor on the CPU (torch 2.13).
    if isinstance(idx, torch.Tensor) and idx.ndim == 1:
        return torch.index_select(x, 0, idx)
    return x[idx]


def sqdist(a, b):
    aa = torch.sum(a * a, dim=1)[:, None]
    bb = torch.sum(b * b, dim=1)[None, :]
    return torch.clamp(aa + bb - 2.0 * a @ b.T, min=0.0)


def vdot(a, b):
    return torch.sum(a * b)


def eye(n, dtype="float64"):
    return torch.eye(n, dtype=_DTYPES[str(dtype)], device=device())


sigmoid = torch.sigmoid
exp = torch.exp
log = torch.log
log1p = torch.log1p
square = torch.square
sqrt = torch.sqrt
where = torch.where
einsum = torch.einsum
reshape = torch.reshape


def device_name() -> str:
    """Where torch computes, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""
    dev = device()
    if dev.type == "cpu":
        return "cpu"
    return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"


def block(x):
    if device().type == "cuda":
        torch.cuda.synchronize()
    return x


def compile_seconds() -> float:
    """Seconds spent compiling: always 0 (eager execution compiles nothing)."""
    return 0.0
