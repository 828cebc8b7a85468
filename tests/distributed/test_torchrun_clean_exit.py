"""torchrun ranks end their process group before the interpreter exits, and a torchrun verb exits cleanly.

Left alive until interpreter exit, a gloo group's worker thread can drop its
last work item after finalisation has begun, and the rank aborts with
"terminate called without an active exception": rarely on idle cores, often
enough on busy ones. The first test checks the mechanism deterministically
(no gloo worker thread outlives ``process_group``); the second runs a real
``torchrun`` of ``effdl exflow run`` eight times against a CPU hog.
"""

import subprocess
import sys

from effdl.core.config import ModelConfig
from effdl.core.hf import save_checkpoint
from effdl.core.transformer import Transformer

RUNS = 8
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# One torchrun rank: a collective, then a late import of torch._dynamo (as a meta-device init or torch.compile
# does), whose torch.distributed modules bind the live group as a default argument; then the gloo worker
# threads still running once the group is ended.
RANK_SCRIPT = """
import os
import torch.distributed as dist
from effdl.distributed import process_group

with process_group() as (rank, world, device):
    gathered = [None] * world
    dist.all_gather_object(gathered, rank)
    import torch._dynamo
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {rank} gathered {gathered}, gloo threads left: {threads.count('pt_gloo_runloop')}")
"""


def test_process_group_joins_gloo_threads_before_exit(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        assert f"rank {rank} gathered [0, 1], gloo threads left: 0" in out.stdout, out.stdout


def test_exflow_run_under_torchrun_exits_cleanly_on_busy_cores(tmp_path):
    # The smallest run the verb allows: a 1-layer MoE, 2 requests of 4 tokens, 2 new tokens each.
    save_checkpoint(Transformer(ModelConfig.preset("moe-tiny", n_layers=1, max_seq_len=16)), tmp_path)
    cmd = [*TORCHRUN, "-m", "effdl.cli", "exflow", "run", "--model", str(tmp_path), "--requests", "2",
           "--prompt-len", "4", "--new-tokens", "2"]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=120) for _ in range(RUNS)]
    finally:
        hog.kill()
        hog.wait()
    unclean = [f"run {i}: exit {r.returncode}\n{r.stderr[-1500:]}" for i, r in enumerate(runs)
               if r.returncode != 0 or "terminate called" in r.stderr]
    assert not unclean, f"{len(unclean)} of {RUNS} runs did not end cleanly:\n" + "\n".join(unclean)
    assert all("coherent expert parallelism on 2 ranks" in r.stdout for r in runs)
