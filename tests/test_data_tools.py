"""data/build_shards.py: text -> challenge shards round trips, its errors, and train_gpt.py on its output.
The downloader's tests (data/download.py against a fake Hub) are in tests/test_download.py."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as T
from helpers import parse_log, ROOT, BOS, run_script, script_env

BUILD = ROOT / "data" / "build_shards.py"


def load_tool(path: Path):
    name = f"_tool_{path.stem}"          # a private name: "build_shards" could shadow a real package
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod              # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


bs = load_tool(BUILD)

# ==================================================================================================
# Shard builder
# ==================================================================================================

ASCII_DOCS = ["Hello world. This is the first document.", "A second one, with numbers 12345 and punctuation!",
              "the of and to in is was for on that with as by at from"]


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return tiny_data[1]


def read_split(folder: Path, split: str, vocab: int = 320) -> tuple[list[np.ndarray], np.ndarray]:
    files = T.shard_files(str(folder), split)
    shards = [T.read_shard(f, vocab) for f in files]        # train_gpt.py's own header/size/vocab checks
    return shards, np.concatenate(shards).astype(np.int64)


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == BOS)
    assert starts[0] == 0, "a split must start with BOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def build(*args) -> int:
    return bs.main([str(a) for a in args])


def test_builder_round_trip_jsonl(tokenizer, tmp_path):
    import sentencepiece as spm
    from helpers import make_documents
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = ASCII_DOCS + make_documents(60, seed=7)     # the made-up docs include non-ASCII words
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    out = tmp_path / "shards"
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 5, "--shard-tokens", 300) == 0
    val_shards, val = read_split(out, "val")
    train_shards, train = read_split(out, "train")
    # the stream is cut at exactly --shard-tokens, documents continue across shards
    assert [len(s) for s in train_shards[:-1]] == [300] * (len(train_shards) - 1) and len(train_shards) > 2
    assert 0 < len(train_shards[-1]) <= 300
    got = split_docs(val) + split_docs(train)
    assert len(split_docs(val)) == 5 and len(got) == len(docs)
    assert got == sp.encode(docs)                      # BOS before every document, in input order, nothing else
    decoded = [sp.decode(ids) for ids in got]
    assert decoded[:3] == ASCII_DOCS                   # plain ASCII survives exactly
    assert decoded == [sp.decode(sp.encode(d)) for d in docs]
    for f in out.glob("fineweb_*.bin"):
        header = np.fromfile(f, dtype="<i4", count=256)
        assert header[:3].tolist() == [20240520, 1, (f.stat().st_size - 1024) // 2] and not header[3:].any()
    info = json.loads((out / "build_info.json").read_text())
    assert info["val"]["docs"] == 5 and info["train"]["docs"] == len(docs) - 5
    assert info["train"]["tokens"] == len(train) and info["val"]["tokens"] == len(val)
    assert not list(tmp_path.glob(".shards*"))         # no temp folder left


@pytest.mark.parametrize("mode,expected", [
    ("paragraph", ["Hello world.\nStill the first document.", "Second paragraph.", "Third."]),
    ("line", ["Hello world.", "Still the first document.", "Second paragraph.", "Third."]),
    ("file", ["Hello world.\nStill the first document.\n\nSecond paragraph.\n\n\nThird."]),
])
def test_builder_plain_text_documents(tokenizer, tmp_path, mode, expected):
    src = tmp_path / "a.txt"
    src.write_text("Hello world.\nStill the first document.\n\nSecond paragraph.\n\n\nThird.", encoding="utf-8")
    docs = list(bs.read_documents([src], "text", mode))
    assert docs == expected
    if len(docs) > 1:
        assert build(src, "--tokenizer", tokenizer, "--out", tmp_path / "o", "--val-docs", 1, "--plain-docs", mode) == 0
        assert len(split_docs(read_split(tmp_path / "o", "train")[1])) == len(docs) - 1


def test_builder_val_fraction_and_folder_input(tokenizer, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i} {j}"}) + "\n"
                                                                for j in range(25)))
    assert build(tmp_path / "in", "--tokenizer", tokenizer, "--out", tmp_path / "o", "--val-fraction", 0.1) == 0
    info = json.loads((tmp_path / "o/build_info.json").read_text())
    assert (info["val"]["docs"], info["train"]["docs"]) == (10, 90)


def test_builder_errors(tokenizer, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in ASCII_DOCS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n")
    cases = [
        ([bad, "--tokenizer", tokenizer, "--out", tmp_path / "o1"], "bad.jsonl:2: not valid JSON"),
        ([nofield, "--tokenizer", tokenizer, "--out", tmp_path / "o2"], "nofield.jsonl:1: expected an object with a string field 'text'"),
        ([good, "--tokenizer", tokenizer, "--out", tmp_path / "o3", "--val-docs", 3], "leave none for training"),
        ([tmp_path / "nope.txt", "--tokenizer", tokenizer, "--out", tmp_path / "o4"], "nope.txt: no such file or folder"),
        ([good, "--tokenizer", tmp_path / "x.model", "--out", tmp_path / "o5"], "x.model: file not found"),
        ([good, "--tokenizer", tokenizer, "--out", tmp_path / "o6", "--shard-tokens", 0], "--shard-tokens 0 must be > 0"),
    ]
    for argv, message in cases:
        assert build(*argv) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]   # nothing half-written


def test_builder_refuses_existing_output_and_tokenizer_without_bos(tokenizer, tmp_path, capsys):
    import sentencepiece as spm
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in ASCII_DOCS))
    out = tmp_path / "o"
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 1) == 0
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 1) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    (out / "marker").write_text("old")
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 2, "--force") == 0
    assert not (out / "marker").exists() and json.loads((out / "build_info.json").read_text())["val"]["docs"] == 2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ASCII_DOCS * 20), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=60, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    assert build(src, "--tokenizer", tmp_path / "nobos.model", "--out", tmp_path / "o7") == 1
    assert "BOS id is -1" in capsys.readouterr().err


def test_train_gpt_trains_on_built_shards_and_scores_their_val_exactly(tokenizer, tmp_path):
    """The pipeline on your own data: text -> build_shards.py -> train_gpt.py (tiny model, CPU), which scores every
    target of the built val split, its bytes those of the 100 documents' text."""
    from helpers import make_documents
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(700, seed=11)), encoding="utf-8")
    r = subprocess.run([sys.executable, str(BUILD), str(src), "--tokenizer", str(tokenizer), "--out",
                        str(tmp_path / "shards"), "--val-docs", "100", "--shard-tokens", "8000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"DATA_PATH={tmp_path / 'shards'}" in r.stdout
    env = script_env(tmp_path / "shards", tokenizer, tmp_path / "logs", RUN_ID="own", ITERATIONS="2")
    run = run_script(env, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    final = parse_log(tmp_path / "logs/own.txt")["final_document_lora_slot_exact"]   # the log body, not the source
    _, val = read_split(tmp_path / "shards", "val")
    docs = split_docs(val)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    text_bytes = sum(len(sp.decode(d).encode("utf-8")) for d in docs)
    assert len(docs) == 100 and int(final["scored_tokens"]) == len(val) - 1 and int(final["scored_bytes"]) == text_bytes
    bpb = float(final["val_loss"]) / math.log(2) * (len(val) - 1) / text_bytes
    assert float(final["val_bpb"]) == pytest.approx(bpb, abs=2e-8)
