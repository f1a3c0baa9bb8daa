"""Train a CNN from scratch: split once, decode once, augment in batches, keep the best epoch.

``train(data, out, config)`` writes into ``out``: splits.csv, config.yaml, run.json, history.csv,
model.pt (best epoch, self-describing), last.pt (every epoch, atomic) and the evaluation report.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .calibration import fit_temperature, temperature_warning
from .checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config, save_config
from .data import SPLITS, Dataset, detect_layout, make_splits, read_splits, run_splits, write_splits
from .data.splits import check_split_leaks, seen_images
from .data.dataset import decode_many
from .distributed import World, all_sum, broadcast_flag, close, init_world, shard, sync_buffers, unwrap, weights_digest, wrap
from .errors import LeukoscopeError
from .evaluate import evaluate, headline
from .inference import Predictor
from .metrics import balanced_accuracy, confusion_matrix
from .models import cpu_bf16_safe, create_model, training_memory_format
from .progress import note, progress
from .refit import refit_classifier
from .runs import prepare_output_folder
from .runtime import keep_freed_memory
from .transforms import eval_transform, train_transform


def seed_everything(seed: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Generator]:
    """Seed the global RNGs; returns the batch-order and augmentation generators.

    Under torchrun the order generator is the same on every rank and the augmentation one
    differs per rank (ranks must not augment alike). A single process uses one stream for
    both, the way the bundled models were trained.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    if world_size == 1:
        return {"order": order, "augment": order}
    return {"order": order, "augment": torch.Generator().manual_seed(seed + 1000 * rank)}


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(config: TrainConfig, device: torch.device, model: torch.nn.Module) -> bool:
    """True to train under bf16 autocast: on CUDA, or on a CPU with native bf16 where it is exact.

    Measured: on an AVX2-only EPYC bf16 (emulated) made training about 10x slower than fp32; on a
    Xeon with AMX it made the cellnet step 1.3-1.6x faster, but its kernels return NaN gradients for
    a strided convolution on a 1x1 feature map (``cpu_bf16_safe``), so such models train in fp32.
    """
    smallest = min(config.image_size, config.min_image_size or config.image_size)
    exact = device.type == "cuda" or cpu_bf16_safe(model, smallest)
    if config.precision == "auto":
        return device.type == "cuda" or (cpu_has_native_bf16() and exact)
    if config.precision == "bf16" and not exact:
        raise LeukoscopeError(f"--precision bf16 on this CPU gives wrong gradients for {config.arch} at {smallest} px (a strided "
                              "convolution sees a 1x1 feature map); use --precision fp32 or auto, or a larger image size")
    return config.precision == "bf16"


def prepare_splits(dataset: Dataset, out: Path, config: TrainConfig, write: bool = True) -> tuple[list[str], str]:
    """Reuse ``out/splits.csv`` when present (same images required), else make and write it."""
    if (out / "splits.csv").is_file():
        recorded = run_splits(out, dataset.samples)
        if recorded is None or len(read_splits(out / "splits.csv")[0]) != len(dataset.samples):
            raise LeukoscopeError(f"{out / 'splits.csv'} lists other images than {dataset.root}; use a new --out folder")
        return recorded
    splits, kind = make_splits(dataset, config.fractions, config.split_seed_value, config.split_by)
    if write:
        write_splits(out / "splits.csv", dataset.samples, splits)
    return splits, kind


def check_classes(dataset: Dataset, splits: list[str]) -> None:
    if len(dataset.classes) < 2:
        raise LeukoscopeError(f"{dataset.root}: need at least 2 classes to train, found {dataset.classes}")
    train_classes = {s.label for s, k in zip(dataset.samples, splits) if k == "train"}
    missing = [c for c in dataset.classes if c not in train_classes]
    if missing:
        raise LeukoscopeError(f"classes {missing} have no training images after splitting; add data or change --fractions")


def prepare_run(data, out: Path, config: TrainConfig, command: str, write: bool = True) -> tuple[Dataset, list[str], str]:
    """Detect the layout, make or reuse the split, refuse leaks, and record config.yaml and run.json."""
    dataset = detect_layout(data)
    splits, split_kind = prepare_splits(dataset, out, config, write=write)
    check_classes(dataset, splits)
    check_split_leaks(dataset, splits, by_patient=config.split_by == "patient")
    if write:
        save_config(config, out / "config.yaml")
        (out / "run.json").write_text(json.dumps({"data": str(data), "command": command, "split_kind": split_kind, "status": "training"}, indent=2))
    return dataset, splits, split_kind


