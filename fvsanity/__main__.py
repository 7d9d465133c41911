"""``python -m fvsanity ...`` (and ``torchrun ... -m fvsanity ...``): the ``fvsanity`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
