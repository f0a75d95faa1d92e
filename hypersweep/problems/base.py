"""The bound problem instance: one problem module + data + backend + dtype + device.

A problem *module* (e.g. ``hypersweep/problems/ridge.py``) imports numpy only and
defines its math once against an ``ops`` namespace:

``build(seed, data=None, **params) -> ProblemData``
    numpy float64 arrays, hashable static config, λ₀, the inner step η.
``inner_loss(w, lam, arrays, static, ops)`` / ``outer_loss(w, lam, arrays, static, ops)``
    scalar losses, identical math in numpy, JAX and PyTorch.
``exact_inner_solution(lam, arrays, static)`` / ``exact_hypergradient(lam, arrays, static)``
    float64 numpy oracles (closed form, or Newton to ‖∇‖ ≤ 1e-12 + a direct solve).
``inner_hessian(w, lam, arrays, static)``
    dense float64 ∇²_w L_in (w flattened), for the contraction factor and Newton.
``metrics(w, lam, arrays, static) -> dict``
    evaluation metrics in float64: ``test_loss`` and ``test_accuracy`` (None if undefined).
``CHOICES: dict[str, tuple]`` (optional)
    the ``build`` params that take one of a fixed set of values (e.g. ``dataset``);
    :func:`hypersweep.problems.check_params` rejects other values, and a study's problem
    entries name them at ``plan``, one line, before Ray starts.
``HOOKS: frozenset[str]``
    which of the optional functions (:data:`OPTIONAL_HOOKS`) the module defines; checked
    against the module when a problem is built (:func:`declared_hooks`), never probed:

    ``inner_grad(w, lam, arrays, static, ops)``
        analytic ∇_w L_in; faster in eager PyTorch than autograd. Checked against autodiff.
    ``inner_loss_batch(w, lam, arrays, static, ops, idx)`` / ``outer_loss_batch(...)``
        minibatch losses over the rows ``idx``; declared exactly when the catalog gives the
        problem the capability ``"minibatch"`` (stocbio).
    ``lipschitz(lam, arrays, static, cache)``
        a bound on the inner curvature at λ (:meth:`Problem.stable_inner_lr`).
    ``inner_grad_rows(w, lam, v, arrays, static, ops, idx)`` / ``outer_grad_rows(w, lam,
    arrays, static, ops, idx)``
        closed-form per-sample derivatives over the rows ``idx`` (b of them), for the
        solvers that keep per-sample memories (SABA): ``(∇_w ℓ_i, H_i v, (∂_λ ∇_w ℓ_i)ᵀ v)``
        and ``(∇_w f_j, ∇_λ f_j)``, each of shape (b, ·) with w and λ flattened; ℓ_i, f_j
        are the one-row losses ``inner_loss_batch(…, [i])``. A pair, and only with the
        minibatch pair. Without them a solver differentiates the one-row losses itself;
        checked against that in ``tests/test_grad_rows.py``.

Device: chosen once when the problem is built — the ``device`` argument, else
``$HYPERSWEEP_DEVICE`` (``cpu``, ``cuda``, ``cuda:N``), else the backend's default (the
GPU Ray assigned if any, else the CPU) — and carried by ``Problem.ops``, whose array
constructors place every array there. float64 on JAX turns on ``jax_enable_x64`` for the
process when the problem is built (see :mod:`hypersweep.problems.jax.ops` for why it must
be global).

This module imports neither torch nor jax: the backend ``ops`` module is loaded lazily.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from hypersweep.registry import BACKENDS, ProblemSpec, check_choice

DTYPES = ("float32", "float64")
#: the optional functions a problem module may define, each declared in its ``HOOKS``
OPTIONAL_HOOKS = ("inner_grad", "inner_loss_batch", "outer_loss_batch", "lipschitz",
                  "inner_grad_rows", "outer_grad_rows")
_MINIBATCH_HOOKS = frozenset({"inner_loss_batch", "outer_loss_batch"})
_ROW_HOOKS = frozenset({"inner_grad_rows", "outer_grad_rows"})
#: the environment variable naming the default device (``cpu``, ``cuda``, ``cuda:N``)
DEVICE_ENV = "HYPERSWEEP_DEVICE"


@dataclass
class ProblemData:
    """What a problem module's ``build`` returns (all numpy, float64)."""

    arrays: dict[str, np.ndarray]
    static: dict[str, Any]
    lam0: np.ndarray
    w_shape: tuple[int, ...]
    inner_lr: float
    info: dict[str, Any] = field(default_factory=dict)  # free-form description (sizes, source)


