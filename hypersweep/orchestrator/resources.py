"""How many cell runners a cluster holds, and what each one asks Ray for.

Pure functions over plain dicts: no Ray, torch or jax import, so the sizing rules are
unit-tested on any machine and the driver only feeds them ``ray.nodes()``.

Ray's rules, mirrored here so a bad study fails before any actor is created:

* quantities are kept in units of 1e-4 (``ray._raylet.RESOURCE_UNIT_SCALING``); a
  non-zero request below one unit is rejected and finer digits are cut off silently,
  so we reject any value that is not a whole number of units;
* a GPU is a unit-instance resource: a request is a fraction of *one* GPU (0.25 puts four
  actors on a device) or a whole number of GPUs, never 1.5;
* an actor lives on one node, so the pool is the sum over nodes of how many actors fit
  on each, not the cluster total divided by the per-actor request.

Fractional GPUs are bookkeeping only: Ray does not split device memory. JAX preallocates
75 % of a GPU per process unless told otherwise, so every GPU actor gets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` in its ``runtime_env``; torch allocates lazily.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from hypersweep.orchestrator.spec import StudySpec

#: Ray keeps resource quantities as integers in units of 1e-4.
RESOURCE_UNITS_PER_ONE = 10_000
RESOURCE_PRECISION = 1.0 / RESOURCE_UNITS_PER_ONE

#: What a JAX process sharing a GPU must not do: grab 75 % of its memory at start-up.
GPU_SHARING_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def to_units(name: str, value: Any) -> int:
    """``value`` in Ray's 1e-4 units; ``ValueError`` if Ray would reject or truncate it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    units = round(value * RESOURCE_UNITS_PER_ONE)
    # Slack of 1e-6 units: 0.1 * 10_000 is 1000.0000000000001 in binary floating point.
    if abs(value * RESOURCE_UNITS_PER_ONE - units) > 1e-6 * max(1.0, abs(units)):
        raise ValueError(f"{name} must be a multiple of {RESOURCE_PRECISION:g} (Ray's "
                         f"resource precision), got {value!r}")
    return int(units)


@dataclass(frozen=True)
class ActorRequest:
    """What one cell runner reserves. ``num_gpus`` < 1 shares a GPU between actors."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: float | None = None

    def __post_init__(self):
        cpu = to_units("num_cpus", self.num_cpus)
        gpu = to_units("num_gpus", self.num_gpus)
        if gpu > RESOURCE_UNITS_PER_ONE and gpu % RESOURCE_UNITS_PER_ONE:
            raise ValueError(f"num_gpus above 1 must be a whole number of GPUs (a GPU is "
                             f"shared by fractions of one device), got {self.num_gpus!r}")
        if cpu == 0 and gpu == 0:
            raise ValueError("num_cpus and num_gpus are both 0: an actor needs a CPU or a "
                             "GPU share (e.g. num_cpus: 1, or num_cpus: 0 with num_gpus: "
                             "0.25)")
        if self.memory_mb is not None and not (
                isinstance(self.memory_mb, (int, float)) and self.memory_mb > 0
                and math.isfinite(self.memory_mb)):
            raise ValueError(f"memory_mb must be a number > 0 or None, got "
                             f"{self.memory_mb!r}")

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0

    def units(self) -> dict[str, int]:
        """The request as Ray node-resource names -> 1e-4 units (only non-zero entries)."""
        out = {"CPU": to_units("num_cpus", self.num_cpus),
               "GPU": to_units("num_gpus", self.num_gpus)}
        if self.memory_mb is not None:
            out["memory"] = int(self.memory_mb * 2**20) * RESOURCE_UNITS_PER_ONE
        return {k: v for k, v in out.items() if v > 0}


def actors_per_node(node_resources: Mapping[str, float], request: ActorRequest) -> int:
    """How many actors of ``request`` fit at once on one node with ``node_resources``
    (Ray's ``{"CPU": 8.0, "GPU": 1.0, "memory": bytes, ...}``). Cost: O(resources)."""
    fits = None
    for name, needed in request.units().items():
        have = node_resources.get(name, 0.0) or 0.0
        if name == "memory":
            have_units = int(have) * RESOURCE_UNITS_PER_ONE
        else:
            have_units = int(round(float(have) * RESOURCE_UNITS_PER_ONE))
        count = have_units // needed
        fits = count if fits is None else min(fits, count)
    return int(fits or 0)


def pool_size(nodes: Iterable[Mapping[str, float]], request: ActorRequest, *,
              requested: int | None = None, n_cells: int | None = None) -> int:
    """The number of cell runners to create.

    ``nodes``: each alive node's total resources (``[n["Resources"] for n in ray.nodes()
    if n["Alive"]]``). The pool is Σ_nodes actors_per_node, capped by ``requested`` (the
    study's ``num_actors``) and by ``n_cells`` (no idle runners). An explicit
    ``requested`` larger than what fits is allowed: Ray queues the extra actors, and an
    autoscaling cluster adds nodes for them. Raises ``ValueError`` when nothing fits and
    nothing was requested, naming what the request needs and what the cluster has.
    """
    nodes = list(nodes)
    fit = sum(actors_per_node(node, request) for node in nodes)
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"num_actors must be an integer >= 1 or None, got "
                             f"{requested!r}")
        size = requested
    elif fit == 0:
        totals: dict[str, float] = {}
        for node in nodes:
            for name in ("CPU", "GPU"):
                totals[name] = totals.get(name, 0.0) + float(node.get(name, 0.0) or 0.0)
        raise ValueError(
            f"no node can host one actor with num_cpus={request.num_cpus:g}, "
            f"num_gpus={request.num_gpus:g}"
            + (f", memory_mb={request.memory_mb:g}" if request.memory_mb else "")
            + f" (cluster: {len(nodes)} node(s), CPU {totals.get('CPU', 0):g}, "
            f"GPU {totals.get('GPU', 0):g}). Lower resources in the study, or set "
            "num_actors to queue actors for an autoscaling cluster")
    else:
        size = fit
    if n_cells is not None:
        size = min(size, max(1, int(n_cells)))
    return size


