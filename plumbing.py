"""Robustness machinery shared by every stage, off the reader's path: install and argument checks,
the log and metrics (optionally mirrored to Weights & Biases), progress lines, non-finite steps,
preemption, RNG state, atomic checkpoints and exact resume, and sample.py's resumable output. Which
file imports which: README, "How the code is laid out".
"""
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw

import data
import models
import pretrained

log = logging.getLogger("rectok")
wandb = None  # the wandb module, imported by start_log() on rank 0 when --wandb is given

# ---- Processes
# requirements.txt pins this pair (a test keeps them equal)
TESTED_PAIR = "torch==2.14.1 torchvision==0.29.1"

def install_problem(torch_version, torchvision_version, have_lpips):
    """What is wrong with the installed torch / torchvision / lpips, in one line (None: nothing).
    torch 2.N's torchvision is 0.(N+15), built for the same device kind: a '+cpu' torch beside a
    CUDA torchvision fails only inside `import lpips`, minutes into stage 1
    ("torchvision::nms does not exist")."""
    if torchvision_version is None:
        return (f"torchvision is not installed (torch {torch_version}): "
                "pip install -r requirements.txt")
    if not have_lpips:
        return "lpips is not installed: pip install -r requirements.txt"
    torch_minor = int(torch_version.split(".")[1])
    vision_minor = int(torchvision_version.split(".")[1])
    torch_cpu = torch_version.endswith("+cpu")
    vision_cpu = torchvision_version.endswith("+cpu")
    # no '+': PyPI's default build, either kind
    vision_gpu = "+" in torchvision_version and not vision_cpu
    if vision_minor != torch_minor + 15:
        why = f"torch 2.{torch_minor} needs torchvision 0.{torch_minor + 15}"
    elif torch_cpu and vision_gpu:
        why = "a CPU-only torch needs torchvision's CPU-only build"
    else:
        return None
    return (f"torch {torch_version} and torchvision {torchvision_version} "
            f"do not go together ({why}): "
            f"pip install --force-reinstall {TESTED_PAIR} (add --index-url "
            "https://download.pytorch.org/whl/cpu for the CPU-only builds)")

def check_install():
    """install_problem of this environment, read without importing torchvision (which is what would
    fail)."""
    spec = importlib.util.find_spec("torchvision")
    version = None
    if spec is not None:
        with open(os.path.join(spec.submodule_search_locations[0], "version.py")) as f:
            version = re.search(r"__version__ = '([^']+)'", f.read()).group(1)
    problem = install_problem(torch.__version__, version,
                              importlib.util.find_spec("lpips") is not None)
    if problem:
        raise SystemExit(problem)

# a derived per-process batch is at most this (the fixed --batch_size default before)
MAX_BATCH = 64

def parse_args(parser, demo, argv=None):
    """The flags (argv: sys.argv's by default). --demo makes the script's recipe `demo` the
    defaults, in the folder out/demo; flags given explicitly still win, and --help lists the recipe.
    Outside --demo, check_args asks for --out_dir: a shared default would resume (or overwrite)
    another run. --batch_size not given (None): derived, see per_process_batch."""
    recipe = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in demo.items())
    parser.add_argument("--demo", action="store_true",
                        help=f"the CPU demo on built-in data in out/demo: {recipe}")
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**demo, out_dir="out/demo")
        args = parser.parse_args(argv)
    if getattr(args, "batch_size", 0) is None:
        args.batch_size = per_process_batch(args.global_batch,
                                            int(os.environ.get("WORLD_SIZE", 1)), MAX_BATCH)
    return args

def per_process_batch(global_batch, world, max_batch):
    """The largest per-process batch <= max_batch that splits the global batch evenly over the
    `world` processes (the rest by gradient accumulation); None if the processes cannot share it
    (check_args then says so)."""
    if global_batch < 1 or global_batch % world:
        return None
    share = global_batch // world
    return next(b for b in range(min(share, max_batch), 0, -1) if share % b == 0)

INF = float("inf")
RANGES = {  # closed intervals of the numeric flags; check_args applies the ones a script has
    **dict.fromkeys("img_size patch_size image_size batch_size global_batch per_proc_batch epochs "
                    "probe_epochs demo_images num_images eval_images probe_images log_every "
                    "vis_every search_images teacher_rope_rescale".split(), (1, INF)),
    **dict.fromkeys("workers eval_every disc_start_epoch decay_start_epoch decay_end_epoch blr lr "
                    "min_lr probe_lr grad_clip weight_decay gamma rec_weight perceptual_weight "
                    "convnext_weight disc_weight kl_weight sem_weight save_every".split(),
                    (0, INF)),
    "warmup_rate": (0, 1), "ema": (0, 1), "mask_ratio": (0, 1), "mask_ratio_min": (-1, 1),
    "cfg": (1, INF), "steps": (2, INF), "sample_steps": (2, INF)}

