"""Stage 1: train the RecTok tokenizer with FSD + RAD (paper Sec. 3.2, Fig. 3).

  torchrun --nproc_per_node=8 train_tokenizer.py --dim 128 --data /data/imagenet/train \
      --out_dir out/rectok
  python train_tokenizer.py --demo                # minutes on a laptop CPU, built-in data

Read top to bottom: the loss terms, the optimiser set-up and lr schedule, one optimiser step
(TokenizerStep), the epoch loop (train, which finetune_decoder.py reuses for stage 2), the flags,
main.
"""
import argparse
import contextlib
import copy
import logging
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import demo
import evaluate
import models
import pretrained
from plumbing import (LogInterval, Metrics, Preemption, all_finite, check_args, keep_buffers_if,
                      parse_args, resume, save_epoch, save_grid, start_log)

log = logging.getLogger("rectok")
# the settings that shape the model (stage 2 has dim and img_size, from its tokenizer): a
# checkpoint resumes only with these
MODEL_FLAGS = ("dim", "img_size", "patch_size", "enc_size", "dec_size", "sem_size", "sem_type",
               "teacher", "teacher_size")

# ---- Tokenizer losses (paper Eq. 4-5; the release's utils/losses.py)

def semantic_loss(pred, target, ids_keep=None, masked_only=False):
    """1 - cos(pred, target) per token (paper Eq. 5), averaged over every position (the release's
    "rec+align"), or with masked_only over the masked positions alone (RAD as the paper writes it,
    the release's sem_target "reconstruction": zero when nothing is masked). A per-token MLP decoder
    only sees kept tokens."""
    if ids_keep is not None and pred.shape[1] != target.shape[1]:
        target = target.gather(1, ids_keep[..., None].expand(-1, -1, target.shape[-1]))
    cos = 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)  # (B, N)
    if not masked_only:
        return cos.mean()
    masked = torch.ones_like(cos).scatter(1, ids_keep, 0.0)
    return (cos * masked).sum() / masked.sum().clamp_min(1)

def generator_losses(args, x, x_hat, kl, pred, target, ids_keep, perceptual, disc, use_gan):
    """Weighted loss terms in fp32 (paper Eq. 4); images enter the losses in [0, 1] like the
    released code."""
    x, x_hat = x.float(), x_hat.float()
    terms = {"rec": args.rec_weight * F.mse_loss((x_hat + 1) / 2, (x + 1) / 2)}
    if args.perceptual_weight > 0:
        terms["perceptual"] = args.perceptual_weight * perceptual(x, x_hat)
    if args.kl_weight > 0:
        terms["kl"] = args.kl_weight * kl
    if isinstance(pred, dict):  # several teachers: their losses averaged (the release's losses.py)
        masked_only = args.sem_target == "masked"
        losses = [semantic_loss(pred[k], target[k], ids_keep, masked_only) for k in pred]
        terms["sem"] = args.sem_weight * (sum(losses) / len(losses))
    elif pred is not None:
        masked_only = args.sem_target == "masked"
        terms["sem"] = args.sem_weight * semantic_loss(pred, target, ids_keep, masked_only)
    if use_gan:
        disc.requires_grad_(False)  # the generator's GAN term must not train the discriminator
        terms["gan"] = args.disc_weight * -disc((x_hat + 1) / 2).mean()
        disc.requires_grad_(True)
    return terms

def teacher_features(teacher, x):
    """FSD's targets: the frozen teacher's patch features of x, or with several teachers (an
    nn.ModuleDict) a dict of them by name; computed in inference mode, then cloned (inference
    tensors cannot enter autograd)."""
    with torch.inference_mode():
        if isinstance(teacher, nn.ModuleDict):
            target = {name: net(x) for name, net in teacher.items()}
        else:
            target = teacher(x)
    if isinstance(target, dict):
        return {name: t.clone() for name, t in target.items()}
    return target.clone()

# ---- Optimiser and lr schedule (paper Sec. 4.1; the release's utils/train_utils.py)

def param_groups(model, weight_decay):
    """AdamW groups: no decay on biases, norms, embeddings, tokens (the authors' name rule) or any
    1-D tensor."""
    skip = ("ln", "bias", "embedding", "norm", "gamma", "embed", "token")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim < 2 or any(s in n for s in skip)]
    decay = [p for n, p in named if not (p.ndim < 2 or any(s in n for s in skip))]
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]

