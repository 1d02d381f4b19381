"""``python -m visionpeft``: the same command line as the ``visionpeft`` script."""
import sys

from .cli import main

sys.exit(main())
