"""The CNN training loop as one object: network, optimiser, schedule, random streams and device.

``Trainer.fit`` runs the epochs with early stopping and leaves the best epoch's weights in the
network; ``Trainer.train_epoch`` is one pass (what the speed benchmark times). Under torchrun each
rank holds a Trainer over its DDP-wrapped network and takes its share of every global batch.
"""

from __future__ import annotations

import copy
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import build_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Dataset
from .data.dataset import decode_many
from .distributed import World, all_sum, broadcast_flag, shard, sync_buffers, unwrap
from .errors import LeukoscopeError
from .images import View
from .metrics import accuracy, balanced_accuracy
from .models import cpu_bf16_safe, training_memory_format
from .progress import note, progress
from .runtime import cpu_info
from .transfer import is_head
from .transforms import eval_transform, mix_batch, train_transform


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


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


def precision_note(config: TrainConfig, device: torch.device, bf16: bool) -> str | None:
    """Why training runs slower than the documented times, where ``auto`` had to choose fp32 on a CPU
    without native bf16 (measured: the ``wbc`` recipe 28 minutes in fp32 on an AVX2 EPYC, 19 in bf16 on
    an AVX-512 one); None where nothing needs saying."""
    if config.precision != "auto" or device.type != "cpu" or bf16 or cpu_has_native_bf16():
        return None
    return ("training in fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), with which CellNet recipes train "
            "1.5-1.8x faster, so expect longer than the documented training times")


