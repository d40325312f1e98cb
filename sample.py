"""Stage 4: sample images from a DiT^DH with the released Euler sampler (transport/transport.py), decoded by the tokenizer.

  torchrun --nproc_per_node=8 sample.py --dit ditdhxl_epoch_0599.pth --guide ditdhs_epoch_0029.pth --cfg 1.29 \
      --steps 150 --tokenizer RecTok_decft.pth --latent_stats out/dit/latent_stats.pt --out out/samples.npz
  python sample.py --demo                      # reads out/demo/dit.pt and out/demo/tokenizer_ft.pt
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import evaluate
import models
from plumbing import Progress, barrier, bf16, check_args, log, parse_args, rank_world, save_grid, setup, to_uint8

def time_grid(steps, latent_shape):
    """The released grid (transport/transport.py): `steps` POINTS of linspace(0, 1),
    g -> s g / (1 + (s - 1) g), s = sqrt(H W dim / 4096), flipped to 1 - reversed(grid) so the small steps
    fall near noise (t = 0); like the release, only when s > 1."""
    s = math.sqrt(math.prod(latent_shape) / 4096)
    g = torch.linspace(0, 1, steps)
    g = s * g / (1 + (s - 1) * g)
    return (1 - g).flip(0) if s > 1 else g

@torch.no_grad()
def euler_sample(dit, noise, labels, steps, cfg=1.0, guide=None):
    """Integrate dx/dt = v(x, t, y) from noise (t=0) to data (t=1) in steps-1 Euler updates: DiT^DH's time runs
    from noise to data, as in models.flow_loss (the tokenizer's z_t runs the other way). cfg > 1 (all channels,
    all t): CFG v_null + cfg (v_cond - v_null), or with `guide` (a weak DiT^DH) AutoGuidance
    v_bad + cfg (v_good - v_bad)."""
    x, ts = noise, time_grid(steps, noise.shape[1:]).to(noise.device)
    null = torch.full_like(labels, dit.num_classes)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        t = t0.expand(len(x))
        if cfg > 1 and guide is not None:
            v_good, v_bad = dit(x, t, labels), guide(x, t, labels)
            v = v_bad + cfg * (v_good - v_bad)
        elif cfg > 1:  # conditional and null label in one forward of a doubled batch
            v_cond, v_null = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
            v = v_null + cfg * (v_cond - v_null)
        else:
            v = dit(x, t, labels)
        x = x + (t1 - t0) * v
    return x

@torch.no_grad()
def generate(dit, tokenizer, stats, idx, steps, cfg=1.0, guide=None, seed=0, classes=None):
    """Decoded images in [-1, 1] for global image indices idx: image i has noise seeded by (seed, i) and
    label i % num_classes (or classes[i % len(classes)]), so any split of the indices over ranks gives the
    same images."""
    device = stats["mean"].device
    noise = []
    for i in idx:  # image i's own generator: the same noise on any rank
        generator = torch.Generator().manual_seed((seed << 32) + i)
        noise.append(torch.randn(dit.dim, dit.grid, dit.grid, generator=generator))
    noise = torch.stack(noise).to(device)
    classes = classes or range(dit.num_classes)
    labels = torch.tensor([classes[i % len(classes)] for i in idx], device=device)
    with bf16(device):
        z = euler_sample(dit, noise, labels, steps, cfg, guide)
        z = z.float() * stats["std"][:, None, None] + stats["mean"][:, None, None]  # the tokenizer's scale
        return tokenizer.decode(z).float()

def sample_metrics(dit, tokenizer, stats, inception, ref, n, steps, cfg=1.0, guide=None, batch_size=125):
    """gFID / IS (+ precision / recall if ref has pool features) of n images generated in memory over the ranks."""
    rank, world = rank_world()
    per = -(-n // world)  # every rank the same count; the last rank's extras are cut
    ids = range(rank * per, (rank + 1) * per)
    batches = (to_uint8(generate(dit, tokenizer, stats, ids[i:i + batch_size], steps, cfg, guide))
               for i in range(0, per, batch_size))
    return evaluate.generation_metrics(inception, batches, *ref[0], ref[1], n=n)  # ref: evaluate.reference's answer

def search_cfg(args, dit, guide, tokenizer, stats, device):
    """The release's --cfg_list: the best-FID scale on --search_images samples, cached in <out_dir>/cfg_search.json."""
    path = os.path.join(args.out_dir, "cfg_search.json")
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done["images"] == args.search_images and list(map(float, done["fid"])) == args.cfg_list:
            log.info(f"{path}: best guidance scale {done['best']} (search done before)")
            return done["best"]
    inception = evaluate.load_inception(args.inception).to(device)
    ref = evaluate.reference(inception, args.ref, args.per_proc_batch)
    fids = {}
    for cfg in args.cfg_list:
        res = sample_metrics(dit, tokenizer, stats, inception, ref, args.search_images, args.steps, cfg, guide,
                             args.per_proc_batch)
        fids[cfg] = res and res["fid"]  # rank 0 only
        log.info(f"guidance {cfg}: FID {fids[cfg]} on {args.search_images} samples")
    best = [min(fids, key=fids.get) if rank_world()[0] == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(best)
    if rank_world()[0] == 0:
        with open(path, "w") as f:
            json.dump({"images": args.search_images, "fid": fids, "best": best[0]}, f, indent=1)
    log.info(f"best guidance scale {best[0]}: sampling {args.num_images} images with it")
    return best[0]

def save_pngs(images, folder):
    """Image i as <folder>/<i:06d>.png, for evaluators that read a folder of images."""
    os.makedirs(folder, exist_ok=True)
    progress = Progress(f"PNG files in {folder}", len(images))
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image)).save(os.path.join(folder, f"{i:06d}.png"))
        progress.update(1)

