"""train_gpt.main() with one of its functions made to raise an ordinary exception (not a RunError) on one rank, at
its N-th call: the entry point of the failure tests. FAIL_AT=<function>@<rank>@<call>, e.g. train_step@1@3."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

name, rank, call = os.environ.pop("FAIL_AT").split("@")
if int(os.environ.get("RANK", "0")) == int(rank):
    real, calls = getattr(T, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            print(f"INJECTED {time.time():.3f}", file=sys.stderr, flush=True)
            raise ValueError(f"injected failure in {name}")
        return real(*args, **kwargs)

    setattr(T, name, failing)
sys.exit(T.main())
