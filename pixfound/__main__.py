"""``python -m pixfound`` (also ``torchrun --nproc-per-node N -m pixfound eval ...``)."""
from __future__ import annotations

import sys

from pixfound.cli import main

if __name__ == "__main__":
    sys.exit(main())
