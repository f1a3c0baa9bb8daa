"""How much must a new lab label? Fine-tune on N labelled images per class of `bccd_wbc`, test on the rest.

For each budget N (5, 10, 20, 50 images per class, capped so that every class keeps at least
MIN_TEST images for testing), N images of each class train the model and 2 per class validate it
(early stopping, temperature); every other image is test. Each budget runs from scratch and
fine-tuned from a bundled model (``--init``). Classes with fewer than N_MIN images in all are left
out (BCCD holds 3 basophils). Writes the LABEL-BUDGET block of docs/benchmarks.md and a plot.

Usage: python benchmarks/label_budget.py [--init pbc] [--budgets 5 10 20 50] [--epochs 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope.config import TrainConfig, inherited_settings  # noqa: E402
from leukoscope.data import Dataset, detect_layout  # noqa: E402
from leukoscope.metrics import wilson_interval  # noqa: E402
from leukoscope.train import train_cnn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bccd_wbc"
MIN_TEST, N_VAL, N_MIN = 5, 2, 15


def budget_split(dataset: Dataset, n: int, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """train: n per class (capped), val: N_VAL per class, test: the rest; returns splits and the n used per class."""
    rng = np.random.default_rng(seed)
    splits, used = ["test"] * len(dataset.samples), {}
    for label in dataset.classes:
        members = [i for i, s in enumerate(dataset.samples) if s.label == label]
        order = [members[j] for j in rng.permutation(len(members))]
        take = min(n, len(members) - N_VAL - MIN_TEST)
        used[label] = take
        for i in order[:take]:
            splits[i] = "train"
        for i in order[take : take + N_VAL]:
            splits[i] = "val"
    return splits, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--init", default="pbc", help="the bundled model (or run) to fine-tune from")
    parser.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224, help="the white cell is small in a 640x480 field")
    args = parser.parse_args()
    full = detect_layout(args.data)
    keep = [c for c in full.classes if sum(s.label == c for s in full.samples) >= N_MIN]
    dataset = Dataset(full.root, full.layout, [s for s in full.samples if s.label in keep], keep, full.notes)
    base = TrainConfig(epochs=args.epochs, batch_size=16, image_size=args.image_size, crop=1.0, patience=args.epochs)
    inherited = {k: v for k, v in inherited_settings(args.init).items() if k in ("arch", "arch_kwargs")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.budgets:
            splits, used = budget_split(dataset, n)
            for start, config in (("scratch", replace(base, arch=inherited["arch"], arch_kwargs=inherited["arch_kwargs"])),
                                  (f"--init {args.init}", replace(base, init=args.init, **inherited))):
                metrics = train_cnn(args.data, Path(tmp) / f"{n}-{start.replace(' ', '')}", config, given=(dataset, splits, "image"))
                test = metrics["test"]
                hits = round(test["accuracy"] * test["n"])
                rows.append({"n": n, "used": used, "start": start, "n_test": test["n"], "accuracy": test["accuracy"],
                             "ci": wilson_interval(hits, test["n"]), "balanced_accuracy": test["balanced_accuracy"],
                             "bacc_ci": test["balanced_accuracy_ci"]})
                print(rows[-1], flush=True)
    plot(rows, ROOT / "docs" / "label_budget.png")
    lines = [f"`python benchmarks/label_budget.py --init {args.init}`: {args.image_size} px whole fields, {args.epochs} epochs, "
             f"classes {', '.join(keep)} (basophils left out: 3 in all); {N_VAL} per class validate, the rest is test.", "",
             "| labelled per class (used) | start | test images | accuracy (95% CI) | balanced accuracy (95% CI) |", "|---|---|---|---|---|"]
    for r in rows:
        used = "/".join(str(v) for v in r["used"].values())
        lines.append(f"| {r['n']} ({used}) | {r['start']} | {r['n_test']} | {r['accuracy']:.1%} ({r['ci'][0]:.1%}-{r['ci'][1]:.1%}) | "
                     f"{r['balanced_accuracy']:.1%} ({r['bacc_ci'][0]:.1%}-{r['bacc_ci'][1]:.1%}) |")
    lines += ["", "![accuracy against labelled images per class](label_budget.png)"]
    write_block("LABEL-BUDGET", "\n".join(lines))
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for start, style in zip(dict.fromkeys(r["start"] for r in rows), ("-o", "-s")):
        mine = [r for r in rows if r["start"] == start]
        x = [r["n"] for r in mine]
        y = [r["balanced_accuracy"] for r in mine]
        low = [r["balanced_accuracy"] - r["bacc_ci"][0] for r in mine]
        high = [r["bacc_ci"][1] - r["balanced_accuracy"] for r in mine]
        ax.errorbar(x, y, yerr=[low, high], fmt=style, capsize=3, label=start)
    ax.set(xscale="log", xlabel="labelled images per class (bccd_wbc)", ylabel="test balanced accuracy", title="How much must a lab label?")
    ax.minorticks_off()
    ax.set_xticks([r["n"] for r in rows], [str(r["n"]) for r in rows])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
