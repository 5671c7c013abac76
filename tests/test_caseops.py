"""data/caseops.py and build_shards.py --caseops: the transform inverts exactly, every val token's sidecar value is its
bytes of the original UTF-8 text, the builder keeps validation documents out of training, and (with the shared proxy
data, when present) our build reproduces the proxy's CaseOps val shard and sidecar. The downloader's CaseOps variant
is tested in tests/test_download.py."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from helpers import ROOT, make_documents

sys.path.insert(0, str(ROOT / "data"))
import build_shards  # noqa: E402
import caseops as C  # noqa: E402
from caseops import ALLCAPS, CAPNEXT, ESCAPE, TITLE  # noqa: E402

SHARED = Path(__file__).parents[2] / "shared" / "data"
PROXY_TOKENIZER = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

ADVERSARIAL = [
    "", " ", "  \n\t ", "The NASA Launch", "iPhone OpenAI", "ABc aBC AbC abC", "A I a", "A1B2c3DD e4F x2Y",
    "McDonald's U.S.A. x-RAY", "Ünïcode ÜBER Straße İstanbul ǅemal ΑΒΓ café", f"op {TITLE} {ALLCAPS}{CAPNEXT}{ESCAPE} "
    f"A{TITLE}B {ESCAPE}{ESCAPE}x {TITLE}A{CAPNEXT}", "emoji 😀 CJK 日本 € x² ▁literal▁ ▁Piece",
    "Tabs\tand\nnewlines\r\n  and   runs ", "ﬁne Ⅻ ＦＵＬＬ width", f"{ALLCAPS}",
]


# ==================================================================================================
# The transform
# ==================================================================================================

def test_encode_follows_the_rules():
    cases = {
        "The NASA Launch": f"{TITLE}the {ALLCAPS}nasa {TITLE}launch",
        "iPhone OpenAI": f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i",
        "ABc aBC": f"{TITLE}a{CAPNEXT}bc a{CAPNEXT}b{CAPNEXT}c",   # a run that starts ALLCAPS but ends lower is mixed
        "A I a": f"{TITLE}a {TITLE}i a",                             # a single capital is TitleCase, not ALLCAPS
        "A1B22cD": f"{TITLE}a1{TITLE}b22c{CAPNEXT}d",                # digits end a word; "cD" is one
        "ÜBER Ünïcode": f"Ü{ALLCAPS}ber Ün{'ï'}code",                # only ASCII letters are words
        f"x{TITLE}Y{ESCAPE}": f"x{ESCAPE}{TITLE}{TITLE}y{ESCAPE}{ESCAPE}",   # a literal operator is escaped and ends a word
        "": "",
    }
    for text, coded in cases.items():
        assert C.encode(text) == coded, text
        assert C.decode(coded) == text, text


def test_round_trip_is_exact_on_adversarial_and_random_text():
    rng = random.Random(0)
    alphabet = "aAbBzZ  1é\u00dc\u2581\n" + C.OPERATORS
    texts = ADVERSARIAL + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    for text in texts:
        coded = C.encode(text)
        assert C.decode(coded) == text, repr(text)
        assert not any("A" <= c <= "Z" for c in coded), repr(text)   # the tokenizer never sees an ASCII capital
        assert coded.replace(ESCAPE + ESCAPE, "").count(ESCAPE) == sum(text.count(op) for op in C.OPERATORS
                                                                       if op != ESCAPE), repr(text)


@pytest.mark.parametrize("coded", [TITLE, f"a{TITLE}", f"{CAPNEXT}a", f"{ESCAPE}x", f"{ALLCAPS}a", f"a{TITLE}b",
                                   f"{TITLE}ab{TITLE}", "Ab", f"{TITLE}a{CAPNEXT}b"])
def test_decode_refuses_text_encode_cannot_write(coded):
    with pytest.raises(C.CaseOpsError):
        C.decode(coded)


# ==================================================================================================
# Tokens and their original bytes (a tiny tokenizer built like the CaseOps one)
# ==================================================================================================

@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """BPE with the four operators as user-defined symbols, byte fallback, NFKC and whitespace folding, no dummy
    prefix, BOS 1: the CaseOps tokenizer's settings at a tiny size."""
    prefix = tmp_path_factory.mktemp("caseops_tok") / "tok"
    docs = [C.encode(d) for d in make_documents(300, seed=9)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99, pad_id=0, bos_id=1,
                                   eos_id=2, unk_id=3, user_defined_symbols=list(C.OPERATORS), add_dummy_prefix=False,
                                   hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def stream(sp, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    table, tokens, side = C.PieceBytes(sp), [], []
    for i, text in enumerate(texts):
        ids, counts = C.document_tokens(sp, text, f"doc {i}", table)
        tokens += [1] + ids
        side += [0] + counts.tolist()
    return np.array(tokens), np.array(side)


def test_token_bytes_sum_to_the_documents_utf8_bytes(sp):
    texts = [C.canonical_text(sp, t) for t in ADVERSARIAL + make_documents(40, seed=4)]
    assert C.canonical_text(sp, "ﬁne Ⅻ  x\n") == "fine XII x"   # NFKC before the transform: its capitals get marked
    table = C.PieceBytes(sp)
    for i, text in enumerate(texts):
        ids, counts = C.document_tokens(sp, text, f"doc {i}", table)
        assert int(counts.sum()) == len(text.encode("utf-8")), repr(text)
        for k, t in enumerate(ids):           # every token on its own: operators by role, everything else its bytes
            if sp.is_byte(t):
                assert counts[k] == 1
            elif t in table.operator_array:
                literal = k > 0 and ids[k - 1] == table.escape_id and counts[k - 1] == 0
                assert counts[k] == (3 if literal else 0), (repr(text), k)
    tokens, side = stream(sp, texts)
    assert C.check_sidecar(tokens, side, sp) is None
    assert any(sp.is_byte(t) for t in tokens)                  # multi-byte characters split into byte pieces


def test_check_sidecar_names_the_first_wrong_document(sp):
    texts = [C.canonical_text(sp, t) for t in ADVERSARIAL[3:8]]
    tokens, side = stream(sp, texts)
    starts = np.flatnonzero(tokens == 1)
    bad = side.copy()
    bad[starts[2] + 3] += 1                                    # document 2, its third token
    bad[starts[4] + 1] += 5
    truth = len(texts[2].encode("utf-8"))
    assert C.check_sidecar(tokens, bad, sp) == C.Mismatch(2, int(starts[2] + 3), truth, truth + 1)
    moved = side.copy()
    moved[starts[1] + 1] += 1                                  # one byte moved between tokens of one document
    moved[starts[1] + 2] -= 1
    assert C.check_sidecar(tokens, moved, sp) is None          # the rule is per document
    with pytest.raises(C.CaseOpsError, match="entries but the stream has"):
        C.check_sidecar(tokens, side[:-1], sp)


def test_a_document_the_tokenizer_changes_is_refused_by_name(sp):
    with pytest.raises(C.CaseOpsError, match="doc 7: its tokens do not give its text back"):
        C.document_tokens(sp, "two\n\nlines", "doc 7")              # not canonical: the newlines fold to one space
    with pytest.raises(C.CaseOpsError, match="doc 8: its tokens do not give its text back"):
        C.document_tokens(sp, "J\u030c", "doc 8")   # NFKC composes j+caron only in lowercase: the marked letter is lost


# ==================================================================================================
# build_shards.py --caseops
# ==================================================================================================

def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_tokens(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=1024)


def build(*args) -> int:
    return build_shards.main([str(a) for a in args])


def test_builder_writes_shards_and_a_sidecar_that_check(sp, tmp_path):
    docs = ADVERSARIAL[3:] + make_documents(30, seed=6)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    model = tmp_path / "tok.model"
    model.write_bytes(sp.serialized_model_proto())
    out = tmp_path / "out"
    assert build(src, "--tokenizer", model, "--out", out, "--caseops", "--val-docs", 8, "--shard-tokens", 64) == 0
    val = np.concatenate([read_tokens(f) for f in sorted(out.glob("fineweb_val_0*.bin"))])
    side = np.concatenate([C.read_sidecar(f) for f in sorted(out.glob("fineweb_val_bytes_*.bin"))])
    assert len(sorted(out.glob("fineweb_val_bytes_*.bin"))) == len(sorted(out.glob("fineweb_val_0*.bin"))) > 1
    assert C.check_sidecar(val, side, sp) is None
    canonical = [C.canonical_text(sp, d) for d in docs[:8] if d.strip()]
    assert int(side.sum()) == sum(len(d.encode("utf-8")) for d in canonical)
    assert json.loads((out / "build_info.json").read_text())["val_bytes"]["bytes"] == int(side.sum())


def test_builder_refuses_a_train_document_that_is_in_validation(sp, tmp_path, capsys):
    model = tmp_path / "tok.model"
    model.write_bytes(sp.serialized_model_proto())
    docs = make_documents(12, seed=8)
    src = write_jsonl(tmp_path / "in.jsonl", docs + [docs[3]])      # validation document 3 again, now in train
    out = tmp_path / "out"
    assert build(src, "--tokenizer", model, "--out", out, "--caseops", "--val-docs", 5) == 1
    err = capsys.readouterr().err
    assert "document 12 (train) has the same tokens as validation document 3" in err, err
    assert sorted(tmp_path.iterdir()) == sorted([src, model])       # nothing written, not even a temporary folder
    assert build(src, "--tokenizer", model, "--out", out, "--caseops") == 1
    assert "--caseops needs the validation split given: --val-docs N" in capsys.readouterr().err
    assert build(src, "--tokenizer", model, "--out", out, "--val-docs", 5) == 1
    assert "is a CaseOps tokenizer (pieces U+E001..U+E004): pass --caseops" in capsys.readouterr().err
    assert not out.exists()


def test_builder_takes_the_split_from_the_docs_export_manifest(sp, tmp_path, capsys):
    """docs_selected.jsonl comes with docs_selected.source_manifest.json ("docs_val": 50000 for FineWeb): a copy of the
    records' prep script with --val-docs 10000 put the other 40,000 into training (openai/parameter-golf #2127)."""
    model = tmp_path / "tok.model"
    model.write_bytes(sp.serialized_model_proto())
    src = write_jsonl(tmp_path / "docs_selected.jsonl", make_documents(20, seed=12))
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"docs_val": 6}))
    assert build(src, "--tokenizer", model, "--out", tmp_path / "a", "--caseops", "--val-docs", 4) == 1
    err = capsys.readouterr().err
    assert "says the first 6 documents of docs_selected.jsonl are the validation split: 4 would put 2 of them into " \
           "training (openai/parameter-golf issue #2127)" in err, err
    assert build(src, "--tokenizer", model, "--out", tmp_path / "a", "--caseops", "--val-fraction", 0.5) == 1
    assert "10 would score 4 training documents as validation" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert build(src, "--tokenizer", model, "--out", tmp_path / "a", "--caseops") == 0
    info = json.loads((tmp_path / "a" / "build_info.json").read_text())
    assert (info["val"]["docs"], info["train"]["docs"]) == (6, 14)


