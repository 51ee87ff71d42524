"""``python -m lightning_ckpt``: the ``lightning-ckpt`` command line."""

import sys

from lightning_ckpt.cli import main

sys.exit(main())
