"""Context parallelism of the swa, linear, gdn, rat, s2 and mamba2 mixers against the single process.

Multi-process (gloo, CPU, fp64), cp = 2 and cp = 4, zigzag layout (what the
trainer uses; a few cases also contiguous): for each case, a mixer built identically on every
rank runs on the full sequence and on this rank's shard (x, position_ids,
seq_ids sharded; ctx.cp set). Checked per rank: the output shard, the gradient of
the input shard, and the parameter gradients summed over ranks (what the
data-parallel reduction of a cp group sums) against the single-process ones, with
a fixed random upstream gradient. The attention family's short conv (conv_size) runs in an attn, a swa and an s2 case. Rows pack documents that cross every piece
boundary at cp = 2 and 4, one-token and shorter-than-a-chunk documents, and a
row that starts mid-document (position 7). One case is a whole HybridLM stacking
rat, swa, linear and s2 (cp_impl=ulysses). RAT also runs with pieces that are
not a multiple of its chunk (cp = 4: pieces of 6, chunk 4). Also: the bytes the
linear and rat ops send equal rat_comm_bytes / the state-scan formula, and the
in-process errors. Cost on 2 shared cores: default tier one cp=2 group with every
case (~12 s) and one cp=4 group with the recurrent mixers (~10 s); `slow` adds a
cp=4 group with the other cases (~17 s).
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from loom.kernels.context_parallel import CPContext, shard_sequence
from loom.kernels.rat.cp import rat_comm_bytes
from loom.kernels.s2.cp import rank_head_offsets
from loom.models import HybridLM, ModelConfig
from loom.models.mixers import MIXERS, MixerDims, SeqContext
from loom.models.rope import RopeConfig

import loomtest

B, T, D, VOCAB = 2, 48, 16, 50
# Row 0: documents crossing boundaries (pieces of 12 at cp=2, 6 at cp=4), a one-token one.
# Row 1: starts in the middle of a document (position 7), then a document at 30.
DOC_LENS = ([5, 17, 1, 3, 22], [30, 18])
FIRST_POS = (0, 7)

# name -> (kind, mixer options, n_heads, n_kv_heads, head_dim, cp_impl, docs)
CASES = {
    "swa_w5_ring": ("swa", dict(window=5), 4, 2, 8, "ring", True),
    "swa_w13_ulysses": ("swa", dict(window=13, gate="headwise"), 4, 2, 8, "ulysses", True),
    "attn_conv3_ring": ("attn", dict(conv_size=3), 4, 2, 8, "ring", True),
    "swa_w5_conv3_ring": ("swa", dict(window=5, conv_size=3), 4, 2, 8, "ring", True),
    "linear_docs": ("linear", dict(block=4), 4, 4, 8, "ring", True),
    "linear_one_doc": ("linear", dict(block=5, output_gate="full"), 4, 4, 8, "ulysses", False),
    "gdn_docs": ("gdn", dict(chunk=5, n_k_heads=2, conv_size=4), 4, 4, 8, "ring", True),
    "rat_L4_docs": ("rat", dict(chunk=4, groups=2), 4, 4, 8, "ring", True),
    "rat_L3_docs_norope": ("rat", dict(chunk=3, groups=1, rope=False), 4, 4, 8, "ring", True),
    "rat_L2_one_doc": ("rat", dict(chunk=2, groups=2, gate="elementwise"), 4, 4, 8, "ulysses", False),
    "s2_kv4_docs": ("s2", dict(block=2, local_blocks=2, vert_stride=4), 4, 4, 8, "ulysses", True),
    "s2_gqa_docs": ("s2", dict(block=3, local_blocks=2, vert_stride=4, head_shift=1), 4, 2, 8, "ulysses", True),
    "s2_one_doc": ("s2", dict(block=2, local_blocks=3, vert_stride=2), 4, 2, 8, "ulysses", False),
    "mamba2_docs": ("mamba2", dict(chunk=4, d_state=4, head_dim=4, n_groups=2, d_conv=4), 4, 4, 8, "ring", True),
    "mamba2_one_doc": ("mamba2", dict(chunk=5, d_state=3, head_dim=8, n_groups=1, expand=1), 4, 4, 8, "ulysses",
                       False),
    "s2_conv4_docs": ("s2", dict(block=2, local_blocks=2, vert_stride=4, conv_size=4), 4, 4, 8, "ulysses", True),
    # the contiguous layout (rank r holds one piece of T / cp)
    "linear_docs_contiguous": ("linear", dict(block=4), 4, 4, 8, "ring", True),
    "gdn_docs_contiguous": ("gdn", dict(chunk=5, n_k_heads=2, beta="sigmoid2"), 4, 4, 8, "ulysses", True),
    "rat_L4_docs_contiguous": ("rat", dict(chunk=4, groups=2), 4, 4, 8, "ring", True),
    "mamba2_docs_contiguous": ("mamba2", dict(chunk=4, d_state=4, head_dim=4, n_groups=2, d_conv=4), 4, 4, 8, "ring",
                               True),
    "s2_gqa_docs_contiguous": ("s2", dict(block=3, local_blocks=2, vert_stride=4), 4, 2, 8, "ulysses", True),
    # a whole HybridLM (embedding, blocks with MLPs, final norm) stacking the four kinds
    "hybrid_lm_docs": ("model", dict(rat={"chunk": 3}, swa={"window": 7}, linear={"block": 4},
                                     s2={"block": 2, "local_blocks": 2, "vert_stride": 4}), 4, 2, 8, "ulysses", True),
    # the imported families' attention options: q/k norms (per head, full width), logit scale,
    # partial rotary, a per-kind RoPE, gates packed in q_proj, window 0
    "attn_gemma_opts_ring": ("attn", dict(qk_norm=True, scale=0.3, rope_fraction=0.5,
                                          rope_config=RopeConfig(base=100.0, scaling="linear", factor=2.0),
                                          qkv_bias=True, out_bias=True), 4, 2, 8, "ring", True),
    "swa_olmo_opts_ulysses": ("swa", dict(window=6, qk_norm=True, qk_norm_width="full", gate="elementwise",
                                          gate_packing="group"), 4, 2, 8, "ulysses", True),
    "swa_w0_gate_head_ring": ("swa", dict(window=0, gate="headwise", gate_packing="head", rope_fraction=0.25),
                              4, 2, 8, "ring", True),
    # whole models with the families' block layouts (sandwich / post norms, GeGLU / squared ReLU,
    # MLP-only and mixer-only blocks, embedding scale), every norm weight perturbed
    "gemma_lm_docs": ("lm", dict(layers=["swa", "swa", "attn"], norm_placement="sandwich", norm_zero_centred=True,
                                 mlp_kind="geglu", embed_scale=4.0, head_dim=12,
                                 mixers={"swa": {"window": 5, "qk_norm": True, "scale": 0.25,
                                                 "rope_config": {"base": 100.0}},
                                         "attn": {"qk_norm": True, "scale": 0.25}}), 4, 2, 8, "ring", True),
    "olmo_nemotron_lm_docs": ("lm", dict(layers=["swa", "mlp", "attn", "mlp"], norm_placement="post",
                                         norm_weight_fp32=True, block_mlp=False, mlp_kind="relu2",
                                         mixers={"swa": {"window": 9, "qk_norm": True, "qk_norm_width": "full"}}),
                              4, 2, 8, "ulysses", True),
}
COMM_CASES = ("linear_docs", "rat_L4_docs")
TOL = dict(atol=1e-11, rtol=1e-9)
COUNTED = ("all_gather", "reduce_scatter_single")  # the torch.distributed calls the ops send states with


def _rows(docs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) document-relative positions and global document ids (None: one document per row)."""
    if not docs:
        return torch.arange(T).expand(B, T).clone(), None
    pos, ids = [], []
    for lens, first in zip(DOC_LENS, FIRST_POS):
        pos.append(torch.cat([torch.arange(n) + (first if i == 0 else 0) for i, n in enumerate(lens)]))
        ids.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    return torch.stack(pos), torch.stack(ids)


