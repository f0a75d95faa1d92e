#!/bin/bash
# Warm `hypersweep run STUDY` in several source trees, interleaved, N rounds: wall per run
# and the median per tree. The trees share one compilation cache (warmed by a first,
# untimed run of each) and one MLflow sqlite store; each run writes a fresh output.
#   benchmarks/warm_runs.sh ROUNDS STUDY.yaml TREE[:EXTRA_PYTHONPATH] ...
# A tree is a checkout (e.g. `git worktree add /tmp/before <rev>`); EXTRA_PYTHONPATH is
# put after it (e.g. a folder holding another version of a dependency, unpacked from its
# wheel). Uses this repository's .venv; work files go to ${WORK:-/tmp/hs-warm-runs}.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=$1 study=$(realpath "$2"); shift 2
work=${WORK:-/tmp/hs-warm-runs}
rm -rf "$work"; mkdir -p "$work"
export HYPERSWEEP_CACHE_DIR=$work/cache MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db
run() {  # run TREE_SPEC LABEL -> prints the wall seconds
  local tree=${1%%:*} extra= out=$work/out-$2
  [[ $1 == *:* ]] && extra=:${1#*:}
  grep -v '^output:' "$study" > "$work/$2.yaml"; echo "output: $out" >> "$work/$2.yaml"
  rm -rf "$out"
  local s e
  s=$(date +%s.%N)
  (cd "$tree" && PYTHONPATH=$tree$extra "$here/.venv/bin/python" -m hypersweep run --quiet \
     "$work/$2.yaml" > "$work/$2.log" 2>&1) || { echo "FAILED (see $work/$2.log)"; return; }
  e=$(date +%s.%N)
  python3 -c "print(round($e - $s, 2))"
}
for spec in "$@"; do run "$spec" warmup > /dev/null; done
for r in $(seq 1 "$rounds"); do
  for spec in "$@"; do echo "$spec $(run "$spec" "r$r")"; done
done | tee "$work/times.txt"
python3 - "$work/times.txt" <<'PY'
import statistics, sys, collections
walls = collections.defaultdict(list)
for line in open(sys.argv[1]):
    spec, wall = line.rsplit(" ", 1)
    if not wall.startswith("FAILED"):
        walls[spec].append(float(wall))
for spec, values in walls.items():
    print(f"{spec}: median {statistics.median(values):.2f} s of {sorted(values)}")
PY