def cosine_lr(epoch_frac, base_lr, warmup_epochs, epochs, min_lr=0.0):
    """Linear warm-up then half-cycle cosine, evaluated per step at the fractional epoch."""
    if epoch_frac < warmup_epochs:
        return base_lr * epoch_frac / warmup_epochs
    progress = (epoch_frac - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

# ---- The training step and loop shared by stage 1 and stage 2

class TokenizerStep:
    """One optimiser step of the tokenizer (only its trainable parameters) and of the discriminator,
    over `accum` micro-batches, with the losses of paper Eq. 4. `ema`: the EMA copy of the model.
    Also what bench.py times."""

    def __init__(self, args, model, ema, teacher, device, world):
        self.args = args
        self.model = model
        self.ema = ema
        self.teacher = teacher
        self.world = world
        self.base_lr = args.blr * args.global_batch / 256
        self.perceptual = pretrained.Perceptual(args.convnext_weight, args.random_frozen_nets)
        self.perceptual.to(device)
        self.disc = pretrained.patchgan().to(device)
        # AdamW as the release sets it up; fused: one kernel for all parameters (also on the CPU,
        # where a demo step is 12% faster than the per-parameter loop)
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=self.base_lr,
                                     betas=(0.9, 0.95), weight_decay=args.weight_decay, fused=True)
        self.opt_d = torch.optim.AdamW(param_groups(self.disc, args.weight_decay), lr=self.base_lr,
                                       betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                       fused=True)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = [e for e, p in zip(ema.parameters(), model.parameters())
                           if p.requires_grad]
        sem_decoders = [model.sem_decoder, *(model.sem_decoders or {}).values()]
        transformers = [getattr(net, "transformer", [])
                        for net in (model.encoder, model.decoder, *sem_decoders)]
        for net in (model.encoder, model.decoder, *sem_decoders):
            if isinstance(net, models.ViT):
                net.grad_ckpt = args.grad_ckpt
        if args.compile:
            # block by block, in place (one graph per block shape, short start-up); the RAD mask
            # draw and the gathers stay eager; dynamic: the kept-token count varies with the mask
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            for blocks in transformers:
                for block in blocks:
                    block.compile(dynamic=True)
            for net in teacher.values() if isinstance(teacher, nn.ModuleDict) else [teacher]:
                for block in getattr(net, "blocks", []):
                    block.compile()
            self.perceptual.compile()
            self.disc.compile()
        # DDP all-reduces the gradients (bucket views: no copy into the buckets)
        if world > 1:
            device_ids = [device] if device.type == "cuda" else None
            self.ddp_model = DDP(model, device_ids, gradient_as_bucket_view=True)
            self.ddp_disc = DDP(self.disc, device_ids, gradient_as_bucket_view=True)
        else:
            self.ddp_model = model
            self.ddp_disc = self.disc
        # bf16 autocast on CUDA; CPU runs stay in fp32
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
        # the checkpoint's keys
        self.parts = dict(model=model, model_ema=ema, opt=self.opt, disc=self.disc,
                          opt_disc=self.opt_d)

    def no_sync(self, net, last):
        """Gradient accumulation: DDP all-reduces on the last micro-batch only."""
        return net.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def __call__(self, batches, lr, use_gan):
        """batches: the micro-batches (x in [-1, 1]) of one global batch. Returns the loss terms
        averaged over micro-batches, the generator's grad norm and the step's finite flag, as
        tensors (no host sync on CUDA)."""
        for group in self.opt.param_groups + self.opt_d.param_groups:
            group["lr"] = lr
        sums = {}
        disc_stats = [b.clone() for b in self.disc.buffers()]  # for keep_buffers_if below
        # the release runs LPIPS, ConvNeXt-S and both GAN terms with autocast off; --bf16_losses
        # trades that for speed
        loss_precision = self.autocast if self.args.bf16_losses else contextlib.nullcontext()
        for i, x in enumerate(batches):
            last = i == len(batches) - 1
            # generator: reconstruction, KL, FSD + RAD semantic loss (and the GAN term), paper Eq. 4
            with self.no_sync(self.ddp_model, last):
                with self.autocast:
                    x_hat, kl, pred, ids_keep = self.ddp_model(x)
                    target = None
                    if self.teacher is not None:
                        target = teacher_features(self.teacher, x)
                with loss_precision:
                    terms = generator_losses(self.args, x, x_hat, kl, pred, target, ids_keep,
                                             self.perceptual, self.disc, use_gan)
                (sum(terms.values()) / len(batches)).backward()
            # discriminator: on the same reconstructions, [0, 1] inputs, hinge loss
            if use_gan:
                with loss_precision, self.no_sync(self.ddp_disc, last):
                    real = self.ddp_disc((x.float() + 1) / 2)
                    fake = self.ddp_disc((x_hat.detach().float() + 1) / 2)
                    terms["disc"] = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                    (terms["disc"] / len(batches)).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach() / len(batches)
        # clip both networks' gradients (the discriminator's does not depend on the generator's
        # step: clipping it here gives the same numbers)
        grad_norm = nn.utils.clip_grad_norm_(self.trainable, self.args.grad_clip)
        norms = [grad_norm]
        if use_gan:
            norms.append(nn.utils.clip_grad_norm_(self.disc.parameters(), self.args.grad_clip))
        # a non-finite loss or grad norm on any rank skips the whole step, as the release's
        # GradScaler does: fused AdamW reads found_inf on the device and leaves the weights, moments
        # and step count as they were (no host sync)
        finite = all_finite(*sums.values(), *norms)
        self.opt.found_inf = (~finite).float()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if use_gan:
            self.opt_d.found_inf = (~finite).float()
            self.opt_d.step()
            # a skipped step's BatchNorm statistics updates are undone
            keep_buffers_if(finite, self.disc, disc_stats)
        self.opt_d.zero_grad(set_to_none=True)
        # EMA of the trained weights (one fused lerp); a skipped step leaves it as it was
        weight = (1 - self.args.ema) * finite.float()
        torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.trainable],
                             [weight] * len(self.trainable))
        return sums, grad_norm, finite

