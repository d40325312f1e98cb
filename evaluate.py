"""Evaluation (paper Sec. 4.1, Tab. 1-2): FID / IS / precision-recall on our own FID Inception-v3,
matched to torch-fidelity's `inception-v3-compat` extractor that the paper's numbers used; tokenizer
PSNR / rFID; latent linear probe and maps.

    python evaluate.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz  # gFID, IS, P/R
    python evaluate.py --samples val/ --image_size 256 --save_stats val256.npz      # rFID reference
    python evaluate.py --tokenizer tok.pt --data val/ --ref val256.npz --grid r.png # PSNR, rFID
    python evaluate.py --linear_probe --tokenizer tok.pt --data train/ --val_data val/
    python evaluate.py --viz --tokenizer tok.pt --data val/               # PCA / cosine maps of z_t
    python evaluate.py --demo              # the demo pipeline's outputs, judged by its evaluator
    torchrun --nproc_per_node 8 evaluate.py ...                           # any of these, over ranks

Linear probe (the paper gives no recipe; ours): frozen features of centre crops, averaged over
tokens: the posterior mean z (t = 0), z_t = 0.5 z + 0.5 eps (t = 0.5, fixed seed), the second-last
encoder block. Each trains its own BatchNorm1d(affine=False) + Linear with AdamW (weight decay 0.01,
batch 1024, cosine from --probe_lr), no augmentation.
"""
import argparse
import functools
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import demo
import models
import pretrained
from plumbing import (Progress, check_args, gather_rows, log, rank_world, save_grid, start_log,
                      wandb_summary)

PROBE_TS = (0.0, 0.5)
VIZ_TS = (0.0, 0.25, 0.5, 0.75)

# ---- Metrics
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64 (Heusel et al., the paper's [19])."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product (few samples): offset both diagonals
        log.warning("FID: singular covariance product, adding 1e-6 to the diagonals")
        eps = 1e-6 * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    # an imaginary part beyond rounding
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"FID: imaginary component {np.abs(covmean.imag).max():.3g} "
                         "in sqrtm(S1 S2)")
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean.real))

def feature_stats(feats):
    f = torch.as_tensor(feats).double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)

def fid_from_feats(feats, ref_mu, ref_sigma):
    return frechet_distance(*feature_stats(feats), ref_mu, ref_sigma)

