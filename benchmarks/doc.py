"""Rewrite one marked block of docs/benchmarks.md, keeping everything else."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from leukoscope.metrics import wilson_interval
from leukoscope.runtime import cpu_info, usable_cores

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:START -->", f"<!-- {name}:END -->"


def write_block(name: str, body: str) -> None:
    """Replace what lies between the markers of ``name`` with ``body``; the markers are appended when
    not yet present."""
    start, end = markers(name)
    block = f"{start}\n{body}\n{end}"
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if start not in text:
        text = text.rstrip("\n") + "\n\n" + start + "\n" + end + "\n"
    DOC.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S))


def add_block_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--block NAME``: the block a script writes instead of its own (``default``, as its help names it),
    so that a second CPU's figures sit beside the first's instead of replacing them."""
    parser.add_argument("--block", help=f"the docs/benchmarks.md block to write (default: {default}; give another name to keep "
                                        "a second CPU's figures beside the first's)")


def share(hits: int, n: int) -> str:
    """``hits`` of ``n`` as the tables write it: count, percentage and its 95% Wilson interval."""
    low, high = wilson_interval(hits, n)
    return f"{hits}/{n} = {100 * hits / n:.1f}% ({100 * low:.1f}-{100 * high:.1f})"


def cpu() -> str:
    """The CPU a measurement ran on, as the tables name it: its model and the instruction sets that
    change which kernels run (speeds differ between an AVX2-only, an AVX-512 and an AMX machine)."""
    name, flags = cpu_info()
    known = (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
    present = [label for flag, label in known if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    return f"{usable_cores()} cores of {name or 'an unknown CPU'}" + (f" ({', '.join(present)})" if present else "")
