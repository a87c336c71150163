"""Loom's trainer, one folder per job.

At the top: cli.py (`loom train/eval/generate/convert/data/info`), config.py
(the recipe schema), train.py (the loop), optim.py (AdamW and its schedule).
Folders: distributed/ (process environment, mesh, engines, parallelize,
tiling), checkpoint/ (manager, sharded DCP, optimizer state, resume),
data/ (sources, packing, batches), eval/ (validation, long-context suite,
lm-eval), hf/ (import, export, remote code), reliability/ (input checks,
guard, lock, fault hooks), observe/ (metrics, MFU, logs).
"""
