"""How far colour alone goes: a random forest on 48 colour-histogram bins, no shape, on a dataset's split.

If it scores close to the CNN, the split can be separated by acquisition (stain, white balance,
zoom) rather than by cell morphology, and a high test accuracy says little about other labs.
Writes the COLOUR-SHORTCUT block of docs/benchmarks.md.

Usage: python benchmarks/colour_shortcut.py [--data ../shared/data/aria_all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope.data import detect_layout, make_splits  # noqa: E402
from leukoscope.data.dataset import decode_many  # noqa: E402
from leukoscope.metrics import wilson_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """(N, 3 * bins) per-channel colour histograms of (N, 3, H, W) uint8 images, as fractions."""
    pixels = images.shape[2] * images.shape[3]
    return np.stack([np.concatenate([np.histogram(im[c], bins=bins, range=(0, 256))[0] for c in range(3)]) for im in images]) / pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "aria_all")
    args = parser.parse_args()
    dataset = detect_layout(args.data)
    splits = np.array(make_splits(dataset, (0.7, 0.15, 0.15), 0, "patient")[0])  # the bundled models' split
    images, _ = decode_many([dataset.abspath(s) for s in dataset.samples], 64, desc="decode")
    x = histograms(images.numpy())
    y = np.array([dataset.classes.index(s.label) for s in dataset.samples])
    forest = RandomForestClassifier(300, random_state=0, n_jobs=2).fit(x[splits == "train"], y[splits == "train"])
    lines = [f"`python benchmarks/colour_shortcut.py --data {args.data.name}` (seed-0 split of the bundled model):", "",
             "| split | colour-histogram forest accuracy (95% CI) |", "|---|---|"]
    for part in ("val", "test"):
        hits, n = int((forest.predict(x[splits == part]) == y[splits == part]).sum()), int((splits == part).sum())
        low, high = wilson_interval(hits, n)
        lines.append(f"| {part} | {hits / n:.2%} of {n} ({low:.1%}-{high:.1%}) |")
    print("\n".join(lines))
    write_block("COLOUR-SHORTCUT", "\n".join(lines))


if __name__ == "__main__":
    main()