def without_missing_gpus(request: ActorRequest, gpus_available: float) -> tuple[
        ActorRequest, str | None]:
    """The request a *local* run can satisfy: GPU shares dropped when the machine has none.

    For the embedded Ray the driver starts itself (``hypersweep run`` on a laptop), so a
    study written for a GPU cluster runs unchanged on a CPU-only machine; the cells then
    report ``device = cpu``. Returns (request, warning or None). Do not use it when joining
    a cluster: an autoscaler adds GPU nodes for pending GPU actors. An actor that asked
    for no CPU (``num_cpus: 0``, GPU only) gets one CPU instead of its GPU share.
    """
    if not request.uses_gpu or gpus_available > 0:
        return request, None
    fallback = ActorRequest(num_cpus=request.num_cpus or 1.0, num_gpus=0.0,
                            memory_mb=request.memory_mb)
    return fallback, (f"this machine has no GPU: running actors with num_cpus="
                      f"{fallback.num_cpus:g} instead of num_gpus={request.num_gpus:g}")


def runtime_env_vars(request: ActorRequest,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a runner's ``runtime_env``: the GPU-sharing settings when
    it holds a GPU share, plus ``extra`` (which wins on conflicts)."""
    env = dict(GPU_SHARING_ENV) if request.uses_gpu else {}
    env.update(extra or {})
    return env


def actor_options(request: ActorRequest, *, max_restarts: int = 4,
                  extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``CellRunner.options(...)``: resources, restarts, env vars.

    ``max_task_retries=0``: the driver re-sends a lost cell itself, so it can count
    attempts and blame only the cell that was running.
    """
    options: dict[str, Any] = dict(num_cpus=float(request.num_cpus),
                                   num_gpus=float(request.num_gpus),
                                   max_restarts=int(max_restarts), max_task_retries=0)
    if request.memory_mb:
        options["memory"] = int(request.memory_mb * 2**20)
    env = runtime_env_vars(request, extra_env)
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def study_request(study: "StudySpec") -> ActorRequest:
    """What each of the study's runners asks Ray for."""
    res = study.resources
    return ActorRequest(num_cpus=float(res.num_cpus), num_gpus=float(res.num_gpus or 0.0),
                        memory_mb=res.memory_mb)


def study_pool_size(study: "StudySpec", cluster: dict | list, n_cells: int | None = None
                    ) -> int:
    """``num_actors``, else how many actors of the study's request fit on the nodes.

    ``cluster``: a list of alive nodes' resources (counted per node, so two 1-GPU nodes
    with num_gpus 0.4 give 4 actors, not 5), or one totals dict (a single node).
    At least one actor when nothing fits on a single local node.
    """
    nodes = cluster if isinstance(cluster, list) else [cluster]
    try:
        return pool_size(nodes, study_request(study), requested=study.num_actors,
                         n_cells=n_cells)
    except ValueError:
        return 1


__all__ = ["ActorRequest", "actors_per_node", "pool_size", "without_missing_gpus",
           "runtime_env_vars",
           "actor_options", "to_units", "RESOURCE_PRECISION", "GPU_SHARING_ENV"]
