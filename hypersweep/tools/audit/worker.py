"""The audit's fresh process: ``python -m hypersweep.tools.audit.worker`` reads cells as
JSON on stdin, re-runs each (and rebuilds its oracle when asked) and answers JSON on
stdout; :func:`run_worker` starts it with the environment of a study actor.

Nothing is shared with the sweep that stored the rows: no pipeline cache, no compiled
function, a problem built from scratch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from hypersweep.tools.audit.checks import (
    FD_FLOOR,
    FD_NOISE,
    FD_RTOL,
    FD_STEP,
    AuditError,
)


def run_worker(tasks: list[dict], *, gpu: bool, threads: int) -> list[dict]:
    """Run ``tasks`` in one fresh ``python -m hypersweep.tools.audit.worker`` with the
    environment of a study actor: ``OMP_NUM_THREADS`` as Ray sets it, the actors'
    ``runtime_env`` variables, and no visible GPU for cells that ran on the CPU (Ray hides
    GPUs from actors without ``num_gpus``)."""
    from hypersweep.orchestrator.actors import actor_options
    from hypersweep.orchestrator.resources import ActorRequest

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # Ray, too, keeps a value already set
    options = actor_options(ActorRequest(num_cpus=threads, num_gpus=1.0 if gpu else 0.0))
    env.update(options.get("runtime_env", {}).get("env_vars", {}))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "hypersweep.tools.audit.worker"],
                          input=json.dumps({"tasks": tasks}), capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise AuditError(f"the audit worker exited with status {proc.returncode}: {tail}")
    try:
        answers = json.loads(proc.stdout)
    except ValueError:
        raise AuditError("the audit worker answered something that is not JSON") from None
    if len(answers) != len(tasks):
        raise AuditError(f"the audit worker answered {len(answers)} of {len(tasks)} cells")
    return answers


def fresh_oracle(cell, *, fd_seed: int | None = None) -> dict:
    """∇F(λ) from a problem built from scratch, the abs error of a direct estimator call
    against it, and (``fd_seed`` given) central differences of F along a random u."""
    import numpy as np

    from hypersweep import algorithms, problems
    from hypersweep.pipelines.common import fixed_lam

    problem = problems.make(cell.problem, backend=cell.backend, seed=cell.seed,
                            dtype=cell.dtype, **cell.problem_kwargs)
    lam = fixed_lam(problem, cell.pipeline_kwargs)
    g_star = problem.exact_hypergradient(lam)
    estimator = algorithms.get(cell.algorithm, cell.backend)
    estimate = estimator(problem, problem.as_lam(lam), t=cell.t, K=cell.K, seed=cell.seed,
                         **cell.algorithm_kwargs)
    g = problem.ops.to_numpy(estimate.hypergrad)
    out = {"exact_hypergrad_norm": float(np.linalg.norm(g_star)),
           "hypergrad_abs_error": float(np.linalg.norm(g - g_star))}
    if fd_seed is not None:
        out.update(finite_difference(problem, lam, g_star, seed=fd_seed))
    return out


def direction(shape: tuple, seed: int):
    """The random unit direction u of the finite-difference check (float64, λ's shape)."""
    import numpy as np

    u = np.random.default_rng(seed).standard_normal(shape)
    return u / np.linalg.norm(u)


def finite_difference(problem, lam, g_star, *, seed: int) -> dict:
    """∇F·u, the central difference (F(λ+hu) − F(λ−hu))/2h along a random unit u (float64,
    h = FD_STEP·max(1, ‖λ‖)), and the tolerance their gap must stay within."""
    import numpy as np

    lam = np.asarray(lam, dtype=np.float64)
    u = direction(lam.shape, seed)
    h = FD_STEP * max(1.0, float(np.linalg.norm(lam)))
    f_plus, f_minus = problem.value(lam + h * u), problem.value(lam - h * u)
    directional = float(np.sum(np.asarray(g_star) * u))
    scale = max(abs(directional), FD_FLOOR * float(np.linalg.norm(g_star)))
    noise = FD_NOISE * np.finfo(np.float64).eps * max(abs(f_plus), abs(f_minus)) / h
    return {"directional": directional, "finite_difference": (f_plus - f_minus) / (2 * h),
            "fd_tolerance": FD_RTOL * scale + noise}


def _work(task: dict) -> dict:
    from hypersweep.orchestrator.cell import Cell, run_cell

    cell = Cell(**task["cell"])
    row, _ = run_cell(cell)
    answer: dict[str, Any] = {"cell_id": cell.cell_id, "row": {
        k: v for k, v in row.items() if k not in ("started_at", "finished_at")}}
    if task.get("oracle"):
        try:
            answer["oracle"] = fresh_oracle(cell, fd_seed=task.get("fd_seed"))
        except Exception as exc:  # noqa: BLE001 - reported as a failed oracle check
            answer["oracle_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return answer


def worker_main() -> int:
    """The fresh process: cells on stdin, answers on stdout (nothing else reaches it)."""
    answer_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter, C level included, goes to stderr
    sys.stdout = sys.stderr
    request = json.load(sys.stdin)
    from hypersweep.registry import load_plugins

    load_plugins()
    if any(task["cell"].get("backend") == "torch" for task in request["tasks"]):
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    answers = [_work(task) for task in request["tasks"]]
    json.dump(answers, answer_stream, default=str)
    answer_stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
