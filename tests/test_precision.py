"""int8 inference: graphs built from a run's own images, the bundled ones, --precision auto's choice, the CLI."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch
from conftest import DATA, require

from leukoscope import load_model
from leukoscope.checkpoint import load_checkpoint
from leukoscope.cli import main
from leukoscope.data import read_splits
from leukoscope.errors import LeukoscopeError
from leukoscope.inference import bundled_models
from leukoscope.io import sha256_file
from leukoscope.onnx_backend import OnnxBackend
from leukoscope import quantize
from leukoscope.quantize import AutoPrecision, graph_meta, int8_path


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # (data, run folder) of a one-epoch tiny CellNet; this module writes its int8 graph beside it


def test_int8_graph_is_built_from_the_runs_own_images_once_and_checked_on_validation(run, monkeypatch):
    data, folder = run
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)  # a 3-epoch model: its parity is not the point here
    model = load_model(folder, precision="int8")
    graph = int8_path(folder / "model.pt")
    assert graph == folder / "model.int8.onnx" and graph.is_file()
    assert isinstance(model.backend, OnnxBackend)
    meta = graph_meta(graph)
    samples, kinds = read_splits(folder / "splits.csv")
    assert meta["checkpoint_sha256"] == sha256_file(folder / "model.pt")
    assert meta["parity"]["images"] == kinds.count("val") and meta["parity"]["calibration_images"] == kinds.count("train")
    assert meta["precision"] == "int8"
    built = graph.stat().st_mtime_ns
    images = sorted(data.rglob("*.png"))[:6]
    int8 = model.predict(images)
    again = load_model(folder, precision="int8")  # reused, not rebuilt
    assert graph.stat().st_mtime_ns == built
    assert [p.probabilities for p in again.predict(images)] == [p.probabilities for p in int8]
    fp32 = load_model(folder, precision="fp32").predict(images)
    assert max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(int8, fp32) for c in a.probabilities) < 0.5


def test_int8_that_loses_accuracy_is_refused_and_not_written(run, monkeypatch, tmp_path):
    data, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    target = tmp_path / "model.pt"
    target.write_bytes((folder / "model.pt").read_bytes())
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", -1.0)  # int8 would have to gain 100 points
    with pytest.raises(LeukoscopeError, match="points of validation accuracy"):
        quantize.write_int8(checkpoint, target, data, folder / "splits.csv", load_model(folder).view)
    assert not int8_path(target).exists()


def test_a_stale_int8_graph_is_not_used(run, tmp_path):
    """A graph left beside a retrained checkpoint (another sha256) is ignored by auto and rebuilt by int8."""
    data, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    target = tmp_path / "model.pt"
    target.write_bytes((folder / "model.pt").read_bytes() + b"\0")  # other bytes, same weights
    int8_path(target).write_bytes(b"not the graph of this checkpoint")
    assert quantize.load_int8(checkpoint, target, build=False) is None
    model = load_model(target, precision="auto")
    assert not isinstance(model.backend, AutoPrecision)  # plain fp32: no int8 graph of its own
    with pytest.raises(LeukoscopeError, match="no int8 graph"):  # a bare checkpoint has no run to build one from
        load_model(target, precision="int8")


def test_an_int8_graph_of_an_older_recipe_is_rebuilt(run, tmp_path, monkeypatch):
    """A graph of the same checkpoint made by an older quantize_int8 (int8 weights on the pixels, which
    CPUs without VNNI overflow) is not used by auto and is rebuilt by int8."""
    data, folder = run
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)
    load_model(folder, precision="int8")  # the current graph, built once
    checkpoint = load_checkpoint(folder / "model.pt")
    assert quantize.load_int8(checkpoint, folder / "model.pt", build=False) is not None
    monkeypatch.setattr(quantize, "INT8_RECIPE", quantize.INT8_RECIPE + 1)  # what a newer recipe sees
    assert quantize.load_int8(checkpoint, folder / "model.pt", build=False) is None
    rebuilt = quantize.load_int8(checkpoint, folder / "model.pt", build=True)
    assert rebuilt is not None


def test_an_onnx_runtime_too_old_for_the_int8_graph_is_a_clear_error_or_fp32(run, monkeypatch, capsys):
    """An ONNX Runtime without one of the int8 graph's kernels (before 1.28: no uint8 SpaceToDepth):
    --precision int8 is a one-line error naming the fix, auto runs fp32 and says why."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    _, folder = run
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)
    load_model(folder, precision="int8")  # the graph, built once with this (recent) ONNX Runtime

    def too_old(*args, **kwargs):
        raise OrtNotImplemented("Could not find an implementation for SpaceToDepth(13) node")

    monkeypatch.setattr(quantize, "OnnxBackend", too_old)
    with pytest.raises(LeukoscopeError, match=r"install onnxruntime>=1.28, or use --precision fp32"):
        load_model(folder, precision="int8")
    assert quantize.load_int8(load_checkpoint(folder / "model.pt"), folder / "model.pt", build=False) is None
    assert "SpaceToDepth" in capsys.readouterr().err


