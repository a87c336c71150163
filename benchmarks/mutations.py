"""Hand mutations of what a layer computes, each checked to fail a test (not run by pytest).

Each mutation replaces one exact snippet of one file under models/ or kernels/ (gates swapped,
RoPE at the wrong index, a norm dropped, a wrong scaling, a sign flipped, a window off by one),
runs the test files that guard it, restores the file (try/finally; the original bytes are also
written back on SIGINT/SIGTERM), and reports whether a test failed ("caught") or not ("SURVIVED").
A developer runs it before closing an issue that touches a layer; survivors go in the closing note.

    .venv/bin/python benchmarks/mutations.py                 # every mutation, its reference test files
    .venv/bin/python benchmarks/mutations.py --tests tests/models/reference
    .venv/bin/python benchmarks/mutations.py --tests tests/models tests/kernels   # the wider tier
    .venv/bin/python benchmarks/mutations.py --only rat_rope_token_index memory_no_key_norm
    .venv/bin/python benchmarks/mutations.py --list

The tests first run unmutated (the baseline; --no-baseline skips it): if they fail, every mutation
would read as caught, so the script stops (exit 2). Exit status 1 when a mutation survived or a
snippet no longer matches its file (the list then needs updating with the code).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact old snippet, its replacement), each old found exactly once
    why: str

    @property
    def focus(self) -> list[str]:
        """The reference test files that guard this file (run first: -x stops at the first failure)."""
        ref = "tests/models/reference/"
        stem = Path(self.path).stem
        files = {"rope": ["test_rope", "test_attn"], "rotary": ["test_rope", "test_attn"],
                 "heads": ["test_attn", "test_rat"], "conv": ["test_attn", "test_memory", "test_gdn", "test_mamba2"],
                 "swa": ["test_attn"], "attn": ["test_attn", "test_s2"],
                 "memory": ["test_memory", "test_titans_mag", "test_titans_mac"],
                 "titans_attention": ["test_titans_mag", "test_titans_mac"]}.get(stem, [f"test_{stem}"])
        return [ref + f + ".py" for f in files if (ROOT / ref / (f + ".py")).exists()]


def M(name, path, why, *edits):
    return Mutation(name, path, tuple(edits), why)


MUTATIONS = [
    # the five the reliability probe found (issue 26)
    M("rat_rope_token_index", "models/mixers/rat.py", "RoPE at the token index instead of the chunk index",
      ('self.rotary(torch.div(ctx.position_ids, L, rounding_mode="floor"))', "self.rotary(ctx.position_ids)")),
    M("rope_ntk_ignored", "models/rope.py", "NTK-aware scaling ignored",
      ("base = base * cfg.factor ** (k / (k - 2))", "base = base")),
    M("memory_no_key_norm", "models/mixers/memory.py", "the memory's key l2 normalisation dropped",
      ("q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)", "q = F.normalize(q, dim=-1)")),
    M("rat_swap_forget_output_gate", "models/mixers/rat.py", "forget and output gate projections swapped",
      ("f = self.f_proj(x)", "f = self.z_proj(x)"), ("torch.sigmoid(self.z_proj(x))", "torch.sigmoid(self.f_proj(x))")),
    M("memory_swap_momentum_forget", "models/mixers/memory.py", "momentum (eta) and forget (alpha) gates swapped",
      ("g[:, :, 0], g[:, :, 1], g[:, :, 2]", "g[:, :, 0], g[:, :, 2], g[:, :, 1]")),
    # RoPE scalings
    M("rope_linear_times", "models/rope.py", "position interpolation multiplies instead of divides",
      ("inv = inv / cfg.factor", "inv = inv * cfg.factor")),
    M("rope_yarn_no_mscale", "models/rope.py", "YaRN attention temperature dropped",
      ("mscale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0", "mscale = 1.0")),
    M("rope_llama3_smooth_swapped", "models/rope.py", "Llama 3 band blend reversed",
      ("(1 - smooth) * inv / cfg.factor + smooth * inv", "smooth * inv / cfg.factor + (1 - smooth) * inv")),
    M("rope_partial_freqs_of_full_head", "models/rope.py", "partial rotary with the full head's frequencies",
      ("inv, self.mscale = inv_frequencies(self.rotary_dim, cfg)",
       "inv, self.mscale = inv_frequencies(head_dim, cfg)\n        inv = inv[:self.rotary_dim // 2]")),
    M("rotate_sign_flip", "kernels/rotary.py", "rotate-half with the wrong sign",
      ("torch.cat([-x2, x1], dim=-1)", "torch.cat([x2, -x1], dim=-1)")),
    # attention family
    M("attn_gate_no_sigmoid", "models/mixers/heads.py", "Gated Attention gate without its sigmoid",
      ("g = self.gate_fn(logits)", "g = logits")),
    M("moh_balance_swapped", "models/mixers/heads.py", "MoH shared/routed balance weights swapped",
      ("a[..., :1] * g_s, a[..., 1:] * g_r", "a[..., 1:] * g_s, a[..., :1] * g_r")),
    M("moh_no_topk_renorm", "models/mixers/heads.py", "MoH routed weights not renormalised over the top-k",
      ("g_r = o.moh_topk * p * chosen / top_p.sum(-1, keepdim=True)", "g_r = o.moh_topk * p * chosen")),
    M("attn_group_packing_as_head", "models/mixers/attn.py", "group-packed gate read as head-packed",
      ('if self.cfg.gate_packing == "head":', 'if self.cfg.gate_packing in ("head", "group"):')),
    M("swa_window_off_by_one", "models/mixers/swa.py", "sliding window one token narrower",
      ("o = sliding_window_attention(q, k, v, window=W,",
       "o = sliding_window_attention(q, k, v, window=max(W - 1, 0),")),
    M("conv_reaches_previous_doc", "models/mixers/conv.py", "short conv reaches one token into the previous document",
      ("cross = position_ids[b, t][:, None] < j ", "cross = position_ids[b, t][:, None] < j - 1 ")),
    # rat, linear, memory
    M("rat_output_gate_dropped", "models/mixers/rat.py", "RAT's output gate dropped",
      ("o = o * torch.sigmoid(self.z_proj(x)).view(B, T, H, K)", "o = o")),
    M("linear_layer_decay_off_by_one", "models/mixers/linear.py", "TNL per-layer decay scaling off by one layer",
      ("slopes * (1 - i / (n - 1) + 1e-5)", "slopes * (1 - (i + 1) / (n - 1) + 1e-5)")),
    M("linear_gate_sign", "models/mixers/linear.py", "output gate sign flipped",
      ("o = o * torch.sigmoid(self.gate(x))", "o = o * torch.sigmoid(-self.gate(x))")),
    M("memory_no_out_norm", "models/mixers/memory.py", "memory mixer's output RMSNorm dropped",
      ("y = self.out_norm(y.to(x.dtype))", "y = y.to(x.dtype)")),
    M("memory_theta_bound_doubled", "models/mixers/memory.py", "inner learning-rate bound doubled",
      ("else 1.0 / (2 * self.chunk_size)", "else 1.0 / self.chunk_size")),
    # s2, gdn, mamba2, titans
    M("s2_head_shift_ignored", "models/mixers/s2.py", "S2 head_shift not applied to the offsets",
      ("offsets = default_head_offsets(H, G, V, cfg.head_shift)", "offsets = default_head_offsets(H, G, V, 0)")),
    M("gdn_sigmoid2_ignored", "models/mixers/gdn.py", "GDN's beta 2 sigmoid (negative eigenvalues) ignored",
      ("beta = 2.0 * beta", "beta = beta")),
    M("gdn_no_dt_bias", "models/mixers/gdn.py", "GDN decay without dt_bias",
      ("F.softplus(self.in_proj_a(x).to(ft) + self.dt_bias.to(ft))", "F.softplus(self.in_proj_a(x).to(ft))")),
    M("gdn_gate_sigmoid_for_silu", "models/mixers/gdn.py", "GDN output gate sigmoid instead of SiLU",
      ("* F.silu(z.to(of.dtype))", "* torch.sigmoid(z.to(of.dtype))")),
    M("mamba2_no_skip_D", "models/mixers/mamba2.py", "Mamba-2's D skip dropped",
      ("D=self.D, dt_bias=self.dt_bias", "D=None, dt_bias=self.dt_bias")),
    M("mamba2_norm_not_grouped", "models/mixers/mamba2.py", "Mamba-2 gated norm over all channels, not per group",
      ("hg = h.view(*h.shape[:-1], -1, self.group)", "hg = h.view(*h.shape[:-1], 1, -1)")),
    M("mamba2_no_conv_bias", "models/mixers/conv.py", "Mamba-2 conv bias dropped (ShortConv(bias=True))",
      ("            y.add_(bias.to(acc))", "            pass")),
    M("mag_no_mem_norm", "models/mixers/titans_mag.py", "MAG memory branch not normalised before its sigmoid",
      ("torch.sigmoid(self.mem_norm(m.to(a.dtype)))", "torch.sigmoid(m.to(a.dtype))")),
    M("mac_memory_tokens_no_rope", "models/mixers/titans_mac.py", "MAC memory-token keys without RoPE",
      ("kh = self._rope(self.hk_proj(h.flatten(-2)).view(B, C, G, K), posb[n])",
       "kh = self.hk_proj(h.flatten(-2)).view(B, C, G, K)")),
    M("persistent_prefix_dropped", "models/mixers/titans_attention.py", "MAG's persistent tokens ignored",
      ("    if prefix is None:\n        return sliding_window_attention(q, k, v, window=window, seq_ids=doc)",
       "    if True:\n        return sliding_window_attention(q, k, v, window=window, seq_ids=doc)")),
]


def apply(mut: Mutation, text: str) -> str:
    for old, new in mut.edits:
        n = text.count(old)
        if n != 1:
            raise LookupError(f"{mut.name}: snippet found {n} times in {mut.path}: {old!r}")
        text = text.replace(old, new)
    return text


def run_one(mut: Mutation, tests: list[str] | None, timeout: int) -> tuple[str, float]:
    path = ROOT / mut.path
    original = path.read_bytes()
    mutated = apply(mut, original.decode())
    restore = lambda *_: path.write_bytes(original)  # noqa: E731
    old_handlers = {s: signal.signal(s, lambda *a: (restore(), sys.exit(130))) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    try:
        path.write_text(mutated)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               *(tests or mut.focus)]
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - t0
    finally:
        restore()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    assert path.read_bytes() == original
    # 1: tests failed (caught); 0: all passed (survived); anything else: collection/usage error
    return {0: "SURVIVED", 1: "caught"}.get(rc, f"error rc={rc}"), time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", nargs="+", default=None, help="test paths (default: each mutation's focus files)")
    ap.add_argument("--only", nargs="+", default=None, help="mutation names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = ap.parse_args()
    muts = MUTATIONS if args.only is None else [m for m in MUTATIONS if m.name in args.only]
    if args.only is not None and len(muts) != len(args.only):
        print(f"unknown mutation names: {sorted(set(args.only) - {m.name for m in MUTATIONS})}", file=sys.stderr)
        return 2
    if args.list:
        for m in muts:
            print(f"{m.name:34s} {m.path:28s} {m.why}  [{' '.join(m.focus)}]")
        return 0
    if not args.no_baseline:  # unmutated, the tests must pass, or every mutation would read as caught
        files = args.tests or sorted({f for m in muts for f in m.focus})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *files]
        if subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            print(f"baseline fails: the unmutated code does not pass {' '.join(files)}; fix that first",
                  file=sys.stderr)
            return 2
    survivors = []
    for m in muts:
        try:
            result, secs = run_one(m, args.tests, args.timeout)
        except LookupError as e:
            result, secs = f"stale ({e})", 0.0
        print(f"{result:10s} {secs:6.1f}s  {m.name:34s} {m.why}", flush=True)
        if result != "caught":
            survivors.append(m.name)
    print(f"{len(muts) - len(survivors)}/{len(muts)} caught; survivors: {', '.join(survivors) or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
