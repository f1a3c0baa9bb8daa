"""On a CUDA GPU: prediction (bf16 autocast) and training against the CPU (fp32) on the same images, and their speeds.

    python benchmarks/gpu.py [--data ../shared/data/pbc] [--other FOLDER] [--models pbc wbc] [--epochs 8] [--block gpu]

Prediction: each bundled model on the validation images of `configs/pbc.splits.csv` (PBC images keep that
split in `wbc` too) through `Predictor.predict`, once with `--device cpu --backend torch` (fp32, the reference) and
once with `--device cuda`; the table gives both accuracies with 95% Wilson intervals, the calls that agree, the
largest probability difference, the `in_domain` flags that agree and, with `--other` (another lab's images), the
OOD AUROC on each device. Speed: images/s of the whole call (decoding and the cell localiser on the CPU
included) and of the network alone on windows already decoded (batch 256, timed with CUDA synchronisation).
Training: `leukoscope train` on those validation images (their own 70/15/15 split, `configs/pbc.yaml` with
`--epochs`) on each device, the same seed: its validation accuracy and images/s. Writes the `gpu` block of
docs/benchmarks.md. Not part of CI; exits with a note where PyTorch sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import add_block_argument, cpu, share, write_block  # noqa: E402

from leukoscope.cli import main as cli
from leukoscope.data import read_splits
from leukoscope.inference import iter_inputs, load_model
from leukoscope.metrics import binary_auc

ROOT = Path(__file__).resolve().parents[1]


def timed_predict(predictor, paths: list[Path]):
    predictor.predict(paths[:64])  # warm-up: CUDA context, cuDNN's algorithm choice
    started = time.perf_counter()
    predictions = predictor.predict(paths)  # its probabilities come back to the CPU: the GPU's work is done
    return predictions, len(paths) / (time.perf_counter() - started)


def network_rate(predictor, repeats: int = 20, batch: int = 256) -> float:
    """Images/s of the backend alone on uint8 windows already decoded."""
    x = torch.randint(0, 256, (batch, 3, predictor.image_size, predictor.image_size), dtype=torch.uint8)
    predictor.backend(x)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        predictor.backend(x)
    torch.cuda.synchronize()
    return repeats * batch / (time.perf_counter() - started)


def auroc(own: list, other: list) -> float:
    scores = [p.ood_score for p in own + other]
    return binary_auc([0] * len(own) + [1] * len(other), scores)


def compare(model: str, paths: list[Path], labels: list[str], other: list[Path]) -> str:
    reference, gpu = load_model(model, backend="torch", device="cpu"), load_model(model, device="cuda")
    (ref, ref_rate), (got, gpu_rate) = timed_predict(reference, paths), timed_predict(gpu, paths)
    n = len(paths)
    same = sum(a.label == b.label for a, b in zip(ref, got))
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(ref, got) for c in a.probabilities)
    flags = sum(a.in_domain == b.in_domain for a, b in zip(ref, got))
    ood = max(abs(a.ood_score - b.ood_score) / a.ood_score for a, b in zip(ref, got))
    lab = "-"
    if other:
        lab = f"{auroc(ref, reference.predict(other)):.3f} / {auroc(got, gpu.predict(other)):.3f}"
    hits = lambda predictions: sum(p.label == y for p, y in zip(predictions, labels))
    return (f"| `{model}` | {share(hits(ref), n)} | {share(hits(got), n)} | {same}/{n} | {diff:.4f} | {flags}/{n} (OOD score within "
            f"{100 * ood:.1f}%) | {lab} | {ref_rate:,.0f} / {gpu_rate:,.0f} | {network_rate(gpu):,.0f} |")


def train_row(data: Path, epochs: int, device: str, tmp: Path) -> str:
    out = tmp / device
    code = cli(["train", str(data), "--out", str(out), "--config", str(ROOT / "configs" / "pbc.yaml"), "--epochs", str(epochs),
                "--device", device, "--seed", "0"])
    if code != 0:
        return f"| {device} | failed (exit {code}) | | | |"
    run, val = json.loads((out / "run.json").read_text()), json.loads((out / "metrics.json").read_text())["val"]
    seen = sum(1 for s, k in zip(*read_splits(out / "splits.csv")) if k == "train") * int(run["epochs_run"])
    return (f"| {run['device']} ({run['precision']}) | {epochs} | {share(round(val['accuracy'] * val['n']), val['n'])} | "
            f"{run['train_seconds']:.0f} s | {seen / run['train_seconds']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc", help="PBC's folder (its validation images at least)")
    parser.add_argument("--other", type=Path, help="another lab's white-cell images, for the OOD AUROC")
    parser.add_argument("--models", nargs="+", default=["pbc", "wbc"])
    parser.add_argument("--epochs", type=int, default=8)
    add_block_argument(parser, "gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: PyTorch sees no CUDA GPU here; nothing measured")
    samples, kinds = read_splits(ROOT / "configs" / "pbc.splits.csv")
    chosen = [s for s, k in zip(samples, kinds) if k == "val"]
    paths, labels = [args.data / s.path for s in chosen], [s.label for s in chosen]
    other = iter_inputs([args.other]) if args.other else []
    lab = f"; other lab: {len(other)} images of {args.other.name}" if other else ""
    header = ("| model | CPU fp32: right | CUDA bf16: right | same call | max probability difference | same `in_domain` | "
              "OOD AUROC CPU / CUDA | `Predictor.predict` images/s, CPU / CUDA | CUDA network alone, images/s |")
    where = f"{torch.cuda.get_device_name(0)} (PyTorch {torch.__version__}, {cpu()})"
    lines = [f"Measured by `python benchmarks/gpu.py {' '.join(sys.argv[1:])}` on {where}, PBC's {len(paths):,} validation images "
             f"(split by image){lab}.", "", header, "|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        lines.append(compare(model, paths, labels, other))
        print(lines[-1], flush=True)
    lines += ["", f"Training `configs/pbc.yaml` on the same {len(paths):,} images (their own split by image, seed 0):", "",
              "| device (precision) | epochs | validation: right | training time | images/s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for path, label in zip(paths, labels):  # a folder of just these images, by class
            (data / label).mkdir(parents=True, exist_ok=True)
            (data / label / path.name).symlink_to(path.resolve())
        for device in ("cpu", "cuda"):
            lines.append(train_row(data, args.epochs, device, Path(tmp)))
            print(lines[-1], flush=True)
    write_block(args.block or "gpu", "\n".join(lines))


if __name__ == "__main__":
    main()
