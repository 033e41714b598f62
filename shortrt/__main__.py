import sys

from shortrt.cli import main

sys.exit(main())
