"""Tiny self-made data for the tests: a SentencePiece model, challenge-format shards, and a runner for train_gpt.py.

Nothing here reads data from outside the repository: anyone who clones it can run the suite.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_gpt.py"
BOS = 1

WORDS = ("the of and to in is was for on that with as by at from his her they this which be or an are not have "
         "were had one all their but been has more other new some time when there would who so what if out about "
         "up into its two only can may than first after these over also most many years world state city people "
         "said made between work under during school part history").split()
RARE = ["café", "naïve", "Zürich", "日本", "emoji😀", "São", "€100", "x²", "Ωmega"]

# A tiny model that trains, exports and evaluates on a CPU in seconds.
TINY_ENV = {
    "VOCAB_SIZE": "320", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "MLP_MULT": "2", "ROPE_DIMS": "4", "BIGRAM_VOCAB_SIZE": "64", "BIGRAM_DIM": "8", "RECUR_LAYERS": "1",
    "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "6", "WARMUP_STEPS": "1",
    "TRAIN_LOG_EVERY": "2", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "8", "EVAL_BATCH_WINDOWS": "16",
    "MUON_MOMENTUM_WARMUP_STEPS": "3", "GPTQ_RESERVE_SECONDS": "0.5", "TTT_CHUNK_TOKENS": "256",
    "PARALLEL_START": "2",
}


def tiny_model(dtype=None, scale: float = 0.2, seed: int = 0, **overrides):
    """The TINY_ENV model with noise on every weight (zero-initialised projections would hide most of the network),
    in float64 by default so that tests can demand bit-identical or 1e-12 agreement."""
    import torch

    import train_gpt as T
    cfg, _ = T.config_from_env(dict(TINY_ENV, **{k.upper(): str(v) for k, v in overrides.items()}))
    torch.manual_seed(seed)
    model = T.GPT(cfg).to(torch.float64 if dtype is None else dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) if rng.random() > 0.06 else rng.choice(RARE) for _ in range(rng.randint(3, 60))]
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def train_tokenizer(out_prefix: Path, docs: list[str], vocab_size: int = 320) -> Path:
    """A BPE model laid out like the official one: pad 0, BOS 1, unk 2, byte fallback on."""
    import sentencepiece as spm
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(out_prefix), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.995, pad_id=0, bos_id=1,
                                   unk_id=2, eos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return Path(f"{out_prefix}.model")


def write_shard(path: Path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    """Write the challenge format: 256 little-endian int32 (magic, version, token count), then uint16 tokens."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return path


def encode_documents(model_path: Path, docs: list[str]) -> np.ndarray:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = []
    for ids in sp.encode(docs):
        out.append(BOS)
        out.extend(ids)
    return np.asarray(out, dtype=np.int64)


def make_dataset(root: Path, n_train_docs: int = 600, n_val_docs: int = 120) -> tuple[Path, Path]:
    """A tokenizer plus two train shards and one val shard (odd length) under root; returns (data_dir, model)."""
    model = train_tokenizer(root / "tok", make_documents(400, seed=1))
    data = root / "data"
    train = encode_documents(model, make_documents(n_train_docs, seed=2))
    half = len(train) // 2
    write_shard(data / "fineweb_train_000000.bin", train[:half])
    write_shard(data / "fineweb_train_000001.bin", train[half:])
    val = encode_documents(model, make_documents(n_val_docs, seed=3))
    if len(val) % 2 == 0:
        val = val[:-1]
    write_shard(data / "fineweb_val_000000.bin", val)
    return data, model


def script_env(data: Path, model: Path, log_dir: Path, **overrides: str) -> dict[str, str]:
    """A clean environment (no inherited settings of ours) for running train_gpt.py on the tiny data."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR", "VIRTUAL_ENV")}
    env.update(TINY_ENV)
    env.update({"DATA_PATH": str(data), "TOKENIZER_PATH": str(model), "LOG_DIR": str(log_dir),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(env: dict[str, str], cwd: Path, nproc: int = 1, timeout: int = 300,
               merge_output: bool = False) -> subprocess.CompletedProcess:
    """Run train_gpt.py directly, or under torchrun with nproc CPU processes (gloo). merge_output: stderr into stdout,
    one pipe in the order the lines were written (torch's logs beside the run's own lines)."""
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    return subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, timeout=timeout,
                          stderr=subprocess.STDOUT if merge_output else subprocess.PIPE)


def parse_log(path: Path) -> dict[str, dict[str, str]]:
    """The key:value lines after the source block, keyed by their first token (later lines win)."""
    text = path.read_text(encoding="utf-8")
    body = text.split("\n" + "=" * 100 + "\n", 1)[1]
    out = {}
    for line in body.splitlines():
        parts = line.split()
        if not parts:
            continue
        fields = dict(p.split(":", 1) for p in parts if ":" in p)
        out[parts[0].split(":", 1)[0]] = fields
    return out
