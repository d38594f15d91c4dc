"""Makes the top-level packages importable from a plain checkout (no `pip install -e .` needed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
