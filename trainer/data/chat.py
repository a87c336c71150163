"""Chat data for supervised fine-tuning: rows of `messages`, a chat template, and the loss mask.

A `kind: chat` source reads json / jsonl files whose rows hold `messages`, a
list of `{role, content}` with role in system | user | assistant | tool and
content text. Each row is rendered with the tokenizer's chat template into one
document, and `loss_on` decides which of its tokens are trained on:

    assistant   (default) the tokens of assistant turns: the text the template
                adds for an assistant message after the generation prompt
                (its content and the end-of-turn marker), nothing of the
                system / user turns or the role headers;
    all         every token of the conversation.

Rendering follows transformers' `apply_chat_template` exactly (the test
compares them): a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` filter that does not
escape HTML, `raise_exception` and `strftime_now`, and the variables
`messages`, `add_generation_prompt` and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...). The template is `chat_template` of
tokenizer_config.json beside tokenizer.json (or chat_template.jinja there).
The byte tokenizer has no file, so it uses BYTE_CHAT_TEMPLATE:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<|end|>\\n

(the generation prompt is `<|assistant|>\\n`, so an assistant turn's trained
tokens are its content and `<|end|>\\n`, and a model learns where to stop).

Assistant spans: turn i's text is render(messages[:i+1]) minus the prefix
render(messages[:i], add_generation_prompt=True), which holds for the usual
templates (ChatML, Llama 3, Mistral); a template that rewrites earlier turns
(so that the prefix property fails) is refused with one line. Tokens are
taken from the whole rendered string (as apply_chat_template(tokenize=True)
does), a token is trained on when its first character lies in a span.

Bad rows are one ValueError line naming the file and the row (1-based line
of a jsonl file, index of a json array): no `messages`, an unknown role,
content that is not text, a conversation without an assistant turn.
"""
from __future__ import annotations

import itertools
import json
import os
from datetime import datetime
from typing import Iterator, Optional

import numpy as np

from loom.trainer.data.sources import _open_text

ROLES = ("system", "user", "assistant", "tool")
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>\n' }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):        # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_chat_config(folder: str) -> dict:
    """The chat part of a Hugging Face tokenizer folder: {"chat_template": its template (text,
    or transformers' list of named templates), and the special-token texts (bos_token,
    eos_token, ...)} from tokenizer_config.json (special_tokens_map.json overriding the tokens
    unless the config has added_tokens_decoder, as transformers 5.25 loads them), the template
    from chat_template.jinja when the config has none; {} without a template. What
    `loom convert hf` / `to-hf` carry along."""
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    map_path = os.path.join(folder, "special_tokens_map.json")
    if "added_tokens_decoder" not in cfg and os.path.isfile(map_path):
        with open(map_path) as f:  # transformers 5 lets this legacy file override the config's tokens
            cfg |= {k: v for k, v in json.load(f).items() if k in _SPECIAL_KEYS}
    template = cfg.get("chat_template")
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    if not template:
        return {}
    return {"chat_template": template,
            **{k: t for k in _SPECIAL_KEYS if (t := _token_text(cfg.get(k))) is not None}}


def load_chat_template(tokenizer) -> tuple[str, dict]:
    """(template source, special-token variables) of a tokenizer: its tokenizer_config.json's
    chat_template (or chat_template.jinja), BYTE_CHAT_TEMPLATE for the byte tokenizer.
    ValueError (one line) when a file tokenizer has none."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return BYTE_CHAT_TEMPLATE, {"bos_token": "", "eos_token": "<|end|>"}
    folder = os.path.dirname(os.path.abspath(path))
    chat = tokenizer_chat_config(folder)
    template = chat.pop("chat_template", None)
    if isinstance(template, list):     # named templates: take "default"
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"tokenizer {path} has no chat template (chat_template in "
                         f"{os.path.join(folder, 'tokenizer_config.json')} or "
                         f"{os.path.join(folder, 'chat_template.jinja')}); a chat source needs one")
    return template, chat


class ChatTemplate:
    """A compiled chat template: render(messages, add_generation_prompt) -> str, as transformers does.

    Example:
        >>> tpl = ChatTemplate(BYTE_CHAT_TEMPLATE, {})
        >>> tpl.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        '<|user|>\\nhi\\n<|assistant|>\\n'
    """

    def __init__(self, source: str, specials: dict):
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(Extension):    # {% generation %} ... {% endgeneration %}: rendered as is
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template does not compile ({e})") from None
        self.specials = dict(specials)
        self._error = jinja2.exceptions.TemplateError

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)


def check_messages(row, where: str) -> list[dict]:
    """The messages of one row, checked (module docstring); ValueError naming `where`."""
    if not isinstance(row, dict) or "messages" not in row:
        what = "no field 'messages'" if isinstance(row, dict) else f"a {type(row).__name__}, not a JSON object"
        raise ValueError(f"{where}: {what}; a chat row holds messages, a list of {{role, content}}")
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: messages[{j}] must be an object with role and content")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{j}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: messages[{j}] content is {type(m['content']).__name__}, not text")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: the conversation has no assistant turn, so it has nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def assistant_spans(template: ChatTemplate, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans [a, b) of the assistant turns) of one conversation."""
    try:
        text = template.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = template.render(messages[:i], add_generation_prompt=True)
            upto = template.render(messages[:i + 1])
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise ValueError(f"{where}: the chat template renders earlier turns differently once later "
                                 "ones follow, so assistant turns cannot be located; use loss_on: all or "
                                 "another template")
            spans.append((len(prefix), len(upto)))
    except template._error as e:
        raise ValueError(f"{where}: the chat template failed: {e}") from None
    return text, spans


def encode_with_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (N,) int64 of text (no specials added) and each token's first character (N,) int64."""
    if getattr(tokenizer, "path", None) is None:      # bytes: map each byte to its character
        data = text.encode("utf-8")
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64), char_of_byte.astype(np.int64)
    ids, first = tokenizer.encode_offsets(text)
    return np.asarray(ids, dtype=np.int64), np.asarray(first, dtype=np.int64)


def encode_conversation(tokenizer, template: ChatTemplate, messages: list[dict], loss_on: str,
                        where: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(rendered text, ids (N,) int64, mask (N,) uint8) of one conversation; mask 1 = trained on."""
    if loss_on == "all":      # no spans needed: any template works
        try:
            text = template.render(messages)
        except template._error as e:
            raise ValueError(f"{where}: the chat template failed: {e}") from None
        ids, _ = encode_with_offsets(tokenizer, text)
        return text, ids, np.ones(len(ids), dtype=np.uint8)
    text, spans = assistant_spans(template, messages, where)
    ids, first_char = encode_with_offsets(tokenizer, text)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:
        mask |= ((first_char >= a) & (first_char < b)).astype(np.uint8)
    return text, ids, mask


def chat_rows(path: str) -> Iterator[tuple[str, object]]:
    """(where, row) of a json / jsonl chat file, `where` naming the file and row for errors."""
    with _open_text(path) as f:
        first = f.readline()
        if first.lstrip().startswith("["):
            try:
                rows = json.loads(first + f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
            for i, row in enumerate(rows):
                yield f"{path} row {i}", row
            return
        for n, line in enumerate(itertools.chain([first], f), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
                yield f"{path} line {n}", row