def _build(kind, opts, H, G, K):
    torch.manual_seed(0)  # identical weights on every rank
    if kind == "model":
        cfg = ModelConfig(vocab_size=VOCAB, d_model=H * K, n_heads=H, n_kv_heads=G,
                          layers=["rat", "swa", "linear", "s2"], mixers=opts)
        return HybridLM(cfg).double()
    if kind == "lm":  # opts: ModelConfig fields
        model = HybridLM(ModelConfig(vocab_size=VOCAB, d_model=H * K, n_heads=H, n_kv_heads=G, **opts)).double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
        return model
    dims = MixerDims(D, H, G, K, layer_idx=1, n_layers=3, rope=RopeConfig())
    cls = MIXERS[kind]
    mixer = cls(dims, cls.Config(**opts))
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
    mixer.reset_parameters()
    if getattr(mixer, "conv", None) is not None:  # the attention conv starts as the identity: make it mix
        with torch.no_grad():
            mixer.conv.weight.normal_(0, 0.5)
    return mixer.double()


def _run_case(name: str, world: int) -> dict:
    kind, opts, H, G, K, impl, docs = CASES[name]
    cp = CPContext.from_group(None, impl=impl, layout="contiguous" if name.endswith("_contiguous") else "zigzag")
    mixer = _build(kind, opts, H, G, K)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    dy = torch.randn(B, T, H * K if kind in ("model", "lm") else D, generator=g, dtype=torch.float64)
    pos, ids = _rows(docs)
    if kind in ("model", "lm"):  # token ids instead of hidden states; no input gradient
        x = torch.randint(0, VOCAB, (B, T), generator=g)

    def run(inp, pos, ids, cp=None):
        if kind in ("model", "lm"):
            return mixer(inp, position_ids=pos, seq_ids=ids, cp=cp).hidden
        return mixer(inp, SeqContext(position_ids=pos, seq_ids=ids, cp=cp))[0]

    x_ref = x.clone().requires_grad_(x.is_floating_point())
    y_ref = run(x_ref, pos, ids)
    y_ref.backward(dy)
    ref_grads = {n: None if p.grad is None else p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad(set_to_none=True)

    x_loc = shard_sequence(x, cp).clone().requires_grad_(x.is_floating_point())
    with loomtest.ByteCounter(world, COUNTED) as fwd:
        y = run(x_loc, shard_sequence(pos, cp), None if ids is None else shard_sequence(ids, cp), cp)
    with loomtest.ByteCounter(world, COUNTED) as bwd:
        y.backward(shard_sequence(dy, cp))

    torch.testing.assert_close(y, shard_sequence(y_ref, cp).detach(), **TOL, msg=lambda m: f"output: {m}")
    if x.is_floating_point():
        assert not torch.isnan(x_loc.grad).any(), "NaN in dx"
        torch.testing.assert_close(x_loc.grad, shard_sequence(x_ref.grad, cp), **TOL, msg=lambda m: f"dx: {m}")
    for n, p in mixer.named_parameters():
        if ref_grads[n] is None:  # not used by the output (e.g. an untied LM head)
            assert p.grad is None, f"d{n} should be None"
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_grads[n], **TOL, msg=lambda m: f"d{n}: {m}")
    return {"bytes": [fwd.n, bwd.n]}


