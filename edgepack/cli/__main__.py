"""``python -m edgepack.cli``: the ``edgepack`` command."""

import sys

from edgepack.cli import main

sys.exit(main())