# ==================================================================================================
# The shared proxy data (skipped where ../shared/data, beside the repository, is absent)
# ==================================================================================================

@pytest.mark.skipif(not PROXY_TOKENIZER.is_file(), reason=f"no shared proxy data at {SHARED}")
def test_proxy_val_documents_give_the_proxy_caseops_val_and_sidecar_exactly(tmp_path):
    """The 902 proxy val documents (the sp1024 val shard decoded) through build_shards.py --caseops give the proxy's
    CaseOps val shard and sidecar byte for byte, and check_sidecar finds every document exact."""
    sp1024 = spm.SentencePieceProcessor(model_file=str(SHARED / "tokenizers" / "fineweb_1024_bpe.model"))
    v = np.fromfile(SHARED / "fineweb_proxy_sp1024" / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    starts = np.flatnonzero(v == 1)
    docs = sp1024.decode([v[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(v)])])
    src = write_jsonl(tmp_path / "val.jsonl", docs + ["One train document."])
    out = tmp_path / "out"
    assert build(src, "--tokenizer", PROXY_TOKENIZER, "--out", out, "--caseops", "--val-docs", len(docs)) == 0
    proxy = SHARED / "fineweb_proxy_sp8192_caseops"
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        assert (out / name).read_bytes() == (proxy / name).read_bytes(), name
    sp = spm.SentencePieceProcessor(model_file=str(PROXY_TOKENIZER))
    side = C.read_sidecar(proxy / "fineweb_val_bytes_000000.bin")
    assert C.check_sidecar(read_tokens(proxy / "fineweb_val_000000.bin"), side, sp) is None
    assert int(side.sum()) == sum(len(d.encode("utf-8")) for d in docs) == 2_504_867


