"""The README's command lines, run as written at a tiny shape.

Every ```bash block of README.md sits under a marker comment (`<!-- name -->`) that names an entry of BLOCKS. The
block runs in bash, in a fresh folder laid out like a checkout (train_gpt.py, data/download.py and tools/ linked to
this repository's), exactly as the README shows it, except for what this file lists:
- SUBSTITUTIONS: README text -> the text that runs instead, with the reason beside it. Each must occur in its block
  (once, or as often as it says), so a README line that changes fails here until this file follows it; SETTINGS holds
  every SETTING=value a block sets, for the same reason.
- SHAPE: settings that only make the model and the run tiny, given through the environment. A block's own settings
  are words on its line and win over the environment, so they run as written; `test_the_blocks_are_the_ones_tested`
  also checks that SHAPE names none of them.
- programs on PATH: `python` / `python3` are this interpreter and `torchrun` is `python -m torch.distributed.run`
  (the same entry point); every `pip install` / `pip download` is recorded and skipped (CI has no network and the
  packages are already installed), and only those two pip commands are allowed.
- `python data/download.py` talks to a local fake Hub (tests/test_download.py) that serves tiny exports laid out like
  the records' ones: sp1024, sp8192 and CaseOps (data/caseops.py's transform, its val byte sidecar).
Commands that the README shows in its prose are read from the prose (PROSE) and run the same way.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from helpers import BOS, ROOT
from test_download import CASEOPS_NAME, CASEOPS_TOKENIZER, KEVCLARK, OFFICIAL, ROMEERP, FakeHub
from test_gpu_check import write_wheel

sys.path.insert(0, str(ROOT / "tools"))
import package_record as pr  # noqa: E402

sys.path.insert(0, str(ROOT / "data"))
import caseops  # noqa: E402

README = ROOT / "README.md"

# What runs each ```bash block (its marker), and the blocks that are not run here, with the reason.
BLOCKS = {"sp1024-launch", "sp8192-launch", "frontier-launch", "cpu-minute", "records", "gpu-check-prepare",
          "gpu-check"}
NOT_RUN_HERE = {"test-command": "CI's own line: .ci/run runs it verbatim (tests/test_config.py checks that it does)"}

# The settings each block sets, as the README shows them: the test fails when they change and this file does not.
SETTINGS = {
    "sp1024-launch": {},
    "sp8192-launch": {"VOCAB_SIZE": "8192", "MLP_MULT": "4", "BIGRAM_VOCAB_SIZE": "0", "VE_LAYERS": "",
                      "MUON_WD": "0.085", "ADAM_WD": "0.085", "INT6_CLIP_K": "12.85", "EMBED_CLIP_K": "20",
                      "GPTQ_CALIB_BATCHES": "64"},
    "frontier-launch": {"VOCAB_SIZE": "8192", "CASEOPS": "1", "MLP_MULT": "4", "BIGRAM_VOCAB_SIZE": "0",
                        "VE_LAYERS": "", "RECUR_LAYERS": "", "LOOP_LAYERS": "3,4,5", "PARALLEL_START": "8", "ATTN_GATE": "1",
                        "SMEAR_GATE": "input", "MUON_NS": "polar", "MUON_MOMENTUM": "0.97", "MATRIX_LR": "0.026",
                        "SCALAR_LR": "0.02", "TIED_EMBED_LR": "0.03", "MUON_WD": "0.095", "ADAM_WD": "0.085",
                        "BETA2": "0.99", "EMA_DECAY": "0.9965", "WARMDOWN_FRAC": "0.85", "MIN_LR": "0.1",
                        "TRAIN_SEQ_LEN": "3072", "SEQ_SCHEDULE": "1024,2048@0.1,3072@0.7", "INT6_CLIP_K": "12.85",
                        "EMBED_CLIP_K": "20", "LQER_RANK": "4",
                        "AWQ_GROUP": "64", "PACK_GROUPS": "1", "GPTQ_CALIB_BATCHES": "32", "EVAL_SEQ_LEN": "2560",
                        "EVAL_STRIDE": "48", "LORA_RANK": "80", "LORA_LR": "8e-5", "LORA_BETA2": "0.99",
                        "LORA_WEIGHT_DECAY": "2", "PHASE_DOCS": "2500", "SLOT_STEPS": "2"},
    "cpu-minute": {"RUN_ID": "cpu_try", "OMP_NUM_THREADS": "1", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2",
                   "NUM_KV_HEADS": "1", "ROPE_DIMS": "8", "RECUR_LAYERS": "1", "PARALLEL_START": "1",
                   "BIGRAM_VOCAB_SIZE": "256", "BIGRAM_DIM": "16", "VE_DIM": "16", "TRAIN_SEQ_LEN": "128",
                   "TRAIN_BATCH_TOKENS": "8192", "ITERATIONS": "40", "WARMUP_STEPS": "1", "TRAIN_LOG_EVERY": "10",
                   "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "64", "VAL_TOKENS": "50000", "SLOT_STEPS": "2",
                   "LORA_BATCH": "16"},
    "records": {"TORCHINDUCTOR_CACHE_DIR": "$PWD/.inductor_cache", "RUN_ID": "seed$SEED", "SEED": "$SEED"},
    "gpu-check-prepare": {},
    "gpu-check": {},
}

# The tiny model and run for the launch lines and the records loop (they set none of these). The technique stays as
# the defaults have it: recurrence, parallel residuals, value embeddings, SLOT and TTT all run, on fewer layers.
SHAPE = {
    "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ROPE_DIMS": "4",   # 11 x 512
    "BIGRAM_DIM": "8", "VE_DIM": "8",
    "RECUR_LAYERS": "1", "PARALLEL_START": "1",   # layer indices of the 11-layer default (4,5 and 7) inside 2 layers
    "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "6", "WARMUP_STEPS": "1", "TRAIN_LOG_EVERY": "2",
    "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "16", "EVAL_BATCH_WINDOWS": "8",   # 2048 / 64 / 32, on a 2,152-token val
    "SLOT_STEPS": "2", "TTT_CHUNK_TOKENS": "512",   # 8 steps, 32,768-token chunks: on the tiny val TTT trains 4 chunks
}
# The frontier line's tiny model: 9 layers keep its loop of layers 3-5 and its parallel layer 8 (15 passes once the
# loop is on); its own lengths shrink by SUBSTITUTIONS, and 8 steps cross the context switches (10%, 70%) and the loop.
FRONTIER_SHAPE = {"NUM_LAYERS": "9", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ROPE_DIMS": "4",
                  "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "8", "WARMUP_STEPS": "1", "TRAIN_LOG_EVERY": "2",
                  "EVAL_BATCH_WINDOWS": "8"}
# The environment of every block besides SHAPE: one thread per process (CI has 2 cores), and the packager's causality
# harness cut to one of its tests, the flip test of the default SLOT on the real evaluation code (~4 s; the whole
# harness, ~140 s here, is tests/test_slot_legality.py, which CI runs on the same code): this file checks that the
# packager runs the harness on the logged code and records its outcome, not what the harness proves.
ENV = {"OMP_NUM_THREADS": "1", "PYTEST_ADDOPTS": "-k 'flip_test_passes_on_the_real_code and default'"}
HARNESS_TESTS = 1

# The GPU check's tiny settings: SHAPE without ITERATIONS (the wall clock ends the run, as on the GPU), a reserve and
# TTT chunks that fit its 3 s and 400 val tokens, and LATE_QAT_FRAC 0.5: the 2.5 s of training also cross the QAT
# switch, at 1.25 s, on a busy CPU too (the cap check stops a run up to two slow steps and 0.25 s early).
GPU_CHECK_SET = {**{k: v for k, v in SHAPE.items() if k != "ITERATIONS"}, "GPTQ_RESERVE_SECONDS": "0.5",
                 "TTT_CHUNK_TOKENS": "256", "LATE_QAT_FRAC": "0.5"}
TINY_GPU_CHECK = ("--set '" + " ".join(f"{k}={v}" for k, v in GPU_CHECK_SET.items()) + "' --train-seconds 3 --val-tokens 400 "
                  "--bench-args '--steps 2 --warmup 1 --eval-tokens 400' --limits probe=60,hessian=60,bench=120,train=120")
SUBSTITUTIONS = {
    "sp1024-launch": {"--train-shards 80": "--train-shards 1",             # the fake Hub's export has one train shard
                      "--nproc_per_node=8": "--nproc_per_node=2"},         # 2 CPU processes (gloo) for 8 GPUs
    "sp8192-launch": {"--nproc_per_node=8": "--nproc_per_node=2"},
    "frontier-launch": {"--nproc_per_node=8": "--nproc_per_node=2", "TRAIN_SEQ_LEN=3072": "TRAIN_SEQ_LEN=32",
                        "SEQ_SCHEDULE=1024,2048@0.1,3072@0.7": "SEQ_SCHEDULE=8,16@0.1,32@0.7",
                        "EVAL_SEQ_LEN=2560": "EVAL_SEQ_LEN=32", "EVAL_STRIDE=48": "EVAL_STRIDE=16"},
    "cpu-minute": {"ITERATIONS=40": "ITERATIONS=10",                       # still crosses the recurrence and QAT switches
                   "TRAIN_BATCH_TOKENS=8192": "TRAIN_BATCH_TOKENS=1024",   # 8 sequences of 128 a step, not 64
                   "VAL_TOKENS=50000": "VAL_TOKENS=1200"},                 # the tiny val has 2,152 tokens
    "records": {"--nproc_per_node=8": "--nproc_per_node=2",
                # CPU logs of a tiny val are not a record: the README's own flag for packaging them anyway
                "--description notes.md": "--description notes.md --allow-non-record"},
    "gpu-check-prepare": {"<proxy data>": ("$PROXY_DATA", 2)},   # the README's placeholder (twice): the export's files
    "gpu-check": {'--out "$OUT"': '--out "$OUT" ' + TINY_GPU_CHECK},   # tiny settings, short steps and limits
}
# Commands in the README's prose: (a regex whose group is the `code span`, substitutions). The sp8192 and CaseOps lines
# come "after the same two `pip install` steps" (the sp1024 line's, skipped here as everywhere) and their download.
PROSE = {
    "sp8192-download": (r"`(python data/download\.py --variant sp8192 [^`]*)`", {"--train-shards 128": "--train-shards 1"}),
    "caseops-download": (r"`(python data/download\.py --variant sp8192_caseops [^`]*)`",
                         {"--train-shards 80": "--train-shards 1"}),
    # settings only: the test adds the CPU minute's eval settings ("give them again", the README says) and the program
    "rescore": (r"\*\*Scoring an artifact again\*\*[^`]*`(PHASES=eval ARTIFACT_PATH=[^`]*)`", {}),
    # on the records folder's own logs; its harness ran on their code in the records block (this one would cost 6 s)
    "summary-only": (r"`(python tools/package_record\.py --summary-only\s+submission\.json --meta meta\.json <logs>)`",
                     {"<logs>": "$FOLDER/train_seed*.log --allow-non-record --skip-harness"}),
}


# ==================================================================================================
# Reading the README
# ==================================================================================================

def readme_blocks() -> dict[str, str]:
    """{marker: the text of the code block right under it}; a block without a marker is an error."""
    lines, blocks, i = README.read_text(encoding="utf-8").splitlines(), {}, 0
    while i < len(lines):
        if lines[i].startswith("```"):
            marker = re.fullmatch(r"<!-- ([a-z0-9-]+) -->", lines[i - 1].strip())
            assert marker, f"README.md line {i + 1}: a code block without a <!-- name --> marker above it"
            end = lines.index("```", i + 1)
            assert lines[i] == "```bash", f"README.md line {i + 1}: {lines[i]}, not ```bash"
            blocks[marker.group(1)] = "\n".join(lines[i + 1:end]) + "\n"
            i = end
        i += 1
    return blocks


def prose_command(name: str) -> str:
    pattern, subs = PROSE[name]
    found = re.findall(pattern, README.read_text(encoding="utf-8"))
    assert len(found) == 1, f"README.md: {len(found)} matches of the {name} command"
    return substitute(re.sub(r"\s+", " ", found[0]), subs, name)


def substitute(text: str, subs: dict, name: str) -> str:
    """Each substitution old -> new (or old -> (new, n) for a text that occurs n times) must occur as often as said."""
    for old, new in subs.items():
        new, times = new if isinstance(new, tuple) else (new, 1)
        assert text.count(old) == times, f"{name}: {old!r} occurs {text.count(old)} times in the README's command"
        text = text.replace(old, new)
    return text


def settings_of(text: str) -> dict[str, str]:
    """Every SETTING=value word of a block, as the shell splits it."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    return dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", w, re.S))


