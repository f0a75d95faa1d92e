"""The shared JAX compilation cache (hypersweep.problems.jax.compile_cache): where it lives,
how a study turns it off, that concurrent processes filling one folder both succeed and
leave only whole entries, that later processes get hits, and that rows and the summary
count them."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

import sweep_test_pipeline
from hypersweep.io import parquet
from hypersweep.io.schema import RESULT_SCHEMA, empty_row
from hypersweep.orchestrator import actors, driver
from hypersweep.orchestrator.spec import StudyError, parse_study
from hypersweep.orchestrator.summary import compute_totals, format_summary
from hypersweep.problems.jax import compile_cache

REPO = Path(__file__).resolve().parents[1]


def _env(cache_dir) -> dict:
    return dict(os.environ, HYPERSWEEP_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")


# -- where, and off ------------------------------------------------------------------------
def test_resolve_dir_default_env_and_off(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.CACHE_DIR_ENV, raising=False)
    assert compile_cache.resolve_dir() == Path.home() / ".cache" / "hypersweep" / "jax"
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert compile_cache.resolve_dir() == tmp_path / "c"
    for off in ("off", "OFF", "0", "false", "none", "disabled"):
        assert compile_cache.resolve_dir(off) is None
    assert compile_cache.resolve_dir("") == compile_cache.default_dir()
    assert compile_cache.resolve_dir("~/x") == Path.home() / "x"


def test_importing_changes_no_jax_setting_and_off_means_off(tmp_path):
    code = textwrap.dedent("""
        import sys, jax
        import hypersweep, hypersweep.problems.jax.ops
        from hypersweep.problems.jax import compile_cache
        import hypersweep.orchestrator.actors
        assert jax.config.jax_compilation_cache_dir is None  # nothing at import
        assert compile_cache.counts() is None
        from hypersweep import problems
        problems.make("ridge", backend="jax", n_features=3, n_train=5)
        print(jax.config.jax_compilation_cache_dir, compile_cache.counts())
    """)
    on = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "c"), check=True,
                        capture_output=True, text=True, timeout=120).stdout.split()
    assert on[0] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    off = subprocess.run([sys.executable, "-c", code], env=_env("off"), check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert off == ["None", "None"]


def test_study_section_is_validated_and_reaches_the_actors(monkeypatch, tmp_path):
    base = sweep_test_pipeline.ridge_study_yaml("cc", output=tmp_path / "out")
    assert parse_study(base).compile_cache.enabled is True
    assert parse_study(base + "compile_cache: {dir: rel}\n").compile_cache.dir == str(
        Path("rel").absolute())
    assert parse_study(base + "compile_cache: {dir: ~/c}\n").compile_cache.dir == "~/c"
    for bad, message in (
            ("compile_cache: {enabled: yes please}", "compile_cache.enabled: must be true or"),
            ("compile_cache: {dirr: x}", "compile_cache: unknown key 'dirr'. Valid keys: "
                                         "enabled, dir"),
            ("compile_cache: {dir: off}", "to turn the cache off write enabled: false"),
            ("compile_cache: {dir: ''}", "compile_cache.dir: must be a directory path"),
            ("compile_cache: 3", "compile_cache: must be a mapping")):
        with pytest.raises(StudyError, match=".*") as info:
            parse_study(base + bad + "\n")
        assert message in str(info.value) and "\n" not in str(info.value), info.value

    from hypersweep.orchestrator.resources import ActorRequest

    def env(yaml_extra: str) -> dict:
        setting = parse_study(base + yaml_extra).compile_cache
        options = actors.actor_options(ActorRequest(), compile_cache_setting=setting)
        return options.get("runtime_env", {}).get("env_vars", {})

    monkeypatch.delenv(compile_cache.CACHE_DIR_ENV, raising=False)
    assert compile_cache.CACHE_DIR_ENV not in env("")  # each node's default
    assert env("compile_cache: {enabled: false}\n")[compile_cache.CACHE_DIR_ENV] == "off"
    assert env("compile_cache: {dir: /shared/c}\n")[compile_cache.CACHE_DIR_ENV] == \
        "/shared/c"
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path / "d"))
    assert env("")[compile_cache.CACHE_DIR_ENV] == str(tmp_path / "d")


# -- concurrency ---------------------------------------------------------------------------
def _put_many(path: str, key: str, size: int, start: float) -> None:
    cache = compile_cache.atomic_file_cache(path)
    while time.time() < start:
        pass
    for index in range(200):
        cache.put(f"{key}{index}", bytes([size % 251]) * size)


def test_atomic_cache_writers_of_one_key_leave_one_whole_entry(tmp_path):
    """Four processes put the same 200 keys with values of different lengths at once:
    every entry is one writer's whole value, no temporary file is left."""
    context = multiprocessing.get_context("spawn")
    start = time.time() + 3.0
    sizes = (1_000, 70_000, 300_000, 5)
    workers = [context.Process(target=_put_many, args=(str(tmp_path), "k", size, start))
               for size in sizes]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    cache = compile_cache.atomic_file_cache(str(tmp_path))
    for index in range(200):
        value = cache.get(f"k{index}")
        assert value is not None and len(value) in sizes
        assert value == bytes([len(value) % 251]) * len(value)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-cache")) == []
    assert cache.get("absent") is None


