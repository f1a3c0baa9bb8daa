"""Training step speed by precision and memory format on this CPU, and the two oneDNN kernel faults.

Writes the ``CPU_KERNELS`` block of docs/benchmarks.md. Each fault probe runs in a forked child,
so a crash is counted instead of ending the benchmark:

- fp32, channels_last: the backward-weights pass of a strided 1x1 convolution with fewer than 16
  input channels (``jit_1x1:avx512_core``) crashes or corrupts the heap on AVX-512 CPUs;
- bf16 autocast: the backward-weights pass of a stride-2 3x3 convolution on a 1x1 input returns NaN
  or different gradients for identical steps on CPUs with native bf16.

Usage: python benchmarks/cpu_kernels.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import cpu, write_block  # noqa: E402

from leukoscope.models import create_model  # noqa: E402
from leukoscope.trainer import cpu_has_native_bf16  # noqa: E402

FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def step_rate(arch: str, size: int, fmt: torch.memory_format, bf16: bool, seconds: float, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = create_model(arch, 8).to(memory_format=fmt).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 8, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return n * batch / (time.perf_counter() - start)


def conv_grads(c_in: int, kernel: int, hw: int, batch: int, fmt: torch.memory_format, bf16: bool, reps: int = 4) -> bool:
    """True when the weight gradients of ``reps`` identical steps are finite and equal."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 16, kernel, 2, kernel // 2, bias=False).to(memory_format=fmt)
    x = torch.randn(batch, c_in, hw, hw).contiguous(memory_format=fmt)
    grads = []
    for _ in range(reps):
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().square().sum().backward()
        grads.append(conv.weight.grad.clone())
    return all(torch.isfinite(g).all() and torch.equal(g, grads[0]) for g in grads)


def in_child(fn, *args) -> str:
    """Run ``fn(*args)`` in a forked child: 'ok', 'wrong' or 'crash'."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn(*args) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "crash"
    return {0: "ok", 3: "wrong"}.get(os.WEXITSTATUS(status), "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per configuration")
    args = parser.parse_args()
    isa = torch.backends.cpu.get_cpu_capability()
    probes = [
        ("fp32 channels_last, 1x1 stride 2, 8 -> 16 channels, 16x16, batch 7", conv_grads, (8, 1, 16, 7, torch.channels_last, False)),
        ("fp32 channels_last, 1x1 stride 2, 24 -> 16 channels, 16x16, batch 7", conv_grads, (24, 1, 16, 7, torch.channels_last, False)),
        ("fp32 NCHW, 1x1 stride 2, 8 -> 16 channels, 16x16, batch 7", conv_grads, (8, 1, 16, 7, torch.contiguous_format, False)),
        ("bf16, 3x3 stride 2 on a 1x1 input, 32 -> 16 channels, batch 16", conv_grads, (32, 3, 1, 16, torch.contiguous_format, True)),
        ("bf16, 3x3 stride 2 on a 2x2 input, 32 -> 16 channels, batch 16", conv_grads, (32, 3, 2, 16, torch.contiguous_format, True)),
    ]
    results = [(name, max((in_child(fn, *a) for _ in range(3)), key=["ok", "wrong", "error", "crash"].index)) for name, fn, a in probes]
    lines = [f"CPU: {cpu()}; PyTorch {torch.__version__}, kernels {isa}, "
             f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'} (`python benchmarks/cpu_kernels.py`).", "",
             "| model | px | fp32 NCHW | fp32 channels_last | bf16 NCHW | bf16 channels_last |", "|---|---|---|---|---|---|"]
    for arch, size in (("cellnet", 112), ("cellnet", 128)):
        rates = [step_rate(arch, size, fmt, bf16, args.seconds) for bf16 in (False, True) for fmt in FORMATS.values()]
        lines.append(f"| {arch} | {size} | " + " | ".join(f"{r:.0f} img/s" for r in rates) + " |")
        print(lines[-1], flush=True)
    lines += ["", "Kernel probes (weight gradients of identical steps, worst of 3 forked runs):", "", "| probe | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in results]
    write_block("CPU_KERNELS", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
