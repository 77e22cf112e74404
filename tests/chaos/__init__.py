"""Fault injection against a real cluster, and checkers that prove the guarantees held.

Run ``python -m tests.chaos --seconds 60 --seed 42`` from the repository root; see README.md here.
"""

import sys
from pathlib import Path

# The tests' own helpers (harness.py, agents.py) are imported by name, as the other tests do.
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
