"""Exact bits per byte: the byte count of every target must equal the UTF-8 length of the decoded text."""
import sentencepiece as spm
import torch

import train_gpt as T
from helpers import BOS, make_documents, train_tokenizer


def test_byte_count_matches_decoded_utf8(tmp_path):
    model = train_tokenizer(tmp_path / "tok", make_documents(300, seed=7))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tables = T.load_byte_tables(str(model), sp.vocab_size())
    docs = make_documents(200, seed=8) + ["  leading spaces", "tabs\tand\nnewlines", "日本語 😀 mixed é"]
    stream = []
    for ids in sp.encode(docs):
        stream += [BOS] + ids
    stream = torch.tensor(stream)
    per_target = tables.count(stream[:-1], stream[1:])
    # each document's targets are the ids after its BOS: their bytes must add up to its decoded UTF-8 length
    starts = (stream == BOS).nonzero().flatten().tolist() + [len(stream)]
    assert any(sp.is_byte(int(i)) for i in stream), "the documents must exercise byte-fallback pieces"
    for (a, b), doc_ids in zip(zip(starts[:-1], starts[1:]), sp.encode(docs)):
        counted = int(per_target[a:b - 1].sum())
        assert counted == len(sp.decode(doc_ids).encode("utf-8")), sp.decode(doc_ids)
    assert int(per_target[starts[1] - 1]) == 0   # a BOS target counts 0 bytes


def test_byte_fallback_pieces_count_one(tmp_path):
    model = train_tokenizer(tmp_path / "tok", make_documents(300, seed=7))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tables = T.load_byte_tables(str(model), sp.vocab_size())
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(int(tables.base[i]) == 1 for i in byte_ids)
    assert bool(tables.boundary[BOS]) and int(tables.base[BOS]) == 0


def test_vocab_mismatch_is_an_error(tmp_path):
    model = train_tokenizer(tmp_path / "tok", make_documents(300, seed=7))
    try:
        T.load_byte_tables(str(model), 1024)
    except T.RunError as e:
        assert "has 320 pieces but VOCAB_SIZE=1024" in str(e)
    else:
        raise AssertionError("no error")


def test_missing_tokenizer_is_an_error(tmp_path):
    try:
        T.load_byte_tables(str(tmp_path / "nope.model"), 1024)
    except T.RunError as e:
        assert "nope.model" in str(e) and "not found" in str(e)
    else:
        raise AssertionError("no error")