def load_split_images(dataset: Dataset, splits: list[str], size: int, crop: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], Dataset, list[str]]:
    """Decode every split; unreadable images are dropped from the dataset with a warning."""
    index = {c: i for i, c in enumerate(dataset.classes)}
    paths = [dataset.abspath(s) for s in dataset.samples]
    images, errors = decode_many(paths, size, desc="decode images", crop=crop)
    bad = [i for i, e in enumerate(errors) if e is not None]
    for i in bad[:10]:
        note(f"warning: skipping {paths[i]}: {errors[i]}")
    keep = [i for i, e in enumerate(errors) if e is None]
    kept = Dataset(dataset.root, dataset.layout, [dataset.samples[i] for i in keep], dataset.classes, dataset.notes)
    kept_splits = [splits[i] for i in keep]
    images = images[keep]
    tensors, labels = {}, {}
    for split in SPLITS:
        mask = [i for i, k in enumerate(kept_splits) if k == split]
        tensors[split] = images[mask]
        labels[split] = np.array([index[kept.samples[i].label] for i in mask], dtype=int)
    return tensors, labels, kept, kept_splits


def load_context(dataset: Dataset, splits: list[str], config: TrainConfig) -> tuple[torch.Tensor, float] | None:
    """With ``crop_context``: the training images decoded whole, at the scale of the crop.

    The central ``crop`` of each is exactly what the eval preset sees; the rest is real context
    that augmentation may rotate, shift or zoom into view. Returns (images, crop) or None.
    The training split is decoded a second time on purpose (about 5 s for pbc): the clean
    training images keep the eval preset's exact geometry for the refit and the train metrics.
    """
    if not config.crop_context:
        return None
    paths = [dataset.abspath(s) for s, k in zip(dataset.samples, splits) if k == "train"]
    images, _ = decode_many(paths, round(config.image_size / config.crop), desc="decode training context")
    return images, config.crop


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float().div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def class_weights(labels: np.ndarray, num_classes: int, enabled: bool) -> torch.Tensor | None:
    if not enabled:
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def train_epoch(model, images, labels, optimizer, scheduler, config, stats, weights, rngs, device, bf16, world: World, size: int | None = None,
                ema: AveragedModel | None = None, view: float = 1.0) -> tuple[float, float]:
    """One pass over the training split; under torchrun each rank takes its share of every batch.

    ``images`` may hold context around the crop; ``view`` is the fraction of them the crop covers.
    """
    model.train()
    order = torch.randperm(len(images), generator=rngs["order"])
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2 * world.size:
        batches = batches[:-1]  # batch norm cannot train on a single image per rank
    total_loss, correct, seen = 0.0, 0, 0
    targets_all = torch.from_numpy(labels)
    layout = training_memory_format(unwrap(model), device)
    for batch in progress(batches, desc="batches", leave=False, disable=not world.is_main):
        idx = shard(batch, world)
        x = train_transform(images[idx], *stats, config.augment, rngs["augment"], size, view).to(device, memory_format=layout)
        y = targets_all[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=None if weights is None else weights.to(device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
    total_loss, correct, seen = all_sum([total_loss, correct, seen], world)
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def validate(model, images, labels, stats, num_classes, device, batch_size=256) -> dict[str, float]:
    model.eval()
    if len(images) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "balanced_accuracy": float("nan")}
    logits = torch.cat([model(eval_transform(images[i : i + batch_size], *stats).to(device)).float().cpu() for i in range(0, len(images), batch_size)])
    y = torch.from_numpy(labels)
    cm = confusion_matrix(labels, logits.argmax(1).numpy(), num_classes)
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": float(np.trace(cm) / cm.sum()), "balanced_accuracy": balanced_accuracy(cm)}


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def run_epochs(model, tensors, labels, stats, config: TrainConfig, meta: dict, out: Path, rngs: dict, device, bf16: bool,
               world: World, resume: dict | None = None, context: tuple[torch.Tensor, float] | None = None) -> tuple[list[dict], int]:
    """Train with early stopping; leaves the best epoch's weights in ``model``.

    model.pt holds the best epoch so far and last.pt the latest plus everything needed to
    resume (optimizer, schedule, random states, history), both rewritten atomically every
    epoch by rank 0. Returns the per-epoch history and the best epoch's number.
    """
    num_classes = len(meta["class_names"])
    optimizer = build_optimizer(model, config)
    steps = max(1, len(tensors["train"]) // config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps + config.epochs, pct_start=0.15)
    weights = class_weights(labels["train"], num_classes, config.class_balance)
    ema = make_ema(unwrap(model), config.ema)
    state = {"epoch": 0, "history": [], "best_key": None, "best_epoch": 0, "stale": 0, "best_state": None, "best_loss": None}
    if resume is not None:
        state = restore(resume, model, optimizer, scheduler, rngs, ema)
    train_images, view = context if context is not None else (tensors["train"], 1.0)
    bar = progress(range(state["epoch"] + 1, config.epochs + 1), desc=f"train {config.arch}", unit="epoch", disable=not world.is_main)
    patience = config.patience_epochs
    for epoch in bar:
        if state["stale"] >= patience:
            break
        t0 = time.perf_counter()
        size = config.train_size(epoch)
        train_loss, train_acc = train_epoch(model, train_images, labels["train"], optimizer, scheduler, config, stats, weights, rngs, device, bf16,
                                            world, size, ema, view)
        sync_buffers(model, world)
        evaluated = unwrap(model) if ema is None else ema.module
        val = validate(evaluated, tensors["val"], labels["val"], stats, num_classes, device)
        state["history"].append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val["loss"],
                                 "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
                                 "lr": scheduler.get_last_lr()[0], "image_size": size, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{train_loss:.3f}", val_loss=f"{val['loss']:.3f}", val_bacc=f"{val['balanced_accuracy']:.4f}")
        key = (val["balanced_accuracy"], -val["loss"]) if not np.isnan(val["loss"]) else (train_acc, -train_loss)
        state["epoch"] = epoch
        # rank 0 decides, so that ranks whose floating-point results differ in the last bit cannot disagree
        best = broadcast_flag(state["best_key"] is None or key > tuple(state["best_key"]), world)
        loss_fell = broadcast_flag(state["best_loss"] is None or -key[1] < state["best_loss"], world)
        if loss_fell:
            state["best_loss"] = -key[1]
        if best:
            state.update(best_key=key, best_epoch=epoch, stale=0, best_state={k: v.detach().clone() for k, v in evaluated.state_dict().items()})
            if world.is_main:
                save_checkpoint(out / "model.pt", build_checkpoint(evaluated, {**meta, "epoch": epoch}))
        else:
            state["stale"] = 0 if loss_fell else state["stale"] + 1  # a falling validation loss is progress too
        if world.is_main:
            resume_state = snapshot(state, optimizer, scheduler, rngs, ema)
            save_checkpoint(out / "last.pt", build_checkpoint(unwrap(model), {**meta, "epoch": epoch, "resume": resume_state}))
            write_history(out / "history.csv", state["history"])
        if state["stale"] >= patience and world.is_main:
            note(f"early stopping at epoch {epoch}: no validation improvement for {patience} epochs")
    unwrap(model).load_state_dict(state["best_state"])
    return state["history"], state["best_epoch"]


def make_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights and batch-norm statistics, updated every step.

    With ``decay`` d the average forgets at a rate of 1 - d per step (0.998: a horizon of about
    500 steps); validation, the best-epoch choice and model.pt then use the averaged weights.
    """
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def snapshot(state: dict, optimizer, scheduler, rngs: dict, ema: AveragedModel | None = None) -> dict:
    """Everything besides the weights that an exact resume needs (weights_only-loadable)."""
    return {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {name: g.get_state() for name, g in rngs.items()}, "torch_rng": torch.get_rng_state(),
            "ema": None if ema is None else ema.state_dict()}


def restore(resume: dict, model, optimizer, scheduler, rngs: dict, ema: AveragedModel | None = None) -> dict:
    if ema is not None:
        if resume.get("ema") is None:
            raise LeukoscopeError("cannot resume with ema: the run was started without it (its last.pt holds no averaged weights)")
        ema.load_state_dict(resume["ema"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    for name, g in rngs.items():
        g.set_state(resume["rng"][name])
    torch.set_rng_state(resume["torch_rng"])
    state = {k: resume[k] for k in ("epoch", "history", "best_key", "best_epoch", "stale", "best_state")}
    return {**state, "best_loss": resume.get("best_loss")}


def calibrate(predictor: Predictor, images: torch.Tensor, labels: np.ndarray, batch_size: int = 256) -> float:
    """Temperature fitted on the validation split (1.0 when it has too few images), with a warning when uncertain."""
    if len(images) == 0:
        return 1.0
    logits = torch.cat([predictor.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    temperature = fit_temperature(logits, torch.from_numpy(labels))
    if (warning := temperature_warning(len(images), temperature)) is not None:
        note(f"warning: {warning}")
    return temperature


def train(data: str | os.PathLike, out: str | os.PathLike, config: TrainConfig, command: str = "", resume: bool = False,
          force: bool = False) -> dict[str, Any]:
    """Run a full training job into ``out`` and return the evaluation metrics.

    A non-empty ``out`` is refused unless ``force`` (which clears the earlier results, keeping
    its splits.csv) or ``resume`` (continue from ``out/last.pt`` exactly where the last completed
    epoch left off). Under torchrun (WORLD_SIZE > 1) every rank trains; only rank 0 writes.
    """
    if not resume and int(os.environ.get("RANK", "0")) == 0:
        prepare_output_folder(out, force=force)
    if config.method != "cnn":
        if resume:
            raise LeukoscopeError(f"--resume applies to CNN training; re-run the {config.method} training instead (features are cached)")
        from .train_classical import train_classical  # imported here: it builds on this module's helpers

        return train_classical(data, out, config, command)
    started = time.perf_counter()
    out = Path(out)
    keep_freed_memory()
    world, device = init_world(config.device)
    try:
        return _train(data, out, config, command, resume, world, device, started)
    finally:
        close(world)


def _train(data, out: Path, config: TrainConfig, command: str, resume: bool, world: World, device: torch.device, started: float) -> dict[str, Any]:
    resume_state = load_resume_state(out) if resume else None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    rngs = seed_everything(config.seed, world.rank, world.size)
    dataset, splits, split_kind = prepare_run(data, out, config, command, write=world.is_main)
    tensors, labels, dataset, splits = load_split_images(dataset, splits, config.image_size, config.crop)
    stats = channel_stats(tensors["train"])
    model = create_model(config.arch, len(dataset.classes), **config.arch_kwargs)
    model = model.to(device, memory_format=training_memory_format(model, device))
    bf16 = resolve_precision(config, device, model)
    meta = {"arch": config.arch, "arch_kwargs": config.arch_kwargs, "class_names": dataset.classes, "image_size": config.image_size, "crop": config.crop,
            "mean": stats[0], "std": stats[1], "config": config.to_dict(), "train_command": command, "split_kind": split_kind,
            "seen_images": seen_images(dataset, splits)}
    if resume_state is not None:
        model.load_state_dict(resume_state["weights"])
    model = wrap(model, world, device, config.sync_bn, config.batch_size)
    context = load_context(dataset, splits, config)
    history, best_epoch = run_epochs(model, tensors, labels, stats, config, meta, out, rngs, device, bf16, world, resume_state, context)
    if world.distributed:
        print(f"rank {world.rank}/{world.size}: final weights sha256 {weights_digest(model)}", flush=True)
    if not world.is_main:
        return {}
    model = unwrap(model)
    if config.refit_head is not None:
        accuracy = refit_classifier(model.cpu(), tensors["train"], labels["train"], *stats, config.refit_head,
                                    config.augment, config.refit_views, config.seed, context)
        note(f"classifier refitted on training features (C={config.refit_head}, clean + {config.refit_views} augmented views): "
                   f"train accuracy {accuracy:.4f}")
    train_seconds = time.perf_counter() - started + (resume_state or {}).get("train_seconds", 0.0)
    checkpoint = build_checkpoint(model.cpu(), {**meta, "epoch": best_epoch})
    predictor = Predictor(checkpoint, source=str(out / "model.pt"))
    predictor.temperature = checkpoint["temperature"] = calibrate(predictor, tensors["val"], labels["val"])
    info = {"model": str(out / "model.pt"), "arch": config.arch, "data": str(data), "layout": dataset.layout,
            "split_kind": split_kind, "config": config.to_dict(), "train_seconds": round(train_seconds, 1),
            "temperature": round(checkpoint["temperature"], 4), "world_size": world.size}
    metrics = evaluate(predictor, dataset, splits, out, info=info, history=history, images=tensors, target_sensitivity=config.target_sensitivity)
    checkpoint["metrics"] = headline(metrics)
    checkpoint["train_seconds"] = round(train_seconds, 1)
    save_checkpoint(out / "model.pt", checkpoint)
    info.pop("gallery", None)
    (out / "run.json").write_text(json.dumps({**info, "command": command, "status": "done", "layout_notes": dataset.notes, "epochs_run": len(history),
                                              "resumed": resume, "precision": "bf16" if bf16 else "fp32", "device": str(device)}, indent=2))
    return metrics


def load_resume_state(out: Path) -> dict:
    last = out / "last.pt"
    if not last.is_file():
        raise LeukoscopeError(f"cannot resume: {last} not found (nothing was trained into {out} yet)")
    checkpoint = load_checkpoint(last)
    if "resume" not in checkpoint:
        raise LeukoscopeError(f"cannot resume: {last} has no training state (written by an older leukoscope)")
    state = checkpoint["resume"]
    return {**state, "weights": checkpoint["state_dict"], "train_seconds": sum(h["seconds"] for h in state["history"])}


def read_run_for_resume(run: str | os.PathLike) -> tuple[str, TrainConfig, str]:
    """(data path, config, original command) of a run folder, for ``train --resume RUN``."""
    run = Path(run)
    info_path, config_path = run / "run.json", run / "config.yaml"
    if not info_path.is_file() or not config_path.is_file():
        raise LeukoscopeError(f"cannot resume {str(run)!r}: no run.json/config.yaml there; is it a training run folder?")
    info = json.loads(info_path.read_text())
    return info["data"], load_config(config_path, {}), info.get("command", "")
