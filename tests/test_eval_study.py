"""tools/eval_study.py: variants side by side on one artifact (plain, SLOT, TTT, both), the illegal ones marked."""
import dataclasses
import json
import subprocess
import sys

import train_gpt as T
from helpers import ROOT, run_script, script_env


def test_study_runs_plain_slot_and_leaky_variants(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="s", PHASES="train,export")
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    env.update(ARTIFACT_PATH=str(tmp_path / "logs" / "s.pgz"))
    env.pop("PHASES")
    out = tmp_path / "study.json"
    cmd = [sys.executable, str(ROOT / "tools" / "eval_study.py"), "--tokens", "1500", "--out", str(out),
           "plain", "steps=2", "steps=2,bias=0,focal=4", "leaky_shared:steps=2", "leaky_scored:steps=2",
           "ttt:ttt_epochs=2,ttt_chunk_tokens=256,ttt_lr=0.01", "steps=2,ttt_epochs=1,ttt_chunk_tokens=256,ttt_momentum=0"]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    study = json.loads(out.read_text())
    assert study["meta"]["command"].startswith("eval_study.py --tokens 1500 --out ")   # how to rerun it
    rows = {row["variant"]: row for row in study["rows"]}
    assert list(rows)[:5] == ["plain", "steps=2", "steps=2,bias=0,focal=4", "leaky_shared:steps=2", "leaky_scored:steps=2"]
    assert [row["legal"] for row in rows.values()] == [True, True, True, False, False, True, True]
    assert all(row["tokens"] == 1499 for row in rows.values())
    assert rows["steps=2,bias=0,focal=4"]["slot"] == dataclasses.asdict(T.Slot(steps=2, focal=4, bias=False))
    ttt = rows["ttt:ttt_epochs=2,ttt_chunk_tokens=256,ttt_lr=0.01"]
    assert ttt["slot"] is None and ttt["ttt"] == dataclasses.asdict(T.Ttt(epochs=2, chunk_tokens=256, lr=0.01))
    assert rows["steps=2,ttt_epochs=1,ttt_chunk_tokens=256,ttt_momentum=0"]["ttt"]["momentum"] == 0
    assert len({row["val_bpb"] for row in rows.values()}) == 7   # every variant computed something different
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_study.py"), "stepz=2"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "'stepz' in 'stepz=2' is not a Slot field or ttt_<Ttt field> (did you mean steps?" in bad.stderr
    for args, fragment in ((["plain"], "already exists; pass another --out"),
                           (["--out", str(tmp_path / "new.json"), "--offset", "99999999", "plain"], "--offset 99999999 is outside"),
                           (["steps=two"], "steps='two' in 'steps=two' is not a valid int")):
        bad = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_study.py"), "--out", str(out)] + args, env=env,
                             cwd=tmp_path, capture_output=True, text=True)
        assert bad.returncode != 0 and fragment in bad.stderr, (args, bad.stderr[-1000:])
    assert not (tmp_path / "new.json").exists()
    env.pop("ARTIFACT_PATH")
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_study.py"), "plain"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: set ARTIFACT_PATH to the artifact to study (e.g. logs/<RUN_ID>.pgz)"
