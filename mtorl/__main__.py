import sys

from mtorl.cli import main

sys.exit(main())
