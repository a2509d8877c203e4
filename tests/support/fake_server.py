"""Run the real server (`entrypoint.launch.serve`) on the fake engine, for tests that need a process.

    python -m tests.support.fake_server --port 8080 [--load-seconds 2] [--fail-load "message"]
        [--step-delay 0.01] [--job-queue-size N] [--model-loading-timeout S] [--request-read-timeout S]
        [--graceful-shutdown S]

Test hooks live here, not in the production configuration: the server under test parses nothing special.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from entrypoint.configuration import Configuration
from entrypoint.launch import serve
from handlers.serving_properties import ServingProperties
from tests.support.fake_engine import FakeEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-seconds", type=float, default=0.0, help="how long the fake model load takes")
    parser.add_argument("--fail-load", default=None, help="make loading fail with this message")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--job-queue-size", type=int, default=1000)
    parser.add_argument("--model-loading-timeout", type=float, default=1800.0)
    parser.add_argument("--crash-at-step", type=int, default=None, help="the engine's step N raises")
    parser.add_argument("--user-error", action="store_true", help="fail the load with a user error (re-raised)")
    parser.add_argument("--request-read-timeout", type=float, default=30.0)
    parser.add_argument("--graceful-shutdown", type=float, default=None, help="seconds running requests get after SIGTERM")
    args = parser.parse_args(argv)

    properties = ServingProperties(port=args.port, model_id="fake-model", job_queue_size=args.job_queue_size,
                                   model_loading_timeout=args.model_loading_timeout,
                                   request_read_timeout=args.request_read_timeout)
    configuration = Configuration(properties=properties, sources={}, model_dir=Path("/nonexistent/model"))

    def factory(configuration: Configuration, progress) -> FakeEngine:
        steps = 4
        for step in range(steps):
            progress(f"loading fake weights {step + 1}/{steps}")
            time.sleep(args.load_seconds / steps)
        if args.fail_load:
            raise (UserError if args.user_error else RuntimeError)(args.fail_load)
        return FakeEngine(step_delay=args.step_delay, fail_at_step=args.crash_at_step)

    try:
        timing = {} if args.graceful_shutdown is None else {"graceful_shutdown_s": args.graceful_shutdown}
        return serve(configuration, engine_factory=factory, host="127.0.0.1", raise_load_errors=(UserError,), **timing)
    except UserError as error:  # what the CLI does with its user errors
        print(f"error: {error}", file=sys.stderr)
        return 2


class UserError(ValueError):
    """Stands in for the CLI's user errors (ConfigurationError, ModelResolutionError, PlanError)."""


if __name__ == "__main__":
    sys.exit(main())
