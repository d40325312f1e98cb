"""Data: ImageNet-style folders (or the authors' `path label` lists), the ADM centre crop, random
flips, and the distributed loader (the demo's built-in dataset is demo.Shapes)."""
import logging
import os

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("rectok")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

def center_crop(img, size):
    """ADM centre crop (the release's `center_crop_arr`, utils/loader.py): halve with BOX while the
    short side >= 2 * size, BICUBIC-resize the short side to size, crop the centre. Returns a uint8
    array (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]

def to_tensor(arr):
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1

def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8, same layout and device (the Inception's input)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

def random_flip(x):
    """Horizontal flip of half the batch, drawn on the training process (not in loader workers), so
    a resumed run replays it."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)

class ImageFolder(torch.utils.data.Dataset):
    """Class sub-folders (labels by sorted folder name), a flat folder of images (one class, label
    0), or a list file of `relative/path label` lines.
    Items are (x, label): x float (3, size, size) in [-1, 1]; the training scripts flip, not the
    dataset. A corrupt or truncated file is skipped (the next image is returned) with a counted
    warning."""

    def __init__(self, root, size=256, list_file=None):
        self.size = size
        self.skipped = 0
        if list_file:
            with open(list_file) as f:
                rows = [line.split() for line in f if line.strip()]
            self.samples = [(os.path.join(root, r[0]), int(r[1]) if len(r) > 1 else -1)
                            for r in rows]
            self.num_classes = max(label for _, label in self.samples) + 1
        else:
            folders = [d.path for d in sorted(os.scandir(root), key=lambda d: d.name) if d.is_dir()]
            if not folders:  # a flat folder of images is one class (unconditional training)
                folders = [root]
            self.samples = [(os.path.join(dp, f), label) for label, folder in enumerate(folders)
                            for dp, _, files in sorted(os.walk(folder))
                            for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
            self.num_classes = len(folders)
        if not self.samples:
            raise SystemExit(f"--data: no images found in {root} "
                             "(expected class sub-folders of images, or images)")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(i, i + 100):
            path, label = self.samples[j % len(self)]
            try:
                with Image.open(path) as img:
                    arr = center_crop(img.convert("RGB"), self.size)
                break
            except (OSError, ValueError) as e:
                self.skipped += 1
                log.warning(f"skipping unreadable image {path} ({e}); "
                            f"{self.skipped} skipped so far in this worker")
        else:
            raise SystemExit(f"--data: 100 unreadable images in a row from {self.samples[i][0]}")
        return to_tensor(arr), label

def spread(n, k):
    """k indices evenly spread over range(n), all if k >= n: class-balanced on class-sorted
    folders."""
    return np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()

def stack(dataset, idx=None):
    """(images (N, 3, H, W), labels (N,)) of the dataset's items idx (default: all), in memory."""
    if idx is None:
        idx = range(len(dataset))
    return torch.utils.data.default_collate([dataset[i] for i in idx])

class Sampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose next epoch can start `skip` indices into this rank's order: a run
    resumed inside an epoch reads the batches an uninterrupted run reads next. The order is the
    sampler's own (its seed and epoch, whether or not set_epoch is called each epoch); the skip
    applies to one epoch only."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        start = self.skip
        self.skip = 0
        return iter(indices[start:])

def make_loader(dataset, batch_size, train, workers=4, world=1, rank=0, seed=0):
    """Sampler (its set_epoch(epoch) draws another order; the release never calls it) + a DataLoader
    that keeps its workers alive between epochs and pins memory for asynchronous host-to-device
    copies. The workers' base seed comes from the loader's own generator: drawn from the global RNG,
    it would shift the training process's masks, noise and flips by one draw on the first epoch of a
    run, so a resumed run would differ."""
    sampler = Sampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                      drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       drop_last=train, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(seed + rank))

def make_dataset(args, train=True):
    """The training scripts' data: an ImageNet-style folder / file list (held-out images:
    --val_data, else the training folder)."""
    if train:
        return ImageFolder(args.data, args.img_size, list_file=args.data_list)
    return ImageFolder(args.val_data or args.data, args.img_size)
