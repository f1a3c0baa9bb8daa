import json

import pytest
import torch
import yaml
from conftest import make_image_folder
from leukoscope.config import TrainConfig
from leukoscope.errors import LeukoscopeError
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


def test_optimizer_choice():
    from torch import nn

    from leukoscope.trainer import build_optimizer

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 0.0]  # no decay on biases and norm scales
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)
    with pytest.raises(LeukoscopeError, match="optimizer must be one of adamw, sgd, got 'adam'"):
        TrainConfig.from_dict({"optimizer": "adam"})


def test_progressive_resizing_schedule():
    config = TrainConfig(image_size=128, min_image_size=80, epochs=12)
    sizes = [config.train_size(e) for e in range(1, 13)]
    assert sizes[0] == 80 and sizes[-3:] == [128, 128, 128]  # the last quarter at full size
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert [TrainConfig(image_size=64, epochs=3).train_size(e) for e in (1, 2, 3)] == [64, 64, 64]
    with pytest.raises(LeukoscopeError, match="min_image_size must be between 16 and image_size"):
        TrainConfig.from_dict({"image_size": 64, "min_image_size": 96})


def test_cnn_learns_with_progressive_resizing_and_a_refitted_head(tmp_path):
    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, min_image_size=16, epochs=12, batch_size=16, lr=1e-2,
                         seed=0, patience=12, refit_head=1.0, augment=AugmentConfig(blur_p=0.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["refit_head"] == 1.0
    sizes = [line.split(",")[-2] for line in (tmp_path / "run" / "history.csv").read_text().splitlines()]
    assert sizes[0] == "image_size" and sizes[1] == "16" and sizes[-1] == "32"


def test_ema_averages_weights_per_step():
    import torch

    from leukoscope.trainer import make_ema

    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.9)
    for value in (1.0, 2.0, 3.0):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
    # the first update copies (1.0); then 0.9 * 1.0 + 0.1 * 2.0 = 1.1; then 0.9 * 1.1 + 0.1 * 3.0 = 1.29
    assert ema.module.weight.item() == pytest.approx(1.29)
    assert make_ema(model, None) is None
    with pytest.raises(LeukoscopeError, match="ema must be between 0 and 1"):
        TrainConfig.from_dict({"ema": 1.5})


