#!/usr/bin/env python
"""Same as the `resnest-convert` console command (see resnest_backbone/convert/cli.py)."""
import sys

from resnest_backbone.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
