"""Fine-tuning from our own models (--init): backbone kept, head new, freezing, refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN, make_image_folder
from leukoscope import load_model
from leukoscope.checkpoint import load_checkpoint
from leukoscope.cli import main
from leukoscope.errors import LeukoscopeError
from leukoscope.models import create_model
from leukoscope.transfer import head_name, init_from_parent


def _three_classes(root):
    """The two synthetic classes plus a third: the normal cells with their colour channels reversed."""
    data = make_image_folder(root, n_per_class=10, seed=3)
    (data / "third").mkdir()
    for i, path in enumerate(sorted((data / "normal").glob("*.png"))):
        Image.fromarray(np.asarray(Image.open(path))[::-1, :, ::-1].copy()).save(data / "third" / f"third_{i}.png")
    return data


@pytest.mark.parametrize("arch, head", [("cellnet_tiny", "classifier"), ("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_init_keeps_the_backbone_and_replaces_the_head(arch, head):
    parent_model = create_model(arch, 2)
    parent = {"state_dict": parent_model.state_dict()}
    child = create_model(arch, 5)
    assert head_name(child) == head
    copied = init_from_parent(child, parent)
    child_state = child.state_dict()
    assert copied and all(torch.equal(child_state[n], parent["state_dict"][n]) for n in copied)
    assert child_state[f"{head}.weight"].shape[0] == 5 and not any(n.startswith(head + ".") for n in copied)


def _fine_tune(tiny_run, tmp_path, *flags):
    """Train the three-class set from the tiny run's model; returns (data, parent run, parent, child, child run)."""
    _, parent_run = tiny_run
    data = _three_classes(tmp_path / "three")
    out = tmp_path / "child"
    assert main(["train", str(data), "--out", str(out), "--init", str(parent_run), "--epochs", "2", "--batch-size", "8", *flags]) == 0
    return data, parent_run, load_checkpoint(parent_run / "model.pt"), load_checkpoint(out / "model.pt"), out


def test_fine_tuning_with_a_frozen_backbone(tiny_run, tmp_path):
    data, parent_run, parent, child, out = _fine_tune(tiny_run, tmp_path, "--freeze-epochs", "2")
    assert child["class_names"] == ["blast", "normal", "third"] and child["arch"] == "cellnet_tiny"
    assert child["image_size"] == parent["image_size"] and child["mean"] == parent["mean"]  # the parent's input settings
    head = "classifier"
    for name, tensor in parent["state_dict"].items():
        if not name.startswith(head):
            assert torch.equal(child["state_dict"][name], tensor), f"{name} changed while frozen"
    assert child["state_dict"]["classifier.weight"].shape == (3, parent["state_dict"]["classifier.weight"].shape[1])
    assert child["parent"]["sha256"] and child["parent"]["name"] == str(parent_run)
    assert "fine-tuned from" in (out / "report.html").read_text().lower()
    assert len(load_model(out).predict(data / "third")) == 10


def test_unfrozen_fine_tuning_moves_the_backbone_at_its_own_rate(tiny_run, tmp_path):
    _, _, parent, child, _ = _fine_tune(tiny_run, tmp_path, "--backbone-lr", "0.1")
    changed = [n for n, t in parent["state_dict"].items() if t.is_floating_point() and not n.startswith("classifier")
               and not torch.equal(child["state_dict"][n], t)]
    assert changed  # trained, not frozen


def test_refusals(tiny_run, tmp_path, capsys):
    data, parent_run = tiny_run
    cases = [
        (["--init", str(parent_run), "--arch", "resnet18"], "it cannot initialise --arch resnet18"),
        (["--freeze-epochs", "2"], "freeze_epochs and backbone_lr need init"),
        (["--init", str(parent_run), "--method", "svm"], "apply to CNN training"),
        (["--init", "pcb"], "did you mean 'pbc'"),
    ]
    for i, (flags, message) in enumerate(cases):
        assert main(["train", str(data), "--out", str(tmp_path / f"r{i}"), *TINY_TRAIN, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(parent_run), "--out", str(onnx)]) == 0
    assert main(["train", str(data), "--out", str(tmp_path / "r9"), *TINY_TRAIN, "--init", str(onnx)]) == 2
    assert "without PyTorch weights" in capsys.readouterr().err


