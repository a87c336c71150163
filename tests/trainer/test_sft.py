"""Supervised fine-tuning: `kind: chat` sources, loss masks, whole-conversation packing, the
global-batch token mean.

- the chat template renders as transformers' apply_chat_template (text, ids and, for a
  template with {% generation %} blocks, its assistant mask) on a small tokenizer built here;
- the byte tokenizer's mask covers exactly the assistant turns (content + <|end|>\\n);
- the mask is prepared beside the tokens (manifest: sha256 and per-block crc32), and a
  flipped mask byte stops reading with one line;
- a packed row's loss and gradients equal the conversations run one by one, for every mixer
  kind; ignored labels get exactly zero gradient from the fused loss;
- grad_accum=2, dp=2 and cp=2 (gloo, 2 processes) give the losses and weights of one batch of 2;
  metrics carry cumulative `loss_tokens`; resume is exact;
- too-long conversations: truncate / skip counted (ChatStream, `loom data stats --seq-len`);
- bad rows are one line naming the file and row.
Cost: about a minute on one core (two CLI runs, one 2-process launch).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loom.kernels.loss import linear_cross_entropy
from loom.models import HybridLM, ModelConfig
from loom.trainer.cli import main
from loom.trainer.data import collate, load_tokenizer
from loom.trainer.data.chat import BYTE_CHAT_TEMPLATE, ChatTemplate, encode_conversation, load_chat_template
from loom.trainer.data.chat_stream import ChatStream
from loom.trainer.data.config import SourceConfig
from loom.trainer.data.packing import pack_window
from loom.trainer.data.prepare import prepare_source
from loom.trainer.data.prepared import ManifestError, open_prepared
from loom.trainer.observe.metrics import read_metrics, train_losses

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('bad role') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
WORDS = "the cat sat on a mat and then it ran far away to see what was there".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def say(k):
        return " ".join(rng.choice(WORDS, k))

    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            msgs += [{"role": "user", "content": say(int(rng.integers(2, 8)))},
                     {"role": "assistant", "content": say(int(rng.integers(1, 12)))}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer.json with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20 + ["system user assistant be brief"] * 5, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML}))
    return folder


def test_template_equals_transformers(hf_tokenizer):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer))
    tok = load_tokenizer(str(hf_tokenizer))
    template = ChatTemplate(*load_chat_template(tok))
    for row in conversations(6):
        msgs = row["messages"]
        for gen in (False, True):
            assert template.render(msgs, add_generation_prompt=gen) == \
                ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        out = ref.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        text, ids, mask = encode_conversation(tok, template, msgs, "assistant", "row")
        assert ids.tolist() == list(out["input_ids"])
        assert mask.tolist() == list(out["assistant_masks"])
        assert mask.any() and not mask.all()


def test_llama3_style_template_with_bos_equals_transformers(tmp_path, hf_tokenizer):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3}))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    template = ChatTemplate(*load_chat_template(tok))
    for row in conversations(4):
        msgs = row["messages"]
        text, ids, mask = encode_conversation(tok, template, msgs, "assistant", "row")
        assert text == ref.apply_chat_template(msgs, tokenize=False)
        assert text.startswith("<|begin_of_text|><|start_header_id|>")
        assert ids.tolist() == list(ref.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        # trained: each assistant content and its <|eot_id|>, nothing of the headers
        eot = tok.encode("<|eot_id|>")[0]
        assert int(mask[ids == eot].sum()) == sum(m["role"] == "assistant" for m in msgs)
        assert not mask[ids == tok.encode("<|start_header_id|>")[0]].any()


def test_template_missing_is_one_line(tmp_path, hf_tokenizer):
    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="has no chat template"):
        load_chat_template(load_tokenizer(str(tmp_path)))


def test_byte_mask_is_exactly_the_assistant_turns():
    tok = load_tokenizer("byte")
    template = ChatTemplate(BYTE_CHAT_TEMPLATE, {})
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q é"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "ü2"}]
    text, ids, mask = encode_conversation(tok, template, msgs, "assistant", "row")
    parts = [("<|system|>\ns\n", 0), ("<|user|>\nq é\n", 0), ("<|assistant|>\n", 0), ("a1<|end|>\n", 1),
             ("<|user|>\nq2\n", 0), ("<|assistant|>\n", 0), ("ü2<|end|>\n", 1)]
    assert text == "".join(p for p, _ in parts)
    want = [m for p, m in parts for _ in p.encode("utf-8")]
    assert ids.tolist() == list(text.encode("utf-8"))
    assert mask.tolist() == want
    assert encode_conversation(tok, template, msgs, "all", "row")[2].all()


@pytest.fixture
def chat_prep(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(24))
    src = SourceConfig(kind="chat", path=str(path), val_fraction=0.01)
    prep = prepare_source(src, load_tokenizer("byte"), str(tmp_path / "prep"), say=lambda m: None)
    return src, prep


def test_mask_prepared_beside_tokens_and_checked(chat_prep):
    src, prep = chat_prep
    tok = load_tokenizer("byte")
    template = ChatTemplate(BYTE_CHAT_TEMPLATE, {})
    entry = prep.manifest["shards"][0]
    assert {"mask_file", "mask_sha256", "mask_block_crc32"} <= set(entry)
    shard = prep.split_shards("train")[0]
    masks = np.fromfile(shard.mask, dtype=np.uint8)
    toks = np.fromfile(shard.tokens, dtype=prep.dtype)
    ends = np.fromfile(shard.index, dtype="<u8").astype(np.int64)
    rendered = {}
    for row in conversations(24):
        _, ids, m = encode_conversation(tok, template, row["messages"], "assistant", "row")
        rendered[tuple(ids.tolist())] = m.tolist()
    for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
        assert rendered[tuple(toks[a:b].tolist())] == masks[a:b].tolist()
    # a flipped mask byte (same size, same mtime) stops the first window that touches it
    data = bytearray(Path(shard.mask).read_bytes())
    data[3] ^= 1
    Path(shard.mask).write_bytes(bytes(data))
    stream = ChatStream(open_prepared(prep.path).split_shards("train"), prep.dtype, 128, (0,), tok.pad_id)
    with pytest.raises(ManifestError, match=r"\.mask fails its crc32 check"):
        stream.window(0)


def test_packing_counts_and_never_splits(chat_prep):
    src, prep = chat_prep
    shards = prep.split_shards("train")
    lengths = np.diff(np.fromfile(shards[0].index, dtype="<u8").astype(np.int64), prepend=0)
    T = int(np.median(lengths))
    n_long = int((lengths > T + 1).sum())
    assert 0 < n_long < len(lengths)
    trunc = ChatStream(shards, prep.dtype, T, (0,), 258, too_long="truncate")
    skip = ChatStream(shards, prep.dtype, T, (0,), 258, too_long="skip")
    assert (trunc.truncated, trunc.skipped, skip.truncated, skip.skipped) == (n_long, 0, 0, n_long)
    assert skip.documents == len(lengths) - n_long
    cut = [k for k in range(len(trunc._epoch(0)[1]) - 1)
           if trunc._epoch(0)[1][k + 1] - trunc._epoch(0)[1][k] == 1
           and trunc.doc_len[trunc._epoch(0)[0][trunc._epoch(0)[1][k]]] == T + 1]
    assert len(cut) >= n_long     # each truncated conversation fills a window alone, its first T + 1 tokens
    toks, start, _, _ = trunc.window(cut[0])
    assert start.sum() == 1 and (toks != 258).all()
    seen = []
    for k in range(len(skip._epoch(0)[1]) - 1):     # one epoch: every kept conversation once, whole
        toks, start, _, loss = skip.window(k)
        bounds = list(np.nonzero(start)[0]) + [T + 1]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if loss[a:b].any():
                seen.append(b - a)
    assert sorted(seen) == sorted(lengths[lengths <= T + 1].tolist())
    st = subprocess.run([sys.executable, "-m", "loom.trainer", "data", "stats", prep.path, "--seq-len", str(T),
                         "--png", os.devnull], capture_output=True, text=True, check=True).stdout
    assert f"chat: {n_long} conversations longer than {T + 1} tokens" in st


MIXERS = ["attn", "swa", "rat", "linear", "s2", "gdn", "mamba2", "memory", "titans_mac", "titans_mag"]


@pytest.mark.parametrize("kind", MIXERS)
def test_packed_row_equals_conversations_one_by_one(chat_prep, kind):
    src, prep = chat_prep
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=259, d_model=32, n_heads=4, layers=[kind, "attn"])).double()
    stream = ChatStream(prep.split_shards("train"), prep.dtype, 600, (1,), 258)
    toks, start, answer, loss = stream.window(0)
    bounds = list(np.nonzero(start)[0]) + [len(toks)]
    assert sum(loss[a:b].any() for a, b in zip(bounds[:-1], bounds[1:])) >= 3
    batch = collate([pack_window(toks, start, answer, loss)])
    out = model(batch["input_ids"], position_ids=batch["position_ids"], seq_ids=batch["seq_ids"])
    packed = model.loss(out.hidden, batch["labels"], reduction="sum")
    grads = torch.autograd.grad(packed, list(model.parameters()), allow_unused=True)
    single, g1 = 0.0, None
    for a, b in zip(bounds[:-1], bounds[1:]):
        if not loss[a:b].any():
            continue
        ids = torch.from_numpy(toks[a:b]).long()[None]
        lab = ids[:, 1:].clone()
        lab[0, ~torch.from_numpy(loss[a + 1:b])] = -100
        o = model(ids[:, :-1], position_ids=torch.arange(b - a - 1)[None])
        part = model.loss(o.hidden, lab, reduction="sum")
        g = torch.autograd.grad(part, list(model.parameters()), allow_unused=True)
        single = single + part
        g1 = g if g1 is None else [x if y is None else (y if x is None else x + y) for x, y in zip(g1, g)]
    torch.testing.assert_close(packed, single, rtol=1e-10, atol=1e-10)
    for (name, _), x, y in zip(model.named_parameters(), grads, g1):
        if x is None or y is None:
            assert (x is None or not x.any()) and (y is None or not y.any()), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10, msg=name)


def test_masked_tokens_get_zero_gradient_in_fused_loss():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    y[::3] = -100
    for impl in ("fused", "reference"):
        loss = linear_cross_entropy(h, w, y, reduction="sum", chunk=8, impl=impl)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert (gh[::3] == 0).all() and gh[1::3].abs().sum() > 0
        if impl == "fused":
            fused = (loss, gh, gw)
    torch.testing.assert_close(fused[0], loss)
    torch.testing.assert_close(fused[1], gh)
    torch.testing.assert_close(fused[2], gw)


# ------------------------------------------------------------------ through the trainer

@pytest.fixture
def sft_recipe(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(40, seed=1))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""
model: {{d_model: 32, n_heads: 2, layers: [attn, x2]}}
data:
  seq_len: 128
  cache_dir: {tmp_path / 'cache'}
  sources: [{{kind: chat, path: {path}}}]
  val_sources: [{{kind: chat, path: {path}}}]
  val_windows: 2
optim: {{lr: 3.0e-3, warmup_steps: 1}}
train: {{steps: 4, batch_size: 2, log_every: 1, eval_every: 4, save_every: 2, keep_last: 4}}
eval: {{passkey_n: 1, passkey_depths: [0.5]}}
""")
    return recipe


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))


