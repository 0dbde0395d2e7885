"""``python -m capret_utils.train --params params.yaml --run-dir DIR``, under ``torchrun`` for several processes
(:func:`capret_utils.train.cli.main`)."""

import sys

from capret_utils.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
