"""Demo-only code (README, quick start): the built-in dataset, and the two demo judges, small CNNs
that stand in for the pretrained networks at demo scale: the *teacher* gives FSD its targets (in
place of DINO), the *evaluator* scores every demo metric (in place of the FID Inception)."""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
from plumbing import Progress, log, rank_world, save_checkpoint

# ---- The built-in dataset

class Shapes(torch.utils.data.Dataset):
    """Built-in procedural dataset: 10 classes (5 shapes x 2 colour families) on striped, textured
    backgrounds, any resolution, generated deterministically from the index. No download."""

    KINDS = ("disk", "square", "triangle", "ring", "cross")
    num_classes = 10

    def __init__(self, n=512, size=64, seed=0):
        self.n = n
        self.size = size
        self.seed = seed
        # index -> item: every epoch revisits the same images, rendering is ~5% of a demo step
        self.rendered = {}

    def __len__(self):
        return self.n

    def render(self, i):
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        label = i % 10
        kind = self.KINDS[label % 5]
        warm = label >= 5
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s] / s
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(1.5, 4)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        bg = rng.uniform(0.2, 0.6, 3) * (0.7 + 0.3 * stripes[..., None])
        cx = rng.uniform(0.3, 0.7)
        cy = rng.uniform(0.3, 0.7)
        r = rng.uniform(0.15, 0.28)
        dx = xx - cx
        dy = yy - cy
        d2 = dx ** 2 + dy ** 2
        ax = abs(dx)
        ay = abs(dy)
        mask = {"disk": d2 < r ** 2, "square": (ax < r * 0.8) & (ay < r * 0.8),
                "triangle": (dy < r * 0.7) & (dy > 2 * ax - r),
                "ring": (d2 < r ** 2) & (d2 > (0.55 * r) ** 2),
                "cross": ((ax < r * 0.3) | (ay < r * 0.3)) & (ax < r) & (ay < r)}[kind]
        hue = rng.uniform(0.7, 1.0), rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.2)
        color = np.array(hue if warm else hue[::-1])
        img = np.where(mask[..., None], color, bg)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label

    def __getitem__(self, i):
        if i not in self.rendered:
            arr, label = self.render(i)
            self.rendered[i] = (data.to_tensor(arr), label)
        return self.rendered[i]

def shapes(args, train=True):
    """--demo's data where no --data is given: args.demo_images training images, or 64 held-out ones
    (another seed)."""
    return Shapes(args.demo_images if train else 64, args.img_size, seed=0 if train else 1)

# ---- The demo judges: small CNNs trained in seconds on demo images' labels (judge below),
# standing in for the pretrained networks at demo scale, where random weights would make FSD and
# every metric meaningless. As DINO and Inception in the real pipeline, the teacher (FSD targets)
# and the evaluator (every demo metric) are two networks (architecture, seed, training images):
# no metric is scored by the network a tokenizer was trained against.
# (out channels, stride) per conv
JUDGE_LAYERS = {"teacher": ((32, 1), (64, 2), (64, 1), (64, 2), (64, 1)),
                "evaluator": ((32, 2), (64, 1), (96, 2), (96, 1))}

class DemoJudge(nn.Module):
    """Float images in [-1, 1] -> patch features (B, grid * grid, dim), the teachers' interface
    (FSD); uint8 images -> (pooled features (B, dim), class logits), the FID Inception's (demo FID,
    precision / recall, IS, accuracy)."""
    def __init__(self, grid, role="teacher", num_classes=10):
        super().__init__()
        self.grid = grid
        self.dim = JUDGE_LAYERS[role][-1][0]
        layers = []
        ch = 3
        for out, stride in JUDGE_LAYERS[role]:
            layers += [nn.Conv2d(ch, out, 3, stride, 1), nn.BatchNorm2d(out), nn.GELU()]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.dim, num_classes)

    def forward(self, x):
        if x.dtype == torch.uint8:
            pool = self(x.float() / 127.5 - 1).mean(1)
            return pool, self.head(pool)
        return (F.adaptive_avg_pool2d(self.features(x.float()), self.grid).flatten(2)
                .transpose(1, 2))

# The demo judges' seeds (init, Shapes): the teacher learns from the first demo training images
# (Shapes seed 0), the evaluator from images no stage trains on (seed 4); both are scored on
# held-out images (seed 1).
JUDGE_SEEDS = {"teacher": (0, 0), "evaluator": (1, 4)}

def judge(out_dir, size, device, role, grid=1, n_train=640):
    """DemoJudge of `role` ("teacher": FSD targets, `grid` x `grid` patch features;
    "evaluator": every demo metric), trained deterministically and cached in
    <out_dir>/judge_<role>.pt with its held-out accuracy: every rank trains the same net or reads
    the file."""
    path = os.path.join(out_dir, f"judge_{role}.pt")
    ckpt = models.read_checkpoint(path) if os.path.isfile(path) else {}
    init_seed, data_seed = JUDGE_SEEDS[role]
    # the same net whatever the caller's RNG state, rank or stage
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        judge = DemoJudge(grid, role).to(device)
        if ckpt.get("size") == size:
            judge.load_state_dict(ckpt["model"])
        else:
            x, y = data.stack(Shapes(n_train, size, seed=data_seed))
            progress = Progress("training the demo judge", 15 * n_train)
            opt = torch.optim.AdamW(judge.parameters(), 3e-3, weight_decay=0.05)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3,
                                                        total_steps=15 * -(-n_train // 64))
            for _ in range(15):
                for idx in torch.randperm(len(x)).split(64):
                    # flips keep the class; the training stages flip too
                    flip = torch.rand(len(idx)) < 0.5
                    xb = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx]).to(device)
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(judge(data.to_uint8(xb))[1], y[idx].to(device)).backward()
                    opt.step()
                    sched.step()
                    progress.update(len(idx))
            vx, vy = data.stack(Shapes(500, size, seed=1))
            with torch.no_grad():
                logits = judge.eval()(data.to_uint8(vx.to(device)))[1]
                accuracy = (logits.argmax(1).cpu() == vy).float().mean().item()
            ckpt = {"model": judge.state_dict(), "size": size, "accuracy": accuracy}
            if rank_world()[0] == 0:
                save_checkpoint(path, ckpt)
    log.info(f"demo {role} judge: {ckpt['accuracy']:.1%} held-out accuracy on the demo classes "
             f"({path})")
    return judge.eval().requires_grad_(False), ckpt["accuracy"]
