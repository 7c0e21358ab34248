"""``python -m benchmarks``: every benchmark, then docs/performance.md (see run_all.py)."""

import sys

from benchmarks.run_all import main

sys.exit(main())
