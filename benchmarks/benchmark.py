"""Reproduce the speed, memory, efficiency and accuracy figures and write docs/benchmarks.md.

    .venv/bin/python benchmarks/benchmark.py [--model pbc|aria-all|wbc] [--small 64] [--large 8192] [--reference-large 512] [--block NAME]

Throughput is end to end (`leukoscope predict MODEL FOLDER --out preds.csv` in a fresh process,
decoding and CSV writing included) and marginal: (large - small) / (t_large - t_small), so that
start-up is excluded; medians over interleaved repeats (see ``throughput``). The reference recipe
(benchmarks/reference_predict.py) is measured in the same run on folders of the same JPEGs (the
model's own dataset, or ``--data``). Each model writes its own block of
docs/benchmarks.md (or the block --block names). Where PyTorch sees a GPU, a `--device cuda` row is added (the other rows stay
on the CPU). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import add_block_argument, cpu, write_block  # noqa: E402

from leukoscope.inference import TTA_VIEWS  # noqa: E402
from leukoscope.runtime import cpu_info
from leukoscope.trainer import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command run in a fresh child process."""
    wrapper = ("import resource,subprocess,sys,time;t=time.perf_counter();r=subprocess.run(sys.argv[1:]);"
               "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=False)
    if out.returncode != 0:  # a crash exits 1 as a failed image does: neither is a timing of the pipeline (every JPEG here reads)
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    seconds, rss_kb = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss_kb) / 1024


def make_folder(images: list[Path], n: int, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for i in range(n):
        src = images[i % len(images)]
        shutil.copyfile(src, dest / f"{i:05d}{src.suffix}")
    return dest


def pipelines(model: str, default_tta: str) -> dict[str, tuple[str, list[str]]]:
    """Label and CLI arguments of each measured pipeline: the default, fp32, PyTorch (and CUDA), and the other TTA setting."""
    cli = [str(ROOT / ".venv" / "bin" / "leukoscope"), "predict", model, "--device", "cpu"]
    default = "ONNX Runtime" + ("" if default_tta == "none" else f", {default_tta} TTA ({TTA_VIEWS[default_tta]} views)")
    other = (["--tta", "flip"], "2 views") if default_tta == "none" else (["--no-tta"], "1 view")
    return {"default": (f"`leukoscope predict {model}` (default: {default}, `--precision auto`)", cli),
            "fp32": (f"`leukoscope predict {model} --precision fp32` (ONNX Runtime fp32)", [*cli, "--precision", "fp32"]),
            "torch": (f"`leukoscope predict {model} --backend torch` (PyTorch)", [*cli, "--backend", "torch"]),
            **({"cuda": (f"`leukoscope predict {model} --device cuda` (PyTorch, bf16 autocast, {torch.cuda.get_device_name(0)})",
                         [*cli, "--device", "cuda"])} if torch.cuda.is_available() else {}),  # the later --device wins
            "other": (f"`leukoscope predict {model} {' '.join(other[0])}` ({other[1]}, ONNX Runtime)", [*cli, *other[0]]),
            "reference": ("reference: ResNet-18 224 px fp32 eager, PIL, batch 64",
                          [sys.executable, str(ROOT / "benchmarks" / "reference_predict.py")])}


def throughput(runs_of: dict[str, tuple[str, list[str]]], images: list[Path], small: int, large: int, repeats: int,
               reference_large: int) -> dict:
    """Marginal images/s of each pipeline between a ``small`` and a large folder (``reference_large`` for
    the reference, ``large`` for the others), and its ratio to the reference.

    A large run should last several seconds beyond start-up, whose own time varies by about half a second
    on this shared machine: our pipelines get thousands of images, the 30-45 images/s reference hundreds.
    Each repeat gives a marginal rate per pipeline and its ratio to the reference of the same repeat
    (minutes apart at most); the medians over repeats resist the machine's drift better than the fastest
    small and large runs taken from different repeats."""
    sizes = {name: (small, reference_large if name == "reference" else large) for name in runs_of}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {n: make_folder(images, n, Path(tmp) / f"f{n}") for n in {small, large, reference_large}}
        warm_up = [*runs_of["default"][1], str(folders[small]), "--out", str(Path(tmp) / "p.csv")]
        subprocess.run(warm_up, check=True, capture_output=True)  # exports and caches the ONNX graph (first use only)
        runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(repeats):  # interleaved, so that the machine's drift hits every pipeline alike
            for name, (_, base) in runs_of.items():
                for n in sizes[name]:
                    runs.setdefault((name, n), []).append(run_timed([*base, str(folders[n]), "--out", str(Path(tmp) / "p.csv")]))
    rates = {name: [marginal(n1 - n0, runs[name, n1][i][0] - runs[name, n0][i][0], name) for i in range(repeats)]
             for name, (n0, n1) in sizes.items()}
    result = {}
    for name, (n0, n1) in sizes.items():
        ratios = [rate / reference for rate, reference in zip(rates[name], rates["reference"])]
        result[name] = {"t_small": median(t for t, _ in runs[name, n0]), "t_large": median(t for t, _ in runs[name, n1]), "large": n1,
                        "images_per_s": median(rates[name]), "ratio": median(ratios), "ratios": ratios,
                        "peak_rss_mb": max(r for n in (n0, n1) for _, r in runs[name, n])}
    return result


def marginal(images: int, seconds: float, name: str) -> float:
    """Images/s between the small and the large run; NaN (with a note) where the large run was not slower: its extra
    images took less time than start-up varies by (a fast machine, a GPU), and --large must grow."""
    if seconds > 0:
        return images / seconds
    print(f"{name}: the large run took no longer than the small one; give a larger --large to measure it", file=sys.stderr)
    return float("nan")


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def int8_peak(n: int = 2048, reps: int = 10) -> float | None:
    """int8 matmul GOP/s (torch._int_mm: VNNI/AMX where the CPU has them), or None where PyTorch has no CPU kernel."""
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        torch._int_mm(a, a)
    except (RuntimeError, AttributeError):
        return None
    t = time.perf_counter()
    for _ in range(reps):
        torch._int_mm(a, a)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}  # native int8 dot products (without them, vpmaddubsw's 16-bit pairs)