def pip_commands(text: str) -> list[str]:
    """The pip commands of a block, as the shim records them ("install ...", "download ...")."""
    out = []
    for segment in re.split(r"&&|;|\n", text.replace("\\\n", " ")):
        words = shlex.split(segment)
        if words[:1] == ["pip"] or words[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
            out.append(" ".join(words[1 if words[0] == "pip" else 3:]))
    return out


# ==================================================================================================
# The tiny export and the checkout the commands run in
# ==================================================================================================

def documents(n: int, seed: int) -> list[str]:
    """Made-up ASCII words (a prefix of the val stream never cuts a character), some capitalised or in capitals (the
    CaseOps transform has work), commas and full stops."""
    spell = random.Random(0)
    words = ["".join(spell.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(spell.randint(2, 9))) for _ in range(6000)]
    rng = random.Random(seed)
    word = lambda: rng.choice([str.lower] * 8 + [str.capitalize, str.upper])(rng.choice(words))
    return [" ".join(word() + rng.choice(["", "", "", "", ",", "."]) for _ in range(rng.randint(10, 40))) for _ in range(n)]


def shard(values) -> bytes:
    """The challenge format: 256 little-endian int32 (magic, version, count), then uint16 values."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(values))
    return header.tobytes() + np.asarray(values, dtype="<u2").tobytes()


def export(variant: str, vocab_size: int, n_val: int) -> dict[str, bytes]:
    """One variant in its Hub layout: a BPE laid out as the records' (pad 0, BOS 1, EOS 2, unk 3, byte fallback, no
    dummy prefix; for CaseOps over the transformed text, the four operators as pieces 4..7), one train shard, one val
    shard (for CaseOps with its byte sidecar), the manifest."""
    is_caseops = variant == "sp8192_caseops"
    name = CASEOPS_NAME if is_caseops else f"fineweb10B_{variant}"
    tok = CASEOPS_TOKENIZER if is_caseops else f"tokenizers/fineweb_{vocab_size}_bpe"
    text = caseops.encode if is_caseops else str
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=map(text, documents(3000, 0)), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False, minloglevel=2,
                                   num_threads=1, user_defined_symbols=list(caseops.OPERATORS) if is_caseops else [])
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    files = {f"datasets/{tok}.model": model.getvalue(), f"datasets/{tok}.vocab": b""}
    table = caseops.PieceBytes(sp) if is_caseops else None
    for split, seed, n in (("train", 1, 400), ("val", 2, n_val)):
        tokens, counts = [], []
        for doc in documents(n, seed):
            ids, nbytes = (caseops.document_tokens(sp, caseops.canonical_text(sp, doc), table=table) if is_caseops
                           else (sp.encode(doc), []))
            tokens += [BOS, *ids]
            counts += [0, *nbytes]
        files[f"datasets/datasets/{name}/fineweb_{split}_000000.bin"] = shard(tokens)
        if is_caseops and split == "val":
            files[f"datasets/datasets/{name}/fineweb_val_bytes_000000.bin"] = shard(counts)
    dataset = {"name": name, "tokenizer_name": f"sp_{variant}", "stats": {"files_train": 1, "files_val": 1}}
    tokenizer = {"name": f"sp_{variant}", "model_path": f"{tok}.model", "vocab_path": f"{tok}.vocab"}
    if is_caseops:   # the #1729 exporter's manifest
        dataset["val_bytes_glob"] = f"datasets/{name}/fineweb_val_bytes_*.bin"
        tokenizer["text_transform"] = "lossless_caps_caseops_v1"
    files["datasets/manifest.json"] = json.dumps({"datasets": [dataset], "tokenizers": [tokenizer]}).encode()
    return files


# variant: (its repo on the fake Hub, VOCAB_SIZE, val documents); the val sizes keep every eval short
EXPORTS = {"sp1024": (OFFICIAL, 1024, 24), "sp8192": (KEVCLARK, 8192, 16), "sp8192_caseops": (ROMEERP, 8192, 16)}


SHIMS = {
    "python": '#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; exec pip "$@"; fi\nexec {python} "$@"\n',
    "torchrun": '#!/bin/sh\nexec {python} -m torch.distributed.run "$@"\n',
    "pip": '#!/bin/sh\necho "$*" >> {log}\ncase "$1" in install|download) exit 0;; esac\n'
           'echo "pip $1: only pip install and pip download are skipped" >&2\nexit 1\n',
}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """(folder, environment): a folder laid out like a checkout, the fake Hub serving both exports while the module
    runs, and the environment every block gets (shims first on PATH)."""
    root = tmp_path_factory.mktemp("readme")
    work, shims = root / "checkout", root / "shims"
    (work / "data").mkdir(parents=True)
    shims.mkdir()
    for link, target in (("train_gpt.py", "train_gpt.py"), ("data/download.py", "data/download.py"), ("tools", "tools")):
        (work / link).symlink_to(ROOT / target)
    for name, text in SHIMS.items():
        (shims / name).write_text(text.format(python=sys.executable, log=root / "pip.log"))
        (shims / name).chmod(0o755)
    (shims / "python3").symlink_to(shims / "python")
    exports = {variant: export(variant, vocab, n_val) for variant, (_, vocab, n_val) in EXPORTS.items()}
    with FakeHub() as hub:
        hub.repos = {EXPORTS[variant][0]: files for variant, files in exports.items()}
        keep = ("HOME", "LANG", "TMPDIR", "VIRTUAL_ENV")
        env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("HF_")}
        env.update(ENV, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}")
        yield {"work": work, "env": env, "pip_log": root / "pip.log", "exports": exports}


def run_bash(checkout, text: str, timeout: int = 600, **env: str) -> str:
    """The text in `bash -e -o pipefail` in the checkout; returns stdout and stderr, merged, after a zero exit."""
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=checkout["work"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, env={**checkout["env"], **env})
    assert r.returncode == 0, f"exit {r.returncode}:\n{text}\n{r.stdout[-6000:]}"
    return r.stdout


def shape_of(name: str) -> dict[str, str]:
    return FRONTIER_SHAPE if name == "frontier-launch" else SHAPE


def run_block(checkout, name: str, shape: dict[str, str], **env: str) -> tuple[str, str]:
    """(the text that ran, its output): the README's block, substituted, with `shape` (SHAPE or none) in the
    environment."""
    text = substitute(readme_blocks()[name], SUBSTITUTIONS[name], name)
    pip_log = checkout["pip_log"]
    before = pip_log.read_text().splitlines() if pip_log.exists() else []
    out = run_bash(checkout, text, **shape, **env)
    after = pip_log.read_text().splitlines() if pip_log.exists() else []
    assert after[len(before):] == pip_commands(text), "the pip commands skipped are exactly the block's"
    return text, out


# ==================================================================================================
# What the commands promise: an exact score, an artifact under the limit, logs the packager accepts
# ==================================================================================================

def read_run(path: Path) -> tuple[pr.RunLog, dict]:
    """The log, checked by the packager's own rules (complete, within every limit), and its score's figures."""
    log = pr.read_log(path)
    pr.check_complete(log)
    pr.check_limits(log)
    return log, pr.seed_result(log)


def assert_exact_score(result: dict, checkout, variant: str, val_tokens: int = 0) -> None:
    """val_bpb is val_loss in bits times tokens per byte, and the bytes are the UTF-8 length of the text behind every
    scored target: each document of the scored stream decoded (for CaseOps, the transform undone)."""
    files = checkout["exports"][variant]
    val = next(np.frombuffer(data, dtype="<u2", offset=1024) for path, data in files.items()
               if path.endswith("/fineweb_val_000000.bin"))
    sp = spm.SentencePieceProcessor(model_proto=next(data for path, data in files.items() if path.endswith(".model")))
    text = (lambda ids: caseops.decode(sp.decode(ids))) if variant.endswith("caseops") else sp.decode
    val = (val[:val_tokens] if val_tokens else val).astype(np.int64)
    tokens, n_bytes = result["scored_tokens"], result["scored_bytes"]
    assert tokens == len(val) - 1
    docs = np.split(val[1:], np.flatnonzero(val[1:] == BOS))
    assert n_bytes == sum(len(text([int(t) for t in d if t != BOS]).encode("utf-8")) for d in docs)
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) * tokens / n_bytes, abs=2e-8)


def assert_config(log: pr.RunLog, settings: dict[str, str]) -> None:
    """Every setting of the line (and of SHAPE) reached the run: the log's config.<field> lines hold its value."""
    for key, value in settings.items():
        if key in ("OMP_NUM_THREADS",):   # the process's, not Config's
            continue
        logged = {"True": "1", "False": "0"}.get(log.config[key.lower()], log.config[key.lower()])   # a bool
        assert logged == value or (value != "" and float(logged) == float(value)), (key, logged, value)


