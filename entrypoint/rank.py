"""One tensor-parallel rank, started by DeepSpeed's launcher (see `entrypoint.rank_launcher`).

Rank 0 serves HTTP and schedules (the same `entrypoint.launch.serve` as a single process); the other
ranks load their shard and replay rank 0's forward passes (`serve_worker` below, with `handlers.tensor_parallel.worker_loop`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from entrypoint.cli import report_user_error, user_errors, configure_logging
from entrypoint.configuration import load_configuration

logger = logging.getLogger("lmi.rank")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoint.rank")
    parser.add_argument("--model-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(rank_prefix=f"rank {rank} ")
    try:
        configuration = load_configuration(args.model_dir, os.environ)
        if rank == 0:
            from entrypoint import launch
            return launch.serve(configuration, raise_load_errors=user_errors())
        return serve_worker(configuration)
    except user_errors() as error:
        return report_user_error(error)
    except Exception:
        logging.getLogger("lmi.rank").exception("rank %d failed", rank)
        return 1


def serve_worker(configuration: Any) -> int:
    """A rank > 0: resolve and plan like rank 0, load this rank's shard, replay rank 0's operations.

    SIGTERM (the launcher forwards it to every rank) is ignored here: rank 0 finishes its running requests
    gracefully, which needs every rank, and then says stop. If rank 0 dies instead, the next broadcast
    fails and this rank exits; the launcher kills whatever is left after its own timeout."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from entrypoint.engine_factory import resolve_and_plan
    from handlers import engine_registry
    from handlers.memory_probe import PeakMemory
    from handlers.tensor_parallel import worker_loop

    resolved, plan = resolve_and_plan(configuration, lambda text: logger.info("%s", text))
    load_rank = engine_registry.entry(plan.engine).rank_loader
    if load_rank is None:
        raise RuntimeError(f"the plan chose engine {plan.engine!r}, which has no loader for ranks above 0")
    memory = PeakMemory()
    model = load_rank(configuration.properties, plan, str(resolved.path), lambda text: logger.info("%s", text))
    logger.info("rank ready; following rank 0: weights_bytes_this_rank=%d %s", model.weights_bytes,
                " ".join(f"{key}={value}" for key, value in memory.stop().items()))
    worker_loop(model.runner, model.groups)
    import resource
    logger.info("rank 0 said stop; exiting (peak_rss over the whole run: %.2fGiB)",
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return 0


if __name__ == "__main__":
    code = main()
    if code:
        # After a rank died, this process may hold threads stuck in a collective forever; exit without
        # waiting for them (and the process group's destructors) so the launcher sees the status at once.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
