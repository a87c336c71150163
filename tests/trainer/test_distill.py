"""Distillation into hybrid layers (loom.trainer.distill): the student's start from the
teacher, the chunked KL against the dense formula, the align and kl stages, exact resume
across a stage change, one-line errors.

The teacher is a 4-layer GQA attention run folder trained 40 steps here (module fixture)
or a random Llama converted by `loom convert hf`; the student replaces two of its
layers: [attn, swa, gdn, attn].
Cost: about 40 s on one core (six short runs through the real CLI).
"""
from pathlib import Path

import pytest
import torch
import yaml

from loom.models import HybridLM
from loom.models.config import ConfigError, build
from loom.models.model import ModelConfig
from loom.trainer.checkpoint.manager import CheckpointManager
from loom.trainer.cli import main
from loom.trainer.config import load_config
from loom.trainer.distill.kl import chunked_kl, dense_kl
from loom.trainer.distill.teacher import init_student, load_teacher
from loom.trainer.distill.trainer import align_losses, capture_mixers
from loom.trainer.hf.convert import convert_hf
from loom.trainer.observe.metrics import read_metrics

TEACHER = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "layers": ["attn", "x4"]}
STUDENT_LAYERS = ["attn", "swa", "gdn", "attn"]
RECIPE = """
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, layers: [attn, swa, gdn, attn], mixers: {swa: {window: 4}}}
data:
  seq_len: 48
  sources: [{kind: stdlib, weight: 1.0, max_bytes: 200000}]
  val_windows: 2
optim: {lr: 1.0e-2, warmup_steps: 1, schedule: constant}
train: {steps: 6, batch_size: 2, log_every: 1, eval_every: 100, save_every: 2, keep_last: 5}
eval: {passkey_n: 0}
"""


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 4-layer attention model trained 40 steps on the stdlib stream (its attention has
    structure that a window or a recurrence can fit, unlike random weights)."""
    d = tmp_path_factory.mktemp("teacher")
    (d / "t.yaml").write_text(RECIPE)
    assert main(["train", str(d / "t.yaml"), f"output_dir={d / 'run'}", "model.layers=[attn, x4]",
                 "train.steps=40", "optim.lr=1e-2", "train.save_every=40"]) == 0
    return d / "run"


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "student.yaml"
    p.write_text(RECIPE)
    return p


def _stages(*spec) -> str:
    return "distill.stages=" + yaml.safe_dump(list(spec), default_flow_style=True).strip()


def _student(run: Path) -> HybridLM:
    """The student of a finished run, from its latest checkpoint."""
    cfg = load_config(run / "config.yaml")
    manager = CheckpointManager(run)
    weights, _, _ = manager.load(manager.latest_valid())
    model = HybridLM(ModelConfig(**{**cfg.model.__dict__, "vocab_size": weights["embed.weight"].shape[0]}))
    model.load_state_dict(weights)
    return model.eval()


def _fixed_batch(vocab: int, T: int = 48) -> torch.Tensor:
    """Two rows of real text (bytes of a stdlib file) the runs did not see in this order."""
    import json

    return torch.tensor(list(Path(json.__file__).read_bytes()[:2 * T])).view(2, T) % vocab


def _student_cfg(teacher: HybridLM, layers, **over) -> ModelConfig:
    return ModelConfig(**{**teacher.cfg.__dict__, "layers": layers, "mixers": {"swa": {"window": 4}}, **over})


# ------------------------------------------------------------------ the student's start


def test_converted_llama_teacher_weights_are_copied_as_logged(tmp_path):
    """A random GQA Llama (4 query heads, 2 kv heads) through `loom convert hf`: every tensor that
    matches by name and shape is the teacher's; swa takes q/k/v/o as they are; gdn's in_proj_qkv is
    [q; k; v] with each kv head repeated for the two query heads that read it; linear (all heads
    own k and v) likewise; the rest of the new mixers is listed as new."""
    import json

    from safetensors.torch import save_file

    D, H, G, K, F, V = 32, 4, 2, 8, 48, 64
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
          "num_attention_heads": H, "num_key_value_heads": G, "intermediate_size": F, "num_hidden_layers": 4,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(4):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * K, D), p + "self_attn.k_proj.weight": (G * K, D),
                   p + "self_attn.v_proj.weight": (G * K, D), p + "self_attn.o_proj.weight": (D, H * K),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)}
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf))
    save_file({n: 0.02 * torch.randn(s) for n, s in shapes.items()}, str(src / "model.safetensors"))
    out = convert_hf(src, tmp_path / "conv")
    t_cfg = build(ModelConfig, yaml.safe_load((out / "model.yaml").read_text())["model"], "model")
    s_cfg = ModelConfig(**{**t_cfg.__dict__, "layers": ["attn", "swa", "gdn", "linear"]})
    teacher, what = load_teacher(out, s_cfg)
    assert what == "converted folder"
    student = HybridLM(s_cfg)
    report = init_student(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert report.replaced == [1, 2, 3]
    for name, how in report.copied.items():
        if how == name:
            assert torch.equal(s[name], t[name]), name
    assert not any(n.startswith("blocks.0.mixer") for n in report.new)
    for part in "qkvo":
        assert torch.equal(s[f"blocks.1.mixer.{part}_proj.weight"], t[f"blocks.1.mixer.{part}_proj.weight"])

    def rep(w):  # kv head j -> query heads 2j, 2j + 1
        return w.view(G, K, D).repeat_interleave(H // G, 0).reshape(H * K, D)
    qkv = torch.cat([t["blocks.2.mixer.q_proj.weight"], rep(t["blocks.2.mixer.k_proj.weight"]),
                     rep(t["blocks.2.mixer.v_proj.weight"])])
    assert torch.equal(s["blocks.2.mixer.in_proj_qkv.weight"], qkv)
    assert torch.equal(s["blocks.2.mixer.out_proj.weight"], t["blocks.2.mixer.o_proj.weight"])
    assert torch.equal(s["blocks.3.mixer.k_proj.weight"], rep(t["blocks.3.mixer.k_proj.weight"]))
    assert torch.equal(s["blocks.3.mixer.v_proj.weight"], rep(t["blocks.3.mixer.v_proj.weight"]))
    assert "blocks.2.mixer.in_proj_z.weight" in report.new and "blocks.2.mixer.A_log" in report.new
    assert "blocks.3.mixer.gate.0.weight" in report.new
    assert set(report.copied) | set(report.new) == set(s)
    text = "\n".join(report.lines([]))
    assert "blocks.2.mixer.in_proj_qkv.weight <- blocks.2.mixer.q_proj.weight + blocks.2.mixer.k_proj.weight" in text
    assert f"new {len(report.new)} tensors" in text


def test_no_layer_replaced_gives_the_teacher_and_kl_zero(teacher_run, recipe, tmp_path):
    """Student layers = teacher layers: the student is the teacher (same logits), KL 0, in the
    functions and in a run's first logged step (student loss = teacher loss)."""
    run = tmp_path / "same"
    assert main(["train", str(recipe), f"output_dir={run}", f"distill.teacher={teacher_run}", "model.layers=[attn, x4]",
                 _stages({"kind": "kl", "steps": 1, "temperature": 2.0, "kl_weight": 0.5}), "train.steps=1"]) == 0
    first = next(r for r in read_metrics(run) if "split" not in r)
    assert abs(first["kl"]) < 1e-6 and abs(first["lm_loss"] - first["teacher_loss"]) < 1e-6, first
    teacher, _ = load_teacher(teacher_run, ModelConfig(**{**TEACHER, "vocab_size": 320}))
    student = HybridLM(teacher.cfg)
    report = init_student(student, teacher)
    assert report.new == [] and report.replaced == []
    ids = _fixed_batch(teacher.cfg.vocab_size)
    hs, ht = student(ids).hidden, teacher(ids).hidden
    assert torch.equal(hs, ht)
    kl = chunked_kl(hs.flatten(0, 1), student.head_weight, ht.flatten(0, 1), teacher.head_weight,
                    torch.ones(hs.shape[0] * hs.shape[1], dtype=torch.bool), 2.0, 17)
    assert abs(kl.item()) < 1e-6


