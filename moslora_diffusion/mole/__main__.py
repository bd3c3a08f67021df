"""`python -m moslora_diffusion.mole train | generate | export`: `generate` with every composition method
(composition/cli.py, which hands train and export to mole/cli.py). A command module: it sits above every layer."""

import sys

from ..composition.cli import main

sys.exit(main())
