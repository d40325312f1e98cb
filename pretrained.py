"""Networks made by others, and the authors' files: the frozen teachers of FSD behind one registry
(DINOv2, DINOv3, SigLIP 2, SAM, RADIO), the networks of the tokenizer's losses (LPIPS-VGG,
ConvNeXt-S, PatchGAN), the FID Inception-v3, and the readers of the authors' released checkpoints
(their key names, hf:// names). models.py holds the paper's own networks."""
import functools
import json
import logging
import math
import mmap
import os
import time
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import models

log = logging.getLogger("rectok")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def download_error(what, e):
    """The one line for a pretrained file that could not be downloaded (offline, say)."""
    return SystemExit(f"could not load pretrained {what} ({str(e).splitlines()[0]}); "
                      "offline, place the file in "
                      f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, "
                      "or run --demo (random weights)")

# ---- The teacher registry (paper Sec. 3.2: E_VFM of Eq. 5, the network FSD distils).
# A teacher is a frozen nn.Module with
#   .dim         channels of its patch features (the semantic decoder's output width)
#   forward(x)   x: images in [-1, 1], (B, 3, H, W) -> patch features (B, grid * grid, .dim) on the
#                tokenizer's token grid (its own resizing and normalisation inside)
#   .blocks      optional: its transformer blocks, compiled one by one by --compile
# and a registry entry: build(sd, grid, args) makes it (sd: its weight file's state dict, whose key
# names load_teacher checks strictly, or None for random weights at --teacher_size; args: stage 1's
# flags), url: where its weights are downloaded from once (None: a gated file, given by
# --teacher_ckpt, with `gated` saying where to ask for it); cache, kind and marker where the
# defaults (DINO's) do not fit; to_ours(sd): the file's tensors that the module holds, where the
# file holds more (build reads the sizes off the file as published). A new teacher: its class,
# one entry.

class Teacher(NamedTuple):
    build: Callable
    url: Optional[str] = None
    gated: Optional[str] = None
    cache: Optional[str] = None  # its file's name in the torch hub cache (default: the URL's)
    kind: str = "DINOv2/v3 weights"  # what --teacher_ckpt must be (plumbing.KINDS), told by...
    marker: str = "cls_token"  # ...a key that only such files have
    to_ours: Optional[Callable] = None

def dino_size(sd, size):
    """(width, depth, heads) read off a DINO weight file (64 channels per head in every released
    size), or TEACHER_SIZES[size] for random weights."""
    if sd is None:
        return TEACHER_SIZES[size]
    width = sd["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = {w: h for w, _, h in TEACHER_SIZES.values()}.get(width, width // 64)
    return width, depth, heads

def dinov2(sd, grid, args):
    return DinoTeacher(False, *dino_size(sd, args.teacher_size), grid,
                       args.teacher_input == "release")

def dinov3(sd, grid, args):
    return DinoTeacher(True, *dino_size(sd, args.teacher_size), grid,
                       args.teacher_input == "release", args.teacher_rope_rescale)

def siglip(sd, grid, args):
    return SiglipTeacher(**siglip_size(sd, args.teacher_size), grid=grid,
                         release_input=args.teacher_input == "release")

def sam(sd, grid, args):
    return SamTeacher(**sam_size(sd, args.teacher_size), grid=grid,
                      release_input=args.teacher_input == "release")

def radio(sd, grid, args):
    return RadioTeacher(**radio_size(sd, args.teacher_size), grid=grid)

# what SAM and RADIO hold of their files (Teacher.to_ours)
SAM_PREFIX = "vision_encoder."

def sam_unused(key):
    """The vision encoder's absolute and relative positions, which the release's config drops."""
    return key == "pos_embed" or key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w"))

def sam_to_ours(sd):
    """The vision encoder's tensors of a SamModel file, prefix stripped, less its positions; the
    prompt encoder, mask decoder and shared image embedding are not the teacher's."""
    n = len(SAM_PREFIX)
    return {k[n:]: v for k, v in sd.items() if k.startswith(SAM_PREFIX) and not sam_unused(k[n:])}

RADIO_PREFIX = "radio_model.model.patch_generator."
# in the file, not the spatial features': the summary's token indices, the per-teacher adaptor
# heads, forward_intermediates' per-layer normaliser
RADIO_UNUSED = ("radio_model.summary_idxs", "radio_model.adaptors.",
                "radio_model.inter_feature_normalizer.")

def radio_to_ours(sd):
    """The file's tensors less RADIO_UNUSED."""
    return {k: v for k, v in sd.items() if not k.startswith(RADIO_UNUSED)}

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{0}14/dinov2_vit{0}14_pretrain.pth"
DINOV3_GATED = ("--teacher_ckpt: DINOv3 weights are gated; "
                "request dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth at "
                "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ "
                "and pass its path")
DINOV3_B_GATED = DINOV3_GATED.replace("vitl16_pretrain_lvd1689m-8aa4cbdd",
                                      "vitb16_pretrain_lvd1689m-73cec8be")
# SigLIP 2 (the release's default tag of vit_large_patch16_siglip_256 at timm 1.0.19, v2_webli)
SIGLIP_URL = ("https://huggingface.co/timm/vit_large_patch16_siglip_256.v2_webli/resolve/main/"
              "pytorch_model.bin")
SAM_URL = "https://huggingface.co/facebook/sam-vit-large/resolve/main/pytorch_model.bin"
# RADIOv2.5-L, the release's "nvidia/RADIO-L" (the paper's Tab. 6 "RADIOv2")
RADIO_URL = "https://huggingface.co/nvidia/RADIO-L/resolve/main/model.safetensors"

# the paper's teachers: DINOv2 ViT-L/14 below dim 64, DINOv3 ViT-L/16 from 64 (Sec. 4.1); SigLIP 2,
# SAM ViT-L, RADIOv2.5-L and DINOv3 ViT-B/16 of its Tab. 6; DINOv2 ViT-S/14 and ViT-B/14 for
# smaller runs
TEACHERS = {"dinov2_vits14": Teacher(dinov2, DINOV2_URL.format("s")),
            "dinov2_vitb14": Teacher(dinov2, DINOV2_URL.format("b")),
            "dinov2_vitl14": Teacher(dinov2, DINOV2_URL.format("l")),
            "dinov3_vitb16": Teacher(dinov3, gated=DINOV3_B_GATED),
            "dinov3_vitl16": Teacher(dinov3, gated=DINOV3_GATED),
            "siglip": Teacher(siglip, SIGLIP_URL, cache="vit_large_patch16_siglip_256.v2_webli.bin",
                              kind="SigLIP weights", marker="attn_pool.latent"),
            "sam": Teacher(sam, SAM_URL, cache="sam-vit-large.bin", kind="SAM weights",
                           marker="vision_encoder.neck.conv1.weight", to_ours=sam_to_ours),
            "radio": Teacher(radio, RADIO_URL, cache="nvidia_RADIO-L.safetensors",
                             kind="RADIO weights",
                             marker="radio_model.model.patch_generator.pos_embed",
                             to_ours=radio_to_ours)}

# the release's names of its teachers (sem_decoders.<name> in its checkpoints), where ours differ;
# --teacher takes either
RELEASE_KEYS = {"dinov2_vitl14": "dinov2", "dinov3_vitl16": "dinov3", "dinov3_vitb16": "dinov3b"}
RELEASE_NAMES = {key: name for name, key in RELEASE_KEYS.items()}

def release_key(name):
    """The key of teacher `name`'s semantic decoder when several teachers train at once:
    sem_decoders.<key>, as in the release's checkpoints."""
    return RELEASE_KEYS.get(name, name)

def teacher_file(name, path):
    """The teacher's weight file: `path` (--teacher_ckpt) if given, else its registry URL downloaded
    once into the torch hub cache (a gated teacher: one line saying where to ask for it)."""
    if path:
        return path
    entry = TEACHERS[name]
    if entry.url is None:
        raise SystemExit(entry.gated)
    cached = entry.cache or os.path.basename(entry.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", cached)
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(entry.url, path)
        except Exception as e:
            raise download_error(f"{name} ({entry.url})", e)
    return path

def load_teacher(name, grid, args, ckpt=None):
    """The frozen teacher `name` on the tokenizer's `grid`: its weight file (teacher_file of `ckpt`;
    strict keys), or random weights with --random_frozen_nets."""
    sd = None
    path = None if args.random_frozen_nets else teacher_file(name, ckpt)
    if path is None:
        log.warning(f"!!! teacher {name} ({args.teacher_size}) has RANDOM weights: its features "
                    "are meaningless (tests/demos only) !!!")
    else:
        sd = read_file(path)
    entry = TEACHERS[name]
    teacher = entry.build(sd, grid, args)
    if sd is not None:
        models.load_state(teacher, entry.to_ours(sd) if entry.to_ours else sd, path)
    return teacher.requires_grad_(False).eval()

def read_file(path, mmap=False):
    """A weight file: a .safetensors file (RADIO's) with torch alone, any other with torch.load
    (models.read_checkpoint; `mmap`: memory-mapped, for zip-format files)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return models.read_checkpoint(path, mmap=mmap)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def read_safetensors(path):
    """A .safetensors file as a state dict: 8 bytes (little-endian) of header length, a JSON
    header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets past the header), then the
    tensors' bytes (little-endian), memory-mapped copy-on-write."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        sd = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[t["dtype"]]
            begin, end = t["data_offsets"]
            count = (end - begin) // dtype.itemsize
            flat = torch.empty(0, dtype=dtype)
            if count:
                flat = torch.frombuffer(data, dtype=dtype, offset=8 + n + begin, count=count)
            sd[name] = flat.reshape(t["shape"])
        return sd
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path}")
    except Exception as e:
        raise SystemExit(f"{path} is not a safetensors file, or a corrupt or truncated one "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")

# ---- DINOv2 and DINOv3 (Meta's files, Meta's key names: strict loading)

# width, depth, heads of the random-weight teachers (--teacher_size); with a weight file, its sizes
# are read from it. tiny = tests only
TEACHER_SIZES = {"tiny": (64, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12),
                 "large": (1024, 24, 16)}

def rotate_half(x):  # DINOv3 RoPE pairs channel i with channel i + D/2
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)