def new_logs(work: Path, before: set[Path]) -> list[Path]:
    return sorted(set((work / "logs").glob("*.txt")) - before)


# ==================================================================================================
# Tests
# ==================================================================================================

def test_the_blocks_are_the_ones_tested():
    """Every ```bash block has a marker this file runs (or says why not); the settings of each are the ones this
    file knows; SHAPE adds only settings that no launch line sets; every substitution and prose command is found."""
    blocks = readme_blocks()
    assert set(blocks) == BLOCKS | set(NOT_RUN_HERE)
    for name in BLOCKS:
        assert settings_of(blocks[name]) == SETTINGS[name], name
        substitute(blocks[name], SUBSTITUTIONS[name], name)
    for name in ("sp1024-launch", "sp8192-launch", "frontier-launch", "records"):
        assert not set(shape_of(name)) & set(settings_of(blocks[name])), f"its shape overrides a setting of {name}"
    assert {c.split()[0] for name in BLOCKS for c in pip_commands(blocks[name])} <= {"install", "download"}
    for name in PROSE:
        prose_command(name)


@pytest.fixture(scope="module")
def cpu_minute(checkout):
    text, out = run_block(checkout, "cpu-minute", shape={})
    return text, read_run(checkout["work"] / "logs" / "cpu_try.txt")


