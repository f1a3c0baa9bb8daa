"""Would `pbc` as a specialist for PBC-like images lift `wbc` on PBC? Measured on validation only.

`pbc` (PBC only, central crop) is right on more PBC validation images than `wbc` (two labs, cell
window), and its out-of-domain alarm rejects other labs' images. Gates compared, with both bundled
models as they ship (no training):
- gate: `pbc`'s call where `pbc` finds the image in its domain, `wbc`'s elsewhere;
- gate, averaged: the mean of both models' probabilities there instead of `pbc`'s alone;
- average: the mean everywhere.
Scored on PBC's validation split (8 types; both models share PBC's pinned split), BCCD's
validation part of the `wbc` split (neither model trained on it), ALL-IDB2's 38 white cells the
annotation is sure of (benchmarks/annotations/), the 15 C-NMC cells (B-lymphoid: `lymphocyte`),
and PBC's validation images under synthetic shifts of colour, magnification, blur and compression
(a check of the gate's failure modes, not another lab). Writes the SPECIALIST-GATE block of
docs/benchmarks.md.

Usage: python benchmarks/specialist_gate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab import ROOT, SHARED, third_lab  # noqa: E402
from doc import write_block  # noqa: E402

from leukoscope import perturb  # noqa: E402
from leukoscope.data import read_splits  # noqa: E402
from leukoscope.inference import load_model  # noqa: E402
from leukoscope.metrics import WBC_TYPES  # noqa: E402

SHIFTS = {
    "yellow cast (gains 1.1, 1.05, 0.7)": lambda x: perturb.white_balance(x, (1.1, 1.05, 0.7)),
    "strong yellow cast (1.15, 1.1, 0.55)": lambda x: perturb.white_balance(x, (1.15, 1.1, 0.55)),
    "blue cast (0.85, 0.95, 1.15)": lambda x: perturb.white_balance(x, (0.85, 0.95, 1.15)),
    "gamma 0.7": lambda x: perturb.gamma(x, 0.7),
    "magnification x0.7": lambda x: perturb.zoom(x, 0.7),
    "magnification x0.85": lambda x: perturb.zoom(x, 0.85),
    "magnification x1.4": lambda x: perturb.zoom(x, 1.4),
    "blur (radius 2)": lambda x: perturb.blur(x, 2),
    "JPEG quality 30": lambda x: perturb.jpeg(x, 30),
}


def split_items(splits_csv: str, folder: Path, part: str, keep=lambda path: True) -> tuple[list, list[str]]:
    samples, splits = read_splits(ROOT / "configs" / splits_csv)
    chosen = [s for s, k in zip(samples, splits) if k == part and keep(s.path)]
    return [folder / s.path for s in chosen], [s.label for s in chosen]


def image_sets() -> dict[str, tuple[list, list[str]]]:
    """The real images the white-cell benchmarks score, validation data and the third lab only: name -> (paths, labels)."""
    paths, types, sure = third_lab()

    def third(keep) -> tuple[list, list[str]]:
        return [p for p, t, s in zip(paths, types, sure) if keep(t, s)], [t for t, s in zip(types, sure) if keep(t, s)]

    cnmc = sorted((SHARED / "cnmc2019").rglob("*.bmp"))
    return {
        "PBC validation": split_items("pbc.splits.csv", SHARED / "pbc", "val"),
        "BCCD validation part": split_items("wbc.splits.csv", ROOT / "runs" / "data" / "wbc", "val", lambda p: "bccd" in p),
        "ALL-IDB2, sure white cells": third(lambda t, s: t in WBC_TYPES and s),
        "ALL-IDB2, all white cells": third(lambda t, s: t in WBC_TYPES),
        "ALL-IDB2, platelets": third(lambda t, s: t == "platelet"),
        "C-NMC cells (lymphocyte)": (cnmc, ["lymphocyte"] * len(cnmc)),
    }


def gates(models: dict, images: list, labels: list[str]) -> dict[str, int | str]:
    """Images right under each decision, and how many `pbc` took (found in its domain)."""
    pbc, wbc = (models[name].predict(images) for name in ("pbc", "wbc"))

    def mean(p, w) -> str:
        return max(w.probabilities, key=lambda c: p.probabilities[c] + w.probabilities[c])

    calls = {
        "`wbc`": [w.label for w in wbc],
        "`pbc`": [p.label for p in pbc],
        "gate": [p.label if p.in_domain else w.label for p, w in zip(pbc, wbc)],
        "gate, averaged": [mean(p, w) if p.in_domain else w.label for p, w in zip(pbc, wbc)],
        "average": [mean(p, w) for p, w in zip(pbc, wbc)],
    }
    right = {name: sum(c == y for c, y in zip(call, labels)) for name, call in calls.items()}
    return {"n": len(labels), "taken by pbc": sum(bool(p.in_domain) for p in pbc), **right}


def main() -> None:
    for name in ("pbc", "bccd_wbc", "all_idb2", "cnmc2019"):
        if not (SHARED / name).is_dir():
            sys.exit(f"specialist_gate: needs {SHARED / name}")
    wbc_data = ROOT / "runs" / "data" / "wbc"
    if not wbc_data.is_dir():
        sys.exit(f"specialist_gate: needs {wbc_data} (python tools/make_wbc_data.py --out {wbc_data})")
    models = {name: load_model(name) for name in ("pbc", "wbc")}
    sets = image_sets()
    pbc_paths, pbc_labels = sets["PBC validation"]
    rows = {name: gates(models, *sets[name])
            for name in ("PBC validation", "BCCD validation part", "ALL-IDB2, sure white cells", "C-NMC cells (lymphocyte)")}
    clean = [np.asarray(Image.open(path).convert("RGB")) for path in pbc_paths]
    for name, shift in SHIFTS.items():
        rows[f"PBC validation, {name} (synthetic)"] = gates(models, [shift(x) for x in clean], pbc_labels)
        print(name, rows[f"PBC validation, {name} (synthetic)"], flush=True)
    columns = ["`wbc`", "`pbc`", "gate", "gate, averaged", "average"]
    lines = ["Images right of n (validation data only); \"taken\": images `pbc` finds in its domain, where the gates use it.", "",
             "| images | n | taken | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {r['taken by pbc']} | " + " | ".join(str(r[c]) for c in columns) + " |")
    write_block("SPECIALIST-GATE", "\n".join(lines))


if __name__ == "__main__":
    main()
