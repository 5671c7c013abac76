"""The frontier's vocabulary end to end: `data/download.py --variant sp8192` from a local fake Hub, then the README's
sp8192 launch line (its settings, with a tiny model shape) trains, exports and scores on the default paths."""
import io
import json
import random
import re
import shlex

import numpy as np

from helpers import ROOT, parse_log, run_script, script_env, write_shard
from test_download import KEVCLARK, FakeHub, download

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# the tiny model shape the test puts on top of the launch line (the line's own settings are kept)
SHAPE = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ROPE_DIMS": "4",
         "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "4", "WARMUP_STEPS": "1", "RECUR_LAYERS": "1",
         "PARALLEL_START": "1", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "16", "EVAL_BATCH_WINDOWS": "8", "VAL_TOKENS": "1200",
         "TTT_CHUNK_TOKENS": "512", "SLOT_STEPS": "2", "GPTQ_CALIB_BATCHES": "8", "GPTQ_RESERVE_SECONDS": "0.5",
         "TRAIN_LOG_EVERY": "2"}


def sp8192_launch_settings() -> dict[str, str]:
    """The SETTING=value words before `torchrun` on the README's sp8192 launch line."""
    lines = (ROOT / "README.md").read_text().splitlines()
    line = lines[lines.index("<!-- sp8192-launch -->") + 2]
    words = shlex.split(line[:line.index("torchrun")])
    return dict(w.split("=", 1) for w in words)


def documents(n: int, seed: int) -> list[str]:
    spell = random.Random(0)                  # one vocabulary of 6,000 made-up words for every call
    words = ["".join(spell.choice(LETTERS) for _ in range(spell.randint(2, 9))) for _ in range(6000)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]


def export_8192(root):
    """A tiny sp8192 export in the Hub layout: an 8,192-piece BPE laid out as the records' (pad 0, BOS 1, EOS 2,
    unk 3, byte fallback, no dummy prefix), its train and val shards, and the manifest."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents(3000, 0)), model_writer=model, vocab_size=8192,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, pad_id=0, bos_id=1,
                                   eos_id=2, unk_id=3, add_dummy_prefix=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    files = {"datasets/tokenizers/fineweb_8192_bpe.model": model.getvalue(),
             "datasets/tokenizers/fineweb_8192_bpe.vocab": b""}
    for name, seed, n in (("train_000000", 1, 400), ("val_000000", 2, 60)):
        tokens = np.concatenate([[1] + ids for ids in sp.encode(documents(n, seed))])
        files[f"datasets/datasets/fineweb10B_sp8192/fineweb_{name}.bin"] = write_shard(root / f"{name}.bin", tokens).read_bytes()
    files["datasets/manifest.json"] = json.dumps({
        "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192", "stats": {"files_train": 1, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model",
                        "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"}]}).encode()
    return files


def test_download_then_the_readme_sp8192_line_trains_exports_and_scores(tmp_path):
    settings = sp8192_launch_settings()
    assert settings["VOCAB_SIZE"] == "8192" and not {"DATA_PATH", "TOKENIZER_PATH"} & set(settings)
    with FakeHub(export_8192(tmp_path), repo=KEVCLARK):
        r = download(tmp_path, "--variant", "sp8192", "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    env = script_env(tmp_path, tmp_path, tmp_path, RUN_ID="sp8192", **{**settings, **SHAPE})
    for key in ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR", "BIGRAM_DIM", "BIGRAM_VOCAB_SIZE"):
        env.pop(key, None)               # the defaults follow VOCAB_SIZE=8192; the bigram setting is the line's
    env.update({k: v for k, v in settings.items() if k.startswith("BIGRAM")})
    run = run_script(env, tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = parse_log(tmp_path / "logs" / "sp8192.txt")
    log = (tmp_path / "logs" / "sp8192.txt").read_text()
    assert "config.data_path:./data/datasets/fineweb10B_sp8192" in log
    assert re.search(r"^artifact_model params:\d+ .*vocab_size:8192", log, re.M)
    assert int(lines["code_bytes"]["total_submission_bytes"]) > 0
    final = lines["final_slot_ttt_exact"]
    assert int(final["scored_tokens"]) == 1199 and float(final["val_bpb"]) > 0
