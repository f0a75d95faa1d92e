"""Array operations in JAX (see ``hypersweep.problems.numpy_ops``); mirrors ``torch/ops.py``.

Importing this module changes no JAX setting. float64 needs JAX's ``jax_enable_x64``:
:func:`require_dtype` turns it on when a float64 problem is built
(:class:`hypersweep.problems.base.Problem` calls it before it makes any array), and it is
**process-wide**, by necessity: the estimators run after ``problems.make`` returns, outside
any scope the problem could open, so the scoped ``jax.enable_x64(True)`` context manager
(JAX 0.10) cannot cover them. Nothing breaks for float32 when it turns on: every array
here carries an explicit dtype and x64 is part of JAX's jit cache key, so float32
functions compiled before are retraced, not reused at the wrong width. A process that
never builds a float64 JAX problem keeps JAX's default (x64 off).

The persistent compilation cache (:mod:`.compile_cache`, on unless
``$HYPERSWEEP_CACHE_DIR=off``) is turned on by :func:`resolve_device`, that is when the
process builds its first JAX problem, not at import.

Array constructors take the device explicitly (a ``jax.Device`` from
:func:`resolve_device`, chosen once per problem); the math functions follow their inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hypersweep.problems import numpy_ops
from hypersweep.problems.jax import compile_cache, executables

name = "jax"


def require_dtype(dtype: str) -> None:
    """Make ``dtype`` available: float64 turns on ``jax_enable_x64`` for the process."""
    if str(dtype) == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def resolve_device(device: str | None) -> "jax.Device":
    """``None`` → JAX's default device; ``"cpu"``, ``"cuda"``/``"gpu"``, ``"cuda:N"``.
    Called once per problem, before anything of it compiles: the first call turns the
    persistent compilation cache on (:func:`.compile_cache.ensure`)."""
    compile_cache.ensure()
    if device is None:
        return jax.devices()[0]
    platform, _, index = str(device).partition(":")
    platform = {"cuda": "gpu"}.get(platform, platform)
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(f"JAX has no device {device!r}: {exc}") from None


def _dtype(dtype: str):
    """The array dtype for ``dtype``: int64 narrows to int32 without x64 (integer labels
    only); float64 without x64 is an error, never a silent float32."""
    if str(dtype) == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 JAX arrays need jax_enable_x64: build the problem with "
                           "dtype='float64' (it turns x64 on) or call require_dtype first")
    if str(dtype) == "int64" and not jax.config.jax_enable_x64:
        return jnp.int32
    return jnp.dtype(dtype)


def asarray(x, dtype="float64", *, device):
    if isinstance(x, jax.Array):
        return jnp.asarray(x, dtype=_dtype(dtype), device=device)
    # Host data: converted in numpy and copied over. jnp.asarray would compile a small
    # conversion per shape, a compile event per data array of every new instance.
    return jax.device_put(np.asarray(x, dtype=_dtype(dtype)), device)


def zeros(shape, dtype="float64", *, device):
    return jax.device_put(np.zeros(shape, dtype=_dtype(dtype)), device)


def to_numpy(x):
    return np.asarray(jax.device_get(x), dtype=np.float64)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(x, axis=axis)


def logsumexp(x, axis=-1):
    return jax.scipy.special.logsumexp(x, axis=axis)


def take_rows(x, idx):
    return x[idx]


def segment_sum(x, segment_ids, num_segments):
    """out[s] = Σ_{i: segment_ids[i] = s} x[i] (``num_segments`` a Python int). Its
    transpose is a gather, so reverse mode through it stays O(len(x)), never dense."""
    return jax.ops.segment_sum(x, segment_ids, num_segments=num_segments)


def arange(n, like):
    """0, 1, …, n − 1 as integers. Uncommitted, so JAX computes it where the committed
    arrays it meets (``like``, the problem's data) live; inside ``jit`` nothing moves."""
    return jnp.arange(n)


def cumsum(x):
    """Inclusive prefix sum of a 1-D array: ``lax.associative_scan`` (on XLA:CPU about 1.5×
    faster than ``jnp.cumsum``'s lowering for 10⁴ elements)."""
    return jax.lax.associative_scan(jnp.add, x)


def cond(pred, true_fn, false_fn):
    """``true_fn()`` if ``pred`` else ``false_fn()``: ``lax.cond``, so inside ``jit`` both
    branches are compiled and the data picks one at run time (under ``vmap``, both run)."""
    return jax.lax.cond(pred, true_fn, false_fn)


softplus = jax.nn.softplus
sigmoid = jax.nn.sigmoid
exp = jnp.exp
log = jnp.log
log1p = jnp.log1p
sum = jnp.sum
mean = jnp.mean
square = jnp.square
sqrt = jnp.sqrt
where = jnp.where
einsum = jnp.einsum
vdot = numpy_ops.vdot  # Σ a ⊙ b by a method call: one function for every backend
reshape = jnp.reshape


def device_name(device) -> str:
    """``device`` in words, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""
    if device.platform == "cpu":
        return "cpu"
    return f"{device.platform}:{device.id} ({device.device_kind})"


def block(x, *, device):
    """Wait for ``x`` to be computed (JAX dispatches asynchronously)."""
    return jax.block_until_ready(x)


_COMPILE = {"seconds": 0.0, "listening": False}
_COMPILE_EVENT_PREFIX = "/jax/core/compile/"


def _on_event_duration(event: str, duration: float, **_: object) -> None:
    if event.startswith(_COMPILE_EVENT_PREFIX):
        _COMPILE["seconds"] += float(duration)


def compile_seconds() -> float:
    """Seconds this process has spent compiling (tracing, lowering, XLA compile), from
    JAX's own monitoring events, plus loading stored executables (:mod:`.executables`).
    Differences around a call give the compile it paid; 0 when it reused compiled
    functions. The listener is registered on first use."""
    if not _COMPILE["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
        _COMPILE["listening"] = True
    return _COMPILE["seconds"] + executables.COUNTERS.load_seconds
