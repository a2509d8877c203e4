"""`TORCH_CUDA_ARCH_LIST` in the form DeepSpeed's op builder parses.

PyTorch accepts architecture-specific suffixes (`9.0a`, `10.0f`: sm_90a, sm_100f) and NVIDIA's images set
them (the H200 machine we measured on sets `TORCH_CUDA_ARCH_LIST=9.0a`). DeepSpeed 0.19.8's builder splits
each entry at the dot and calls `int()` on the minor part (`ops/op_builder/builder.py`,
`compute_capability_args`), so `9.0a` fails every JIT build with "invalid literal for int() with base 10:
'0a'" (shared/FACTS.md). DeepSpeed's inference kernels use no sm_90a-only instructions, so the plain
architecture builds the same kernels; `+PTX` is kept, because DeepSpeed parses it.
"""

from __future__ import annotations

import re

_ENTRY = re.compile(r"^(\d+)\.(\d+)[a-z]?(\+PTX)?$")


def normalized_arch_list(value: str) -> str:
    """`value` with architecture suffixes dropped and duplicates removed, `;`-separated. Entries that are not
    `major.minor` (PyTorch also takes names such as `Hopper`) pass through for PyTorch to judge."""
    entries: list[str] = []
    for raw in re.split(r"[;\s]+", value.strip()):
        if not raw:
            continue
        match = _ENTRY.match(raw)
        entry = f"{match.group(1)}.{match.group(2)}{match.group(3) or ''}" if match else raw
        if entry not in entries:
            entries.append(entry)
    return ";".join(entries)
