#!/bin/bash
# The paired CPU comparison (Task 2): one artifact, two slices of whole documents, every evaluation variant.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 DATA_PATH=/work/shared/data/fineweb_proxy_sp1024 \
  TOKENIZER_PATH=/work/shared/data/tokenizers/fineweb_1024_bpe.model LOG_DIR=/tmp/eval_budget_logs \
  EVAL_SEQ_LEN=256 EVAL_STRIDE=64 TTT_CHUNK_TOKENS=8192 LORA_BATCH=8 EVAL_BATCH_WINDOWS=8 PHASE_DOCS=12
PY=${PY:-/work/venv213/bin/python}
$PY tools/eval_pairs.py --artifact logs/eval_budget/run/eb_train.pgz --offset 0 --tokens 32768 \
  --out logs/eval_budget/pairs_tune.json
$PY tools/eval_pairs.py --artifact logs/eval_budget/run/eb_train.pgz --offset 262144 --tokens 32768 \
  --out logs/eval_budget/pairs_heldout.json
