"""`python -m miaotui`: the `miaotui` command."""

import sys

from miaotui.cli import main

sys.exit(main())
