"""``python -m nbhelpers`` (and ``torchrun ... -m nbhelpers train ...``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
