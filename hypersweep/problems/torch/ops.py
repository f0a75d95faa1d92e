"""Array operations in PyTorch (see ``hypersweep.problems.numpy_ops``); mirrors ``jax/ops.py``.

The device is explicit: :func:`resolve_device` turns a name (or ``None``: the GPU Ray
assigned through ``CUDA_VISIBLE_DEVICES`` if there is one, else the CPU) into a
``torch.device`` with its index, once, when a problem is built; the array constructors and
:func:`block` take it as an argument, and the math follows its inputs.
"""
from __future__ import annotations

import numpy as np
import torch

from hypersweep.problems import numpy_ops

name = "torch"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "int32": torch.int32}


def require_dtype(dtype: str) -> None:
    """Make ``dtype`` available: every dtype always is in PyTorch."""


def resolve_device(device: str | None) -> "torch.device":
    """``None`` → ``cuda:<current>`` when CUDA is available, else ``cpu``; or a name
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``), with the CUDA index filled in."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"torch device {device!r}: CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"torch device {device!r}: {torch.cuda.device_count()} CUDA "
                             f"device(s) visible")
    return dev


def asarray(x, dtype="float64", *, device):
    if isinstance(x, torch.Tensor):
        return x.to(dtype=_DTYPES[str(dtype)], device=device)
    return torch.as_tensor(np.asarray(x), dtype=_DTYPES[str(dtype)], device=device)


def zeros(shape, dtype="float64", *, device):
    return torch.zeros(shape, dtype=_DTYPES[str(dtype)], device=device)


def to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


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


def segment_sum(x, segment_ids, num_segments):
    """out[s] = Σ_{i: segment_ids[i] = s} x[i]. Out-of-place ``index_add`` on fresh zeros,
    so autograd differentiates it (to any order) and ``x`` is never written."""
    zeros = torch.zeros(num_segments, dtype=x.dtype, device=x.device)
    return zeros.index_add(0, segment_ids, x)


def arange(n, like):
    """0, 1, …, n − 1 (int64) on ``like``'s device."""
    return torch.arange(n, device=like.device)


def cumsum(x):
    return torch.cumsum(x, 0)


def cond(pred, true_fn, false_fn):
    """``true_fn()`` if ``pred`` else ``false_fn()`` (eager: reads ``pred`` on the host)."""
    return true_fn() if bool(pred) else false_fn()


sigmoid = torch.sigmoid
exp = torch.exp
log = torch.log
log1p = torch.log1p
square = torch.square
sqrt = torch.sqrt
where = torch.where
einsum = torch.einsum
vdot = numpy_ops.vdot  # Σ a ⊙ b by a method call: one function for every backend
reshape = torch.reshape


def device_name(device) -> str:
    """``device`` in words, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""
    if device.type == "cpu":
        return "cpu"
    return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"


def block(x, *, device):
    """Wait for ``device`` to finish the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return x


def compile_seconds() -> float:
    """Seconds spent compiling: always 0 (eager execution compiles nothing)."""
    return 0.0
