"""The two parts of `wbc`'s out-of-distribution alarm: how well each tells other labs from the images it knows.

For each set of images: how many the shipped score flags (above its threshold) and how many its
content part alone would (the pooled features, the alarm before the style part, with a threshold
set as fit_ood sets one: the 95th percentile of the validation split's scores), how many are
`in_domain` false (the score, or a rule such as a corrected colour cast), and the AUROC of each
score against PBC's validation images. Sets: the `wbc` split's validation images (PBC and
BCCD, both labs it trains on), other labs (ALL-IDB2's 157 cells, its 72 normal ones, the 15 C-NMC
cells, Aria's 2,605 cells), and PBC's validation images under synthetic changes (a check of what
the alarm reacts to, not other labs). Validation data and labs no model here trains on only.
Writes the OOD-PARTS block of docs/benchmarks.md.

Usage: python benchmarks/ood_parts.py [--model wbc]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab import ROOT, SHARED  # noqa: E402
from doc import share, write_block  # noqa: E402
from specialist_gate import split_items  # noqa: E402

from leukoscope.checkpoint import load_checkpoint, resolve_model_path  # noqa: E402
from leukoscope.inference import Predictor, load_model  # noqa: E402
from leukoscope.metrics import binary_auc  # noqa: E402
from leukoscope.ood import IN_DOMAIN_QUANTILE  # noqa: E402
from leukoscope.perturb import PERTURBATIONS  # noqa: E402

SHIFTS = ["JPEG quality 30", "defocus blur r=1.5", "zoom x0.8", "zoom x1.25", "gamma 0.8 (brighter)", "white balance (1.1, 1.0, 0.85)",
          "stain: haematoxylin x1.3"]


def content_only(model_name: str) -> Predictor | None:
    """The model with its alarm's content part alone (the pooled features' distance), or None if it has no style part."""
    checkpoint = load_checkpoint(resolve_model_path(model_name))
    ood = checkpoint.get("ood") or {}
    if "style" not in ood:
        return None
    return Predictor({**checkpoint, "ood": {k: v for k, v in ood.items() if k != "style"}}, source=model_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wbc", help="a model with an alarm (default: the bundled wbc)")
    args = parser.parse_args()
    shipped, content = load_model(args.model), content_only(args.model)
    wbc_data = ROOT / "runs" / "data" / "wbc"
    pbc_val, pbc_labels = split_items("wbc.splits.csv", wbc_data, "val", lambda p: "bccd" not in p)
    bccd_val, bccd_labels = split_items("wbc.splits.csv", wbc_data, "val", lambda p: "bccd" in p)
    clean = [np.asarray(Image.open(p).convert("RGB")) for p in pbc_val]
    sets = {  # name -> (images, labels where the model's classes name them)
        "PBC validation (the reference)": (pbc_val, pbc_labels),
        "BCCD validation part (a training lab)": (bccd_val, bccd_labels),
        "ALL-IDB2, all 157 cells (another lab)": (sorted((SHARED / "all_idb2").rglob("*.tif")), None),
        "ALL-IDB2, its 72 normal cells": (sorted((SHARED / "all_idb2" / "normal").rglob("*.tif")), None),
        "C-NMC, 15 segmented cells (another lab)": (sorted((SHARED / "cnmc2019").rglob("*.bmp")), None),
        "Aria, 2,605 cells (another lab)": (sorted((SHARED / "aria_all").rglob("*.jpg")), None),
        **{f"PBC validation, {name} (synthetic)": ([PERTURBATIONS[name](x) for x in clean], pbc_labels) for name in SHIFTS},
    }
    scores: dict[str, dict[str, np.ndarray]] = {}
    flagged: dict[str, int] = {}
    right: dict[str, str] = {}
    for name, (images, labels) in sets.items():
        rows = shipped.predict(images)
        flagged[name] = sum(p.in_domain is False for p in rows)
        right[name] = share(sum(p.label == y for p, y in zip(rows, labels)), len(labels)) if labels else ""
        scores[name] = {"shipped": np.array([p.ood_score for p in rows])}
        if content is not None:
            scores[name]["content"] = np.array([p.ood_score for p in content.predict(images)])
        print(name, flagged[name], len(images), flush=True)
    reference = scores["PBC validation (the reference)"]
    val_content = np.r_[reference.get("content", []), scores["BCCD validation part (a training lab)"].get("content", [])]
    thresholds = {"shipped": shipped.ood_threshold, "content": np.percentile(val_content, IN_DOMAIN_QUANTILE) if len(val_content) else None}
    lines = [(f"`{args.model}` as shipped: `ood_score` threshold {shipped.ood_threshold:.3f}; its content part alone: the "
              f"{IN_DOMAIN_QUANTILE:.0f}th percentile of the validation split's content scores. Flagged: above the threshold; `in_domain` "
              "false: that, or a rule (a corrected colour cast, a painted background, a grayscale image, a thumbnail). 95% Wilson intervals."), "",
             ("| images | called right | flagged by the score | by its content part alone | `in_domain` false | "
              "AUROC vs PBC validation, the score | its content part alone |"),
             "|---|---|---|---|---|---|---|"]
    for name, parts in scores.items():
        n = len(parts["shipped"])
        above = {k: share(int((v > thresholds[k]).sum()), n) if thresholds.get(k) is not None else "" for k, v in parts.items()}
        aurocs = {k: "" if name == "PBC validation (the reference)" else
                  f"{binary_auc(np.r_[np.zeros(len(reference[k])), np.ones(len(v))].astype(bool), np.r_[reference[k], v]):.3f}"
                  for k, v in parts.items()}
        lines.append(f"| {name} | {right[name]} | {above['shipped']} | {above.get('content', '')} | {share(flagged[name], n)} | "
                     f"{aurocs['shipped']} | {aurocs.get('content', '')} |")
    write_block("OOD-PARTS", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
