"""A data-parallel evaluation whose rank 1 is SIGKILLed right after its first batch reaches its shard
(for tests/test_eval_parallel.py; run under torchrun, which then stops rank 0 wherever it is).

    torchrun --nproc_per_node 2 tests/eval_kill_script.py MODEL BENCHMARK OUT [key=value ...]
"""

import os
import signal
import sys

from ihgrpo.config import load_eval_config
from ihgrpo.eval import run_eval


def kill_rank_1(bench, records):  # noqa: ARG001
    if int(os.environ["RANK"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    model, bench, out, *items = sys.argv[1:]
    cfg = load_eval_config(None, [f"model={model}", *items])
    run_eval(cfg, out, benchmarks=[bench], on_batch=kill_rank_1, progress=False)
    sys.exit(3)  # rank 0 never gets here: it waits for rank 1 until torchrun stops it