def test_precision_errors_name_the_fix(run):
    _, folder = run
    with pytest.raises(LeukoscopeError, match="did you mean 'int8'"):
        load_model(folder, precision="int9")
    with pytest.raises(LeukoscopeError, match="without --backend torch"):
        load_model(folder, backend="torch", precision="int8")


class FakeBackend:
    def __init__(self, seconds: float, flip: int = 0):
        self.seconds, self.flip, self.calls = seconds, flip, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        logits = torch.zeros(len(batch), 3)
        logits[:, 0] = 1.0
        logits[: self.flip, 0], logits[: self.flip, 1] = 0.0, 1.0  # the first `flip` images called otherwise
        logits[:, 2] = 99.0  # the OOD column: never part of the call
        return logits


@pytest.mark.parametrize("int8_seconds, flip, choice", [(0.001, 0, "int8"), (0.001, 2, "fp32"), (0.05, 0, "fp32")])
def test_auto_precision_picks_int8_only_when_faster_and_at_parity(int8_seconds, flip, choice):
    fp32, int8 = FakeBackend(0.02), FakeBackend(int8_seconds, flip)
    auto = AutoPrecision(fp32, int8, classes=2)
    small = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    auto(small)
    assert auto.choice is None and int8.calls == 0  # batches below AUTO_MIN_BATCH run fp32 and decide nothing
    auto(torch.zeros(64, 3, 4, 4, dtype=torch.uint8))
    assert auto.choice == choice, auto.reason
    before = (fp32.calls, int8.calls)
    auto(torch.zeros(64, 3, 4, 4, dtype=torch.uint8))
    assert (fp32.calls, int8.calls) == ((before[0], before[1] + 1) if choice == "int8" else (before[0] + 1, before[1]))
    fp32.worker_copy, int8.worker_copy = (lambda: "fp32 copy"), (lambda: "int8 copy")
    assert auto.worker_copy() == f"{choice} copy"  # a decoding worker runs the graph chosen here


def test_auto_precision_copies_fp32_into_workers_before_any_choice():
    fp32, int8 = FakeBackend(0.02), FakeBackend(0.001)
    fp32.worker_copy, int8.worker_copy = (lambda: "fp32 copy"), (lambda: "int8 copy")
    auto = AutoPrecision(fp32, int8, classes=2)
    auto(torch.zeros(8, 3, 4, 4, dtype=torch.uint8))
    assert auto.choice is None and auto.worker_copy() == "fp32 copy"  # as it runs here: fp32 until a batch of AUTO_MIN_BATCH


def test_bundled_int8_graphs_were_made_from_their_checkpoints_at_parity():
    models = bundled_models()
    if not models:
        pytest.skip("no bundled models (make models)")
    for name, path in models.items():
        graph = int8_path(path)
        assert graph.is_file(), f"{name}: no int8 graph beside it"
        meta = graph_meta(graph)
        assert meta["checkpoint_sha256"] == sha256_file(path), f"{name}: int8 graph of another checkpoint"
        assert meta["int8_recipe"] == quantize.INT8_RECIPE, f"{name}: int8 graph of an older recipe (tools/build_int8.py)"
        parity = meta["parity"]
        assert parity["int8_accuracy"] >= parity["fp32_accuracy"] - quantize.MAX_ACCURACY_LOSS, name