class DinoBlock(nn.Module):
    """Pre-norm ViT block with LayerScale; DINOv3 adds RoPE on patch tokens and a masked k bias."""
    def __init__(self, width, heads, eps, mask_k_bias):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        # containers named as in Meta's release files (attn.qkv, mlp.fc1, ls1.gamma, ...)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(width, 3 * width),
                                       proj=nn.Linear(width, width)))
        if mask_k_bias:
            # DINOv3: bias_mask (1 for q, 0 for k, 1 for v) is stored in the release file
            mask = torch.ones(3, width).index_fill_(0, torch.tensor([1]), 0)
            self.attn.qkv.register_buffer("bias_mask", mask.flatten())
        hidden = 4 * width
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, width)))
        self.ls1 = nn.Module()
        self.ls2 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(width))
        self.ls2.gamma = nn.Parameter(torch.ones(width))

    def attention(self, x, rope):
        B, N, C = x.shape
        qkv = self.attn.qkv
        bias = qkv.bias * qkv.bias_mask if hasattr(qkv, "bias_mask") else qkv.bias
        q, k, v = (F.linear(x, qkv.weight, bias).view(B, N, 3, self.heads, C // self.heads)
                   .permute(2, 0, 3, 1, 4))
        if rope is not None:
            # rotate only the trailing patch tokens; CLS + storage tokens are left as they are
            sin, cos = rope
            n = N - sin.shape[0]
            q, k = [torch.cat([t[:, :, :n], (t[:, :, n:] * cos + rotate_half(t[:, :, n:]) * sin)
                               .to(t.dtype)], 2)
                    for t in (q, k)]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.attn.proj(x.transpose(1, 2).reshape(B, N, C))

    def forward(self, x, rope):
        x = x + self.ls1.gamma * self.attention(self.norm1(x), rope)
        return x + self.ls2.gamma * self.mlp(self.norm2(x))

class DinoTeacher(nn.Module):
    """x in [-1, 1] (B, 3, H, W) -> final-norm patch tokens (B, grid * grid, dim); CLS/storage
    dropped. v3: DINOv3 (patch 16, 4 storage tokens, RoPE), else DINOv2 (patch 14, learned
    positions)."""
    def __init__(self, v3, width, depth, heads, grid=16, release_input=True, rope_rescale=1.0):
        super().__init__()
        self.v3 = v3
        self.dim = width
        self.heads = heads
        self.patch, self.n_storage = (16, 4) if self.v3 else (14, 0)
        self.grid = grid
        self.release_input = release_input
        self.rope_rescale = rope_rescale
        eps = 1e-5 if self.v3 else 1e-6  # DINOv3 ViT-L uses norm_layer "layernormbf16" (eps 1e-5)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        # in the release files; unused at inference
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, width, self.patch, self.patch)))
        if self.v3:
            self.storage_tokens = nn.Parameter(torch.randn(1, self.n_storage, width) * 0.02)
            self.rope_embed = nn.Module()  # RoPE periods base 100: 100 ** (2k / (D/2)), k < D/4
            d = width // heads
            self.rope_embed.register_buffer("periods",
                                            100.0 ** (2 * torch.arange(d // 4) / (d // 2)))
        else:  # learned absolute positions for 37x37 patches (img_size 518) + CLS
            self.pos_embed = nn.Parameter(torch.randn(1, 37 * 37 + 1, width) * 0.02)
        self.blocks = nn.ModuleList(DinoBlock(width, heads, eps, self.v3) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def train(self, mode=True):  # frozen teacher: always eval
        return super().train(False)

    def pos_embed_for(self, gh, gw):
        """DINOv2 position embedding resampled to gh x gw in float32: Meta's
        interpolate_pos_encoding (bicubic, +0.1 scale-factor offset) or, on the release's input
        path, timm's (bicubic, antialiased, exact size)."""
        pos = self.pos_embed.float()
        M = math.isqrt(pos.shape[1] - 1)
        if gh == gw == M:
            return pos
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        if self.release_input:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        else:
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M),
                                 mode="bicubic", antialias=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1)

    def rope(self, gh, gw):
        """DINOv3 RoPE sin/cos (gh*gw, head_dim), patch-centre coords in [-1, 1] per axis.
        rope_rescale r > 1 scales them by one log-uniform draw from [1/r, r] per batch: HF's DINOv3
        in train mode, as the release runs it."""
        dev = self.rope_embed.periods.device
        ch = torch.arange(0.5, gh, device=dev) / gh
        cw = torch.arange(0.5, gw, device=dev) / gw
        # (HW, 2)
        coords = 2 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).flatten(0, 1) - 1
        if self.rope_rescale > 1:
            log_r = math.log(self.rope_rescale)
            coords = coords * torch.empty((), device=dev).uniform_(-log_r, log_r).exp()
        angles = (2 * math.pi * coords[:, :, None]
                  / self.rope_embed.periods.float()).flatten(1).tile(2)
        return angles.sin(), angles.cos()

    def preprocess(self, x):
        """x in [-1, 1] -> normalised input at grid * patch px, resized bilinearly (Meta's inference
        path). The release's path first goes, for DINOv3, through uint8 (truncated) and Hugging
        Face's processor (bilinear, antialiased, to 224); for DINOv2, through timm's transform
        (bicubic, antialiased, to 518)."""
        x = (x.float() + 1) / 2
        if self.release_input and self.v3:
            x = F.interpolate((x * 255).to(torch.uint8) * (1 / 255), size=(224, 224),
                              mode="bilinear", antialias=True)
        elif self.release_input:
            x = F.interpolate(x, size=(518, 518), mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        side = self.grid * self.patch
        if x.shape[-1] == side:
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, x):
        x = self.patch_embed.proj(self.preprocess(x))
        B, _, gh, gw = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype),
                       x.flatten(2).transpose(1, 2)], 1)
        rope = None
        if self.v3:
            x = torch.cat([x[:, :1], self.storage_tokens.expand(B, -1, -1).to(x.dtype),
                           x[:, 1:]], 1)
            rope = self.rope(gh, gw)
        else:
            x = x + self.pos_embed_for(gh, gw).to(x.dtype)
        for blk in self.blocks:
            x = blk(x, rope)
        # LayerNorm is per token: norm after slicing is the same
        return self.norm(x[:, 1 + self.n_storage:])


