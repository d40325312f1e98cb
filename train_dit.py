"""Stage 3: latent statistics, then DiT^DH on RecTok latents (paper Sec. 4.1, "Diffusion Model").

  torchrun --nproc_per_node=8 train_dit.py --tokenizer out/rectok/tokenizer_ft.pt \
      --data /data/imagenet/train --model XL --out_dir out/dit   # or the authors' RecTok_decft.pth
  python train_dit.py --demo                                      # reads out/demo/tokenizer_ft.pt

First pass: channel-wise mean/std of the tokenizer's posterior means over the training set (no
flip), stored in the checkpoint. Then rectified flow on normalised posterior samples of flipped or
unflipped images. `--epochs 0` only computes the statistics (needed to sample from the authors' DiT
release).

Read top to bottom: the latent statistics, the lr schedule, one optimiser step (DiTStep), the epoch
loop (train), the flags, main.
"""
import argparse
import contextlib
import copy
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import demo
import evaluate
import models
import pretrained
from plumbing import (LogInterval, Metrics, Preemption, Progress, all_finite, check_args,
                      parse_args, resume, save_checkpoint, save_epoch, save_grid, start_log)

log = logging.getLogger("rectok")

@torch.no_grad()
def latent_stats(tokenizer, loader, device):
    """Channel-wise mean and std of the posterior means over the whole loader, reduced over all
    ranks (the release's main_diffusion.py and utils/train_utils.py compute_stats)."""
    # count, sum, sum of squares
    acc = torch.zeros(3, tokenizer.dim, dtype=torch.float64, device=device)
    progress = Progress("latent statistics", len(loader.sampler))
    for x, _ in loader:
        mean = tokenizer.posterior(x.to(device, non_blocking=True))[0].flatten(0, 1).double()
        acc += torch.stack([torch.full_like(mean[0], len(mean)), mean.sum(0), (mean ** 2).sum(0)])
        progress.update(len(x))
    if dist.is_initialized():
        dist.all_reduce(acc)
    mu = acc[1] / acc[0]
    return {"mean": mu.float().cpu(), "std": (acc[2] / acc[0] - mu ** 2).sqrt().float().cpu()}

def dit_lr(epoch_frac, lr, min_lr, decay_start, decay_end):
    """Constant lr to `decay_start` epochs, then linear to min_lr at `decay_end` (the released
    schedule)."""
    progress = min(max((epoch_frac - decay_start) / (decay_end - decay_start), 0.0), 1.0)
    return lr - (lr - min_lr) * progress

