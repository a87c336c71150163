"""Evaluation of a model being trained or trained already.

- validation.py: validation loss and perplexity, loss by position, passkey and
  MQAR accuracy, the mixers' diagnostics (what the loop's `eval_every` runs);
- longeval/: the long-context suite (`loom eval`, and `eval.suite_tasks`
  during training), on one process or under context parallelism;
- lm_eval_model.py: the lm-eval-harness model `loom`.
"""
