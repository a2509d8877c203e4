"""Start `tensor_parallel_degree` ranks with DeepSpeed's launcher, as LMI started its DeepSpeed workers.

`python -m entrypoint serve` replaces itself (exec) with `deepspeed --num_gpus N --module entrypoint.rank`,
so the launcher is the container's main process: it forwards SIGTERM to every rank, and when any rank
exits non-zero it terminates the others and exits with that status — no orphaned ranks, and SageMaker
sees the failure. On a machine without GPUs, `--num_gpus N` starts N CPU processes (DeepSpeed's CPU
accelerator, gloo).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("lmi.ranks")


def rank_command(model_dir: Path, degree: int, master_port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(degree),
            "--master_port", str(master_port), "--no_local_rank", "--module", "entrypoint.rank",
            "--model-dir", str(model_dir)]


def exec_ranks(model_dir: Path, degree: int) -> None:
    """Replace this process with the launcher; does not return."""
    command = rank_command(model_dir, degree, _free_port())
    log.info("starting %d tensor-parallel ranks: %s", degree, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
