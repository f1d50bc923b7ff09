"""``python3 -m xnbdd`` is ``xnbd-server``."""

import sys

from .cli.server import main

sys.exit(main())
