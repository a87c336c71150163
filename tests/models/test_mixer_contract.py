"""Contract every registered mixer must meet, checked inside a tiny HybridLM
(float64): causality, packed documents equal separate runs, a sequence fed in
two pieces with the state carried equals the whole, and token-by-token
decoding equals the full forward. Cost: a few seconds per mixer kind."""
import pytest
import torch

from loom.models import HybridLM, ModelConfig
from loom.models.mixers import MIXERS

# Options that make each mixer's structure (chunks, windows, blocks) smaller
# than the test sequences, so boundaries are crossed.
SMALL = {
    "swa": {"window": 7},
    "rat": {"chunk": 4},
    "s2": {"block": 4, "local_blocks": 2, "vert_stride": 3},
    "linear": {"block": 8},
    "gdn": {"chunk": 8, "n_k_heads": 2},
    "mamba2": {"chunk": 4, "d_state": 8, "head_dim": 16, "n_groups": 2, "d_conv": 3},
    "memory": {"chunk_size": 4},
    "titans_mag": {"chunk_size": 4, "window": 7},
    "titans_mac": {"chunk_size": 4, "segment": 8},
}
KINDS = sorted(MIXERS)
# Attention options of the imported families, as "kind+name" -> mixer options.
OPTION_VARIANTS = {
    "attn+conv": {"conv_size": 3},
    "swa+conv": {"conv_size": 3},
    "s2+conv": {"conv_size": 3},
    "attn+qwen3": {"qk_norm": True, "qkv_bias": True, "out_bias": True},  # per-head q/k norm, biases
    "attn+olmo": {"qk_norm": True, "qk_norm_width": "full", "qk_norm_eps": 1e-5},  # q/k norm over H*K, G*K
    "attn+gemma": {"qk_norm": True, "scale": 0.37, "rope_config": {"base": 500.0, "scaling": "linear",
                                                                   "factor": 2.0}},
    "swa+partial": {"rope_fraction": 0.5, "gate": "elementwise", "gate_packing": "head"},
    "swa+w0": {"window": 0},
    "attn+gate_group": {"gate": "headwise", "gate_packing": "group", "rope_fraction": 0.25},
    "s2+gate_head": {"gate": "elementwise", "gate_packing": "head", "scale": 0.2},
}
# Whole-model layouts of the families: name -> (layers, model options); every norm weight perturbed.
MODEL_VARIANTS = {
    "gemma_lm": (["swa", "swa", "attn"], dict(norm_placement="sandwich", norm_zero_centred=True,
                                              mlp_kind="geglu", embed_scale=8.0, head_dim=24)),
    "olmo_lm": (["swa", "attn"], dict(norm_placement="post", norm_weight_fp32=True)),
    "nemotron_lm": (["attn", "mlp", "swa", "mlp"], dict(block_mlp=False, mlp_kind="relu2", mlp_bias=True)),
}
VARIANTS = KINDS + list(OPTION_VARIANTS) + list(MODEL_VARIANTS)


def tiny(kind: str, **opts) -> HybridLM:
    layers, model_opts = [kind, "x2"], {}
    if kind in MODEL_VARIANTS:
        layers, model_opts = MODEL_VARIANTS[kind]
    elif kind in OPTION_VARIANTS:
        opts = {**OPTION_VARIANTS[kind], **opts}
        kind = kind.partition("+")[0]
        layers = [kind, "x2"]
    mixers = {k: {o: v for o, v in {**SMALL.get(k, {}), **opts}.items() if o in MIXERS[k].Config.__dataclass_fields__}
              for k in set(layers) - {"x2", "mlp"}}
    cfg = ModelConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, layers=layers, mixers=mixers,
                      **model_opts)
    torch.manual_seed(0)
    model = HybridLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):  # the conv starts as the identity; make it mix neighbours
                p.normal_(0.0, 0.5)
            elif "norm" in name or name.endswith("bias"):  # away from 1 (or 0): a misplaced norm shows
                p.add_(torch.randn_like(p) * 0.3)
    return model


def hidden(model, ids, **kw):
    return model(ids, **kw).hidden


@pytest.mark.parametrize("kind", VARIANTS)
def test_causal(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 37))
    base = hidden(model, ids)
    for t in (0, 5, 18, 36):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 64
        out = hidden(model, ids2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-10)
        assert not torch.allclose(out[:, t:], base[:, t:]), "the perturbed token changed nothing"


@pytest.mark.parametrize("kind", VARIANTS)
def test_packed_documents_equal_separate(kind):
    model = tiny(kind)
    lens = [13, 22, 6]
    docs = [torch.randint(0, 64, (1, n)) for n in lens]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    packed = hidden(model, ids, position_ids=pos, seq_ids=seq)
    start = 0
    for doc, n in zip(docs, lens):
        alone = hidden(model, doc)
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-9, atol=1e-9)
        start += n


@pytest.mark.parametrize("kind", VARIANTS)
def test_state_carry_equals_whole(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 40))
    whole = hidden(model, ids)
    first = model(ids[:, :16], want_state=True)
    second = model(ids[:, 16:], state=first.state, want_state=True)
    torch.testing.assert_close(torch.cat([first.hidden, second.hidden], 1), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", VARIANTS)
def test_decode_equals_forward(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (2, 21))
    whole = hidden(model, ids)
    out = model(ids[:, :5], want_state=True)
    steps = [out.hidden]
    state = out.state
    for t in range(5, 21):
        out = model(ids[:, t:t + 1], state=state, want_state=True)
        state = out.state
        steps.append(out.hidden)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", VARIANTS)
def test_backward_reaches_every_parameter(kind):
    model = tiny(kind).train()
    ids = torch.randint(0, 64, (2, 24))
    out = model(ids)
    (model.loss(out.hidden, ids) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("kind", VARIANTS)
def test_continuation_that_starts_a_new_document_sees_nothing_cached(kind):
    """A row continued with the state, whose new tokens start a new document
    (position 0), must equal that document run alone."""
    model = tiny(kind)
    first, second = torch.randint(0, 64, (1, 19)), torch.randint(0, 64, (1, 11))
    state = model(first, want_state=True).state
    cont = model(second, position_ids=torch.arange(11)[None], state=state).hidden
    torch.testing.assert_close(cont, hidden(model, second), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["attn", "swa", "s2"])
def test_attention_conv_starts_as_the_identity(kind):
    """conv_size adds a short conv on q, k, v that starts as the identity: a freshly
    initialised layer with it computes what the layer without it computes."""
    plain = tiny(kind)
    conv = ModelConfig(**{**plain.cfg.__dict__, "mixers": {kind: {**SMALL.get(kind, {}), "conv_size": 4}}})
    torch.manual_seed(0)
    with_conv = HybridLM(conv).double().eval()
    missing, unexpected = with_conv.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(n.endswith("conv.weight") for n in missing)
    with torch.no_grad():  # load_state_dict left the convs as built: reset them
        for block in with_conv.blocks:
            block.mixer.reset_parameters()
    ids = torch.randint(0, 64, (2, 19))
    torch.testing.assert_close(hidden(with_conv, ids), hidden(plain, ids), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        with_conv.blocks[0].mixer.conv.weight[:, 1] = 0.5
    assert not torch.allclose(hidden(with_conv, ids), hidden(plain, ids)), "the conv changed nothing"
