"""The executable store (hypersweep/problems/jax/executables.py): compiled functions kept on
disk under a key of what determines them, loaded without tracing or lowering.

References: the same call compiled fresh in a process without any cache (results must be
bit-identical: it is the same XLA code), and JAX's own trace events (a load must not trace).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_traces  # noqa: E402
from hypersweep.problems.jax import compile_cache, executables, ops  # noqa: E402


def _env(cache_dir) -> dict:
    return dict(os.environ, HYPERSWEEP_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")


# -- in process: keys, loads, fallbacks -----------------------------------------------------
@functools.partial(jax.jit, static_argnames=("scale",))
def _scaled_exp(scale, x):
    return scale * jnp.exp(x) + jnp.tanh(x).sum()


_STORED = executables.cached(_scaled_exp, static_argnames=("scale",))


class _Unstable:
    """A static argument whose repr names a memory address: not storable."""

    def __hash__(self):
        return 7

    def __eq__(self, other):
        return isinstance(other, _Unstable)

    def __mul__(self, other):
        return 2.0 * other

    __rmul__ = __mul__


def test_a_call_is_stored_then_loaded_without_tracing_with_equal_results(monkeypatch):
    traces = jax_traces.counts()
    x = jnp.linspace(-1.0, 1.0, 17)
    expected = np.asarray(_scaled_exp(3.0, x))
    stores, loads = executables.COUNTERS.stores, executables.COUNTERS.loads
    first = np.asarray(_STORED(3.0, x))
    assert executables.COUNTERS.stores == stores + 1
    np.testing.assert_array_equal(first, expected)

    _STORED.memo.clear()  # as a new process would: from disk
    before_traces = traces["_scaled_exp"]
    hits = compile_cache.counts()
    clock = ops.compile_seconds()
    again = np.asarray(_STORED(3.0, x))
    assert executables.COUNTERS.loads == loads + 1
    assert traces["_scaled_exp"] == before_traces, "a load traced the function"
    np.testing.assert_array_equal(again, expected)
    # a load counts as a cache hit and as compile time
    assert compile_cache.counts()[0] == hits[0] + 1
    assert compile_cache.counts()[1] == hits[1] + 1
    assert ops.compile_seconds() > clock

    # another static value, shape or dtype is another entry
    for args in ((4.0, x), (3.0, jnp.linspace(-1.0, 1.0, 18)),
                 (3.0, jnp.linspace(-1.0, 1.0, 17, dtype=jnp.float16))):
        stores = executables.COUNTERS.stores
        np.testing.assert_array_equal(np.asarray(_STORED(*args)),
                                      np.asarray(_scaled_exp(*args)))
        assert executables.COUNTERS.stores == stores + 1, args

    # other code (or JAX, or CPU) under the same call: a miss, never a stale hit
    _STORED.memo.clear()
    real = executables._installation

    def edited(platform_name):
        return (*real(platform_name), "edited source")

    monkeypatch.setattr(executables, "_installation", edited)
    stores = executables.COUNTERS.stores
    np.testing.assert_array_equal(np.asarray(_STORED(3.0, x)), expected)
    assert executables.COUNTERS.stores == stores + 1


def test_unstable_static_arguments_and_tracers_fall_back_to_jit():
    x = jnp.arange(5.0)
    stores = executables.COUNTERS.stores
    np.testing.assert_allclose(np.asarray(_STORED(_Unstable(), x)),
                               np.asarray(2.0 * jnp.exp(x) + jnp.tanh(x).sum()))
    # under an outer transformation the arguments are tracers: plain jit, inlined
    grad = jax.grad(lambda v: _STORED(3.0, v).sum())(x)
    np.testing.assert_allclose(np.asarray(grad),
                               np.asarray(3.0 * jnp.exp(x) + 5 * (1 - jnp.tanh(x) ** 2)),
                               rtol=1e-6)
    assert executables.COUNTERS.stores == stores


def test_store_is_off_with_the_cache(monkeypatch):
    monkeypatch.setattr(executables, "store_dir", lambda: None)
    x = jnp.arange(3.0) + 0.25  # a shape no other test stores
    stores, loads = executables.COUNTERS.stores, executables.COUNTERS.loads
    np.testing.assert_array_equal(np.asarray(_STORED(3.0, x)),
                                  np.asarray(_scaled_exp(3.0, x)))
    assert (executables.COUNTERS.stores, executables.COUNTERS.loads) == (stores, loads)


# -- across processes: the t-grid of the pipeline ------------------------------------------
_GRID = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hypersweep import algorithms, problems
    from hypersweep.problems.jax import compile_cache, executables
    name, n_shapes = sys.argv[1], int(sys.argv[2])
    out = {}
    for k in range(n_shapes):  # logreg's sigmoid: exp, what broke re-serialized entries
        seeds = [problems.make(name, backend="jax", seed=s, dtype="float64", n_train=30 + k,
                               n_val=20, n_test=0, n_features=6) for s in range(3)]
        lams = [p.initial_hyperparams() for p in seeds]
        points = [[(t, 5) for t in (1, 4, 16, 40)]] * len(seeds)
        result = algorithms.get_grid("aid_cg", "jax")(seeds, lams, points=points)
        out[str(k)] = [[np.asarray(r.hypergrad).tolist() for r in lane] for lane in result]
    print(json.dumps({"grads": out, "stores": executables.COUNTERS.stores,
                      "loads": executables.COUNTERS.loads,
                      "failures": executables.COUNTERS.failures,
                      "counts": compile_cache.counts()}))
""")


