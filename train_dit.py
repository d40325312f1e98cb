"""Stage 3: latent statistics, then DiT^DH on RecTok latents (paper Sec. 4.1, "Diffusion Model").

  torchrun --nproc_per_node=8 train_dit.py --tokenizer out/rectok/tokenizer_ft.pt \
      --data /data/imagenet/train --model XL --out_dir out/dit       # or the authors' RecTok_decft.pth
  python train_dit.py --demo                                          # reads out/demo/tokenizer_ft.pt

First pass: channel-wise mean/std of the tokenizer's posterior means over the training set (no flip),
stored in the checkpoint. Then rectified flow on normalised posterior samples of flipped or unflipped
images. `--epochs 0` only computes the statistics (needed to sample from the authors' DiT release).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import evaluate
import models
from plumbing import (EMA, INF, RANGES, LogInterval, Metrics, Preemption, Progress, adamw, all_finite, bf16,
                      check_args, check_ranks_agree, check_resume, ddp, dit_lr, gather_rows, grad_accum_steps, log,
                      parse_args, random_flip, resume, save_checkpoint, save_epoch, save_grid, setup, step_if,
                      sync_grads_if, to_uint8)
from sample import generate, sample_metrics

@torch.no_grad()
def latent_stats(tokenizer, loader, device):
    """Channel-wise mean and std of the posterior means over the whole loader, reduced over all ranks."""
    acc = torch.zeros(3, tokenizer.dim, dtype=torch.float64, device=device)  # count, sum, sum of squares
    progress = Progress("latent statistics", len(loader.sampler))
    for x, _ in loader:
        mean = tokenizer.posterior(x.to(device, non_blocking=True))[0].flatten(0, 1).double()
        acc += torch.stack([torch.full_like(mean[0], len(mean)), mean.sum(0), (mean ** 2).sum(0)])
        progress.update(len(x))
    if dist.is_initialized():
        dist.all_reduce(acc)
    mu = acc[1] / acc[0]
    return {"mean": mu.float().cpu(), "std": (acc[2] / acc[0] - mu ** 2).sqrt().float().cpu()}

class DiTStep:
    """One optimiser step of DiT^DH over `accum` micro-batches of normalised latents (paper Sec. 4.1): velocity MSE
    under bf16 autocast, grad clip, AdamW (no weight decay), EMA. Also what bench.py times."""

    def __init__(self, args, dit, device, world):
        self.args = args
        self.dit = dit
        self.ema = EMA(dit, args.ema)
        self.opt = adamw([p for p in dit.parameters() if p.requires_grad], args.lr)
        dit.grad_ckpt = args.grad_ckpt
        if args.compile:
            models.compile_blocks(dit.blocks)
        self.ddp = ddp(dit, device, world)
        self.parts = dict(model=dit, model_ema=self.ema.model, opt=self.opt)  # checkpoint keys
        self.autocast = bf16(device)

    def __call__(self, batches, lr):
        """batches: (z, y) micro-batches. Returns the mean loss, the grad norm and the step's finite flag as
        tensors (no host sync on CUDA). A non-finite step changes nothing (plumbing.step_if)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for i, (z, y) in enumerate(batches):
            with self.autocast, sync_grads_if(i == len(batches) - 1, self.ddp):
                loss = models.flow_loss(self.ddp, z, y)
                (loss / len(batches)).backward()
            total = total + loss.detach() / len(batches)
        grad_norm = nn.utils.clip_grad_norm_(self.dit.parameters(), self.args.grad_clip)
        finite = all_finite(total, grad_norm)
        step_if(finite, self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.dit, finite)
        return total, grad_norm, finite

