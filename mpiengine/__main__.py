"""``python -m mpiengine``: the command line (see ``mpiengine --help``)."""
import sys

from .cli import main

sys.exit(main())
