"""tools/quant_study.py on the tiny data: one training, cached, then variants with their errors, bytes and bpb."""
import json
import subprocess
import sys

from helpers import ROOT, script_env


def test_quant_study_rows_and_cache(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs")
    cmd = [sys.executable, str(ROOT / "tools" / "quant_study.py"), "--out-dir", str(tmp_path), "--cache", str(tmp_path / "m.pt"),
           "--val-tokens", "400", "--held-out", "300", "--held-out-offset", "500", "--held-batches", "2",
           "quantizer=rtn,int6_clip_k=0", "quantizer=gptq", "quantizer=gptq,int6_clip_k=12.85"]
    r = subprocess.run(cmd + ["--name", "a", "--artifact", str(tmp_path / "a.pgz")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import train_gpt as T
    model_cfg, state = T.read_artifact(tmp_path / "a.pgz")         # a real artifact of the configured export
    assert model_cfg["num_layers"] == 3 and state
    assert "train_done" in r.stdout
    doc = json.loads((tmp_path / "a.json").read_text())
    rows = {row["variant"]: row for row in doc["rows"]}
    assert len(rows) == 3 and len(doc["meta"]["prequant_bpb"]) == 2
    assert rows["quantizer=gptq"]["median_vs_rtn"] < 1.0 and rows["quantizer=rtn,int6_clip_k=0"]["median_vs_rtn"] == 1.0
    assert rows["quantizer=gptq,int6_clip_k=12.85"]["bytes"] < rows["quantizer=gptq"]["bytes"]
    assert all(len(row["gap"]) == 2 and row["errors"] for row in rows.values())
    again = subprocess.run(cmd + ["--name", "b"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train_done" not in again.stdout, "the cached model is reused, not retrained"
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["val_bpb"] == rows["quantizer=gptq"]["val_bpb"]


def test_full_model_projection_counts_every_stored_weight():
    """--project: the weights of a full configuration per storage kind, built on the meta device; at measured bits
    per weight they give the model bytes. #1394's sp8192 model: 31,719,424 int6 and 4,194,304 int8 weights."""
    sys.path.insert(0, str(ROOT / "tools"))
    import quant_study as Q
    import train_gpt as T
    counts = Q.storage_counts("VOCAB_SIZE=8192 MLP_MULT=4 BIGRAM_VOCAB_SIZE=0 VE_LAYERS=")
    assert (counts["int6"], counts["int8"]) == (31_719_424, 4_194_304)
    default = Q.storage_counts("")
    model = T.GPT(T.Config())
    assert sum(default[k] for k in ("int6", "int8", "fp16", "fp32")) == sum(p.numel() for p in model.parameters())
    projected = Q.projected_bytes(counts, 4.0, 5.0)
    assert projected == (31_719_424 * 4 + 4_194_304 * 5) // 8 + 2 * counts["rows"] + 2 * counts["fp16"] + 4 * counts["fp32"]
