"""``python -m evaluation``: the research benchmarks (see evaluation/README.md)."""

import sys

from .evidence_cli import main

sys.exit(main())