_COMPILE = textwrap.dedent("""
    import json, sys, time
    from hypersweep import algorithms, problems
    from hypersweep.problems.jax import compile_cache
    import jax
    start = float(sys.argv[1])
    shapes = ((3, 7), (4, 9), (5, 11), (6, 13))
    problems_ = [problems.make("ridge", backend="jax", n_features=d, n_train=n)
                 for d, n in shapes]
    if compile_cache.counts() is not None:  # on: JAX's cache object is ours
        assert type(jax._src.compilation_cache._cache).__name__ == "AtomicFileCache"
    while time.time() < start:  # both processes compile at the same moment
        time.sleep(0.001)
    out = {}
    for (d, _), p in zip(shapes, problems_):
        lam = p.initial_hyperparams()
        for name, kwargs in (("aid_cg", dict(t=20, K=5)), ("itd", dict(t=12)),
                             ("aid_fp", dict(t=7, K=3))):
            g = algorithms.get(name, "jax")(p, lam, **kwargs).hypergrad
            out[f"{d}.{name}"] = p.ops.to_numpy(g).tolist()
    print(json.dumps({"grads": out, "counts": compile_cache.counts()}))
""")


def _compile_processes(cache_dir, n: int) -> list[dict]:
    start = time.time() + 6.0  # after both have imported jax and built their problems
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE, str(start)],
                              env=_env(cache_dir), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "Error reading persistent compilation cache" not in err, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_fill_one_cache_at_once_and_a_third_hits(tmp_path):
    """Two fresh processes compile the same 12 estimator calls (4 shapes × 3 methods) into
    one empty folder at the same moment: both succeed with the results of an uncached
    process; a third process is served every compile from the cache, with equal results."""
    reference = _compile_processes("off", 1)[0]
    assert reference["counts"] is None
    cache_dir = tmp_path / "cache"
    first, second = _compile_processes(cache_dir, 2)
    for result in (first, second):
        assert result["grads"] == reference["grads"]
        hits, lookups = result["counts"]
        assert lookups >= 12
    entries = list(cache_dir.glob("*-cache"))
    assert len(entries) >= 12
    assert [p for p in cache_dir.iterdir() if not p.name.endswith("-cache")] == []
    third = _compile_processes(cache_dir, 1)[0]
    assert third["grads"] == reference["grads"]
    hits, lookups = third["counts"]
    assert hits == lookups == first["counts"][1], third["counts"]


# -- visible: rows and summary --------------------------------------------------------------
def test_summary_counts_cache_hits():
    rows = []
    for index, (hits, lookups, status) in enumerate(((3, 4, "ok"), (0, 0, "ok"),
                                                     (2, 2, "error"))):
        row = empty_row()
        row.update(study="s", cell_id=f"c{index}", problem="p", algorithm="a",
                   status=status, wall_time_s=1.0, compile_time_s=0.5,
                   extra=json.dumps({"compile_cache_hits": hits,
                                     "compile_cache_lookups": lookups}))
        rows.append(row)
    totals = compute_totals(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    assert totals["compile_cache"] == {"hits": 5, "lookups": 6}
    assert compute_totals(pa.Table.from_pylist(rows[:0], schema=RESULT_SCHEMA))[
        "compile_cache"] is None
    summary = {"study": "s", "cells_done": 3, "cells_skipped": 0, "wall_time_s": 1.0,
               "results_dir": "r", "study_counts": {"ok": 2, "error": 1, "diverged": 0,
                                                   "timeout": 0, "crashed": 0},
               "per_pair": [], **totals}
    assert "compile cache: 5 of 6 XLA compiles were cache hits (83%)" in \
        format_summary(summary)


def test_a_second_run_into_a_fresh_output_is_served_by_the_cache(ray_session, tmp_path):
    """A real study through the driver and its actors, twice into fresh outputs with one
    cache folder: the first run fills it, the second is served (hits in the rows and the
    summary) with the same results; ``enabled: false`` records no cache counts."""
    cache = tmp_path / "cache"
    more = f"mlflow: {{enabled: false}}\nK: [4]\ncompile_cache: {{dir: {cache}}}"

    def run(name: str, extra: str = more):
        study = parse_study(sweep_test_pipeline.ridge_study_yaml(
            name, output=tmp_path / name, algorithms="[itd, aid_cg]", t="[3, 40]",
            seeds=2, more=extra))
        summary = driver.run_study(study, quiet=True)
        rows = sorted(parquet.read_results(tmp_path / name).to_pylist(),
                      key=lambda r: (r["algorithm"], r["t"], r["seed"]))
        assert summary["study_counts"]["ok"] == 8
        return summary, rows

    cold, cold_rows = run("cold")
    warm, warm_rows = run("warm")
    assert any(cache.glob("*-cache"))
    for a, b in zip(cold_rows, warm_rows):
        assert a["hypergrad_rel_error"] == b["hypergrad_rel_error"]
        assert "compile_cache_lookups" in json.loads(b["extra"])
    assert warm["compile_cache"]["hits"] > 0
    assert warm["compile_cache"]["hits"] == warm["compile_cache"]["lookups"]
    assert "compile cache:" in format_summary(warm)
    assert cold["compile_cache"]["lookups"] >= warm["compile_cache"]["lookups"]
    _, off_rows = run("nocache", "mlflow: {enabled: false}\nK: [4]\ncompile_cache: "
                             "{enabled: false}")
    assert all("compile_cache_lookups" not in json.loads(r["extra"] or "{}")
               for r in off_rows)
