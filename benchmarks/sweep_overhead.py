"""How much does the orchestrator add to a sweep of small cells?

Runs a study of ``--cells`` synthetic cells (default 1,000 = 100 seeds × 10 values of t)
on a fresh local Ray with ``--num-cpus`` CPUs and one actor per CPU, with Parquet and
MLflow (sqlite) on, and compares the wall time with the floor

    floor = Σ (each cell's own wall_time_s) / number of actors

i.e. what a perfect scheduler with free I/O would take. A cell is ``--cell-ms`` of work:
``busy`` spins the CPU (like a real estimator; contention from the driver shows up as
longer cells), ``sleep`` sleeps (isolates the orchestration cost).

Study mode (``--study configs/grazzi2020.yaml``): the shipped study through the CLI
against the obvious alternative, a one-process Python loop over the same cells through
``hypersweep.algorithms`` (problem built once per instance, JIT once per function, oracle
once per instance; no Ray, no I/O), each in a fresh process, in one run: the loop with
the compilation cache off, ``hypersweep run`` into an empty cache folder (cold), the loop
and ``hypersweep run`` again with that folder filled (warm), each into a fresh output.
Prints the wall times, the CLI/loop ratios, the compile share of the actors' busy time
(Σ compile_time_s ÷ Σ extra.actor_busy_s), cells/s and the MLflow drain share::

    .venv/bin/python benchmarks/sweep_overhead.py --study configs/grazzi2020.yaml --rounds 2

Reports: the sweep time (first cell submitted -> last row in Parquet and MLflow drained)
over the floor, the end-to-end time including Ray start and the actor pool, the time spent
writing Parquet (driver thread) and logging to MLflow (background thread; only its drain
at the end blocks). Example::

    .venv/bin/python benchmarks/sweep_overhead.py --cells 1000 --cell-ms 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from hypersweep.pipelines.catalog import PIPELINES
from hypersweep.registry import PipelineSpec

HERE = Path(__file__).resolve().parent

PIPELINES.register(PipelineSpec(
    name="bench", summary="sweep_overhead's cell: work_ms of spinning or sleeping.",
    run="sweep_overhead:run_busy", algorithm_kinds=("estimator",)))


def run_busy(cell):
    """The benchmark's cell: ``work_ms`` of spinning or sleeping, timed honestly."""
    from hypersweep.orchestrator.cell import PipelineResult

    params = cell.pipeline_kwargs
    seconds = params["work_ms"] / 1000.0
    start = time.perf_counter()
    if params.get("kind", "busy") == "sleep":
        time.sleep(seconds)
    else:
        x = 0
        while time.perf_counter() - start < seconds:
            x += 1
    wall = time.perf_counter() - start
    return PipelineResult(metrics=dict(hypergrad_rel_error=1.0 / cell.t, val_loss=0.1,
                                       wall_time_s=wall), device="cpu")


def loop_study(path: str) -> dict:
    """The one-process loop over a study's cells (``--loop``, run in a fresh process)."""
    start = time.perf_counter()
    from hypersweep import algorithms
    from hypersweep.orchestrator.expand import expand
    from hypersweep.orchestrator.spec import load_study
    from hypersweep.pipelines.common import fixed_lam, oracle, problem_for
    from hypersweep.pipelines.params import HypergradientErrorParams

    study = load_study(path)
    if study.pipeline != "hypergradient_error":
        raise SystemExit(f"--study: the loop runs hypergradient_error studies; "
                         f"{path} is a {study.pipeline!r} study")
    cells = 0
    for cell in expand(study):
        problem = problem_for(cell)
        params = HypergradientErrorParams.parse(cell.pipeline_kwargs,
                                                 prefix="pipeline_params").as_dict()
        lam = fixed_lam(problem, params)
        result = algorithms.get(cell.algorithm, cell.backend)(
            problem, problem.as_lam(lam), t=cell.t, K=cell.K, seed=cell.seed,
            **cell.algorithm_kwargs)
        problem.ops.to_numpy(result.hypergrad)  # waits for the device
        oracle(problem, lam)
        cells += 1
    return {"cells": cells, "seconds": time.perf_counter() - start}


def _timed_process(command: list[str], env: dict) -> float:
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def _cli_stats(output: Path) -> dict:
    from hypersweep.io import parquet

    table = parquet.read_results(output).to_pandas()
    extra = table["extra"].map(lambda e: json.loads(e) if e else {})
    busy = extra.map(lambda e: e.get("actor_busy_s")).dropna().sum()
    compile_s = float(table["compile_time_s"].fillna(0).sum())
    return {"rows": len(table), "ok": int((table["status"] == "ok").sum()),
            "compute_s": float(table["wall_time_s"].sum()), "compile_s": compile_s,
            "busy_s": float(busy), "compile_share": compile_s / busy if busy else None,
            "cache_hits": int(extra.map(lambda e: e.get("compile_cache_hits", 0)).sum()),
            "cache_lookups": int(extra.map(lambda e: e.get("compile_cache_lookups", 0)).sum()),
            "batches": int(extra.map(lambda e: e.get("batch_size", 1)).map(
                lambda n: 1.0 / n).sum().round())}


