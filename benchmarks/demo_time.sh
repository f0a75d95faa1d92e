#!/bin/bash
# Time `make demo`'s commands in a source tree, with the tree's own code.
#   benchmarks/demo_time.sh TREE LABEL [keep]
# TREE: a checkout (e.g. `git archive <rev> | tar -x -C /tmp/before`); LABEL names the
# log (/tmp/demo-LABEL.log) and the compile cache folder (/tmp/demo-cache-LABEL), which is
# emptied first unless the third argument is "keep" (a warm run). results/ in TREE is
# removed first. Uses this repository's .venv and `python -m hypersweep`, so trees of
# different revisions are timed with the same interpreter and libraries.
# The commands are the tree's own: `hypersweep run` of the three demo studies with
# `--report results/demo-report` when its Makefile says so (one process), else `run` then
# `hypersweep report` (two; "report" is then the second command's time).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
PY=$here/.venv/bin/python
cd "$1" || exit 2
rm -rf results
[ "${3:-}" = keep ] || rm -rf "/tmp/demo-cache-$2"
export HYPERSWEEP_CACHE_DIR=/tmp/demo-cache-$2 PYTHONPATH=$1
studies=(configs/demo.yaml configs/demo_hpo.yaml configs/demo_blackbox.yaml)
s=$(date +%s.%N)
if grep -q -- "--report results/demo-report" Makefile; then
  $PY -m hypersweep run "${studies[@]}" --report results/demo-report \
    > "/tmp/demo-$2.log" 2>&1 || echo "run FAILED (see /tmp/demo-$2.log)"
  m=$(date +%s.%N)
  mode="one command"
else
  $PY -m hypersweep run "${studies[@]}" \
    > "/tmp/demo-$2.log" 2>&1 || echo "run FAILED (see /tmp/demo-$2.log)"
  m=$(date +%s.%N)
  $PY -m hypersweep report results/demo results/demo-hpo results/demo-blackbox \
    --out results/demo-report >> "/tmp/demo-$2.log" 2>&1 || echo "report FAILED"
  mode="two commands"
fi
e=$(date +%s.%N)
echo "$2 ${3:-cold} ($mode) run $(echo "$m-$s" | bc) report $(echo "$e-$m" | bc)" \
  "total $(echo "$e-$s" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