# ---- SigLIP (timm's SigLIP ViTs: timm's key names, strict loading; the release builds
# vit_large_patch16_siglip_256 and distils its forward_features)

SIGLIP_MEAN = SIGLIP_STD = 0.5  # timm's SigLIP cfgs: IMAGENET_INCEPTION_MEAN / _STD
SIGLIP_CROP_PCT = 0.9  # timm's default _cfg crop_pct, which the SigLIP cfgs do not override
# width -> heads of the timm-style ViTs of SigLIP, SAM and RADIO (B 768 / 12, L 1024 / 16 as
# TEACHER_SIZES; SigLIP So400m 1152 / 16; SAM and RADIO ViT-H 1280 / 16) and the random-weight sizes
# (tiny 64 / 2); others 64 channels a head (not DINO's: DINOv3 ViT-H+ is 1280 / 20)
VIT_HEADS = {**{w: h for w, _, h in TEACHER_SIZES.values()}, 1152: 16, 1280: 16}

def siglip_size(sd, size):
    """SiglipTeacher's size arguments read off a timm SigLIP file, or TEACHER_SIZES[size] for random
    weights (patch 16 at 256 px, MLP 4 x width, with the attention-pool head, as
    vit_large_patch16_siglip_256)."""
    if sd is None:
        width, depth, heads = TEACHER_SIZES[size]
        return dict(width=width, depth=depth, heads=heads)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        hint = (" (an open_clip file: its image tower is under visual.trunk.*)"
                if any(k.startswith("visual.trunk.") for k in sd) else "")
        raise SystemExit(f"--teacher_ckpt: should be timm's SigLIP weights (timm key names, e.g. "
                         f"{SIGLIP_URL}); it has {', '.join(list(sd)[:3])}, ...{hint}")
    width = sd["pos_embed"].shape[-1]
    return dict(width=width,
                depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                heads=VIT_HEADS.get(width, width // 64),
                hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
                patch=sd["patch_embed.proj.weight"].shape[-1],
                pos_grid=math.isqrt(sd["pos_embed"].shape[1]),
                pool_hidden=(sd["attn_pool.mlp.fc1.weight"].shape[0]
                             if "attn_pool.latent" in sd else 0))


def mlp(width, hidden):
    return nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(),
                                     fc2=nn.Linear(hidden, width)))


class SiglipBlock(nn.Module):
    """Pre-norm ViT block: LayerNorm (eps 1e-6) -> MHA (qkv with bias, SDPA) -> residual; LayerNorm
    -> MLP (exact GELU) -> residual. No LayerScale."""
    def __init__(self, width, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(width, 3 * width),
                                       proj=nn.Linear(width, width)))
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = mlp(width, hidden)

    def forward(self, x):
        x = x + attention(self.attn, self.heads, self.norm1(x))
        return x + self.mlp(self.norm2(x))


