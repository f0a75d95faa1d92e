"""A plugin of test-only pipelines: ``sweep_test``, the driver's tests' pipeline, whose
behaviour is chosen per seed by pipeline_params, its batched twin ``sweep_test_batch``
(tests/test_batching.py), and ``env_probe``, a hypergradient_error cell that also reports
what its actor saw (tests/test_gpu_placement.py).

Registered at import: tests/conftest.py names this module in ``$HYPERSWEEP_PLUGINS``, so
the test process and every actor (whose runtime_env carries the variable) import it
through :func:`hypersweep.registry.load_plugins`; never in production. :func:`study` is
the :class:`~hypersweep.orchestrator.spec.StudySpec` the driver tests run these cells
under. Keys of ``sweep_test``'s ``pipeline_params`` (all optional):

``sleep_s``            seconds every cell sleeps (default 0)
``raise_seeds``        seeds whose cell raises RuntimeError          -> "error"
``nan_seeds``          seeds whose metrics are NaN                   -> "diverged"
``crash_seeds``        seeds whose cell kills its own process        -> retried, "crashed"
``crash_once_seeds``   as above but only on the first attempt (a marker file in
                       ``marker_dir`` remembers it)                  -> "ok" on attempt 2
``hang_seeds``         seeds whose cell sleeps ``hang_s`` (default 120) -> "timeout"
``done_dir``           a file named after the cell_id is created there when a cell ends
``run_log``            a file that gets a line per cell started: its seed
``hog_seeds``          seeds whose cell allocates (and touches) ``hog_step_mb`` (default 50)
                       every ``hog_every_s`` (default 0.01) up to ``hog_max_mb`` (default
                       2000), then sleeps ``hang_s``; the RSS after each step goes to
                       ``hog_log`` if set        -> "crashed" (memory) under memory_mb

``sweep_test_batch`` runs the same cells (``run`` for one cell) and has a ``run_batch``
that runs them in order with every behaviour above per seed (a cell that raises is
yielded as its exception), plus these keys:

``batch_at_end``       compute every cell, then yield them all (like one vmapped call)
``batch_raise_after``  ``run_batch`` raises after yielding this many cells
``batch_skip_seeds``   seeds ``run_batch`` never yields
``batch_repeat``       yield every cell twice
``batch_no_wall``      leave ``wall_time_s`` out of the metrics
``batch_pause_s``      seconds between one cell's yield and the next cell's start
``batch_log``          a file that gets one line per ``run_batch`` call: pid, cell count
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from hypersweep.orchestrator.cell import PipelineResult
from hypersweep.orchestrator.fields import MlflowConfig, Resources
from hypersweep.orchestrator.spec import StudySpec
from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.registry import ALGORITHM_KINDS, PipelineSpec

PIPELINES.register(PipelineSpec(
    name="sweep_test",
    summary="Test-only: sleeps, raises, diverges, crashes, hangs or hogs memory per seed.",
    run="sweep_test_pipeline:run",
    algorithm_kinds=ALGORITHM_KINDS,
))
PIPELINES.register(PipelineSpec(
    name="sweep_test_batch",
    summary="Test-only: sweep_test's cells, several per task (run_batch).",
    run="sweep_test_pipeline:run",
    run_batch="sweep_test_pipeline:run_batch",
    cost="sweep_test_pipeline:batch_cost",
    algorithm_kinds=ALGORITHM_KINDS,
))
PIPELINES.register(PipelineSpec(
    name="env_probe",
    summary="Test-only: a hypergradient_error cell plus the actor's GPU environment.",
    run="sweep_test_pipeline:env_probe",
    algorithm_kinds=("estimator",),
))


def study(output, *, name: str = "sweep", backend: tuple = (), resources: dict | None = None,
          mlflow: dict | None = None, **fields) -> StudySpec:
    """A StudySpec for hand-built cells, unvalidated (``backend=()`` preloads no backend
    in the runners, which a validated study cannot say). Defaults: one CPU per actor,
    ``max_retries`` 1, no cell timeout, MLflow off."""
    values = dict(study=name, pipeline="sweep_test", output=str(output), backend=backend,
                  problems=(), algorithms=(), t=(1,), max_retries=1, cell_timeout_s=None,
                  resources=Resources.model_construct(**{"num_cpus": 1.0, "num_gpus": 0.0,
                                                         **(resources or {})}),
                  mlflow=MlflowConfig.model_construct(**{"enabled": False, **(mlflow or {})}))
    values.update(fields)
    return StudySpec.model_construct(**values)


def ridge_study_yaml(name: str, *, output, algorithms: str = "[itd]", t: str = "[2]",
                     seeds: int = 1, more: str = "mlflow: {enabled: false}") -> str:
    """A tiny real study (ridge with 3 features, jax, float64) for tests that drive the CLI;
    ``more`` is appended as YAML lines (resources, K, mlflow)."""
    return (f"study: {name}\npipeline: hypergradient_error\nbackend: [jax]\ndtype: float64\n"
            f"problems:\n  - name: ridge\n    params: {{n_features: 3, n_train: 10, n_val: 5}}\n"
            f"algorithms: {algorithms}\nt: {t}\nseeds: {seeds}\noutput: {output}\n{more}\n")


def expected_rel_error(t: int, K, seed: int) -> float:
    """The deterministic "error" a healthy cell reports (tests compare against it)."""
    return (1.0 + seed) / (t * (1 + (K or 0)))


def _hog(params: dict) -> None:
    import psutil

    step = int(params.get("hog_step_mb", 50)) * 2**20
    held, process = [], psutil.Process()
    log = Path(params["hog_log"]) if params.get("hog_log") else None
    while len(held) * step < int(params.get("hog_max_mb", 2000)) * 2**20:
        held.append(bytearray(b"\x01") * step)  # filled, so every page is resident
        if log is not None:
            with log.open("a") as handle:
                handle.write(f"{process.memory_info().rss}\n")
        time.sleep(params.get("hog_every_s", 0.01))
    time.sleep(params.get("hang_s", 120))


def run(cell) -> PipelineResult:
    params = cell.pipeline_kwargs
    seed = cell.seed
    if params.get("run_log"):
        with open(params["run_log"], "a") as handle:
            handle.write(f"{seed}\n")
    if seed in params.get("crash_seeds", ()):
        os._exit(13)
    if seed in params.get("crash_once_seeds", ()):
        marker = Path(params["marker_dir"]) / f"{cell.cell_id}.crashed"
        if not marker.exists():
            marker.touch()
            os._exit(13)
    if seed in params.get("raise_seeds", ()):
        raise RuntimeError(f"injected failure for seed {seed}")
    if seed in params.get("hog_seeds", ()):
        _hog(params)
    if seed in params.get("hang_seeds", ()):
        time.sleep(params.get("hang_s", 120))
    start = time.perf_counter()
    if params.get("sleep_s"):
        time.sleep(params["sleep_s"])
    rel = float("nan") if seed in params.get("nan_seeds", ()) else \
        expected_rel_error(cell.t, cell.K, seed)
    metrics = dict(hypergrad_rel_error=rel, val_loss=0.5 * rel,
                   wall_time_s=time.perf_counter() - start, pid=os.getpid())
    if params.get("done_dir"):
        Path(params["done_dir"], cell.cell_id).touch()
    return PipelineResult(metrics=metrics, device="cpu")


def batch_cost(cell) -> float:
    """``sweep_test_batch``'s cost of a cell: t (its K is free)."""
    return float(cell.t)


