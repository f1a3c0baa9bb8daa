"""The colour-cast correction of `wbc` (`colour_cast: true`): what it changes, with it and without.

A camera's white balance scales each channel; `wbc`'s colour jitter covers gains of a few percent,
not a yellow cast. With the correction, an image whose background's blue share lies more than
stain.CAST_MARGIN below the training images' range (stored in the checkpoint as ``cast``) gets
per-channel gains that bring its background back inside (see stain.correct_cast). Scored with the
bundled model as it ships and with the correction switched off: PBC's validation split, BCCD's
validation part of the `wbc` split, ALL-IDB2's annotated white cells (benchmarks/annotations/),
the 15 C-NMC cells (B-lymphoid: `lymphocyte`), and PBC's validation images under synthetic
white-balance casts (a check of the mechanism, not another lab). Validation data only.
Writes the COLOUR-CAST block of docs/benchmarks.md.

Usage: python benchmarks/colour_cast.py [--model wbc]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab import SHARED, third_lab  # noqa: E402
from doc import share, write_block  # noqa: E402
from specialist_gate import split_items  # noqa: E402

from leukoscope import perturb  # noqa: E402
from leukoscope.inference import load_model  # noqa: E402
from leukoscope.localise import as_slide  # noqa: E402
from leukoscope.metrics import WBC_TYPES, binary_auc  # noqa: E402

CASTS = {  # white-balance gains (R, G, B)
    "mild yellow (1.1, 1.05, 0.7)": (1.1, 1.05, 0.7),
    "strong yellow (1.15, 1.1, 0.55)": (1.15, 1.1, 0.55),
    "blue (0.85, 0.95, 1.15)": (0.85, 0.95, 1.15),
    "strong blue (0.75, 0.9, 1.3)": (0.75, 0.9, 1.3),
    "magenta (1.1, 0.8, 1.1)": (1.1, 0.8, 1.1),
    "green (0.85, 1.1, 0.85)": (0.85, 1.1, 0.85),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wbc", help="a model with a colour cast range (default: the bundled wbc)")
    args = parser.parse_args()
    model = load_model(args.model)
    cast = model.view.cast
    if cast is None:
        sys.exit(f"colour_cast: {args.model} has no colour cast range (colour_cast: true in its recipe)")
    off = load_model(args.model)
    off.view = replace(off.view, cast=None)
    pbc_paths, pbc_labels = split_items("pbc.splits.csv", SHARED / "pbc", "val")
    clean = [np.asarray(Image.open(p).convert("RGB")) for p in pbc_paths]
    idb_paths, types, sure = third_lab()
    keep = [t in WBC_TYPES and s for t, s in zip(types, sure)]
    cnmc = sorted((SHARED / "cnmc2019").rglob("*.bmp"))
    sets = {
        "PBC validation": (clean, pbc_labels),
        "BCCD validation part": split_items("wbc.splits.csv", Path(__file__).resolve().parents[1] / "runs" / "data" / "wbc", "val",
                                            lambda p: "bccd" in p),
        "ALL-IDB2, sure white cells": ([p for p, k in zip(idb_paths, keep) if k], [t for t, k in zip(types, keep) if k]),
        "C-NMC cells (lymphocyte)": (cnmc, ["lymphocyte"] * len(cnmc)),
        **{f"PBC validation, {name} cast (synthetic)": ([perturb.white_balance(x, gains) for x in clean], pbc_labels)
           for name, gains in CASTS.items()},
    }
    in_domain_scores = None
    lines = [(f"`{args.model}`'s background colour range (chromaticity low R, G, B, high R, G, B): {cast}; margin 0.06. "
              "Images right (95% Wilson intervals); corrected: images whose cast the correction changed."), "",
             "| images | corrected | without the correction | with it (as shipped) | AUROC vs clean PBC validation: without / with |",
             "|---|---|---|---|---|"]
    for name, (images, labels) in sets.items():
        arrays = [x if isinstance(x, np.ndarray) else np.asarray(Image.open(x).convert("RGB")) for x in images]
        corrected = sum(as_slide(x, cast)[2] for x in arrays)  # as the cell window sees them
        rows = {"without": off.predict(arrays), "with": model.predict(arrays)}
        right = {k: sum(p.label == y for p, y in zip(v, labels)) for k, v in rows.items()}
        scores = {k: np.array([p.ood_score for p in v]) for k, v in rows.items()}
        if in_domain_scores is None:
            in_domain_scores, auroc = scores, ""
        else:
            auroc = " / ".join(f"{binary_auc(np.r_[np.zeros(len(in_domain_scores[k])), np.ones(len(s))], np.r_[in_domain_scores[k], s]):.3f}"
                               for k, s in scores.items())
        lines.append(f"| {name} | {corrected} | {share(right['without'], len(labels))} | {share(right['with'], len(labels))} | {auroc} |")
        print(lines[-1], flush=True)
    write_block("COLOUR-CAST", "\n".join(lines))


if __name__ == "__main__":
    main()
