"""Demo-only code: the two demo judges, small CNNs that stand in for the pretrained networks at demo
scale (README, quick start): the *teacher* gives FSD its targets (in place of DINO), the *evaluator*
scores every demo metric (in place of the FID Inception)."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
from plumbing import Progress, log, rank_world, save_checkpoint

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
            x, y = data.stack(data.Shapes(n_train, size, seed=data_seed))
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
            vx, vy = data.stack(data.Shapes(500, size, seed=1))
            with torch.no_grad():
                logits = judge.eval()(data.to_uint8(vx.to(device)))[1]
                accuracy = (logits.argmax(1).cpu() == vy).float().mean().item()
            ckpt = {"model": judge.state_dict(), "size": size, "accuracy": accuracy}
            if rank_world()[0] == 0:
                save_checkpoint(path, ckpt)
    log.info(f"demo {role} judge: {ckpt['accuracy']:.1%} held-out accuracy on the demo classes "
             f"({path})")
    return judge.eval().requires_grad_(False), ckpt["accuracy"]
