"""Stage 4: sample images from a DiT^DH with the released Euler sampler (transport/transport.py),
decoded by the tokenizer.

  torchrun --nproc_per_node=8 sample.py --dit ditdhxl_epoch_0599.pth --guide ditdhs_epoch_0029.pth \
      --cfg 1.29 --steps 150 --tokenizer RecTok_decft.pth --latent_stats out/dit/latent_stats.pt \
      --out out/samples.npz
  python sample.py --demo                      # reads out/demo/dit.pt and out/demo/tokenizer_ft.pt

Read top to bottom: load the models, search the guidance scale (--cfg_list), then main samples and
saves (models.generate; the output is resumable: plumbing.open_output).
"""
import argparse
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

import data
import evaluate
import models
import pretrained
from plumbing import (Progress, barrier, check_args, close_output, open_output, parse_args,
                      save_pngs, start_log)

log = logging.getLogger("rectok")

def load_models(args, paths, device):
    """The DiT^DH (and --guide), the tokenizer and the latent statistics, checked against each other
    and the flags."""
    dit, extra = pretrained.load_dit(paths["dit"])
    guide = pretrained.load_dit(args.guide)[0].to(device) if args.guide else None
    tokenizer = pretrained.load_tokenizer(paths["tokenizer"]).to(device).eval()
    if args.latent_stats:  # latent_stats.pt, or a DiT^DH checkpoint that holds them
        stats = models.read_checkpoint(args.latent_stats)
        stats = stats.get("latent_stats", stats)
    else:
        stats = extra.get("latent_stats")
    if stats is None:
        raise SystemExit(f"--latent_stats: {args.dit} holds no latent statistics; compute them "
                         "with `train_dit.py --tokenizer ... --data ... --epochs 0` and pass "
                         "latent_stats.pt")
    if (tokenizer.dim, tokenizer.grid) != (dit.dim, dit.grid):
        raise SystemExit(f"--tokenizer: latents {tokenizer.dim}x{tokenizer.grid}^2 do not fit the "
                         f"DiT's {dit.dim}x{dit.grid}^2")
    bad = [c for c in args.classes or [] if not 0 <= c < dit.num_classes]
    if bad:
        raise SystemExit(f"--classes {' '.join(map(str, bad))}: {paths['dit']} has classes 0 to "
                         f"{dit.num_classes - 1}")
    if dit.label_drop == 0 and guide is None and (args.cfg > 1 or args.cfg_list):
        raise SystemExit(f"--cfg: {paths['dit']} was trained with --label_drop 0, so it has no "
                         "null class for classifier-free guidance; sample with --cfg 1, or give "
                         "--guide")
    dit.to(device)
    if args.compile:  # block by block, in place: one graph per block shape, short start-up
        for net in (dit, guide) if guide else (dit,):
            for block in net.blocks:
                block.compile()
    stats = {k: v.to(device) for k, v in stats.items()}
    return dit, guide, tokenizer, stats, extra.get("step")

def search_cfg(args, dit, guide, tokenizer, stats, device):
    """The release's --cfg_list: the best-FID scale on --search_images samples, cached in
    <out_dir>/cfg_search.json."""
    path = os.path.join(args.out_dir, "cfg_search.json")
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done["images"] == args.search_images and list(map(float, done["fid"])) == args.cfg_list:
            log.info(f"{path}: best guidance scale {done['best']} (search done before)")
            return done["best"]
    inception = pretrained.load_inception(args.inception).to(device)
    ref = evaluate.reference(inception, args.ref, args.per_proc_batch)
    fids = {}
    for cfg in args.cfg_list:
        res = evaluate.sample_metrics(dit, tokenizer, stats, inception, ref, args.search_images,
                                      args.steps, cfg, guide, args.per_proc_batch)
        fids[cfg] = res and res["fid"]  # rank 0 only
        log.info(f"guidance {cfg}: FID {fids[cfg]} on {args.search_images} samples")
    rank = dist.get_rank() if dist.is_initialized() else 0
    best = [min(fids, key=fids.get) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(best)
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"images": args.search_images, "fid": fids, "best": best[0]}, f, indent=1)
    log.info(f"best guidance scale {best[0]}: sampling {args.num_images} images with it")
    return best[0]

