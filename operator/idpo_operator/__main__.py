"""`python -m idpo_operator ...` is the `idpo` CLI (e.g. `python -m idpo_operator operator -A`)."""

import sys

from idpo_operator.cli import main

sys.exit(main())