def attention(attn, heads, x):
    """Multi-head self-attention of timm's / SAM's ViTs over x (B, N, C): attn.qkv (with bias),
    SDPA, attn.proj."""
    B, N, C = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(a)


class SiglipTeacher(nn.Module):
    """x in [-1, 1] (B, 3, H, W) -> SigLIP's final-norm patch tokens (B, grid * grid, dim), as
    timm's forward_features (SigLIP has no CLS token: every token is a patch token).

    release_input: the release's path, timm's eval transform for the model (resize the short side to
    floor(256 / 0.9) = 284 px, bicubic, antialiased; centre crop 256; mean = std = 0.5), so the
    teacher sees the central 256/284 of the image; else the image itself at grid * patch px
    (bilinear), mean = std = 0.5. Off 16 x 16 patches, the positions are resampled as timm's
    dynamic_img_size does (bicubic, antialiased, in float32)."""
    def __init__(self, width, depth, heads, grid=16, release_input=True, hidden=None, patch=16,
                 pos_grid=16, pool_hidden=None):
        super().__init__()
        self.dim = width
        self.grid = grid
        self.patch = patch
        self.release_input = release_input
        hidden = hidden or 4 * width
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, width, patch, patch)))
        self.pos_embed = nn.Parameter(torch.randn(1, pos_grid * pos_grid, width) * 0.02)
        self.blocks = nn.ModuleList(SiglipBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        pool_hidden = hidden if pool_hidden is None else pool_hidden
        if pool_hidden:
            # timm's attention-pool head (global_pool "map": one latent query, q / kv / proj, norm,
            # MLP): in the weight file, NOT run here (the release distils forward_features, before
            # the pool); held so that the file loads with strict keys
            self.attn_pool = nn.Module()
            self.attn_pool.latent = nn.Parameter(torch.zeros(1, 1, width))
            self.attn_pool.q = nn.Linear(width, width)
            self.attn_pool.kv = nn.Linear(width, 2 * width)
            self.attn_pool.proj = nn.Linear(width, width)
            self.attn_pool.norm = nn.LayerNorm(width, eps=1e-6)
            self.attn_pool.mlp = mlp(width, pool_hidden)

    def train(self, mode=True):  # frozen teacher: always eval
        return super().train(False)

    @property
    def native(self):
        """The side in px of the model's own input (256: pos_embed's grid x patch)."""
        return math.isqrt(self.pos_embed.shape[1]) * self.patch

    def pos_embed_for(self, gh, gw):
        pos = self.pos_embed
        M = math.isqrt(pos.shape[1])
        if gh == gw == M:
            return pos
        grid = pos.float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)

    def preprocess(self, x):
        """x in [-1, 1] -> normalised input at grid * patch px."""
        x = (x.float() + 1) / 2
        if self.release_input:
            # torchvision Resize(int) on a tensor: the short side to `scaled`, the long side
            # int(scaled * long / short); antialiased bicubic (torchvision's default antialias)
            crop = self.native
            scaled = math.floor(crop / SIGLIP_CROP_PCT)
            h, w = x.shape[-2:]
            size = ((scaled, int(scaled * w / h)) if h <= w else (int(scaled * h / w), scaled))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True)
            top, left = (int(round((s - crop) / 2.0)) for s in size)  # CenterCrop's offsets
            x = x[..., top:top + crop, left:left + crop]
        x = (x - SIGLIP_MEAN) / SIGLIP_STD
        side = self.grid * self.patch
        if x.shape[-2:] == (side, side):
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, x):
        x = self.patch_embed.proj(self.preprocess(x))
        _, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.pos_embed_for(gh, gw).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

# ---- SAM (transformers' SamModel files, their vision_encoder.* key names; the release builds
# SamVisionModel of facebook/sam-vit-large at image_size 256 without absolute or relative positions,
# utils/foundation_models.py, and never runs it in models/rectok.py: its input path and patch-token
# output below follow the authors' earlier models/detok.py, which does)

SAM_SIDE = 256  # the release's image_size: the processor's longest edge and padded size
SAM_WINDOW = 14  # the window of every released SAM

def sam_global_blocks(depth):
    """SAM's global-attention blocks, the last of each quarter (L: 5, 11, 17, 23; the last block
    below depth 4)."""
    step = depth // 4 or depth
    return [i for i in range(depth) if (i + 1) % step == 0]

