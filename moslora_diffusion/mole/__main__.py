"""`python -m moslora_diffusion.mole train | generate | export` (mole/cli.py)."""

import sys

from .cli import main

sys.exit(main())
