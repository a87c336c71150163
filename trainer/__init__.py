"""Loom's trainer: CLI, config, data, engines, loop, checkpoints, evaluation."""
import os
import sys


def drop_checkout_from_path() -> None:
    """For `python -m loom.trainer...` entry points: `python -m` puts the working
    directory first on sys.path. Run from a Loom checkout, its top-level folders
    (trainer/, models/, kernels/) would then shadow installed packages of those
    names, e.g. Hugging Face's `kernels`, which transformers imports. Loom itself
    is always imported as `loom.*`, so that entry is dropped."""
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd() \
            and os.path.isfile(os.path.join("kernels", "__init__.py")):
        del sys.path[0]
