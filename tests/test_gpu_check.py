"""tools/gpu_check.py, the prepared GPU call, run on a CPU with the tiny model: every step runs, every step's JSON and
the summary have the figures the README's GPU table needs, the carried wheels reach the steps, and a step that runs
out of time is killed and recorded."""
import base64
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, TINY_ENV

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import package_record  # noqa: E402

GPU_CHECK = ROOT / "tools" / "gpu_check.py"
# ITERATIONS left at its default: the wall clock ends the run, as on the GPU. LATE_QAT_FRAC 0.5: the 3 s run (2.5 s
# of training) also crosses the QAT switch, at 1.25 s, on a busy CPU too (the cap check stops a run up to two slow
# steps and 0.25 s early, before the default 10% would start).
TINY = " ".join(f"{k}={v}" for k, v in TINY_ENV.items() if k != "ITERATIONS") + " OMP_NUM_THREADS=1 SLOT_STEPS=2 LATE_QAT_FRAC=0.5"


def gpu_check_run(tiny_data, out, *args, timeout=300):
    data, tok = tiny_data
    return subprocess.run([sys.executable, str(GPU_CHECK), "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
                           "--set", TINY, *args], capture_output=True, text=True, timeout=timeout)


def test_gpu_check_runs_every_step_and_writes_the_summary(tiny_data, tmp_path):
    out = tmp_path / "out"
    r = gpu_check_run(tiny_data, out, "--train-seconds", "3", "--val-tokens", "400",
                      "--bench-args", "--steps 2 --warmup 1 --eval-tokens 400",
                      "--limits", "probe=60,hessian=60,bench=120,train=120")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
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
    assert [line.split()[1] for line in log.splitlines() if line.startswith("===== ")] == ["probe", "hessian", "bench", "train"]

    p = summary["probe"]
    assert p["fa3_problem"] == "not a Hopper GPU" and p["device"] == "cpu" and p["compiled"] is False
    assert p["imports"]["brotli"]["ok"] and p["imports"]["zstandard"]["ok"]

    h = summary["hessian"]   # AUTOCAST=bf16 on the CPU: bf16 layer inputs, float32 Hessians, float64 reference
    assert h["amp"] == "bfloat16" and h["input_dtypes"]["bfloat16"] > 0 and h["hessian_dtypes"] == ["float32"]
    assert h["ok"] and h["max_rel_err"] < 1e-5 and h["head_rel_err"] < 1e-5 and h["matrices"] == 20
    detail = json.loads((out / "hessian.json").read_text())["detail"]
    assert "tok_emb.weight" in detail["rel_err"] and detail["input_dtype"]["blocks.2.mlp.proj.weight"] == "bfloat16"

    b = summary["bench"]
    assert b["complete"] and b["sections_done"] == ["train", "export", "eval"]
    assert set(b["train"]) == {"compile_warmup", "recur_cost_pct", "recur_off", "recur_on"}
    assert b["train"]["recur_off"]["passes"] == b["train"]["recur_on"]["passes"] - 1
    assert b["train"]["compile_warmup"]["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"]
    assert b["export"]["calib_s"] > 0 and set(b["eval"]) == {"sliding", "slot", "slot_ttt"}
    assert json.loads((out / "bench.json").read_text())["report"]["config"]["num_layers"] == 3
    assert b["recompiles_in_timed_steps"] == 0 and b["graph_breaks"] == 0

    t = summary["train"]
    assert t["steps"] > 0 and t["step_avg_ms"] > 0
    assert int(t["recurrence_on"]["step"]) > 0 and int(t["late_qat_on"]["step"]) > int(t["recurrence_on"]["step"])
    assert t["compile_warmup"]["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"] and t["compile_warmup"]["time_ms"] >= 0
    assert int(t["gptq_calib"]["calib_batches"]) > 0 and int(t["export"]["total_submission_bytes"]) > 0
    assert t["final"]["line"] == "final_slot_ttt_exact" and int(t["final"]["ttt_chunks_trained"]) > 0   # the default eval
    assert t["plain"]["val_bpb"] and t["plain"]["scored_tokens"] == t["final"]["scored_tokens"]   # EVAL_COMPARE_PLAIN=1
    assert t["eval_done"]["eval_time"] and t["errors"] == []
    assert t["peak_memory_allocated"] is None    # logged on CUDA only
    assert t["graph_breaks"] == 0 and t["recompiles"] == {"total": 0, "warmup": 0, "clock": 0, "eval": 0}   # eager CPU
    assert t["recompile_limit_hits"] == 0