def _grid_process(cache_dir, n_shapes: int = 1, name: str = "logreg") -> dict:
    done = subprocess.run([sys.executable, "-c", _GRID, name, str(n_shapes)],
                          env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_across_processes_store_load_refill_and_repair(tmp_path):
    """One cache folder, one process after another:

    1. a process without any cache, the reference; one that stores; one that loads: the
       same numbers to the last bit, and the loader compiles nothing;
    2. the JAX 0.10 trap: an executable JAX loaded from its persistent cache serializes
       into an entry that loads and then fails at its first run. With JAX's cache full
       and the store emptied, a process must still store a runnable entry (the next
       process loads and runs it);
    3. a torn entry is logged, compiled again and replaced."""
    reference = _grid_process("off")
    cache = tmp_path / "cache"
    first = _grid_process(cache)
    assert (first["stores"], first["loads"]) == (1, 0)
    second = _grid_process(cache)
    assert (second["stores"], second["loads"], second["failures"]) == (0, 1, 0)
    assert first["grads"] == second["grads"] == reference["grads"]
    hits, lookups = second["counts"]
    assert hits == lookups >= 1

    (entry,) = (cache / executables.SUBDIR).iterdir()
    size = entry.stat().st_size
    entry.unlink()
    refill = _grid_process(cache)  # JAX's cache holds it: compiled fresh all the same
    assert refill["stores"] == 1 and refill["grads"] == reference["grads"]
    loaded = _grid_process(cache)
    assert (loaded["loads"], loaded["failures"]) == (1, 0)
    assert loaded["grads"] == reference["grads"]

    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 3])  # a torn copy
    repaired = _grid_process(cache)
    assert (repaired["failures"], repaired["stores"]) == (1, 1)
    assert "not loaded" in repaired["stderr"]
    assert repaired["grads"] == reference["grads"]
    assert abs(entry.stat().st_size - size) < size // 3


@pytest.mark.slow
def test_many_entries_two_writers_at_once_then_every_one_loads(tmp_path):
    """At scale: two processes store the same 8 grid executables (8 instance shapes)
    into one empty folder at the same time; a third loads all 8 with the same results
    and no failure, and no temporary file is left."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _GRID, "logreg", "8"], env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["grads"] == results[1]["grads"]
    assert sum(r["stores"] + r["loads"] for r in results) == 16
    entries = list((cache / executables.SUBDIR).iterdir())
    assert len(entries) == 8 and all(p.suffix == ".xla" for p in entries), entries
    third = _grid_process(cache, 8)
    assert (third["loads"], third["stores"], third["failures"]) == (8, 0, 0)
    assert third["grads"] == results[0]["grads"]
