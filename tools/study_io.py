"""What the study tools (ablate.py, quant_study.py, eval_study.py) share: how a study's JSON is written (atomically,
never over an existing study) and how a tool exits (one error line and exit code 1 for bad input)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def save_study(path: Path, meta: dict, rows: list[dict]) -> int:
    T.write_atomic(path, json.dumps(dict(meta=meta, rows=rows), indent=1).encode(), replace=False)
    print(f"wrote {path}")
    return 0


def run_tool(main) -> None:
    try:
        sys.exit(main())
    except T.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
