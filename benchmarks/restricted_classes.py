"""`wbc` choosing among the 5 normal white-cell types only (`--classes`), against its own 8-class call.

A lab whose images can hold only some types can say so (`leukoscope predict wbc ... --classes
basophil,eosinophil,lymphocyte,monocyte,neutrophil`). Scored on validation data and the third lab
(benchmarks/specialist_gate.py's image_sets: PBC's validation split, BCCD's validation part, ALL-IDB2's
annotated normal cells, C-NMC's 15 B-lymphoid cells as `lymphocyte`), the images of the 5 types only.
Writes the RESTRICTED-CLASSES block of docs/benchmarks.md.

Usage: python benchmarks/restricted_classes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from specialist_gate import image_sets
from doc import share, write_block

from leukoscope.classes import restrict_classes
from leukoscope.inference import load_model
from leukoscope.metrics import WBC_TYPES


def main() -> None:
    wbc = load_model("wbc")
    five = restrict_classes(wbc, sorted(WBC_TYPES))
    lines = ["| images of the 5 types | `wbc`, 8 classes | `wbc --classes` (the 5 types) |", "|---|---|---|"]
    for name, (paths, labels) in image_sets().items():
        kept = [(p, y) for p, y in zip(paths, labels) if y in WBC_TYPES]
        if not kept:
            continue
        paths, labels = [p for p, _ in kept], [y for _, y in kept]
        right = [sum(p.label == y for p, y in zip(model.predict(paths), labels)) for model in (wbc, five)]
        lines.append(f"| {name} | " + " | ".join(share(r, len(labels)) for r in right) + " |")
        print(lines[-1], flush=True)
    write_block("RESTRICTED-CLASSES", "\n".join(lines))


if __name__ == "__main__":
    main()