def test_a_caseops_run_finds_its_data_by_default_and_scores_the_original_bytes(sp, tmp_path):
    """Shards built with --caseops where data/download.py --variant sp8192_caseops puts them (at this tokenizer's
    vocabulary), then train_gpt.py with VOCAB_SIZE and CASEOPS=1 alone: it trains, exports, and its SLOT + TTT score
    counts exactly the val documents' UTF-8 bytes, from the sidecar."""
    from helpers import parse_log, run_script, script_env
    v = sp.vocab_size()
    data = tmp_path / "data" / "datasets" / f"fineweb10B_sp{v}_lossless_caps_caseops_v1_reserved"
    tok = tmp_path / "data" / "tokenizers" / f"fineweb_{v}_bpe_lossless_caps_caseops_v1_reserved.model"
    tok.parent.mkdir(parents=True)
    tok.write_bytes(sp.serialized_model_proto())
    docs = make_documents(600, seed=11)
    assert build(write_jsonl(tmp_path / "in.jsonl", docs), "--tokenizer", tok, "--out", data, "--caseops",
                 "--val-docs", 60) == 0
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="co", VOCAB_SIZE=str(v), CASEOPS="1", SLOT_STEPS="2",
                     TTT_EPOCHS="1")
    del env["DATA_PATH"], env["TOKENIZER_PATH"]          # the defaults must find them
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    final = parse_log(tmp_path / "logs" / "co.txt")["final_document_lora_slot_exact"]   # the default evaluation
    original = sum(len(C.canonical_text(sp, d).encode("utf-8")) for d in docs[:60])
    assert int(final["scored_bytes"]) == original


