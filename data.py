"""Data: ImageNet-style folders (or the authors' `path label` lists), the ADM centre crop, a
built-in procedural dataset for demos and tests, and the distributed loader."""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

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
                   for f in fs if f.lower().endswith(IMAGE_EXTS))
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
            self.rendered[i] = (to_tensor(arr), label)
        return self.rendered[i]

def spread(n, k):
    """k indices evenly spread over range(n), all if k >= n: class-balanced on class-sorted folders."""
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
    """The training scripts' data: --demo's built-in shapes, or an ImageNet-style folder / file list
    (held-out images: --val_data, else the training folder)."""
    if args.data is None:  # the scripts' check_args asked for --data outside --demo
        return Shapes(args.demo_images if train else 64, args.img_size, seed=0 if train else 1)
    if train:
        return ImageFolder(args.data, args.img_size, list_file=args.data_list)
    return ImageFolder(args.val_data or args.data, args.img_size)
