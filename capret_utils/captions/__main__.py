"""``python -m capret_utils.captions``: one caption rank (see :mod:`capret_utils.captions.cli`)."""

import sys

from capret_utils.captions.cli import main

if __name__ == "__main__":
    sys.exit(main())
