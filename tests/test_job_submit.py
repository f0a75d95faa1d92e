"""``ray job submit ... -- hypersweep run study.yaml --address auto`` end to end.

Starts a real Ray head of its own (``ray start --head`` with every port picked free, a
private ``--temp-dir``, loopback only), submits a tiny study with the documented command
from the repository root (``--working-dir .``, so ``.rayignore`` applies), polls the job
with ``JobSubmissionClient`` until it ends (bounded), then checks the Parquet rows and the
MLflow runs the job's driver wrote. The study's ``output`` and MLflow sqlite URI are
absolute paths outside the working dir: the job runs in a temporary copy of it.

Teardown stops only this head: the processes whose command line names its temp dir, and
their descendants (workers rename themselves ``ray::...``), by PID. Never ``ray stop``,
which kills every Ray process on the machine.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _head_processes(temp_dir: str):
    """This head's daemons (their arguments name temp_dir) and all their descendants."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_head(temp_dir: str) -> None:
    import psutil

    for attempt in range(3):
        procs = _head_processes(temp_dir)
        if not procs:
            return
        for proc in procs:
            try:
                proc.terminate() if attempt == 0 else proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)


class Head:
    """A private Ray head started with ``ray start`` from this virtualenv."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="hs-job-")  # short: socket paths are capped
        (self.gcs, self.dashboard, self.client, self.agent_listen, self.agent_grpc,
         self.metrics, self.runtime_env_agent, self.node_manager,
         self.object_manager) = _free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.env = dict(os.environ)
        # As in an activated virtualenv: the job's entrypoint finds `hypersweep` on PATH.
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
        for key in ("RAY_ADDRESS", "HYPERSWEEP_PLUGINS", "MLFLOW_TRACKING_URI"):
            self.env.pop(key, None)

    def start(self, timeout: float = 180.0) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(self.gcs),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard),
               "--num-cpus", "2", "--temp-dir", self.temp_dir,
               "--ray-client-server-port", str(self.client),
               "--dashboard-agent-listen-port", str(self.agent_listen),
               "--dashboard-agent-grpc-port", str(self.agent_grpc),
               "--metrics-export-port", str(self.metrics),
               "--runtime-env-agent-port", str(self.runtime_env_agent),
               "--node-manager-port", str(self.node_manager),
               "--object-manager-port", str(self.object_manager),
               "--disable-usage-stats"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=3) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1.0)
        raise AssertionError(f"dashboard at {self.address} did not answer in {timeout} s")

    def stop(self) -> None:
        _stop_head(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head():
    started = Head()
    try:
        started.start()
        yield started
    finally:
        started.stop()
        assert not _head_processes(started.temp_dir), "head processes left running"


TINY_STUDY = """\
study: job-submit-smoke
pipeline: hypergradient_error
backend: [torch]
dtype: float64
problems:
  - name: ridge
    params: {{n_features: 5, n_train: 20, n_val: 10}}
algorithms: [itd, aid_cg]
t: [5]
K: [3]
seeds: [0, 1]
resources: {{num_cpus: 1, num_gpus: 0}}
cell_timeout_s: 120
output: {output}
mlflow: {{tracking_uri: "{tracking_uri}", enabled: true}}
"""


def test_ray_job_submit_runs_a_study_on_its_own_head(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    output = tmp_path / "out"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tmp_path / "study.yaml"
    study.write_text(TINY_STUDY.format(output=output, tracking_uri=tracking_uri))
    submission_id = f"hs-smoke-{uuid.uuid4().hex[:8]}"

    # The documented command, from the repository root.
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--no-wait",
         "--submission-id", submission_id, "--working-dir", ".", "--",
         "hypersweep", "run", str(study), "--address", "auto"],
        cwd=REPO_ROOT, env=head.env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    client = JobSubmissionClient(head.address)
    deadline = time.monotonic() + 420
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status in TERMINAL:
            break
        time.sleep(2.0)
    logs = client.get_job_logs(submission_id)
    assert status == "SUCCEEDED", f"job ended {status}: {logs[-4000:]}"

    from hypersweep.io import parquet, tracking

    table = parquet.read_results(output)
    assert table.num_rows == 4
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("device").to_pylist()) == {"cpu"}
    errors = table.column("hypergrad_rel_error").to_pylist()
    assert all(0 <= e < 1 for e in errors)

    import mlflow

    client_ml = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client_ml.get_experiment_by_name("job-submit-smoke")
    assert experiment is not None
    runs = client_ml.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags.get(tracking.TAG_ROLE) for r in runs)
    assert roles == ["group"] * 4 + ["parent"]
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "parent")
    assert parent.info.status == "FINISHED"
    # the job ran in a temporary copy of the repository; nothing was written back into it
    assert not (REPO_ROOT / "mlflow.db").exists()