def load_models(args, paths, device):
    """The DiT^DH (and --guide), the tokenizer and the latent statistics, checked against each other and the flags."""
    dit, extra = models.load_dit(paths["dit"])
    guide = models.load_dit(args.guide)[0].to(device) if args.guide else None
    tokenizer = models.load_tokenizer(paths["tokenizer"]).to(device).eval()
    if args.latent_stats:  # latent_stats.pt, or a DiT^DH checkpoint that holds them
        stats = models.read_checkpoint(args.latent_stats)
        stats = stats.get("latent_stats", stats)
    else:
        stats = extra.get("latent_stats")
    if stats is None:
        raise SystemExit(f"--latent_stats: {args.dit} holds no latent statistics; compute them with "
                         "`train_dit.py --tokenizer ... --data ... --epochs 0` and pass latent_stats.pt")
    if (tokenizer.dim, tokenizer.grid) != (dit.dim, dit.grid):
        raise SystemExit(f"--tokenizer: latents {tokenizer.dim}x{tokenizer.grid}^2 do not fit the DiT's "
                         f"{dit.dim}x{dit.grid}^2")
    bad = [c for c in args.classes or [] if not 0 <= c < dit.num_classes]
    if bad:
        raise SystemExit(f"--classes {' '.join(map(str, bad))}: {paths['dit']} has classes 0 to "
                         f"{dit.num_classes - 1}")
    if dit.label_drop == 0 and guide is None and (args.cfg > 1 or args.cfg_list):
        raise SystemExit(f"--cfg: {paths['dit']} was trained with --label_drop 0, so it has no null class for "
                         "classifier-free guidance; sample with --cfg 1, or give --guide")
    dit.to(device)
    if args.compile:
        for net in (dit, guide) if guide else (dit,):
            models.compile_blocks(net.blocks)
    stats = {k: v.to(device) for k, v in stats.items()}
    return dit, guide, tokenizer, stats, extra.get("step")

# ---- The resumable output: one memory-mapped array shared by all ranks plus a `done` flag per image, so a
# rerun with the same settings finishes the job, and one with more --num_images extends a finished one
# (image i does not depend on the count).

def open_output(out, settings, size, rank):
    """(images, done) memory maps for settings["num_images"] images of `out`, or None if `out` already holds
    them. An earlier run into `out` with other settings is refused in one line."""
    n = settings["num_images"]
    finished = os.path.exists(out) and not os.path.exists(out + ".done.npy")  # the .npy files: a run under way
    old = {} if finished else None  # what an earlier run into `out` was asked for ({}: not recorded)
    if os.path.exists(out + ".settings.json"):
        with open(out + ".settings.json") as f:
            old = json.load(f)
    if old is not None:
        extend = finished and n > old.get("num_images", n)
        differ = [f"--{k} {old.get(k)} (now {v})" for k, v in settings.items()
                  if old.get(k) != v and not (k == "num_images" and extend)]
        if differ:
            raise SystemExit(f"{out} was sampled with other settings: {', '.join(differ)}; give the same ones to "
                             "finish it (or more --num_images to extend it), or another --out")
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
    """Rank 0, once every image is done: `out` as an ADM .npz (written atomically), a grid of the first images
    (up to 4 rows of 10), the --png files; the memory maps are removed."""
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

