"""`python -m loom.trainer ...`: the `loom` command."""
import sys

from loom.trainer.cli import main

sys.exit(main())
