"""Shared fixtures: one real local Ray for the session, MLflow stores, a real MLflow server.

Environment (set before anything imports Ray or MLflow): Ray binds loopback only, no auth
token, no usage stats; MLflow without telemetry or URL printing. The test-only pipelines
(tests/sweep_test_pipeline.py, a plugin) are registered here and in every Ray worker:
``$HYPERSWEEP_PLUGINS`` names the module, PYTHONPATH makes it importable, and
:func:`hypersweep.registry.load_plugins` imports it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# JAX compile cache (on by default) in a fresh folder per session, never ~/.cache
os.environ["HYPERSWEEP_CACHE_DIR"] = tempfile.mkdtemp(prefix="hs-jax-cache-")
_paths = [str(TESTS_DIR), str(REPO_ROOT)] + [p for p in os.environ.get(
    "PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(_paths))
_plugins = [p for p in os.environ.get("HYPERSWEEP_PLUGINS", "").split(",") if p]
os.environ["HYPERSWEEP_PLUGINS"] = ",".join(dict.fromkeys(["sweep_test_pipeline", *_plugins]))
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from hypersweep.registry import load_plugins  # noqa: E402 - after the environment above

load_plugins()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray (2 CPUs, no dashboard, loopback only as the driver's own)
    shared by every test that needs it."""
    from hypersweep.orchestrator.ray_env import prepare_local_ray

    local_kwargs = prepare_local_ray()
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="hs-ray-")
    ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR", _temp_dir=temp_dir,
             **local_kwargs)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_sqlite(tmp_path) -> str:
    """A fresh sqlite tracking URI in the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (one worker, job execution off)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{root / 'server.db'}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log_file = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.root / 'server.log'}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not become healthy in time")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: uvicorn children too
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()