def sam_size(sd, size):
    """SamTeacher's size arguments read off a SamModel file (the window and global blocks off its
    relative-position tables: (2 * 14 - 1) rows in a window block, (2 * 64 - 1) in a global one at
    SAM's 1024 px), or TEACHER_SIZES[size] for random weights."""
    if sd is None:
        width, depth, heads = TEACHER_SIZES[size]
        return dict(width=width, depth=depth, heads=heads)
    pre = SAM_PREFIX
    if pre + "patch_embed.projection.weight" not in sd:
        hint = ""
        if any(k.startswith("image_encoder.") for k in sd):
            hint = (" (Meta's segment-anything file, image_encoder.*: take transformers' "
                    "facebook/sam-vit-large)")
        raise SystemExit(f"--teacher_ckpt: should be SAM weights in transformers' layout "
                         f"(vision_encoder.* keys, e.g. {SAM_URL}); it has "
                         f"{', '.join(list(sd)[:3])}, ...{hint}")
    proj = sd[pre + "patch_embed.projection.weight"]
    width = proj.shape[0]
    depth = len({k.split(".")[2] for k in sd if k.startswith(pre + "layers.")})
    kw = dict(width=width, depth=depth, heads=VIT_HEADS.get(width, width // 64),
              hidden=sd[pre + "layers.0.mlp.lin1.weight"].shape[0], patch=proj.shape[-1],
              out=sd[pre + "neck.conv1.weight"].shape[0])
    rows = [sd.get(f"{pre}layers.{i}.attn.rel_pos_h") for i in range(depth)]
    if pre + "pos_embed" in sd and None not in rows:
        global_rows = 2 * sd[pre + "pos_embed"].shape[1] - 1
        kw["global_blocks"] = [i for i, r in enumerate(rows) if r.shape[0] == global_rows]
        windows = {(r.shape[0] + 1) // 2 for r in rows if r.shape[0] != global_rows}
        if len(windows) > 1:
            raise SystemExit("--teacher_ckpt: SAM blocks of several window sizes "
                             f"{sorted(windows)}")
        kw["window"] = windows.pop() if windows else SAM_WINDOW
    return kw


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's neck)."""
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamBlock(nn.Module):
    """SAM's ViT block on a (B, H, W, C) token map: LayerNorm (eps 1e-6) -> attention within
    window x window windows (the normed map zero-padded to a multiple of the window, the padding
    taking part as keys and cropped after; window 0: global) -> residual; LayerNorm -> MLP (exact
    GELU) -> residual. No positions."""
    def __init__(self, width, heads, hidden, window):
        super().__init__()
        self.heads = heads
        self.window = window
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(width, 3 * width),
                                       proj=nn.Linear(width, width)))
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(lin1=nn.Linear(width, hidden), lin2=nn.Linear(hidden, width)))

    def forward(self, x):
        B, H, W, C = x.shape
        h = self.layer_norm1(x)
        w = self.window
        if w:
            Hp, Wp = H + (-H % w), W + (-W % w)
            h = F.pad(h, (0, 0, 0, Wp - W, 0, Hp - H))
            # one sequence of w * w tokens per window
            h = h.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w * w, C)
            h = attention(self.attn, self.heads, h)
            h = h.view(B, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(B, Hp, Wp, C)
            h = h[:, :H, :W]
        else:
            h = attention(self.attn, self.heads, h.reshape(B, H * W, C)).view(B, H, W, C)
        x = x + h
        return x + self.mlp.lin2(F.gelu(self.mlp.lin1(self.layer_norm2(x))))


class SamTeacher(nn.Module):
    """x in [-1, 1] (B, 3, H, W) -> SAM's neck features (B, grid * grid, dim = 256 channels):
    SamVisionModel's last_hidden_state, the map after the neck (conv 1x1 -> LayerNorm2d -> conv
    3x3 -> LayerNorm2d), as tokens, resized bilinearly to the tokenizer's grid where they differ
    (models/detok.py). Ours: the release builds this network but does not run it.

    release_input: detok.py's SamImageProcessor call on (x + 1) / 2: uint8 (truncated), the
    longest edge to 256 (a no-op at 256 px; else antialiased bilinear, PIL's filter approximated),
    / 255, ImageNet mean / std, zero-padded to 256 x 256 at the bottom / right. Else the image
    itself at grid * patch px (bilinear), ImageNet mean / std."""
    def __init__(self, width, depth, heads, grid=16, release_input=True, hidden=None, patch=16,
                 out=256, window=SAM_WINDOW, global_blocks=None):
        super().__init__()
        self.dim = out
        self.grid = grid
        self.patch = patch
        self.release_input = release_input
        hidden = hidden or 4 * width
        if global_blocks is None:
            global_blocks = sam_global_blocks(depth)
        self.patch_embed = nn.ModuleDict(dict(projection=nn.Conv2d(3, width, patch, patch)))
        self.layers = nn.ModuleList(
            SamBlock(width, heads, hidden, 0 if i in global_blocks else window)
            for i in range(depth))
        self.neck = nn.ModuleDict(dict(conv1=nn.Conv2d(width, out, 1, bias=False),
                                       layer_norm1=LayerNorm2d(out, eps=1e-6),
                                       conv2=nn.Conv2d(out, out, 3, padding=1, bias=False),
                                       layer_norm2=LayerNorm2d(out, eps=1e-6)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def blocks(self):  # for --compile
        return self.layers

    def train(self, mode=True):  # frozen teacher: always eval
        return super().train(False)

    def preprocess(self, x):
        """x in [-1, 1] -> SAM's normalised input."""
        x = ((x.float() + 1) / 2).clamp(0, 1)
        if not self.release_input:
            side = self.grid * self.patch
            if x.shape[-2:] != (side, side):
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            return (x - self.mean) / self.std
        u = (x * 255).to(torch.uint8).float()  # to PIL: truncated
        h, w = x.shape[-2:]
        scale = SAM_SIDE / max(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        if size != (h, w):
            u = F.interpolate(u, size=size, mode="bilinear", antialias=True).round().clamp(0, 255)
        x = (u.double() / 255).float()  # the processor's rescale, in float64
        x = (x - self.mean) / self.std
        return F.pad(x, (0, SAM_SIDE - size[1], 0, SAM_SIDE - size[0]))

    @torch.no_grad()
    def forward(self, x):
        x = self.patch_embed.projection(self.preprocess(x)).permute(0, 2, 3, 1)  # (B, h, w, C)
        for block in self.layers:
            x = block(x)
        x = self.neck.conv1(x.permute(0, 3, 1, 2))
        x = self.neck.layer_norm2(self.neck.conv2(self.neck.layer_norm1(x)))
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)

# ---- RADIO (NVIDIA's Hugging Face files, their radio_model.* key names; the release builds
# nvidia/RADIO-L by remote code, utils/foundation_models.py, and never runs it: the spatial features
# below follow NVlabs/RADIO's RADIOModel.forward, radio/radio_model.py and enable_cpe_support.py)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RADIO's input conditioner
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
def radio_size(sd, size):
    """RadioTeacher's size arguments read off a RADIO file, or TEACHER_SIZES[size] for random
    weights (RADIOv2.5's layout: patch 16, 128 x 128 positions, 8 prefix tokens)."""
    if sd is None:
        width, depth, heads = TEACHER_SIZES[size]
        return dict(width=width, depth=depth, heads=heads)
    if RADIO_PREFIX + "pos_embed" not in sd:
        raise SystemExit(f"--teacher_ckpt: should be RADIO weights in Hugging Face's layout "
                         f"(radio_model.* keys, e.g. {RADIO_URL}); it has "
                         f"{', '.join(list(sd)[:3])}, ...")
    embedder = sd[RADIO_PREFIX + "embedder.weight"]
    width = embedder.shape[0]
    blocks = "radio_model.model.blocks."
    return dict(width=width, depth=len({k.split(".")[3] for k in sd if k.startswith(blocks)}),
                heads=VIT_HEADS.get(width, width // 64),
                hidden=sd[blocks + "0.mlp.fc1.weight"].shape[0],
                patch=math.isqrt(embedder.shape[1] // 3),
                pos_grid=math.isqrt(sd[RADIO_PREFIX + "pos_embed"].shape[1]),
                prefix_tokens=sd[RADIO_PREFIX + "cls_token.token"].shape[0],
                feature_norm="radio_model.feature_normalizer.mean" in sd)


class RadioTeacher(nn.Module):
    """x in [-1, 1] (B, 3, H, W) -> RADIO's spatial features (B, grid * grid, dim): the last
    block's patch tokens (RADIO replaces the ViT's final norm by Identity), as RADIOModel.forward's
    second output. Ours: the release builds this network but does not run it.

    Input: (x + 1) / 2 at grid * patch px (bilinear; 256 px for the 16 x 16 grid: as it is), then
    the file's conditioner (CLIP mean / std); no release path to follow, so --teacher_input does
    not change it. Backbone: timm's ViT-L/16 blocks (SiglipBlock's), RADIO's patch generator
    ("CPE": a bias-free linear patch embedding, a 128 x 128 position table resized bilinearly to
    max(gh, gw) a side and cropped to its top-left gh x gw, 8 prefix tokens: a summary token per
    teacher of RADIO's and registers)."""
    def __init__(self, width, depth, heads, grid=16, hidden=None, patch=16, pos_grid=128,
                 prefix_tokens=8, feature_norm=False):
        super().__init__()
        self.dim = width
        self.grid = grid
        self.patch = patch
        self.radio_model = nn.Module()
        conditioner = self.radio_model.input_conditioner = nn.Module()
        conditioner.register_buffer("norm_mean", torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1))
        conditioner.register_buffer("norm_std", torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1))
        vit = self.radio_model.model = nn.Module()
        vit.patch_generator = nn.Module()
        vit.patch_generator.embedder = nn.Linear(3 * patch * patch, width, bias=False)
        vit.patch_generator.pos_embed = nn.Parameter(torch.randn(1, pos_grid ** 2, width) * 0.02)
        vit.patch_generator.cls_token = nn.Module()
        vit.patch_generator.cls_token.token = nn.Parameter(torch.randn(prefix_tokens, width) * 0.02)
        vit.blocks = nn.ModuleList(SiglipBlock(width, heads, hidden or 4 * width)
                                   for _ in range(depth))
        if feature_norm:  # RADIO's FeatureNormalizer, (x - mean) @ tx.T, where a file has one
            normalizer = self.radio_model.feature_normalizer = nn.Module()
            normalizer.register_buffer("mean", torch.zeros(width))
            normalizer.register_buffer("tx", torch.eye(width))

    @property
    def blocks(self):  # for --compile
        return self.radio_model.model.blocks

    def train(self, mode=True):  # frozen teacher: always eval
        return super().train(False)

    def pos_embed_for(self, gh, gw):
        pos = self.radio_model.model.patch_generator.pos_embed
        M = math.isqrt(pos.shape[1])
        if gh == gw == M:
            return pos
        side = max(gh, gw)
        table = pos.float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=False)
        return table[..., :gh, :gw].flatten(2).transpose(1, 2).to(pos.dtype)

    def preprocess(self, x):
        """x in [-1, 1] -> the conditioned input at grid * patch px."""
        x = (x.float() + 1) / 2
        side = self.grid * self.patch
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        conditioner = self.radio_model.input_conditioner
        return (x - conditioner.norm_mean) / conditioner.norm_std

    @torch.no_grad()
    def forward(self, x):
        x = self.preprocess(x)
        B, C, H, W = x.shape
        p = self.patch
        gh, gw = H // p, W // p
        # each patch's pixels channel-major, patches row-major
        x = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        generator = self.radio_model.model.patch_generator
        x = generator.embedder(x) + self.pos_embed_for(gh, gw).to(x.dtype)
        prefix = generator.cls_token.token
        x = torch.cat([prefix.expand(B, -1, -1).to(x.dtype), x], 1)
        for block in self.blocks:
            x = block(x)
        x = x[:, prefix.shape[0]:]
        normalizer = getattr(self.radio_model, "feature_normalizer", None)
        if normalizer is not None:
            x = (x - normalizer.mean) @ normalizer.tx.T
        return x

# ---- The networks of the tokenizer's losses (paper Eq. 4; the release's utils/losses.py)
# perceptual (LPIPS-VGG, ConvNeXt-S) and PatchGAN

class Perceptual(nn.Module):
    """LPIPS-VGG; convnext_weight w > 0 gives the release's
    (LPIPS + w * ConvNeXt-S logit MSE at 224) / (1 + w)."""
    def __init__(self, convnext_weight, random_weights):
        super().__init__()
        import lpips
        import torchvision
        try:
            # lpips still calls torchvision with its deprecated `pretrained=`
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(pretrained|weights).*deprecated")
                self.lpips = lpips.LPIPS(net="vgg", pnet_rand=random_weights, verbose=False)
            if convnext_weight > 0:
                self.convnext = torchvision.models.convnext_small(
                    weights=None if random_weights else "DEFAULT")
            else:
                self.convnext = None
        except Exception as e:
            raise download_error("VGG-16 (vgg16-397923af.pth) / "
                                 "ConvNeXt-S (convnext_small-0c510722.pth)", e)
        self.convnext_weight = convnext_weight
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)
        if random_weights:
            log.warning("!!! LPIPS / ConvNeXt backbones have RANDOM weights "
                        "(--random_frozen_nets): demo/test only !!!")

    def train(self, mode=True):  # frozen networks stay in eval mode (LPIPS has dropout)
        return super().train(False)

    def forward(self, x, x_hat):
        loss = self.lpips(x_hat, x).mean()
        if self.convnext is None:
            return loss
        # ConvNeXt-S input: 224 px, ImageNet-normalised
        x, x_hat = ((F.interpolate((img + 1) / 2, size=224, mode="bilinear", antialias=True)
                     - self.mean) / self.std
                    for img in (x, x_hat))
        conv = F.mse_loss(self.convnext(x_hat), self.convnext(x))
        return (loss + self.convnext_weight * conv) / (1 + self.convnext_weight)

def patchgan(ndf=64, n_layers=3):
    """PatchGAN discriminator (3 layers, ndf 64, BatchNorm), as in taming-transformers."""
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    ch = ndf
    for n in range(1, n_layers + 1):
        out = ndf * min(2 ** n, 8)
        layers += [nn.Conv2d(ch, out, 4, 2 if n < n_layers else 1, 1, bias=False),
                   nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
        ch = out
    return nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, 1, 1))

