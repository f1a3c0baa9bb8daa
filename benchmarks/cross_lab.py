"""Leave-one-lab-out: how white-cell models do on a lab they were not trained on.

Rows (each trained by this script, on the pinned splits of configs/):
- trained on PBC only, tested on every BCCD field: the central crop of the bundled `pbc` recipe,
  then the cell-centric window, then the window with colour normalisation (white balance, or
  Reinhard with HED stain jitter), or with the strong colour and HED jitter of the `wbc` recipe;
- trained on PBC plus 60% of BCCD (the `wbc` recipe and its ablations), tested on the BCCD images
  they never saw (the 20% test part).
Every row is also scored on PBC's validation split (never its test split: these rows choose recipes).
Each BCCD test is scored without test-time adaptation, with `--adapt` as it ships (BatchNorm statistics
re-estimated on the BCCD test images, then, for cell-window models, entropy minimisation on the
BatchNorm scales and shifts) and with `--adapt-steps 0` (the statistics alone, AdaBN).
The 5 white-cell types are scored from the full 8-class decision (a BCCD neutrophil called
"ig" is wrong). The OOD AUROC separates PBC test images (in-domain) from BCCD test images by
each model's ood_score (PBC validation images as the in-domain ones). A third lab: ALL-IDB2's 72 normal
cells (Milan; no row trains on them), whose types we annotated from the images
(benchmarks/annotations/all_idb2_normal_types.csv): the 54 white cells among them are scored the same
way, plain and with `--adapt` on the 72 cells; "sure" counts the 38 calls the annotation is sure of.
Writes the CROSS-LAB block of docs/benchmarks.md.

Usage: python benchmarks/cross_lab.py [--epochs N] [--rows NAME ...] [--runs runs/cross_lab]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope.adapt import adapt_to_files  # noqa: E402
from leukoscope.data import detect_layout, read_splits  # noqa: E402
from leukoscope.data.splits import unseen_samples  # noqa: E402
from leukoscope.inference import load_model  # noqa: E402
from leukoscope.metrics import WBC_TYPES, binary_auc, wilson_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# name -> (data, base config, overrides): the rows of the table. LIGHT: the colour jitter of the
# previous `wbc` recipe (configs/wbc.yaml now has strong colour and HED jitter).
LIGHT = {"augment": {"brightness": 0.15, "contrast": 0.15, "saturation": 0.2, "hue": 0.03, "hed": 0.0, "hed_shift": 0.0}}
WHITE = {"colour_norm": "white", **LIGHT}
REINHARD_HED = {"colour_norm": "reinhard", "augment": {**LIGHT["augment"], "hed": 0.2, "hed_shift": 0.02}}
ROWS = {
    "pbc: central crop": ("pbc", "configs/pbc.yaml", {}),
    "pbc: cell window": ("pbc", "configs/wbc.yaml", LIGHT),
    "pbc: cell window + white balance": ("pbc", "configs/wbc.yaml", WHITE),
    "pbc: cell window + Reinhard + HED jitter": ("pbc", "configs/wbc.yaml", REINHARD_HED),
    "pbc: cell window + strong colour jitter": ("pbc", "configs/wbc.yaml", {}),
    "pbc+bccd: central crop": ("wbc", "configs/pbc.yaml", {}),
    "pbc+bccd: cell window (the previous wbc recipe)": ("wbc", "configs/wbc.yaml", LIGHT),
    "pbc+bccd: cell window + strong colour jitter (the wbc recipe)": ("wbc", "configs/wbc.yaml", {}),
}


def train_row(name: str, out: Path, epochs: int | None, wbc_data: Path) -> Path:
    data, base, overrides = ROWS[name]
    config = yaml.safe_load((ROOT / base).read_text())
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    if epochs is not None:
        config["epochs"] = epochs
    if (out / "model.pt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"  # beside the run: a run folder holds only what leukoscope wrote
    recipe.write_text(yaml.safe_dump(config))
    splits = ROOT / "configs" / ("pbc.splits.csv" if data == "pbc" else "wbc.splits.csv")
    (out / "splits.csv").write_bytes(splits.read_bytes())
    folder = SHARED / "pbc" if data == "pbc" else wbc_data
    subprocess.run([sys.executable, "-m", "leukoscope", "train", str(folder), "--out", str(out), "--config", str(recipe),
                    "--force"], check=True)
    return out


def unseen(model, folder: Path) -> tuple[list[Path], list[str]]:
    """Images of ``folder`` the model neither trained nor validated on, and their labels."""
    dataset = detect_layout(folder)
    chosen = unseen_samples(dataset, model.checkpoint.get("seen_images"))
    return [dataset.abspath(s) for s in chosen], [s.label for s in chosen]


def score(model, paths: list[Path], labels: list[str], adapt: bool, steps: int | None = None) -> dict:
    if adapt:  # as `--adapt` does it
        model = adapt_to_files(model, paths, steps, lambda text: None)
    predictions = model.predict(paths)
    right = sum(p.label == y for p, y in zip(predictions, labels))
    low, high = wilson_interval(right, len(labels))
    found = [p.localised for p in predictions if p.localised is not None]
    return {"n": len(labels), "right": right, "accuracy": right / len(labels), "ci": [low, high],
            "ood": [p.ood_score for p in predictions], "localised": float(np.mean(found)) if found else None,
            "out_of_domain": int(sum(p.in_domain is False for p in predictions))}


@functools.lru_cache(maxsize=1)
def third_lab() -> tuple[list[Path], list[str], list[bool]]:
    """ALL-IDB2's normal cells with their annotated types, and whether the annotation is sure.

    The annotation covers the 72 normal cells of ../shared/data/all_idb2; a copy whose files differ
    (sha256) is refused rather than scored against the wrong labels."""
    import csv
    import hashlib

    folder = SHARED / "all_idb2"
    rows = list(csv.DictReader((ROOT / "benchmarks" / "annotations" / "all_idb2_normal_types.csv").open()))
    paths = [folder / row["path"] for row in rows]
    for path, row in zip(paths, rows):
        if hashlib.sha256(path.read_bytes()).hexdigest() != row["sha256"]:
            sys.exit(f"cross_lab: {path} is not the image the annotation describes (sha256 differs)")
    return paths, [row["type"] for row in rows], [row["certain"] == "yes" for row in rows]


def score_third_lab(model, adapt: bool) -> dict:
    """The 8-class call on ALL-IDB2's annotated white cells (adapting, if asked, on all 72 normal cells)."""
    paths, types, sure = third_lab()
    if adapt:
        model = adapt_to_files(model, paths, None, lambda text: None)
    predictions = model.predict(paths)
    calls = [p.label for p in predictions]
    result = {"ood": [p.ood_score for p in predictions]}
    for name, keep in (("sure", [t in WBC_TYPES and s for t, s in zip(types, sure)]), ("all", [t in WBC_TYPES for t in types])):
        right = sum(c == t for c, t, k in zip(calls, types, keep) if k)
        n = sum(keep)
        result[name] = {"n": n, "right": right, "accuracy": right / n, "ci": list(wilson_interval(right, n))}
    platelets = [c for c, t in zip(calls, types) if t == "platelet"]
    result["platelets_called_platelet"] = f"{platelets.count('platelet')}/{len(platelets)}"
    if adapt:
        result.pop("ood")  # the alarm is off after adapting
    return result