#: the sizes every instance reports (:func:`instance_sizes`), recorded in its result rows
SIZE_KEYS = ("n_train", "n_val", "n_test", "n_features", "n_classes", "n_tasks", "dim_w",
             "dim_lam")


def instance_sizes(built: ProblemData) -> dict[str, int | None]:
    """The sizes of a built instance, None where one has no meaning (no features in a
    quadratic; no classes in a regression).

    ``n_train`` / ``n_val`` / ``n_test``: the module's ``info`` where it says, else the
    labels' rows (``y_<split>``: the last axis, so per task for (T, n) targets; ``n_test``
    0 when there is a ``y_train`` but no ``y_test``). ``n_features`` (without a bias
    column), ``n_classes`` and ``n_tasks``: the module's ``info``. ``dim_w`` / ``dim_lam``:
    the number of entries of w and λ. What was built, not what was asked: a data file's
    sizes are its own.
    """
    sizes: dict[str, int | None] = {key: None for key in SIZE_KEYS}
    labels = {split: built.arrays.get(f"y_{split}") for split in ("train", "val", "test")}
    for split, y in labels.items():
        if y is not None:
            sizes[f"n_{split}"] = int(np.shape(y)[-1])
    if labels["train"] is not None and labels["test"] is None:
        sizes["n_test"] = 0
    for key in SIZE_KEYS:
        value = built.info.get(key)
        if value is not None:
            sizes[key] = int(value)
    sizes["dim_w"] = int(np.prod(built.w_shape, dtype=np.int64))
    sizes["dim_lam"] = int(np.size(built.lam0))
    return sizes


def load_ops(backend: str) -> ModuleType:
    """The ``ops`` module of ``backend`` ("numpy": the oracles' math vocabulary)."""
    if backend == "numpy":
        return importlib.import_module("hypersweep.problems.numpy_ops")
    check_choice("backend", backend, BACKENDS)
    return importlib.import_module(f"hypersweep.problems.{backend}.ops")


def default_device() -> str | None:
    """``$HYPERSWEEP_DEVICE`` if set (read when a problem is built), else None: the backend
    picks (the GPU Ray assigned through ``CUDA_VISIBLE_DEVICES`` if any, else the CPU)."""
    return os.environ.get(DEVICE_ENV) or None


def declared_hooks(module: ModuleType, spec: ProblemSpec) -> frozenset[str]:
    """The module's ``HOOKS``, checked: known names, each defined, none defined but left
    undeclared, and the minibatch pair declared exactly with the ``"minibatch"`` capability."""
    where = f"problem module {module.__name__!r}"
    hooks = vars(module).get("HOOKS")
    if not isinstance(hooks, frozenset):
        raise TypeError(f"{where} must declare HOOKS, a frozenset of the optional functions "
                        f"it defines (from: {', '.join(OPTIONAL_HOOKS)}); got {hooks!r}")
    unknown = sorted(hooks - set(OPTIONAL_HOOKS))
    if unknown:
        raise ValueError(f"{where}: unknown HOOKS {unknown}. Valid choices: "
                         f"{', '.join(OPTIONAL_HOOKS)}")
    for hook in OPTIONAL_HOOKS:
        defined = callable(vars(module).get(hook))
        if defined != (hook in hooks):
            raise ValueError(f"{where}: {hook!r} is {'defined' if defined else 'declared'} "
                             f"but not {'declared in HOOKS' if defined else 'defined'}")
    minibatch = "minibatch" in spec.capabilities
    if hooks & _MINIBATCH_HOOKS != (_MINIBATCH_HOOKS if minibatch else frozenset()):
        raise ValueError(f"{where}: HOOKS {sorted(hooks & _MINIBATCH_HOOKS)} disagree with "
                         f"the catalog's capabilities {sorted(spec.capabilities)} (capability "
                         f"'minibatch' ⇔ both of {sorted(_MINIBATCH_HOOKS)})")
    rows = hooks & _ROW_HOOKS
    if rows and (rows != _ROW_HOOKS or not minibatch):
        raise ValueError(f"{where}: HOOKS {sorted(rows)}: the per-sample hooks come as the "
                         f"pair {sorted(_ROW_HOOKS)} and only with the minibatch pair "
                         f"{sorted(_MINIBATCH_HOOKS)}")
    return hooks