def study_mode(path: str, rounds: int, workdir: Path) -> list[dict]:
    """Loop vs CLI, cold and warm compilation cache, ``rounds`` times (module docstring)."""
    import shutil

    import yaml

    python = sys.executable
    cli = str(Path(python).with_name("hypersweep"))
    text = Path(path).read_text(encoding="utf-8")
    reports = []
    for r in range(rounds):
        root = workdir / f"round{r}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cache = root / "cache"
        env = {k: v for k, v in os.environ.items() if k != "HYPERSWEEP_PLUGINS"}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"

        def study_copy(name: str) -> str:
            data = yaml.safe_load(text)
            data["output"] = str(root / name)
            data.pop("mlflow", None)
            target = root / f"{name}.yaml"
            target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            return str(target)

        loop = [python, str(Path(__file__).resolve()), "--loop", path]
        times = {"loop_off": _timed_process(loop, {**env, "HYPERSWEEP_CACHE_DIR": "off"})}
        env["HYPERSWEEP_CACHE_DIR"] = str(cache)
        times["cli_cold"] = _timed_process([cli, "run", "--quiet", study_copy("cold")], env)
        times["loop_warm"] = _timed_process(loop, env)
        times["cli_warm"] = _timed_process([cli, "run", "--quiet", study_copy("warm")], env)
        cold, warm = _cli_stats(root / "cold"), _cli_stats(root / "warm")
        report = {
            "round": r, **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "cold_over_loop": round(times["cli_cold"] / times["loop_off"], 3),
            "warm_over_loop": round(times["cli_warm"] / times["loop_off"], 3),
            "warm_over_warm_loop": round(times["cli_warm"] / times["loop_warm"], 3),
            "cold": cold, "warm": warm,
            "cells_per_s_warm": round(warm["rows"] / times["cli_warm"], 1),
            "load_avg_1min": os.getloadavg()[0],
        }
        print(json.dumps(report), flush=True)
        reports.append(report)
    return reports


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=None,
                        help="study mode: this study through the CLI vs a one-process loop")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--loop", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--t-values", type=int, default=10)
    parser.add_argument("--cell-ms", type=float, default=20.0)
    parser.add_argument("--kind", choices=("busy", "sleep"), default="busy")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--output", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    if args.loop:
        print(json.dumps(loop_study(args.loop)))
        return {}
    if args.study:
        workdir = Path(args.output or tempfile.mkdtemp(prefix="hs-study-bench-"))
        return {"rounds": study_mode(args.study, args.rounds, workdir)}

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # This module is its own plugin: imported in the actors, it registers "bench" there too.
    os.environ["HYPERSWEEP_PLUGINS"] = "sweep_overhead"
    sys.path.insert(0, str(HERE))

    import ray

    from hypersweep.io import parquet
    from hypersweep.orchestrator import cell as cell_module
    from hypersweep.orchestrator import driver
    from hypersweep.orchestrator.fields import MlflowConfig, Resources
    from hypersweep.orchestrator.spec import StudySpec
    from hypersweep.registry import load_plugins

    load_plugins()
    output = Path(args.output or tempfile.mkdtemp(prefix="hs-bench-"))
    params = cell_module.canonical_json({"work_ms": args.cell_ms, "kind": args.kind})
    seeds = range(-(-args.cells // args.t_values))
    cells = [cell_module.Cell(study="overhead", pipeline="bench", problem="toy",
                              algorithm="spin", backend="none", t=t, K=None, seed=seed,
                              pipeline_params=params)
             for seed in seeds for t in range(1, args.t_values + 1)][:args.cells]
    # Hand-built cells, so an unvalidated spec (backend=() preloads no backend in the actors).
    study = StudySpec.model_construct(
        study="overhead", pipeline="bench", output=str(output / "out"), backend=(),
        problems=(), algorithms=(), t=(1,), num_actors=None, max_retries=2,
        cell_timeout_s=None,
        resources=Resources.model_construct(num_cpus=1.0, num_gpus=0.0),
        mlflow=MlflowConfig.model_construct(enabled=not args.no_mlflow,
                                            tracking_uri=f"sqlite:///{output / 'mlflow.db'}",
                                            experiment=None))

    start = time.perf_counter()
    if args.num_cpus == os.cpu_count():
        # The real entry point: it starts (and stops) its own Ray, while the MLflow
        # writer connects in the background.
        summary = driver.run_study(study, quiet=True, cells=cells)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        summary = driver.run_cells(study, cells, quiet=True)
        ray.shutdown()
    end_to_end_s = time.perf_counter() - start
    ray_init_s = summary["timings"]["ray_init_s"]

    table = parquet.read_results(output / "out")
    assert table.num_rows == len(cells), table.num_rows
    actors = summary["actors"]
    floor_s = sum(table.column("wall_time_s").to_pylist()) / actors
    timings = summary["timings"]
    # From the first cell submitted to the last row in Parquet and in MLflow.
    sweep_s = timings["cells_s"] + timings["mlflow_drain_wait_s"]
    mlflow = summary.get("mlflow") or {}
    report = {
        "cells": len(cells), "cell_ms": args.cell_ms, "kind": args.kind, "actors": actors,
        "floor_s": floor_s,
        "sweep_s": sweep_s, "sweep_over_floor": sweep_s / floor_s,
        "cells_s": timings["cells_s"], "cells_over_floor": timings["cells_s"] / floor_s,
        "pool_start_s": timings["loop_s"] - timings["cells_s"],
        "end_to_end_s": end_to_end_s, "end_to_end_over_floor": end_to_end_s / floor_s,
        "ray_init_s": ray_init_s,
        "parquet_s": timings["parquet_s"], "parquet_share": timings["parquet_s"] / sweep_s,
        "parquet_files": summary["parquet_files"],
        "mlflow_connect_s": mlflow.get("connect_seconds"),
        "mlflow_logging_s": mlflow.get("seconds"),
        "mlflow_drain_wait_s": timings["mlflow_drain_wait_s"],
        "mlflow_runs": mlflow.get("runs_created"), "mlflow_cells": mlflow.get("cells_logged"),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
