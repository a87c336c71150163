"""Distillation into hybrid layers: a teacher (a converted HF folder, a run or a checkpoint)
and a student whose `model.layers` replaces some of its layers with other mixer kinds.

config.py   the `distill:` recipe section (teacher, stages) and the stage of a step
teacher.py  loading the teacher; the student's start from its weights (GQA-aware q/k/v/o)
kl.py       KL(teacher || student) chunk by chunk, gradients in the forward (no full logits)
trainer.py  DistillTrainer: the align and kl stages inside the Trainer's loop

Only config.py is imported here (trainer/config.py composes it into RunConfig).
"""