def check_args(args, problems=(), files=None, ranges=None):
    """Every out-of-range numeric flag, missing folder, file that is not what its flag needs
    (`files`: flag -> (path or None, what it should be: one kind of KINDS or a tuple of them)) and
    given problem (None: no problem) in one line, before any model is built, so that one run of the
    command shows everything there is to fix. `ranges`: a script's own intervals, over RANGES. A
    broken install comes first, on its own: nothing else can be trusted to run."""
    check_install()
    ranges = dict(RANGES, **(ranges or {}))
    bad = [f"--{k} {v}: must be " + (f">= {lo}" if hi == INF else f"in [{lo}, {hi}]")
           for k, (lo, hi) in ranges.items()
           if (v := getattr(args, k, None)) is not None and not lo <= v <= hi]
    bad += [f"--{k} {v}: no such folder" for k in ("data", "val_data")
            if (v := getattr(args, k, None)) and not os.path.isdir(v)]
    # torchrun's, known before any setup
    bad.append(batch_problem(args, int(os.environ.get("WORLD_SIZE", 1))))
    if "out_dir" in vars(args) and not args.out_dir:
        bad.append("--out_dir is needed outside --demo "
                   "(the run's folder; the same one again resumes it)")
    for flag, (path, wanted) in (files or {}).items():
        if path not in (None, "random"):
            bad.append(file_problem(flag, path, *([wanted] if isinstance(wanted, str) else wanted)))
    bad += [p for p in problems if p]
    bad = [b for b in bad if b]
    if bad:
        raise SystemExit("; ".join(bad))

def batch_problem(args, world):
    """The global batch must split evenly over the processes and their per-process batches (a
    training script's flags; None: no problem, or a flag out of range, which RANGES reports)."""
    global_batch = getattr(args, "global_batch", 0)
    batch_size = getattr(args, "batch_size", 0)
    if global_batch is None or global_batch < 1 or (batch_size is not None and batch_size < 1):
        return None
    if batch_size is None:
        return (f"--global_batch {global_batch} cannot be split over {world} processes: "
                "give another --global_batch")
    if global_batch % (batch_size * world):
        return (f"--global_batch {global_batch} is not a multiple of --batch_size x processes = "
                f"{batch_size} x {world}: give another --batch_size, or none (then it is derived)")

# what a file given to a flag holds, told by a key that only that kind has
# (in the checkpoint's model state dict)
KINDS = {"a tokenizer checkpoint": "encoder.latent_head.weight",
         "a DiT^DH checkpoint": "s_embedder.proj.weight",
         **{t.kind: t.marker for t in pretrained.TEACHERS.values()},  # "DINOv2/v3 weights", ...
         "FID Inception weights": "Conv2d_1a_3x3.conv.weight",
         "latent statistics": "std"}

def file_kinds(path):
    """What `path` is, as a list of KINDS (a DiT^DH checkpoint also holds latent statistics), or in
    words."""
    path = pretrained.released_file(path)
    if not os.path.isfile(path):
        return ["a folder" if os.path.isdir(path) else "missing"]
    if path.endswith(".npz"):
        return ["an .npz"]
    try:
        # zip-format files are memory-mapped, so a multi-GB checkpoint is not read twice
        with open(path, "rb") as f:
            ckpt = pretrained.read_file(path, mmap=f.read(2) == b"PK")
    except SystemExit:
        return ["no PyTorch checkpoint, or a corrupt or truncated one (then delete it to start its "
                "stage again, or point at the previous milestone)"]
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    sd = ckpt.get("model_ema", ckpt.get("model", ckpt))
    found = [kind for kind, key in KINDS.items()
             if key in sd or key in (ckpt.get("latent_stats") or {})]
    return found or [f"a file of {', '.join(list(sd)[:3]) or 'no named entries'}, ..."]

