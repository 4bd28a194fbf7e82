"""``python -m bench.serving``: the same command as ``splitserve bench``."""

import sys

from bench.serving.cli import main

sys.exit(main())