def train(args, stage, model, ema, teacher, rank, world, device):
    """Train a Tokenizer with TokenizerStep; resumes from <out_dir>/<stage>.pt if it exists.
    `teacher` is None when there is no semantic loss (stage 2)."""
    # data: the training set, and 8 held-out images spread over a sorted folder's classes
    accum = args.global_batch // (args.batch_size * world)
    dataset = data.make_dataset(args) if args.data else demo.shapes(args)
    loader = data.make_loader(dataset, args.batch_size, True, args.workers, world, rank, args.seed)
    if len(loader) < accum:
        raise SystemExit(f"{len(dataset)} images are too few for one global batch of "
                         f"{args.global_batch}")
    val = data.make_dataset(args, train=False) if args.data else demo.shapes(args, train=False)
    held_out = torch.stack([val[i][0] for i in data.spread(len(val), 8)]).to(device)
    train_step = TokenizerStep(args, model, ema, teacher, device, world)
    # online PSNR + rFID of the EMA weights (--eval_every) on a fixed, class-spread part of val_data
    if args.eval_every:
        inception = evaluate.online_inception(args, device)
        val = torch.utils.data.Subset(val, data.spread(len(val), args.eval_images))
        eval_loader = data.make_loader(val, args.batch_size, False, args.workers, world, rank)
        ref = None
        if args.fid_ref:
            ref = evaluate.reference(inception, args.fid_ref, args.batch_size)[0]
    steps_per_epoch = len(loader) // accum
    # whole epochs, as the release (utils/train_utils.py:56)
    warmup_epochs = int(args.warmup_rate * args.epochs)
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own masks, noise, flips

    # resume: at an epoch's end, or inside one after a signal (the loader skips the batches done)
    ckpt_path = os.path.join(args.out_dir, f"{stage}.pt")
    interval = LogInterval(device, ckpt_path)  # the sums behind the next metrics row
    epoch, step, epoch_step = resume(ckpt_path, args, MODEL_FLAGS + ("global_batch",),
                                     train_step.parts, device, interval, loader,
                                     accum * args.batch_size)
    log.info(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, global batch "
             f"{args.global_batch} = {args.batch_size}/GPU x {world} x {accum} accumulation, "
             f"lr {train_step.base_lr:.2e}")
    metrics = Metrics(args.out_dir, stage, rank, step)
    preemption = Preemption(device)  # before the loader's workers start: they inherit it
    t0 = time.time()
    while epoch < args.epochs:
        model.train()
        train_step.disc.train()
        if args.reshuffle:  # the release never calls set_epoch: every epoch visits one permutation
            loader.sampler.set_epoch(epoch)
        use_gan = epoch >= args.disc_start_epoch and args.disc_weight > 0
        batches = iter(loader)
        for it in range(epoch_step, steps_per_epoch):
            # one optimiser step on `accum` flipped micro-batches, at this step's lr
            lr = cosine_lr(epoch + it / steps_per_epoch, train_step.base_lr, warmup_epochs,
                           args.epochs)
            xs = [data.random_flip(next(batches)[0].to(device, non_blocking=True))
                  for _ in range(accum)]
            terms, grad_norm, finite = train_step(xs, lr, use_gan)
            # summed for the next metrics row (a skipped step adds nothing)
            interval.add(finite, dict(terms, grad_norm=grad_norm))
            step += 1
            # a metrics row every log_every steps and at the epoch's end (the only host sync)
            if step % args.log_every == 0 or it == steps_per_epoch - 1:
                n = interval.steps
                record = interval.row(world)
                # the generator's total
                loss = sum(v for k, v in record.items()
                           if k not in ("disc", "grad_norm", "skipped"))
                metrics.write(step=step, epoch=round(epoch + (it + 1) / steps_per_epoch, 4),
                              loss=loss, loss_no_gan=loss - record.get("gan", 0.0), **record,
                              lr=lr, img_per_sec=n * args.global_batch / world / (time.time() - t0))
                t0 = time.time()
            # SIGTERM / SIGUSR1: a checkpoint inside the epoch, then a clean exit (the epoch's last
            # step writes the end-of-epoch checkpoint below)
            if preemption.stop_now() and it < steps_per_epoch - 1:
                save_epoch(ckpt_path, train_step.parts, device, 0, interval, epoch=epoch, step=step,
                           epoch_step=it + 1, args=vars(args))
                preemption.exit(ckpt_path, step)
        epoch += 1
        epoch_step = 0

        # end of the epoch: held-out PSNR of the EMA weights, online eval, checkpoint, grid
        with torch.no_grad(), train_step.autocast:
            recon = ema.decode(ema.encode(held_out))
        psnr = evaluate.psnr_per_image(held_out, recon).mean().item()
        metrics.write(step=step, epoch=epoch, held_out_psnr_ema=psnr)
        if args.eval_every and epoch % args.eval_every == 0:
            res = evaluate.reconstruction_metrics(ema, eval_loader, inception, device, ref)
            if res:
                metrics.write(step=step, epoch=epoch, eval_images=res["n"], eval_psnr=res["psnr"],
                              eval_rfid=res["rfid"])
        save_epoch(ckpt_path, train_step.parts, device, args.save_every, epoch=epoch, step=step,
                   args=vars(args))
        if rank == 0 and (epoch % args.vis_every == 0 or epoch == args.epochs):
            grid_path = os.path.join(args.out_dir, f"{stage}_recon_epoch{epoch:04d}.png")
            save_grid(grid_path, [held_out, recon])
        if preemption.agreed() and epoch < args.epochs:
            preemption.exit(ckpt_path, step)
    log.info(f"done: {ckpt_path}")