def test_predict_int8_on_real_cells_keeps_the_fp32_calls(tmp_path, capsys):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    cells = sorted((require(DATA / "pbc") / "monocyte").glob("*.jpg"))[:48]
    fp32, int8, auto = (tmp_path / f"{p}.csv" for p in ("fp32", "int8", "auto"))
    assert main(["predict", "pbc", *map(str, cells), "--out", str(fp32), "--precision", "fp32"]) == 0
    assert main(["predict", "pbc", *map(str, cells), "--out", str(int8), "--precision", "int8"]) == 0
    assert main(["predict", "pbc", *map(str, cells), "--out", str(auto)]) == 0
    assert "precision auto: " in capsys.readouterr().err  # 48 images: auto measured both and said which it took
    rows = {p: list(csv.DictReader(open(p))) for p in (fp32, int8, auto)}
    same = np.mean([a["label"] == b["label"] for a, b in zip(rows[fp32], rows[int8])])
    assert same >= 0.97 and [r["path"] for r in rows[int8]] == [str(c) for c in cells]
    diff = max(abs(float(a["p_monocyte"]) - float(b["p_monocyte"])) for a, b in zip(rows[fp32], rows[int8]))
    assert 0 < diff < 0.25  # really another graph, within the bound measured on validation
    flags = np.mean([a["in_domain"] == b["in_domain"] for a, b in zip(rows[fp32], rows[int8])])
    assert flags >= 0.93  # the OOD alarm too (98.7% on the 1,030 validation images)


def test_precision_int8_refuses_adapt_with_a_clear_message(capsys):
    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    cells = require(DATA / "pbc") / "monocyte"
    assert main(["predict", "pbc", str(cells), "--out", "-", "--adapt", "--precision", "int8"]) == 2
    assert "--adapt" in capsys.readouterr().err


def test_an_unwritable_run_folder_still_gets_its_int8_graph_from_memory(run, monkeypatch, tmp_path, capsys):
    data, folder = run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.pt", "run.json", "splits.csv"):
        (copy / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(quantize, "atomic_write", refuse)
    model = load_model(copy, precision="int8")
    assert "not saved (Permission denied)" in capsys.readouterr().err
    assert not int8_path(copy / "model.pt").exists() and len(model.predict(sorted(data.rglob("*.png"))[:3])) == 3


def test_evaluate_reports_the_precision_that_ran(run, monkeypatch, tmp_path):
    data, folder = run
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)
    for precision in ("int8", "fp32"):
        out = tmp_path / precision
        assert main(["evaluate", str(folder), str(data), "--out", str(out), "--precision", precision]) == 0
        assert f"Inference in <b>{precision}</b>" in (out / "report.html").read_text()
    monkeypatch.setattr(AutoPrecision, "_choose", lambda self, batch: ("int8", "chosen"))  # as on a CPU where int8 is faster
    monkeypatch.setattr(quantize, "AUTO_MIN_BATCH", 1)
    assert main(["evaluate", str(folder), str(data), "--out", str(tmp_path / "default")]) == 0
    assert "Inference in <b>fp32</b>" in (tmp_path / "default" / "report.html").read_text()  # scores that no CPU changes


def _int8_weights_and_first_input(graph_bytes: bytes):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(graph_bytes).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    weights = [constants[producers[n.input[1]].input[0]] for n in graph.node if n.op_type == "Conv"]
    first_input = producers[next(n for n in graph.node if n.op_type == "Conv").input[0]]  # a DequantizeLinear
    return graph, constants, producers, weights, first_input


