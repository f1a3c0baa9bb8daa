import json

from conftest import make_image_folder
from leukoscope.config import TrainConfig
from leukoscope.transforms import AugmentConfig
from leukoscope.train import train


def test_cnn_learns_a_separable_synthetic_set(tmp_path):
    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=12, batch_size=16, lr=1e-2, seed=0,
                         patience=12, augment=AugmentConfig(blur_p=0.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    assert metrics["train"]["loss"] < 0.5
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) >= 2 and history[0].startswith("epoch,train_loss,train_accuracy,val_loss")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["split_kind"] == "image (no patient ids known)"
