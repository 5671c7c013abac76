"""tools/eval_budget.py: its counts of work follow train_gpt.py's own code (windows, document balance, chunk widths,
phase steps), and its projection keeps the larger of the FLOP and the memory time."""
import sys

import numpy as np
import pytest

import train_gpt as tg
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import eval_budget as eb  # noqa: E402


def test_assign_documents_fast_is_the_scripts_assignment():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3000, size=300)
    geo = tg.Geometry()
    for world in (1, 3, 8):
        fast = eb.assign_documents_fast(lengths, world, geo)
        slow = tg.assign_documents(lengths, world, geo)
        assert all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_stream_windows_match_build_windows():
    for n, seq, stride in ((5000, 256, 64), (2049, 2048, 64), (100_000, 2048, 64)):
        geo = tg.Geometry(seq_len=seq, stride=stride)
        w = eb.stream_work(n, geo)
        assert w["windows"] == len(tg.build_windows(n, seq, stride))
        assert w["fwd_cols"] == w["windows"] * seq


def test_document_forward_columns_are_evaluate_documents_units():
    """evaluate_documents' own count of a rank's units (rows x width of each chunk of each batch's first, longest
    row) equals the forward columns counted here, for every rank, with and without phases."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 2500, size=200)
    geo = tg.Geometry(seq_len=512, stride=64)
    for rows, world, phases in ((8, 1, None), (16, 4, None), (8, 2, tg.Phases(docs=80, count=2))):
        groups = tg.document_groups(len(lengths), phases)
        plan = [[g0 + a for a in tg.assign_documents(lengths[g0:g1], world, geo)] for g0, g1 in groups]
        units = [sum(rows * tg.doc_width(min(int(lengths[b[0]]), (c + 1) * geo.stride), geo)
                     for g in plan for b in [g[r][i:i + rows] for i in range(0, len(g[r]), rows)]
                     for c in range(-(-int(lengths[b[0]]) // geo.stride))) for r in range(world)]
        w = eb.document_work(lengths, geo, rows, world, phases)
        if len(groups) == 1:   # one group: the slowest rank is the critical path
            assert w["slowest_rank"]["fwd_cols"] == max(units)
        assert w["slowest_rank"]["fwd_cols"] >= max(units)
        assert w["mean_rank"]["fwd_cols"] * world == pytest.approx(sum(units))
        if phases:
            steps = 0    # phase_train after each group but the last, over that group's documents
            for g0, g1 in groups[:-1]:
                spans = np.stack([np.zeros(g1 - g0, dtype=np.int64), lengths[g0:g1]]).T
                steps += -(-len(tg.phase_rows(None, spans, geo.seq_len)) // (phases.tokens // geo.seq_len))
            assert w["phase_steps"] == steps
            assert w["phase_row_tokens_per_rank"] == w["phase_steps"] * tg.PHASE_ROWS * geo.seq_len


def test_batch_work_one_short_document():
    """One document of 100 targets, stride 64, rows 2: chunk 0 (targets 1-64) has no context, width 256; chunk 1
    has 64 context columns; the LoRA trains after chunk 0 only; the head scores 64 then 36 columns per row."""
    geo = tg.Geometry(seq_len=2048, stride=64)
    w = eb.batch_work(np.array([100]), geo, 2)
    assert w == {"fwd_cols": 2 * 256 * 2, "slot_cols": 2 * 64, "head_cols": 2 * (64 + 36), "lora_cols": 2 * 256,
                 "attn_cols": 2 * 2 * 256 * 256, "chunks": 2}


def test_full_lengths_reach_the_full_count():
    lengths = np.array([5, 100, 37, 2000, 1])
    full = eb.full_lengths(lengths, 1_000_000)
    assert 1_000_000 - 2000 <= full.sum() <= 1_000_000
    assert set(np.unique(full)) <= set(lengths.tolist())


def test_projection_keeps_the_larger_time():
    hw = eb.Hardware()
    s = eb.seconds(1e12, 1e9, 1e12, hw)
    assert s["s"] == s["s_flop"] == 1.0 and s["bound"] == "flop"
    s = eb.seconds(1e9, 1e13, 1e12, hw)
    assert s["s"] == s["s_bytes"] == pytest.approx(1e13 / (hw.hbm * hw.hbm_eff)) and s["bound"] == "memory"


def test_default_model_shape_and_stream_projection():
    shape = eb.model_shape(1024)
    assert shape["passes"] == 13 and shape["d"] == 512 and 30e6 < shape["body_weights"] < 32e6
    work = eb.stream_work(eb.FULL_VAL_TOKENS[1024], tg.Geometry())
    assert work["windows"] == 969_061
    parts = eb.project(shape, work, "stream", eb.Hardware(), 8, 0, 3)
    assert set(parts) == {"scoring", "slot", "ttt"} and all(p["s"] > 0 for p in parts.values())
    # SLOT-4 costs half of SLOT-8; no SLOT, no part
    half = eb.project(shape, work, "stream", eb.Hardware(), 4, 0, 0)
    assert half["slot"]["s"] == pytest.approx(parts["slot"]["s"] / 2) and "ttt" not in half


def test_the_frontier_projection_is_the_readmes_frontier_line():
    """FRONTIER_MODEL and FRONTIER_EVAL are the README's frontier line (so the projection cannot drift from it), and
    its model runs the loop's 17 passes."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- frontier-launch -->\n```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    line = dict(w.split("=", 1) for w in block.split() if "=" in w and w[0].isupper())
    assert all(line[k] == v for k, v in eb.FRONTIER_MODEL.items())
    e = eb.FRONTIER_EVAL
    assert (line["EVAL_SEQ_LEN"], line["EVAL_STRIDE"], line["LORA_RANK"], line["PHASE_DOCS"]) == \
        (str(e["seq_len"]), str(e["stride"]), str(e["lora_rank"]), str(e["phase_docs"]))
    assert line.get("LORA_BATCH", str(tg.Config.lora_batch)) == str(e["lora_batch"])
    assert line.get("PHASE_COUNT", str(tg.Config.phase_count)) == "1"
    assert eb.model_shape(8192, base=eb.FRONTIER_MODEL)["passes"] == 17