def test_cpu_minute_downloads_one_shard_and_scores_exactly(cpu_minute, checkout):
    text, (log, result) = cpu_minute
    data = checkout["work"] / "data" / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in data.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert_config(log, settings_of(text))
    assert result["steps"] == int(settings_of(text)["ITERATIONS"])
    assert result["score_line"] == "final_document_lora_slot_exact"   # the default evaluation
    assert log.last("recurrence") and log.last("late_qat"), "the run crosses both switches"
    assert_exact_score(result, checkout, "sp1024", int(settings_of(text)["VAL_TOKENS"]))
    assert result["bytes_total"] <= pr.ARTIFACT_LIMIT_BYTES
    assert (checkout["work"] / "logs" / "cpu_try.pgz").stat().st_size == result["bytes_model"]


def test_rescoring_the_artifact_gives_the_same_exact_score(cpu_minute, checkout):
    """PHASES=eval reads logs/cpu_try.pgz back and, with the CPU minute's eval settings given again, scores it
    to the same bits as the run that wrote it."""
    text, (_, first) = cpu_minute
    eval_settings = {k: v for k, v in settings_of(text).items()
                     if k.startswith(("EVAL_", "VAL_", "SLOT_", "TTT_")) or k == "OMP_NUM_THREADS"}
    command = prose_command("rescore") + " " + " ".join(f"{k}={v}" for k, v in eval_settings.items()) + " python train_gpt.py"
    before = set((checkout["work"] / "logs").glob("*.txt"))
    run_bash(checkout, command)
    [path] = new_logs(checkout["work"], before)
    log = pr.read_log(path)
    assert log.config["phases"] == "eval" and log.error is None
    name, again = pr.score_line(log)
    assert name == first["score_line"]
    assert {k: again[k] for k in ("val_loss", "val_bpb", "scored_tokens", "scored_bytes")} == {
        "val_loss": f"{first['val_loss']:.8f}", "val_bpb": f"{first['val_bpb']:.8f}",
        "scored_tokens": str(first["scored_tokens"]), "scored_bytes": str(first["scored_bytes"])}


