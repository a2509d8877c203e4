"""Start `tensor_parallel_degree` ranks with DeepSpeed's launcher, as LMI started its DeepSpeed workers.

`python -m entrypoint serve` replaces itself (exec) with DeepSpeed's per-node launcher,
`python -m deepspeed.launcher.launch --module entrypoint.rank`, given the world it would get from
`deepspeed --num_gpus N` on one host. We skip the `deepspeed` runner in front of it because, for a local
run, the runner does not forward SIGTERM (measured with 0.19.8: `docker stop`-style SIGTERM to the runner
left the launcher and every rank running). The launcher is then the container's main process: it forwards
SIGTERM to every rank, and when any rank exits non-zero it terminates the others and exits with that
status — no orphaned ranks, and SageMaker sees the failure. On a machine without GPUs the "devices" are N
CPU processes (DeepSpeed's CPU accelerator, gloo).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("lmi.ranks")


def rank_command(model_dir: Path, degree: int, master_port: int) -> list[str]:
    return launcher_command("entrypoint.rank", ["--model-dir", str(model_dir)], degree, master_port)


def launcher_command(module: str, arguments: list[str], degree: int, master_port: int) -> list[str]:
    """DeepSpeed's per-node launcher running `python -m module arguments` as `degree` local ranks."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(degree))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={master_port}", "--module", "--no_local_rank",
            module, *arguments]


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
