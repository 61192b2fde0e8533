"""`python -m nestling ...`: the same CLI, and what `torchrun -m nestling -- train ...` runs on every rank."""

import sys

from nestling.cli import main

sys.exit(main())
