"""`python -m edgekit.cli`."""

import sys

from edgekit.cli import main

sys.exit(main())
