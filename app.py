"""Web UI: python app.py --base <model> [--adapter <training output folder> ...] (see docs/app.md)."""

import sys

from moslora_diffusion.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