# ---- The FID Inception-v3 (paper Sec. 4.1, rFID / gFID): the 2015-12-05 TF graph, named as in
# pytorch-fid's weights, matched to torch-fidelity's `inception-v3-compat` extractor

def tf1_resize(x, size):
    """TF1 bilinear resize of float (N, C, H, W) to size x size: src = dst * in / out
    (align_corners=False, NO half-pixel centres), neighbours floor / ceil clamped to the edge; fp32,
    W then H, as torch-fidelity does."""
    def taps(n):
        src = (torch.arange(size, dtype=torch.float32, device=x.device)
               * torch.tensor(n / size, dtype=torch.float32))
        return src.floor().long(), src.ceil().long().clamp(max=n - 1), src - src.floor()
    y0, y1, dy = taps(x.shape[2])
    x0, x1, dx = taps(x.shape[3])
    x = x[..., x0] + (x[..., x1] - x[..., x0]) * dx
    return x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * dy[:, None]

def conv(cin, cout, kernel, stride=1, padding=None):
    """conv (no bias) + BatchNorm (TF's eps 1e-3) + ReLU; 'SAME' padding at stride 1 unless told
    otherwise."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding is None:
        padding = (kh // 2, kw // 2) if stride == 1 else 0
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=1e-3), relu=nn.ReLU()))

avg_pool = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1,
                             count_include_pad=False)  # as TF
max_pool = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)

class InceptionA(nn.Module):  # 35 x 35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = conv(cin, 64, 1)
        self.branch_pool = conv(cin, pool_features, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3)
        self.branch3x3dbl_3 = conv(96, 96, 3)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):  # 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):  # 17 x 17, factorised 7 x 7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = conv(cin, 192, 1)
        self.branch_pool = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7))
        self.branch7x7_3 = conv(c7, 192, (7, 1))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7))

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b77 = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(
            self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        return torch.cat([self.branch1x1(x), b7, b77, self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):  # 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7))
        self.branch7x7x3_3 = conv(192, 192, (7, 1))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

# 8 x 8; the TF graph's last block (Mixed_7c) max-pools where Mixed_7b average-pools
class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = conv(cin, 320, 1)
        self.branch_pool = conv(cin, 192, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3)
        self.pool = pool
        self.branch3x3_2a = conv(384, 384, (1, 3))
        self.branch3x3_2b = conv(384, 384, (3, 1))
        self.branch3x3dbl_3a = conv(384, 384, (1, 3))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1))

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
                          self.branch_pool(self.pool(x))], 1)

class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3, padding=0)  # TF 'VALID'
        self.Conv2d_2b_3x3 = conv(32, 64, 3)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3, padding=0)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
            InceptionC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7b = InceptionE(1280, avg_pool)
        self.Mixed_7c = InceptionE(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)

    @torch.no_grad()
    def forward(self, x):
        """uint8 (N, 3, H, W) -> (pool features (N, 2048), logits WITHOUT the fc bias (N, 1008),
        which IS uses)."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 (N, 3, H, W) images, "
                             f"got {x.dtype} {tuple(x.shape)}")
        # fp32, no TF32, whatever the caller's autocast / TF32 settings:
        # FID must not depend on the GPU
        with torch.autocast(x.device.type, enabled=False), torch.backends.cudnn.flags(
                enabled=True, benchmark=False, deterministic=torch.backends.cudnn.deterministic,
                allow_tf32=False):
            x = (tf1_resize(x.float(), 299) - 128) / 128
            x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
            for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
                x = getattr(self, "Mixed_" + name)(x)
            pool = x.mean((2, 3))
        # an fp64 matmul cannot fall to TF32
        return pool, (pool.double() @ self.fc.weight.double().T).float()