def contraction_factor(module: ModuleType, built: ProblemData, lam: np.ndarray, *,
                       inner_lr: float | None = None) -> float:
    """q = max |1 − η·eig(∇²_w L_in(w*(λ), λ))| of a problem module's numpy instance
    ``built`` (η = ``inner_lr``, default the instance's), in float64 numpy only."""
    static = dict(built.static)
    w = module.exact_inner_solution(lam, built.arrays, static)
    H = module.inner_hessian(w, lam, built.arrays, static)
    eig = np.linalg.eigvalsh(0.5 * (H + H.T))
    eta = built.inner_lr if inner_lr is None else inner_lr
    return float(np.max(np.abs(1.0 - eta * eig)))


class BackendOps:
    """A backend's ``ops`` module bound to one device: what code outside the problem math
    uses to make, read and wait for arrays (``problem.ops``).

    The constructors (``asarray``, ``zeros``) place arrays on ``device`` and ``block``
    waits for it; ``to_numpy`` and ``compile_seconds`` are the module's. The math
    vocabulary (``exp``, ``einsum``…) is the module's too and is reached through
    :attr:`Problem.fns` (``fns.ops``): math transforms its inputs and builds no arrays.
    """

    def __init__(self, module: ModuleType, device: Any):
        self.module = module
        self.name = module.name
        self.device = device

    def asarray(self, x, dtype="float64"):
        return self.module.asarray(x, dtype, device=self.device)

    def zeros(self, shape, dtype="float64"):
        return self.module.zeros(shape, dtype, device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        return self.module.to_numpy(x)

    def block(self, x):
        return self.module.block(x, device=self.device)

    def device_name(self) -> str:
        """Where this problem computes, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""
        return self.module.device_name(self.device)

    def compile_seconds(self) -> float:
        return self.module.compile_seconds()

    def __repr__(self) -> str:
        return f"BackendOps({self.name!r}, device={self.device!r})"


@dataclass(frozen=True)
class ProblemFns:
    """Hashable bundle of a problem's pure functions (a static argument for ``jax.jit``).

    Each method takes the data ``arrays`` explicitly, so one compiled function serves
    every instance (seed) of the same shapes.
    """

    module_name: str
    static_items: tuple
    backend: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    @property
    def ops(self) -> ModuleType:
        return load_ops(self.backend)

    @property
    def static(self) -> dict:
        return dict(self.static_items)

    @property
    def has_inner_grad(self) -> bool:
        """Whether the module declares an analytic ``inner_grad`` (its ``HOOKS``)."""
        return "inner_grad" in self.module.HOOKS

    def inner_loss(self, w, lam, arrays):
        return self.module.inner_loss(w, lam, arrays, self.static, self.ops)

    def outer_loss(self, w, lam, arrays):
        return self.module.outer_loss(w, lam, arrays, self.static, self.ops)

    def inner_grad(self, w, lam, arrays):
        """Analytic ∇_w L_in. Backends without it fall back to autodiff themselves."""
        return self.module.inner_grad(w, lam, arrays, self.static, self.ops)

    def inner_loss_batch(self, w, lam, arrays, idx):
        return self.module.inner_loss_batch(w, lam, arrays, self.static, self.ops, idx)

    @property
    def has_grad_rows(self) -> bool:
        """Whether the module declares the closed-form per-sample hooks (its ``HOOKS``)."""
        return "inner_grad_rows" in self.module.HOOKS

    def inner_grad_rows(self, w, lam, v, arrays, idx):
        """Per train row i of ``idx``: (∇_w ℓ_i, H_i v, (∂_λ ∇_w ℓ_i)ᵀ v), each (b, ·)."""
        return self.module.inner_grad_rows(w, lam, v, arrays, self.static, self.ops, idx)

    def outer_grad_rows(self, w, lam, arrays, idx):
        """Per validation row j of ``idx``: (∇_w f_j, ∇_λ f_j), each (b, ·)."""
        return self.module.outer_grad_rows(w, lam, arrays, self.static, self.ops, idx)

    def outer_loss_batch(self, w, lam, arrays, idx):
        return self.module.outer_loss_batch(w, lam, arrays, self.static, self.ops, idx)


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class Problem:
    """A bilevel problem bound to data, a backend and a dtype.

    Created by :func:`hypersweep.problems.make`. Everything the estimators need is here:
    ``fns`` (pure math), ``arrays`` (backend data on ``device``), ``w_init``, ``inner_lr``
    (η), ``ops`` (the backend bound to ``device``), and the float64 numpy oracles.
    ``device`` is chosen here, once (``None``: :func:`default_device`, then the backend's
    default); for JAX float64 this is where ``jax_enable_x64`` turns on, before any array.
    """

    def __init__(self, spec: ProblemSpec, module: ModuleType, built: ProblemData, *,
                 backend: str, dtype: str, seed: int, params: Mapping[str, Any],
                 device: str | None = None):
        self.spec = spec
        self.name = spec.name
        self.module = module
        self.backend = backend
        self.dtype = dtype
        self.seed = seed
        self.params = dict(params)
        self.built = built
        self.hooks = declared_hooks(module, spec)
        ops_module = load_ops(backend)
        ops_module.require_dtype(dtype)  # before any array or jit of this dtype exists
        self.device = ops_module.resolve_device(device if device is not None
                                                else default_device())
        self.ops = BackendOps(ops_module, self.device)
        self.static = dict(built.static)
        self.arrays_np = built.arrays
        self.lam_shape = tuple(np.shape(built.lam0))
        self.w_shape = tuple(built.w_shape)
        self.inner_lr = float(built.inner_lr)
        self.fns = ProblemFns(module.__name__, _freeze(self.static), backend)
        self.capabilities = spec.capabilities
        self._lip_cache: dict = {}
        # Built now, not lazily: a first read inside a jax.jit trace would cache tracers.
        #: the data as backend arrays: floats in ``dtype``, integer labels kept integer
        self.arrays = {k: self.ops.asarray(v, "int64" if np.issubdtype(
            np.asarray(v).dtype, np.integer) else dtype) for k, v in self.arrays_np.items()}
        w0 = built.info.get("w_init")
        #: where the inner iterations start (:meth:`with_w_init` for a warm start)
        self.w_init = (self.ops.zeros(self.w_shape, dtype) if w0 is None else
                       self.ops.asarray(np.array(np.broadcast_to(w0, self.w_shape)), dtype))

    def with_inner_lr(self, eta: float) -> "Problem":
        """A shallow copy with inner step η = ``eta`` (data, arrays and ``fns`` shared, so
        compiled estimators are reused: η is a traced value)."""
        clone = copy.copy(self)
        clone.inner_lr = float(eta)
        return clone

    def stable_inner_lr(self, lam) -> float:
        """min(η, 1/L(λ)) where the module bounds the inner curvature as a function of λ
        (``lipschitz(lam, arrays, static, cache)``); η itself elsewhere.

        η defaults to 1/L(λ₀); when an outer loop moves λ to larger curvature, a fixed η
        stops Φ from contracting and the inner iterates diverge.
        """
        if "lipschitz" not in self.hooks:
            return self.inner_lr
        L = float(self.module.lipschitz(self.lam_numpy(lam), self.arrays_np, self.static,
                                        self._lip_cache))
        return min(self.inner_lr, 1.0 / L) if L > 0 else self.inner_lr

    def with_w_init(self, w) -> "Problem":
        """A shallow copy whose inner iterations start at ``w`` (a backend array).

        Used for warm starts (HPO pipeline: the next outer step starts from the previous
        w_t). Data, backend ``arrays`` and ``fns`` are shared, so compiled estimators are
        reused; the oracles do not depend on ``w_init``.
        """
        clone = copy.copy(self)
        clone.w_init = w
        return clone

    @property
    def sizes(self) -> dict[str, int | None]:
        """The instance's sizes (:func:`instance_sizes`): n_train, n_val, n_test,
        n_features, n_classes, n_tasks, dim_w, dim_lam."""
        return instance_sizes(self.built)

    def row_columns(self) -> dict[str, Any]:
        """What a result row records of this instance: :attr:`sizes` and ``inner_lr``
        (η as built: the study's ``inner_lr``, else the module's 1/L at λ₀)."""
        return {**self.sizes, "inner_lr": float(self.built.inner_lr)}

    # -- hyperparameters ---------------------------------------------------------------
    def initial_hyperparams(self) -> np.ndarray:
        return np.array(self.built.lam0, dtype=np.float64, copy=True)

    def lam_numpy(self, lam) -> np.ndarray:
        """λ as float64 numpy, from numpy or a backend array; checks the shape."""
        arr = self.ops.to_numpy(lam) if not isinstance(lam, np.ndarray) else lam
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape != self.lam_shape:
            if arr.size == 1 and int(np.prod(self.lam_shape)) == 1:
                arr = arr.reshape(self.lam_shape)
            else:
                raise ValueError(
                    f"lam for problem {self.name!r} must have shape {self.lam_shape} "
                    f"({self.spec.lam_parametrization}); got shape {arr.shape}"
                )
        return arr

    def as_lam(self, lam):
        """λ as a backend array in this problem's dtype (validated shape)."""
        return self.ops.asarray(self.lam_numpy(lam), self.dtype)

    # -- the math on the backend --------------------------------------------------------
    def inner_loss(self, w, lam):
        return self.fns.inner_loss(w, lam, self.arrays)

    def outer_loss(self, w, lam):
        return self.fns.outer_loss(w, lam, self.arrays)

    # -- float64 oracles (numpy) ---------------------------------------------------------
    def exact_inner_solution(self, lam) -> np.ndarray:
        return np.asarray(self.module.exact_inner_solution(
            self.lam_numpy(lam), self.arrays_np, self.static), dtype=np.float64)

    def exact_hypergradient(self, lam) -> np.ndarray:
        return np.asarray(self.module.exact_hypergradient(
            self.lam_numpy(lam), self.arrays_np, self.static), dtype=np.float64)

    def value(self, lam) -> float:
        """F(λ) = L_out(w*(λ), λ) in float64."""
        lam_np = self.lam_numpy(lam)
        w = self.exact_inner_solution(lam_np)
        return float(self.module.outer_loss(w, lam_np, self.arrays_np, self.static,
                                            load_ops("numpy")))

    def outer_loss_np(self, w, lam) -> float:
        """L_out(w, λ) in float64 numpy for any w (e.g. an estimator's w_t)."""
        return float(self.module.outer_loss(
            np.asarray(self.ops.to_numpy(w)), self.lam_numpy(lam), self.arrays_np,
            self.static, load_ops("numpy")))

    def metrics(self, w, lam) -> dict:
        """``val_loss``, ``test_loss``, ``test_accuracy`` (None where undefined), float64."""
        w_np = np.asarray(self.ops.to_numpy(w), dtype=np.float64)
        lam_np = self.lam_numpy(lam)
        out = {"val_loss": float(self.module.outer_loss(
            w_np, lam_np, self.arrays_np, self.static, load_ops("numpy")))}
        out.update(self.module.metrics(w_np, lam_np, self.arrays_np, self.static))
        return out

    def contraction_factor(self, lam=None) -> float:
        """q = max |1 − η·eig(∇²_w L_in(w*, λ))|: the rate of Φ near w* (q < 1: contraction)."""
        lam_np = self.initial_hyperparams() if lam is None else self.lam_numpy(lam)
        return contraction_factor(self.module, self.built, lam_np, inner_lr=self.inner_lr)

    @property
    def identity(self) -> tuple:
        """What the instance's data and oracles are a function of: (problem, params, seed).

        Cache keys use this (plus backend and dtype where the arrays matter), never
        the object's address: Python reuses a freed object's address, and a bounded cache
        frees objects.
        """
        return (self.name, json.dumps(self.params, sort_keys=True, separators=(",", ":"),
                                      default=str), int(self.seed))

    def __repr__(self) -> str:
        return (f"Problem({self.name!r}, backend={self.backend!r}, dtype={self.dtype!r}, "
                f"device={self.ops.device_name()!r}, seed={self.seed}, "
                f"w_shape={self.w_shape}, lam_shape={self.lam_shape})")
