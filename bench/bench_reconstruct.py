"""Batched per-image delta optimisation vs the one-image-at-a-time loop of the paper's code.

CPU (pytest-benchmark, one run measures both and their ratio):

    pytest bench/bench_reconstruct.py --benchmark-only -s          (BENCH_THREADS=2: two threads)

    * batched: the ``stage=reconstruct`` LightningModule (:class:`Reconstructor`), all
      images in one batch;
    * one at a time: the reference's loop (``optimize_residuals.py`` of davidbau/ganseeing),
      written out here in plain PyTorch, one image at a time (batch 1, float32): corrections
      at layers 1..n-1, loss pixel L1 + L1 of VGG-16 relu4_2 features of the raw [-1, 1]
      image + sum_l mean(delta_l^2), all weighted 1; Adam 0.01, x0.5 after 800, 1200 and
      1800 of 3000 steps.

    Both sides use that paper recipe (conf/recipe/paper.yaml; the batched side through the
    project's ReconstructionLoss with perceptual=vgg, perceptual_input=raw, delta_weight=1).
    The CPU run takes fewer steps than 3000, so the milestones are scaled with the steps
    (800/3000, 1200/3000, 1800/3000 of them: at 3000 steps exactly 800, 1200, 1800). VGG-16
    has random weights in torchvision's layout unless ``BENCH_VGG`` / ``--vgg-path`` names
    torchvision's ``vgg16-397923af.pth``. Both run the same number of steps per image and
    must reach the same per-image final loss (the batched run is the same maths; the test
    asserts it), so the ratio of wall times is the speed-up of batching alone. A small
    model: a ProGAN at 64x64 with the embedded scenes model's widths [128, 64, 32, 16, 8]
    (random weights).

GPU (``bench/gpu.sh``): ``python bench/bench_reconstruct.py --device cuda ...`` runs the same
comparison at 256x256 with the full ProGAN widths, the batched side in bf16 autocast,
channels-last and optionally ``torch.compile``, the loop side as the paper's (fp32, batch 1)
on a few images, and reports images x steps per second for each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seeing.gans import ProGANGenerator
from seeing.stages.reconstruct import correction_positions, render, step_milestones
from seeing.reconstruct.losses import RELU4_2, ReconstructionLoss, load_vgg16_trunk

LAYERS = ["layer1", "layer2", "layer3", "layer4"]

# The paper's reconstruct recipe (conf/recipe/paper.yaml, optimize_residuals.py): Adam 0.01, x0.5 after
# 800, 1200 and 1800 of 3000 steps; here as fractions of the steps run, so shorter runs scale them.
PAPER_LR, PAPER_GAMMA, PAPER_STEPS = 0.01, 0.5, 3000
PAPER_MILESTONES = tuple(m / PAPER_STEPS for m in (800, 1200, 1800))


def vgg_file(path: str | None = None) -> Path:
    """``path`` (torchvision's vgg16-397923af.pth), or random VGG-16 trunk weights in torchvision's
    layout written to a temporary file."""
    if path:
        return Path(path)
    from torchvision.models import vgg16

    with torch.device("meta"):
        trunk = vgg16(weights=None).features[:RELU4_2]
    trunk = trunk.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1)
    for m in trunk.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.01
    out = Path(tempfile.mkdtemp(prefix="bench_vgg_")) / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, out)
    return out


def paper_loss(vgg_path: Path) -> ReconstructionLoss:
    """The project's loss with the paper recipe's settings (what the batched side optimises)."""
    return ReconstructionLoss(perceptual="vgg", perceptual_input="raw", perceptual_weight=1.0, delta_weight=1.0,
                              vgg_path=vgg_path)


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


def loop_one_image(g, target, z0, positions, steps, vgg, lr=PAPER_LR, milestones=PAPER_MILESTONES,
                   gamma=PAPER_GAMMA):
    """The reference's loop for one image (batch 1, float32), written out as optimize_residuals.py
    does it rather than through the project's loss: pixel L1 + L1 of the VGG-16 relu4_2 features
    (``vgg``) of the raw image + sum of mean(delta^2), Adam, MultiStepLR. Returns its final loss."""
    with torch.no_grad():
        _, feats = render(g, z0, {}, record=positions)
        target_features = vgg(target)
    deltas = {p: torch.zeros_like(feats[p], requires_grad=True) for p in positions}
    opt = torch.optim.Adam(deltas.values(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(milestones, steps), gamma)
    for _ in range(steps):
        image, _ = render(g, z0, deltas)
        value = (F.l1_loss(image, target) + F.l1_loss(vgg(image), target_features)
                 + sum(d.pow(2).mean() for d in deltas.values()))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
    return float(value.detach())


def loop_batched(g, targets, z0, positions, steps, loss, lr=PAPER_LR, milestones=PAPER_MILESTONES,
                 gamma=PAPER_GAMMA, autocast_dtype=None, compiled=None):
    """The same optimisation for a whole batch in plain PyTorch with the project's per-image loss
    (the GPU script's batched side): returns the per-image losses of the last step."""
    with torch.no_grad():
        _, feats = render(g, z0, {}, record=positions)
    deltas = {p: torch.zeros_like(feats[p], requires_grad=True) for p in positions}
    opt = torch.optim.Adam(deltas.values(), lr=lr, fused=targets.is_cuda)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(milestones, steps), gamma)
    run = compiled or (lambda d: render(g, z0, d)[0])
    for _ in range(steps):
        # the loss (VGG included) under the same autocast, as the Lightning stage runs it with bf16-mixed
        with torch.autocast(targets.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            per_image = loss(run(deltas), targets, deltas)
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
    # the VGG term dominates the cost on CPU: few images and steps keep the run near a minute
    n, steps = int(os.environ.get("BENCH_IMAGES", "4")), int(os.environ.get("BENCH_STEPS", "20"))
    g, x, z0 = make_problem(64, [128, 64, 32, 16, 8], 128, n)
    positions = correction_positions("deltas", LAYERS)
    weights = vgg_file(os.environ.get("BENCH_VGG"))
    vgg = load_vgg16_trunk(weights)  # the reference loop's VGG: the same weights, fed the raw image
    milestones = step_milestones(PAPER_MILESTONES, steps)

    def batched():
        module = Reconstructor(g, x, z0, positions, loss=paper_loss(weights), steps=steps, lr=PAPER_LR,
                               milestones=PAPER_MILESTONES, gamma=PAPER_GAMMA, batch_size=n)
        pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1).fit(module)
        return module.loss_curves[:, -1].clone()

    batched_losses = []
    benchmark.pedantic(lambda: batched_losses.append(batched()), rounds=2, iterations=1, warmup_rounds=0)
    batched_s = statistics.median(benchmark.stats.stats.data)

    loop_times, loop_losses = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        loop_losses = torch.tensor([loop_one_image(g, x[i:i + 1], z0[i:i + 1], positions, steps, vgg)
                                    for i in range(n)])
        loop_times.append(time.perf_counter() - t0)
    loop_s = statistics.median(loop_times)

    # same maths: every image ends at the same loss either way (to float noise: batched and batch-1
    # convolutions sum in different orders, and Adam on an L1 loss amplifies that a little)
    assert torch.allclose(batched_losses[-1], loop_losses, rtol=2e-2), (batched_losses[-1], loop_losses)
    # and on average within 1 %: Adam's first steps move each element by about lr * sign(gradient), so
    # gradients that are float noise apart near zero (batched vs batch-1 convolutions through a random
    # VGG) start the two runs 0.01 apart there (2.5e-4 after one step, 0.5 % of the loss after 20);
    # a missing or doubled loss term moves it by tens of percent
    assert abs(float(batched_losses[-1].mean() - loop_losses.mean())) <= 1e-2 * float(loop_losses.mean())
    ratio = loop_s / batched_s
    benchmark.extra_info.update({"images": n, "steps": steps, "resolution": 64, "threads": threads,
                                 "batched_s": round(batched_s, 3), "one_at_a_time_s": round(loop_s, 3),
                                 "speedup": round(ratio, 2), "milestones": milestones, "gamma": PAPER_GAMMA,
                                 "mean_final_loss": round(float(loop_losses.mean()), 5)})
    print(f"\nreconstruct, paper recipe (pixel L1 + VGG relu4_2 L1 on the raw image + deltas x1, Adam {PAPER_LR}, "
          f"x{PAPER_GAMMA} at steps {milestones} = 800/1200/1800 of 3000 scaled to {steps}), {n} images x {steps} "
          f"steps, 64px ProGAN, CPU {threads} thread(s): batched (Lightning stage) {batched_s:.2f}s vs one at a time "
          f"(the reference's batch-1 fp32 loop) {loop_s:.2f}s -> {ratio:.1f}x; mean final loss batched "
          f"{float(batched_losses[-1].mean()):.5f} vs loop {float(loop_losses.mean()):.5f} (max diff "
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
    ap.add_argument("--vgg-path", default=None,
                    help="torchvision's vgg16-397923af.pth (default: random weights in its layout)")
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
    weights = vgg_file(args.vgg_path)
    loss = paper_loss(weights).to(args.device)
    vgg = load_vgg16_trunk(weights).to(args.device)

    loop_batched(g, x, z0, positions, 3, loss, autocast_dtype=dtype, compiled=compiled)  # warm-up / compile
    sync(args.device)
    t0 = time.perf_counter()
    batched_losses = loop_batched(g, x, z0, positions, args.steps, loss, autocast_dtype=dtype, compiled=compiled)
    sync(args.device)
    batched_s = time.perf_counter() - t0

    k = min(args.loop_images, args.batch)
    g32 = g.to(memory_format=torch.contiguous_format)
    loop_one_image(g32, x[:1].contiguous(), z0[:1], positions, 3, vgg)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    loop_losses = torch.tensor([loop_one_image(g32, x[i:i + 1].contiguous(), z0[i:i + 1], positions, args.steps,
                                               vgg) for i in range(k)])
    sync(args.device)
    loop_s = time.perf_counter() - t0

    batched_rate = args.batch * args.steps / batched_s
    loop_rate = k * args.steps / loop_s
    rel = (batched_losses[:k].cpu() - loop_losses).abs() / loop_losses.abs().clamp(min=1e-8)
    print(f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"{args.resolution}px ProGAN (random weights), {args.steps} steps, paper recipe (pixel + VGG raw + deltas "
          f"x1, Adam {PAPER_LR}, x{PAPER_GAMMA} at steps {step_milestones(PAPER_MILESTONES, args.steps)}, "
          f"VGG {'from ' + args.vgg_path if args.vgg_path else 'random weights'})")
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
