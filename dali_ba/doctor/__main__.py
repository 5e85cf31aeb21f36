"""``python -m dali_ba.doctor``."""

import sys

from dali_ba.doctor.cli import main

if __name__ == "__main__":
    sys.exit(main())