@pytest.mark.parametrize("name, variant, download", [("sp1024-launch", "sp1024", None),
                                                     ("sp8192-launch", "sp8192", "sp8192-download"),
                                                     ("frontier-launch", "sp8192_caseops", "caseops-download")])
def test_launch_line_trains_on_two_ranks_and_scores_the_whole_val_exactly(checkout, name, variant, download):
    before = set((checkout["work"] / "logs").glob("*.txt"))
    if download:   # "after ... `python data/download.py --variant ...`", the README says
        run_bash(checkout, prose_command(download))
    text, _ = run_block(checkout, name, shape=shape_of(name))
    [path] = new_logs(checkout["work"], before)
    log, result = read_run(path)
    assert log.device == "cpu x2" and log.config["vocab_size"] == str(EXPORTS[variant][1])
    folder = CASEOPS_NAME if variant.endswith("caseops") else f"fineweb10B_{variant}"
    assert log.config["data_path"] == f"./data/datasets/{folder}"
    assert_config(log, {**settings_of(text), **shape_of(name)})
    assert result["score_line"] == "final_document_lora_slot_exact"
    assert_exact_score(result, checkout, variant)
    assert result["bytes_total"] <= pr.ARTIFACT_LIMIT_BYTES
    assert (path.with_suffix(".pgz")).stat().st_size == result["bytes_model"]
    assert "rank_sync: identical weights" in log.raw
    if name == "frontier-launch":   # the loop's 15 passes on 9 layers, and both context switches of the schedule
        assert "passes:15 " in log.raw and log.last("recurrence")
        assert re.search(r"^seq_len:16 step:\d+", log.raw, re.M) and re.search(r"^seq_len:32 step:\d+", log.raw, re.M)


