import sys

from tandem.sim.cli import main

sys.exit(main())