class DiTStep:
    """One optimiser step of DiT^DH over `accum` micro-batches of normalised latents (paper Sec.
    4.1): velocity MSE (models.flow_loss) under bf16 autocast, grad clip, AdamW (no weight decay),
    EMA. Also what bench.py times."""

    def __init__(self, args, dit, device, world):
        self.args = args
        self.dit = dit
        self.world = world
        self.ema = copy.deepcopy(dit).eval().requires_grad_(False)
        self.trainable = [p for p in dit.parameters() if p.requires_grad]
        self.ema_params = [e for e, p in zip(self.ema.parameters(), dit.parameters())
                           if p.requires_grad]
        # AdamW as the release sets it up; fused: one kernel for all parameters
        self.opt = torch.optim.AdamW(self.trainable, lr=args.lr, betas=(0.9, 0.95),
                                     weight_decay=0.0, fused=True)
        dit.grad_ckpt = args.grad_ckpt
        if args.compile:  # block by block, in place: one graph per block shape, short start-up
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            for block in dit.blocks:
                block.compile()
        # DDP all-reduces the gradients (bucket views: no copy into the buckets)
        self.ddp = dit
        if world > 1:
            device_ids = [device] if device.type == "cuda" else None
            self.ddp = DDP(dit, device_ids, gradient_as_bucket_view=True)
        # bf16 autocast on CUDA; CPU runs stay in fp32
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
        self.parts = dict(model=dit, model_ema=self.ema, opt=self.opt)  # checkpoint keys

    def __call__(self, batches, lr):
        """batches: (z, y) micro-batches. Returns the mean loss, the grad norm and the step's finite
        flag as tensors (no host sync on CUDA)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for i, (z, y) in enumerate(batches):
            # gradient accumulation: DDP all-reduces on the last micro-batch only
            last = i == len(batches) - 1
            sync = self.ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with self.autocast, sync:
                loss = models.flow_loss(self.ddp, z, y)
                (loss / len(batches)).backward()
            total = total + loss.detach() / len(batches)
        grad_norm = nn.utils.clip_grad_norm_(self.dit.parameters(), self.args.grad_clip)
        # a non-finite loss or grad norm on any rank skips the whole step, as the release's
        # GradScaler does: fused AdamW reads found_inf on the device and leaves the weights, moments
        # and step count as they were (no host sync)
        finite = all_finite(total, grad_norm)
        self.opt.found_inf = (~finite).float()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # EMA of the trained weights (one fused lerp); a skipped step leaves it as it was
        weight = (1 - self.args.ema) * finite.float()
        torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.trainable],
                             [weight] * len(self.trainable))
        return total, grad_norm, finite

def train(args, tokenizer, dataset, stats, rank, world, device):
    """Train DiT^DH with DiTStep on the tokenizer's normalised latents of `dataset`; resumes from
    <out_dir>/dit.pt if it exists."""
    stats_d = {k: v.to(device) for k, v in stats.items()}
    mean = stats_d["mean"][:, None, None]
    std = stats_d["std"][:, None, None]
    num_classes = dataset.num_classes
    dit = models.DiTDH(args.model, tokenizer.dim, tokenizer.grid, num_classes, args.label_drop)
    dit.to(device)
    log.info(f"DiT^DH-{args.model}: {models.n_params(dit):,} params, {num_classes} classes")
    train_step = DiTStep(args, dit, device, world)
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own noise, t and flips
    accum = args.global_batch // (args.batch_size * world)
    loader = data.make_loader(dataset, args.batch_size, True, args.workers, world, rank, args.seed)
    if len(loader) < accum:
        raise SystemExit(f"{len(dataset)} images are too few for one global batch of "
                         f"{args.global_batch}")
    steps_per_epoch = len(loader) // accum

    # resume: at an epoch's end, or inside one after a signal (the loader skips the batches done)
    ckpt_path = os.path.join(args.out_dir, "dit.pt")
    interval = LogInterval(device, ckpt_path)  # the sums behind the next metrics row
    epoch, step, epoch_step = resume(ckpt_path, args, ("model", "img_size", "global_batch"),
                                     train_step.parts, device, interval, loader,
                                     accum * args.batch_size)
    # online gFID / IS (--eval_every): against --fid_ref, or a class-spread part of the train set
    if args.eval_every:
        inception = evaluate.online_inception(args, device)
        ref = evaluate.generation_reference(inception, args, dataset, world, rank)
    # the sample grids' classes (image i: label classes[i % len(classes)])
    classes = list(range(10))
    if num_classes == 1000:
        classes = [207, 360, 387, 974, 88, 979, 417, 279]
    metrics = Metrics(args.out_dir, "dit", rank, step)
    log.info(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, global batch "
             f"{args.global_batch} = {args.batch_size}/GPU x {world} x {accum} accumulation")
    preemption = Preemption(device)  # before the loader's workers start: they inherit it
    t0 = time.time()
    while epoch < args.epochs:
        dit.train()
        if args.reshuffle:  # the release never calls set_epoch: every epoch visits one permutation
            loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        for it in range(epoch_step, steps_per_epoch):
            lr = dit_lr(epoch + it / steps_per_epoch, args.lr, args.min_lr, args.decay_start_epoch,
                        args.decay_end_epoch)
            # the latents: normalised posterior samples of flipped or unflipped images
            batch = []
            for x, y in (next(batches) for _ in range(accum)):
                with torch.no_grad(), train_step.autocast:
                    x = data.random_flip(x.to(device, non_blocking=True))
                    z = tokenizer.encode(x, sample=True, check_range=False)
                batch.append(((z.float() - mean) / std, y.to(device, non_blocking=True)))
            # one optimiser step of the velocity loss
            loss, grad_norm, finite = train_step(batch, lr)
            # summed for the next metrics row (a skipped step adds nothing)
            interval.add(finite, dict(loss=loss.float(), grad_norm=grad_norm.float()))
            step += 1
            # a metrics row every log_every steps and at the epoch's end (the only host sync)
            if step % args.log_every == 0 or it == steps_per_epoch - 1:
                n = interval.steps
                record = interval.row(world)
                metrics.write(step=step, epoch=round(epoch + (it + 1) / steps_per_epoch, 4),
                              loss=record["loss"], lr=lr, grad_norm=record["grad_norm"],
                              skipped=record["skipped"],
                              img_per_sec=n * args.global_batch / world / (time.time() - t0))
                t0 = time.time()
            # SIGTERM / SIGUSR1: a checkpoint inside the epoch, then a clean exit (the epoch's last
            # step writes the end-of-epoch checkpoint below)
            if preemption.stop_now() and it < steps_per_epoch - 1:
                save_epoch(ckpt_path, train_step.parts, device, 0, interval, epoch=epoch, step=step,
                           epoch_step=it + 1, latent_stats=stats, args=vars(args))
                preemption.exit(ckpt_path, step)
        epoch += 1
        epoch_step = 0

        # end of the epoch: online gFID, checkpoint, a grid of EMA samples
        if args.eval_every and epoch % args.eval_every == 0:
            res = evaluate.sample_metrics(train_step.ema, tokenizer, stats_d, inception, ref,
                                          args.eval_images, args.sample_steps, args.cfg,
                                          batch_size=args.batch_size)
            if res:
                metrics.write(step=step, epoch=epoch, eval_images=res["n"], eval_gfid=res["fid"],
                              eval_is=res["is_mean"])
        save_epoch(ckpt_path, train_step.parts, device, args.save_every, epoch=epoch, step=step,
                   latent_stats=stats, args=vars(args))
        if rank == 0 and (epoch % args.vis_every == 0 or epoch == args.epochs):
            images = models.generate(train_step.ema, tokenizer, stats_d, classes,
                                     args.sample_steps, args.cfg)
            save_grid(os.path.join(args.out_dir, f"dit_samples_epoch{epoch:04d}.png"), [images])
        if preemption.agreed() and epoch < args.epochs:
            preemption.exit(ckpt_path, step)
    log.info(f"done: {ckpt_path}")

# --demo (README, quick start): DiT^DH-demo on the demo tokenizer's latents of the 2,000 built-in
# images
DEMO = dict(model="demo", demo_images=2000, epochs=30, decay_start_epoch=15, decay_end_epoch=30,
            lr=2e-3, min_lr=1e-4, ema=0.99, global_batch=64, workers=0, log_every=20, vis_every=20,
            sample_steps=10, cfg=6.0, eval_images=200)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--tokenizer", help="ours or the release's RecTok_decft.pth "
      "(default: <out_dir>/tokenizer_ft.pt)")
    p("--data", help="ImageNet-style train folder (class sub-folders); omit with --demo")
    p("--data_list", help="optional `relative/path label` file list")
    p("--out_dir", help="the run's folder (rerun with it to resume); --demo: out/demo")
    p("--demo_images", type=int, help="size of the built-in dataset of --demo")
    p("--model", default="XL", choices=list(models.DIT_SIZES), help="DiT^DH size (tiny: tests)")
    p("--epochs", type=int, default=800)
    p("--decay_start_epoch", type=int, default=40)
    p("--decay_end_epoch", type=int, default=800)
    p("--lr", type=float, default=2e-4)
    p("--min_lr", type=float, default=2e-5)
    p("--batch_size", type=int, help="per process (default: derived from --global_batch, <= 64)")
    p("--global_batch", type=int, default=1024, help="by gradient accumulation on fewer GPUs")
    p("--grad_clip", type=float, default=1.0)
    p("--label_drop", type=float, default=0.1, help="share of labels replaced by the null class "
      "(CFG); 0 with one class (a flat folder): an unconditional model, sampled with --cfg 1")
    p("--ema", type=float, default=0.9995, help="the released code (the paper text says 0.995)")
    p("--latent_stats", help="reuse statistics from a DiT checkpoint or a latent_stats.pt")
    p("--sample_steps", type=int, default=50, help="Euler grid points of the EMA sample grids")
    p("--cfg", type=float, default=1.0, help="guidance scale of the EMA sample grids")
    p("--workers", type=int, default=8)
    p("--seed", type=int, default=0)
    p("--reshuffle", action="store_true", help="a new data order every epoch (release: one order)")
    p("--log_every", type=int, default=50)
    p("--vis_every", type=int, default=5)
    p("--compile", action="store_true")
    p("--grad_ckpt", action="store_true", help="activation checkpointing: less memory, ~1/3 slower")
    p("--save_every", type=int, default=0, help="also keep dit_epoch{E:04d}.pt every N epochs (E "
      "from 0: the paper's 600-epoch model is dit_epoch0599.pt, the release's epoch_0599)")
    p("--wandb", metavar="PROJECT", help="also send metrics and grids to Weights & Biases")
    p("--eval_every", type=int, default=0, help="every N epochs: gFID + IS of EMA samples")
    p("--eval_images", type=int, default=10_000)
    p("--fid_ref", help="gFID reference: ADM's VIRTUAL_imagenet256_labeled.npz (default: train)")
    p("--inception", help="FID Inception .pth (default: pytorch-fid's, downloaded once); random")
    args = parse_args(parser, DEMO, argv)
    tok_path = args.tokenizer or args.out_dir and os.path.join(args.out_dir, "tokenizer_ft.pt")
    no_null = (args.label_drop == 0 and args.cfg > 1
               and f"--cfg {args.cfg}: guidance needs the null class that --label_drop 0 leaves "
               "untrained; give --cfg 1")
    check_args(args, [not (args.data or args.demo)
                      and "--data is required (an ImageNet-style train folder), or use --demo",
                      no_null],
               {"--tokenizer": (tok_path, "a tokenizer checkpoint"),
                "--latent_stats": (args.latent_stats, "latent statistics"),
                "--inception": (args.inception, "FID Inception weights"),
                "--fid_ref": (args.fid_ref, ("an .npz", "a folder"))},
               dict(epochs=(0, float("inf")), label_drop=(0, 1)))  # --epochs 0: the statistics only
    # processes: under torchrun one per GPU (NCCL) or per CPU slot (gloo), else one
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start_log(args, "dit", rank, world, device)
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
    tokenizer = pretrained.load_tokenizer(tok_path, gamma=0.0, mask_ratio=0.0).to(device).eval()
    tokenizer.sem_decoder = None
    tokenizer.sem_decoders = None
    args.img_size = tokenizer.grid * tokenizer.decoder.patch_size
    dataset = data.make_dataset(args) if args.data else demo.shapes(args)  # --demo: built-in

    # 1. latent statistics: posterior means, no flip, whole training set; those of a run being
    #    resumed (dit.pt holds them; memory-mapped, not read whole), else --latent_stats, else new
    ckpt_path = os.path.join(args.out_dir, "dit.pt")
    stats = None
    if os.path.exists(ckpt_path):
        stats = models.read_checkpoint(ckpt_path, mmap=True).get("latent_stats")
    if stats is None and args.latent_stats:
        # latent_stats.pt, or a DiT^DH checkpoint that holds them
        src = models.read_checkpoint(args.latent_stats)
        stats = src.get("latent_stats", src)
    if stats is None:
        loader = data.make_loader(dataset, args.batch_size, False, args.workers, world, rank)
        stats = latent_stats(tokenizer, loader, device)
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, "latent_stats.pt"), stats)
    log.info(f"latent statistics: mean {stats['mean'].mean():.4f}, std {stats['std'].mean():.4f} "
             "(channel averages)")

    # 2. DiT^DH training
    if args.epochs > 0:
        train(args, tokenizer, dataset, stats, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
