"""The end-of-run summary's medians do not mix inner budgets or K settings."""
from __future__ import annotations

import pyarrow as pa

from hypersweep.orchestrator.summary import format_summary, per_pair


def _rows():
    rows = []
    for seed in range(3):
        for t in (5, 50):
            # K = t: error 0.1^(t/5)·(seed + 1); K = 10: a plateau 1e-3·(seed + 1)
            rows.append(dict(problem="ridge", algorithm="aid_cg", status="ok", t=t,
                             K_setting="t", pipeline="hypergradient_error",
                             hypergrad_rel_error=0.1 ** (t / 5) * (seed + 1),
                             wall_time_s=0.01 * t, val_loss=None))
            rows.append(dict(problem="ridge", algorithm="aid_cg", status="ok", t=t,
                             K_setting="10", pipeline="hypergradient_error",
                             hypergrad_rel_error=1e-3 * (seed + 1), wall_time_s=0.02 * t,
                             val_loss=None))
    rows.append(dict(problem="ridge", algorithm="itd", status="error", t=50, K_setting=None,
                     pipeline="hypergradient_error", hypergrad_rel_error=None,
                     wall_time_s=None, val_loss=None))
    return pa.Table.from_pylist(rows)


def test_per_pair_splits_k_settings_and_takes_the_largest_t():
    pairs = {p["algorithm"]: p for p in per_pair(_rows())}
    assert set(pairs) == {"aid_cg K=t", "aid_cg K=10", "itd"}
    kt = pairs["aid_cg K=t"]
    assert kt["t_max"] == 50 and kt["cells"] == 6 and kt["ok"] == 6
    assert kt["median_rel_error"] == 0.1 ** 10 * 2  # seed 1 at t = 50, not a t = 5 value
    assert pairs["aid_cg K=10"]["median_rel_error"] == 2e-3
    assert pairs["itd"]["median_rel_error"] is None and pairs["itd"]["ok"] == 0
    summary = {"study": "s", "cells_done": 13, "cells_skipped": 0, "wall_time_s": 1.0,
               "results_dir": "/x", "per_pair": list(pairs.values()),
               "study_counts": {"ok": 12, "error": 1, "diverged": 0, "timeout": 0,
                                "crashed": 0}}
    text = format_summary(summary)
    assert "median rel err at t_max" in text
    line = next(ln for ln in text.splitlines() if "aid_cg K=t" in ln)
    assert line.split()[-3:-1] == ["50", f"{0.1 ** 10 * 2:.3e}"]
