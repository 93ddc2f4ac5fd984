"""Batched per-image delta optimisation vs the one-image-at-a-time loop of the paper's code.

CPU (pytest-benchmark, one run measures both and their ratio):

    pytest bench/bench_reconstruct.py --benchmark-only -s          (BENCH_THREADS=2: two threads)

    * batched: the ``stage=reconstruct`` LightningModule (:class:`Reconstructor`), all
      images in one batch;
    * one at a time: a plain PyTorch loop per image (batch 1, float32), as the paper's
      code runs it: the same corrections, loss, Adam and schedule.

    Both run the same number of steps per image and must reach the same per-image final
    loss (the batched run is the same maths; the test asserts it), so the ratio of wall
    times is the speed-up of batching alone. A small model: a ProGAN at 64x64 with the
    embedded scenes model's widths [128, 64, 32, 16, 8] (random weights).

GPU (``bench/gpu.sh``): ``python bench/bench_reconstruct.py --device cuda ...`` runs the same
comparison at 256x256 with the full ProGAN widths, the batched side in bf16 autocast,
channels-last and optionally ``torch.compile``, the loop side as the paper's (fp32, batch 1)
on a few images, and reports images x steps per second for each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from seeing.gans import ProGANGenerator
from seeing.stages.reconstruct import correction_positions, render, step_milestones
from seeing.reconstruct.losses import ReconstructionLoss

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def make_problem(resolution: int, widths, z_dim: int, n: int, seed: int = 0, device="cpu"):
    """A random ProGAN, ``n`` targets it can nearly draw (its samples, perturbed), starts z0."""
    torch.manual_seed(seed)
    g = ProGANGenerator(z_dim, widths).eval().requires_grad_(False).to(device)
    assert g.resolution == resolution, (g.resolution, resolution)
    with torch.no_grad():
        x = (g(g.sample_z(n, seed=1, device=device)) + 0.1 * torch.randn(n, 3, resolution, resolution,
                                                                         device=device)).clamp(-1, 1)
    z0 = g.sample_z(n, seed=2, device=device)
    return g, x, z0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def loop_one_image(g, target, z0, positions, steps, lr=0.01, milestones=(0.5, 0.75), loss=None):
    """The paper-style loop for one image (batch 1, float32): returns its final loss."""
    loss = loss or ReconstructionLoss()
    with torch.no_grad():
        _, feats = render(g, z0, {}, record=positions)
    deltas = {p: torch.zeros_like(feats[p], requires_grad=True) for p in positions}
    opt = torch.optim.Adam(deltas.values(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(milestones, steps), 0.1)
    for _ in range(steps):
        image, _ = render(g, z0, deltas)
        value = loss(image, target, deltas).sum()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
    return float(value.detach())


def loop_batched(g, targets, z0, positions, steps, lr=0.01, milestones=(0.5, 0.75), loss=None,
                 autocast_dtype=None, compiled=None):
    """The same optimisation for a whole batch in plain PyTorch (the GPU script's batched side):
    returns the per-image losses of the last step."""
    loss = loss or ReconstructionLoss()
    with torch.no_grad():
        _, feats = render(g, z0, {}, record=positions)
    deltas = {p: torch.zeros_like(feats[p], requires_grad=True) for p in positions}
    opt = torch.optim.Adam(deltas.values(), lr=lr, fused=targets.is_cuda)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(milestones, steps), 0.1)
    run = compiled or (lambda d: render(g, z0, d)[0])
    for _ in range(steps):
        with torch.autocast(targets.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            image = run(deltas)
        per_image = loss(image.float(), targets, deltas)
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()
        opt.step()
        sched.step()
    return per_image.detach()


# ------------------------------------------------------------------ CPU benchmark (pytest)
def test_batched_vs_one_at_a_time_cpu(benchmark):
    import pytorch_lightning as pl

    from seeing.stages.reconstruct import Reconstructor

    threads = int(os.environ.get("BENCH_THREADS", "1"))  # a shared machine: one core gives repeatable numbers
    torch.set_num_threads(threads)
    n, steps = 16, 40
    g, x, z0 = make_problem(64, [128, 64, 32, 16, 8], 128, n)
    positions = correction_positions("deltas", LAYERS)

    def batched():
        module = Reconstructor(g, x, z0, positions, steps=steps, batch_size=n)
        pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1).fit(module)
        return module.loss_curves[:, -1].clone()

    batched_losses = []
    benchmark.pedantic(lambda: batched_losses.append(batched()), rounds=3, iterations=1, warmup_rounds=0)
    batched_s = statistics.median(benchmark.stats.stats.data)

    loop_times, loop_losses = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        loop_losses = torch.tensor([loop_one_image(g, x[i:i + 1], z0[i:i + 1], positions, steps) for i in range(n)])
        loop_times.append(time.perf_counter() - t0)
    loop_s = statistics.median(loop_times)

    # same maths: every image ends at the same loss either way (to float noise: batched and batch-1
    # convolutions sum in different orders, and Adam on an L1 loss amplifies that a little)
    assert torch.allclose(batched_losses[-1], loop_losses, rtol=2e-2), (batched_losses[-1], loop_losses)
    assert abs(float(batched_losses[-1].mean() - loop_losses.mean())) <= 2e-3 * float(loop_losses.mean())
    ratio = loop_s / batched_s
    benchmark.extra_info.update({"images": n, "steps": steps, "resolution": 64, "threads": threads,
                                 "batched_s": round(batched_s, 3), "one_at_a_time_s": round(loop_s, 3),
                                 "speedup": round(ratio, 2),
                                 "mean_final_loss": round(float(loop_losses.mean()), 5)})
    print(f"\nreconstruct, {n} images x {steps} steps, 64px ProGAN, CPU {threads} thread(s): batched (Lightning stage) "
          f"{batched_s:.2f}s vs one at a time (batch 1 fp32 loop) {loop_s:.2f}s -> {ratio:.1f}x; "
          f"mean final loss {float(loop_losses.mean()):.5f} both ways (max diff "
          f"{float((batched_losses[-1] - loop_losses).abs().max()):.2e})")


# ------------------------------------------------------------------ GPU script (bench/gpu.sh)
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--loop-images", type=int, default=4, help="images the batch-1 fp32 loop runs (timed per image)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    widths = {256: [512, 512, 512, 512, 256, 128, 64], 64: [128, 64, 32, 16, 8]}[args.resolution]
    z_dim = 512 if args.resolution == 256 else 128
    g, x, z0 = make_problem(args.resolution, widths, z_dim, args.batch, device=args.device)
    positions = correction_positions("deltas", LAYERS)
    torch.backends.cudnn.benchmark = True
    if args.channels_last:
        g = g.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = None
    if args.compile:
        compiled = torch.compile(lambda d: render(g, z0, d)[0])
    dtype = torch.bfloat16 if args.bf16 else None

    loop_batched(g, x, z0, positions, 3, autocast_dtype=dtype, compiled=compiled)  # warm-up / compile
    sync(args.device)
    t0 = time.perf_counter()
    batched_losses = loop_batched(g, x, z0, positions, args.steps, autocast_dtype=dtype, compiled=compiled)
    sync(args.device)
    batched_s = time.perf_counter() - t0

    k = min(args.loop_images, args.batch)
    g32 = g.to(memory_format=torch.contiguous_format)
    loop_one_image(g32, x[:1].contiguous(), z0[:1], positions, 3)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    loop_losses = torch.tensor([loop_one_image(g32, x[i:i + 1].contiguous(), z0[i:i + 1], positions, args.steps)
                                for i in range(k)])
    sync(args.device)
    loop_s = time.perf_counter() - t0

    batched_rate = args.batch * args.steps / batched_s
    loop_rate = k * args.steps / loop_s
    rel = (batched_losses[:k].cpu() - loop_losses).abs() / loop_losses.abs().clamp(min=1e-8)
    print(f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"{args.resolution}px ProGAN (random weights), {args.steps} steps")
    print(f"batched: batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{'channels-last' if args.channels_last else 'contiguous'}, {'compiled' if args.compile else 'eager'}: "
          f"{batched_rate:.1f} image-steps/s ({batched_s:.2f}s)")
    print(f"one at a time (batch 1, fp32): {loop_rate:.1f} image-steps/s ({loop_s:.2f}s for {k} images)")
    print(f"speed-up {batched_rate / loop_rate:.1f}x; final loss of the shared images: batched "
          f"{batched_losses[:k].mean():.5f} vs loop {loop_losses.mean():.5f} (max relative diff {rel.max():.3%})")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
