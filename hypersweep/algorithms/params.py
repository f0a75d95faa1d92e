"""The schemas of algorithm ``params``: one pydantic model per algorithm that has any.

The catalog names each model (``AlgorithmSpec.params_model``) and holds the defaults:
these models have no defaults of their own, they validate the catalog's ``params`` merged
with the study's values, so the catalog stays the one place defaults live (a test checks
that each model has exactly the catalog's keys). Imports neither torch nor jax.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

from hypersweep.algorithms.catalog import ALGORITHMS
from hypersweep.registry import load_object
from hypersweep.validation import Params, field, integer, number, one_of


class StocbioParams(Params):
    owner: ClassVar[str] = "algorithm 'stocbio'"
    batch_size: field(integer(1))
    neumann_lr: field(number(above=0, nullable=True))


class HyperdistillParams(Params):
    owner: ClassVar[str] = "algorithm 'hyperdistill'"
    gamma: field(number(low=0, high=1))
    theta0: field(number())
    theta_every: field(integer(1))


class T1t2Params(Params):
    owner: ClassVar[str] = "algorithm 't1t2'"
    fd_eps: field(number(above=0))


class GreedyParams(Params):
    owner: ClassVar[str] = "algorithm 'greedy'"
    gamma: field(number(low=0, high=1))


class GridParams(Params):
    owner: ClassVar[str] = "algorithm 'grid'"
    grid_points: field(integer(2, nullable=True))


class TpeParams(Params):
    owner: ClassVar[str] = "algorithm 'tpe'"
    n_startup_trials: field(integer(0))


class HyperoptParams(Params):
    owner: ClassVar[str] = "algorithm 'hyperopt'"
    n_initial_points: field(integer(0))


class AshaParams(Params):
    owner: ClassVar[str] = "algorithm 'asha'"
    grace_period: field(integer(1, nullable=True))
    reduction_factor: field(number(above=1))
    workers: field(integer(1))
    report_every: field(integer(1, nullable=True))

    def study_issues(self, *, prefix: str, t_values: Iterable[int]) -> list[str]:
        """A rung below the first report, or past t, never fills: grace_period ≤ every t."""
        too_short = [t for t in t_values if self.grace_period is not None
                     and self.grace_period > t]
        if too_short:
            return [(f"{prefix}.grace_period must be <= every t of the study (it counts "
                     f"inner steps per trial), got {self.grace_period} > t={min(too_short)}")]
        return []


# --- bilevel solvers (kind="solver"): every hyperparameter, defaults in the catalog ---
class SolverParams(Params):
    """The settings every stochastic solver shares: α = ``step_size`` (null: the
    problem's η = 1/L), β = α / ``outer_ratio``, rows per minibatch (a batch larger than a
    split is clamped to the split: the deterministic limit), and how minibatches are drawn
    (``sampling``: ``replacement``, i.i.d. rows; ``blocks``, contiguous blocks in a fresh
    random order each epoch, benchmark_bilevel's sampler — see
    :class:`~hypersweep.algorithms.solvers_common.Sampler`)."""

    owner: ClassVar[str] = "solver"
    step_size: field(number(above=0, nullable=True))
    outer_ratio: field(number(above=0))
    batch_size: field(integer(1))
    sampling: field(one_of(("replacement", "blocks")))


class SobaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'soba'"


class SabaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'saba'"


class SrbaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'srba'"
    period: field(integer(1, nullable=True))


class FslaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'fsla'"
    momentum: field(number(low=0, high=1))


class MrboParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'mrbo'"
    momentum: field(number(low=0, high=1))
    n_hia_steps: field(integer(1))
    decay_offset: field(number(above=0, nullable=True))


class SustainParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'sustain'"
    momentum: field(number(low=0, high=1))
    n_hia_steps: field(integer(1))
    decay_offset: field(number(above=0, nullable=True))


class TtsaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'ttsa'"
    n_hia_steps: field(integer(1))
    decay_offset: field(number(above=0, nullable=True))


class MaSobaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'ma_soba'"
    averaging: field(number(above=0, high=1))


class StocbioSolverParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'stocbio_solver'"
    n_inner_steps: field(integer(1))
    n_neumann_steps: field(integer(0))


class BsaParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'bsa'"
    n_inner_steps: field(integer(1))
    n_hia_steps: field(integer(1))
    decay_exponent: field(number(low=0, high=1))


class AmigoParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'amigo'"
    n_inner_steps: field(integer(1))
    n_adjoint_steps: field(integer(1))


class VrboParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'vrbo'"
    n_inner_steps: field(integer(1))
    n_neumann_steps: field(integer(0))
    period: field(integer(1, nullable=True))


class HoagParams(Params):
    owner: ClassVar[str] = "algorithm 'hoag'"
    step_size: field(number(above=0, nullable=True))
    outer_ratio: field(number(above=0))
    tol0: field(number(above=0))
    tol_decay: field(number(above=0, high=1))
    max_inner_steps: field(integer(1))
    max_cg_steps: field(integer(1))


class F2saParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'f2sa'"
    n_inner_steps: field(integer(1))
    multiplier0: field(number(above=0))
    multiplier_growth: field(number(low=0))


class BomeParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'bome'"
    n_inner_steps: field(integer(1))
    bome_eta: field(number(above=0))


class PzoboParams(SolverParams):
    owner: ClassVar[str] = "algorithm 'pzobo'"
    n_inner_steps: field(integer(1))
    n_directions: field(integer(1))
    smoothing: field(number(above=0))


def check_algorithm_params(name: str, params: Mapping[str, Any] | None, *,
                           prefix: str = "params") -> Params | None:
    """The algorithm's catalog defaults merged with ``params``, validated by its model
    (None for an algorithm without one); issues are named ``<prefix>.<key>``."""
    spec = ALGORITHMS.spec(name)
    if spec.params_model is None:
        return None
    model = load_object(spec.params_model)
    return model.parse({**spec.params, **(params or {})}, prefix=prefix)