# --demo (README, quick start): DiT^DH-demo on the demo tokenizer's latents of the 2,000 built-in images
DEMO = dict(model="demo", demo_images=2000, epochs=30, decay_start_epoch=15, decay_end_epoch=30, lr=2e-3,
            min_lr=1e-4, ema=0.99, global_batch=64, workers=0, log_every=20, vis_every=20, sample_steps=10,
            cfg=6.0, eval_images=200)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--tokenizer", help="tokenizer checkpoint (ours or RecTok_decft.pth); --demo: <out_dir>/tokenizer_ft.pt")
    p("--data", help="ImageNet-style train folder (class sub-folders); omit with --demo")
    p("--data_list", help="optional `relative/path label` file list")
    p("--out_dir", help="the run's folder (rerun with it to resume); --demo: out/demo")
    p("--demo_images", type=int, help="size of the built-in dataset of --demo")
    p("--model", default="XL", choices=list(models.DIT_SIZES), help="DiT^DH size ('tiny': tests, 'demo': --demo)")
    p("--epochs", type=int, default=800)
    p("--decay_start_epoch", type=int, default=40)
    p("--decay_end_epoch", type=int, default=800)
    p("--lr", type=float, default=2e-4)
    p("--min_lr", type=float, default=2e-5)
    p("--batch_size", type=int, help="per process; default: --global_batch / processes, at most 64 (the rest by "
      "gradient accumulation)")
    p("--global_batch", type=int, default=1024, help="reached by gradient accumulation on fewer GPUs")
    p("--grad_clip", type=float, default=1.0)
    p("--label_drop", type=float, default=0.1, help="share of labels replaced by the null class (CFG); with one "
      "class (a flat image folder), 0 trains an unconditional model, to sample with --cfg 1")
    p("--ema", type=float, default=0.9995, help="the released code (the paper text says 0.995)")
    p("--latent_stats", help="reuse statistics from a DiT checkpoint or a latent_stats.pt")
    p("--sample_steps", type=int, default=50, help="Euler grid points for the PNG of EMA samples")
    p("--cfg", type=float, default=1.0, help="guidance scale for the PNG of EMA samples")
    p("--workers", type=int, default=8)
    p("--seed", type=int, default=0)
    p("--reshuffle", action="store_true", help="a new data order every epoch (the release: one order, drawn once)")
    p("--log_every", type=int, default=50)
    p("--vis_every", type=int, default=5)
    p("--compile", action="store_true")
    p("--grad_ckpt", action="store_true", help="activation checkpointing per transformer block: less GPU memory, "
      "~1/3 more compute (the release's --grad_checkpointing)")
    p("--save_every", type=int, default=0, help="also keep dit_epoch{E:04d}.pt every N epochs (E counts from 0: "
      "the paper's 600-epoch model is dit_epoch0599.pt, as the release's ditdhxl_epoch_0599)")
    p("--wandb", metavar="PROJECT", help="also send metrics and image grids to this Weights & Biases project")
    p("--eval_every", type=int, default=0, help="every N epochs: gFID + IS of EMA samples (--cfg, --sample_steps)")
    p("--eval_images", type=int, default=10_000)
    p("--fid_ref", help="gFID reference: ADM's VIRTUAL_imagenet256_labeled.npz; default: training images")
    p("--inception", help="FID Inception .pth (default: pytorch-fid's release, downloaded once); 'random' for demos")
    args = parse_args(parser, DEMO, argv)
    tok_path = args.tokenizer or args.out_dir and os.path.join(args.out_dir, "tokenizer_ft.pt")
    check_args(args, [not (args.data or args.demo) and "--data is required (an ImageNet-style train folder), or use --demo",
                      tok_path and models.file_problem("--tokenizer", tok_path, "a tokenizer checkpoint"),
                      args.latent_stats and models.file_problem("--latent_stats", args.latent_stats, "latent statistics"),
                      args.inception not in (None, "random") and
                      models.file_problem("--inception", args.inception, "FID Inception weights"),
                      args.fid_ref and models.file_problem("--fid_ref", args.fid_ref, "an .npz", "a folder"),
                      args.label_drop == 0 and args.cfg > 1 and f"--cfg {args.cfg}: guidance needs the null class "
                      "that --label_drop 0 leaves untrained; give --cfg 1"],
               dict(RANGES, epochs=(0, INF), label_drop=(0, 1)))  # --epochs 0: the latent statistics only
    rank, world, device = setup(args, "dit")
    tokenizer = models.load_tokenizer(tok_path, gamma=0.0, mask_ratio=0.0).to(device).eval()
    tokenizer.sem_decoder = None
    args.img_size = tokenizer.grid * tokenizer.decoder.patch_size
    dataset = data.make_dataset(args)
    ckpt_path = os.path.join(args.out_dir, "dit.pt")
    ckpt = models.read_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else {}
    check_resume(ckpt_path, ckpt.get("args", {}), args, ("model", "img_size", "global_batch"))

    # 1. latent statistics: posterior means, no flip, whole training set (the release's main_diffusion.py
    #    and utils/train_utils.py compute_stats)
    stats = ckpt.get("latent_stats")
    if stats is None and args.latent_stats:
        src = models.read_checkpoint(args.latent_stats)  # latent_stats.pt, or a DiT^DH checkpoint that holds them
        stats = src.get("latent_stats", src)
    if stats is None:
        stats = latent_stats(tokenizer, data.make_loader(dataset, args.batch_size, False, args.workers, world, rank),
                             device)
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, "latent_stats.pt"), stats)
    log.info(f"latent statistics: mean {stats['mean'].mean():.4f}, std {stats['std'].mean():.4f} (channel averages)")
    if args.epochs == 0:
        return
    stats_d = {k: v.to(device) for k, v in stats.items()}
    mean, std = stats_d["mean"][:, None, None], stats_d["std"][:, None, None]

    # 2. DiT^DH training
    num_classes = dataset.num_classes
    dit = models.DiTDH(args.model, tokenizer.dim, tokenizer.grid, num_classes, args.label_drop).to(device)
    log.info(f"DiT^DH-{args.model}: {models.n_params(dit):,} params, {num_classes} classes")
    train_step = DiTStep(args, dit, device, world)
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own noise, t and flips
    accum = grad_accum_steps(args, world)
    loader = data.make_loader(dataset, args.batch_size, True, args.workers, world, rank, args.seed)
    if len(loader) < accum:
        raise SystemExit(f"{len(dataset)} images are too few for one global batch of {args.global_batch}")
    steps_per_epoch = len(loader) // accum
    interval = LogInterval(device)  # the sums behind the next metrics row
    # resume: at an epoch's end, or inside an epoch after a signal (the loader skips the batches done)
    epoch = 0
    step = 0
    epoch_step = 0
    if ckpt:
        epoch, step, epoch_step = resume(ckpt_path, ckpt, train_step.parts, rank, device, interval)
    loader.sampler.skip = epoch_step * accum * args.batch_size
    if args.eval_every:  # gFID / IS against --fid_ref, or against a class-spread part of the training images
        if args.demo and not args.inception:
            inception = evaluate.demo_judge(args.out_dir, args.img_size, device, "evaluator")[0]
        else:
            inception = evaluate.load_inception(args.inception).to(device)
        if args.fid_ref:
            ref = evaluate.reference(inception, args.fid_ref, args.batch_size)
        else:
            real = torch.utils.data.Subset(dataset, evaluate.spread(len(dataset), args.eval_images))
            real = data.make_loader(real, args.batch_size, False, args.workers, world, rank)
            pool = evaluate.inception_features(inception, (to_uint8(x) for x, _ in real))[0]
            ref = evaluate.feature_stats(gather_rows(pool, len(real.dataset), strided=True)), None
    # the sample grids' classes (image i: label classes[i % len(classes)])
    classes = list(range(10))
    if num_classes == 1000:
        classes = [207, 360, 387, 974, 88, 979, 417, 279]
    metrics = Metrics(args.out_dir, "dit", rank, step)
    log.info(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, global batch {args.global_batch} = "
             f"{args.batch_size}/GPU x {world} x {accum} accumulation")
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
                    x = random_flip(x.to(device, non_blocking=True))
                    z = tokenizer.encode(x, sample=True, check_range=False)
                batch.append(((z.float() - mean) / std, y.to(device, non_blocking=True)))
            # one optimiser step of the velocity loss
            loss, grad_norm, finite = train_step(batch, lr)
            interval.add(finite, dict(loss=loss.float(), grad_norm=grad_norm.float()))
            step += 1
            # a metrics row every log_every steps and at the epoch's end (the only host sync)
            if step % args.log_every == 0 or it == steps_per_epoch - 1:
                n = interval.steps
                record = interval.row(world, ckpt_path)
                metrics.write(step=step, epoch=round(epoch + (it + 1) / steps_per_epoch, 4),
                              loss=record["loss"], lr=lr, grad_norm=record["grad_norm"],
                              skipped=record["skipped"],
                              img_per_sec=n * args.global_batch / world / (time.time() - t0))
                t0 = time.time()
            # SIGTERM / SIGUSR1: a checkpoint inside the epoch, then a clean exit (the epoch's last step
            # writes the end-of-epoch checkpoint below)
            if preemption.stop_now() and it < steps_per_epoch - 1:
                save_epoch(ckpt_path, train_step.parts, device, 0, interval, epoch=epoch, step=step,
                           epoch_step=it + 1, latent_stats=stats, args=vars(args))
                preemption.exit(ckpt_path, step)
        epoch += 1
        epoch_step = 0

        # end of the epoch: online gFID, checkpoint, a grid of EMA samples
        if args.eval_every and epoch % args.eval_every == 0:
            res = sample_metrics(train_step.ema.model, tokenizer, stats_d, inception, ref, args.eval_images,
                                 args.sample_steps, args.cfg, batch_size=args.batch_size)
            if res:
                metrics.write(step=step, epoch=epoch, eval_images=res["n"], eval_gfid=res["fid"],
                              eval_is=res["is_mean"])
        check_ranks_agree(dit, train_step.ema.model)
        save_epoch(ckpt_path, train_step.parts, device, args.save_every, epoch=epoch, step=step,
                   latent_stats=stats, args=vars(args))
        if rank == 0 and (epoch % args.vis_every == 0 or epoch == args.epochs):
            images = generate(train_step.ema.model, tokenizer, stats_d, classes, args.sample_steps, args.cfg)
            save_grid(os.path.join(args.out_dir, f"dit_samples_epoch{epoch:04d}.png"), [images])
        if preemption.agreed() and epoch < args.epochs:
            preemption.exit(ckpt_path, step)
    log.info(f"done: {ckpt_path}")
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
