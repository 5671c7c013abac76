"""tools/gpu_check.py, the prepared GPU call, run on a CPU with the tiny model: every step runs and the summary has
the figures the README's GPU table needs."""
import json
import subprocess
import sys

from helpers import ROOT, TINY_ENV


def test_gpu_check_runs_every_step_and_writes_the_summary(tiny_data, tmp_path):
    data, tok = tiny_data
    tiny = " ".join(f"{k}={v}" for k, v in TINY_ENV.items() if k not in ("ITERATIONS",))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--data", str(data), "--tokenizer", str(tok),
                        "--out", str(tmp_path / "out"), "--set", tiny + " OMP_NUM_THREADS=1 SLOT_STEPS=2",
                        "--train-seconds", "2", "--val-tokens", "400", "--bench-args", "--steps 2 --warmup 1 --eval-tokens 400",
                        "--limits", "60,200,200"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all(s["rc"] == 0 for s in summary["steps"].values())
    assert summary["probe"]["fa3_problem"] == "not a Hopper GPU" and summary["probe"]["device"] == "cpu"
    assert set(summary["bench"]["train"]) == {"recur", "no_recur"} and summary["bench"]["export"]["calib_s"] > 0
    t = summary["train"]
    assert int(t["train_done"]["steps"]) > 0 and t["gptq_calib"]["calib_batches"] and t["final"]["val_bpb"]
    assert t["final"]["line"] == "final_slot_ttt_exact" and int(t["final"]["ttt_chunks_trained"]) > 0   # the default eval
    assert t["prequant"]["val_bpb"] and int(t["export"]["total_submission_bytes"]) > 0
    assert t["graph_breaks"] == 0 and t["recompiles"] == 0      # nothing compiles on a CPU