def file_problem(flag, path, *wanted):
    """None if `path`, given to `flag`, is one of the `wanted` kinds, else one line: what it should
    be, what it is."""
    kinds = file_kinds(path)
    if not set(kinds) & set(wanted):
        return f"{flag} {path}: should be {' or '.join(wanted)}; it is {' + '.join(kinds)}"

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def start_log(args, stage, rank, world, device):
    """Log to the console and <out_dir>/<stage>.log (rank 0; the others warn only), and start the
    optional Weights & Biases run (--wandb)."""
    os.makedirs(args.out_dir, exist_ok=True)
    handlers = [logging.StreamHandler()]
    if rank == 0:
        handlers.append(logging.FileHandler(os.path.join(args.out_dir, f"{stage}.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format=f"%(asctime)s [{stage}] %(message)s", datefmt="%H:%M:%S", force=True)
    log.info(f"{world} process(es) on {device.type}; args: {json.dumps(vars(args))}")
    # mirror metrics.jsonl and the grids to the authors' logger
    if getattr(args, "wandb", None) and rank == 0:
        global wandb
        try:  # imported only here: the package is needed only when the flag is given
            import wandb
        except ImportError:
            raise SystemExit("--wandb: the wandb package is not installed (pip install wandb), "
                             "or drop the flag")
        wandb.init(project=args.wandb,
                   name=f"{os.path.basename(os.path.abspath(args.out_dir))}-{stage}",
                   group=os.path.abspath(args.out_dir), job_type=stage, config=vars(args),
                   dir=args.out_dir)

def barrier():
    if dist.is_initialized():
        dist.barrier()

def gather_rows(x, n, strided=False):
    """Every rank's equal-size block of rows, in rank order, cut to the first n. strided: the blocks
    of a DistributedSampler(shuffle=False) (rank r holds rows r, r + world, ...), put back in
    dataset order."""
    if not dist.is_initialized():
        return x[:n]
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return (torch.stack(parts, 1).flatten(0, 1) if strided else torch.cat(parts))[:n]

def reduce_for_log(tensors, world):
    """The only host sync of a step, on log steps only: average over ranks, then .tolist()."""
    stats = torch.stack([t.float() for t in tensors])
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.AVG)
    return stats.tolist()

def check_ranks_agree(*modules):
    """Cheap DDP sanity check at every checkpoint: all ranks must hold the same weights (model and
    EMA)."""
    if not dist.is_initialized():
        return
    checksum = torch.stack([p.detach().double().sum()
                            for m in modules for p in m.parameters()]).sum().cpu()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, checksum.item())
    # by repr: NaN weights are save_epoch's to refuse, not a divergence
    if len(set(map(repr, sums))) != 1:
        raise RuntimeError(f"DDP ranks diverged: parameter checksums {sums}")
    log.info(f"weights identical on {len(sums)} ranks (checksum {sums[0]:.6f})")

class Progress:
    """A log line at most every `every` seconds for a long phase: done / total, rate and time
    left."""

    def __init__(self, what, total, every=10.0):
        self.what = what
        self.total = total
        self.every = every
        self.done = 0
        self.start = time.time()
        self.last = self.start

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            if self.total and rate > 0:
                left = f", {(self.total - self.done) / rate / 60:.1f} min left"
            else:
                left = ""
            log.info(f"{self.what}: {self.done}/{self.total or '?'} images, "
                     f"{rate:.3g} images/s{left}")

# ---- Non-finite steps are skipped, not applied (every training loop)
# that many non-finite steps in a row stop the run: the settings or data are at fault
SKIPPED_IN_A_ROW = 20

def all_finite(*tensors):
    """The step's flag, a 0-dim bool tensor on the device: every loss and grad norm is finite on
    every rank. The ranks' flags are all-reduced (one number, queued like DDP's all-reduce: no host
    sync), so that every rank skips the same steps and the weights stay identical."""
    finite = torch.stack([t.detach().float() for t in tensors]).isfinite().all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.bool()

def keep_buffers_if(finite, module, before):
    """A skipped step's buffer updates undone, on the device (`before`: copies of module's buffers
    taken before the step, e.g. the PatchGAN's BatchNorm statistics, which every train-mode forward
    moves); a finite step's kept exactly."""
    for b, old in zip(module.buffers(), before):
        b.copy_(torch.where(finite, b, old))

class LogInterval:
    """What one metrics row averages (last_good: the checkpoint named if the run must stop): each
    value summed over the interval's steps (a skipped step adds 0, so its NaN stays out), the count
    of skipped steps, and the longest run of them in a row (carried across rows). Device tensors,
    read once per row; every rank's copy goes into a mid-epoch checkpoint, so the rows of a run
    resumed inside an epoch are the uninterrupted run's."""

    def __init__(self, device, last_good):
        self.device = device
        self.last_good = last_good
        self.sums = {}
        self.steps = 0
        self.skipped = torch.zeros((), device=device)
        self.in_a_row = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)

    def add(self, finite, values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(finite, v, 0)
        self.steps += 1
        self.skipped = self.skipped + (~finite).float()
        self.in_a_row = (self.in_a_row + 1) * (~finite).float()
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def row(self, world):
        """The interval's averages over its finite steps and `skipped` (one host sync, with the
        all-reduce over ranks), then a new interval. SKIPPED_IN_A_ROW non-finite steps in a row stop
        the run in one line."""
        names = sorted(self.sums)
        stats = reduce_for_log([self.sums[k] / self.steps for k in names]
                               + [self.skipped, self.longest], world)
        skipped = round(stats[-2])
        if round(stats[-1]) >= SKIPPED_IN_A_ROW:
            raise SystemExit(f"{round(stats[-1])} non-finite steps in a row "
                             "(each skipped, the weights kept): "
                             f"stopped; the last good checkpoint is {self.last_good} "
                             "(lower the learning rate or check "
                             "the data, then rerun to resume from it)")
        finite = self.steps - skipped
        scale = self.steps / finite if finite else math.nan  # averages over the finite steps only
        record = {k: v * scale if skipped else v for k, v in zip(names, stats)}
        self.sums = {}
        self.steps = 0
        self.skipped = torch.zeros((), device=self.device)
        self.longest = self.in_a_row
        return dict(record, skipped=skipped)

    def state_dict(self):
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "steps": self.steps,
                "skipped": self.skipped.cpu(), "in_a_row": self.in_a_row.cpu(),
                "longest": self.longest.cpu()}

    def load_state_dict(self, state):
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.steps = state["steps"]
        self.skipped = state["skipped"].to(self.device)
        self.in_a_row = state["in_a_row"].to(self.device)
        self.longest = state["longest"].to(self.device)