DEMO = dict(num_images=100, steps=10, cfg=6.0, per_proc_batch=50)  # --demo: README, quick start

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--dit", help="DiT^DH checkpoint (ours, or the authors' ditdhxl_epoch_0599.pth); --demo: <out_dir>/dit.pt")
    p("--guide", help="a weak DiT^DH for AutoGuidance (e.g. ditdhs_epoch_0029.pth); without it cfg > 1 is CFG")
    p("--tokenizer", help="tokenizer checkpoint (RecTok_decft.pth or ours); --demo: <out_dir>/tokenizer_ft.pt")
    p("--latent_stats", help="latent_stats.pt from train_dit.py (needed for the authors' DiT, which has none)")
    p("--cfg", type=float, default=1.0, help="guidance scale (1.29 with AutoGuidance for the headline result)")
    p("--steps", type=int, default=50, help="Euler grid points (150 for the final numbers)")
    p("--num_images", type=int, default=50_000, help="class-balanced: image i has label i %% num_classes")
    p("--classes", type=int, nargs="+", help="only these classes: image i has label classes[i %% len(classes)] "
      "(the release's --force_class_of_interest)")
    p("--png", metavar="DIR", help="also write the samples as DIR/000000.png, ... (for external evaluators)")
    p("--per_proc_batch", type=int, default=125)
    p("--seed", type=int, default=0, help="image i's noise is seeded by (seed, i): any number of ranks, same images")
    p("--out_dir", help="folder of dit.pt, tokenizer_ft.pt and samples.npz unless given; default: --out's folder")
    p("--out", help="ADM-format .npz (arr_0: uint8 N x H x W x 3); default <out_dir>/samples.npz")
    p("--compile", action="store_true", help="torch.compile the blocks of the DiT^DH (and of --guide)")
    p("--cfg_list", type=float, nargs="+", help="guidance search: FID of --search_images samples per scale, then "
      "--num_images at the best (the release's --cfg_list); needs --ref")
    p("--search_images", type=int, default=10_000)
    p("--ref", help="FID reference for --cfg_list: ADM's VIRTUAL_imagenet256_labeled.npz (mu, sigma)")
    p("--inception", help="FID Inception .pth (default: pytorch-fid's release, downloaded once)")
    args = parse_args(parser, DEMO, argv)
    if not args.out_dir and args.out:
        args.out_dir = os.path.dirname(os.path.abspath(args.out))
    paths = {"dit": args.dit, "guide": args.guide, "tokenizer": args.tokenizer, "latent_stats": args.latent_stats}
    if args.out_dir:  # what the training stages left there, unless given
        paths["dit"] = args.dit or os.path.join(args.out_dir, "dit.pt")
        paths["tokenizer"] = args.tokenizer or os.path.join(args.out_dir, "tokenizer_ft.pt")
    kinds = dict(dit="a DiT^DH checkpoint", guide="a DiT^DH checkpoint", tokenizer="a tokenizer checkpoint",
                 latent_stats="latent statistics")
    problems = [models.file_problem(f"--{k}", v, kinds[k]) for k, v in paths.items() if v]
    if args.cfg_list and not args.ref:
        problems.append("--cfg_list needs --ref (the FID reference of the search)")
    check_args(args, problems)
    rank, world, device = setup(args, "sample")
    dit, guide, tokenizer, stats, dit_step = load_models(args, paths, device)
    if args.cfg_list:
        args.cfg = search_cfg(args, dit, guide, tokenizer, stats, device)
    out = args.out or os.path.join(args.out_dir, "samples.npz")
    settings = {}
    for k, v in paths.items():  # absolute paths; released files by their hf:// names
        settings[k] = os.path.abspath(v) if v and not v.startswith("hf://") else v
    settings.update(cfg=args.cfg, steps=args.steps, seed=args.seed, num_images=args.num_images,
                    classes=args.classes)
    settings["dit"] += f" (step {dit_step})"  # a DiT trained further makes other images
    maps = open_output(out, settings, tokenizer.grid * tokenizer.decoder.patch_size, rank)
    if maps is None:
        log.info(f"{out} already holds these {args.num_images} images: nothing to sample")
        if args.png and rank == 0:
            with np.load(out) as f:
                save_pngs(f["arr_0"], args.png)
        return
    images, done = maps

    # Sample this rank's share of the images not done yet (image i: rank i % world), batch by batch
    todo = [i for i in range(rank, args.num_images, world) if not done[i]]
    log.info(f"{args.num_images - int(done.sum())} of {args.num_images} images left; "
             f"{'AutoGuidance' if guide else 'CFG'} {args.cfg}, {args.steps} grid points")
    progress = Progress(f"sampling (rank 0 of {world})", len(todo))
    for start in range(0, len(todo), args.per_proc_batch):
        idx = todo[start:start + args.per_proc_batch]
        x = generate(dit, tokenizer, stats, idx, args.steps, args.cfg, guide, args.seed, args.classes)
        images[idx] = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        done[idx] = True
        progress.update(len(idx))
    images.flush()
    done.flush()
    barrier()
    if rank == 0:
        close_output(out, images, args.png)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