def common_args(parser):
    """Flags of both tokenizer stages (defaults: stage 1, paper Sec. 4.1 and the release's
    run_train_tokenizer.sh)."""
    p = parser.add_argument
    p("--data", help="ImageNet-style train folder (class sub-folders); omit with --demo")
    p("--data_list", help="optional `relative/path label` file list, like the authors' train.txt")
    p("--val_data", help="folder of the held-out images (default: the train folder)")
    p("--out_dir", help="the run's folder (rerun with it to resume); --demo: out/demo")
    p("--demo_images", type=int, help="size of the built-in dataset of --demo")
    p("--epochs", type=int, default=200)
    p("--batch_size", type=int, help="per process (default: derived from --global_batch, <= 64)")
    p("--global_batch", type=int, default=1024, help="by gradient accumulation on fewer GPUs")
    p("--blr", type=float, default=1e-4, help="lr = blr * global_batch / 256")
    p("--warmup_rate", type=float, default=0.25, help="warm-up: int(warmup_rate * epochs) epochs")
    p("--weight_decay", type=float, default=1e-4)
    p("--grad_clip", type=float, default=3.0)
    p("--ema", type=float, default=0.999)
    p("--rec_weight", type=float, default=1.0)
    p("--perceptual_weight", type=float, default=1.0)
    p("--convnext_weight", type=float, default=0.1, help="ConvNeXt-S term (release); 0: LPIPS only")
    p("--disc_weight", type=float, default=0.1, help="the release's effective weight (paper: 0.5)")
    p("--bf16_losses", action="store_true", help="LPIPS, ConvNeXt, PatchGAN in bf16 (release: no)")
    p("--save_every", type=int, default=0, help="also keep <stage>_epoch{E:04d}.pt every N epochs")
    p("--disc_start_epoch", type=int, default=100)
    p("--random_frozen_nets", action="store_true", help="random teacher / VGG / ConvNeXt (tests)")
    p("--workers", type=int, default=8)
    p("--seed", type=int, default=0)
    p("--reshuffle", action="store_true", help="a new data order every epoch (release: one order)")
    p("--log_every", type=int, default=50)
    p("--vis_every", type=int, default=5)
    p("--compile", action="store_true")
    p("--grad_ckpt", action="store_true", help="activation checkpointing: less memory, ~1/3 slower")
    p("--wandb", metavar="PROJECT", help="also send metrics and grids to Weights & Biases")
    p("--eval_every", type=int, default=0, help="every N epochs: PSNR + rFID of the EMA model")
    p("--eval_images", type=int, default=10_000)
    p("--fid_ref", help="rFID reference (evaluate.py --save_stats); default: the real images")
    p("--inception", help="FID Inception .pth (default: pytorch-fid's, downloaded once)")