DEMO = dict(num_images=100, steps=10, cfg=6.0, per_proc_batch=50)  # --demo: README, quick start

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument
    p("--dit", help="DiT^DH checkpoint, ours or the release's ditdhxl_epoch_0599.pth "
      "(default: <out_dir>/dit.pt)")
    p("--guide", help="a weak DiT^DH for AutoGuidance (e.g. ditdhs_epoch_0029.pth); else CFG")
    p("--tokenizer", help="ours or the release's RecTok_decft.pth (default: "
      "<out_dir>/tokenizer_ft.pt)")
    p("--latent_stats", help="latent_stats.pt of train_dit.py (the release's DiT has none)")
    p("--cfg", type=float, default=1.0, help="guidance scale (1.29 with AutoGuidance: headline)")
    p("--steps", type=int, default=50, help="Euler grid points (150 for the final numbers)")
    p("--num_images", type=int, default=50_000, help="image i has label i %% num_classes")
    p("--classes", type=int, nargs="+", help="only these: image i has label classes[i %% "
      "len(classes)] (the release's --force_class_of_interest)")
    p("--png", metavar="DIR", help="also write the samples as DIR/000000.png, ...")
    p("--per_proc_batch", type=int, default=125)
    p("--seed", type=int, default=0, help="image i's noise is seeded by (seed, i), on any rank")
    p("--out_dir", help="folder of dit.pt, tokenizer_ft.pt and samples.npz (default: --out's)")
    p("--out", help="ADM-format .npz (arr_0: uint8 N x H x W x 3); default <out_dir>/samples.npz")
    p("--compile", action="store_true", help="torch.compile the blocks of the DiT^DH (and --guide)")
    p("--cfg_list", type=float, nargs="+", help="guidance search: FID of --search_images samples "
      "per scale, then --num_images at the best (the release's --cfg_list); needs --ref")
    p("--search_images", type=int, default=10_000)
    p("--ref", help="FID reference of --cfg_list: ADM's VIRTUAL_imagenet256_labeled.npz")
    p("--inception", help="FID Inception .pth (default: pytorch-fid's, downloaded once)")
    args = parse_args(parser, DEMO, argv)
    if not args.out_dir and args.out:
        args.out_dir = os.path.dirname(os.path.abspath(args.out))
    paths = {"dit": args.dit, "guide": args.guide, "tokenizer": args.tokenizer,
             "latent_stats": args.latent_stats}
    if args.out_dir:  # what the training stages left there, unless given
        paths["dit"] = args.dit or os.path.join(args.out_dir, "dit.pt")
        paths["tokenizer"] = args.tokenizer or os.path.join(args.out_dir, "tokenizer_ft.pt")
    kinds = dict(dit="a DiT^DH checkpoint", guide="a DiT^DH checkpoint",
                 tokenizer="a tokenizer checkpoint", latent_stats="latent statistics")
    no_ref = args.cfg_list and not args.ref and "--cfg_list needs --ref (the search's reference)"
    check_args(args, [no_ref], {f"--{k}": (v, kinds[k]) for k, v in paths.items()})
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
    start_log(args, "sample", rank, world, device)
    torch.manual_seed(args.seed)

    # load, then (with --cfg_list) search the guidance scale
    dit, guide, tokenizer, stats, dit_step = load_models(args, paths, device)
    if args.cfg_list:
        args.cfg = search_cfg(args, dit, guide, tokenizer, stats, device)

    # the output: resumed if an earlier run with the same settings left it unfinished
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

    # sample this rank's share of the images not done yet (image i: rank i % world), batch by batch
    todo = [i for i in range(rank, args.num_images, world) if not done[i]]
    log.info(f"{args.num_images - int(done.sum())} of {args.num_images} images left; "
             f"{'AutoGuidance' if guide else 'CFG'} {args.cfg}, {args.steps} grid points")
    progress = Progress(f"sampling (rank 0 of {world})", len(todo))
    for start in range(0, len(todo), args.per_proc_batch):
        idx = todo[start:start + args.per_proc_batch]
        x = models.generate(dit, tokenizer, stats, idx, args.steps, args.cfg, guide, args.seed,
                            args.classes)
        images[idx] = data.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        done[idx] = True
        progress.update(len(idx))

    # save: the .npz (atomically), a grid of the first images, the --png files
    images.flush()
    done.flush()
    barrier()
    if rank == 0:
        close_output(out, images, args.png)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
