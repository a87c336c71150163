"""trainer/hf/families/transforms.py: each exact rewrite keeps HybridLM's function.

For a source model and a `want` model differing in one rewritable field (both directions of
zero-centring, norm_weight_fp32, untying, the block norms' eps with a tied head, the q/k
norms' eps with per-head and full-width norms, gate packing separate <-> head <-> group
with headwise / elementwise gates and biases, NoPE heads widened for a rotary fraction of
1/2 and 1/4), class_form moves exactly that field and class_state's tensors give the same
fp64 logits (1e-9) and fp32 logits (1e-5, or twice the models' own fp32 errors) at 45
tokens; a field no rewrite reaches is left as it is.
Cost: ~2 s on one core.
"""
import dataclasses

import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.models.model import mixer_options
from loom.trainer.hf.families.transforms import class_form, class_state

BASE = dict(vocab_size=96, d_model=48, n_heads=4, n_kv_heads=2, layers=["gdn", "attn", "mamba2", "mlp"],
            block_mlp=True, mixers={"attn": {"gate": "elementwise", "qk_norm": True},
                                    "gdn": {"head_k_dim": 8, "head_v_dim": 8},
                                    "mamba2": {"d_state": 8, "head_dim": 16, "chunk": 16}})
NOPE = dict(vocab_size=96, d_model=48, n_heads=4, n_kv_heads=2, head_dim=12, layers=["mamba2", "attn"],
            mixers={"attn": {"rope": False, "qkv_bias": True, "out_bias": True},
                    "mamba2": {"d_state": 8, "head_dim": 16, "chunk": 16}})


def attn(**kw):
    return {"mixers": {**BASE["mixers"], "attn": {**BASE["mixers"]["attn"], **kw}}}


CASES = {  # name -> (source overrides, want overrides, the field that moves); base BASE unless NOPE
    "zero-centre": ({}, {"norm_zero_centred": True}, "norm_zero_centred"),
    "un-zero-centre": ({"norm_zero_centred": True}, {"norm_zero_centred": False}, "norm_zero_centred"),
    "weight-fp32": ({}, {"norm_weight_fp32": True}, "norm_weight_fp32"),
    "untie": ({}, {"tie_embeddings": False}, "tie_embeddings"),
    "block-eps-tied": ({"norm_eps": 1e-5}, {"norm_eps": 1e-3}, "norm_eps"),
    "qk-eps-head": (attn(qk_norm_eps=1e-6), attn(qk_norm_eps=1e-2), "attn.qk_norm_eps"),
    "qk-eps-full": (attn(qk_norm_width="full", qk_norm_eps=1e-2), attn(qk_norm_width="full", qk_norm_eps=1e-6),
                    "attn.qk_norm_eps"),
    "pack-head": ({}, attn(gate_packing="head"), "attn.gate_packing"),
    "pack-group-headwise-bias": (attn(gate="headwise", qkv_bias=True), attn(gate="headwise", qkv_bias=True,
                                                                             gate_packing="group"),
                                 "attn.gate_packing"),
    "unpack-head-to-group": (attn(gate_packing="head"), attn(gate_packing="group"), "attn.gate_packing"),
    "nope-half": ({}, {"mixers": {**NOPE["mixers"], "attn": {"rope_fraction": 0.5, "qkv_bias": True,
                                                             "out_bias": True}}}, "attn.rope"),
    "nope-quarter-scaled": ({"mixers": {**NOPE["mixers"], "attn": {**NOPE["mixers"]["attn"], "scale": 0.2}}},
                            {"mixers": {**NOPE["mixers"], "attn": {"rope_fraction": 0.25, "qkv_bias": True,
                                                                   "out_bias": True}}}, "attn.rope"),
}


def perturbed(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and not cfg.norm_zero_centred else 0.0
            p.copy_(base + torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return model.eval()


def field(cfg: ModelConfig, name: str):
    if "." in name:
        kind, key = name.split(".")
        return getattr(mixer_options(cfg)[kind], key)
    return getattr(cfg, name)


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_keeps_the_function(case):
    source, want, moved = CASES[case]
    base = NOPE if case.startswith("nope") else BASE
    cfg = ModelConfig(**{**base, **source}).resolved()
    target = ModelConfig(**{**base, **source, **want}).resolved()
    form = class_form(cfg, target)
    assert field(form, moved) == field(target, moved) != field(cfg, moved)
    ids = torch.randint(0, 96, (2, 45), generator=torch.Generator().manual_seed(3))
    logits = {}
    for dtype in (torch.float64, torch.float32):
        net = perturbed(cfg).to(dtype)
        out = HybridLM(form).to(dtype).eval()
        out.load_state_dict(class_state(cfg, form, net.state_dict()))
        with torch.no_grad():
            logits[dtype] = net.logits(net(ids).hidden), out.logits(out(ids).hidden)
    ref64, got64 = logits[torch.float64]
    torch.testing.assert_close(got64, ref64, rtol=0, atol=1e-9)  # exact but for fp64 rounding
    ref, got = logits[torch.float32]
    # fp32: 1e-5, or twice the two models' own fp32 errors where larger (STYLE 6)
    own = (ref.double() - ref64).abs().max().item() + (got.double() - got64).abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=max(1e-5, 2 * own))
    assert ref.abs().max() > 1e-2


def test_fields_no_rewrite_reaches_stay():
    cfg = ModelConfig(**BASE).resolved()
    want = dataclasses.replace(cfg, mlp_kind="relu2", mixers={**BASE["mixers"], "gdn": {**BASE["mixers"]["gdn"],
                                                                                          "norm_eps": 1e-3}}).resolved()
    form = class_form(cfg, want)
    assert form.mlp_kind == "swiglu" and mixer_options(form)["gdn"].norm_eps == mixer_options(cfg)["gdn"].norm_eps
    tied_want = dataclasses.replace(cfg, tie_embeddings=False, norm_placement="post", norm_eps=1e-3).resolved()
    post = dataclasses.replace(cfg, norm_placement="post").resolved()
    assert class_form(post, tied_want).norm_eps == post.norm_eps  # no rescaling without pre-norm blocks