def input_files(args):
    """The files both tokenizer stages may be given (for check_args), with what each must be."""
    return {"--inception": (args.inception, "FID Inception weights"),
            "--fid_ref": (args.fid_ref, ("an .npz", "a folder"))}

# --demo, both stages (README, quick start): 2,000 built-in 32-px images, lr 1e-3 at batch 16; no
# perceptual term (its VGG would be random: a demo downloads nothing, and it was most of a step's
# FLOPs) and no GAN (at this scale it costs PSNR and time), so the reconstructions visibly sharpen
# within minutes on 2 CPU cores.
DEMO_BOTH_STAGES = dict(demo_images=2000, global_batch=16, warmup_rate=0.1, ema=0.99,
                        perceptual_weight=0.0, convnext_weight=0.0, disc_weight=0.0,
                        random_frozen_nets=True, workers=0, log_every=25, vis_every=4,
                        eval_images=200)

# --demo, stage 1: a 16-channel latent of 4 x 4 tokens, the demo's teacher judge as the semantic
# teacher. Semantic weight 0.7, not the paper's 1.0 (Sec. 4.1): without the perceptual term the
# pixel side weighs less than in the release, and at 1.0 the demo's PSNR stayed under 24 dB
# (README, quick start).
DEMO = dict(DEMO_BOTH_STAGES, epochs=24, blr=1.6e-2, img_size=32, dim=16, patch_size=8,
            enc_size="demo", dec_size="tiny", sem_size="demo", teacher="judge", sem_weight=0.7)