# ---- Preemption: stop after a step, with a checkpoint
class Preemption:
    """SIGTERM (what SLURM, Kubernetes and torchrun send before a kill) or SIGUSR1 (SLURM's
    --signal=USR1@120) asks the run to stop after the current step and write a checkpoint inside the
    epoch. Installed before the loader starts its workers, which inherit it: a SIGTERM sent to the
    whole job does not kill them under the training process. With several ranks the flags are
    all-reduced (max) each step and read one step later, when the next step is already queued on the
    device (no pipeline bubble): every rank stops after the same step, whichever rank got the
    signal."""

    def __init__(self, device):
        self.device = device
        self.requested = False
        self.pending = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self.request)

    def request(self, signum, frame):
        self.requested = True

    def any_rank(self):
        """1 if any rank got a signal, as a device tensor (the all-reduce is queued, not waited
        for)."""
        flag = torch.full((), float(self.requested), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def stop_now(self):
        if not dist.is_initialized():
            return self.requested
        previous = self.pending
        self.pending = self.any_rank()
        return previous is not None and previous.item() > 0

    def agreed(self):
        """Every rank's flag, all-reduced and read now (a host sync: for an epoch's end)."""
        return self.any_rank().item() > 0

    def exit(self, path, step):
        """After the checkpoint: one line and a clean exit (status 0), on every rank."""
        log.info(f"stopped on a signal after step {step}: {path} holds it; "
                 "the same command resumes from there")
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(0)

# ---- RNG state and checkpoints
def rng_state(device, interval=None):
    """This rank's RNG states (and its log interval's sums, inside an epoch), gathered from every
    rank (each rank draws its own masks and noise, and sums its own losses)."""
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if interval is not None:
        state["interval"] = interval.state_dict()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states

def set_rng_state(states, rank, device, interval):
    if len(states) != rank_world()[1]:
        log.warning(f"resuming {len(states)} process(es)' run on {rank_world()[1]}: "
                    "the model, optimisers, EMA and schedule continue; "
                    "the data order of the rest of the run and the RNG streams differ")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and states[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)
    if "interval" in states[rank]:
        interval.load_state_dict(states[rank]["interval"])

def check_resume(path, saved_args, args, keys):
    """Refuse, in one line, to resume a checkpoint whose model settings or global batch (`keys`)
    differ from the command's (another number of GPUs is fine: the global batch fixes the steps and
    the schedule)."""
    differ = [f"--{k} {saved_args[k]} (checkpoint) vs {getattr(args, k)}" for k in keys
              if k in saved_args and saved_args[k] != getattr(args, k)]
    if differ:
        raise SystemExit(f"{path} was trained with other settings: {', '.join(differ)}; "
                         "give another --out_dir for a new run, "
                         "or the checkpoint's settings to resume it")

def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename, so a crash never leaves a half-written
    checkpoint. A failed write (disk full, permissions) is one line, and the previous checkpoint
    stays as it was."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    # torch.save's C++ writer reports a full disk as a RuntimeError
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"could not write {path} ({str(e).splitlines()[0]}); "
                         "the previous checkpoint is intact: "
                         "free space or fix permissions, then rerun the command to resume from it")
    log.info(f"saved {path}")

