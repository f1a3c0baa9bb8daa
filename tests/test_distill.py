"""Distillation: targets computed by hand, the loss that trains on them, and a teacher run end to end."""

import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_TRAIN, make_image_folder

from leukoscope.cli import main
from leukoscope.config import TrainConfig
from leukoscope.distill import distillation_targets, load_teacher, teacher_probabilities
from leukoscope.errors import LeukoscopeError
from leukoscope.models import create_model
from leukoscope.runs import seed_everything
from leukoscope.trainer import Trainer
from leukoscope.transforms import AugmentConfig


def test_targets_blend_the_teacher_only_where_it_is_right():
    teacher = np.array([[0.8, 0.2], [0.9, 0.1], [0.3, 0.7]])
    targets, taught = distillation_targets(np.array([0, 1, 1]), teacher, weight=0.5)
    assert taught == 2
    assert targets.numpy() == pytest.approx(np.array([[0.9, 0.1], [0.0, 1.0], [0.15, 0.85]]))
    assert distillation_targets(np.array([0]), teacher[:1], weight=0.0)[0].numpy() == pytest.approx(np.array([[1.0, 0.0]]))
    with pytest.raises(LeukoscopeError, match="distill must be between 0 and 1"):
        distillation_targets(np.array([0]), teacher[:1], weight=1.5)


def test_the_loss_trains_on_the_targets():
    """One-hot targets give the labels' loss; other targets give another (the targets are what trains)."""
    plain = AugmentConfig(rotate=False, flip=False, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                          stain=0.0, blur_p=0.0)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=8, precision="fp32", augment=plain)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = np.arange(8) % 3
    losses = []
    for targets in (None, torch.eye(3)[labels], torch.full((8, 3), 1 / 3)):
        torch.manual_seed(0)
        trainer = Trainer(create_model("cellnet_tiny", 3), config, ([0.5] * 3, [0.25] * 3), seed_everything(0), torch.device("cpu"),
                          steps_per_epoch=1, targets=targets)
        losses.append(trainer.train_epoch(images, labels)[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[2] != pytest.approx(losses[0], rel=1e-3)


def test_a_run_distils_from_a_teacher_and_records_it(tmp_path, tiny_run, capsys):
    data, teacher = tiny_run
    probs = teacher_probabilities(load_teacher(teacher), sorted((data / "blast").glob("*.png"))[:3], ["normal", "unknown", "blast"])
    assert probs.shape == (3, 3) and (probs[:, 1] == 0).all() and probs.sum(1) == pytest.approx(np.ones(3))
    assert main(["train", str(data), "--out", str(tmp_path / "student"), *TINY_TRAIN, "--teacher", str(teacher), "--distill", "0.7"]) == 0
    assert "distillation from" in capsys.readouterr().err
    config = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert config["teacher"] == str(teacher) and config["distill"] == 0.7


def test_a_teacher_without_the_data_classes_is_refused(tmp_path, tiny_run):
    _, teacher = tiny_run
    other = make_image_folder(tmp_path / "other", n_per_class=3)
    for name in ("blast", "normal"):
        shutil.move(other / name, other / f"x{name}")
    with pytest.raises(LeukoscopeError, match="shares no class with the training data"):
        teacher_probabilities(load_teacher(teacher), sorted(other.rglob("*.png")), ["xblast", "xnormal"])


@pytest.mark.parametrize("flag", ["--teacher", "--init"])
def test_a_teacher_or_parent_that_trained_on_this_runs_test_images_is_refused(tmp_path, tiny_run, flag, capsys):
    """The tiny run trained on some of these images; another split of the same folder puts some of them in val or test."""
    data, parent = tiny_run
    for out in ("leaky", "same"):
        (tmp_path / out).mkdir()
    shutil.copy(parent / "splits.csv", tmp_path / "same" / "splits.csv")  # the parent's own split: allowed
    argv = [*TINY_TRAIN, flag, str(parent), "--seed", "7"]
    assert main(["train", str(data), "--out", str(tmp_path / "leaky"), *argv]) == 2
    assert re.search(r"trained on [0-9]+ of this run's validation and test images .*copy its splits.csv", capsys.readouterr().err)
    assert main(["train", str(data), "--out", str(tmp_path / "same"), *argv]) == 0