def write_wheel(folder, name="gpucheck_dummy", version="0.1"):
    """A pure-Python wheel written by hand (zip + dist-info with a RECORD of sha256 digests): no network, no build."""
    files = {f"{name}.py": f'__version__ = "{version}"\n',
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = lambda text: base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record = "".join(f"{path},sha256={digest(text)},{len(text.encode())}\n" for path, text in files.items())
    files[f"{name}-{version}.dist-info/RECORD"] = record + f"{name}-{version}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arc, text in files.items():
            z.writestr(arc, text)
    return path


def test_wheels_install_into_a_temporary_folder_that_the_steps_see(tiny_data, tmp_path):
    write_wheel(tmp_path / ".whl")
    out = tmp_path / "out"
    r = gpu_check_run(tiny_data, out, "--wheels", str(tmp_path / ".whl"), "--steps", "probe")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    w = summary["wheels"]
    assert w["rc"] == 0 and w["wheels"] == ["gpucheck_dummy-0.1-py3-none-any.whl"] and w["modules"] == ["gpucheck_dummy"]
    seen = summary["probe"]["imports"]["gpucheck_dummy"]
    assert seen["ok"] and seen["version"] == "0.1" and seen["file"].startswith(w["site"])
    assert not Path(w["site"]).exists(), "the temporary folder goes when the call ends"
    assert list(summary["steps"]) == ["probe"] and "--target" in (out / "steps.log").read_text()


def test_missing_wheels_are_recorded_and_the_steps_still_run(tiny_data, tmp_path):
    r = gpu_check_run(tiny_data, tmp_path / "out", "--wheels", str(tmp_path / "none"), "--steps", "probe")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "no *.whl" in summary["wheels"]["error"] and summary["steps"]["probe"]["rc"] == 0


def test_a_step_past_its_limit_is_killed_and_its_output_kept(tmp_path):
    """At its limit the step's whole process group goes (train_gpt.py's compile workers too); its output is kept."""
    log = tmp_path / "steps.log"
    cmd = [sys.executable, "-c", "import subprocess, sys, time; "
           "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "print('started', c.pid, flush=True); time.sleep(60)"]
    outcome, text = gpu_check.run_step("slow", cmd, {"PATH": "/usr/bin:/bin"}, 3.0, log)
    assert outcome["timed_out"] and outcome["rc"] is None and outcome["seconds"] < 30
    assert "started" in text and outcome["tail"][0].startswith("started")
    child = int(text.split()[-1])
    for _ in range(50):   # gone, or a zombie until whatever adopted it reaps it
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step")


def test_out_of_budget_steps_are_skipped_and_recorded(tiny_data, tmp_path):
    r = gpu_check_run(tiny_data, tmp_path / "out", "--budget", "5")
    assert r.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and all(s["rc"] is None and "budget" in s["skipped"] for s in summary["steps"].values())


def test_recompiles_are_counted_by_where_they_happen():
    text = "\n".join(["Recompiling function forward", "compile_warmup_time:10ms", "compile_warmup steps:3 states:a b c",
                      "x [__recompiles] Recompiling function forward", "Graph break in user code at x.py:1",
                      "train_done steps:5", "Recompiling function newton_schulz", "artifact_model params:1",
                      "Recompiling function hidden", "Recompiling function hidden", "eval_done eval_time:1ms"])
    c = gpu_check.compile_counts(text)
    assert c["graph_breaks"] == 1 and c["recompiles"] == {"total": 5, "warmup": 1, "clock": 1, "eval": 2}
    assert c["recompile_limit_hits"] == 0
    cut = gpu_check.compile_counts("Recompiling function forward\ncompile_warmup steps:1 states:a\nRecompiling function f\n")
    assert cut["recompiles"] == {"total": 2, "warmup": 1, "clock": 1, "eval": None}   # killed before train_done


def test_steps_and_bench_sections_can_be_skipped():
    base = ["--data", "d", "--tokenizer", "t", "--out", "o"]
    args = gpu_check.parse_args(base + ["--skip", "hessian,bench.eval", "--limits", "train=100"])
    assert args.run == ["probe", "bench", "train"] and args.sections == ["train", "export"]
    assert args.limits["train"] == 100 and args.limits["bench"] == gpu_check.LIMITS["bench"]
    assert sum(gpu_check.LIMITS.values()) < args.budget <= 8 * 60 - 30   # the call ends inside 8 minutes with a margin
    assert gpu_check.parse_args(base + ["--steps", "train"]).run == ["train"]
    for bad in (["--steps", "trian"], ["--skip", "bench.evel"], ["--limits", "probe=1,x=2"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(base + bad)


def test_our_settings_are_read_from_train_gpt_and_dropped_from_the_steps(monkeypatch):
    names = gpu_check.our_settings()
    assert {"RECUR_LAYERS", "COMPILE", "AUTOCAST", "VAL_TOKENS", "WARMDOWN_ITERS"} <= names
    monkeypatch.setenv("RECUR_LAYERS", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    env = gpu_check.base_env("SLOT_STEPS=2", "/tmp/site")
    assert "RECUR_LAYERS" not in env and "WORLD_SIZE" not in env and env["SOMETHING_ELSE"] == "kept"
    assert env["SLOT_STEPS"] == "2" and env["PYTHONPATH"].split(":")[0] == "/tmp/site"
    assert gpu_check.SCORE_LINES is package_record.SCORE_LINES
