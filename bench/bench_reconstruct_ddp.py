"""The reconstruct stage on the same images with 2 DDP processes vs 1 (CPU, gloo), through the real
entry point: one run measures both and their ratio.

    pytest bench/bench_reconstruct_ddp.py --benchmark-only -s       (BENCH_IMAGES, BENCH_STEPS)

The one-process run gets both cores (SEEING_THREADS=2), each of the two processes one
(SEEING_THREADS=1), so the comparison is the same machine used two ways. Both start from the
shipped scenes GAN and hybrid encoder (variant f) on the same held-out scenes, and must give the
same per-image results (asserted to 1e-3: two threads in one process and one thread in each of two
sum in different orders, which 100 Adam steps amplify to ~2e-4 on a few images; with equal threads
the results are identical, see tests/test_distributed.py), so the ratio of wall times is what
sharding the images buys.
Wall times include each run's start-up (Python, Lightning, process group), which DDP pays twice.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(run_root: Path, processes: int, images: int, steps: int) -> float:
    args = [sys.executable, str(REPO / "train.py"), "stage=reconstruct", f"paths.run_root={run_root}",
            f"stage.targets.count={images}", f"stage.steps={steps}", "stage.batch_size=8", "logger=csv",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
            f"trainer.devices={processes}", f"trainer.strategy={'ddp' if processes > 1 else 'auto'}",
            "callbacks.checkpoint.every_n_train_steps=100000"]
    env = {**os.environ, "WANDB_MODE": "offline", "SEEING_THREADS": str(2 // processes)}
    start = time.perf_counter()
    done = subprocess.run(args, cwd=run_root.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    return seconds


def test_reconstruct_two_processes_vs_one(benchmark, tmp_path):
    from seeing.stages.reconstruct import load_result

    images, steps = int(os.environ.get("BENCH_IMAGES", 32)), int(os.environ.get("BENCH_STEPS", 100))
    times: dict[int, float] = {}

    def both():
        for processes in (1, 2):
            times[processes] = run(tmp_path / f"p{processes}", processes, images, steps)

    benchmark.pedantic(both, rounds=1, iterations=1)
    results = [load_result(tmp_path / f"p{p}" / "scenes_progan" / "reconstruct_real_f" / "reconstruction.pt")
               for p in (1, 2)]
    gap = float((results[0]["final_pixel_l1"] - results[1]["final_pixel_l1"]).abs().max())
    print(f"\nreconstruct, {images} scenes x {steps} steps (variant f, 2 CPU cores): 1 process {times[1]:.1f} s, "
          f"2 DDP processes {times[2]:.1f} s -> {times[1] / times[2]:.2f}x; largest per-image final pixel L1 "
          f"difference {gap:.1e}")
    # the same maths; only the float summation order differs (two threads in one process, one in each of two)
    assert gap < 1e-3
    assert torch.equal(results[1]["optimised_steps"], torch.full((images,), steps))