def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), fp64; torch-fidelity's shuffle and
    splits."""
    n = len(logits)
    logits = torch.as_tensor(logits).double().cpu()[np.random.RandomState(2020).permutation(n)]
    p = logits.softmax(1)
    log_p = logits.log_softmax(1)
    scores = []
    for s in (slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)):
        scores.append((p[s] * (log_p[s] - p[s].mean(0).log())).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))

def precision_recall(real_feats, fake_feats, k=3, batch=10000):
    """Kynkaanniemi et al. 2019 as in the ADM suite: a set's manifold is the union of balls reaching
    each point's k-th nearest neighbour (self excluded); precision: share of fakes inside the real
    manifold, recall: vice versa."""
    real = torch.as_tensor(real_feats).double()
    fake = torch.as_tensor(fake_feats).double()
    radii = lambda x: torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values
                                 for b in x.split(batch)])
    inside = lambda x, y, r: torch.cat([(torch.cdist(b, y) <= r).any(1)
                                        for b in x.split(batch)]).double().mean().item()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))

# ---- Features of a folder / .npz of images, split over ranks
def open_images(path, crop=None):
    """(n, read(i, j) -> uint8 (j - i, H, W, 3)) over an ADM .npz (arr_0, held in memory: 10 GB for
    50k at 256) or a folder of images (recursive, sorted; crop: PIL image -> uint8 array, e.g. the
    ADM centre crop)."""
    if path.endswith(".npz") and os.path.isfile(path):
        with np.load(path) as f:
            arr = f["arr_0"] if "arr_0" in f else None
        if arr is None or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
            raise SystemExit(f"{path}: needs arr_0, uint8 (N, H, W, 3) images")
        return len(arr), lambda i, j: arr[i:j]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path)
                   for f in fs if f.lower().endswith(data.IMAGE_EXTS))
    if not files:
        raise SystemExit(f"{path}: not an .npz or a folder of images")
    load = lambda file: np.asarray((crop or np.asarray)(Image.open(file).convert("RGB")))

    def read(i, j):
        with ThreadPoolExecutor(8) as pool:  # PIL decodes outside the GIL
            imgs = list(pool.map(load, files[i:j]))
        if len({im.shape for im in imgs}) > 1:
            raise SystemExit(f"{path}: images differ in size; "
                             "give --image_size to centre-crop them")
        return np.stack(imgs)
    return len(files), read

def image_batches(n, read, batch_size):
    """This rank's contiguous share of n images as uint8 (B, 3, H, W) batches. Every rank gets
    ceil(n / world) (the last image repeated as padding) so that all_gather sees equal sizes;
    gather_rows drops the padding."""
    rank, world = rank_world()
    per = -(-n // world)
    for i in range(rank * per, (rank + 1) * per, batch_size):
        j = min(i + batch_size, (rank + 1) * per)
        lo = min(i, n - 1)
        x = read(lo, max(min(j, n), lo + 1))
        padding = np.repeat(x[-1:], j - i - len(x), 0)
        yield torch.from_numpy(np.concatenate([x, padding])).permute(0, 3, 1, 2)

@torch.no_grad()
def inception_features(model, batches, total=None):
    """(pool (N, 2048), logits (N, 1008)) of uint8 (B, 3, H, W) batches, on the model's device;
    progress is logged against `total` images (this rank's)."""
    device = next(model.parameters()).device
    progress = Progress("features for FID", total)
    pool = []
    logits = []
    for x in batches:
        feats, class_logits = model(x.to(device))
        pool.append(feats)
        logits.append(class_logits)
        progress.update(len(x))
    return torch.cat(pool), torch.cat(logits)

# pool features of an .npz / folder of images, all ranks'
def features(model, path, batch_size, crop=None):
    n, read = open_images(path, crop)
    per_rank = -(-n // rank_world()[1])
    pool = inception_features(model, image_batches(n, read, batch_size), per_rank)[0]
    return gather_rows(pool, n)

def reference(model, path, batch_size, crop=None):
    """--ref -> ((mu, sigma), pool features for precision / recall or None): .npz of mu, sigma
    (+ arr_0), or images."""
    ref = np.load(path) if path.endswith(".npz") and os.path.isfile(path) else {}
    pool = features(model, path, batch_size, crop) if "mu" not in ref or "arr_0" in ref else None
    return (ref["mu"], ref["sigma"]) if "mu" in ref else feature_stats(pool), pool

# ---- Online evaluation (the training scripts call these too): every rank its share; a dict on
# rank 0, else None
def psnr_per_image(x, x_hat):
    """PSNR of each image on [0, 1], the reconstruction clamped (the release's utils/train_utils.py
    evaluation)."""
    mse = (((x.float() + 1) / 2 - ((x_hat.float() + 1) / 2).clamp(0, 1)) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))

# a loader not sharded by data.make_loader(..., world, rank) would gather silently wrong rows
def n_images(loader):
    if getattr(loader.sampler, "num_replicas", 1) != rank_world()[1]:
        raise ValueError("the loader must be sharded over the ranks: "
                         "data.make_loader(dataset, ..., world, rank)")
    return len(loader.dataset)

def generation_metrics(inception, batches, ref_mu, ref_sigma, ref_pool=None, n=None, labels=None):
    """FID / IS / precision-recall (+ class accuracy, given the labels) of uint8 (B, 3, H, W)
    batches, n in all."""
    pool, logits = inception_features(inception, batches, n and -(-n // rank_world()[1]))
    n = n or len(pool) * rank_world()[1]
    pool = gather_rows(pool, n)
    logits = gather_rows(logits, n)
    if rank_world()[0] != 0:
        return None
    res = {"n": n, "fid": fid_from_feats(pool, ref_mu, ref_sigma)}
    res["is_mean"], res["is_std"] = inception_score(logits)
    if ref_pool is not None:
        res["precision"], res["recall"] = precision_recall(ref_pool, pool)
    else:
        res["precision"] = None
        res["recall"] = None
    if labels is not None:
        res["class_accuracy"] = (logits.argmax(1).cpu() == labels).float().mean().item()
    return res

def sample_metrics(dit, tokenizer, stats, inception, ref, n, steps, cfg=1.0, guide=None,
                   batch_size=125):
    """gFID / IS (+ precision / recall if ref has pool features) of n images generated in memory
    over the ranks (models.generate); ref: reference's answer."""
    rank, world = rank_world()
    per = -(-n // world)  # every rank the same count; the last rank's extras are cut
    ids = range(rank * per, (rank + 1) * per)
    batches = (data.to_uint8(models.generate(dit, tokenizer, stats, ids[i:i + batch_size], steps,
                                             cfg, guide))
               for i in range(0, per, batch_size))
    return generation_metrics(inception, batches, *ref[0], ref[1], n=n)

def online_inception(args, device):
    """The network of the training scripts' online metrics (--eval_every): under --demo (without
    --inception) the demo's evaluator judge, else the FID Inception (random weights with
    --random_frozen_nets)."""
    if args.demo and not args.inception:
        return demo.judge(args.out_dir, args.img_size, device, "evaluator")[0]
    if getattr(args, "random_frozen_nets", False):
        return pretrained.load_inception("random").to(device)
    return pretrained.load_inception(args.inception).to(device)

def generation_reference(inception, args, dataset, world, rank):
    """The reference of train_dit.py's online gFID, as `reference` answers: --fid_ref, else the
    features of --eval_images training images spread over the classes."""
    if args.fid_ref:
        return reference(inception, args.fid_ref, args.batch_size)
    real = torch.utils.data.Subset(dataset, data.spread(len(dataset), args.eval_images))
    real = data.make_loader(real, args.batch_size, False, args.workers, world, rank)
    pool = inception_features(inception, (data.to_uint8(x) for x, _ in real))[0]
    return feature_stats(gather_rows(pool, len(real.dataset), strided=True)), None

@torch.no_grad()
def reconstruction_metrics(tokenizer, loader, inception, device, ref=None):
    """PSNR and rFID (against ref's mu, sigma, else the real images) of a loader's posterior-mean
    reconstructions."""
    psnr = []
    fake = []
    real = []
    progress = Progress("reconstructions for PSNR / rFID", len(loader.sampler))
    for x, _ in loader:
        progress.update(len(x))
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            x_hat = tokenizer.decode(tokenizer.encode(x))
        psnr.append(psnr_per_image(x, x_hat))
        fake.append(inception(data.to_uint8(x_hat))[0])
        if ref is None:
            real.append(inception(data.to_uint8(x))[0])
    n = n_images(loader)
    psnr = gather_rows(torch.cat(psnr), n, True)
    fake = gather_rows(torch.cat(fake), n, True)
    ref = ref if ref is not None else feature_stats(gather_rows(torch.cat(real), n, True))
    if rank_world()[0] != 0:
        return None
    return {"n": n, "psnr": psnr.mean().item(), "rfid": fid_from_feats(fake, *ref)}

# ---- Latents: linear probe (recipe in the module docstring) and maps
@torch.no_grad()
def probe_features(tokenizer, loader, device, seed=0):
    """Token-pooled frozen features of a make_loader(train=False) loader's images, gathered in
    dataset order: ({"z_t0.0", "z_t0.5", "encoder_block-2"}: (N, C), labels (N,)).
    z_t = (1 - t) z + t eps (paper Eq. 1 and Sec. 3.2, FSD)."""
    gen = torch.Generator(device).manual_seed(seed + rank_world()[0])
    feats = {**{f"z_t{t}": [] for t in PROBE_TS}, "encoder_block-2": []}
    labels = []
    hook = tokenizer.encoder.transformer[-2].register_forward_hook(
        lambda module, inputs, out: feats["encoder_block-2"].append(out.float().mean(1)))
    for x, y in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = tokenizer.posterior(x.to(device, non_blocking=True))[0]
        eps = torch.randn(z.shape, generator=gen, device=device)
        for t in PROBE_TS:
            feats[f"z_t{t}"].append(models.tokenizer_flow(z, t, eps).mean(1))
        labels.append(y.to(device))
    hook.remove()
    n = n_images(loader)
    return ({k: gather_rows(torch.cat(v), n, True) for k, v in feats.items()},
            gather_rows(torch.cat(labels), n, True))

def train_probe(train_x, train_y, val_x, val_y, num_classes, epochs=10, lr=1e-3, batch_size=1024,
                seed=0):
    """Val top-1 of BatchNorm1d(affine=False) + Linear trained on frozen features with AdamW,
    cosine lr."""
    gen = torch.Generator().manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                          nn.Linear(train_x.shape[1], num_classes))
    opt = torch.optim.AdamW(probe.to(train_x.device).parameters(), lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(train_x) // batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=gen).to(train_x.device).split(batch_size):
            if len(idx) > 1:  # BatchNorm cannot train on a last batch of one
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(probe(train_x[idx]), train_y[idx]).backward()
                opt.step()
            sched.step()
    with torch.no_grad():
        return (probe.eval()(val_x).argmax(1) == val_y).float().mean().item()

@torch.no_grad()
def latent_maps(tokenizer, x, ts=VIZ_TS, seed=0):
    """Paper Fig. 4, 8, 9, per t: z_t's first three PCA components (fitted over the batch's tokens,
    as the release's utils/vis_utils.py fits them per image) as RGB, each component's sign that of
    the t = 0 one (so a colour means the same direction in every column), and each token's cosine
    similarity to the image's mean z_t. Two lists [x, map at ts[0], ...] of (B, 3, H, W) in
    [-1, 1]."""
    z = tokenizer.posterior(x)[0]
    eps = torch.randn(z.shape, generator=torch.Generator(z.device).manual_seed(seed),
                      device=z.device)
    B, N, _ = z.shape
    image = lambda m: 2 * F.interpolate(m.transpose(1, 2).unflatten(2, (math.isqrt(N), -1)),
                                        x.shape[-2:]) - 1
    unit = lambda v, d: ((v - v.amin(d, keepdim=True))
                         / (v.amax(d, keepdim=True) - v.amin(d, keepdim=True) + 1e-8))
    pca = [x]
    cos = [x]
    first = None
    for z_t in (models.tokenizer_flow(z, t, eps) for t in ts):
        flat = z_t.flatten(0, 1) - z_t.flatten(0, 1).mean(0)
        components = torch.linalg.svd(flat, full_matrices=False).Vh[:3].T
        if first is None:
            first = components
        components = torch.where((components * first).sum(0) < 0, -components, components)
        pca.append(image(unit(flat @ components, 0).view(B, N, 3)))
        sim = F.cosine_similarity(z_t, z_t.mean(1, keepdim=True), dim=-1)
        cos.append(image(unit(sim, 1)[..., None].expand(-1, -1, 3)))
    return pca, cos

def save_maps(tokenizer, x, out_dir, seed=0):
    labels = ["image"] + [f"z_t, t = {t:g}" for t in VIZ_TS]
    for name, cols in zip(("pca", "cos"), latent_maps(tokenizer, x, seed=seed)):
        # a row per image, a column per t
        save_grid(os.path.join(out_dir, f"latent_{name}.png"), list(torch.stack(cols, 1)), labels)

# ---- Command line
def demo_outputs(args, device):
    """The demo pipeline's outputs in --out_dir judged by the evaluator: samples.npz (image i has
    label i % 10) against Shapes(500, seed 2); the tokenizer (stage 2, else 1) on Shapes(200,
    seed 1), its probe trained on Shapes(640)."""
    toks = [p for p in (os.path.join(args.out_dir, f) for f in ("tokenizer_ft.pt", "tokenizer.pt"))
            if os.path.isfile(p)]
    samples = os.path.join(args.out_dir, "samples.npz")
    if not toks:
        raise SystemExit(f"no {args.out_dir}/tokenizer.pt: "
                         "run `python train_tokenizer.py --demo` first")
    if not os.path.isfile(samples):
        raise SystemExit(f"no {samples}: run `python train_dit.py --demo`, "
                         "then `python sample.py --demo` first")
    rank, world = rank_world()
    tokenizer = pretrained.load_tokenizer(toks[0], gamma=0.0, mask_ratio=0.0).to(device)
    size = tokenizer.grid * tokenizer.decoder.patch_size
    bs = 50
    judge, judge_accuracy = demo.judge(args.out_dir, size, device, "evaluator")
    loader = lambda ds: data.make_loader(ds, bs, False, 0, world, rank)
    n, read = open_images(samples)
    ref_batches = (data.to_uint8(x) for x, _ in loader(demo.Shapes(500, size, seed=2)))
    ref_pool = gather_rows(inception_features(judge, ref_batches)[0], 500, strided=True)
    gen = generation_metrics(judge, image_batches(n, read, bs), *feature_stats(ref_pool),
                             ref_pool, n, labels=torch.arange(n) % 10)
    shapes = demo.Shapes(200, size, seed=1)
    rec = reconstruction_metrics(tokenizer, loader(shapes), judge, device)
    (tx, ty), (vx, vy) = (probe_features(tokenizer, loader(ds), device)
                          for ds in (demo.Shapes(640, size), shapes))
    if rank == 0:
        save_maps(tokenizer, torch.stack([shapes[i][0] for i in range(8)]).to(device), args.out_dir)
        probe = {k: train_probe(tx[k], ty, vx[k], vy, 10, epochs=100, lr=1e-2, batch_size=64)
                 for k in tx}
        return {"evaluator": {"held_out_accuracy": judge_accuracy}, "tokenizer": toks[0],
                "reconstruction": rec, "samples": samples, "generation": gen,
                "linear_probe_top1": probe}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--samples", help="folder of images, or ADM .npz (arr_0: uint8 N x H x W x 3)")
    a("--ref", help=".npz with mu, sigma (+ arr_0 images for precision / recall), "
      "or reference images")
    a("--save_stats", metavar="OUT.npz",
      help="instead: save mu, sigma of --samples (rFID reference)")
    a("--image_size", type=int,
      help="ADM centre crop of --samples / --ref folder images to this size")
    a("--tokenizer", help="tokenizer checkpoint: PSNR / rFID of its reconstructions of --data")
    a("--data", help="image folder with class sub-folders: ImageNet val (train for --linear_probe)")
    a("--num_images", type=int, default=50000,
      help="reconstruct this many --data images, evenly spread")
    a("--grid", metavar="PNG", help="save 8 originals vs reconstructions")
    a("--weights", nargs="+", default=["ema"], choices=["raw", "ema"],
      help="tokenizer weights to reconstruct with (the release evaluates `raw ema`); "
      "the JSON has one entry each")
    a("--linear_probe", action="store_true",
      help="linear probe of --tokenizer's features: --data, --val_data")
    a("--val_data", help="ImageNet val folder for --linear_probe")
    a("--probe_images", type=int,
      help="train the probe on this many --data images, evenly spread (default all)")
    a("--probe_epochs", type=int, default=10)
    a("--probe_lr", type=float, default=1e-3)
    a("--viz", action="store_true",
      help="PCA / cosine maps of --tokenizer's z_t on 8 --data images")
    a("--demo", action="store_true",
      help="evaluate the demo pipeline's outputs in --out_dir with the demo's evaluator")
    a("--out_dir", help="JSON, PNGs and evaluate.log (default: out/eval; --demo: out/demo)")
    a("--out", help="JSON path (default: next to --samples, else <out_dir>/<mode>.json)")
    a("--inception", help="FID Inception .pth (default: pytorch-fid's release); 'random' for demos")
    a("--batch_size", type=int, default=100)
    a("--workers", type=int, default=8)
    a("--seed", type=int, default=0)
    a("--wandb", metavar="PROJECT", help="also send the results to this Weights & Biases project")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out/demo" if args.demo else "out/eval")
    mode = next((m for m in ("demo", "linear_probe", "viz") if getattr(args, m)),
                "recon" if args.tokenizer else "samples")
    needs = {"linear_probe": "tokenizer data val_data", "viz": "tokenizer data", "recon": "data",
             "samples": "samples"}
    files = {"--samples": (args.samples, ("an .npz", "a folder")),
             "--ref": (args.ref, ("an .npz", "a folder")),
             "--tokenizer": (args.tokenizer, "a tokenizer checkpoint"),
             "--inception": (args.inception, "FID Inception weights")}
    check_args(args, [f"{mode} mode needs --{flag}" for flag in needs.get(mode, "").split()
                      if not getattr(args, flag)]
               + [mode == "samples" and (args.ref is None) == (args.save_stats is None)
                  and "give one of --ref and --save_stats"], files)
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
    start_log(args, "evaluate", rank, world, device)
    torch.manual_seed(args.seed)  # the same on every rank (random weights, probe noise)
    loader = lambda ds: data.make_loader(ds, args.batch_size, False, args.workers, world, rank)
    inception = None
    if mode in ("samples", "recon"):
        inception = pretrained.load_inception(args.inception).to(device)
    crop = functools.partial(data.center_crop, size=args.image_size) if args.image_size else None
    res = None
    out = args.out or os.path.join(args.out_dir, "eval.json" if args.demo else f"{mode}.json")
    if mode == "demo":
        res = demo_outputs(args, device)
    elif mode == "samples" and args.save_stats:
        pool = features(inception, args.samples, args.batch_size, crop)
        if rank == 0:
            np.savez(args.save_stats, **dict(zip(("mu", "sigma"), feature_stats(pool))))
            print(f"mu, sigma of {len(pool)} images of {args.samples} -> {args.save_stats}")
    elif mode == "samples":
        (mu, sigma), ref_pool = reference(inception, args.ref, args.batch_size, crop)
        n, read = open_images(args.samples, crop)
        res = generation_metrics(inception, image_batches(n, read, args.batch_size), mu, sigma,
                                 ref_pool, n)
        if res:
            res = {"samples": args.samples, "ref": args.ref, **res}
        out = args.out or os.path.splitext(args.samples.rstrip("/"))[0] + "_metrics.json"
    else:
        tokenizer = pretrained.load_tokenizer(args.tokenizer, gamma=0.0, mask_ratio=0.0).to(device)
        ds = data.ImageFolder(args.data, tokenizer.grid * tokenizer.decoder.patch_size)
        few = torch.stack([ds[i][0] for i in data.spread(len(ds), 8)]).to(device)
        if mode == "recon":
            ref = reference(inception, args.ref, args.batch_size, crop)[0] if args.ref else None
            sub = torch.utils.data.Subset(ds, data.spread(len(ds), args.num_images))
            res = {w: reconstruction_metrics(pretrained.load_tokenizer(args.tokenizer, w == "ema",
                                                                   gamma=0.0, mask_ratio=0.0)
                                             .to(device), loader(sub), inception, device, ref)
                   for w in args.weights}
            if args.grid and rank == 0:
                bf16 = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
                with torch.no_grad(), bf16:
                    save_grid(args.grid, [few, tokenizer.decode(tokenizer.encode(few))])
        elif mode == "linear_probe":
            sub = torch.utils.data.Subset(ds, data.spread(len(ds), args.probe_images or len(ds)))
            (tx, ty), (vx, vy) = (probe_features(tokenizer, loader(d), device, args.seed)
                                  for d in (sub, data.ImageFolder(args.val_data, ds.size)))
            if rank == 0:  # the probes are cheap: rank 0 trains them on the gathered features
                res = {"n_train": len(ty), "n_val": len(vy),
                       "top1": {k: train_probe(tx[k], ty, vx[k], vy, ds.num_classes,
                                               args.probe_epochs, args.probe_lr, seed=args.seed)
                                for k in tx}}
        elif rank == 0:
            save_maps(tokenizer, few, args.out_dir, args.seed)
    if res and rank == 0:  # the other ranks' recon results are {weights: None}
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), "->", out)
        wandb_summary(res)
    if dist.is_initialized():
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
