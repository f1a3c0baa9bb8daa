"""Robustness of a bundled model to another lab's look: accuracy on our test split under perturbations.

    .venv/bin/python benchmarks/robustness.py --model pbc

Each test image is decoded at full resolution, perturbed (stain, white balance, hue, gamma,
zoom, blur, JPEG; see leukoscope/perturb.py), then preprocessed as the model expects. For pbc
the 5 common WBC types are scored with the argmax over those 5 classes, as the domain-shift
goal asks. Writes the ROBUSTNESS block of docs/benchmarks.md. Not part of CI.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope import load_model  # noqa: E402
from leukoscope.data import detect_layout, read_splits  # noqa: E402
from leukoscope.images import frame, load_rgb  # noqa: E402
from leukoscope.io import sha256_file
from leukoscope.metrics import WBC_TYPES  # noqa: E402
from leukoscope.perturb import PERTURBATIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WBC5 = list(WBC_TYPES)
FOLDERS = {"pbc": "pbc", "aria-all": "aria_all"}


def model_splits(data: Path, predictor):
    """(dataset, splits) of the model's run: the split it was bundled with (configs/NAME.splits.csv),
    checked against the sha256 its checkpoint recorded."""
    dataset = detect_layout(data)
    pinned = ROOT / "configs" / f"{predictor.checkpoint.get('bundled_name', '')}.splits.csv"
    if not pinned.is_file() or predictor.checkpoint.get("splits_sha256") not in (None, "", sha256_file(pinned)):
        raise SystemExit(f"could not find the split the model was bundled with ({pinned})")
    samples, pinned_splits = read_splits(pinned)
    by_path = dict(zip((s.path for s in samples), pinned_splits))
    return dataset, [by_path[s.path] for s in dataset.samples]


def test_split(data: Path, predictor):
    dataset, splits = model_splits(data, predictor)
    return [(dataset.abspath(s), s.label) for s, k in zip(dataset.samples, splits) if k == "test"]


def accuracy(predictor, items, perturb, wbc5: bool) -> float:
    def prep(path):
        return frame(perturb(load_rgb(path)), predictor.view)[0]

    with ThreadPoolExecutor(4) as pool:
        arrays = list(pool.map(prep, [p for p, _ in items]))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    probs = np.concatenate([predictor.predict_proba(batch[i : i + 256]) for i in range(0, len(batch), 256)])
    names = predictor.class_names
    labels = np.array([names.index(label) for _, label in items])
    calls = np.array([predictor.decide(p) for p in probs])  # the model's own call over all its classes
    if wbc5:
        keep = np.isin(labels, [names.index(c) for c in WBC5])
        return float((calls[keep] == labels[keep]).mean())
    return float((calls == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbc", help="bundled name or run folder")
    parser.add_argument("--data", type=Path, help="dataset folder (default: the bundled model's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    predictor = load_model(args.model)
    items = test_split(args.data or DATA / FOLDERS[args.model], predictor)
    wbc5 = all(c in predictor.class_names for c in WBC5)
    rows = []
    for name, perturb in PERTURBATIONS.items():
        rows.append((name, accuracy(predictor, items, perturb, wbc5)))
        print(f"{name:40s} {rows[-1][1]:.4f}", flush=True)
    if args.no_write:
        return
    what = "the cells of the 5 WBC types (the model's call over all its classes)" if wbc5 else "all classes"
    lines = [f"_Measured {datetime.date.today()} by `benchmarks/robustness.py --model {args.model}`: {len(items)} test images, "
             f"accuracy on {what}, model's default inference._", "", "| perturbation | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.4f} |" for name, acc in rows]
    write_block(f"ROBUSTNESS-{args.model.upper()}", "\n".join(lines))


if __name__ == "__main__":
    main()
