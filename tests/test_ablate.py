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
               "--held-out", "300", "--held-out-offset", "500", "--jobs", "2", "QK_GAIN_INIT=5", "VE_LAYERS= GRAD_CLIP_NORM=0")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = work / "s.json"
    return r, json.loads(out.read_text()), out


def test_one_row_per_variant_with_paired_figures(study):
    r, doc, _ = study
    rows = doc["rows"]
    assert [row["variant"] for row in rows] == ["baseline", "QK_GAIN_INIT=5", "VE_LAYERS= GRAD_CLIP_NORM=0"]
    for row in rows:
        assert row["steps"] == 4 and len(row["train_losses"]) == 2          # TRAIN_LOG_EVERY=2
        assert row["val_bpb"] > 0 and row["val_bpb_held_out"] > 0 and row["model_bytes"] > 0 and row["ms_per_step"] > 0
    # the same data in the same order: step 2's loss is computed on the same batch, before the variants diverge much
    # (not equal: the variant changes the model), and the variant without value embeddings has fewer parameters
    assert rows[2]["params"] < rows[0]["params"] == rows[1]["params"]
    assert rows[1]["val_bpb"] != rows[0]["val_bpb"]
    assert doc["meta"]["steps"] == 4 and doc["meta"]["val_slices"] == [[0, 400], [500, 300]]
    assert "QK_GAIN_INIT=5" in r.stdout and "baseline" in r.stdout


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
