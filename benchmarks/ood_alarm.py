"""The out-of-distribution alarm of bundled models: its own test images against another lab's.

For each (model, other data) pair: the share of the model's own test images (its pinned split)
and of the other images flagged out of domain (``in_domain`` false, through `leukoscope predict`'s
code path), with 95% Wilson intervals, and the AUROC of ``ood_score`` between the two. Prints the
rows of the table in docs/benchmarks.md ("Another lab").

Usage: python benchmarks/ood_alarm.py [--pairs wbc:all_idb2 wbc:cnmc2019 blast:cnmc2019 blast:bccd_wbc]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from leukoscope.data import read_splits
from leukoscope.inference import iter_inputs, load_model
from leukoscope.metrics import binary_auc, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA_OF = {"pbc": "pbc", "wbc": "runs/data/wbc", "aria-all": "aria_all", "blast": "all_idb2"}


def flagged(scores: np.ndarray, outside: np.ndarray) -> str:
    n, k = len(outside), int(outside.sum())
    low, high = wilson_interval(k, n)
    return f"{k}/{n:,} = {100 * k / n:.1f}% ({100 * low:.1f}-{100 * high:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["wbc:all_idb2", "wbc:cnmc2019", "blast:cnmc2019", "blast:bccd_wbc"])
    args = parser.parse_args()
    for pair in args.pairs:
        name, other = pair.split(":")
        model = load_model(name)
        samples, kinds = read_splits(ROOT / "configs" / f"{name}.splits.csv")
        base = Path(DATA_OF[name]) if DATA_OF[name].startswith("runs/") else SHARED / DATA_OF[name]
        own = model.predict([base / s.path for s, k in zip(samples, kinds) if k == "test"])
        theirs = model.predict(iter_inputs([SHARED / other]))
        own_scores = np.array([p.ood_score for p in own if not p.error])
        their_scores = np.array([p.ood_score for p in theirs if not p.error])
        auroc = binary_auc(np.r_[np.zeros(len(own_scores)), np.ones(len(their_scores))], np.r_[own_scores, their_scores])
        own_flags = np.array([p.in_domain is False for p in own if not p.error])
        their_flags = np.array([p.in_domain is False for p in theirs if not p.error])
        print(f"| `{name}` | {flagged(own_scores, own_flags)} | `{other}` | {flagged(their_scores, their_flags)} | {auroc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
