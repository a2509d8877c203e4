"""`python -m entrypoint plan|serve` — see `entrypoint.cli`."""

import sys

from entrypoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
