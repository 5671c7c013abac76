"""tools/ablate.py end to end on the tiny data: paired runs, one row each, the JSON, and its refusals."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT, TINY_ENV

ABLATE = ROOT / "tools" / "ablate.py"
# the tiny model on the tiny data; the eval slices must fit its short val stream
TINY_BASE = " ".join(f"{k}={v}" for k, v in TINY_ENV.items())


def ablate(tiny_data, tmp_path, *args):
    data, tok = tiny_data
    env = {"PATH": "/usr/bin:/bin", "DATA_PATH": str(data), "TOKENIZER_PATH": str(tok), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ABLATE), "--base", TINY_BASE, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("ablate")
    r = ablate(tiny_data, work, "--out-dir", str(work), "--name", "s", "--steps", "4", "--val-tokens", "400",
               "--held-out", "300", "--held-out-offset", "500", "--jobs", "2", "QK_GAIN_INIT=4", "VE_LAYERS= GRAD_CLIP_NORM=0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = work / "s.json"
    return r, json.loads(out.read_text()), out


def test_one_row_per_variant_with_paired_figures(study):
    r, doc, _ = study
    rows = doc["rows"]
    assert [row["variant"] for row in rows] == ["baseline", "QK_GAIN_INIT=4", "VE_LAYERS= GRAD_CLIP_NORM=0"]
    for row in rows:
        assert row["steps"] == 4 and len(row["train_losses"]) == 2          # TRAIN_LOG_EVERY=2
        assert row["val_bpb"] > 0 and row["val_bpb_held_out"] > 0 and row["model_bytes"] > 0 and row["ms_per_step"] > 0
    # the same data in the same order: step 2's loss is computed on the same batch, before the variants diverge much
    # (not equal: the variant changes the model), and the variant without value embeddings has fewer parameters
    assert rows[2]["params"] < rows[0]["params"] == rows[1]["params"]
    assert rows[1]["val_bpb"] != rows[0]["val_bpb"]
    assert doc["meta"]["steps"] == 4 and doc["meta"]["val_slices"] == [[0, 400], [500, 300]]
    assert "QK_GAIN_INIT=4" in r.stdout and "baseline" in r.stdout
    # tokens per parameter beside every result: 4 steps x 512 tokens over the run's parameters
    for row in rows:
        assert row["tokens_per_param"] == pytest.approx(4 * 512 / row["params"])
    assert "tok/param" in r.stdout and "190" in r.stdout


def test_baseline_is_reproducible(study, tiny_data, tmp_path):
    """Same seed, same data, same steps: a second baseline run gives the same numbers (what makes pairing work)."""
    _, doc, _ = study
    r = ablate(tiny_data, tmp_path, "--out-dir", str(tmp_path), "--name", "again", "--steps", "4", "--val-tokens", "400",
               "--held-out", "300", "--held-out-offset", "500")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())["rows"][0]
    first = doc["rows"][0]
    assert again["train_losses"] == first["train_losses"] and again["val_bpb"] == first["val_bpb"]


@pytest.mark.parametrize("variant, fragment", [
    ("QK_GAIN_INT=5", "did you mean QK_GAIN_INIT?"),
    ("SEED=3", "set by the tool"),
    ("QK_GAIN_INIT", "is not SETTING=value"),
    ("TTT_RESET=sideways", "TTT_RESET='sideways' must be never or document"),
])
def test_bad_variants_are_refused_before_any_run(tiny_data, tmp_path, variant, fragment):
    r = ablate(tiny_data, tmp_path, "--out-dir", str(tmp_path), "--name", "bad", variant)
    assert r.returncode == 1 and fragment in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


def test_existing_study_is_never_overwritten(study, tiny_data, tmp_path):
    _, _, out = study
    r = ablate(tiny_data, tmp_path, "--out-dir", str(out.parent), "--name", out.stem, "QK_GAIN_INIT=5")
    assert r.returncode == 1 and "already exists" in r.stderr


def test_seconds_mode_gives_every_run_the_same_clock(tiny_data, tmp_path):
    r = ablate(tiny_data, tmp_path, "--out-dir", str(tmp_path), "--name", "t", "--seconds", "1.5", "--val-tokens", "400",
               "--held-out", "0", "--jobs", "2", "RECUR_LAYERS=")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["meta"]["seconds"] == 1.5 and [row["settings"]["MAX_WALLCLOCK_SECONDS"] for row in doc["rows"]] == ["1.5", "1.5"]
    for row in doc["rows"]:
        assert 1 < row["steps"] < 1_000_000 and row["train_time_ms"] <= 1500 + 3 * row["ms_per_step"]
        assert row["val_bpb_held_out"] is None


def test_val_docs_compares_two_tokenizations_on_the_same_documents(tiny_data, tmp_path):
    """--val-docs: the slices are whole documents, so a variant may train and score another tokenization of the same
    text (the sp1024-vs-sp8192 comparison); without it a variant's DATA_PATH is refused."""
    from helpers import encode_documents, make_documents, train_tokenizer, write_shard
    data, _ = tiny_data
    tok = train_tokenizer(tmp_path / "tok400", make_documents(400, seed=1), vocab_size=400)
    other = tmp_path / "data400"
    for name, seed, n in (("train_000000", 2, 600), ("val_000000", 3, 120)):
        write_shard(other / f"fineweb_{name}.bin", encode_documents(tok, make_documents(n, seed=seed)))
    variant = f"DATA_PATH={other} TOKENIZER_PATH={tok} VOCAB_SIZE=400"
    r = ablate(tiny_data, tmp_path, "--out-dir", str(tmp_path), "--name", "refused", variant)
    assert r.returncode == 1 and "set by the tool" in r.stderr
    r = ablate(tiny_data, tmp_path, "--out-dir", str(tmp_path), "--name", "docs", "--val-docs", "--steps", "2",
               "--val-tokens", "10", "--held-out", "10", "--held-out-offset", "20", variant)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "docs.json").read_text())
    assert doc["meta"]["val_docs"] and doc["rows"][1]["params"] > doc["rows"][0]["params"]   # 400 > 320 pieces
    assert all(row["val_bpb"] > 0 and row["val_bpb_held_out"] > 0 for row in doc["rows"])
