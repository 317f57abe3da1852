"""``python -m sdlite`` runs the command line."""

import sys

from sdlite.cli import main

sys.exit(main())
