"""lm-eval-harness model `loom`: a Loom run, checkpoint or converted folder under lm_eval.

    python -m loom.trainer.eval.lm_eval_model --model loom --model_args checkpoint=runs/quickstart \\
        --tasks my_task --include_path tasks/ --batch_size 8

`python -m loom.trainer.eval.lm_eval_model` is lm_eval's own command line (same
arguments) with this module imported first: lm_eval finds models only in its
registry, and importing this module registers `loom` (lm_eval has no plugin
entry points). From Python: `lm_eval.simple_evaluate(model=LoomLM(checkpoint=...), tasks=[...])`.
An exported folder (`loom convert to-hf`) also runs under lm_eval's own `hf`
model: `--model hf --model_args pretrained=OUT` (add trust_remote_code=True for hybrids).

model_args: checkpoint (required; see loom.trainer.hf.source), max_length
(default: the training length), max_gen_toks (256), add_bos_token (true:
every request starts with bos, as every training document does), device (cuda when
available, else cpu).

Requests (T = tokens; all mixers are causal, so right padding a batch does not
change the scores of the real tokens):
  loglikelihood         sum of log p(continuation | context) and whether greedy
                        decoding would produce it; inputs longer than max_length
                        keep their last max_length tokens.
  loglikelihood_rolling the whole text scored in disjoint windows of max_length
                        (lm_eval's rolling windows; the first conditions on bos).
  generate_until        greedy decoding with the mixers' decoding state, stopped
                        at eos, at any `until` string (cut there) or after
                        max_gen_toks tokens. Sampling is refused.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (fills lm_eval's registry first; it skips that when the registry is non-empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from loom.trainer.hf.source import load_source


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _device(name: str | None) -> str:
    """lm_eval's command line passes device=cuda by default; like its `hf` model, use the CPU
    (and say so) when CUDA is absent."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"loom lm_eval model: device {name} requested but CUDA is not available; using cpu", file=sys.stderr)
        return "cpu"
    return name


@register_model("loom")
class LoomLM(TemplateLM):
    """Example:
        lm = LoomLM(checkpoint="runs/quickstart", batch_size=8)
        results = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="tasks"))
    """

    def __init__(self, checkpoint: str, batch_size: int | str = 1, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | str = True, device: str | None = None,
                 **kwargs):
        super().__init__()
        src = load_source(checkpoint)
        if src.tokenizer is None:
            raise ValueError(f"{checkpoint}: no tokenizer (a `loom convert hf` folder without tokenizer.json)")
        self.device_name = _device(device)
        self.model = src.build().to(self.device_name)
        self.tok = src.tokenizer
        self.max_length = int(max_length) if max_length else (src.max_len or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = _flag(add_bos_token) and self.tok.bos_id is not None
        # lm_eval passes "auto" or "auto:N" when asked to search; Loom uses a fixed size
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1

    # ----- tokenization -----

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        if add_special_tokens is not False and self.add_bos:
            ids = [self.tok.bos_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ----- scoring -----

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(key, context ids, continuation ids)] -> [(sum log p, greedy)], in order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loom loglikelihood")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows, n_cont = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError("loglikelihood request with an empty continuation")
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                rows.append(full[:-1])  # input; position j predicts full[j + 1]
                n_cont.append(min(len(cont), len(full) - 1))
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, :len(r)] = torch.tensor(r)  # right padding: causal mixers ignore what follows
            hidden = self.model(ids.to(self.device_name)).hidden
            for b, i in enumerate(idx):
                L, n = len(rows[b]), n_cont[b]
                target = torch.tensor(requests[i][2][-n:], device=self.device_name)
                logp = F.log_softmax(self.model.logits(hidden[b, L - n:L]), dim=-1)  # (n, V)
                ll = float(logp.gather(-1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loom rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(ll for ll, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ----- generation -----

    @torch.no_grad()
    def greedy_until(self, context_ids: list[int], until: list[str], max_new: int) -> str:
        """Greedy continuation of `context_ids`, decoded and cut before the first `until` string."""
        out = self.model(torch.tensor([context_ids], device=self.device_name), want_state=True)
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            nxt = int(self.model.logits(out.hidden[:, -1]).argmax(-1))
            if nxt == self.tok.eos_id:
                break
            new.append(nxt)
            text = self.tok.decode(new)
            if any(u and u in text for u in until):
                break
            out = self.model(torch.tensor([[nxt]], device=self.device_name), state=out.state, want_state=True)
        for u in until:
            if u:
                text = text.split(u)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loom generate"):
            kw = dict(gen_kwargs or {})
            if _flag(kw.get("do_sample", False)) or float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the loom lm_eval model decodes greedily; set do_sample: false and temperature: 0 "
                                 "in the task's generation_kwargs")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            text = self.greedy_until(ids, until, max_new)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """lm_eval's command line with the `loom` model registered. Bad input (a missing
    checkpoint, an unknown task) is one `error:` line and exit 2 (LOOM_DEBUG=1: traceback)."""
    import os

    from lm_eval.__main__ import cli_evaluate

    from loom.trainer.checkpoint.manager import CheckpointError

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except (ValueError, OSError, KeyError, CheckpointError) as e:
        if os.environ.get("LOOM_DEBUG"):
            raise
        print(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