def teacher_names(value):
    """--teacher: one name of pretrained.TEACHERS or the release's (dinov3, ...), several
    comma-separated, or judge (alone). Returns our names."""
    names = [pretrained.RELEASE_NAMES.get(n, n) for n in value.split(",")]
    known = [n for n in names if n in pretrained.TEACHERS or n == "judge" and len(names) == 1]
    if len(known) < len(names) or len(set(names)) < len(names):
        choices = ", ".join(sorted(pretrained.TEACHERS) + sorted(pretrained.RELEASE_NAMES))
        raise argparse.ArgumentTypeError(f"{value}: give names of {choices}, comma-separated and "
                                         "each once, or judge")
    return ",".join(names)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    p = parser.add_argument
    p("--dim", type=int, default=128, choices=[16, 32, 64, 128], help="latent channels per token")
    p("--img_size", type=int, default=256)
    p("--patch_size", type=int, default=16)
    p("--enc_size", default="base", choices=sorted(models.SIZES))
    p("--dec_size", default="base", choices=sorted(models.SIZES))
    p("--sem_size", default="tiny", choices=sorted(models.SIZES))
    p("--sem_type", default="transformer", choices=["transformer", "mlp"])
    p("--teacher", type=teacher_names, help="default: DINOv2 ViT-L below dim 64, DINOv3 ViT-L "
      "from 64; several, comma-separated (Tab. 6); judge: the demo's teacher judge (demo.py); of: "
      + ", ".join(sorted(pretrained.TEACHERS)) + " (or the release's names: "
      + ", ".join(sorted(pretrained.RELEASE_NAMES)) + ")")
    p("--teacher_ckpt", help="the teacher's weight file (default: downloaded; DINOv3's is gated); "
      "several teachers: comma-separated, in --teacher's order, empty: downloaded")
    p("--teacher_size", default="large", choices=sorted(pretrained.TEACHER_SIZES),
      help="of random teacher weights (tiny: tests); a weight file has its own")
    p("--mask_ratio", type=float, default=0.4, help="RAD: max(0, U(mask_ratio_min, mask_ratio))")
    p("--mask_ratio_min", type=float, default=-0.1)
    p("--gamma", type=float, default=1.0, help="FSD noise scale; 0 = no forward-flow noise")
    p("--noise_schedule", default="shift", choices=["shift", "uniform", "lognorm"])
    p("--no_fsd", action="store_true", help="ablation: the semantic decoder reads z, not z_t")
    p("--sem_target", default="all", choices=["all", "masked"],
      help="semantic loss on every position (release) or the masked ones (paper's RAD text)")
    p("--teacher_input", default="release", choices=["release", "direct"],
      help="the release's teacher preprocessing (DINOv3: uint8, 224 px and back) or Meta's")
    p("--teacher_rope_rescale", type=float, default=2.0,
      help="DINOv3 RoPE coords x log-uniform [1/r, r] per forward (release); 1: none")
    p("--no_kl", action="store_true", help="ablation: a plain autoencoder (deterministic z, no KL)")
    p("--kl_weight", type=float, default=1e-6)
    p("--sem_weight", type=float, default=1.0)
    args = parse_args(parser, DEMO, argv)
    if args.sem_target == "masked" and (args.sem_type == "mlp" or args.mask_ratio <= 0):
        parser.error("--sem_target masked needs --sem_type transformer and --mask_ratio > 0")
    names = (args.teacher or ("dinov2_vitl14" if args.dim < 64 else "dinov3_vitl16")).split(",")
    ckpts = (args.teacher_ckpt or "").split(",")
    ckpts = ckpts + [""] * (len(names) - len(ckpts))
    use_file = args.sem_weight > 0 and not args.random_frozen_nets and names != ["judge"]
    entries = [pretrained.TEACHERS.get(n, pretrained.Teacher(None)) for n in names]  # judge: none
    gated = [e.gated for e, c in zip(entries, ckpts) if use_file and e.gated and not c]
    teacher_files = {"--teacher_ckpt" + (f" ({n})" if len(names) > 1 else ""): (c or None, e.kind)
                     for n, c, e in zip(names, ckpts, entries)}
    check_args(args, [args.patch_size > 0 and args.img_size % args.patch_size
                      and f"--img_size {args.img_size} is not a multiple of --patch_size "
                      f"{args.patch_size}",
                      not (args.data or args.demo)
                      and "--data is required (an ImageNet-style train folder), or use --demo",
                      len(ckpts) > len(names) and f"--teacher_ckpt: {len(ckpts)} files for "
                      f"{len(names)} teachers", *gated],
               dict(input_files(args), **teacher_files))
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
    start_log(args, "tokenizer", rank, world, device)
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
    # the frozen teacher of FSD (pretrained.TEACHERS), several at once by their names in the
    # release's checkpoints, or the demo's teacher judge
    grid = args.img_size // args.patch_size
    teacher = None
    if args.sem_weight > 0 and names == ["judge"]:
        teacher = demo.judge(args.out_dir, args.img_size, device, "teacher", grid)[0]
    elif args.sem_weight > 0 and len(names) == 1:
        teacher = pretrained.load_teacher(names[0], grid, args, ckpts[0] or None).to(device)
    elif args.sem_weight > 0:
        teacher = nn.ModuleDict({pretrained.release_key(n): pretrained.load_teacher(n, grid, args, c
                                                                                    or None)
                                 for n, c in zip(names, ckpts)}).to(device)
    several = isinstance(teacher, nn.ModuleDict)
    model = models.Tokenizer(img_size=args.img_size, patch_size=args.patch_size, dim=args.dim,
                             enc_size=args.enc_size, dec_size=args.dec_size,
                             sem_size=args.sem_size, sem_type=args.sem_type,
                             teacher_dim=teacher.dim if teacher and not several else 0,
                             teachers={k: t.dim for k, t in teacher.items()} if several else None,
                             mask_ratio=args.mask_ratio, mask_ratio_min=args.mask_ratio_min,
                             gamma=args.gamma, noise_schedule=args.noise_schedule,
                             sem_noisy=not args.no_fsd, kl=not args.no_kl)
    model.to(device)  # its construction arguments go into every checkpoint (model_args)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    train(args, "tokenizer", model, ema, teacher, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
