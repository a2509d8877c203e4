"""One tensor-parallel rank, started by DeepSpeed's launcher (see `entrypoint.rank_launcher`).

Rank 0 serves HTTP and schedules (the same `entrypoint.launch.serve` as a single process); the other
ranks load their shard and replay rank 0's forward passes (`handlers.tensor_parallel.serve_worker`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from entrypoint.cli import report_user_error, user_errors, configure_logging
from entrypoint.configuration import load_configuration


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
        from handlers.tensor_parallel import serve_worker
        return serve_worker(configuration)
    except user_errors() as error:
        return report_user_error(error)
    except Exception:
        logging.getLogger("lmi.rank").exception("rank %d failed", rank)
        return 1


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