def step_bytes_per_image(model: nn.Module, image_size: int, device: torch.device, bf16: bool) -> float:
    """About how many bytes one more image adds to a training step's peak: twice what autograd keeps for the
    backward pass of one more image (counted with ``saved_tensors_hooks`` on a copy of the network, whose
    BatchNorm statistics the two forward passes would move). Measured peaks per image on the CPU: 1.4-1.9x the
    kept tensors (cellnet and cellnet_deep at 112 px about 2.4-3.3 MB, resnet18 7.5 MB)."""
    probe = copy.deepcopy(unwrap(model)).train()

    def kept(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()  # a view counts once
            return tensor

        x = torch.zeros(n, 3, image_size, image_size, device=device).contiguous(memory_format=training_memory_format(probe, device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probe(x)  # dropout draws from the global generator: restored after, so training is the same with or without this
        return sum(storages.values())

    kept_per_image = (kept(4) - kept(2)) / 2  # what the network's own weights and buffers add cancels
    return 2.0 * kept_per_image


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def refuse_oversized_batch(config: TrainConfig, per_image: float, n_train: int, free: int) -> None:
    """A batch whose training step would not fit in memory is refused before the first epoch, with the largest
    that fits, instead of the system killing the run (or swapping) minutes later: ``--batch-size 6400`` for 64."""
    batch = min(config.batch_size, max(n_train, 2))  # a split smaller than the batch trains in one batch of all of it
    if batch * per_image <= 0.8 * free:
        return
    step = f"--batch-size {config.batch_size}: a training step of {config.arch} at {config.image_size} px"
    fits = int(0.8 * free // per_image)
    if fits < 2:
        raise LeukoscopeError(f"{step} needs about {per_image / 1e6:.0f} MB per image, but {free / 1e9:.1f} GB are free: "
                              "give a smaller --image-size or --arch")
    raise LeukoscopeError(f"{step} on {batch:,} images needs about {batch * per_image / 1e9:.1f} GB ({per_image / 1e6:.1f} MB "
                          f"per image), more than the {0.8 * free / 1e9:.1f} GB it may take of the {free / 1e9:.1f} GB free: "
                          f"give --batch-size {fits} or less (the bundled recipes train with 64)")


def load_context(dataset: Dataset, splits: list[str], config: TrainConfig, view: View) -> tuple[torch.Tensor, float] | None:
    """With ``crop_context``: the training images decoded wider than ``view``, at its scale.

    The central part of each (``1 / config.context``) is what the eval preset sees (up to the colour
    normalisation, whose statistics then cover the wider window); the rest is real context that
    augmentation may rotate, shift or zoom into view. Returns (images, that fraction) or None.
    The training split is decoded a second time on purpose (about 5 s for pbc): the clean
    training images keep the eval preset's exact geometry for the refit and the train metrics.
    """
    if not config.crop_context:
        return None
    paths = [dataset.abspath(s) for s, k in zip(dataset.samples, splits) if k == "train"]
    images, _ = decode_many(paths, view.with_context(config.context), desc="decode training context")
    return images, 1.0 / config.context


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float().div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def build_optimizer(model: nn.Module, config: TrainConfig, head: str | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD) without weight decay on biases and norms; with ``head`` (fine-tuning), the
    backbone's groups run at ``config.backbone_lr`` times the learning rate (each group's ``lr_scale``)."""
    groups = []
    for in_head in ((False, True) if head else (False,)):
        named = [(n, p) for n, p in model.named_parameters() if head is None or is_head(n, head) == in_head]
        scale = 1.0 if in_head or head is None else config.backbone_lr
        for decayed in (True, False):
            params = [p for _, p in named if (p.ndim > 1) == decayed]
            if params:
                groups.append({"params": params, "weight_decay": config.weight_decay if decayed else 0.0, "lr": config.lr * scale,
                               "lr_scale": scale})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def mixed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None, lam: float,
                        weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of a batch mixed by ``transforms.mix_batch``: ``lam`` of each image's own target
    and ``1 - lam`` of its partner's (plain cross-entropy when ``partner`` is None)."""
    loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
    if partner is None:
        return loss
    other = F.cross_entropy(logits, target[partner.to(target.device)], weight=weight, label_smoothing=label_smoothing)
    return lam * loss + (1 - lam) * other


def class_weights(labels: np.ndarray, num_classes: int, enabled: bool) -> torch.Tensor | None:
    if not enabled:
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def make_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights and batch-norm statistics, updated every step.

    With ``decay`` d the average forgets at a rate of 1 - d per step (0.998: a horizon of about
    500 steps); validation, the best-epoch choice and model.pt then use the averaged weights.
    """
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.inference_mode()
def validate(model, images, labels, stats, num_classes, device, batch_size=256) -> dict[str, float]:
    model.eval()
    if len(images) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "balanced_accuracy": float("nan")}
    logits = torch.cat([model(eval_transform(images[i : i + batch_size], *stats).to(device)).float().cpu() for i in range(0, len(images), batch_size)])
    y = torch.from_numpy(labels)
    called = logits.argmax(1).numpy()
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": accuracy(labels, called), "balanced_accuracy": balanced_accuracy(labels, called)}


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@dataclass
class Trainer:
    """One CNN training: ``model`` (DDP-wrapped under torchrun) with its optimiser, one-cycle schedule over
    ``steps_per_epoch * config.epochs`` steps, optional weight average, random streams and device."""

    model: nn.Module
    config: TrainConfig
    stats: tuple[list[float], list[float]]  # per-channel mean and std of the training images
    rngs: dict[str, torch.Generator]  # "order" (batch order, same on every rank) and "augment"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world: World = field(default_factory=World)
    bf16: bool = False
    class_weights: torch.Tensor | None = None
    steps_per_epoch: int = 1
    head: str | None = None  # fine-tuning: the new classifier's name (see transfer.head_name); the rest is the backbone
    targets: torch.Tensor | None = None  # distillation: a target distribution per training image (see distill), else the labels

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(unwrap(self.model), self.config, self.head)
        total = self.steps_per_epoch * self.config.epochs + self.config.epochs
        max_lr = [self.config.lr * g["lr_scale"] for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=max_lr, total_steps=total, pct_start=0.15)
        self.ema = make_ema(unwrap(self.model), self.config.ema)
        self.layout = training_memory_format(unwrap(self.model), self.device)
        self.frozen = False

    def freeze_backbone(self, frozen: bool) -> None:
        """Train the head alone (``frozen``): the backbone's weights get no gradient and its BatchNorm
        statistics stay as the parent left them."""
        self.frozen = frozen and self.head is not None
        for name, parameter in unwrap(self.model).named_parameters():
            if self.head is not None and not is_head(name, self.head):
                parameter.requires_grad_(not self.frozen)

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and saved: the moving average when there is one."""
        return unwrap(self.model) if self.ema is None else self.ema.module

    def train_epoch(self, images: torch.Tensor, labels: np.ndarray, size: int | None = None, view: float = 1.0) -> tuple[float, float]:
        """One pass over the training split; returns (mean loss, accuracy) over all ranks.

        ``images`` may hold context around the crop; ``view`` is the fraction of them the crop covers.
        """
        config, world = self.config, self.world
        self.model.train()
        if self.frozen:
            for module in unwrap(self.model).modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        order = torch.randperm(len(images), generator=self.rngs["order"])
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2 * world.size:
            batches = batches[:-1]  # batch norm cannot train on a single image per rank
        total_loss, correct, seen = 0.0, 0, 0
        targets_all = torch.from_numpy(labels)
        weights = None if self.class_weights is None else self.class_weights.to(self.device)
        for batch in progress(batches, desc="batches", leave=False, disable=not world.is_main):
            idx = shard(batch, world)
            x = train_transform(images[idx], *self.stats, config.augment, self.rngs["augment"], size, view)
            x, partner, lam = mix_batch(x, config.augment, self.rngs["augment"])
            x = x.to(self.device, memory_format=self.layout)
            y = targets_all[idx].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(x)
            target = y if self.targets is None else self.targets[idx].to(self.device)
            loss = mixed_cross_entropy(logits.float(), target, partner, lam, weights, config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(unwrap(self.model))
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        total_loss, correct, seen = all_sum([total_loss, correct, seen], world)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def fit(self, tensors: dict[str, torch.Tensor], labels: dict[str, np.ndarray], meta: dict, out: Path,
            resume: dict | None = None, context: tuple[torch.Tensor, float] | None = None) -> tuple[list[dict], int]:
        """Train with early stopping; leaves the best epoch's weights in the network.

        model.pt holds the best epoch so far and last.pt the latest plus everything needed to
        resume (optimiser, schedule, random states, history), both rewritten atomically every
        epoch by rank 0. Returns the per-epoch history and the best epoch's number.
        """
        config, world = self.config, self.world
        num_classes = len(meta["class_names"])
        state = {"epoch": 0, "history": [], "best_key": None, "best_epoch": 0, "stale": 0, "best_state": None, "best_loss": None}
        if resume is not None:
            state = self.restore(resume)
        train_images, view = context if context is not None else (tensors["train"], 1.0)
        patience = config.patience_epochs
        bar = progress(range(state["epoch"] + 1, config.epochs + 1), desc=f"train {config.arch}", unit="epoch", disable=not world.is_main)
        for epoch in bar:
            if state["stale"] >= patience:
                break
            t0 = time.perf_counter()
            size = config.train_size(epoch)
            self.freeze_backbone(epoch <= config.freeze_epochs)
            train_loss, train_acc = self.train_epoch(train_images, labels["train"], size, view)
            sync_buffers(self.model, world)
            evaluated = self.evaluated
            val = validate(evaluated, tensors["val"], labels["val"], self.stats, num_classes, self.device)
            state["history"].append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val["loss"],
                                     "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"],
                                     "lr": self.scheduler.get_last_lr()[0], "image_size": size, "seconds": time.perf_counter() - t0})
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
                save_checkpoint(out / "last.pt", build_checkpoint(unwrap(self.model), {**meta, "epoch": epoch, "resume": self.snapshot(state)}))
                write_history(out / "history.csv", state["history"])
            if state["stale"] >= patience and world.is_main:
                note(f"early stopping at epoch {epoch}: no validation improvement for {patience} epochs")
        self.freeze_backbone(False)
        unwrap(self.model).load_state_dict(state["best_state"])
        return state["history"], state["best_epoch"]

    def snapshot(self, state: dict) -> dict:
        """Everything besides the weights that an exact resume needs (weights_only-loadable)."""
        return {**state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": {name: g.get_state() for name, g in self.rngs.items()}, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,  # dropout's masks there
                "ema": None if self.ema is None else self.ema.state_dict()}

    def restore(self, resume: dict) -> dict:
        if self.ema is not None:
            if resume.get("ema") is None:
                raise LeukoscopeError("cannot resume with ema: the run was started without it (its last.pt holds no averaged weights)")
            self.ema.load_state_dict(resume["ema"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        for name, g in self.rngs.items():
            g.set_state(resume["rng"][name])
        torch.set_rng_state(resume["torch_rng"])
        if self.device.type == "cuda" and resume.get("cuda_rng") is not None:  # a run resumed on another device draws anew there
            torch.cuda.set_rng_state(resume["cuda_rng"], self.device)
        state = {k: resume[k] for k in ("epoch", "history", "best_key", "best_epoch", "stale", "best_state")}
        return {**state, "best_loss": resume.get("best_loss")}
