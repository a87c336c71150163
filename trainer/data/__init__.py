"""The data path: configs and entry points.

recipe `data:` -> DataConfig -> load_tokenizer(cfg.tokenizer)
    -> build_dataset(cfg, tokenizer, "train", seed) -> WindowDataset (infinite, pure in i)
    -> Batcher(dataset, batch_size, dp_rank, dp_size) -> dict of (B, T) tensors
    (StagedBatches chains one Batcher per stage of data.seq_len_schedule)

Real text is read one way only: from prepared folders (`loom data prepare`),
memory-mapped. Raw sources (files, hub, stdlib) are prepared into
cache_dir on first use; synthetic tasks are generated from the seed.

Batch fields (B = rows, T = seq_len): input_ids, labels (-100 where the target
starts a new document), position_ids (restart at 0 at each document and at the
window start), seq_ids (document index per row), all (B, T) int64;
answer_mask (B, T) bool (label positions holding synthetic-task answers);
source (B,) int64 (index of the source in the config list).
Everything is a deterministic function of (config, seed, split, window index);
the Batcher's state is one integer. Files: tokenizer.py, sources.py (raw text
streams), prepare.py (tokenize into shards), prepared.py (format, checks),
reader.py (memory-mapped windows), chat.py (chat templates and loss masks of
`kind: chat` sources), chat_stream.py (whole-conversation windows), synthetic.py (passkey, mqar, copy),
packing.py (window fields, boundary helpers), dataset.py (mixture),
batcher.py, schedule.py (seq_len stages), stats.py and commands.py (`loom data`).

Example:
    >>> cfg = DataConfig(seq_len=256)
    >>> tok = load_tokenizer(cfg.tokenizer)
    >>> batcher = Batcher(build_dataset(cfg, tok, "train", seed=0), batch_size=4)
    >>> batch = batcher.next()             # batch["input_ids"].shape == (4, 256)
    >>> val = eval_windows(cfg, tok, seed=0)
    >>> pk = passkey_examples(tok, seq_len=2048, depth=0.5, n=16, seed=0)
    >>> mq = mqar_examples(tok, seq_len=512, n=16, seed=0, n_pairs=8, n_queries=4)
"""
from __future__ import annotations

from loom.trainer.data.batcher import Batcher, collate
from loom.trainer.data.build import build_dataset, eval_windows, mqar_examples, passkey_examples
from loom.trainer.data.config import DataConfig, SourceConfig, StageConfig, validate_data_config
from loom.trainer.data.dataset import WindowDataset
from loom.trainer.data.packing import IGNORE_INDEX, cu_seqlens_from_position_ids, seq_ids_from_position_ids
from loom.trainer.data.schedule import StagedBatches
from loom.trainer.data.synthetic import answer_span_correct
from loom.trainer.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "SourceConfig", "DataConfig", "build_dataset", "eval_windows", "passkey_examples", "mqar_examples",
    "validate_data_config", "WindowDataset", "Batcher", "collate", "load_tokenizer",
    "ByteTokenizer", "HFTokenizer", "seq_ids_from_position_ids", "cu_seqlens_from_position_ids",
    "answer_span_correct", "IGNORE_INDEX", "StageConfig", "StagedBatches",
]
