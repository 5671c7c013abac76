"""Scoring on original bytes with a CaseOps tokenizer: the val byte sidecar (one uint16 per val token) counts every
scored target, in every eval path; a missing or mismatched sidecar is an error naming the file."""
import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as T
from helpers import make_documents, tiny_model, write_shard

OPERATORS = ["\ue001", "\ue002", "\ue003", "\ue004"]


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A tokenizer whose ids 4-7 are the four case operators (as the CaseOps tokenizer), a val shard of 400 tokens and
    a sidecar of made-up byte counts (0 at BOS), which must be what the score counts."""
    root = tmp_path_factory.mktemp("caseops")
    docs = [OPERATORS[i % 4] + d.lower() for i, d in enumerate(make_documents(300, seed=5))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(root / "tok"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   user_defined_symbols=OPERATORS, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == OPERATORS
    rng = np.random.default_rng(0)
    val = rng.integers(8, 320, 400)
    val[::50] = 1                                        # documents start with BOS
    side = np.where(val == 1, 0, rng.integers(0, 9, 400))
    data = root / "data"
    write_shard(data / "fineweb_val_000000.bin", val)
    write_shard(data / "fineweb_val_bytes_000000.bin", side)
    cfg, _ = T.config_from_env(dict(DATA_PATH=str(data), TOKENIZER_PATH=str(root / "tok.model"), VOCAB_SIZE="320",
                                    PHASES="eval", RUN_ID="x"))
    return cfg, torch.from_numpy(val.astype(np.int64)), side


def test_the_sidecar_is_not_a_val_shard(caseops_data):
    cfg, val, _ = caseops_data
    assert [p.rsplit("/", 1)[1] for p in T.shard_files(cfg.data_path, "val")] == ["fineweb_val_000000.bin"]
    assert torch.equal(T.load_val_tokens(cfg), val)


@pytest.mark.parametrize("mode", ["sliding", "slot", "ttt", "slot_ttt"])
def test_every_eval_path_counts_the_sidecar_bytes(caseops_data, mode):
    """Every target 1..N-1 is scored once, so the bytes are the sidecar's sum without the first token; on a prefix
    of the stream (VAL_TOKENS), the prefix's."""
    cfg, val, side = caseops_data
    tables = T.eval_byte_tables(cfg)
    assert tables.sidecar is not None and tables.sidecar.tolist() == side.tolist()
    slot = T.Slot(steps=2, lr=0.05, lr_min=0.005, focal=0, bias=True, warm_start=0.0) if "slot" in mode else None
    ttt = T.Ttt(epochs=1, chunk_tokens=128, lr=0.01, momentum=0.9, clip=1.0, reset="never") if "ttt" in mode else None
    model = tiny_model(dtype=torch.float32, scale=0.05)
    for n in (len(val), 301):
        r = T.evaluate(model, val[:n], tables, T.Run(), T.Geometry(32, 8, 16), T.Adaptation(slot=slot, ttt=ttt))
        assert r.tokens == n - 1 and r.bytes == int(side[1:n].sum()), (n, r.bytes)
    # the piece rule would have counted otherwise: the sidecar, not the pieces, decided
    plain = T.evaluate(model, val, T.load_byte_tables(cfg.tokenizer_path, 320), T.Run(), T.Geometry(32, 8, 16))
    assert plain.bytes != int(side[1:].sum())


def test_a_study_slice_counts_its_own_bytes(caseops_data):
    cfg, val, side = caseops_data
    r = T.evaluate(tiny_model(dtype=torch.float32), val[100:300], T.eval_byte_tables(cfg).slice(100, 300), T.Run(),
                   T.Geometry(32, 8, 16))
    assert r.bytes == int(side[101:300].sum())


def test_a_caseops_tokenizer_without_its_sidecar_is_refused(caseops_data, tmp_path):
    cfg, val, side = caseops_data
    data = tmp_path / "data"
    write_shard(data / "fineweb_val_000000.bin", val.numpy())
    with pytest.raises(T.RunError, match=r"CaseOps tokenizer.*fineweb_val_bytes_\*\.bin.*has none"):
        T.eval_byte_tables(T.Config(**{**vars(cfg), "data_path": str(data)}))
    write_shard(data / "fineweb_val_bytes_000000.bin", side[:-1])
    with pytest.raises(T.RunError, match=r"fineweb_val_bytes_000000\.bin: the val byte sidecar has 399 entries but the "
                                         r"val stream .*fineweb_val_000000\.bin has 400 tokens"):
        T.eval_byte_tables(T.Config(**{**vars(cfg), "data_path": str(data)}))


def test_other_tokenizers_ignore_a_sidecar(tiny_data, tmp_path):
    data, tok = tiny_data
    cfg, _ = T.config_from_env(dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), VOCAB_SIZE="320", PHASES="eval",
                                    RUN_ID="x"))
    assert T.eval_byte_tables(cfg).sidecar is None


def test_caseops_default_paths():
    cfg = T.Config(vocab_size=8192, caseops=True)
    assert cfg.data_path == "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert cfg.tokenizer_path == "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
