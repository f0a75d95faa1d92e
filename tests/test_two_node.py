"""A sweep on a real two-node Ray cluster survives losing a node: ``hypersweep run
--address`` joins the cluster, the worker node's raylet is SIGKILLed mid-sweep, and every
cell still ends ``ok`` exactly once in Parquet.

Both nodes run on this host and listen on 127.0.0.1 only. ``ray start`` cannot build that
cluster: a node listens on loopback only when its address is exactly 127.0.0.1, which
needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with that variable ``ray start
--address`` refuses to add a node ("Multi-node Ray clusters are not supported..."); any
other address (127.0.0.2 included) makes the node listen on all interfaces. So a helper
process builds it with ``ray.cluster_utils.Cluster``, Ray's own multi-node-on-one-host
test utility, which starts the same gcs_server/raylet processes without that check.
(Real multi-node clusters: docs/clusters.md.)

Only processes this test started are stopped, by PID: the helper's node processes and
their descendants, never ``ray stop`` or a kill by name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from hypersweep.orchestrator.ray_env import prepare_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]

psutil = pytest.importorskip("psutil")

VENV_BIN = Path(sys.executable).parent

#: Prints one JSON line (the GCS address and the node processes' PIDs), then keeps the
#: cluster up until its stdin closes.
CLUSTER_HELPER = r"""
import json, os, sys
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster

# Cluster() records its address in the default temp dir's address file (/tmp/ray/...)
# whatever temp_dir says, and does not create that folder: a clean /tmp fails without this.
os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)

temp_dir, agent_port = sys.argv[1], int(sys.argv[2])
# Node death is noticed in ~2 s instead of the default ~15-30 s.
fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
        "health_check_failure_threshold": 3}
node = dict(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=temp_dir,
            include_dashboard=False)
cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
    node, dashboard_agent_listen_port=agent_port, _system_config=fast))
worker = cluster.add_node(**node)
cluster.wait_for_nodes()

def pids(n):
    return [p.process.pid for infos in n.all_processes.values() for p in infos]

print(json.dumps({"address": cluster.address, "head": pids(cluster.head_node),
                  "worker": pids(worker),
                  "worker_raylet": worker.all_processes["raylet"][0].process.pid}),
      flush=True)
sys.stdin.read()
cluster.shutdown()
"""

STUDY = """\
study: two-node
pipeline: hypergradient_error
backend: torch
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 20, n_train: 200, n_val: 50}}
  - quadratic
algorithms: [itd, aid_fp, aid_cg]
t: [400, 1600, 6400]
K: [50]
seeds: [0, 1, 2]
resources: {{num_cpus: 1, num_gpus: 0}}
max_retries: 2
cell_timeout_s: 120
# one cell per task, and t up to 6400: batched, or at t ≤ 1600, these 54 cells end before
# the worker node can be killed mid-way (batches losing their runner: test_batching.py)
batching: {{max_cells: 1}}
output: {output}
mlflow: {{enabled: false}}
"""
N_CELLS = 2 * 3 * 3 * 3


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(pids) -> list:
    found = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found[pid] = proc
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_all(procs) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _rows(output: Path) -> int:
    from hypersweep.io.parquet import read_results

    try:
        return read_results(output).num_rows
    except Exception:  # noqa: BLE001 - a part being written; try again
        return 0


def _runner_on(raylet_pid: int) -> bool:
    """Whether a cell runner actor lives on the node of this raylet."""
    for proc in _tree([raylet_pid]):
        try:
            if proc.name().startswith("ray::_CellRunner"):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def test_sweep_survives_losing_the_worker_node(tmp_path):
    from hypersweep.io.parquet import read_results
    import pyarrow.dataset as ds

    temp_dir = tempfile.mkdtemp(prefix="hs-2n-")  # short: socket paths are capped
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "HYPERSWEEP_PLUGINS"):
        env.pop(key, None)
    prepare_local_ray(env)  # the cluster, and the driver that joins it, on loopback
    helper = subprocess.Popen([sys.executable, "-c", CLUSTER_HELPER, temp_dir,
                               str(_free_port())], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "cluster.log",
                                                                  "wb"), text=True)
    info: dict = {}
    run = None
    try:
        info = json.loads(helper.stdout.readline() or "{}")
        assert info, (tmp_path / "cluster.log").read_text()[-3000:]
        output = tmp_path / "out"
        study = tmp_path / "study.yaml"
        study.write_text(STUDY.format(output=output))
        log = open(tmp_path / "run.log", "wb")
        started = time.monotonic()
        run = subprocess.Popen([str(VENV_BIN / "hypersweep"), "run", str(study), "--quiet",
                                "--address", info["address"]], env=env, cwd=tmp_path,
                               stdout=log, stderr=subprocess.STDOUT)
        # Mid-sweep: some rows saved, and a runner actor living on the worker node.
        deadline = started + 120
        while run.poll() is None and time.monotonic() < deadline:
            if _rows(output) >= 4 and _runner_on(info["worker_raylet"]):
                break
            time.sleep(0.2)
        assert run.poll() is None, "the sweep ended before the worker node was killed"
        rows_at_kill = _rows(output)
        assert rows_at_kill < N_CELLS
        os.kill(info["worker_raylet"], signal.SIGKILL)
        rc = run.wait(timeout=max(5.0, deadline + 60 - time.monotonic()))
        log.close()
        text = (tmp_path / "run.log").read_text(errors="replace")
        assert rc == 0, text[-3000:]

        table = read_results(output)
        assert table.num_rows == N_CELLS
        assert set(table.column("status").to_pylist()) == {"ok"}
        raw = ds.dataset(output / "results", format="parquet").to_table(
            columns=["cell_id", "status"])
        counts = Counter(raw.column("cell_id").to_pylist())
        assert len(counts) == N_CELLS
        duplicates = {cell: n for cell, n in counts.items() if n > 1}
        assert not duplicates, duplicates
        assert set(raw.column("status").to_pylist()) == {"ok"}
        print(f"two-node: {N_CELLS} cells ok once each; worker raylet killed at "
              f"{rows_at_kill} saved rows; run took {time.monotonic() - started:.1f} s")
    finally:
        node_pids = info.get("head", []) + info.get("worker", [])
        procs = _tree(node_pids)
        if run is not None and run.poll() is None:
            procs += _tree([run.pid])
        if helper.poll() is None:
            helper.stdin.close()  # a graceful shutdown first
            try:
                helper.wait(20)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait(5)
        _kill_all([p for p in procs if _alive(p)])
        assert not [p for p in _tree(node_pids) if _alive(p)], "node processes left"
