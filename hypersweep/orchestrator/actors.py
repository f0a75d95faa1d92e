"""The Ray actor that runs cells: a thin, long-lived shell around :func:`cell.run_cell`.

One ``CellRunner`` per resource slot lives for the whole study, so its process keeps the
imported backend, the cached problem instances and the compiled functions between cells
(the driver sends cells with the same ``shape_key`` to the same runner when it can). It
holds no state the driver relies on: Ray may restart it (``max_restarts``) after a crash
and the driver re-sends what was lost.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any

from hypersweep.orchestrator import cell as cell_module

log = logging.getLogger(__name__)

#: JSON ``{"pipeline name": "module:function"}`` merged into ``cell.PIPELINES`` in every
#: runner (plugins and tests; the driver forwards it to the actors' runtime_env).
EXTRA_PIPELINES_ENV = "HYPERSWEEP_EXTRA_PIPELINES"


def register_extra_pipelines() -> dict[str, str]:
    """Merge the pipelines named in ``$HYPERSWEEP_EXTRA_PIPELINES`` into ``cell.PIPELINES``."""
    text = os.environ.get(EXTRA_PIPELINES_ENV)
    if not text:
        return {}
    extra = json.loads(text)
    if not isinstance(extra, dict):
        raise ValueError(f"{EXTRA_PIPELINES_ENV} must be a JSON object "
                         f'{{"name": "module:function"}}; got {text!r}')
    cell_module.PIPELINES.update(extra)
    return extra


class _CellRunner:
    """Runs one cell per call; ``preload`` imports the backends' ops up front so the first
    cell's clock (and its ``cell_timeout_s``) does not include a 1–2 s torch/jax import."""

    def __init__(self, preload: tuple[str, ...] = ()):
        register_extra_pipelines()
        for backend in preload:
            try:
                importlib.import_module(f"hypersweep.problems.{backend}.ops")
            except Exception as exc:  # noqa: BLE001 - the cell will report it properly
                log.warning("preloading backend %r failed: %s", backend, exc)
        self.pid = os.getpid()

    def ping(self) -> int:
        return self.pid

    def run(self, cell: cell_module.Cell, attempt: int) -> tuple[dict, list[dict]]:
        return cell_module.run_cell(cell, attempt)


def actor_options(*, num_cpus: float, num_gpus: float = 0.0, memory_mb: float | None = None,
                  max_restarts: int = 4) -> dict[str, Any]:
    """``.options(...)`` for one runner. ``max_task_retries=0``: the driver retries cells
    itself, so it can count attempts and blame only the cell that was running."""
    env_vars = {}
    if num_gpus > 0:
        # Fractional GPUs are bookkeeping only; JAX would grab 75 % of the device per
        # process otherwise.
        env_vars["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if os.environ.get(EXTRA_PIPELINES_ENV):
        env_vars[EXTRA_PIPELINES_ENV] = os.environ[EXTRA_PIPELINES_ENV]
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus,
                                   max_restarts=max_restarts, max_task_retries=0)
    if memory_mb:
        options["memory"] = int(memory_mb * 2**20)
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    return options


def __getattr__(name: str) -> Any:
    """``CellRunner``, the Ray actor class, built on first use: importing this module
    must not import Ray, whose environment the driver sets first (see ``ray_env``)."""
    if name == "CellRunner":
        import ray

        runner = ray.remote(_CellRunner)
        globals()["CellRunner"] = runner
        return runner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
