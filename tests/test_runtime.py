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
