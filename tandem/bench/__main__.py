"""`python -m tandem.bench ...` = `tandem bench ...`."""
import sys

from tandem.bench.cli import main

sys.exit(main())
