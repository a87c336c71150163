"""Checkpoints: writing them, reading them back, and resuming a run from one.

- manager.py: CheckpointManager, the atomic, checksummed `step-NNNNNNNN/` folders
  (weights, trainer state, meta, manifest), `latest`, pruning, validation;
- dcp.py: sharded checkpoints (torch.distributed.checkpoint), saved
  asynchronously (`PendingSave`), and `python -m loom.trainer.checkpoint.dcp
  export` to a full checkpoint;
- optim_state.py: the optimizer state keyed by parameter name, so any engine on
  any number of ranks can load it;
- resume_policy.py: what a resume with a changed recipe honours and refuses;
- layout.py: the run's layout (world, dp, cp, global batch) and RNG states
  across world sizes.
"""