def run_batch(cells):
    """``sweep_test_batch``: :func:`run` per cell, in order; see the module docstring."""
    params = cells[0].pipeline_kwargs
    if params.get("batch_log"):
        with open(params["batch_log"], "a") as handle:
            handle.write(f"{os.getpid()} {len(cells)}\n")
    held = []
    for index, cell in enumerate(cells):
        if index:
            time.sleep(params.get("batch_pause_s", 0))
        if index == params.get("batch_raise_after"):
            raise RuntimeError("injected run_batch failure")
        try:
            result = run(cell)
        except Exception as exc:  # noqa: BLE001 - this cell's error, not the batch's
            result = exc
        if params.get("batch_no_wall") and not isinstance(result, Exception):
            result.metrics.pop("wall_time_s")
        if cell.seed in params.get("batch_skip_seeds", ()):
            continue
        for _ in range(2 if params.get("batch_repeat") else 1):
            if params.get("batch_at_end"):
                held.append((cell, result))
            else:
                yield cell, result
    yield from held


def env_probe(cell) -> PipelineResult:
    """The real hypergradient_error cell plus what the actor saw (GPU ids, env vars)."""
    import ray

    from hypersweep.pipelines import hypergradient_error

    result = hypergradient_error.run(cell)
    result.metrics.update(
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        xla_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        gpu_ids=[str(i) for i in ray.get_gpu_ids()], pid=os.getpid())
    return result
