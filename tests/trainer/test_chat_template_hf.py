"""The tokenizer's chat template goes along through `loom convert hf` and `loom convert to-hf`.

- to-hf writes the template Loom's SFT renders with (trainer/data/chat.py) into the exported
  tokenizer_config.json: BYTE_CHAT_TEMPLATE for the byte tokenizer, the run tokenizer
  folder's own (with the special tokens it names) for an HF tokenizer; transformers'
  AutoTokenizer.from_pretrained(OUT).apply_chat_template renders the same text as Loom's
  ChatTemplate, with and without the generation prompt;
- convert hf carries a template from tokenizer_config.json or chat_template.jinja into the
  Loom folder, where a `kind: chat` source reads it (load_chat_template, the same text
  as transformers on the source folder, assistant tokens masked), and exporting that folder
  again gives it back to transformers.
Cost: ~3 s on one core.
"""
import json

import pytest

transformers = pytest.importorskip("transformers")

from loom.trainer.data import load_tokenizer  # noqa: E402
from loom.trainer.data.chat import ChatTemplate, encode_conversation, load_chat_template  # noqa: E402
from loom.trainer.hf.convert import convert_hf  # noqa: E402
from loom.trainer.hf.export import export_hf  # noqa: E402

ATTN = {"d_model": 32, "n_heads": 4, "layers": ["attn", "x2"]}
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what ran?"},
     {"role": "assistant", "content": "it ran far away"}, {"role": "user", "content": "why?"},
     {"role": "assistant", "content": "to see what was there"}],
]


def tokenizer_folder(folder, config: dict | None):
    """A small byte-level BPE tokenizer.json with Llama-3-style specials (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(["the cat sat on a mat and then it ran far away to see what was there"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def assert_same_rendering(hf_folder, loom_tokenizer):
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    template = ChatTemplate(*load_chat_template(loom_tokenizer))
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            assert template.render(msgs, add_generation_prompt=gen) == \
                ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_byte_tokenizer_export_carries_loom_default_template(tmp_path, make_run):
    make_run(tmp_path / "run", ATTN)
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    assert_same_rendering(out, load_tokenizer("byte"))
    text = transformers.AutoTokenizer.from_pretrained(str(out)).apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text == "<|user|>\nthe cat sat\n<|assistant|>\non a mat<|end|>\n"


def test_run_tokenizer_template_and_its_special_tokens_go_with_the_export(tmp_path, make_run):
    tok = tokenizer_folder(tmp_path / "tok", {"tokenizer_class": "PreTrainedTokenizerFast",
                                              "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                              "chat_template": LLAMA3})
    make_run(tmp_path / "run", ATTN, tokenizer=str(tok))
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3
    assert_same_rendering(out, load_tokenizer(str(tok)))
    text = transformers.AutoTokenizer.from_pretrained(str(out)).apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.endswith("on a mat<|eot_id|>")


def test_run_tokenizer_without_template_exports_without_one(tmp_path, make_run):
    tok = tokenizer_folder(tmp_path / "tok", None)
    make_run(tmp_path / "run", ATTN, tokenizer=str(tok))
    out, _ = export_hf(tmp_path / "run", tmp_path / "hf")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_import_carries_the_template_to_sft_and_back_out(tmp_path, make_run, where):
    tok = tokenizer_folder(tmp_path / "tok", None)
    make_run(tmp_path / "run", ATTN, tokenizer=str(tok))
    src, _ = export_hf(tmp_path / "run", tmp_path / "hf")  # an HF Llama folder to import
    config = json.loads((src / "tokenizer_config.json").read_text())
    config |= {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if where == "chat_template.jinja":
        (src / "chat_template.jinja").write_text(LLAMA3)
    else:
        config["chat_template"] = LLAMA3
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("bos_token", "eos_token")}))

    convert_hf(src, tmp_path / "loom")
    converted = load_tokenizer(str(tmp_path / "loom"))
    assert_same_rendering(src, converted)  # what a `kind: chat` source renders from the converted folder
    _, ids, mask = encode_conversation(converted, ChatTemplate(*load_chat_template(converted)),
                                       CONVERSATIONS[1], "assistant", "row")
    assert mask.any() and not mask.all()
    eot = converted.encode("<|eot_id|>")[0]
    assert int(mask[ids == eot].sum()) == 2  # each assistant turn's end, nothing of the others

    out, _ = export_hf(tmp_path / "loom", tmp_path / "again")
    assert_same_rendering(out, converted)


def test_special_tokens_map_overrides_the_config_as_transformers_reads_it(tmp_path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
    tok = tokenizer_folder(tmp_path / "tok", config)
    (tok / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert_same_rendering(tok, load_tokenizer(str(tok)))
    assert load_chat_template(load_tokenizer(str(tok)))[1]["eos_token"] == "<|end_of_text|>"
    (tok / "tokenizer_config.json").write_text(json.dumps(config | {"added_tokens_decoder": {}}))
    assert_same_rendering(tok, load_tokenizer(str(tok)))  # with added_tokens_decoder the map is not read
    assert load_chat_template(load_tokenizer(str(tok)))[1]["eos_token"] == "<|eot_id|>"
