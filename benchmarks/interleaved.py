"""Compare the prediction speed of models (or code versions) in interleaved rounds on the same files.

    .venv/bin/python benchmarks/interleaved.py --models pbc runs/pbc_previous/model.pt --n 2048 --rounds 3

or code versions: ``--against SRC`` times each model with this checkout's code and with the package
under SRC (another checkout's ``src``: ``git worktree add /tmp/old COMMIT``, then ``--against /tmp/old/src``;
a bundled name then means each version's own bundled model).

This shared machine's speed drifts by 20-30% within minutes, so two pipelines timed minutes apart
cannot be compared; here every round times each model once, in turn, each in a fresh process
(Python API, ``precision``, the first 64 files predicted once to warm up, then the next ``n``
timed). Prints images/s per model and round. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pbc"

CHILD = """
import sys, time
import leukoscope
from leukoscope.io import iter_image_files
model, folder, n, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
files = list(iter_image_files([folder]))
if len(files) < n + 64:
    sys.exit(f"{folder} holds {len(files)} images; need {n + 64}")
predictor = leukoscope.load_model(model, precision=precision)
predictor.predict(files[:64])
start = time.perf_counter()
predictor.predict(files[64 : 64 + n])
print(n / (time.perf_counter() - start))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="bundled names, run folders or checkpoints")
    parser.add_argument("--data", type=Path, default=DATA, help="a folder of images (searched recursively)")
    parser.add_argument("--n", type=int, default=2048, help="images timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="int8", choices=["auto", "fp32", "int8"])
    parser.add_argument("--against", type=Path, help="also time each model with the leukoscope package under this folder (another checkout's src)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"interleaved: no image folder at {args.data}")
    if args.against is not None and not (args.against / "leukoscope" / "__init__.py").is_file():
        sys.exit(f"interleaved: no leukoscope package under {args.against} (give a checkout's src folder)")
    codes = {"": ROOT / "src", **({f" [{args.against}]": args.against} if args.against else {})}
    runs = [(model + tag, model, src) for model in args.models for tag, src in codes.items()]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for round_ in range(args.rounds):
        for name, model, src in runs:
            env = {**os.environ, "PYTHONPATH": str(src.resolve())}
            out = subprocess.run([sys.executable, "-c", CHILD, model, str(args.data), str(args.n), args.precision],
                                 capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                sys.exit(f"interleaved: {name}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:,.0f} images/s", flush=True)
    for name, values in rates.items():
        print(f"{name}: " + ", ".join(f"{v:,.0f}" for v in values) + " images/s")


if __name__ == "__main__":
    main()