LACKS = {"bf16": "AVX512-BF16 and AMX", "int8": "VNNI and AMX"}


def native_peaks() -> dict[str, float | None]:
    """Matmul peaks of the number formats this CPU has instructions for; None for one it only emulates.

    An emulated peak is no yardstick: on an AVX2-only EPYC bf16 ran at 1 GFLOP/s and ``torch._int_mm`` at
    2 GOP/s, which made the end-to-end rate "5,000%" of them (ONNX Runtime's int8 path does not use it)."""
    return {"fp32": matmul_peak(torch.float32),
            "bf16": matmul_peak(torch.bfloat16, n=512, reps=3) if cpu_has_native_bf16() else None,
            "int8": (int8_peak() or None) if VNNI & cpu_info()[1] else None}


def model_flops(model: str):
    """The model's predictor (PyTorch backend) and its forward GFLOP for one view."""
    from leukoscope import load_model

    predictor = load_model(model, backend="torch", device="cpu")  # the CPU: FlopCounterMode runs it on a CPU tensor
    x = torch.zeros(1, 3, predictor.image_size, predictor.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predictor.backend.model(x)
    return predictor, counter.get_total_flops() / 1e9


def training_throughput(config_path: Path, num_classes: int, n: int = 640) -> float:
    """Training images/s of a recipe's step (augmentation, forward, backward, optimizer) on synthetic images.

    The images have the recipe's size, with context around the crop when it uses ``crop_context``;
    one warm-up pass over them, then one timed pass.
    """
    import numpy as np

    from leukoscope.config import load_config
    from leukoscope.models import create_model, training_memory_format
    from leukoscope.runs import seed_everything
    from leukoscope.trainer import Trainer, resolve_precision

    config = load_config(config_path, {})
    view = 1.0 / config.context  # the fraction of the decoded (context) image the model's view covers
    side = round(config.image_size / view)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = np.arange(n) % num_classes
    cpu = torch.device("cpu")
    model = create_model(config.arch, num_classes, **config.arch_kwargs)
    model = model.to(memory_format=training_memory_format(model, cpu))
    trainer = Trainer(model, config, ([0.5] * 3, [0.25] * 3), seed_everything(0), cpu, bf16=resolve_precision(config, cpu, model),
                      steps_per_epoch=max(1, n // config.batch_size))  # the precision training would use on this CPU
    trainer.train_epoch(images, labels, config.image_size, view)
    t = time.perf_counter()
    trainer.train_epoch(images, labels, config.image_size, view)
    return n / (time.perf_counter() - t)


def bundled_accuracy(name: str) -> dict:
    """The bundled model's recorded test metrics, training time and command (from its checkpoint)."""
    from leukoscope.checkpoint import load_checkpoint
    from leukoscope.inference import bundled_models

    path = bundled_models()[name]
    ckpt = load_checkpoint(path)
    images_seen = ckpt["metrics"].get("train", {}).get("n", 0) * ckpt["config"]["epochs"]
    return {"name": name, "arch": ckpt["arch"], "size": ckpt["image_size"], "test": ckpt["metrics"].get("test", {}),
            "train_ips": images_seen / ckpt["train_seconds"] if ckpt.get("train_seconds") else float("nan"),
            "extra": ckpt.get("extra_metrics", {}), "train_seconds": ckpt.get("train_seconds"),
            "command": ckpt.get("train_command", ""), "mb": path.stat().st_size / 1e6}


def render(tp: dict, runs_of: dict, views: int, flops: float, size: int, peaks: dict, train_ips: float, b: dict,
           model: str, command: str, data: str) -> str:
    """The text of the model's block of docs/benchmarks.md; ``b`` is its ``bundled_accuracy`` row."""
    achieved = flops * views * tp["default"]["images_per_s"]
    lines = [f"_Measured {time.strftime('%Y-%m-%d')} on {cpu()} by `{command}`._", "",
             f"### Prediction throughput (end to end, marginal images/s, {data} JPEGs; medians over the repeats)", "",
             "| pipeline | t small (s) | large run | t large (s) | images/s | x reference | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for name, (label, _) in runs_of.items():
        r = tp[name]
        lines.append(f"| {label} | {r['t_small']:.2f} | {r['large']:,} images | {r['t_large']:.2f} | {r['images_per_s']:.1f} | {r['ratio']:.1f} | {r['peak_rss_mb']:.0f} |")
    extra = "; ".join(f"{k} {v:.4f}" for k, v in b["extra"].items() if isinstance(v, float))
    spread = tp["default"]["ratios"]
    lines += ["", f"**Speed-up of the default path over the reference: {tp['default']['ratio']:.1f}x** (median of {len(spread)} "
              f"interleaved repeats, each against the reference of the same repeat: {min(spread):.1f}-{max(spread):.1f}x).", "",
             "### Efficiency", "",
             f"Model: {flops:.3f} GFLOP per view at {size} px (forward, FlopCounterMode), {views} view(s) per image by default. "
             f"Achieved {achieved:.1f} GFLOP/s end to end; "
             "measured matmul peak " + ", ".join(f"{v:.0f} {'GOP' if k == 'int8' else 'GFLOP'}/s {k}" for k, v in peaks.items() if v)
             + "".join(f"; no {k} peak (the CPU lacks {LACKS[k]}: a matmul would time emulation)" for k, v in peaks.items() if v is None)
             + ". Fraction of each peak: "
             + ", ".join(f"{k} {achieved / v:.1%}" for k, v in peaks.items() if v) + " (the default path runs the convolutions in int8 "
             "where `--precision auto` measured int8 faster, else in fp32; decoding and framing take most of the time).", "",
             "### Training", "",
             f"The training step of `configs/{model}.yaml` (augmentation, forward, backward, AdamW; synthetic images of its size) ran at "
             f"{train_ips:.0f} images/s in this run. The whole bundled run below averaged the images/s in the last column "
             "(validation after every epoch, decoding and the head refit included).", "",
             "### Bundled model", "",
             "| model | arch | px | test accuracy | test macro-F1 | extra | train time (s) | training images/s (whole run) | size (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b['name']} | {b['arch']} | {b['size']} | {b['test'].get('accuracy', float('nan')):.4f} | "
              f"{b['test'].get('macro_f1', float('nan')):.4f} | {extra} | {b['train_seconds']} | {b['train_ips']:.0f} | {b['mb']:.1f} |",
              "", f"Trained by `{b['command']}`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbc", help="a bundled model name")
    parser.add_argument("--data", help="folder of the JPEGs to predict (default: ../shared/data/<model, - as _>)")
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=8192, help="images in the large run of our pipelines")
    parser.add_argument("--reference-large", type=int, default=512, help="images in the large run of the reference")
    parser.add_argument("--repeats", type=int, default=3)
    add_block_argument(parser, "BENCHMARK-<model>")
    args = parser.parse_args()
    data = Path(args.data) if args.data else DATA / args.model.replace("-", "_")
    images = sorted(data.rglob("*.jpg"))
    if not images:
        sys.exit(f"no JPEGs under {data}")
    predictor, flops = model_flops(args.model)
    runs_of = pipelines(args.model, predictor.default_tta)
    tp = throughput(runs_of, images, args.small, args.large, args.repeats, args.reference_large)
    peaks = native_peaks()
    train_ips = training_throughput(ROOT / "configs" / f"{args.model}.yaml", len(predictor.class_names))
    command = (f"benchmarks/benchmark.py --model {args.model} --small {args.small} --large {args.large} "
               f"--reference-large {args.reference_large} --repeats {args.repeats}" + (f" --block {args.block}" if args.block else ""))
    block = render(tp, runs_of, TTA_VIEWS[predictor.default_tta], flops, predictor.image_size, peaks, train_ips,
                   bundled_accuracy(args.model), args.model, command, data.name)
    print(block)
    print(json.dumps(tp, indent=2))
    write_block(args.block or f"BENCHMARK-{args.model}", block)


if __name__ == "__main__":
    main()
