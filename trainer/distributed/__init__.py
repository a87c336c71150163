"""How a run is laid out over processes, and what turns a built model into what is trained.

- dist.py: `Env`, this process's place in the run (ranks, the dp x cp mesh, the
  cp handle), and rank-0 logging; a leaf module passed explicitly, `Env()` for
  a single process;
- mesh.py: `setup_env(parallel)`: launchers, process groups, the dp x cp mesh;
- parallelize.py: activation checkpointing, sequence tiling (tiling.py),
  compile, then `build_engine`;
- engine.py: the engine interface the loop uses, and the `single` engine that
  the others build on: ddp.py (DistributedDataParallel), fsdp.py (FSDP2
  fully_shard per block, then the root), deepspeed_engine.py (ZeRO 0-3). Each
  builds Loom's AdamW (trainer.optim) and LambdaLR schedule on the wrapped
  parameters, so every engine does the same maths;
- precision.py: `parallel.dtype` (autocast, bf16 engines);
- parallel_check.py: which mixers support which context-parallel algorithm.

Gradients are averaged over ALL ranks (dp x cp): parameters are replicated over
the cp ranks too, and Env.reduce_loss scales each cp rank's partial loss so
that this average equals the single-process gradient (see mesh.py).
Checkpoints across world sizes: trainer/checkpoint/layout.py.
"""
