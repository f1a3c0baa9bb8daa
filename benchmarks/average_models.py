"""Would averaging `wbc` with another white-cell model win back PBC accuracy? Validation data only.

`wbc` trades some PBC accuracy for other labs (strong colour jitter, docs/benchmarks.md). The
previous, light-jitter `wbc` bundle is more accurate on PBC's validation images and less so on a
third lab. This scores both, the mean (and the geometric mean) of their probabilities, and a gate (the other
model's call where its own out-of-domain alarm finds the image in domain, `wbc`'s elsewhere) on PBC's
validation split, BCCD's validation part, ALL-IDB2's annotated normal cells (benchmarks/annotations/)
and the 15 C-NMC cells (B-lymphoid: `lymphocyte`). Writes the AVERAGE-MODELS block of docs/benchmarks.md.

Usage (the light-jitter bundle is in the history of src/leukoscope/weights/wbc.pt):
    git show 9881f94^:src/leukoscope/weights/wbc.pt > /tmp/wbc_light.pt
    python benchmarks/average_models.py /tmp/wbc_light.pt

With several models (runs of the `wbc` recipe, say), it prints each one's images right and the
mean of all their probabilities with `wbc`'s (with --without-wbc, of theirs alone: an ensemble that would replace
`wbc`); with --print, or several models, docs/benchmarks.md is left as it is:
    python benchmarks/average_models.py runs/deep runs/wide
    python benchmarks/average_models.py runs/deep --print
    python benchmarks/average_models.py runs/e40s0 runs/e40s1 --without-wbc
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab import ROOT
from doc import write_block
from specialist_gate import image_sets

from leukoscope.inference import load_model


def load_all(paths: list[str]) -> dict:
    models = {"`wbc`": load_model("wbc"), **{path: load_model(path) for path in paths}}
    names = models["`wbc`"].class_names
    for path, model in models.items():
        if model.class_names != names:
            sys.exit(f"average_models: {path} has classes {model.class_names}, not {names}")
    return models


def main() -> None:
    flags = {"--print", "--without-wbc"}
    paths = [a for a in sys.argv[1:] if a not in flags]
    alone = "--without-wbc" in sys.argv[1:]
    if alone and len(paths) < 2:
        sys.exit("average_models: --without-wbc averages two or more models")
    write = len(paths) == 1 and "--print" not in sys.argv[1:]  # the block holds the table of one model against `wbc`
    if not paths or any(p.startswith("-") for p in paths):
        sys.exit(__doc__)
    if not (ROOT / "runs" / "data" / "wbc").is_dir():
        sys.exit("average_models: needs runs/data/wbc (python tools/make_wbc_data.py --out runs/data/wbc)")
    models = load_all(paths)
    names = models["`wbc`"].class_names
    single = len(paths) == 1
    columns = ["other", "mean", "geometric mean", "other where its alarm finds the image in domain, else `wbc` (taken)"] if single else \
        [*paths, "mean of those" if alone else "mean of all"]
    lines = ["| images | n | `wbc` | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for name, (images, labels) in image_sets().items():
        predictions = [m.predict(images) for m in models.values()]
        probs = [np.array([[p.probabilities[c] for c in names] for p in ps]) for ps in predictions]
        y = np.array([names.index(label) for label in labels])
        calls = [*probs, sum(probs[1:]) if alone else sum(probs)]
        taken = ""
        if single:
            in_domain = np.array([bool(p.in_domain) for p in predictions[1]])
            calls += [np.log(probs[0] + 1e-9) + np.log(probs[1] + 1e-9), np.where(in_domain[:, None], probs[1], probs[0])]
            taken = f" ({in_domain.sum()})"
        lines.append(f"| {name} | {len(y)} | " + " | ".join(str(int((c.argmax(1) == y).sum())) for c in calls) + taken + " |")
        print(lines[-1], flush=True)
    if write:
        write_block("AVERAGE-MODELS", "\n".join(lines))


if __name__ == "__main__":
    main()
