"""Peak host memory of this process while it loads a model, split the way that matters for tensor
parallelism.

`ru_maxrss` counts every resident page, including the pages of a memory-mapped safetensors checkpoint
that the process touched; those are page cache, shared by every rank reading the same file and
reclaimable, so N ranks do not hold N copies of them. The private (anonymous) memory is what each rank
really owns, so both are sampled from /proc/self/status (Linux; elsewhere only the first is known).
"""

from __future__ import annotations

import resource
import threading


def _private_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Samples private memory every `interval` seconds on a thread until `stop()`."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_private = _private_bytes() or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-probe", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak_private = max(self.peak_private, _private_bytes() or 0)

    def stop(self) -> dict[str, str]:
        self._done.set()
        self._thread.join()
        self.peak_private = max(self.peak_private, _private_bytes() or 0)
        return {"peak_private_memory": f"{self.peak_private / 2**30:.2f}GiB",
                "peak_rss_incl_mapped_checkpoint": f"{peak_rss() / 2**30:.2f}GiB"}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
