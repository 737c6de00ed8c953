#!/usr/bin/env python
"""Same as the `resnest-convert` console command (see resnest_backbone/convert/cli.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resnest_backbone.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
