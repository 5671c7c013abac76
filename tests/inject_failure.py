"""train_gpt.main() with one of its functions made to fail on one rank at its N-th call: the entry point of the
failure tests. FAIL_AT=<function>@<rank>@<call>[@hang], e.g. train_step@1@3: an ordinary exception (not a
RunError); with @hang the call blocks instead, without an exception and outside any collective. SLOW_AT=<function>:
<seconds>[@<rank>] makes every call of a function sleep first, on every rank or on the one named."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

slow_name, slow_spec = os.environ.pop("SLOW_AT", "none:0").split(":")
seconds, _, slow_rank = slow_spec.partition("@")
if slow_name != "none" and (not slow_rank or int(slow_rank) == int(os.environ.get("RANK", "0"))):   # a slow device
    slow_real = getattr(T, slow_name)

    def slow(*args, **kwargs):
        time.sleep(float(seconds))
        return slow_real(*args, **kwargs)

    setattr(T, slow_name, slow)
name, rank, call, *mode = os.environ.pop("FAIL_AT", "none@-1@0").split("@")
if int(os.environ.get("RANK", "0")) == int(rank):
    real, calls = getattr(T, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            print(f"INJECTED {time.time():.3f}", file=sys.stderr, flush=True)
            if mode == ["hang"]:
                time.sleep(3600)
            raise ValueError(f"injected failure in {name}")
        return real(*args, **kwargs)

    setattr(T, name, failing)
sys.exit(T.main())
