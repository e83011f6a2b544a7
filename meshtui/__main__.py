from meshtui.cli import main
import sys
sys.exit(main())
