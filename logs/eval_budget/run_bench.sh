#!/bin/bash
# CPU per-unit costs of every evaluation part on a model of the real width (512, 8 heads / 4 KV) with 2 layers and
# no recurrence, at windows of 512 (the real ones are 2048): tools/bench.py's eval section, stream and document modes.
set -e
cd "$(dirname "$0")/../.."
common="OMP_NUM_THREADS=1 LOG_DIR=/tmp/eval_budget_logs NUM_LAYERS=2 MODEL_DIM=512 NUM_HEADS=8 NUM_KV_HEADS=4 \
 RECUR_LAYERS= PARALLEL_START=0 EVAL_SEQ_LEN=512 EVAL_STRIDE=64 EVAL_BATCH_WINDOWS=8 LORA_BATCH=8 \
 TTT_CHUNK_TOKENS=2048 PHASE_TOKENS=1024"
PY=${PY:-/work/venv213/bin/python}
env $common DATA_PATH=/work/shared/data/fineweb_proxy_sp1024 \
  TOKENIZER_PATH=/work/shared/data/tokenizers/fineweb_1024_bpe.model MLP_MULT=3 VE_LAYERS=-1 \
  $PY tools/bench.py --sections eval --eval-tokens 6000 --eval-modes stream,documents \
  --out logs/eval_budget/bench_cpu_sp1024.json
env $common DATA_PATH=/work/shared/data/fineweb_proxy_sp8192 \
  TOKENIZER_PATH=/work/shared/data/tokenizers/fineweb_8192_bpe.model VOCAB_SIZE=8192 MLP_MULT=4 \
  BIGRAM_VOCAB_SIZE=0 VE_LAYERS= \
  $PY tools/bench.py --sections eval --eval-tokens 4000 --eval-modes stream,documents \
  --out logs/eval_budget/bench_cpu_sp8192.json