@pytest.fixture(scope="module")
def records(checkout, cpu_minute):
    """The records block (three seeds on 2 ranks, meta.json, the packager with its harness), then the summary-only
    command on the folder's own logs; in the checkout where the CPU minute downloaded the sp1024 data, with the
    notes.md that the block's --description names written first (the user's write-up)."""
    (checkout["work"] / "notes.md").write_text("## What is new\n\nA tiny model, trained by the README's test.\n")
    text, out = run_block(checkout, "records", shape=SHAPE)
    [folder] = (checkout["work"] / "records" / "track_10min_16mb").iterdir()
    run_bash(checkout, prose_command("summary-only"), FOLDER=str(folder))
    return folder, out


def test_records_block_writes_a_folder_the_packagers_checks_accept(records, checkout):
    folder, out = records
    assert folder.name.endswith("_My_Record") and f"wrote {folder.relative_to(checkout['work'])}" in out
    seeds = (1337, 42, 2025)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "requirements.txt", "submission.json", "train_gpt.py"] + [f"train_seed{s}.log" for s in seeds])
    logs, reasons = pr.load_logs([folder / f"train_seed{s}.log" for s in seeds], allow_non_record=True)
    assert reasons and reasons[0].startswith("ran on a CPU")
    assert pr.unwrap_source((folder / "train_gpt.py").read_text()) == logs[0].source
    sub = json.loads((folder / "submission.json").read_text())
    c = sub["compliance"]
    assert c["causality_harness"] == "passed" and f"{HARNESS_TESTS} passed" in c["causality_harness_detail"]
    assert c["artifact_under_16mb"] and sub["bytes_total"] <= pr.ARTIFACT_LIMIT_BYTES and c["world_size"] == 2
    assert sub["name"] == "My Record" and sub["github_id"] == "you" and sub["seeds"] == list(seeds)
    assert sub["comparison"]["against"] == "PR #1234" and sub["status"].startswith("NOT A RECORD")
    assert sub["val_bpb"] == pytest.approx(sum(pr.seed_result(log)["val_bpb"] for log in logs) / 3, abs=1e-12)
    for log in logs:
        assert_exact_score(pr.seed_result(log), checkout, "sp1024")
    refreshed = json.loads((checkout["work"] / "submission.json").read_text())
    assert sorted(refreshed["seeds"]) == sorted(sub["seeds"])      # the folder's logs, in the shell's glob order
    assert refreshed["val_bpb"] == pytest.approx(sub["val_bpb"], abs=1e-12)   # a mean in another order
    assert refreshed["bytes_total"] == sub["bytes_total"] and refreshed["status"] == sub["status"]
    assert refreshed["compliance"]["causality_harness"] == "skipped"