def non_finite(parts):
    """The first module weight in `parts` that holds a NaN or inf, or None."""
    for key, part in parts.items():
        if isinstance(part, nn.Module):
            for name, t in part.state_dict().items():
                if t.is_floating_point() and not t.isfinite().all():
                    return f"{key}.{name}"
    return None

def save_epoch(path, parts, device, save_every, interval=None, **state):
    """At the end of an epoch, or inside one (state's epoch_step > 0, with `interval`, the open log
    interval): `parts` (modules, optimisers) by key, every rank's RNG state and `state`, written by
    rank 0; at an epoch end every save_every epochs also kept as <path>_epoch{E:04d}.pt (E from 0:
    the release's epoch_0599 = 600 epochs). All ranks must hold the same weights; non-finite ones
    are never written over a good checkpoint; a failed write stops every rank."""
    check_ranks_agree(*[part for part in parts.values() if isinstance(part, nn.Module)])
    bad = non_finite(parts)
    if bad:
        raise SystemExit(f"non-finite weights ({bad}) at step {state['step']}: not saved; "
                         f"the last good checkpoint is {path}")
    state = dict({k: part.state_dict() for k, part in parts.items()},
                 rng=rng_state(device, interval), **state)
    # what rebuilds the model (models.load_tokenizer / load_dit)
    state["model_args"] = parts["model"].model_args
    problem = [None]
    if rank_world()[0] == 0:
        try:
            save_checkpoint(path, state)
            if save_every and not state.get("epoch_step") and state["epoch"] % save_every == 0:
                save_checkpoint(path.replace(".pt", f"_epoch{state['epoch'] - 1:04d}.pt"), state)
        except SystemExit as e:
            problem = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise SystemExit(problem[0])

def resume(path, args, keys, parts, device, interval, loader, images_per_step):
    """Where the run stands, (epoch, step, steps of that epoch done): zeros without a checkpoint at
    `path`; else save_epoch's
    checkpoint back into `parts` (other shapes: one line), after checking its settings `keys`
    (check_resume), with this rank's RNG and log interval, and the loader set to skip the batches of
    the epoch done already (a run stopped inside it)."""
    if not os.path.exists(path):
        return 0, 0, 0
    ckpt = models.read_checkpoint(path)
    check_resume(path, ckpt["args"], args, keys)
    for k, part in parts.items():
        models.load_state(part, ckpt[k], path)
    set_rng_state(ckpt["rng"], rank_world()[0], device, interval)
    epoch_step = ckpt.get("epoch_step", 0)
    loader.sampler.skip = epoch_step * images_per_step
    log.info(f"resumed from {path} at epoch {ckpt['epoch']}, step {ckpt['step']}"
             + (f" ({epoch_step} steps into the epoch)" if epoch_step else ""))
    return ckpt["epoch"], ckpt["step"], epoch_step

# ---- What a run leaves to look at
class Metrics:
    """One log line and one JSON object in <out_dir>/metrics.jsonl (the source of truth) per record,
    mirrored to Weights & Biases with --wandb. A run (re)starting at `step` drops this stage's rows
    past it: one row per step."""

    def __init__(self, out_dir, stage, rank, step=0):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.stage = stage
        self.rank = rank
        if rank == 0 and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [json.loads(line) for line in f]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows
                             if r["stage"] != stage or r.get("step", 0) <= step)
            os.replace(self.path + ".tmp", self.path)

    def write(self, **record):
        if self.rank != 0:
            return
        record = {"stage": self.stage,
                  **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}}
        log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in record.items() if k != "stage"))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb is not None:
            wandb.log({f"{self.stage}/{k}": v for k, v in record.items() if k != "stage"},
                      step=record.get("step"))

