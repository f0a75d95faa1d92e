"""GPU placement: the sizing rules (pure), then real Ray actors on a *declared* GPU.

``ray.init(num_gpus=1)`` accepts a GPU that does not exist, so on a CPU-only machine we can
still check what Ray does with ``num_gpus=0.25`` actors: four fit at once and a fifth
waits, each sees ``CUDA_VISIBLE_DEVICES='0'`` and ``XLA_PYTHON_CLIENT_PREALLOCATE=false``,
and a real hypergradient cell (torch and JAX) still reports ``device == "cpu"`` because
neither backend finds a CUDA device behind that id. Freeing one share lets the fifth start, so it
waited for the GPU, not for a slow worker start. On a GPU machine the cells would report
``cuda:0 (...)``; the test asserts "cpu" only when torch sees no CUDA device.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hypersweep.orchestrator.resources import (GPU_SHARING_ENV, RESOURCE_PRECISION,
                                               ActorRequest, actor_options,
                                               actors_per_node, pool_size,
                                               runtime_env_vars, to_units,
                                               without_missing_gpus)

TESTS_DIR = Path(__file__).resolve().parent


# -- Ray's quantity rules ---------------------------------------------------------------


@pytest.mark.parametrize("value, units", [(0, 0), (1, 10_000), (0.25, 2_500),
                                          (0.1, 1_000), (0.0001, 1), (0.3333, 3_333),
                                          (48, 480_000)])
def test_quantities_in_ray_units(value, units):
    assert to_units("num_gpus", value) == units


@pytest.mark.parametrize("value, message", [
    (0.00001, "multiple of 0.0001"),      # Ray: "cannot go beyond 0.0001"
    (1 / 3, "multiple of 0.0001"),        # Ray would silently truncate to 0.3333
    (0.12345, "multiple of 0.0001"),
    (-0.5, ">= 0"), (float("nan"), "finite"), (True, "finite"), ("1", "finite"),
])
def test_quantities_ray_would_reject_or_truncate_are_errors(value, message):
    with pytest.raises(ValueError, match=message):
        to_units("num_gpus", value)
    assert RESOURCE_PRECISION == 1e-4


def test_actor_request_rules():
    assert ActorRequest(num_cpus=0, num_gpus=0.25).uses_gpu
    assert ActorRequest(num_cpus=1, num_gpus=2).units() == {"CPU": 10_000, "GPU": 20_000}
    with pytest.raises(ValueError, match="whole number of GPUs"):
        ActorRequest(num_gpus=1.5)
    with pytest.raises(ValueError, match="both 0"):
        ActorRequest(num_cpus=0, num_gpus=0)
    with pytest.raises(ValueError, match="memory_mb"):
        ActorRequest(memory_mb=-1)


# -- pool sizing ------------------------------------------------------------------------

HEAD = {"CPU": 0.0, "memory": 16e9}                        # cluster.yaml's CPU-0 head
G5_12X = {"CPU": 48.0, "GPU": 4.0, "memory": 150e9}        # 4 GPUs per worker
LAPTOP = {"CPU": 2.0, "memory": 8e9}


@pytest.mark.parametrize("node, request_, expected", [
    (G5_12X, ActorRequest(num_cpus=1, num_gpus=0.25), 16),   # GPU-bound: 4 / 0.25
    (G5_12X, ActorRequest(num_cpus=4, num_gpus=0.25), 12),   # CPU-bound: 48 / 4
    (G5_12X, ActorRequest(num_cpus=0, num_gpus=0.1), 40),    # naive 4/0.1 floors to 39
    (G5_12X, ActorRequest(num_cpus=1, num_gpus=1), 4),
    (HEAD, ActorRequest(num_cpus=1), 0),
    (HEAD, ActorRequest(num_cpus=0, num_gpus=0.25), 0),
    (LAPTOP, ActorRequest(num_cpus=0.5), 4),
    (LAPTOP, ActorRequest(num_cpus=1, num_gpus=0.25), 0),    # no GPU on the laptop
    (LAPTOP, ActorRequest(num_cpus=1, memory_mb=5000), 1),   # memory-bound
])
def test_actors_per_node(node, request_, expected):
    assert actors_per_node(node, request_) == expected


def test_pool_is_summed_per_node_not_from_cluster_totals():
    two_single_gpu_nodes = [HEAD, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    request = ActorRequest(num_cpus=1, num_gpus=0.4)
    # Totals say 2 / 0.4 = 5, but an actor cannot straddle nodes: 2 per node.
    assert pool_size(two_single_gpu_nodes, request) == 4
    cluster = [HEAD, G5_12X, G5_12X]
    assert pool_size(cluster, ActorRequest(num_cpus=1, num_gpus=0.25)) == 32
    assert pool_size(cluster, ActorRequest(num_cpus=1, num_gpus=0.25), n_cells=10) == 10
    assert pool_size(cluster, ActorRequest(num_cpus=1), requested=3) == 3
    # An explicit request may exceed what fits now (an autoscaler adds nodes).
    assert pool_size([HEAD], ActorRequest(num_cpus=0, num_gpus=0.25), requested=8) == 8


def test_pool_that_cannot_fit_one_actor_says_why():
    with pytest.raises(ValueError, match=r"num_gpus=0.25.*GPU 0\b"):
        pool_size([HEAD, LAPTOP], ActorRequest(num_cpus=1, num_gpus=0.25))
    with pytest.raises(ValueError, match="num_actors"):
        pool_size([LAPTOP], ActorRequest(), requested=0)


def test_a_local_cpu_only_machine_runs_a_gpu_study_on_cpus():
    gpu_only = ActorRequest(num_cpus=0, num_gpus=0.25, memory_mb=512)
    request, warning = without_missing_gpus(gpu_only, gpus_available=0)
    assert request == ActorRequest(num_cpus=1, num_gpus=0, memory_mb=512)
    assert "no GPU" in warning and "num_gpus=0.25" in warning
    request, _ = without_missing_gpus(ActorRequest(num_cpus=2, num_gpus=1), 0)
    assert (request.num_cpus, request.num_gpus) == (2, 0)
    assert without_missing_gpus(gpu_only, gpus_available=1) == (gpu_only, None)
    cpu = ActorRequest(num_cpus=1)
    assert without_missing_gpus(cpu, gpus_available=0) == (cpu, None)


def test_gpu_actors_get_the_jax_sharing_env_and_cpu_actors_do_not():
    gpu = ActorRequest(num_cpus=0, num_gpus=0.25)
    assert runtime_env_vars(gpu) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert runtime_env_vars(ActorRequest(num_cpus=1)) == {}
    assert runtime_env_vars(gpu, {"A": "1"}) == {**GPU_SHARING_ENV, "A": "1"}
    options = actor_options(gpu, max_restarts=2)
    assert options == {"num_cpus": 0.0, "num_gpus": 0.25, "max_restarts": 2,
                       "max_task_retries": 0,
                       "runtime_env": {"env_vars": {"XLA_PYTHON_CLIENT_PREALLOCATE":
                                                    "false"}}}
    assert "runtime_env" not in actor_options(ActorRequest(num_cpus=1))
    assert actor_options(ActorRequest(memory_mb=100))["memory"] == 100 * 2**20


def test_driver_actor_options_agree_on_gpu_sharing():
    pytest.importorskip("ray")
    from hypersweep.orchestrator import actors

    theirs = actors.actor_options(ActorRequest(num_cpus=0, num_gpus=0.25))
    env = theirs.get("runtime_env", {}).get("env_vars", {})
    assert env.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false"
    assert theirs["num_gpus"] == 0.25


def test_sizing_module_imports_no_backend_and_no_ray():
    code = ("import sys, hypersweep.orchestrator.resources; "
            "print(sorted(m for m in ('torch', 'jax', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# -- real Ray, declared (fake) GPU ------------------------------------------------------


PROBE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from hypersweep.orchestrator.actors import CellRunner
    from hypersweep.orchestrator.cell import Cell
    from hypersweep.orchestrator.resources import ActorRequest, actor_options

    temp_dir, out_path = sys.argv[1], sys.argv[2]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", _temp_dir=temp_dir)
    try:
        request = ActorRequest(num_cpus=0, num_gpus=0.25)
        extra = {"HYPERSWEEP_PLUGINS": "sweep_test_pipeline"}  # registers env_probe
        options = actor_options(request, max_restarts=0, extra_env=extra)
        actors = [CellRunner.options(**options).remote(()) for _ in range(5)]
        pings = {a.ping.remote(): i for i, a in enumerate(actors)}
        ready, pending = ray.wait(list(pings), num_returns=4, timeout=180)
        _, pending = ray.wait(pending, num_returns=1, timeout=3)  # the 5th still waits
        ready_actors = [actors[pings[r]] for r in ready]
        params = json.dumps({"n_features": 5, "n_train": 20, "n_val": 10})
        cells = [Cell(study="gpu", pipeline="env_probe", problem="ridge",
                      algorithm="aid_cg", backend=backend, t=5, K=3, seed=seed,
                      problem_params=params)
                 for backend in ("torch", "jax") for seed in (0, 1)]
        refs = [a.run.remote(c, 1) for a, c in zip(ready_actors, cells)]
        rows = [row for row, _ in ray.get(refs, timeout=240)]
        # Free one quarter: the waiting actor starts, so it waited for the GPU share.
        ray.kill(ready_actors[0])
        fifth, _ = ray.wait(pending, num_returns=1, timeout=120) if pending else ([], [])
        json.dump({"ready": len(ready), "pending": len(pending),
                   "fifth_started_after_kill": len(fifth) == 1,
                   "resources": ray.cluster_resources(),
                   "rows": [{k: r[k] for k in ("status", "device", "extra", "backend",
                                                  "error_message")} for r in rows]},
                  open(out_path, "w"))
    finally:
        ray.shutdown()
""")


@pytest.mark.ray
@pytest.mark.slow
def test_quarter_gpu_actors_share_one_declared_gpu(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="hs-gpu-")  # short: Ray's socket paths are capped
    out = tmp_path / "probe.json"
    env = dict(os.environ)
    paths = [str(TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, temp_dir, str(out)],
                              env=env, capture_output=True, text=True, timeout=420)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    probe = json.loads(out.read_text())
    assert probe["resources"]["GPU"] == 1.0
    assert (probe["ready"], probe["pending"]) == (4, 1)  # 4 × 0.25 fit, the 5th waits
    assert probe["fifth_started_after_kill"]             # ... for a GPU share
    rows = probe["rows"]
    assert len(rows) == 4 and {r["backend"] for r in rows} == {"torch", "jax"}
    import torch

    for row in rows:
        assert row["status"] == "ok", row["error_message"]
        extra = json.loads(row["extra"])
        assert extra["cuda_visible_devices"] == "0"
        assert extra["gpu_ids"] == ["0"]
        assert extra["xla_preallocate"] == "false"
        if not torch.cuda.is_available():
            assert row["device"] == "cpu"   # the GPU id is a fiction on this machine
    assert len({json.loads(r["extra"])["pid"] for r in rows}) == 4  # four processes