def test_raw_pixel_graph_folds_the_normalisation_into_the_first_convolution(run):
    from leukoscope.onnx_backend import onnx_bytes

    _, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    images[:8] = 220  # a plain bright background: the border is where the padding matters
    plain, raw = (OnnxBackend(onnx_bytes(checkpoint, raw_pixels=r))(images) for r in (False, True))
    classes = len(checkpoint["class_names"])  # (then the OOD score: this 1-epoch model's is degenerate; the bundled pbc is checked below)
    assert torch.allclose(raw[:, :classes], plain[:, :classes], atol=0.02), (raw - plain).abs().max()  # the mean colour's rounding at the border
    ops = [n.op_type for n in __import__("onnx").load_from_string(onnx_bytes(checkpoint, raw_pixels=True)).graph.node]
    assert "Div" not in ops[: ops.index("Conv")]  # no normalisation before the first convolution


def test_int8_graph_reads_pixels_keeps_activations_uint8_and_cannot_saturate(run):
    """The first convolution reads the uint8 pixels (scale 1, zero point 0), stacked 2x2 blocks to 12
    channels, with int8 weights of at most 64 in size (on CPUs without VNNI, uint8 x int8 pairs are summed
    in 16 bits: 2 x 255 x 64 fits); every ReLU sits between a dequantise and a quantise (fused away by
    ONNX Runtime); later weights are int8."""
    from leukoscope.onnx_backend import onnx_bytes, quantize_int8

    data, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    calibration = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    graph, constants, producers, weights, first_input = _int8_weights_and_first_input(quantize_int8(onnx_bytes(checkpoint, raw_pixels=True), calibration))
    assert first_input.op_type == "DequantizeLinear" and producers[first_input.input[0]].op_type == "SpaceToDepth"  # the padded pixels
    assert float(constants[first_input.input[1]]) == 1.0 and int(constants[first_input.input[2]]) == 0
    assert not any(n.op_type in ("Cast", "QuantizeLinear") and n.input[0] == "images" for n in graph.node)
    for relu in (n for n in graph.node if n.op_type == "Relu"):
        assert producers[relu.input[0]].op_type == "DequantizeLinear", relu.name
        assert any(n.op_type == "QuantizeLinear" and relu.output[0] in n.input for n in graph.node), relu.name
    assert weights[0].shape[1:] == (12, 2, 2) and _cannot_saturate(weights[0]) and all(w.dtype == np.int8 for w in weights)


def _cannot_saturate(first_weights: np.ndarray) -> bool:
    """uint8 weights (exact 32-bit sums everywhere), or int8 ones small enough for vpmaddubsw's 16-bit pairs."""
    return first_weights.dtype == np.uint8 or int(np.abs(first_weights.astype(int)).max()) <= 64


def test_bundled_int8_graphs_cannot_saturate_without_vnni():
    models = bundled_models()
    if not models:
        pytest.skip("no bundled models (make models)")
    for name, path in models.items():
        _, _, _, weights, first_input = _int8_weights_and_first_input(int8_path(path).read_bytes())
        assert _cannot_saturate(weights[0]), f"{name}: full-range int8 weights on the pixels (tools/build_int8.py rebuilds the graph)"


def test_refined_rounding_lowers_the_error_on_correlated_inputs_and_keeps_the_limit():
    """Two perfectly correlated inputs, targets 0.6 and 0.6: rounding each to 1 errs by 0.8 on the output,
    rounding one down by 0.2 (hand-computed); a weight past the limit stays at it."""
    from leukoscope.onnx_backend import _round_to_patches

    rounded = np.array([1, 1])
    _round_to_patches(rounded, np.array([0.6, 0.6]), np.ones((2, 2)))
    assert abs((rounded - 0.6).sum()) == pytest.approx(0.2) and sorted(rounded.tolist()) == [0, 1]
    independent = np.array([1, 1])
    _round_to_patches(independent, np.array([0.6, 0.6]), np.eye(2))  # uncorrelated: nearest is best
    assert independent.tolist() == [1, 1]
    clipped = np.array([64, 0])
    _round_to_patches(clipped, np.array([70.0, 0.0]), np.eye(2))
    assert clipped.tolist() == [64, 0]  # a zero target stays zero too


