"""``python -m statetune`` (and ``torchrun -m statetune``) runs the CLI."""

import sys

from statetune.cli import main

sys.exit(main())