def test_folds_are_stratified_and_never_split_a_patient(tmp_path):
    from collections import Counter

    from leukoscope.data import detect_layout
    from leukoscope.data.splits import make_folds

    rng = np.random.default_rng(0)
    for label, tag in (("all", ""), ("hem", "H")):
        (tmp_path / label).mkdir()
        for patient in range(6):
            for cell in range(4):
                image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / label / f"UID_{tag}{patient + 1}_{cell}_1_{label}.bmp")
    dataset = detect_layout(tmp_path)
    pool = list(range(len(dataset.samples)))
    folds = make_folds(dataset, pool, 3, seed=0)
    by_patient = {}
    for i, fold in zip(pool, folds):
        by_patient.setdefault(dataset.samples[i].patient, set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())  # a patient's cells in one fold
    per_fold = Counter((fold, dataset.samples[i].label) for i, fold in zip(pool, folds))
    assert all(per_fold[(f, c)] == 8 for f in range(3) for c in ("all", "hem"))  # 2 patients x 4 cells of each class
    with pytest.raises(LeukoscopeError, match="use at most"):
        make_folds(dataset, pool[:5], 3)


def test_cross_validation_writes_every_fold(tmp_path, capsys):
    import json

    data = make_image_folder(tmp_path / "data", n_per_class=15)
    assert main(["train", str(data), "--out", str(tmp_path / "cv"), *TINY_TRAIN, "--cv", "3"]) == 0
    result = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert result["k"] == 3 and [f["fold"] for f in result["folds"]] == [1, 2, 3]
    assert sum(f["n_val"] for f in result["folds"]) == result["images"] < 30  # test images are held out
    accs = [f["accuracy"] for f in result["folds"]]
    assert result["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert result["summary"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    out = capsys.readouterr().out
    assert "± " in out
    pooled = result["pooled"]  # every pooled image was called by the one fold model that did not train on it
    assert pooled["n"] == result["images"] and pooled["correct"] == sum(round(f["accuracy"] * f["n_val"]) for f in result["folds"])
    low, high = pooled["accuracy_ci"]
    assert pooled["accuracy"] == pytest.approx(pooled["correct"] / pooled["n"]) and low <= pooled["accuracy"] <= high
    assert f"pooled: {pooled['correct']} of {pooled['n']} images right" in out
    splits = [line.split(",")[-1] for line in (tmp_path / "cv" / "cv" / "fold_1" / "splits.csv").read_text().splitlines()[1:]]
    assert set(splits) == {"train", "val"}


def test_track_logs_options_and_validation_metrics_to_a_local_mlflow_store(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the [track] extra (mlflow-skinny) is not installed")
    data = make_image_folder(tmp_path / "data", n_per_class=12)
    store = tmp_path / "mlruns"
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--track", str(store)]) == 0
    mlflow.set_tracking_uri(store.resolve().as_uri())  # the run set MLFLOW_ALLOW_FILE_STORE for this process
    runs = mlflow.search_runs(experiment_names=["data"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["arch"] == "cellnet_tiny" and run.data.params["augment.hue"] == "0.0"
    assert "val_accuracy" in run.data.metrics and "train_accuracy" in run.data.metrics
    assert not any(key.startswith("test_") for key in run.data.metrics)  # never the test split
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "report.html", "history.csv"} <= artifacts


def test_adapt_changes_only_the_normalisation_statistics(tiny_run):
    from leukoscope.adapt import MIN_IMAGES, adapt_batchnorm

    _, run = tiny_run
    model = load_model(run, backend="torch")
    images = torch.randint(0, 256, (MIN_IMAGES, 3, model.image_size, model.image_size), dtype=torch.uint8)
    adapted = adapt_batchnorm(model, images, steps=0)  # AdaBN
    before, after = model.checkpoint["state_dict"], adapted.checkpoint["state_dict"]
    changed = {n for n in before if not torch.equal(before[n].float(), after[n].float())}
    assert changed and all(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in changed)
    assert any(n.endswith("running_mean") for n in changed)
    assert adapted.temperature == model.temperature and adapted.class_names == model.class_names
    # the OOD alarm compares with the unadapted network's training features: an adapted model has none
    assert model.ood_threshold is not None and adapted.ood_threshold is None
    assert adapted.predict_arrays([images[0].permute(1, 2, 0).numpy()], ["x"])[0].in_domain is None
    with pytest.raises(LeukoscopeError, match=f"at least {MIN_IMAGES} images"):
        adapt_batchnorm(model, images[: MIN_IMAGES - 1])


def _mean_entropy(predictor, images: torch.Tensor) -> float:
    probs = torch.from_numpy(predictor.predict_proba(images, tta="none"))
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())


def test_adapt_steps_default_to_entropy_steps_for_multiclass_cell_windows_only(tiny_run):
    from leukoscope.adapt import ENTROPY_STEPS, default_steps

    _, run = tiny_run
    model = load_model(run, backend="torch")
    assert model.view.cell is None and default_steps(model) == 0
    model.view = replace(model.view, cell=0.6)
    assert len(model.class_names) == 2 and default_steps(model) == 0  # a binary model: statistics only
    model.class_names = ["a", "b", "c"]
    assert default_steps(model) == ENTROPY_STEPS


def test_adapt_steps_tune_only_batchnorm_and_make_the_predictions_confident(tiny_run):
    """The entropy steps (Tent) move BatchNorm scales and shifts, nothing else, and lower the
    entropy of the predictions on the images they adapted to; the same seed gives the same model."""
    from leukoscope.adapt import MIN_IMAGES, adapt_batchnorm

    _, run = tiny_run
    model = load_model(run, backend="torch")
    images = torch.randint(0, 256, (2 * MIN_IMAGES, 3, model.image_size, model.image_size), dtype=torch.uint8)
    statistics_only = adapt_batchnorm(model, images, steps=0)
    tuned = adapt_batchnorm(model, images, steps=30)
    bn = {name.rsplit(".", 1)[0] for name in statistics_only.checkpoint["state_dict"] if name.endswith("running_mean")}
    before, after = statistics_only.checkpoint["state_dict"], tuned.checkpoint["state_dict"]
    changed = {n for n in before if not torch.equal(before[n].float(), after[n].float())}
    assert changed and all(n.rsplit(".", 1)[0] in bn and n.endswith(("weight", "bias")) for n in changed)
    assert _mean_entropy(tuned, images) < _mean_entropy(statistics_only, images)
    again = adapt_batchnorm(model, images, steps=30)
    assert all(torch.equal(after[n], again.checkpoint["state_dict"][n]) for n in after)
    with pytest.raises(LeukoscopeError, match="0 or more"):
        adapt_batchnorm(model, images, steps=-1)


def test_adapt_on_the_command_line(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((data / "blast").glob("*.png"))[:3]:
        (few / path.name).write_bytes(path.read_bytes())
    assert main(["predict", str(run), str(few), "--out", str(tmp_path / "p.csv"), "--adapt"]) == 2
    assert "needs at least 32 images" in capsys.readouterr().err
    many = make_image_folder(tmp_path / "many", n_per_class=20, seed=5)
    assert main(["predict", str(run), str(many), "--out", str(tmp_path / "q.csv"), "--adapt"]) == 0
    err = capsys.readouterr().err
    assert "re-estimated on 40 images (AdaBN)" in err  # a central-crop model: statistics only
    assert "look like this model's training images" in err  # more of the lab it was trained on: adapting may hurt
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    assert main(["predict", str(run), str(noise), "--out", str(tmp_path / "n.csv"), "--adapt"]) == 0
    assert "training images" not in capsys.readouterr().err  # a foreign "lab": no warning
    assert main(["predict", str(run), str(many), "--out", str(tmp_path / "r.csv"), "--adapt", "--adapt-steps", "12"]) == 0
    assert "re-estimated on 40 images, then 12 steps of entropy minimisation" in capsys.readouterr().err
    assert main(["predict", str(run), str(many), "--out", str(tmp_path / "s.csv"), "--adapt", "--adapt-steps", "-2"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err
    assert main(["predict", str(run), str(many), "--out", str(tmp_path / "t.csv"), "--adapt-steps", "5"]) == 2
    assert "does nothing without --adapt" in capsys.readouterr().err


def test_evaluate_with_adapt_says_so_in_the_report(tiny_run, tmp_path):
    _, run = tiny_run
    many = make_image_folder(tmp_path / "lab", n_per_class=20, seed=9)  # another folder: every image is test
    assert main(["evaluate", str(run), str(many), "--out", str(tmp_path / "ev"), "--adapt", "--adapt-steps", "5"]) == 0
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "test images before scoring" in report and "then 5 steps of entropy minimisation" in report


def test_adapt_from_python(tiny_run, tmp_path):
    import leukoscope

    _, run = tiny_run
    lab = make_image_folder(tmp_path / "lab", n_per_class=20, seed=11)
    adapted = leukoscope.adapt_model(str(run), lab, steps=3)
    assert adapted.checkpoint["adapted_on_images"] == 40 and adapted.checkpoint["adapted_steps"] == 3
    predictions = adapted.predict(lab)
    assert len(predictions) == 40 and all(p.label and p.in_domain is None for p in predictions)
    with pytest.raises(LeukoscopeError, match="does not exist"):
        leukoscope.adapt_model(str(run), tmp_path / "missing")


def test_fine_tuning_keeps_the_parents_cast_correction_unless_told_otherwise():
    from leukoscope.config import load_config

    assert load_config(None, {"init": "wbc"}).colour_cast is True  # the bundled wbc corrects yellow casts
    assert load_config(None, {"init": "wbc", "colour_cast": False}).colour_cast is False
    assert load_config(None, {"init": "pbc"}).colour_cast is False
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "blast.yaml", {}).colour_cast is False
