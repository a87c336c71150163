"""Bad input fails in one `error:` line within seconds, before the model is built: empty, binary,
undecodable or field-less data files, empty or broken parquet, impossible model shapes, lengths
beyond this host's memory, and tokenizer files that are not JSON or not tokenizers."""
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import loom.trainer.train as train_mod


def _files_source(path, **extra):
    src = {"kind": "files", "path": str(path), **extra}
    return "data.sources=" + json.dumps([src])


def _empty_jsonl(d):
    (d / "a.jsonl").write_text("")
    return [_files_source(d / "a.jsonl")], "is empty"


def _blank_jsonl(d):
    (d / "a.jsonl").write_text("\n\n  \n")
    return [_files_source(d / "a.jsonl")], "holds no records"


def _binary_txt(d):
    (d / "a.txt").write_bytes(bytes(range(256)) * 8)
    return [_files_source(d / "a.txt")], "is not text"


def _latin1_txt(d):
    (d / "a.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 10)
    return [_files_source(d / "a.txt")], "is not UTF-8 text"


def _missing_field(d):
    (d / "a.jsonl").write_text('{"body": "hello"}\n')
    return [_files_source(d / "a.jsonl")], "no field 'text'"


def _not_json_lines(d):
    (d / "a.jsonl").write_text("this is not json\n")
    return [_files_source(d / "a.jsonl")], "line 1 is not a JSON object"


def _number_field(d):
    (d / "a.jsonl").write_text('{"text": 3}\n')
    return [_files_source(d / "a.jsonl")], "holds int, not text"


def _empty_parquet(d):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "a.parquet")
    return [_files_source(d / "a.parquet")], "holds no rows"


def _broken_parquet(d):
    (d / "a.parquet").write_bytes(b"PAR1 but not really")
    return [_files_source(d / "a.parquet")], "not a readable parquet file"


def _parquet_without_column(d):
    pq.write_table(pa.table({"body": ["x"]}), d / "a.parquet")
    return [_files_source(d / "a.parquet")], "no column 'text'"


def _tokenizer_not_json(d):
    (d / "tokenizer.json").write_text("vocab: not json")
    return [f"data.tokenizer={d / 'tokenizer.json'}"], "is not a valid tokenizer.json (not JSON"


def _tokenizer_not_a_tokenizer(d):
    (d / "tokenizer.json").write_text('{"hello": 1}')
    return [f"data.tokenizer={d / 'tokenizer.json'}"], "is not a valid tokenizer.json"


def _shape(*overrides, needle):
    return lambda d: (list(overrides), needle)


CASES = {
    "empty_jsonl": _empty_jsonl,
    "blank_jsonl": _blank_jsonl,
    "binary_txt": _binary_txt,
    "latin1_txt": _latin1_txt,
    "missing_field": _missing_field,
    "not_json_lines": _not_json_lines,
    "number_field": _number_field,
    "empty_parquet": _empty_parquet,
    "broken_parquet": _broken_parquet,
    "parquet_without_column": _parquet_without_column,
    "tokenizer_not_json": _tokenizer_not_json,
    "tokenizer_not_a_tokenizer": _tokenizer_not_a_tokenizer,
    "d_model_0": _shape("model.d_model=0", needle="model.d_model must be >= 1"),
    "n_heads_0": _shape("model.n_heads=0", needle="model.n_heads must be >= 1"),
    "n_heads_not_dividing": _shape("model.n_heads=3", needle="model.n_heads (3) must divide model.d_model (32)"),
    "odd_head_dim": _shape("model.head_dim=15", needle="model.head_dim (15) must be even"),
    "huge_seq_len": _shape("data.seq_len=1000000000", needle="data.seq_len=1000000000: one micro-batch needs"),
    "huge_eval_length": _shape("eval.passkey_lengths=[1000000000]",
                               needle="eval.passkey_lengths=1000000000: one example needs"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_before_the_model(case, recipe, tmp_path, run_cli, monkeypatch):
    overrides, needle = CASES[case](tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the input was validated")
    monkeypatch.setattr(train_mod, "build_model", never)
    t0 = time.perf_counter()
    rc, out, err = run_cli("train", recipe, f"output_dir={tmp_path / 'run'}", *overrides)
    assert time.perf_counter() - t0 < 15
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
