"""The shipped cluster-launcher configs, validated offline with Ray's own code.

``prepare_config`` (merges the provider's defaults.yaml, fills node-type min/max) then
``validate_config`` (ray-schema.json + cross-field checks) is exactly what ``ray up`` runs
before it contacts a cloud, so a config that passes here fails at launch only for things
no offline check can know (image tags, instance quotas, SSH). No cloud is contacted and
boto3 is not needed. The negative cases prove these tests can fail. Also: ``.rayignore``
excludes what a ``ray job submit --working-dir .`` must not upload, checked with Ray's
own ignore-file matcher.
"""
from __future__ import annotations

import copy
import platform
import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
LOCAL_YAML = REPO_ROOT / "cluster.local.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_shipped_config_passes_rays_own_validation_offline(path):
    had_boto3 = "boto3" in sys.modules
    prepared = _validate(_load(path))
    assert prepared["cluster_name"]
    assert ("boto3" in sys.modules) == had_boto3  # validation never reached for AWS APIs


def test_aws_config_shape():
    config = _load(CLUSTER_YAML)
    prepared = _validate(config)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}        # cells never land on the head
    assert head["max_workers"] == 0
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 2 and t["max_workers"] >= 1
               for t in workers), "expected multi-GPU worker nodes"
    assert sum(t.get("min_workers", 0) for t in workers) <= prepared["max_workers"]
    # The docker image runs the Ray and Python the driver runs.
    image = config["docker"]["image"]
    py = "py" + "".join(platform.python_version_tuple()[:2])
    assert image.startswith(f"rayproject/ray:{ray.__version__}-{py}-"), image
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "mlflow server" in head_start and "--host 127.0.0.1" in head_start


@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_setup_installs_gpu_builds_before_the_package(path):
    config = _load(path)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    jax_at = next(i for i, c in enumerate(setup) if "jax[cuda12]" in c)
    package_at = next(i for i, c in enumerate(setup) if "install -q -e ~/hypersweep" in c)
    assert "download.pytorch.org/whl/cu" in setup[torch_at]
    # pyproject pins torch==2.13.0: the CUDA wheel must be there first, or pip pulls the
    # default wheel instead.
    pin = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pin
    assert torch_at < package_at and jax_at < package_at
    assert config["file_mounts"] == {"~/hypersweep": "."}
    excluded = " ".join(config["rsync_exclude"])
    for pattern in (".git", ".venv", "results", "*.db"):
        assert pattern in excluded


def test_local_config_becomes_one_node_type_with_every_listed_worker():
    prepared = _validate(_load(LOCAL_YAML))
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(
        prepared["provider"]["worker_ips"])


# -- negative cases: the validation above can fail --------------------------------------


def _mutated(mutate) -> dict:
    config = _load(CLUSTER_YAML)
    mutate(config)
    return config


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.25),
     "not of type 'integer'"),
    (lambda c: c.update(setup_command=c.pop("setup_commands")),
     "'setup_command' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),
     "'min_worker' was unexpected"),
    (lambda c: c["docker"].update(imag="x"), "'imag' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
     "'node_config' is a required property"),
], ids=["fractional-resource", "typo-top-level", "typo-node-type", "typo-docker",
        "missing-node-config"])
def test_schema_violations_are_rejected(mutate, message):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match=message):
        _validate(_mutated(mutate))


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(head_node_type="head_gpu"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9),
     "max_workers` is smaller than the sum of `min_workers"),
], ids=["unknown-head-type", "min-workers-above-max"])
def test_cross_field_errors_are_rejected(mutate, message):
    with pytest.raises(ValueError, match=message):
        _validate(_mutated(mutate))


def test_local_config_without_worker_ips_is_rejected():
    config = _load(LOCAL_YAML)
    del config["provider"]["worker_ips"]
    with pytest.raises(Exception, match="worker_ips"):
        _validate(config)


# -- .rayignore -------------------------------------------------------------------------


def test_rayignore_keeps_environments_results_and_databases_out_of_job_uploads():
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    matchers = get_excludes_from_ignore_files(REPO_ROOT, include_gitignore=False)
    assert matchers, ".rayignore is missing"

    def ignored(relative: str) -> bool:
        return any(match(REPO_ROOT / relative) for match in matchers)

    for path in (".venv/bin/python", ".git/HEAD", "results/demo/results/part-1.parquet",
                 "mlruns/1/meta.yaml", "mlflow.db", "results/mlflow.db",
                 "hypersweep/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path), path
    for path in ("hypersweep/cli.py", "configs/regression.yaml",
                 "benchmarks/baseline.parquet", "pyproject.toml"):
        assert not ignored(path), path
