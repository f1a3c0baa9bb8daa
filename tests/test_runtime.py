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
