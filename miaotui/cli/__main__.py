import sys

from miaotui.cli import main

sys.exit(main())