@pytest.fixture(scope="module")
def gpu_check(checkout, tmp_path_factory):
    """The two GPU-check blocks: prepare (a hand-made wheel stands for the downloaded ones), then the check."""
    proxy = tmp_path_factory.mktemp("proxy_data")
    for path, data in checkout["exports"]["sp1024"].items():
        if path.startswith("datasets/tokenizers/") or path.startswith("datasets/datasets/"):
            target = proxy / path.removeprefix("datasets/").replace("datasets/fineweb10B_sp1024", "fineweb_proxy_sp1024")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    write_wheel(checkout["work"] / ".whl")
    out = tmp_path_factory.mktemp("gpu_check_out")
    run_block(checkout, "gpu-check-prepare", shape={}, PROXY_DATA=str(proxy))
    run_block(checkout, "gpu-check", shape={}, OUT=str(out))
    return out


def test_gpu_check_runs_every_step_and_writes_the_summary(gpu_check):
    out = gpu_check
    # what comes back from the device machine: at most 8 files, none deeper than --out
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "hessian.json", "probe.json", "steps.log",
                                                      "summary.json", "train.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and list(summary["steps"]) == ["probe", "hessian", "bench", "train"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["steps"].values())
    for name in summary["steps"]:
        own = json.loads((out / f"{name}.json").read_text())
        assert own["step"] == summary["steps"][name] and own["result"] == summary[name]
    log = (out / "steps.log").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("===== ")] == ["wheels:", "probe", "hessian",
                                                                                          "bench", "train"]
    assert summary["wheels"]["rc"] == 0 and summary["wheels"]["modules"] == ["gpucheck_dummy"]

    p = summary["probe"]
    assert p["fa3_problem"] == "not a Hopper GPU" and p["device"] == "cpu" and p["compiled"] is False
    assert p["imports"]["brotli"]["ok"] and p["imports"]["zstandard"]["ok"] and p["imports"]["gpucheck_dummy"]["ok"]

    h = summary["hessian"]   # AUTOCAST=bf16 on the CPU: bf16 layer inputs, float32 Hessians, float64 reference
    assert h["amp"] == "bfloat16" and h["input_dtypes"]["bfloat16"] > 0 and h["hessian_dtypes"] == ["float32"]
    assert h["ok"] and h["max_rel_err"] < h["tolerance"] and h["head_rel_err"] < h["tolerance"]
    assert h["matrices"] == 2 * 6 + 2   # per layer q, k, v, out and the MLP's 2; the bigram and value-embedding projections
    detail = json.loads((out / "hessian.json").read_text())["detail"]
    assert "tok_emb.weight" in detail["rel_err"] and detail["input_dtype"]["blocks.1.mlp.proj.weight"] == "bfloat16"

    b = summary["bench"]
    assert b["complete"] and b["sections_done"] == ["train", "export", "eval"]
    assert set(b["train"]) == {"compile_warmup", "recur_cost_pct", "recur_off", "recur_on"}
    assert b["train"]["recur_off"]["passes"] == b["train"]["recur_on"]["passes"] - 1
    assert b["train"]["compile_warmup"]["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"]
    assert b["export"]["calib_s"] > 0 and set(b["eval"]) == {"sliding", "slot", "slot_ttt"}
    assert json.loads((out / "bench.json").read_text())["report"]["config"]["num_layers"] == 2
    # eager on a CPU, so no compile event to count: the counts exist for every part (zero by construction; counted on
    # compiled graphs in tests/test_compiled.py, and by where they happen in tests/test_gpu_check.py)
    assert b["recompiles_in_timed_steps"] == 0 and b["graph_breaks"] == 0

    t = summary["train"]
    assert t["steps"] > 0 and t["step_avg_ms"] > 0
    assert int(t["recurrence_on"]["step"]) > 0 and int(t["late_qat_on"]["step"]) > int(t["recurrence_on"]["step"])
    assert t["compile_warmup"]["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"] and t["compile_warmup"]["time_ms"] >= 0
    assert int(t["gptq_calib"]["calib_batches"]) > 0
    assert 0 < int(t["export"]["total_submission_bytes"]) <= pr.ARTIFACT_LIMIT_BYTES
    assert t["final"]["line"] == "final_document_lora_slot_exact" and int(t["final"]["budget_cuts"]) == 0   # the default
    assert t["plain"]["val_bpb"] and t["plain"]["scored_tokens"] == t["final"]["scored_tokens"]   # EVAL_COMPARE_PLAIN=1
    assert t["eval_done"]["eval_time"] and t["errors"] == []
    assert t["peak_memory_allocated"] is None    # logged on CUDA only
    assert t["recompiles"] == {"total": 0, "warmup": 0, "clock": 0, "eval": 0} and t["graph_breaks"] == 0
