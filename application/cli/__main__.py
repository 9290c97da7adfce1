"""`python -m application.cli ...`, the same as the `swift-api` console script."""

import sys

from application.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
