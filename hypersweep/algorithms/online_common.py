"""Backend-free pieces of the online methods (HyperDistill, T1-T2, Greedy).

An online method tunes λ *during one training run* of w. Each is an optax-style pair
``OnlineMethod(init, step)`` (see ``hypersweep.algorithms.{jax,torch}.online``)::

    state = method.init(problem, lam0, *, seed=0, optimizer="adam", outer_lr=0.1, **params)
    state, info = method.step(problem, state, t=t, K=K)

One ``step`` = t inner steps of Φ(w, λ) = w − η ∇_w L_in(w, λ) on the carried w, then one
update of λ by the outer optimizer ("adam" or "sgd") with the method's hypergradient
estimate. What t and K mean per method:

=============  ================================================  =========================
method         t                                                 K
=============  ================================================  =========================
hyperdistill   inner steps per λ update (1 = the paper's online)  DrMAD reverse steps used
                                                                  to fit θ (0: θ stays θ₀)
t1t2           inner steps per λ update (1 = Luketina's T1-T2)   unused
greedy         window T: inner steps summed into one λ update     unused
=============  ================================================  =========================

This module imports neither torch nor jax.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from hypersweep.algorithms.common import cost_columns
from hypersweep.registry import check_choice

OUTER_OPTIMIZERS = ("adam", "sgd")
#: Adam's constants, identical in optax.adam and torch.optim.Adam defaults.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
METHODS = ("hyperdistill", "t1t2", "greedy")


class OnlineMethod(NamedTuple):
    """An online hyperparameter method as a pair of functions (optax style)."""

    init: Callable[..., Any]
    step: Callable[..., Any]


class OnlineConfig(NamedTuple):
    """Static (hashable) settings of an online run; part of the state, never traced."""

    method: str
    optimizer: str
    outer_lr: float
    gamma: float = 0.0        # hyperdistill / greedy decay γ
    theta0: float = 1.0       # hyperdistill: θ before the first fit
    theta_every: int = 10     # hyperdistill: refit θ every this many λ updates
    fd_eps: float = 0.01      # t1t2: ε = fd_eps / ‖∇_w L_out‖ (DARTS)


class OnlineInfo(NamedTuple):
    """What one ``step`` reports. ``lam`` is the λ the inner steps and the hypergradient
    used (before the update); ``w`` is w after the t inner steps; counts are this step's."""

    lam: Any
    w: Any
    hypergrad: Any
    n_inner_grad_evals: int
    n_hvp_evals: int
    extras: dict
    n_cross_evals: int = 0
    n_outer_grad_evals: int = 1

    def costs(self) -> dict:
        """The step's cost columns (the ``Hypergrad`` convention, ``docs/costs.md``)."""
        return cost_columns(self.n_inner_grad_evals, self.n_hvp_evals, self.n_cross_evals,
                            self.n_outer_grad_evals)


def step_counts(method: str, *, t: int, n_drmad: int = 0) -> dict:
    """One outer step's counts, the same for both backends (``docs/costs.md``):

    * hyperdistill: t inner gradients, one λ-vjp of Φ at w* (a cross product), one outer
      gradient; a θ refit adds n_drmad reverse steps along the DrMAD path (one vjp of Φ
      each: one Hessian-vector and one cross product).
    * t1t2: t inner gradients, one outer gradient, and the finite difference's two
      gradients ∇_λ L_in, which stand in for one cross product: counted as 2 cross.
    * greedy: t inner gradients, t λ-vjps of Φ (cross), t gradients of L_out along the
      window plus one at its end.
    """
    if method == "hyperdistill":
        return dict(n_inner_grad_evals=t, n_hvp_evals=n_drmad, n_cross_evals=1 + n_drmad,
                    n_outer_grad_evals=1)
    if method == "t1t2":
        return dict(n_inner_grad_evals=t, n_hvp_evals=0, n_cross_evals=2,
                    n_outer_grad_evals=1)
    if method == "greedy":
        return dict(n_inner_grad_evals=t, n_hvp_evals=0, n_cross_evals=t,
                    n_outer_grad_evals=t + 1)
    raise ValueError(f"Unknown online method {method!r}. Valid choices: greedy, "
                     "hyperdistill, t1t2")


def make_config(method: str, *, optimizer: str = "adam", outer_lr: float = 0.1,
                **params: Any) -> OnlineConfig:
    """Validate the settings of ``method``; bad values raise ``ValueError`` naming the key."""
    check_choice("online method", method, METHODS)
    check_choice("optimizer", optimizer, OUTER_OPTIMIZERS)
    allowed = {"hyperdistill": ("gamma", "theta0", "theta_every"),
               "t1t2": ("fd_eps",), "greedy": ("gamma",)}[method]
    for key in params:
        if key not in allowed:
            raise ValueError(f"Unknown parameter {key!r} for online method {method!r}. "
                             f"Valid choices: {', '.join(allowed)}")
    lr = _positive("outer_lr", outer_lr)
    config = OnlineConfig(method=method, optimizer=optimizer, outer_lr=lr)
    if "gamma" in params:
        gamma = float(params["gamma"])
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]; got {params['gamma']!r}")
        config = config._replace(gamma=gamma)
    if "theta0" in params:
        theta0 = float(params["theta0"])
        if not math.isfinite(theta0):
            raise ValueError(f"theta0 must be finite; got {params['theta0']!r}")
        config = config._replace(theta0=theta0)
    if "theta_every" in params:
        every = params["theta_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"theta_every must be an integer >= 1; got {every!r}")
        config = config._replace(theta_every=every)
    if "fd_eps" in params:
        config = config._replace(fd_eps=_positive("fd_eps", params["fd_eps"]))
    return config


def _positive(key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number > 0; got {value!r}") from None
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{key} must be a finite number > 0; got {value!r}")
    return out


def check_t_K(t: Any, K: Any) -> tuple[int, int]:
    """t ≥ 1 and K ≥ 0 (None → 0) as integers."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an integer >= 1; got {t!r}")
    K = 0 if K is None else K
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ValueError(f"K must be an integer >= 0; got {K!r}")
    return t, K


def decay_sum(gamma: float, n: int) -> float:
    """Z_n = Σ_{j<n} γ^j = (1 − γⁿ)/(1 − γ) (= n at γ = 1): HyperDistill's and Greedy's
    normalizer."""
    if gamma == 1.0:
        return float(n)
    return (1.0 - gamma ** n) / (1.0 - gamma)