@pytest.mark.parametrize("ratio, expected", [(1e9, "pixels"), (0.0, "normalised")])
def test_int8_reads_pixels_unless_that_is_much_less_faithful(run, monkeypatch, ratio, expected):
    """The pixel graph is kept unless its mean probability difference to fp32 exceeds RAW_PIXELS_MAX_ERROR_RATIO
    times the normalising graph's; the parity records which was kept and both differences."""
    data, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    monkeypatch.setattr(quantize, "RAW_PIXELS_MAX_ERROR_RATIO", ratio)
    monkeypatch.setattr(quantize, "MAX_ACCURACY_LOSS", 1.0)  # a 1-epoch model on random images: its parity is not the point
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    graph, parity = quantize.build_int8(checkpoint, images[:16], images, np.zeros(24, dtype=int))
    assert parity["input"] == expected and set(parity["mean_prob_diff_by_input"]) == {"pixels", "normalised"}
    _, _, producers, _, first_input = _int8_weights_and_first_input(graph)
    reads = producers[first_input.input[0]].op_type  # the padded pixels (SpaceToDepth), or the quantised normalised image
    assert reads == ("SpaceToDepth" if expected == "pixels" else "QuantizeLinear")


def test_int8_stem_matches_fp32_on_average_over_the_calibration_images(run):
    """Bias correction: the int8 first convolution's output, averaged over the calibration images'
    patches, equals the fp32 one within the bias's rounding (a bright slide background would otherwise
    shift every output by its weights' rounding times ~200)."""
    import onnx
    from onnx import numpy_helper

    from leukoscope.onnx_backend import _patch_moments, onnx_bytes, quantize_int8

    _, folder = run
    checkpoint = load_checkpoint(folder / "model.pt")
    calibration = torch.randint(150, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    source = onnx.load_from_string(onnx_bytes(checkpoint, raw_pixels=True))
    first = next(n for n in source.graph.node if n.op_type == "Conv")
    floats = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in source.graph.initializer}
    graph, constants, producers, _, _ = _int8_weights_and_first_input(quantize_int8(source.SerializeToString(), calibration))
    conv = next(n for n in graph.node if n.op_type == "Conv")
    weight, bias = (producers[name] for name in conv.input[1:3])  # their DequantizeLinear nodes
    q, scale, zero = (constants[name].astype(np.float64) for name in weight.input)
    int8_weight = ((q - zero[:, None, None, None]) * scale[:, None, None, None]).reshape(len(q), -1)
    int8_bias = constants[bias.input[0]] * constants[bias.input[1]].astype(np.float64)
    mean_patch, _ = _patch_moments(source, first, calibration, (2, 2))
    fp32_mean = floats[first.input[1]].reshape(len(q), -1) @ mean_patch + floats[first.input[2]]
    int8_mean = int8_weight @ mean_patch + int8_bias
    assert np.abs(int8_mean - fp32_mean).max() <= constants[bias.input[1]].max()  # one step of the int32 bias
    uncorrected = int8_weight @ mean_patch + floats[first.input[2]]
    assert np.abs(uncorrected - fp32_mean).max() > 10 * constants[bias.input[1]].max()  # what the correction removed


@pytest.mark.parametrize("size", [32, 33])
def test_raw_pixel_stem_is_the_stem_on_normalised_pixels(size):
    """The 2x2-block form of a 3x3 stride-2 convolution, padding included, at even and odd sizes (odd
    ones read the bottom and right padding too); a mean colour of whole grey levels makes it exact."""
    from leukoscope.models.cellnet import conv_bn
    from leukoscope.onnx_backend import RawPixelStem

    torch.manual_seed(0)
    stem = conv_bn(3, 8, stride=2).eval()
    stem[1].running_mean.normal_()
    stem[1].running_var.uniform_(0.5, 2.0)
    mean, std = [150 / 255, 120 / 255, 200 / 255], [0.2, 0.25, 0.1]
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        expected = stem((images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        got = RawPixelStem(stem[0], stem[1], mean, std, size)(images)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
