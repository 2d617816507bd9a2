"""The peer comparison: see volcopy.bench.compare (also run as ``volcopy bench``)."""

import sys

from volcopy.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
