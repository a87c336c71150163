"""The reference tests of this folder import their shared equations from `_refs.py`
next to this file (pytest runs with --import-mode=importlib, which adds no test folder
to sys.path)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
