"""Build the multi-lab white-cell training set of the bundled `wbc` model: PBC and BCCD in one folder.

The folder holds symbolic links only (no image is copied): ``OUT/<class>/<lab>__<file>``, one class
folder per PBC type (BCCD's five types are a subset), and ``OUT/manifest.csv`` (``file,cls,lab,sha256``
from the two sets' manifests), whose sha256 the bundled model records. Its ``splits.csv`` keeps each PBC image in
the split of the bundled `pbc` model (configs/pbc.splits.csv: the two models share their PBC test
images) and splits BCCD by image, stratified by class and seeded: 60% train, 20% val, 20% test
(BCCD has no patient ids; near-identical fields are grouped, as every split here).

With ``--subtypes`` the neutrophils and immature granulocytes go into folders of their stages, which
PBC's file names give (``BNE_`` band, ``SNE_`` segmented; ``MMY_`` metamyelocyte, ``MY_`` myelocyte,
``PMY_`` promyelocyte): ``neutrophil_band``, ``ig_myelocyte``, ... A name without a stage (PBC's
``NEUTROPHIL_`` and ``IG_``, BCCD's neutrophils) goes to segmented (the commonest neutrophil in blood)
or myelocyte (PBC's largest ig stage). A model trained on this tree with ``--merge-classes`` learns the
stages and reports the 8 types (docs/benchmarks.md, "A third lab", has the command; it won no PBC
images). Its split is configs/wbc.splits.csv's, each image in the same part (``--splits`` writes it
with the new paths).

Usage: python tools/make_wbc_data.py --shared ../shared/data --out runs/data/wbc [--splits configs/wbc.splits.csv] [--subtypes]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABS = ("pbc", "bccd_wbc")
SEPARATOR = "__"
STAGES = {"neutrophil": {"BNE": "band", "SNE": "segmented", "": "segmented"},
          "ig": {"MMY": "metamyelocyte", "MY": "myelocyte", "PMY": "promyelocyte", "": "myelocyte"}}


def folder_of(cls: str, lab: str, file: str, subtypes: bool) -> str:
    """The class folder of an image: its class, or with ``subtypes`` its stage (see the module's docstring)."""
    if not subtypes or cls not in STAGES:
        return cls
    prefix = Path(file).name.split("_", 1)[0] if lab == "pbc" else ""
    return f"{cls}_{STAGES[cls].get(prefix, STAGES[cls][''])}"


def link_tree(shared: Path, out: Path, subtypes: bool = False) -> list[tuple[str, str, str]]:
    """Create the links; returns (path in OUT, class folder, lab) per image."""
    if out.exists():
        shutil.rmtree(out)
    rows = []
    for lab in LABS:
        with open(shared / lab / "manifest.csv", newline="") as handle:
            for entry in csv.DictReader(handle):
                name = f"{lab}{SEPARATOR}{Path(entry['file']).name}"
                folder = folder_of(entry["cls"], lab, entry["file"], subtypes)
                link = out / folder / name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((shared / lab / entry["file"]).resolve(), link)
                rows.append((f"{folder}/{name}", folder, lab, entry["sha256"]))
    rows.sort()
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "cls", "lab", "sha256"])
        writer.writerows(rows)
    return [row[:3] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "data" / "wbc")
    parser.add_argument("--splits", type=Path, default=None, help="write the split here (default: OUT/../wbc.splits.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subtypes", action="store_true", help="neutrophil and ig stages in folders of their own")
    args = parser.parse_args()
    rows = link_tree(args.shared, args.out, args.subtypes)
    print(f"{len(rows)} links under {args.out}")
    if args.splits is None:
        return
    args.splits.parent.mkdir(parents=True, exist_ok=True)
    if args.subtypes:  # the 8-type model's split, each image in the same part under its stage folder
        with open(ROOT / "configs" / "wbc.splits.csv", newline="") as handle:
            split_of = {Path(r["path"]).name: r["split"] for r in csv.DictReader(handle)}
        with open(args.splits, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient", "split"])
            writer.writerows((path, folder, "", split_of[Path(path).name]) for path, folder, _ in rows)
        print(f"split written to {args.splits} (configs/wbc.splits.csv's, by stage folder)")
        return
    from leukoscope.data import Dataset, detect_layout, make_splits, write_splits

    with open(ROOT / "configs" / "pbc.splits.csv", newline="") as handle:
        pbc_split = {r["path"]: r["split"] for r in csv.DictReader(handle)}
    dataset = detect_layout(args.out)
    bccd = [s for s in dataset.samples if Path(s.path).name.startswith("bccd_wbc" + SEPARATOR)]
    bccd_splits, _ = make_splits(Dataset(dataset.root, dataset.layout, bccd, dataset.classes, []), (0.6, 0.2, 0.2), args.seed, by="image")
    by_path = dict(zip((s.path for s in bccd), bccd_splits))
    splits = []
    for s in dataset.samples:
        lab, name = Path(s.path).name.split(SEPARATOR, 1)
        splits.append(by_path[s.path] if lab == "bccd_wbc" else pbc_split[f"{s.label}/{name}"])
    write_splits(args.splits, dataset.samples, splits)
    print(f"split written to {args.splits}: " + ", ".join(f"{k} {splits.count(k)}" for k in ("train", "val", "test")))


if __name__ == "__main__":
    main()