def wandb_summary(results):
    """evaluate.py's results (its JSON) as the Weights & Biases run summary, when --wandb is on."""
    if wandb is not None:
        wandb.run.summary.update(results)

LABEL_HEIGHT = 16  # px of the strip of column labels above a grid

def save_grid(path, rows, labels=()):
    """Save rows of [-1, 1] image batches as one PNG (one batch per row); small images are
    enlarged; `labels`, one per column, are written in a white strip above the columns."""
    grid = np.concatenate([np.concatenate(list(data.to_uint8(r).permute(0, 2, 3, 1).cpu().numpy()),
                                          axis=1)
                           for r in rows], axis=0)
    scale = max(1, 128 // rows[0].shape[-1])
    image = Image.fromarray(grid.repeat(scale, 0).repeat(scale, 1))
    if labels:
        framed = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "white")
        framed.paste(image, (0, LABEL_HEIGHT))
        draw = ImageDraw.Draw(framed)
        column = image.width // len(labels)
        for i, label in enumerate(labels):
            draw.text((i * column + 4, 3), label, fill="black")
        image = framed
    image.save(path)
    log.info(f"wrote {path}")
    if wandb is not None:  # attached to the next metrics record's step
        wandb.log({os.path.splitext(os.path.basename(path))[0]: wandb.Image(path)}, commit=False)

# ---- sample.py's resumable output: one memory-mapped array shared by all ranks plus a `done` flag
# per image, so a rerun with the same settings finishes the job, and one with more --num_images
# extends a finished one (image i does not depend on the count).

def open_output(out, settings, size, rank):
    """(images, done) memory maps for settings["num_images"] images of `out`, or None if `out`
    already holds them. An earlier run into `out` with other settings is refused in one line."""
    n = settings["num_images"]
    # the .npy files: a run under way
    finished = os.path.exists(out) and not os.path.exists(out + ".done.npy")
    # what an earlier run into `out` was asked for ({}: not recorded)
    old = {} if finished else None
    if os.path.exists(out + ".settings.json"):
        with open(out + ".settings.json") as f:
            old = json.load(f)
    if old is not None:
        extend = finished and n > old.get("num_images", n)
        differ = [f"--{k} {old.get(k)} (now {v})" for k, v in settings.items()
                  if old.get(k) != v and not (k == "num_images" and extend)]
        if differ:
            raise SystemExit(f"{out} was sampled with other settings: {', '.join(differ)}; give "
                             "the same ones to finish it (or more --num_images to extend it), or "
                             "another --out")
        if finished and not extend:
            return None
    if rank == 0 and (old is None or finished):  # a new run, or the extension of a finished one
        images = np.lib.format.open_memmap(f"{out}.images.npy", "w+", np.uint8, (n, size, size, 3))
        done = np.lib.format.open_memmap(f"{out}.done.npy", "w+", np.bool_, (n,))
        if finished:
            with np.load(out) as f:
                images[:len(f["arr_0"])] = f["arr_0"]
                done[:len(f["arr_0"])] = True
        images.flush()
        done.flush()
        with open(out + ".settings.json", "w") as f:
            json.dump(settings, f)
    barrier()
    return np.load(f"{out}.images.npy", mmap_mode="r+"), np.load(f"{out}.done.npy", mmap_mode="r+")

def close_output(out, images, png=None):
    """Rank 0, once every image is done: `out` as an ADM .npz (written atomically), a grid of the
    first images (up to 4 rows of 10), the --png files; the memory maps are removed."""
    rows = [images[r * 10:(r + 1) * 10] for r in range(max(1, min(4, len(images) // 10)))]
    save_grid(os.path.join(os.path.dirname(out) or ".", "samples_grid.png"),
              [torch.from_numpy(np.array(r)).permute(0, 3, 1, 2).float() / 127.5 - 1 for r in rows])
    np.savez(out + ".tmp.npz", arr_0=images)
    os.replace(out + ".tmp.npz", out)
    if png:
        save_pngs(images, png)
    for name in ("images", "done"):
        os.remove(f"{out}.{name}.npy")
    log.info(f"wrote {out} ({len(images)} images)")

def save_pngs(images, folder):
    """Image i as <folder>/<i:06d>.png, for evaluators that read a folder of images."""
    os.makedirs(folder, exist_ok=True)
    progress = Progress(f"PNG files in {folder}", len(images))
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image)).save(os.path.join(folder, f"{i:06d}.png"))
        progress.update(1)
