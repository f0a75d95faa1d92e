"""Every server a plain ``hypersweep run`` starts listens on loopback only.

The run gets a bare environment (``PATH`` and ``HOME``, nothing else: no Makefile or
conftest variables), so the only reason for loopback is the code. While it runs, the
listening sockets of its whole process tree (the driver, Ray's gcs_server, raylet,
dashboard and runtime-env agents, the workers) are sampled repeatedly.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

psutil = pytest.importorskip("psutil")

VENV_BIN = Path(sys.executable).parent

STUDY = """\
study: loopback
pipeline: hypergradient_error
backend: torch
dtype: float64
problems: [quadratic]
algorithms: [itd, aid_fp]
t: [5, 20]
K: [5]
seeds: [0]
resources: {{num_cpus: 1, num_gpus: 0}}
max_retries: 0
cell_timeout_s: 120
output: {output}
mlflow: {{tracking_uri: "sqlite:///{db}", enabled: true}}
"""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


def _listeners(root: psutil.Process) -> set[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every LISTEN socket of root and its descendants."""
    found = set()
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in tree:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.pid, name, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_run_with_bare_environment_listens_on_loopback_only(tmp_path):
    output = tmp_path / "out"
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(output=output, db=tmp_path / "mlflow.db"))
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "hypersweep"), "run", str(study), "--quiet"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: set[tuple[int, str, str, int]] = set()
    samples = 0
    try:
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listeners(root)
            samples += 1
            time.sleep(0.1)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        # The sweep stops its own Ray; this only catches a run that overstayed.
        if proc.poll() is None:
            for child in root.children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "run.log").read_text(errors="replace")
    listing = "\n".join(f"{pid:>7} {name:<24} {ip}:{port}"
                        for pid, name, ip, port in sorted(seen, key=lambda s: (s[1], s[2])))
    off = {s for s in seen if not is_loopback(s[2])}
    assert rc == 0, text[-3000:]
    assert samples >= 5, f"only {samples} samples of the process tree"
    assert not off, f"listening off loopback:\n{listing}"
    assert {name for _, name, _, _ in seen} & {"gcs_server", "raylet"}, (
        f"no Ray server seen listening, so the test proved nothing:\n{listing}")


def test_prepare_local_ray_sets_loopback_and_keeps_user_choices():
    from hypersweep.orchestrator.ray_env import prepare_local_ray

    env = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    kwargs = prepare_local_ray(env)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                   "RAY_USAGE_STATS_ENABLED": "0"}
    assert kwargs == {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
                      "include_dashboard": False}


class _FakeRay:
    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_init_ray_sets_loopback_only_for_the_embedded_ray(monkeypatch, address):
    from hypersweep.orchestrator.ray_env import init_ray

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert init_ray(address) is True
    (call,) = fake.calls
    if address:  # a cluster: the user's environment, Ray's defaults
        assert call == {"address": address, "logging_level": "WARNING"}
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    else:
        assert call["address"] == "local"
        assert call["_node_ip_address"] == call["dashboard_host"] == "127.0.0.1"
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


BARE_IMPORT = """
import os, sys
import hypersweep.cli, hypersweep.orchestrator.driver, hypersweep.orchestrator.actors
import hypersweep.orchestrator.ray_env
assert "ray" not in sys.modules, "importing hypersweep imported ray"
assert not any(k.startswith("RAY_") for k in os.environ), "import-time environment edits"
"""

API_AFTER_IMPORT_RAY = """
import ray, psutil, ipaddress
from hypersweep.orchestrator import ray_env
from hypersweep.orchestrator.ray_env import init_ray
assert init_ray(None)
node = ray._private.worker.global_worker.node
me = psutil.Process()
children = me.children(recursive=True)
ips = {c.laddr.ip for p in [me, *children]
       for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
# the driver's stop: the autoscaler monitor SIGKILLed first (Ray would wait 1 s for it
# to ignore SIGTERM), then ray.shutdown(); no process of the node survives
monitors = [p for p in me.children() if any(
    part.endswith(ray_env.MONITOR_SCRIPT) for part in p.cmdline())]
assert len(monitors) == 1, [p.cmdline() for p in me.children()]
ray_env.shutdown_ray()
gone, alive = psutil.wait_procs(children, timeout=10)
assert not alive, [(p.pid, p.name()) for p in alive]
assert not monitors[0].is_running() and not ray.is_initialized()
print(node.node_ip_address, sorted(ips))
assert node.node_ip_address == "127.0.0.1"
assert ips and all(ip.startswith(("127.", "::ffff:127.")) or ip == "::1" for ip in ips), ips
"""


def _bare_python(code: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_importing_hypersweep_neither_imports_ray_nor_edits_the_environment(tmp_path):
    done = _bare_python(BARE_IMPORT, tmp_path, 60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_api_after_the_user_imported_ray_still_binds_loopback(tmp_path):
    """A script that imported Ray before hypersweep still gets a loopback-only embedded
    Ray, and ``shutdown_ray`` (the driver's stop) leaves no process of the node."""
    done = _bare_python(API_AFTER_IMPORT_RAY, tmp_path, 120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