# Process groups: name -> (world size, cases, marks). cp = 4 in the default tier runs the
# recurrent mixers only (at cp = 2 no piece's state reaches past a non-adjacent piece of
# the same zigzag shard; at cp = 4 it does); the rest of cp = 4 is slow.
CP4_FAST = ["linear_docs", "rat_L4_docs", "rat_L3_docs_norope", "mamba2_docs"]
GROUPS = {"cp2": (2, list(CASES), ()),
          "cp4": (4, CP4_FAST, ()),
          "cp4-rest": (4, [c for c in CASES if c not in CP4_FAST], (pytest.mark.slow,))}


def _results(group: str, tmp_path_factory) -> dict:
    """Runs one gloo group (GROUPS[group]); returns {case: [result of each rank]}."""
    world, names, _ = GROUPS[group]
    return loomtest.launch(__file__, world, names, tmp_path_factory.mktemp(group), timeout_s=300.0)


# One module-scoped fixture per group, so each group is launched once whatever the test order.
@pytest.fixture(scope="module")
def group_cp2(tmp_path_factory):
    return _results("cp2", tmp_path_factory)


@pytest.fixture(scope="module")
def group_cp4(tmp_path_factory):
    return _results("cp4", tmp_path_factory)


@pytest.fixture(scope="module")
def group_cp4_rest(tmp_path_factory):
    return _results("cp4-rest", tmp_path_factory)


