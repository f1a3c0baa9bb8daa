import platform
import sys

import pytest
import torch

from leukoscope.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_applies_on_glibc_and_leaves_results_unchanged():
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    before = (x @ x).sum()
    assert keep_freed_memory() is True
    assert torch.equal((x @ x).sum(), before)


def test_device_choice_and_a_clear_error_without_cuda(tiny_run, tmp_path, capsys):
    import torch

    from leukoscope.cli import main
    from leukoscope.errors import LeukoscopeError
    from leukoscope.runtime import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LeukoscopeError, match="unknown device"):
        resolve_device("tpu")
    data, run = tiny_run
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    if not torch.cuda.is_available():
        assert main(["predict", str(run), str(data), "--out", str(tmp_path / "q.csv"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_torchrun_ranks_find_their_gpu_and_training_refuses_more_ranks_than_gpus(monkeypatch):
    """Checked with the GPU count simulated: a node's ranks spread over its GPUs (prediction may share one), and training,
    which takes one GPU per process, refuses a rank without its own before it joins the process group."""
    from leukoscope.distributed import init_world
    from leukoscope.errors import LeukoscopeError
    from leukoscope.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")  # one process: PyTorch's current GPU
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    for local, gpu in ((0, 0), (1, 1), (3, 1)):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        assert resolve_device("auto") == torch.device("cuda", gpu)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LeukoscopeError, match="local rank 2, but PyTorch sees 2 GPU.*--nproc_per_node 2 or less"):
        init_world("cuda")


def test_the_eval_preset_normalises_on_the_images_device():
    """The mean and standard deviation go where the batch is: on a GPU, CPU constants crashed every prediction's first
    batch (PyTorch's meta device stands in for the GPU; a mix of devices is refused there as on CUDA)."""
    from leukoscope.transforms import eval_transform

    batch = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    out = eval_transform(batch, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 8) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ["wbc", "pbc"])
def test_the_bundled_networks_run_where_their_batches_are(name):
    """The GPU path without a GPU: the network, its OOD head and the eval preset on the meta device (shapes only), so
    that no constant left on the CPU can crash a prediction on CUDA again."""
    from leukoscope.inference import TorchBackend, load_model
    from leukoscope.transforms import eval_transform

    predictor = load_model(name, backend="torch", device="cpu")
    backend = TorchBackend(predictor.checkpoint, "meta")
    batch = torch.zeros(4, 3, predictor.image_size, predictor.image_size, dtype=torch.uint8, device="meta")
    out = backend.model(eval_transform(batch, backend.mean, backend.std))
    assert out.device.type == "meta" and out.shape == (4, len(predictor.class_names) + 1)  # the classes and the OOD score


def test_a_resumed_gpu_run_continues_the_gpus_random_stream(monkeypatch):
    """Dropout draws its masks from the GPU's generator there: a resume restores it (simulated: no GPU needed)."""
    from leukoscope.config import TrainConfig
    from leukoscope.models import create_model
    from leukoscope.runs import seed_everything
    from leukoscope.trainer import Trainer

    saved, restored = torch.tensor([7, 8, 9], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    config = TrainConfig(arch="cellnet_tiny", image_size=32, epochs=1)
    trainer = Trainer(create_model("cellnet_tiny", 2), config, ([0.5] * 3, [0.2] * 3), seed_everything(0))
    state = {"epoch": 1, "history": [], "best_key": None, "best_epoch": 1, "stale": 0, "best_state": {}}
    assert trainer.snapshot(state)["cuda_rng"] is None  # a CPU run has no GPU stream
    trainer.restore(trainer.snapshot(state))
    assert restored == []
    trainer.device = torch.device("cuda", 1)
    snapshot = trainer.snapshot(state)
    assert torch.equal(snapshot["cuda_rng"], saved)
    trainer.restore(snapshot)
    assert len(restored) == 1 and torch.equal(restored[0][0], saved) and restored[0][1] == torch.device("cuda", 1)
