import sys

from meshtui.cli import main

sys.exit(main())