def _params(cases) -> list:
    return [pytest.param(group, case, id=f"{case}-{group}", marks=marks)
            for group, (_, names, marks) in GROUPS.items() for case in names if case in cases]


@pytest.fixture
def cp_results(request, group: str) -> dict:
    return request.getfixturevalue("group_" + group.replace("-", "_"))


@pytest.mark.distributed
@pytest.mark.parametrize(("group", "case"), _params(CASES))
def test_mixer_parity_with_single_process(cp_results, case):
    loomtest.assert_no_errors(cp_results[case])


@pytest.mark.distributed
@pytest.mark.parametrize(("group", "case"), _params(COMM_CASES))
def test_state_bytes_match_formulas(cp_results, case):
    world = cp_results["world"]
    kind, opts, H, G, K, impl, docs = CASES[case]
    measured = loomtest.busiest_bytes(cp_results[case])
    if kind == "rat":
        expected = rat_comm_bytes(batch=B, seq_len=T, n_heads=H, head_dim=K, chunk=opts["chunk"], cp=world,
                                  state_bytes=8)
    else:  # linear/cp.py: (local, carry) of 2 pieces, (H K K + H) fp64 numbers per row
        n = (world - 1) * 2 * B * (H * K * K + H) * 8
        expected = (n, n)
    assert tuple(measured) == tuple(expected)


# ---- in-process --------------------------------------------------------------------------------

def test_declared_cp_impls():
    own = {kind: tuple(vars(MIXERS[kind]).get("cp_impls", ())) for kind in ("swa", "linear", "rat", "s2", "mamba2")}
    assert own == {"swa": ("ring", "ulysses"), "linear": ("ring", "ulysses"), "rat": ("ring", "ulysses"),
                   "s2": ("ulysses",), "mamba2": ("ring", "ulysses")}
    assert _build("rat", dict(chunk=8), 4, 4, 8).cp_chunk_tokens() == 8


def test_rat_pieces_shorter_than_chunk_raise():
    from loom.kernels.rat.cp import cp_rat

    cp = CPContext(None, 0, 2, "ring", "zigzag")
    q = torch.zeros(1, 6, 2, 4)  # T = 12: pieces of 3 < chunk 4
    with pytest.raises(ValueError, match=r"pieces of .* = 3 tokens .* L = 4"):
        cp_rat(q, q, q, q, torch.zeros(1, 6, dtype=torch.long), cp, chunk=4)


def test_s2_rank_head_offsets_follow_global_heads():
    offs = torch.tensor([0, 1])  # per KV head, H = 4, G = 2: heads 0, 1 -> 0; heads 2, 3 -> 1
    assert rank_head_offsets(offs, 4, CPContext(None, 0, 2)).tolist() == [0, 0]
    assert rank_head_offsets(offs, 4, CPContext(None, 1, 2)).tolist() == [1, 1]
    assert rank_head_offsets(torch.tensor([0, 1, 2, 3]), 4, CPContext(None, 3, 4)).tolist() == [3]


if __name__ == "__main__":  # a worker process started by loomtest.launch
    loomtest.worker_main(_run_case)