def _torchrun(recipe: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(_port()), "-m", "loom.trainer", "train", str(recipe), *args],
                   env=env, check=True, capture_output=True, timeout=600)


def test_grad_accum_dp_and_cp_equal_one_batch(sft_recipe, tmp_path):
    one, acc, dp, cp = tmp_path / "one", tmp_path / "acc", tmp_path / "dp", tmp_path / "cp"
    assert main(["train", str(sft_recipe), f"output_dir={one}"]) == 0
    assert main(["train", str(sft_recipe), f"output_dir={acc}", "train.batch_size=1", "train.grad_accum=2"]) == 0
    _torchrun(sft_recipe, f"output_dir={dp}", "train.batch_size=1", "parallel.engine=ddp")
    _torchrun(sft_recipe, f"output_dir={cp}", "parallel.engine=ddp", "parallel.cp=2")
    lines = {r: [m for m in read_metrics(r) if "split" not in m and "loss" in m] for r in (one, acc, dp, cp)}
    base = train_losses(one)
    for run in (acc, dp, cp):
        got = train_losses(run)
        assert sorted(got) == [1, 2, 3, 4]
        for s in got:
            assert abs(got[s] - base[s]) <= 1e-5, (run.name, s, got[s], base[s])
        assert [m["loss_tokens"] for m in lines[run]] == [m["loss_tokens"] for m in lines[one]]
        w0, w1 = _weights(one), _weights(run)
        for k in w0:
            torch.testing.assert_close(w1[k], w0[k], atol=1e-5, rtol=0, msg=k)
    counts = [m["loss_tokens"] for m in lines[one]]
    assert counts == sorted(counts) and counts[0] > 0 and counts[-1] < 4 * 2 * 128


def test_resume_with_masks_is_exact(sft_recipe, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(sft_recipe), f"output_dir={a}"]) == 0
    assert main(["train", str(sft_recipe), f"output_dir={b}", "train.stop_after_steps=2"]) == 0
    assert main(["train", str(sft_recipe), f"output_dir={b}"]) == 0
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    assert all(abs(la[s] - lb[s]) <= 1e-6 for s in la)
    ta = [m["loss_tokens"] for m in read_metrics(a) if "loss_tokens" in m]
    tb = [m["loss_tokens"] for m in read_metrics(b) if "loss_tokens" in m]
    assert ta == tb


@pytest.mark.parametrize("row, what", [
    ({"text": "hi"}, "no field 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "content is list, not text"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
])
def test_bad_rows_are_one_line(tmp_path, capsys, row, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [conversations(1)[0], row])
    code = main(["data", "prepare", "--source", f"{{kind: chat, path: {path}}}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert f"{path} line 2" in err and what in err, err