def test_check_bytes_proves_a_sidecar_and_names_the_first_wrong_document(sp, tmp_path, capsys):
    """tools/check_bytes.py on a CaseOps val shard checks its sidecar (exit 0), and a sidecar with one value moved
    from one token to another document's fails (exit 1) naming that document; with the proxy data, the proxy's."""
    sys.path.insert(0, str(ROOT / "tools"))
    import check_bytes
    model = tmp_path / "tok.model"
    model.write_bytes(sp.serialized_model_proto())
    out = tmp_path / "out"
    assert build(write_jsonl(tmp_path / "in.jsonl", make_documents(40, seed=12)), "--tokenizer", model, "--out", out,
                 "--caseops", "--val-docs", 20) == 0
    shard, side = out / "fineweb_val_000000.bin", out / "fineweb_val_bytes_000000.bin"
    assert check_bytes.main(["--tokenizer", str(model), "--shard", str(shard)]) == 0
    assert "mismatches=0" in capsys.readouterr().out
    values = C.read_sidecar(side).astype(np.int64)
    tokens = read_tokens(shard)
    starts = np.flatnonzero(tokens == 1)
    values[starts[7] + 2] += 1                      # document 7 gains a byte ...
    values[starts[12] + 1] -= 1 if values[starts[12] + 1] else -1   # ... and document 12 changes too
    bad = tmp_path / "bad_sidecar.bin"
    bad.write_bytes(side.read_bytes()[:1024] + values.astype("<u2").tobytes())
    assert check_bytes.main(["--tokenizer", str(model), "--shard", str(shard), "--sidecar", str(bad)]) == 1
    assert "mismatch: document 7:" in capsys.readouterr().out
    if PROXY_TOKENIZER.is_file():
        proxy = SHARED / "fineweb_proxy_sp8192_caseops" / "fineweb_val_000000.bin"
        assert check_bytes.main(["--tokenizer", str(PROXY_TOKENIZER), "--shard", str(proxy)]) == 0
        assert "bytes=2504867 decoded_bytes=2504867 mismatches=0" in capsys.readouterr().out