FID_WEIGHTS = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")

def load_inception(path=None):
    """The frozen FID Inception: a .pth in pytorch-fid's layout, its release (None; cached by torch
    hub) or "random"."""
    # CPU init; "random" is then the same net in every process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = InceptionV3().eval().requires_grad_(False)
        # He init keeps random features O(1); PyTorch's default shrinks them to ~1e-7
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    if path == "random":
        log.warning("!!! RANDOM Inception weights: "
                    "FID / IS / precision / recall are MEANINGLESS !!!")
        return model
    try:
        if path:
            state = models.read_checkpoint(path)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS, map_location="cpu")
    except Exception as e:  # offline: urllib's URLError
        raise download_error(f"FID Inception ({FID_WEIGHTS})", e)
    # num_batches_tracked: a BN training counter, unused here
    keys = lambda d: {k for k in d if not k.endswith("num_batches_tracked")}
    for k in sorted(keys(model.state_dict()) ^ keys(state)):
        raise SystemExit(f"--inception {path or FID_WEIGHTS}: should be pytorch-fid's FID "
                         "Inception weights; it has "
                         f"{'an unexpected' if k in state else 'no'} key {k}")
    model.load_state_dict(state, strict=False)
    return model

# ---- The authors' released checkpoints (RecTok.pth, RecTok_decft.pth, ditdh*_epoch_*.pth): a dict
# of `model` / `model_ema` state dicts with no construction arguments, some names of their own

def released_file(path):
    """hf://<org>/<repo>/<file> (e.g. hf://QingyuShi/RecTok/RecTok_decft.pth): that Hugging Face
    file, downloaded once into the torch hub cache (under torchrun, local rank 0 downloads and the
    others wait); other paths as given."""
    if not str(path).startswith("hf://"):
        return path
    parts = str(path)[len("hf://"):].split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise SystemExit(f"{path}: a released file is named hf://<org>/<repo>/<file>, "
                         "e.g. hf://QingyuShi/RecTok/RecTok.pth")
    url = f"https://huggingface.co/{parts[0]}/{parts[1]}/resolve/main/{parts[2]}"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    local = os.path.join(folder, os.path.basename(parts[2]))
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:
        while not os.path.isfile(local):
            time.sleep(2)
    if not os.path.isfile(local):
        log.info(f"downloading {url} to {folder} (once)")
        try:
            os.makedirs(folder, exist_ok=True)
            # via a temporary file: never a half-written one
            torch.hub.download_url_to_file(url, local)
        except Exception as e:  # offline: urllib's URLError
            raise SystemExit(f"could not download {url} ({str(e).splitlines()[0]}); "
                             f"offline, put the file in {folder}")
    return local

