import sys

from mtpd.cli import main

sys.exit(main())
