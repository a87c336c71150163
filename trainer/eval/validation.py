"""Evaluation: validation loss and perplexity, loss by position in the
context, passkey retrieval accuracy over context lengths and depths, MQAR
(multi-query associative recall) accuracy, and the mixers' diagnostics (gate
mean, attention-sink mass, MoH head usage)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loom.models import HybridLM
from loom.trainer.data import answer_span_correct


def token_losses(model: HybridLM, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024):
    """Per-token loss (B, T) and argmax-correct (B, T), never holding more than
    `chunk` rows of logits."""
    B, T, D = hidden.shape
    h, y = hidden.reshape(-1, D), labels.reshape(-1)
    losses, correct = [], []
    for i in range(0, h.shape[0], chunk):
        logits = model.logits(h[i:i + chunk])
        losses.append(F.cross_entropy(logits, y[i:i + chunk], ignore_index=-100, reduction="none"))
        correct.append(logits.argmax(-1) == y[i:i + chunk])
    return torch.cat(losses).view(B, T), torch.cat(correct).view(B, T)


def forward_hidden(model: HybridLM, batch: dict, stats: dict | None = None) -> torch.Tensor:
    return model(batch["input_ids"], position_ids=batch["position_ids"], seq_ids=batch.get("seq_ids"),
                 stats=stats).hidden


def length_edges(T: int) -> list[int]:
    """Context-length buckets for loss_by_length: [0, 1K), [1K, 4K), [4K, 16K), ... up to T."""
    edges = [0]
    b = 1024
    while b < T:
        edges.append(b)
        b *= 4
    return edges + [T]


def _k(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


@torch.no_grad()
def validation(model: HybridLM, batches: list[dict], buckets: int = 8) -> dict:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    T = batches[0]["input_ids"].shape[1]
    nb = max(1, min(buckets, T))
    bucket_sum = torch.zeros(nb, dtype=torch.float64)
    bucket_cnt = torch.zeros(nb, dtype=torch.float64)
    edges = length_edges(T)
    len_sum = torch.zeros(len(edges) - 1, dtype=torch.float64)
    len_cnt = torch.zeros(len(edges) - 1, dtype=torch.float64)
    stats: dict = {}
    for i, batch in enumerate(batches):
        hidden = forward_hidden(model, batch, stats if i == 0 else None)
        loss, _ = token_losses(model, hidden, batch["labels"])
        valid = batch["labels"] != -100
        total += float(loss[valid].sum())
        count += int(valid.sum())
        which = (torch.arange(T) * nb // T).expand_as(loss)
        bucket_sum.index_add_(0, which[valid], loss[valid].double())
        bucket_cnt.index_add_(0, which[valid], torch.ones_like(loss[valid], dtype=torch.float64))
        pos = torch.arange(T).expand_as(loss)[valid]
        lb = torch.bucketize(pos, torch.tensor(edges[1:-1]), right=True)
        len_sum.index_add_(0, lb, loss[valid].double())
        len_cnt.index_add_(0, lb, torch.ones_like(lb, dtype=torch.float64))
    model.train(was_training)
    mean = total / max(count, 1)
    out = {"loss": mean, "ppl": math.exp(min(mean, 50.0)),
           "loss_by_position": (bucket_sum / bucket_cnt.clamp_min(1)).tolist(),
           "loss_by_length": {f"{_k(a)}-{_k(b)}": float(len_sum[i] / len_cnt[i])
                              for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])) if len_cnt[i] > 0}}
    out.update({k: v for k, v in stats.items()})
    return out


@torch.no_grad()
def answer_accuracy(model: HybridLM, batches: list[dict]) -> float:
    """Share of examples whose answer tokens (batch["answer_mask"]) are all
    predicted right by argmax, teacher-forced."""
    was_training = model.training
    model.eval()
    right, n = 0, 0
    for batch in batches:
        hidden = forward_hidden(model, batch)
        _, correct = token_losses(model, hidden, batch["labels"])
        mask = batch["answer_mask"]
        ok = (correct | ~mask).all(dim=1) & mask.any(dim=1)
        right += int(ok.sum())
        n += int(mask.any(dim=1).sum())
    model.train(was_training)
    return right / max(n, 1)


@torch.no_grad()
def answer_scores(model: HybridLM, batches: list[dict]) -> dict:
    """Teacher-forced scores of the synthetic-task answers marked by batch["answer_mask"].

    An answer is a contiguous run of answer tokens (passkey: one per row, mqar:
    one per query). Returns exact (share of answers whose tokens are all
    predicted right by argmax), rows (share of rows with every answer right),
    tokens (share of answer tokens right), loss (mean answer-token loss, nats)
    and answers (how many answers were scored).
    """
    was_training = model.training
    model.eval()
    exact, rows, tok_right, loss, n_ans, n_rows, n_tok = 0, 0, 0, 0.0, 0, 0, 0
    for batch in batches:
        hidden = forward_hidden(model, batch)
        losses, correct = token_losses(model, hidden, batch["labels"])
        mask = batch["answer_mask"]
        pred = torch.where(correct, batch["labels"], -1)   # right where argmax hit the label
        spans = answer_span_correct(pred, batch["labels"], mask)
        exact += int(spans.sum())
        n_ans += spans.numel()
        has = mask.any(dim=1)
        rows += int(((correct | ~mask).all(dim=1) & has).sum())
        n_rows += int(has.sum())
        tok_right += int((correct & mask).sum())
        n_tok += int(mask.sum())
        loss += float(losses[mask].sum())
    model.train(was_training)
    return {"exact": exact / max(n_ans, 1), "rows": rows / max(n_rows, 1), "tokens": tok_right / max(n_tok, 1),
            "loss": loss / max(n_tok, 1), "answers": n_ans}
