"""What an embedded, single-machine Ray needs so that every server it starts listens on
127.0.0.1 only, and stays quiet. Backend-free: this module imports neither Ray nor MLflow.

Ray picks its node address, and from it its bind address, once: ``gcs_server``, ``raylet``,
the dashboard and runtime-env agents and every worker listen on loopback only when the
node address is exactly 127.0.0.1, and on all interfaces otherwise. On Linux Ray rewrites
``127.0.0.1``/``localhost`` given as ``_node_ip_address`` to the routable interface's
address, unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` — a variable Ray reads when it is
first imported (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``). So
:func:`prepare_local_ray` must run before the first ``import ray``; the driver calls it in
:func:`init_ray`, the one function that starts the embedded Ray (or joins a cluster), and
``actors.py`` imports Ray lazily.

That variable also makes ``ray start --address ...`` refuse to add a node, so it is set
only for an embedded Ray, never when joining a cluster (``--address``, ``$RAY_ADDRESS``).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any, MutableMapping

log = logging.getLogger(__name__)

LOOPBACK_IP = "127.0.0.1"

#: Set unconditionally: an embedded Ray is one node, on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

#: Set unless the user chose otherwise. No usage-stats reporting; no token auth on a
#: loopback-only single-user Ray (``RAY_AUTH_MODE=token`` still works if exported),
#: which also spares creating ``~/.ray/auth_token`` and its warning.
QUIET_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

#: ``ray.init`` arguments of an embedded Ray: its own host arguments say loopback too.
LOCAL_INIT_KWARGS: dict[str, Any] = {"_node_ip_address": LOOPBACK_IP,
                                     "dashboard_host": LOOPBACK_IP,
                                     "include_dashboard": False}


#: Extra ``ray.init`` arguments that make the embedded Ray start cheaper (Ray 2.60's names).
#: By default the raylet pre-starts one idle Python worker per CPU when the first driver
#: connects (``prestart_worker_first_driver``) and may pre-start more for a job
#: (``enable_worker_prestart``). Those processes import Ray while ``ray.init`` is still
#: starting the node and compete with it for the CPUs; the pool's actors start their own
#: workers anyway, moments later. Unknown keys are refused by Ray, so a renamed option
#: fails loudly rather than silently (see docs/benchmarks.md, "Embedded Ray start").
EMBEDDED_START_KWARGS: dict[str, Any] = {
    "_system_config": {"prestart_worker_first_driver": False,
                       "enable_worker_prestart": False},
}


def prepare_local_ray(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """Set the environment of an embedded loopback-only Ray; return ``ray.init`` kwargs.

    Call it right before starting a local Ray (``ray.init(address="local", **kwargs)``),
    ideally before anything imports Ray. The variables are inherited by every process
    Ray starts. If Ray was already imported in this process (a user's script, a test
    session), the flag it read at import is aligned with the variable, since otherwise
    the node address would silently stay the routable one.

    ``environ``: the mapping to update (default ``os.environ``; a copy for a subprocess).
    """
    env = os.environ if environ is None else environ
    env.update(LOOPBACK_ENV)
    for key, value in QUIET_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    if environ is None:
        _align_imported_ray()
    return dict(LOCAL_INIT_KWARGS)


def _align_imported_ray() -> None:
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        log.debug("ray was imported before prepare_local_ray(); switching it to loopback")
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None, *, dashboard: bool = False) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS`` or start a local loopback-only Ray.
    Returns whether this call started it (only then does the driver shut it down).

    The embedded Ray starts without the dashboard (``dashboard=True`` asks for it, on
    127.0.0.1) and without pre-started idle workers (:data:`EMBEDDED_START_KWARGS`).
    Ray still starts its API server (``dashboard.py`` with the non-UI modules: the
    state and job APIs), the autoscaler monitor and the log monitor: ``ray.init`` has
    no switch for them.

    The environment is set before this process first imports Ray, which reads it then
    (:func:`prepare_local_ray`); a cluster that is joined keeps the user's environment."""
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    local_kwargs = {} if address else prepare_local_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Errors of refs we abandoned on purpose (timeouts, crashed actors) are handled; do not
    # let Ray print them again when the refs are garbage collected.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING")
        return True
    temp_dir = os.path.join(tempfile.gettempdir(), f"hypersweep-ray-{os.getuid()}")
    if dashboard:
        local_kwargs["include_dashboard"] = True
    ray.init(address="local", _temp_dir=temp_dir, logging_level="ERROR",
             log_to_driver=False, **local_kwargs, **EMBEDDED_START_KWARGS)
    return True


#: The command-line tail of the embedded Ray's autoscaler monitor (``monitor.py``).
MONITOR_SCRIPT = os.path.join("autoscaler", "_private", "monitor.py")


def shutdown_ray() -> None:
    """``ray.shutdown()``; for an embedded Ray (started by this process) first SIGKILL
    its autoscaler monitor, which a single loopback node never uses.

    Ray stops its processes one by one, each with SIGTERM and up to 1 s of waiting before
    SIGKILL; the monitor never exits on SIGTERM within that second, so every embedded
    run's shutdown waited 1.0 s of its 1.4 s for it (docs/benchmarks.md §9c). Only
    direct children of this process whose command line runs Ray's ``monitor.py`` are
    killed: a joined cluster's processes are not children of ours."""
    import ray

    _kill_own_monitor()
    ray.shutdown()


def _kill_own_monitor() -> int:
    import psutil

    killed = []
    for child in psutil.Process().children(recursive=False):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if any(part.endswith(MONITOR_SCRIPT) for part in command):
            try:
                child.kill()
                killed.append(child)
            except psutil.Error:
                pass
    if killed:
        psutil.wait_procs(killed, timeout=2.0)
    return len(killed)


__all__ = ["prepare_local_ray", "init_ray", "shutdown_ray", "LOOPBACK_IP", "LOOPBACK_ENV",
           "QUIET_ENV_DEFAULTS", "LOCAL_INIT_KWARGS", "EMBEDDED_START_KWARGS"]
