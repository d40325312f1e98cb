"""Throughput benchmark on synthetic inputs and random weights (no dataset, no downloads).

  python bench.py                       # GPU: real sizes (ViT-B/B + DINOv3-L, DiT^DH-XL);
                                        # CPU: small sizes
  python bench.py --compile --only dit  # one part, with torch.compile
  python bench.py --data /data/imagenet/train --workers 8   # also the JPEG decode + ADM crop rate
  timeout 480 python bench.py --check --compile   # the prepared H200 run

Each part: one eager call counts FLOPs (torch.utils.flop_counter), timed warm-up calls (compilation
included), then --repeats synchronised runs of --steps calls: median images/s per device, peak
memory, on CUDA MFU vs --peak_tflops.
"""
import argparse
import copy
import resource
import statistics
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import evaluate
import models
import pretrained
import train_dit
import train_tokenizer
from models import euler_sample

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def measure(name, fn, images_per_call, args, device, calls=None):
    """One table row (module docstring); FLOPs of an eager call, so that nothing compiles under the
    counter."""
    if calls:  # calls: where one call is long
        warmup = calls
        steps = calls
    else:
        warmup = args.warmup
        steps = args.steps
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_total_flops()
    def seconds(n):  # of n calls, the device synchronised before and after
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return time.perf_counter() - t0
    warmup_s = seconds(warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rate = statistics.median([steps * images_per_call / seconds(steps)
                              for _ in range(args.repeats)])
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    if device.type == "cuda":
        mfu = f"{100 * flops * rate / images_per_call / (args.peak_tflops * 1e12):5.1f}%"
    else:
        mfu = "-"
    print(f"| {name:<42} | {rate:9.2f} | {memory:7.2f} | "
          f"{flops / images_per_call / 1e9:9.1f} | {mfu:>6} | "
          f"{warmup_s:9.1f} |", flush=True)

def check_precision(size, device, autocast, compile):
    """Relative errors of `autocast` (+ torch.compile) against fp32 eager on one DiT^DH: the loss
    and the gradient of one training step (same t and eps), and one 8-point sampler run with CFG
    (bf16 on CPU too)."""
    dit = models.DiTDH(size, 128, 16).to(device)
    with torch.no_grad():  # the zero-initialised output layers would make the comparison vacuous
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    z = torch.randn(8, 128, 16, 16, device=device)
    y = torch.arange(8, device=device)
    def run(precision):
        torch.manual_seed(0)
        dit.zero_grad()
        with precision:
            loss = models.flow_loss(dit.train(), z, y)
            loss.backward()
            x = euler_sample(dit.eval(), z, y, 8, cfg=1.5)  # euler_sample runs under no_grad itself
        return (loss.float(),
                torch.cat([p.grad.flatten() for p in dit.parameters() if p.grad is not None]),
                x.float())
    fp32 = run(torch.autocast(device.type, enabled=False))
    if compile:
        for block in dit.blocks:
            block.compile()
    return [((a - b).norm() / b.norm()).item() for a, b in zip(run(autocast), fp32)]

def bench_tokenizer(args, device, autocast):
    """(a) One full stage-1 step: encoder + pixel and semantic decoders, teacher, LPIPS, PatchGAN,
    both optimisers, EMA. Under --dtype bf16, once with the loss networks in fp32 (the release) and
    once in bf16."""
    opts = SimpleNamespace(blr=1e-4, global_batch=args.batch_size,
                           convnext_weight=args.convnext_weight, grad_clip=3.0,
                           random_frozen_nets=True, weight_decay=1e-4, compile=args.compile,
                           sem_target="all", grad_ckpt=args.grad_ckpt,
                           rec_weight=1.0, perceptual_weight=1.0, kl_weight=1e-6, sem_weight=1.0,
                           disc_weight=0.1, ema=0.999, teacher_size=args.teacher_size,
                           teacher_input="release", teacher_rope_rescale=1.0)
    teacher = pretrained.load_teacher("dinov3_vitl16", args.img_size // 16, opts)
    teacher.to(device)
    model = models.Tokenizer(args.img_size, 16, 128, args.tok_size, args.tok_size,
                             teacher_dim=teacher.dim).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = train_tokenizer.TokenizerStep(opts, model, ema, teacher, device, 1)
    step.autocast = autocast  # --dtype fp32 compares against full precision
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device) * 2 - 1
    for opts.bf16_losses in (False, True) if args.dtype == "bf16" else (False,):
        measure(f"tokenizer step ({args.tok_size}, {args.img_size}px, "
                f"{'bf16' if opts.bf16_losses else 'fp32'} losses)",
                lambda: step([x], 1e-4, True), args.batch_size, args, device)

def bench_dit(args, device, autocast):
    """(b) One DiT^DH training step; (c) Euler sampling, plain, CFG and AutoGuidance."""
    dit = models.DiTDH(args.dit_size, 128, 16).to(device)
    opts = SimpleNamespace(lr=2e-4, ema=0.9995, grad_clip=1.0, compile=args.compile,
                           grad_ckpt=args.grad_ckpt)
    step = train_dit.DiTStep(opts, dit, device, 1)
    step.autocast = autocast
    z = torch.randn(args.batch_size, 128, 16, 16, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    measure(f"DiT^DH-{args.dit_size} train step", lambda: step([(z, y)], 2e-4), args.batch_size,
            args, device)
    dit.eval()  # its blocks are compiled already when --compile
    guide = models.DiTDH("S", 128, 16).to(device).eval()
    if args.compile:
        for block in guide.blocks:
            block.compile()
    for name, cfg, g in (("plain", 1.0, None), ("CFG 1.5", 1.5, None),
                         ("AutoGuidance 1.29", 1.29, guide)):
        def run():
            with torch.no_grad(), autocast:
                euler_sample(dit, z, y, args.sample_steps, cfg, g)
        measure(f"sample DiT^DH-{args.dit_size}, {args.sample_steps} pts, {name}", run,
                args.batch_size, args, device,
                calls=1)  # one call is already sample_steps - 1 forwards

def bench_inception(args, device, autocast):
    """(d) FID Inception features (fp32, TF32 off, as evaluate.py runs it)."""
    net = pretrained.load_inception("random").to(device)
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8,
                      device=device)
    measure("Inception-v3 features", lambda: evaluate.inception_features(net, [x]), args.batch_size,
            args, device)

def bench_data(args):
    """(e) JPEG decode + ADM centre crop per loader worker."""
    dataset = data.ImageFolder(args.data, args.img_size)
    n = min(len(dataset), 200 * max(args.workers, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=50,
                                         num_workers=args.workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    rate = n / (time.perf_counter() - t0) / max(args.workers, 1)
    print(f"| {'data: decode + crop, per worker':<42} | {rate:9.2f} | "
          f"{'-':>7} | {'-':>9} | {'-':>6} | {'-':>9} |")

def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--only", choices=["tokenizer", "dit", "inception", "data"], help="run one part")
    p("--check", action="store_true",
      help="first compare --dtype (+ --compile) against fp32 eager on DiT^DH-S")
    p("--batch_size", type=int, default=64 if cuda else 2)
    p("--img_size", type=int, default=256 if cuda else 128)
    p("--tok_size", default="base" if cuda else "small", choices=sorted(models.SIZES))
    p("--teacher_size", default="large" if cuda else "tiny",
      choices=sorted(pretrained.TEACHER_SIZES))
    p("--convnext_weight", type=float, default=0.1, help="0 drops the ConvNeXt-S perceptual term")
    p("--dit_size", default="XL" if cuda else "S", choices=list(models.DIT_SIZES))
    p("--sample_steps", type=int, default=50 if cuda else 5, help="Euler grid points")
    p("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp32"],
      help="autocast (bf16 on CPU is slow)")
    p("--compile", action="store_true")
    p("--grad_ckpt", action="store_true",
      help="the training steps with activation checkpointing (its price)")
    p("--warmup", type=int, help="calls before timing, after the eager one that counts FLOPs "
      "(default: 3 on CUDA; on CPU 1 with --compile, else 0)")
    p("--steps", type=int, default=10 if cuda else 1)
    p("--repeats", type=int, default=3 if cuda else 2)
    p("--peak_tflops", type=float, default=989.0,
      help="dense bf16 peak of one device (H100/H200: 989)")
    p("--data", help="folder of JPEGs for the data-pipeline rate")
    p("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.warmup is None:
        if cuda:
            args.warmup = 3
        else:
            args.warmup = int(args.compile)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, batch {args.batch_size}, {args.dtype}, "
          f"compile {args.compile}\n")
    if args.check:
        errors = check_precision("S", device, autocast, args.compile)
        print(f"precision check, {args.dtype} + compile {args.compile} against fp32 eager on "
              "DiT^DH-S, relative error of loss / gradient / sampler: "
              + " / ".join(f"{e:.1e}" for e in errors)
              + f" -> {'OK' if max(errors) < 2e-2 else 'FAILED (bf16 tolerance is 2e-2)'}\n",
              flush=True)
    print(f"| {'part':<42} | {'images/s':>9} | {'mem GiB':>7} | {'GFLOP/img':>9} | {'MFU':>6} | "
          f"{'warm-up s':>9} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 8}|{'-' * 11}|")
    for part, fn in (("tokenizer", bench_tokenizer), ("dit", bench_dit),
                     ("inception", bench_inception)):
        if args.only in (None, part):
            fn(args, device, autocast)
    if args.data and args.only in (None, "data"):
        bench_data(args)
    print(f"\n{time.perf_counter() - start:.0f} s in all")

if __name__ == "__main__":
    main()
