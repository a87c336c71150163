"""What keeps a run safe from bad input, divergence, two owners and crashes.

- inputs.py: every input checked before any work (model shapes, lengths,
  tokenizer file, data sources); not to be confused with validation loss,
  which is eval/validation.py;
- guard.py: StepGuard, which skips and never checkpoints a diverged update;
- lock.py: RunLock, one owner per run folder;
- faults.py: fault-injection hooks for tests/reliability (no-ops unless set).
"""