def test_cnn_learns_with_ema_and_keeps_the_average_for_resume(tmp_path):
    import torch

    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=12, batch_size=16, lr=1e-2, seed=0,
                         patience=12, ema=0.9, augment=AugmentConfig(blur_p=0.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ema_weights = last["resume"]["ema"]
    assert any(not torch.equal(v, ema_weights["module." + k]) for k, v in last["state_dict"].items() if v.is_floating_point())


def test_cnn_learns_with_crop_context(tmp_path):
    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=24, crop=0.75, crop_context=True, epochs=12, batch_size=16, lr=1e-2,
                         seed=0, patience=12, refit_head=1.0, refit_views=1, augment=AugmentConfig(blur_p=0.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    with pytest.raises(LeukoscopeError, match="crop_context needs crop < 1"):
        TrainConfig.from_dict({"crop_context": True})
    with pytest.raises(LeukoscopeError, match="reduce applies to central crops, not to cell windows"):
        TrainConfig.from_dict({"reduce": True, "cell": 0.6})


def test_a_model_trained_with_reduce_learns_and_predicts_files_and_arrays_alike(tmp_path):
    """80 px JPEGs, a 24 px view of their central 60%: decoded at half size in training and prediction."""
    import numpy as np
    from PIL import Image

    from leukoscope import load_model
    from leukoscope.images import reduction

    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=80, ext=".jpg")
    config = TrainConfig(arch="cellnet_tiny", image_size=24, crop=0.6, crop_context=True, reduce=True, epochs=12, batch_size=16,
                         lr=1e-2, seed=0, patience=12, augment=AugmentConfig(blur_p=0.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    model = load_model(tmp_path / "run", backend="torch")
    assert model.view.reduce and reduction(80, 80, model.view) == 2  # 40 px, whose central 60% is 24 px
    files = sorted(data.rglob("*.jpg"))[::8]
    by_file = model.predict(files)
    by_array = model.predict([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert [p.label for p in by_file] == [p.label for p in by_array]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(by_file, by_array)) < 0.1


def test_patience_scales_with_the_epoch_count():
    assert TrainConfig(epochs=20).patience_epochs == 15
    assert TrainConfig(epochs=30).patience_epochs == 23 and TrainConfig(epochs=5).patience_epochs == 10
    assert TrainConfig(epochs=20, patience=4).patience_epochs == 4
    with pytest.raises(LeukoscopeError, match="patience must be >= 1"):
        TrainConfig.from_dict({"patience": 0})


def test_class_weights_hand_computed():
    import numpy as np

    from leukoscope.trainer import class_weights

    labels = np.array([0, 0, 0, 1])  # 4 images, 2 classes: weight = 4 / (2 * count)
    assert class_weights(labels, 2, True).tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weights(np.array([0, 0, 2]), 3, True).tolist() == pytest.approx([3 / 6, 3 / 3, 3 / 3])  # an absent class counts as 1
    assert class_weights(labels, 2, False) is None


def test_backbone_learning_rate_groups():
    from leukoscope.models import create_model
    from leukoscope.trainer import Trainer
    from leukoscope.runs import seed_everything

    config = TrainConfig(arch="cellnet_tiny", lr=0.01, backbone_lr=0.1, init="x", epochs=2)
    model = create_model("cellnet_tiny", 3)
    trainer = Trainer(model, config, ([0.5] * 3, [0.25] * 3), seed_everything(0), steps_per_epoch=4, head="classifier")
    head_params = {id(p) for p in model.classifier.parameters()}
    for group in trainer.optimizer.param_groups:
        in_head = {id(p) in head_params for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr_scale"] == (1.0 if in_head == {True} else 0.1)
        assert group["max_lr"] == pytest.approx(0.01 * group["lr_scale"])
    trainer.freeze_backbone(True)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier"))
    assert all(p.requires_grad for p in model.classifier.parameters())
    trainer.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


def test_label_smoothing_is_the_loss_that_trains():
    """A broken option (ignored, or applied twice) changes the first step's loss: compare with the formula."""
    import numpy as np

    from leukoscope.models import create_model
    from leukoscope.runs import seed_everything
    from leukoscope.trainer import Trainer

    losses = {}
    for smoothing in (0.0, 0.4):
        config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=8, label_smoothing=smoothing, precision="fp32",
                             augment=AugmentConfig(rotate=False, flip=False, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
                                                   saturation=0.0, stain=0.0, blur_p=0.0))
        torch.manual_seed(0)
        model = create_model("cellnet_tiny", 3)
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        labels = np.arange(8) % 3
        trainer = Trainer(model, config, ([0.5] * 3, [0.25] * 3), seed_everything(0), torch.device("cpu"), bf16=False, steps_per_epoch=1)
        with torch.no_grad():
            model.train()
            from leukoscope.transforms import train_transform

            x = train_transform(images, [0.5] * 3, [0.25] * 3, config.augment, torch.Generator().manual_seed(0))
            logits = model(x)
        log_p = torch.log_softmax(logits, 1)
        y = torch.from_numpy(labels)
        expected = (-(1 - smoothing) * log_p[torch.arange(8), y] - smoothing * log_p.mean(1)).mean()
        assert torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing) == pytest.approx(float(expected), rel=1e-5)
        losses[smoothing] = trainer.train_epoch(images, labels)[0]
    assert losses[0.4] != pytest.approx(losses[0.0], rel=1e-3)


@pytest.mark.parametrize("colour", ["white", "reinhard"])
def test_a_cell_centric_model_records_its_window_and_ignores_where_the_cell_sits(tmp_path, colour):
    """Train on synthetic smear fields (class = nucleus colour, the cell anywhere): the checkpoint
    records the window, predict reports the cell as located, and moving the cell in the field
    barely moves the probabilities (a central-crop model would see a different picture)."""
    import csv

    import numpy as np
    from PIL import Image
    from test_localise import NUCLEUS, field

    from leukoscope.cli import main
    from leukoscope.inference import load_model

    rng = np.random.default_rng(0)
    for label, nucleus in (("blast", NUCLEUS), ("normal", (60, 40, 170))):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(16):
            image = field(240, 320, [(rng.uniform(50, 190), rng.uniform(50, 270), rng.uniform(20, 30))], seed=i)
            image[np.all(image == NUCLEUS, axis=-1)] = nucleus
            Image.fromarray(image).save(tmp_path / "data" / label / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "data"), "--out", str(run), "--arch", "cellnet_tiny", "--image-size", "32", "--epochs", "2",
                 "--batch-size", "8", "--cell", "0.6", "--colour-norm", colour, "--crop-context"]) == 0
    model = load_model(run)
    assert model.view.cell == 0.6 and model.view.colour == colour and model.checkpoint["cell"] == 0.6
    assert (model.view.stain is not None) == (colour == "reinhard")  # a fitted target: 6 OD statistics
    if colour == "reinhard":
        assert len(model.view.stain) == 6 and all(v > 0 for v in model.view.stain)
    assert main(["predict", str(run), str(tmp_path / "data"), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        assert {r["localised"] for r in csv.DictReader(handle)} == {"true"}
    here, there = field(240, 320, [(80, 90, 25)], seed=3, red_cells=0), field(240, 320, [(160, 230, 25)], seed=3, red_cells=0)
    a, b = (np.array(list(p.probabilities.values())) for p in model.predict([here, there]))
    assert np.abs(a - b).max() < 0.05


def test_a_folder_of_unreadable_images_is_refused_clearly(tmp_path):
    for label in ("blast", "normal"):
        (tmp_path / "cells" / label).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "cells" / label / f"{i}.png").write_bytes(f"not an image {label} {i}".encode())
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=4)
    with pytest.raises(LeukoscopeError, match=r"no readable training images: 12 images of 12 could not be decoded \(first: .*0\.png: unreadable"):
        train(tmp_path / "cells", tmp_path / "run", config)


def test_training_without_validation_images_warns_what_that_costs(tmp_path, capsys):
    from leukoscope import load_model

    data = make_image_folder(tmp_path / "data", n_per_class=2)
    train(data, tmp_path / "run", TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=4, fractions=(1.0, 0.0, 0.0)))
    err = capsys.readouterr().err
    assert "warning: no validation images (4 images, 0 for testing)" in err
    assert "note: no test images (--fractions 1,0,0): the run reports training and validation numbers only" in err
    prediction = load_model(tmp_path / "run").predict(sorted(data.rglob("*.png"))[:1])[0]
    assert prediction.label in ("blast", "normal") and prediction.ood_score >= 0


