"""`python -m entrypoint.healthcheck [--model-dir DIR]`: exit 0 when this container's server answers
GET /ping with 200, else 1 (the image's HEALTHCHECK; Docker and Kubernetes exec probes call it).

The port is the one the server listens on, resolved by the same rules (`SAGEMAKER_BIND_TO_PORT` >
serving.properties `option.port` > `OPTION_PORT` > 8080), so a probe never checks a port nobody uses.
Standard library HTTP: the probe runs every 30 s and must start fast (about 0.3 s, no torch import).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Sequence

from entrypoint.configuration import DEFAULT_MODEL_DIR, ConfigurationError, load_configuration

TIMEOUT_SECONDS = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoint.healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args(argv)
    try:
        port = load_configuration(args.model_dir, os.environ).properties.port
    except ConfigurationError as error:  # the server refuses to start on this too, with the same message
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}/ping"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            status, body = response.status, response.read(500)
    except urllib.error.HTTPError as error:  # 503 while loading or after a failure: the body says why
        status, body = error.code, error.read(500)
    except OSError as error:  # refused, timed out
        print(f"unhealthy: GET {url}: {error}", file=sys.stderr)
        return 1
    text = body.decode("utf-8", errors="replace")
    if status == 200:
        print(f"healthy: GET {url}: {text}")
        return 0
    print(f"unhealthy: GET {url}: HTTP {status}: {text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
