"""Array operations in JAX (see ``hypersweep.problems.numpy_ops``)."""
from __future__ import annotations

import jax

# float64 must be available for the exactness tests; arrays carry explicit dtypes.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

name = "jax"


def asarray(x, dtype="float64"):
    return jnp.asarray(x, dtype=dtype)


def to_numpy(x):
    return np.asarray(jax.device_get(x), dtype=np.float64)


def zeros(shape, dtype="float64"):
    return jnp.zeros(shape, dtype=dtype)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(x, axis=axis)


def logsumexp(x, axis=-1):
    return jax.scipy.special.logsumexp(x, axis=axis)


def take_rows(x, idx):
    return x[idx]


def sqdist(a, b):
    aa = jnp.sum(a * a, axis=1)[:, None]
    bb = jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(aa + bb - 2.0 * a @ b.T, 0.0)


def vdot(a, b):
    return jnp.sum(a * b)


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
eye = jnp.eye
reshape = jnp.reshape


def device_name() -> str:
    """Where JAX computes, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return f"{dev.platform}:{dev.id} ({getattr(dev, 'device_kind', '')})"


def block(x):
    return jax.block_until_ready(x)


_COMPILE = {"seconds": 0.0, "listening": False}
_COMPILE_EVENT_PREFIX = "/jax/core/compile/"


def _on_event_duration(event: str, duration: float, **_: object) -> None:
    if event.startswith(_COMPILE_EVENT_PREFIX):
        _COMPILE["seconds"] += float(duration)


def compile_seconds() -> float:
    """Seconds this process has spent compiling (tracing, lowering, XLA compile), from
    JAX's own monitoring events. Differences around a call give the compile it paid;
    0 when it reused compiled functions. The listener is registered on first use."""
    if not _COMPILE["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
        _COMPILE["listening"] = True
    return _COMPILE["seconds"]