# names in the authors' tokenizer files that differ from ours (their files may also carry the
# teacher)
RELEASE_RENAMES = {"encoder.patch_embed.0.": "encoder.patch_embed.",
                   "decoder.ffn.1.": "decoder.to_pixels."}

def release_tokenizer_to_ours(sd):
    """Our names for a released tokenizer state dict: with one teacher sem_decoders.<teacher>.* ->
    sem_decoder.*, with several they stay; the teachers' weights are dropped."""
    teachers = {k.split(".")[1] for k in sd if k.startswith("sem_decoders.")}
    out = {}
    for k, v in sd.items():
        if not k.startswith("sem_foundation_models."):
            for old, new in RELEASE_RENAMES.items():
                k = k.replace(old, new)
            if k.startswith("sem_decoders.") and len(teachers) == 1:
                k = "sem_decoder." + k.split(".", 2)[2]
            out[k] = v
    return out

def release_dit_to_ours(sd):
    """A released DiT^DH state dict without its stored RoPE tables (we recompute them)."""
    return {k: v for k, v in sd.items() if "_feat_rope.freqs_" not in k}

def size_of(sd, prefix):
    """The models.SIZES name of the tokenizer transformer under `prefix`, read off its tensors."""
    width = sd[prefix + "positional_embedding"].shape[-1]
    blocks = [k[len(prefix):] for k in sd if k.startswith(prefix + "transformer.")]
    depth = len({k.split(".")[1] for k in blocks})
    for name, (w, d, _) in models.SIZES.items():
        if (w, d) == (width, depth):
            return name
    raise ValueError(f"no tokenizer size has width {width} and depth {depth} ({prefix})")

def released_tokenizer_args(sd, path):
    """The construction arguments of a released tokenizer (our names), read off its tensors."""
    patch = sd["encoder.patch_embed.weight"].shape[-1]
    kw = dict(img_size=math.isqrt(sd["encoder.positional_embedding"].shape[1]) * patch,
              patch_size=patch,
              dim=sd["encoder.latent_head.weight"].shape[0] // 2,
              enc_size=size_of(sd, "encoder."),
              dec_size=size_of(sd, "decoder."),
              teacher_dim=0)
    if "sem_decoder.out.weight" in sd:
        kw.update(sem_type="transformer", sem_size=size_of(sd, "sem_decoder."),
                  teacher_dim=sd["sem_decoder.out.weight"].shape[0])
    elif "sem_decoder.mlp.2.weight" in sd:
        kw.update(sem_type="mlp", teacher_dim=sd["sem_decoder.mlp.2.weight"].shape[0])
    teachers = sorted({k.split(".")[1] for k in sd if k.startswith("sem_decoders.")})
    if teachers:  # several (their transformer decoders)
        kw.update(sem_type="transformer", sem_size=size_of(sd, f"sem_decoders.{teachers[0]}."),
                  teachers={t: sd[f"sem_decoders.{t}.out.weight"].shape[0] for t in teachers})
    return kw

def released_dit_args(sd, path):
    """The construction arguments of a released DiT^DH, read off its tensors."""
    width = sd["s_embedder.proj.weight"].shape[0]
    head_width = sd["x_embedder.proj.weight"].shape[0]
    widths = [v.shape[0] for k, v in sd.items()
              if k.startswith("blocks.") and k.endswith(".norm1.weight")]
    shape = (width, widths.count(width), head_width, len(widths) - widths.count(width))
    sizes = models.DIT_SIZES.items()
    size = next((n for n, c in sizes if (c[0], c[1], c[3], c[4]) == shape), None)
    if size is None:
        raise SystemExit(f"{path}: a DiT^DH of no known size "
                         f"(width/depth/head width/head depth {shape})")
    return dict(size=size, dim=sd["x_embedder.proj.weight"].shape[1],
                grid=math.isqrt(sd["pos_embed"].shape[1]),
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)

def read_weights(path, ema, kind, marker, to_ours, released_args):
    """The checkpoint at `path` (a file or an hf:// name) in our layout: ours as saved, the authors'
    with our key names and model_args read off its tensors. `marker`: a key that `kind` has in the
    state dict to be loaded (`model_ema` if ema and there is one, else `model`)."""
    ckpt = models.read_checkpoint(released_file(path))
    key = "model_ema" if ema and "model_ema" in ckpt else "model"
    if marker not in to_ours(ckpt.get(key, {})):
        raise SystemExit(f"{path}: not {kind} (no {key}.{marker})")
    if "model_args" in ckpt:
        return ckpt
    if "args" in ckpt:
        raise SystemExit(f"{path}: saved by an older version of this code (no model_args); "
                         "train it again")
    ours = {k: to_ours(ckpt[k]) for k in ("model", "model_ema") if k in ckpt}
    return dict(ckpt, **ours, model_args=released_args(ours[key], path))

def load_tokenizer(path, ema=True, **overrides):
    """A models.Tokenizer from our checkpoint or the authors' RecTok.pth / RecTok_decft.pth, in
    train mode; `overrides` (e.g. gamma=0) win over its construction arguments."""
    ckpt = read_weights(path, ema, "a tokenizer checkpoint", "encoder.latent_head.weight",
                        release_tokenizer_to_ours, released_tokenizer_args)
    key = "model_ema" if ema and "model_ema" in ckpt else "model"
    if not any(k.startswith(("sem_decoder.", "sem_decoders.")) for k in ckpt[key]):
        overrides = dict(teacher_dim=0, teachers=None, **overrides)  # saved without (stage 2)
    model, key = models.load_model(models.Tokenizer, ckpt, path, ema, **overrides)
    kw = ckpt["model_args"]
    log.info(f"loaded tokenizer {path} ({key}): dim {model.dim}, "
             f"{kw['enc_size']}/{kw['dec_size']}, {model.grid * model.decoder.patch_size}px")
    return model

def load_dit(path, ema=True):
    """A models.DiTDH from our checkpoint or the authors' ditdh*_epoch_*.pth. Returns (model in
    eval mode, the checkpoint's other entries, e.g. latent_stats and args)."""
    ckpt = read_weights(path, ema, "a DiT^DH checkpoint", "s_embedder.proj.weight",
                        release_dit_to_ours, released_dit_args)
    model, key = models.load_model(models.DiTDH, ckpt, path, ema)
    log.info(f"loaded DiT^DH-{model.size} {path} ({key}): dim {model.dim}, "
             f"{model.num_classes} classes")
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "model_ema", "opt")}