def evaluate_row(run: Path | str) -> dict:
    model = load_model(run)
    bccd_paths, bccd_labels = unseen(model, SHARED / "bccd_wbc")
    samples, splits = read_splits(ROOT / "configs" / "pbc.splits.csv")
    pbc_val = [(SHARED / "pbc" / s.path, s.label) for s, k in zip(samples, splits) if k == "val"]
    pbc = score(model, [p for p, _ in pbc_val], [y for _, y in pbc_val], adapt=False)
    plain, adapted = score(model, bccd_paths, bccd_labels, False), score(model, bccd_paths, bccd_labels, True)
    statistics_only = score(model, bccd_paths, bccd_labels, True, steps=0)
    auroc = binary_auc(np.r_[np.zeros(len(pbc["ood"])), np.ones(len(plain["ood"]))], np.r_[pbc["ood"], plain["ood"]])
    drop = ("ood",)
    idb = score_third_lab(model, False) if (SHARED / "all_idb2").is_dir() else None
    idb_auroc = None
    if idb:
        ood = idb.pop("ood")
        idb_auroc = binary_auc(np.r_[np.zeros(len(pbc["ood"])), np.ones(len(ood))], np.r_[pbc["ood"], ood])
    return {"pbc_val": {k: v for k, v in pbc.items() if k not in drop}, "bccd": {k: v for k, v in plain.items() if k not in drop},
            "bccd_adapt": {k: v for k, v in adapted.items() if k not in drop},
            "bccd_adabn": {k: v for k, v in statistics_only.items() if k not in drop}, "ood_auroc": auroc,
            "idb": idb, "idb_adapt": score_third_lab(model, True) if idb else None, "idb_ood_auroc": idb_auroc,
            "train_seconds": model.checkpoint.get("train_seconds")}


