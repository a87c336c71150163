"""`python -m loom.trainer ...`: the `loom` command."""
import os
import sys

# `python -m` puts the working directory first on sys.path. Run from a Loom
# checkout, its top-level folders (trainer/, models/, kernels/) would then shadow
# installed packages of those names, e.g. Hugging Face's `kernels`, which
# transformers imports. Loom itself is always imported as `loom.*`.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd() and os.path.isfile("kernels/__init__.py"):
    del sys.path[0]

from loom.trainer.cli import main  # noqa: E402

sys.exit(main())
