"""``python -m mmfuse``: the same command line as the ``mmfuse`` script."""

import sys

from mmfuse.cli import main

if __name__ == "__main__":
    sys.exit(main())
