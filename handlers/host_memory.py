"""How much host memory this process may still take: the kernel's MemAvailable, bounded by the memory
cgroup's limit inside a container (where MemAvailable describes the whole host, not what the container may
use). Used where a plan must not exceed host memory: the weights-fit check at start-up and FastGen's
correctness gate when its fp32 reference runs on the CPU."""

from __future__ import annotations

from pathlib import Path

GIB = 2**30


def available_host_memory() -> tuple[int, str] | None:
    """(bytes, where that figure comes from), or None when neither source is readable (not Linux)."""
    candidates = []
    available = meminfo_bytes("MemAvailable")
    if available is not None:
        candidates.append((available, f"{available / GIB:.1f} GiB available on this host (MemAvailable)"))
    cgroup = cgroup_headroom()
    if cgroup is not None:
        candidates.append(cgroup)
    return min(candidates) if candidates else None


def meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def cgroup_headroom() -> tuple[int, str] | None:
    """(limit - usage, description) of this process's memory cgroup, v2 or v1, if it has a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        limit = int(limit_text)
        return (max(limit - usage, 0),
                f"{(limit - usage) / GIB:.1f} GiB left under this container's memory limit of {limit / GIB:.1f} GiB")
    return None
