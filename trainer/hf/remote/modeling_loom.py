"""LoomForCausalLM: a transformers PreTrainedModel + GenerationMixin around Loom's HybridLM.

Requires the Loom package (`import loom.models`). Weights are HybridLM's state
dict under the prefix `model.`. Shapes: B batch, T tokens.

Decoding state: HybridLM's per-layer state (KV caches, recurrent states,
neural-memory weights) travels between generation steps as the model kwarg
`loom_state`, not as a transformers Cache (the mixers' states are not
key/value tensors); `_supports_default_dynamic_cache` is False so generate
makes no DynamicCache. Greedy search and sampling work; beam search does not
(the state is not reordered).

Padding: a left-padded batch (attention_mask 0...0 1...1 per row) runs the
padding as its own document (seq_ids 0) before the text (seq_ids 1); no mixer
crosses a document boundary, and the text's positions start at 0, so each row
computes what it computes alone. Right padding is refused.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_loom import LoomConfig

try:
    from loom.models import HybridLM, ModelConfig
    from loom.models.config import build
except ImportError as e:  # the message a user sees when Loom is missing
    raise ImportError("this model's code wraps Loom's HybridLM: install Loom (pip install -e <Loom checkout>) "
                      "so that `import loom.models` works") from e


@dataclass
class LoomCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None  # (B, T, V) fp32
    loom_state: Optional[dict] = None  # {"layers": HybridLM state, "seen": tokens fed, "lengths": (B,) text tokens}


class LoomPreTrainedModel(PreTrainedModel):
    config_class = LoomConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """HybridLM initialises itself when built (HybridLM.init_weights); checkpoints overwrite that."""


class LoomForCausalLM(LoomPreTrainedModel, GenerationMixin):
    def __init__(self, config: LoomConfig):
        super().__init__(config)
        self.model = HybridLM(build(ModelConfig, dict(config.loom_model), "loom_model"))
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)  # (model, info) with output_loading_info=True
        (loaded[0] if isinstance(loaded, tuple) else loaded).recompute_buffers()
        return loaded

    @torch.no_grad()
    def recompute_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies, decay rates). They are
        not in the checkpoint, and transformers builds the model on the meta device and
        fills what the checkpoint lacks with uninitialised memory. Each mixer holding
        one is rebuilt on the CPU (the global RNG is left as it was) and its buffers copied."""
        for block in self.model.blocks:
            mixer = block.mixer
            owners = [(name, m) for name, m in mixer.named_modules() if m._non_persistent_buffers_set]
            if not owners:
                continue
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                fresh = type(mixer)(mixer.dims, mixer.cfg)
            for name, m in owners:
                for buf in m._non_persistent_buffers_set:
                    old = getattr(m, buf)
                    new = getattr(fresh.get_submodule(name), buf)
                    setattr(m, buf, new.to(device=old.device))

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head  # None when HybridLM ties the head to the embedding

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @staticmethod
    def _positions(attention_mask: Optional[torch.Tensor], B: int, T: int, device):
        """(position_ids, seq_ids, text lengths) of a fresh batch, from a left-padding mask."""
        if attention_mask is None or bool(attention_mask.all()):
            pos = torch.arange(T, device=device).expand(B, T)
            return pos, None, torch.full((B,), T, dtype=torch.long, device=device)
        mask = attention_mask.long()
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("LoomForCausalLM: right padding is not supported; pad on the left "
                             "(tokenizer.padding_side = 'left')")
        text = mask.cumsum(1) - 1  # position inside the text, -1 on padding
        pad = torch.arange(T, device=device).expand(B, T)  # padding is a document of its own
        return torch.where(mask.bool(), text, pad), mask, mask.sum(1)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                loom_state: Optional[dict] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs: Any) -> LoomCausalLMOutput:
        """input_ids (B, T); attention_mask (B, T) left padding only; loom_state from the previous call."""
        B, T = input_ids.shape
        if loom_state is None:
            pos, seq_ids, lengths = self._positions(attention_mask, B, T, input_ids.device)
            layers, seen = None, 0
        else:  # continuing rows: every new token is text
            lengths = loom_state["lengths"]
            pos = lengths[:, None] + torch.arange(T, device=input_ids.device)
            seq_ids, layers, seen = None, loom_state["layers"], loom_state["seen"]
            lengths = lengths + T
        want = bool(use_cache) if use_cache is not None else False
        out = self.model(input_ids, position_ids=pos, seq_ids=seq_ids, state=layers, want_state=want)
        logits = self.model.logits(out.hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        state = {"layers": out.state, "seen": seen + T, "lengths": lengths} if want else None
        return LoomCausalLMOutput(loss=loss, logits=logits, loom_state=state)

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1:
            raise ValueError("LoomForCausalLM: beam search is not supported (the decoding state is not reordered "
                             "between beams); use greedy search or sampling")
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, loom_state=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        if loom_state is not None:
            input_ids = input_ids[:, loom_state["seen"]:]  # only the tokens the state has not seen
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loom_state": loom_state,
                "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["loom_state"] = outputs.get("loom_state")
        return model_kwargs
