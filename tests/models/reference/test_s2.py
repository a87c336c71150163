"""`s2` (S2-Attention, Lin et al.) against per-token softmax attention under its pattern, written
from the paper: blocks of b tokens on document positions, query block m, key block n; pattern
head with offset o sees key j (causal, same document) when m - n < L (local window, own block
included) or (n + o) % V == 0 (vertical stride). Offsets o_p = (p max(1, V // P) + shift) % V over
P = G pattern heads when G >= V (query heads of a KV group share it), else P = H."""
import pytest
import torch
from _refs import G, H, LAYOUTS, ROPE_TOL, build, inputs, run
from test_attn import attn_reference

from loom.models.rope import RopeConfig

ROPE = RopeConfig(base=100.0)


def s2_visible(block, local_blocks, vert_stride, shift=0, n_heads=H, n_kv_heads=G):
    P = n_kv_heads if n_kv_heads >= vert_stride else n_heads
    offsets = [(p * max(1, vert_stride // P) + shift) % vert_stride for p in range(P)]

    def visible(h, p_query, p_key):
        o = offsets[h // (n_heads // n_kv_heads)] if P == n_kv_heads else offsets[h]
        m, n = p_query // block, p_key // block
        return m - n < local_blocks or (n + o) % vert_stride == 0
    return visible


CASES = {
    "b3_L2_V4": {"block": 3, "local_blocks": 2, "vert_stride": 4},
    "b2_L1_V2_kvpattern": {"block": 2, "local_blocks": 1, "vert_stride": 2},
    "b4_L2_V3_shift": {"block": 4, "local_blocks": 2, "vert_stride": 3, "head_shift": 1},
}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_s2_matches_reference(case, T):
    opts = CASES[case]
    m = build("s2", model_rope=ROPE, **opts)
    x, pos, seq = inputs(T)
    vis = s2_visible(opts["block"], opts["local_blocks"], opts["vert_stride"], opts.get("head_shift", 0))
    want, _ = attn_reference(m, x, pos, rope=ROPE, visible=vis)
    torch.testing.assert_close(run(m, x, pos, seq), want, **ROPE_TOL)


def test_s2_gate_and_conv():
    opts = {"block": 3, "local_blocks": 1, "vert_stride": 2, "gate": "elementwise", "gate_packing": "head",
            "conv_size": 3}
    m = build("s2", model_rope=ROPE, **opts)
    x, pos, seq = inputs(37)
    want, _ = attn_reference(m, x, pos, rope=ROPE, gate="elementwise", packing="head", conv=3,
                             visible=s2_visible(3, 1, 2))
    torch.testing.assert_close(run(m, x, pos, seq), want, **ROPE_TOL)


def test_pattern_is_sparse():
    """At T = 37 the pattern hides keys (the test would not tell s2 from attn otherwise)."""
    vis = s2_visible(3, 2, 4)
    assert not all(vis(h, 36, j) for h in range(H) for j in range(37))
