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

The backend-free parts live here once: the state layout (:class:`OnlineState`), the
settings (:func:`make_config`, parameters read from the catalog), ``init``
(:func:`online_method`), the outer optimizers' names and constants, and the counting
convention (:func:`step_counts`); the backends hold only the math of ``step`` and their
``outer_optimizer``. This module imports neither torch nor jax.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.algorithms.common import cost_columns
from hypersweep.algorithms.params import check_algorithm_params
from hypersweep.registry import check_choice
from hypersweep.validation import is_number

OUTER_OPTIMIZERS = ("adam", "sgd")
#: Adam's constants, identical in optax.adam and torch.optim.Adam defaults.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def online_methods() -> tuple[str, ...]:
    """The online methods of the catalog (``kind="online"``), in registration order."""
    return tuple(spec.name for spec in ALGORITHMS if spec.kind == "online")


class OnlineMethod(NamedTuple):
    """An online hyperparameter method as a pair of functions (optax style)."""

    init: Callable[..., Any]
    step: Callable[..., Any]


class OuterOptimizer(NamedTuple):
    """The outer optimizer on λ as a pure pair (each backend builds one by name with
    ``outer_optimizer(name, lr)``): ``init(lam) -> state``;
    ``apply(lam, grad, state) -> (lam, state)``, which never changes its ``state`` in place.
    """

    init: Any
    apply: Any


class OnlineConfig(NamedTuple):
    """Static (hashable) settings of an online run; part of the state, never traced.

    The method's ``params`` (names and defaults: its catalog entry's ``params``, checked
    by its catalog model) are the last fields; a parameter the method does not take is
    None.
    """

    method: str
    optimizer: str
    outer_lr: float
    gamma: float | None = None       # hyperdistill / greedy decay γ
    theta0: float | None = None      # hyperdistill: θ before the first fit
    theta_every: int | None = None   # hyperdistill: refit θ every this many λ updates
    fd_eps: float | None = None      # t1t2: ε = fd_eps / ‖∇_w L_out‖ (DARTS)


class OnlineState(NamedTuple):
    """The carried state of an online run, the same fields in both backends.

    ``w``: current inner iterate; ``lam``: current λ (backend arrays); ``opt_state``: the
    outer optimizer's state; ``n_updates`` / ``n_inner``: λ updates and inner steps so
    far (host ints: HyperDistill's τ and its refit schedule read them); ``w_ema`` (w*_τ),
    ``w_start`` (w_0, start of the DrMAD path) and ``theta`` (a host float): used by
    hyperdistill only (else None); ``config``: static settings.
    """

    w: Any
    lam: Any
    opt_state: Any
    n_updates: int
    n_inner: int
    w_ema: Any
    w_start: Any
    theta: float | None
    config: OnlineConfig


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
    raise ValueError(f"Unknown online method {method!r}. Valid choices: "
                     f"{', '.join(online_methods())}")


def make_config(method: str, *, optimizer: str = "adam", outer_lr: float = 0.1,
                **params: Any) -> OnlineConfig:
    """Validate the settings of ``method``; bad values raise ``ValueError`` naming the key.

    ``params`` are merged over the method's catalog defaults and checked by its catalog
    model (:func:`hypersweep.algorithms.params.check_algorithm_params`: only the catalog's
    keys, each in range), so the catalog is the one list of them; a catalog parameter
    that :class:`OnlineConfig` has no field for fails here too.
    """
    check_choice("online method", method, online_methods())
    check_choice("optimizer", optimizer, OUTER_OPTIMIZERS)
    if not (is_number(outer_lr) and outer_lr > 0):
        raise ValueError(f"outer_lr must be a finite number > 0; got {outer_lr!r}")
    checked = check_algorithm_params(method, params)
    config = OnlineConfig(method=method, optimizer=optimizer, outer_lr=float(outer_lr))
    return config if checked is None else config._replace(**checked.as_dict())


def online_method(method: str, step: Callable[..., Any],
                  outer_optimizer: Callable[[str, float], OuterOptimizer], *,
                  fresh: Callable[[Any], Any] = lambda x: x) -> OnlineMethod:
    """``OnlineMethod(init, step)`` for ``method``, with the one ``init`` of both backends.

    ``init(problem, lam0, *, seed=0, optimizer="adam", outer_lr=0.1, **params)`` checks
    the settings (:func:`make_config`), starts w at ``problem.w_init`` and the outer
    optimizer (the backend's ``outer_optimizer``) at λ₀; hyperdistill also starts its EMA
    point and DrMAD path at w_init and θ at ``theta0``. ``fresh`` copies a backend array
    into the state (torch: a detached clone, so no caller's tensor is aliased; JAX arrays
    are immutable). ``seed`` is unused (every online method is deterministic).
    """
    def init(problem, lam0, *, seed: int = 0, optimizer: str = "adam",
             outer_lr: float = 0.1, **params) -> OnlineState:
        config = make_config(method, optimizer=optimizer, outer_lr=outer_lr, **params)
        lam = fresh(problem.as_lam(lam0))
        w0 = fresh(problem.w_init)
        hd = method == "hyperdistill"
        return OnlineState(
            w=w0, lam=lam,
            opt_state=outer_optimizer(config.optimizer, config.outer_lr).init(lam),
            n_updates=0, n_inner=0,
            w_ema=fresh(w0) if hd else None, w_start=fresh(w0) if hd else None,
            theta=config.theta0 if hd else None, config=config)
    init.__name__ = f"{method}_init"
    return OnlineMethod(init=init, step=step)


def decay_sum(gamma: float, n: int) -> float:
    """Z_n = Σ_{j<n} γ^j = (1 − γⁿ)/(1 − γ) (= n at γ = 1): HyperDistill's and Greedy's
    normalizer."""
    if gamma == 1.0:
        return float(n)
    return (1.0 - gamma ** n) / (1.0 - gamma)