def test_mix_batch_mixup_and_cutmix_keep_pixels_and_labels_in_proportion():
    from leukoscope.transforms import mix_batch

    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 10, 10).contiguous()  # image i is the constant i
    g = torch.Generator().manual_seed(0)
    same, partner, lam = mix_batch(x, AugmentConfig(), g)
    assert same is x and partner is None and lam == 1.0
    mixed, partner, lam = mix_batch(x, AugmentConfig(mixup=0.2), g)
    assert sorted(partner.tolist()) == [0, 1, 2, 3] and 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    mixed, partner, lam = mix_batch(x, AugmentConfig(cutmix=1.0), g)
    from_partner = (mixed == x[partner]) & (mixed != x)  # pixels taken from a different image
    moved = [i for i in range(4) if partner[i] != i]
    assert moved and all(from_partner[i].float().mean().item() == pytest.approx(1 - lam) for i in moved)
    again = mix_batch(x, AugmentConfig(cutmix=1.0), torch.Generator().manual_seed(0))
    first = mix_batch(x, AugmentConfig(cutmix=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(again[0], first[0]) and again[2] == first[2]  # seeded
    with pytest.raises(LeukoscopeError, match="augment.mixup and augment.cutmix must be >= 0"):
        TrainConfig.from_dict({"augment": {"mixup": -0.2}})


def test_mixed_cross_entropy_weighs_own_and_partner_labels():
    import math

    from leukoscope.trainer import mixed_cross_entropy

    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # image 0: p = (0.75, 0.25); image 1: (0.5, 0.5)
    target, partner = torch.tensor([0, 1]), torch.tensor([1, 0])
    own = (-math.log(0.75) - math.log(0.5)) / 2
    swapped = (-math.log(0.25) - math.log(0.5)) / 2  # each image scored on its partner's label
    assert mixed_cross_entropy(logits, target, None, 1.0).item() == pytest.approx(own)
    assert mixed_cross_entropy(logits, target, partner, 0.8).item() == pytest.approx(0.8 * own + 0.2 * swapped)


def test_cnn_learns_a_separable_set_under_mixup_and_cutmix(tmp_path):
    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=12, batch_size=16, lr=1e-2, seed=0, patience=12,
                         augment=AugmentConfig(blur_p=0.0, mixup=0.2, cutmix=1.0))
    metrics = train(data, tmp_path / "run", config)
    assert metrics["test"]["accuracy"] >= 0.9
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["augment"]["mixup"] == 0.2


def test_a_network_trained_on_finer_classes_reports_the_merged_ones(tmp_path):
    """Four folders (two kinds of blast, two of normal cell) merged into two classes: the checkpoint, the
    evaluation and the predictions name only the merged classes."""
    from dataclasses import replace

    from leukoscope import load_model

    data = make_image_folder(tmp_path / "cells", n_per_class=40, size=40)
    for label in ("blast", "normal"):
        for i, path in enumerate(sorted((data / label).iterdir())):
            (data / f"{label}_{'ab'[i % 2]}").mkdir(exist_ok=True)
            path.rename(data / f"{label}_{'ab'[i % 2]}" / path.name)
        (data / label).rmdir()
    merge = {"blast_a": "blast", "blast_b": "blast", "normal_a": "normal", "normal_b": "normal"}
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=12, batch_size=16, lr=1e-2, seed=0, patience=12,
                         refit_head=1.0, refit_views=1, merge_classes=merge, augment=AugmentConfig(blur_p=0.0))
    with pytest.raises(LeukoscopeError, match="merge_classes names 'blast_c', which is not a class of the data"):
        train(data, tmp_path / "run", replace(config, merge_classes={**merge, "blast_c": "blast"}))
    metrics = train(data, tmp_path / "run", config)  # the refused run left nothing that asks for --force
    assert metrics["test"]["accuracy"] >= 0.9
    model = load_model(tmp_path / "run")
    assert model.class_names == ["blast", "normal"]
    called = model.predict(sorted((data / "normal_a").iterdir())[:4] + sorted((data / "blast_b").iterdir())[:4])
    assert [p.label for p in called] == ["normal"] * 4 + ["blast"] * 4 and set(called[0].probabilities) == {"blast", "normal"}
    rows = (tmp_path / "run" / "predictions.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in rows} == {"blast", "normal"}
    from leukoscope.checkpoint import class_index, load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")  # a split's class folder counts as its merged class
    assert [class_index(checkpoint, c) for c in ("blast_b", "normal_a", "normal")] == [0, 1, 1]
    with pytest.raises(LeukoscopeError, match="merge_classes needs refit_head"):
        TrainConfig.from_dict({"merge_classes": merge})


def test_a_training_refused_during_set_up_leaves_its_output_folder_as_it_was(tmp_path):
    """A teacher that does not exist is found after the run recorded its split and config: those are removed
    again, so that the corrected command needs no --force; a split kept by --force stays."""
    from dataclasses import replace

    data = make_image_folder(tmp_path / "cells", n_per_class=10, size=40)
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=8, teacher="no-such-model")
    with pytest.raises(LeukoscopeError, match="'no-such-model' is neither a run folder"):
        train(data, tmp_path / "run", config)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeukoscopeError, match="'no-such-model' is neither a run folder"):
        train(data, tmp_path / "empty", config)
    assert list((tmp_path / "empty").iterdir()) == []
    train(data, tmp_path / "empty", TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1, batch_size=8))
    split = (tmp_path / "empty" / "splits.csv").read_text()
    with pytest.raises(LeukoscopeError, match="'no-such-model' is neither a run folder"):
        train(data, tmp_path / "empty", config, force=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["splits.csv"]
    assert (tmp_path / "empty" / "splits.csv").read_text() == split
    with pytest.raises(LeukoscopeError, match="'no-such-model' is neither a run folder"):  # refused in the first fold
        train(data, tmp_path / "folds", replace(config, cv=2))
    assert not (tmp_path / "folds").exists()


def test_a_batch_too_large_for_memory_is_refused_before_training_with_one_that_fits(tmp_path, monkeypatch, capsys):
    """What the step's kept tensors say one more image costs grows with the window's area, the estimate leaves the
    network's BatchNorm statistics alone, and a batch over the free memory is refused naming one that fits."""
    import leukoscope.train as train_module
    from leukoscope.cli import main
    from leukoscope.models import create_model
    from leukoscope.trainer import refuse_oversized_batch, step_bytes_per_image

    model = create_model("cellnet", 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, large = (step_bytes_per_image(model, size, torch.device("cpu"), False) for size in (56, 112))
    assert 3.5 < large / small < 4.5 and 2e6 < large < 6e6  # measured peaks: 2.4-3.3 MB per 112 px image
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    state = torch.get_rng_state()
    step_bytes_per_image(model, 112, torch.device("cpu"), False)
    assert torch.equal(torch.get_rng_state(), state)  # dropout's draws would change every later one: training's too
    config = TrainConfig(arch="cellnet", image_size=112, batch_size=6400)
    refuse_oversized_batch(config, 3.4e6, 500, int(4e9))  # a split of 500 trains in batches of 500: 1.7 GB
    with pytest.raises(LeukoscopeError, match=r"--batch-size 6400: a training step of cellnet at 112 px on 5,000 images needs about "
                                              r"17.0 GB \(3.4 MB per image\), more than the 3.2 GB it may take of the 4.0 GB free: give --batch-size 941 or less"):
        refuse_oversized_batch(config, 3.4e6, 5000, int(4e9))
    with pytest.raises(LeukoscopeError, match="needs about 3400 MB per image, but 4.0 GB are free: give a smaller --image-size"):
        refuse_oversized_batch(config, 3.4e9, 5000, int(4e9))
    data = make_image_folder(tmp_path / "cells", n_per_class=20, size=40)
    monkeypatch.setattr(train_module, "free_memory", lambda device: 1_000_000)  # 1 MB free
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--arch", "cellnet_tiny", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "64"]) == 2
    assert "--batch-size 64: a training step of cellnet_tiny at 32 px on 28 images needs about" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused in set-up: nothing asks for --force next time

