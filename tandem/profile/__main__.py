import sys

from tandem.profile.cli import main

sys.exit(main())