# ------------------------------------------------------------------ the chunked KL


@pytest.mark.parametrize("cap", [None, 5.0])
def test_chunked_kl_equals_dense_kl_values_and_gradients(cap):
    """fp64, N = 113 tokens (no chunk of 16 divides it), a mask, temperature 2, with and without a soft-cap."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 113, 24, 77
    h_s = torch.randn(N, D, dtype=torch.float64, generator=g).requires_grad_()
    w_s = torch.randn(V, D, dtype=torch.float64, generator=g).requires_grad_()
    h_t, w_t = torch.randn(N, D, dtype=torch.float64, generator=g), torch.randn(V, D, dtype=torch.float64, generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    got = chunked_kl(h_s, w_s, h_t, w_t, mask, 2.0, 16, cap, cap)
    want = dense_kl(h_s, w_s, h_t, w_t, mask, 2.0, cap, cap)
    assert want.item() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got * 0.7, [h_s, w_s])
    g_want = torch.autograd.grad(want * 0.7, [h_s, w_s])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_got[0][~mask].abs().max() == 0   # unlabelled tokens take no gradient


def test_chunked_kl_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="chunked_kl expects"):
        chunked_kl(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, 5), torch.zeros(5, 4), torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------ the stages


def test_align_lowers_each_layers_mse_and_trains_only_the_replaced_mixers(recipe, teacher_run, tmp_path, capsys):
    run = tmp_path / "align"
    assert main(["train", str(recipe), f"output_dir={run}", f"distill.teacher={teacher_run}",
                 _stages({"kind": "align", "steps": 20}), "train.steps=20", "optim.lr=1e-3",
                 "optim.schedule=cosine", "train.save_every=20"]) == 0
    log = capsys.readouterr().out
    assert "distill: replaced layers 1: attn -> swa, 2: attn -> gdn" in log
    assert "distill: decoding state at 48 tokens: teacher" in log
    assert "distill: copied 36 tensors from the teacher (30 by name and shape, 6 into replaced mixers" in log
    assert "distill: new 7 tensors: blocks.2.mixer.dt_bias" in log and "distill: frozen in align stages 30" in log
    rows = [r for r in read_metrics(run) if "split" not in r]
    assert all("align_mse" in r and "kl" in r and r["teacher_loss"] > 0 for r in rows)
    teacher, _ = load_teacher(teacher_run, ModelConfig(**{**TEACHER, "vocab_size": 320}))
    start = HybridLM(_student_cfg(teacher, STUDENT_LAYERS))
    init_student(start, teacher)
    trained = _student(run)
    ids = _fixed_batch(teacher.cfg.vocab_size)
    _, pairs, ctx = capture_mixers(teacher, [1, 2], ids)
    with torch.no_grad():
        before, after = align_losses(start, pairs, ctx), align_losses(trained, pairs, ctx)
    for i in (1, 2):
        assert after[i] < 0.9 * before[i], (i, before[i], after[i])
    s0, s1 = start.state_dict(), trained.state_dict()
    moved = {name for name in s0 if not torch.equal(s0[name], s1[name])}
    mixers = {name for name in s0 if name.startswith(("blocks.1.mixer.", "blocks.2.mixer."))}
    assert moved == mixers   # every parameter of the replaced mixers, nothing else


def _kl_on(student: HybridLM, teacher: HybridLM, ids: torch.Tensor, T: float = 2.0) -> float:
    with torch.no_grad():
        hs, ht = student(ids).hidden, teacher(ids).hidden
        n = hs.shape[0] * hs.shape[1]
        return chunked_kl(hs.flatten(0, 1), student.head_weight, ht.flatten(0, 1), teacher.head_weight,
                          torch.ones(n, dtype=torch.bool), T).item() / n


def _train_batches(run: Path, n: int) -> list[dict]:
    """The first n training batches of a run (the data stream is a function of the recipe)."""
    from loom.trainer.data import StagedBatches, load_tokenizer

    cfg = load_config(run / "config.yaml")
    batcher = StagedBatches(cfg.data, cfg.train.batch_size, load_tokenizer(cfg.data.tokenizer), cfg.seed, 0, 1, 1)
    return [batcher.next(i) for i in range(n)]


def _kl_on_batches(student: HybridLM, teacher: HybridLM, batches: list[dict], T: float) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            kw = {"position_ids": b["position_ids"], "seq_ids": b["seq_ids"]}
            hs, ht = student(b["input_ids"], **kw).hidden, teacher(b["input_ids"], **kw).hidden
            mask = (b["labels"] != -100).reshape(-1)
            total += chunked_kl(hs.flatten(0, 1), student.head_weight, ht.flatten(0, 1), teacher.head_weight,
                                mask, T).item()
            count += int(mask.sum())
    return total / count


def test_kl_stage_lowers_kl(recipe, make_run, tmp_path):
    """Against a random std-0.1 teacher (a far-from-uniform distribution that depends on every
    layer) with kl_weight 1: the KL on the batches the run trained on falls (held-out text is
    no measure here: a few hundred tokens of a random function do not generalise)."""
    make_run(tmp_path / "teacher", model=TEACHER, seq_len=48)
    run = tmp_path / "kl"
    assert main(["train", str(recipe), f"output_dir={run}", f"distill.teacher={tmp_path / 'teacher'}",
                 _stages({"kind": "kl", "steps": 8, "temperature": 2.0, "kl_weight": 1.0}), "optim.lr=1e-3",
                 "train.steps=8", "train.save_every=8"]) == 0
    rows = [r for r in read_metrics(run) if "split" not in r]
    assert all(r["kl"] is not None and r["teacher_loss"] > 0 and "lm_loss" in r for r in rows)
    for r in rows:   # loss = kl_weight T^2 KL + (1 - kl_weight) LM
        assert abs(r["loss"] - 4 * r["kl"]) < 1e-5
    teacher, _ = load_teacher(tmp_path / "teacher", ModelConfig(**{**TEACHER, "vocab_size": 320}))
    batches = _train_batches(run, 8)
    start = HybridLM(_student_cfg(teacher, STUDENT_LAYERS))
    init_student(start, teacher)
    before, after = _kl_on_batches(start, teacher, batches, 2.0), _kl_on_batches(_student(run), teacher, batches, 2.0)
    assert rows[0]["kl"] == pytest.approx(_kl_on_batches(start, teacher, batches[:1], 2.0), rel=0.3)
    assert after < 0.8 * before, (before, after)


def test_resume_across_the_align_to_kl_boundary_is_exact(recipe, teacher_run, tmp_path, capsys):
    stages = _stages({"kind": "align", "steps": 3}, {"kind": "kl", "steps": 3, "temperature": 2.0, "kl_weight": 0.5})
    a, b = tmp_path / "a", tmp_path / "b"
    common = [str(recipe), f"distill.teacher={teacher_run}", stages]
    assert main(["train", *common, f"output_dir={a}"]) == 0
    assert main(["train", *common, f"output_dir={b}", "train.stop_after_steps=2"]) == 0
    assert main(["train", *common, f"output_dir={b}"]) == 0
    assert "distill: step 4: stage 1 (kl)" in capsys.readouterr().out
    ra = {r["step"]: r for r in read_metrics(a) if "split" not in r}
    rb = {r["step"]: r for r in read_metrics(b) if "split" not in r}
    assert sorted(ra) == sorted(rb) == list(range(1, 7))
    assert [ra[s]["distill_stage"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert ra[3]["kl"] is None and ra[4]["kl"] > 0 and "align_mse" in ra[3]
    for s in (4, 5, 6):   # loss = kl_weight T^2 KL + (1 - kl_weight) LM
        assert ra[s]["loss"] == pytest.approx(0.5 * 4 * ra[s]["kl"] + 0.5 * ra[s]["lm_loss"], abs=1e-5)
    for s in ra:
        for key in ("loss", "kl", "teacher_loss", "align_mse", "lm_loss"):
            x, y = ra[s].get(key), rb[s].get(key)
            assert (x is None and y is None) or abs(x - y) <= 1e-6, (s, key, x, y)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("override, message", [
    ("distill.teacher={missing}", "no such folder"),
    ("model.d_model=64", "model.d_model of the student (64) differs from the teacher's (32)"),
    ("model.layers=[attn, swa, attn]", "the student has 3 layers, the teacher 4"),
    ("model.vocab_size=384", "model.vocab_size of the student (384) differs from the teacher's (320)"),
    ("distill.teachr=x", "distill.teachr"),
    ("distill.stages=[{kind: align, steps: 0}]", "distill.stages[0].steps must be >= 1"),
])
def test_bad_input_is_one_line(recipe, teacher_run, tmp_path, capsys, override, message):
    args = ["train", str(recipe), f"output_dir={tmp_path / 'bad'}", f"distill.teacher={teacher_run}",
            override.replace("{missing}", str(tmp_path / "nope"))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_align_without_a_replaced_layer_is_refused(recipe, teacher_run, tmp_path, capsys):
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'x'}", f"distill.teacher={teacher_run}",
                 "model.layers=[attn, x4]", _stages({"kind": "align", "steps": 2})]) == 2
    assert "align stage but model.layers replaces no teacher layer" in capsys.readouterr().err


def test_distill_config_is_checked_without_a_model():
    from loom.trainer.config import config_from_dict, validate

    cfg = config_from_dict({"distill": {"stages": [{"kind": "kl", "steps": 2}]}})
    with pytest.raises(ConfigError, match="distill.teacher is not"):
        validate(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_kl_on_cuda_bf16_hidden_matches_fp32_dense():
    """The GPU path: bf16 hidden states (what autocast gives), fp32 accumulation inside."""
    g = torch.Generator(device="cuda").manual_seed(0)
    N, D, V = 1000, 64, 5000
    h_s = (0.3 * torch.randn(N, D, device="cuda", generator=g)).bfloat16().requires_grad_()
    w_s = (0.3 * torch.randn(V, D, device="cuda", generator=g)).requires_grad_()
    h_t, w_t = (0.3 * torch.randn(N, D, device="cuda", generator=g)).bfloat16(), 0.3 * torch.randn(V, D, device="cuda", generator=g)
    mask = torch.ones(N, dtype=torch.bool, device="cuda")
    got = chunked_kl(h_s, w_s, h_t, w_t, mask, 2.0, 256)
    want = dense_kl(h_s.float(), w_s, h_t.float(), w_t, mask, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gh, gw = torch.autograd.grad(got, [h_s, w_s])
    hf = h_s.detach().float().requires_grad_()
    rh, rw = torch.autograd.grad(dense_kl(hf, w_s, h_t.float(), w_t, mask, 2.0), [hf, w_s])
    torch.testing.assert_close(gh.float(), rh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=1e-3, atol=1e-4)
