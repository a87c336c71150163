"""Loom's trainer, one folder per job.

At the top: cli.py (`loom train/eval/generate/convert/data/info`), config.py
(the recipe schema), train.py (the loop), optim.py (AdamW and its schedule).
Folders: distributed/ (process environment, mesh, engines, parallelize,
tiling), checkpoint/ (manager, sharded DCP, optimizer state, resume),
data/ (sources, packing, batches), eval/ (validation, long-context suite,
lm-eval), hf/ (import, export, remote code), reliability/ (input checks,
guard, lock, fault hooks), observe/ (metrics, MFU, logs).
"""
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