def cell(result: dict) -> str:
    low, high = result["ci"]
    return f"{100 * result['accuracy']:.1f}% ({100 * low:.1f}-{100 * high:.1f}) of {result['n']}"


def third_cell(result: dict | None) -> str:
    if result is None:
        return "(../shared/data/all_idb2 absent)"
    sure, every = result["sure"], result["all"]
    return f"{100 * sure['accuracy']:.0f}% ({100 * sure['ci'][0]:.0f}-{100 * sure['ci'][1]:.0f}) of {sure['n']} sure; {every['right']}/{every['n']} in all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "cross_lab")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--epochs", type=int, default=None, help="train each row this many epochs (default: its config's)")
    parser.add_argument("--wbc-data", type=Path, default=ROOT / "runs" / "data" / "wbc", help="made by tools/make_wbc_data.py")
    parser.add_argument("--bundled", nargs="*", default=["pbc", "wbc"], help="bundled models scored as they ship (not retrained)")
    args = parser.parse_args()
    if not (SHARED / "bccd_wbc").is_dir() or not (SHARED / "pbc").is_dir():
        sys.exit(f"cross_lab: needs {SHARED}/pbc and {SHARED}/bccd_wbc")
    if not args.wbc_data.is_dir():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_wbc_data.py"), "--out", str(args.wbc_data)], check=True)
    results = {}
    for name in args.rows:
        folder = name.split(" (")[0].replace(": ", "_").replace(" + ", "_").replace(" ", "-")
        run = train_row(name, args.runs / folder, args.epochs, args.wbc_data)
        results[name] = evaluate_row(run)
        print(name, json.dumps(results[name]), flush=True)
    for name in args.bundled:
        results[f"bundled `{name}` (as shipped)"] = evaluate_row(name)
        print(name, json.dumps(results[f"bundled `{name}` (as shipped)"]), flush=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"{len(results)} rows; epochs: {args.epochs or 'each config'}; 95% Wilson intervals. BCCD: its fields the row's model never saw "
             "(all 351 for PBC-only rows; the 20% test part otherwise). PBC: the pinned validation split (1,030 images). ALL-IDB2: "
             "the white cells among its 72 normal cells, types annotated by us (benchmarks/annotations/); sure: the 38 the "
             "annotation is sure of; --adapt adapts on all 72 cells.", "",
             "| trained on: preprocessing | BCCD, 5 types | BCCD with --adapt | BCCD with --adapt-steps 0 (AdaBN) | PBC validation, 8 types | "
             "OOD AUROC PBC vs BCCD | out of domain: PBC val / BCCD | cell located on BCCD | ALL-IDB2 (third lab), 5 types | "
             "ALL-IDB2 with --adapt | OOD AUROC PBC vs ALL-IDB2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        located = "" if r["bccd"]["localised"] is None else f"{100 * r['bccd']['localised']:.0f}%"
        flagged = f"{100 * r['pbc_val']['out_of_domain'] / r['pbc_val']['n']:.1f}% / {100 * r['bccd']['out_of_domain'] / r['bccd']['n']:.1f}%"
        lines.append(f"| {name} | {cell(r['bccd'])} | {cell(r['bccd_adapt'])} | {cell(r['bccd_adabn'])} | {cell(r['pbc_val'])} | "
                     f"{r['ood_auroc']:.3f} | {flagged} | {located} | {third_cell(r.get('idb'))} | {third_cell(r.get('idb_adapt'))} | "
                     f"{'' if r.get('idb_ood_auroc') is None else format(r['idb_ood_auroc'], '.3f')} |")
    write_block("CROSS-LAB", "\n".join(lines))


if __name__ == "__main__":
    main()
