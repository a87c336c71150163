"""What a run reports about itself.

- metrics.py: metrics.jsonl and TensorBoard;
- perf.py: model FLOP utilisation (MFU), device peaks, profiler traces;
- logs.py: start-up lines from below the trainer (each kernel's backend).
"""
