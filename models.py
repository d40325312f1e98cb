"""RecTok models: the tokenizer (ViT encoder, pixel decoder, semantic decoder), its frozen teachers,
and DiT^DH.
Names follow the paper: x (image in [-1, 1]), z (latent), t (flow time), eps (noise),
z_t = (1 - t) z + t eps (Eq. 1).
Parameter names follow the authors' release, so RecTok.pth / RecTok_decft.pth / ditdh*.pth load with
strict keys."""
import functools
import logging
import math
import os
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

log = logging.getLogger("rectok")

# width, depth, heads of the tokenizer's transformers
# (paper Sec. 4.1; the release's models/rectok.py)
SIZES = {"demo": (128, 2, 4), "tiny": (192, 3, 4), "small": (512, 8, 8), "base": (768, 12, 12),
         "large": (1024, 24, 16)}

def n_params(module):
    return sum(p.numel() for p in module.parameters())

# ---- Transformer parts shared by the tokenizer and DiT^DH

def compile_blocks(blocks, dynamic=None):
    """torch.compile blocks one by one, in place: blocks of one shape share a graph (fast start-up,
    same state-dict keys); their variants (width x grad mode x length ...) would pass dynamo's
    default limit of 8 and fall to eager."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(dynamic=dynamic)

def apply_rope(x, rope):
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, heads, N, D); rope is (B or 1, N, 2D) =
    [cos | sin]. Each channel has its own angle: a true rotation only where a pair shares one
    (DiT^DH, not the tokenizer's quirk)."""
    cos, sin = rope.unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin

def tokenizer_rope(head_dim, grid):
    """The tokenizer's 2-D RoPE table (grid*grid, 2*head_dim), as the released weights need
    (models/rectok.py, get_rope_tensor): frequencies 7 to 7e-4, CONCATENATED (not interleaved) over
    the row half, again over the column half; coords in [0, 1]."""
    assert head_dim % 4 == 0, f"head dim {head_dim} must be a multiple of 4 for 2-D RoPE"
    f = 7.0 * (7.0 / 7e-4) ** torch.linspace(0, -1, head_dim // 4)
    f = 2 * math.pi * torch.cat([f, f])                                 # (D/2,)
    coord = torch.linspace(0, 1, grid)
    # row-major token order
    rows = coord.repeat_interleave(grid)
    cols = coord.repeat(grid)
    angle = torch.cat([rows[:, None] * f, cols[:, None] * f], dim=1)    # (N, D)
    return torch.cat([angle.cos(), angle.sin()], dim=1)

class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)  # w12: both input projections
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)

class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # the fp32 RoPE table would promote q, k out of bf16; cast back so SDPA takes the flash path
        q = apply_rope(q, rope).type_as(v)
        k = apply_rope(k, rope).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

def run_block(block, grad_ckpt, *inputs):
    """block(*inputs); with grad_ckpt (and gradients on) its activations are not kept but recomputed
    in the backward pass (activation checkpointing, the release's --grad_checkpointing): less
    memory, ~1/3 more compute."""
    if grad_ckpt and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)

class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.mlp = SwiGLU(width, int(2 / 3 * 4 * width))

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))

# ---- Tokenizer (paper Sec. 3.2, Fig. 3)

class ViT(nn.Module):
    """Trunk shared by the encoder and both decoders: + learned position embedding, RMSNorm, blocks,
    RMSNorm."""
    def __init__(self, size, grid):
        super().__init__()
        width, depth, heads = SIZES[size]
        self.width = width
        # --grad_ckpt: recompute each block's activations in the backward pass
        self.grad_ckpt = False
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, grid * grid, width))
        self.ln_pre = nn.RMSNorm(width, eps=1e-6)
        self.transformer = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_post = nn.RMSNorm(width, eps=1e-6)
        self.register_buffer("rope_tensor", tokenizer_rope(width // heads, grid)[None],
                             persistent=False)

    def trunk(self, h, rope):
        h = self.ln_pre(h)
        for block in self.transformer:
            h = run_block(block, self.grad_ckpt, h, rope)
        return self.ln_post(h)

    def unmask(self, h, ids_keep, mask_token):
        """Kept tokens back at their grid positions, a learned mask token elsewhere (RAD), +
        position. Scattering onto the mask token keeps it in the graph when nothing is masked, so
        DDP needs no find_unused_parameters."""
        if ids_keep is not None:
            full = mask_token.to(h.dtype).expand(h.shape[0], self.positional_embedding.shape[1], -1)
            h = full.scatter(1, ids_keep[..., None].expand(-1, -1, h.shape[-1]), h)
        return h + self.positional_embedding

class Encoder(ViT):
    """Patchify, + position, keep the RAD subset, trunk -> (mean, logvar) per token, or z (plain-AE
    ablation)."""
    def __init__(self, size, grid, patch_size, out):
        super().__init__(size, grid)
        self.patch_embed = nn.Conv2d(3, self.width, patch_size, stride=patch_size)
        self.latent_head = nn.Linear(self.width, out)

    def forward(self, x, ids_keep=None):
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.positional_embedding
        rope = self.rope_tensor
        if ids_keep is not None:
            # the encoder sees only the kept tokens, each with its own RoPE row
            h = h.gather(1, ids_keep[..., None].expand(-1, -1, h.shape[-1]))
            rope = rope.expand(len(x), -1, -1)
            rope = rope.gather(1, ids_keep[..., None].expand(-1, -1, rope.shape[-1]))
        return self.latent_head(self.trunk(h, rope))

class PixelDecoder(ViT):
    """Latent tokens -> width, mask tokens at dropped positions, trunk, 1x1 conv to 16x16x3 per
    token, depth-to-space (channel order p1, p2, c), 3x3 conv. Output in [-1, 1] scale,
    unclamped."""
    def __init__(self, size, grid, patch_size, dim):
        super().__init__(size, grid)
        self.patch_size = patch_size
        self.decoder_embed = nn.Linear(dim, self.width)
        self.mask_token = nn.Parameter(self.width ** -0.5 * torch.randn(1, 1, self.width))
        self.to_pixels = nn.Conv2d(self.width, patch_size * patch_size * 3, 1)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, ids_keep=None):
        h = self.trunk(self.unmask(self.decoder_embed(z), ids_keep, self.mask_token),
                       self.rope_tensor)
        B = len(h)
        g = math.isqrt(h.shape[1])
        p = self.patch_size
        h = self.to_pixels(h.transpose(1, 2).unflatten(2, (g, g)))  # (B, p*p*3, g, g)
        return self.conv_out(h.view(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2)
                             .reshape(B, 3, g * p, g * p))

class SemanticDecoder(ViT):
    """Predicts the teacher's patch features at every position (masked and visible) from z_t
    (FSD)."""
    def __init__(self, size, grid, dim, teacher_dim):
        super().__init__(size, grid)
        self.token_embedding = nn.Linear(dim, self.width)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, self.width))
        self.out = nn.Linear(self.width, teacher_dim)

    def forward(self, z, ids_keep=None):
        return self.out(self.trunk(self.unmask(self.token_embedding(z), ids_keep,
                                               self.mask_embedding),
                                   self.rope_tensor))

class MLPSemanticDecoder(nn.Module):
    """Ablation (Tab. 7): a per-token MLP, blind to masked positions: its semantic loss covers kept
    tokens only."""
    def __init__(self, dim, teacher_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Linear(4 * dim, teacher_dim))

    def forward(self, z, ids_keep=None):
        return self.mlp(z)

def check_pixel_range(x):
    """Images enter the tokenizer in [-1, 1] (data.to_tensor: uint8 / 127.5 - 1). A batch beyond
    [-1.5, 1.5] looks like [0, 255]; one with no pixel below mid-grey but some brighter than 3/4
    looks like [0, 1] (x * 2 - 1)."""
    lo, hi = torch.stack([x.detach().amin(), x.detach().amax()]).float().tolist()
    if hi > 1.5 or lo < -1.5:
        raise ValueError(f"Tokenizer.encode: x spans [{lo:.3g}, {hi:.3g}], like [0, 255] images; "
                         "it takes [-1, 1] (x / 127.5 - 1)")
    if lo >= 0 and hi > 0.5:
        raise ValueError(f"Tokenizer.encode: x spans [{lo:.3g}, {hi:.3g}], like [0, 1] images; "
                         "it takes [-1, 1] (x * 2 - 1); if these are [-1, 1] images, "
                         "pass check_range=False")

class Tokenizer(nn.Module):
    def __init__(self, img_size=256, patch_size=16, dim=128, enc_size="base", dec_size="base",
                 sem_size="tiny", sem_type="transformer", teacher_dim=1024, mask_ratio=0.4,
                 mask_ratio_min=-0.1, gamma=1.0, noise_schedule="shift", sem_noisy=True, kl=True):
        model_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # every construction argument, saved with the weights (load_tokenizer)
        self.model_args = model_args
        self.grid = img_size // patch_size
        self.dim = dim
        self.mask_ratio = mask_ratio
        self.mask_ratio_min = mask_ratio_min
        self.gamma = gamma
        self.noise_schedule = noise_schedule
        self.sem_noisy = sem_noisy
        self.kl = kl
        # t-shift of the `shift` schedule: s = sqrt(N_tokens * dim / 4096)
        # (released code; the paper prints 1/s)
        self.shift = math.sqrt(self.grid ** 2 * dim / 4096)
        self.encoder = Encoder(enc_size, self.grid, patch_size, 2 * dim if kl else dim)
        self.decoder = PixelDecoder(dec_size, self.grid, patch_size, dim)
        # authors' init for encoder and pixel decoder; the semantic decoder keeps PyTorch's
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if not teacher_dim:
            self.sem_decoder = None
        elif sem_type == "transformer":
            self.sem_decoder = SemanticDecoder(sem_size, self.grid, dim, teacher_dim)
        else:
            self.sem_decoder = MLPSemanticDecoder(dim, teacher_dim)
        log.info(f"tokenizer: encoder+pixel decoder "
                 f"{n_params(self.encoder) + n_params(self.decoder):,} params, "
                 f"semantic decoder "
                 f"{n_params(self.sem_decoder) if self.sem_decoder else 0:,} params, "
                 f"dim {dim}")

    def random_keep(self, B, device):
        """RAD masking: one ratio per batch, max(0, U(mask_ratio_min, mask_ratio)); keep
        ceil(N (1 - ratio)) random tokens per sample (argsort of uniform noise). Returns ids_keep
        (B, N_keep) or None."""
        if self.mask_ratio <= 0:
            return None
        ratio = max(0.0, torch.empty(()).uniform_(self.mask_ratio_min, self.mask_ratio).item())
        N = self.grid ** 2
        return torch.rand(B, N, device=device).argsort(dim=1)[:, :math.ceil(N * (1 - ratio))]

    def sample_t(self, B, device):
        """Flow time per sample (paper Eq. 6): shift (default), uniform or lognorm.
        Convention: in the tokenizer, as in the paper's Eq. 1, t = 0 is the clean latent and t = 1
        is noise (z_t = (1 - t) z + t eps). DiT^DH (flow_loss, sample.py) runs the other way, as the
        release does."""
        if self.noise_schedule == "lognorm":
            return torch.sigmoid(torch.randn(B, 1, 1, device=device))
        u = torch.rand(B, 1, 1, device=device)
        if self.noise_schedule == "uniform":
            return u
        return self.shift * u / (1 + (self.shift - 1) * u)

    def posterior(self, x, ids_keep=None):
        """(mean, logvar) tokens (B, N, dim) in fp32, logvar clamped to [-30, 20]. Without the KL
        (--no_kl, the paper's plain-AE ablation) the encoder outputs z itself: a posterior of zero
        variance (logvar -inf)."""
        h = self.encoder(x, ids_keep).float()
        if not self.kl:
            return h, torch.full_like(h, -math.inf)
        mean, logvar = h.chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample=False, check_range=True):
        """x (B, 3, H, W) in [-1, 1] -> z (B, dim, H/16, W/16): posterior mean, or a sample. Never
        masks or noises.
        check_range: ValueError on a batch that looks like [0, 255] or [0, 1] images (one host sync;
        the DiT^DH training loop, which feeds its own loader's [-1, 1] images every step, turns it
        off)."""
        if check_range:
            check_pixel_range(x)
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return z.transpose(1, 2).unflatten(2, (self.grid, self.grid))

    def decode(self, z):
        """z (B, dim, h, w) -> x_hat (B, 3, H, W), the raw pixel-decoder output in [-1, 1] scale,
        unclamped."""
        return self.decoder(z.flatten(2).transpose(1, 2))

    def forward(self, x):
        """Training (Sec. 3): mask (RAD) -> encode -> sample z -> z_t on the forward flow (FSD) ->
        both decoders. Returns x_hat, the KL (summed over tokens and channels, batch mean),
        teacher-feature prediction, ids_keep."""
        ids_keep = self.random_keep(len(x), x.device)
        mean, logvar = self.posterior(x, ids_keep)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        z_t = z
        if self.gamma > 0:
            t = self.sample_t(len(x), x.device)
            z_t = (1 - t) * z + t * self.gamma * torch.randn_like(z)
        x_hat = self.decoder(z_t, ids_keep)
        if self.kl:
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2)).mean()
        else:
            kl = mean.new_zeros(())
        # --no_fsd aligns the clean latent instead (Tab. 4)
        if self.sem_decoder is not None:
            pred = self.sem_decoder(z_t if self.sem_noisy else z, ids_keep)
        else:
            pred = None
        return x_hat, kl, pred, ids_keep

# names in the authors' release that differ from ours; their checkpoints may also carry the teacher
_RELEASE_RENAMES = {"encoder.patch_embed.0.": "encoder.patch_embed.",
                    "decoder.ffn.1.": "decoder.to_pixels."}

def _release_to_ours(sd):  # also sem_decoders.<teacher>.* -> sem_decoder.*
    out = {}
    for k, v in sd.items():
        if not k.startswith("sem_foundation_models."):
            for old, new in _RELEASE_RENAMES.items():
                k = k.replace(old, new)
            out["sem_decoder." + k.split(".", 2)[2] if k.startswith("sem_decoders.") else k] = v
    return out

def _size_of(sd, prefix):
    width = sd[prefix + "positional_embedding"].shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith(prefix + "transformer.")})
    for name, (w, d, _) in SIZES.items():
        if (w, d) == (width, depth):
            return name
    raise ValueError(f"no tokenizer size has width {width} and depth {depth} ({prefix})")

def load_state(model, sd, path):
    """load_state_dict(strict) with a one-line error naming the offending keys and the file."""
    # shaped by the model's parameters, loaded (and checked) before it
    if isinstance(model, torch.optim.Optimizer):
        return model.load_state_dict(sd)
    if not isinstance(sd, dict):
        raise SystemExit(f"{path}: not a state dict")
    ours = model.state_dict()
    missing = sorted(ours.keys() - sd.keys())
    unexpected = sorted(sd.keys() - ours.keys())
    shape = sorted(k for k in ours.keys() & sd.keys() if ours[k].shape != sd[k].shape)
    if missing or unexpected or shape:
        raise SystemExit(f"{path}: does not match the model: "
                         f"missing keys {' '.join(missing[:5]) or '-'}; "
                         f"unexpected keys {' '.join(unexpected[:5]) or '-'}; "
                         f"wrong shapes {' '.join(shape[:5]) or '-'}")
    model.load_state_dict(sd)

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

def read_checkpoint(path, mmap=False):
    path = released_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path}")
    except Exception as e:
        raise SystemExit(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}): "
                         "delete it to start its stage again, or point at the previous milestone "
                         "(an earlier copy of it)")

# what a file given to a flag holds, told by a key that only that kind has
# (in the checkpoint's model state dict)
KINDS = {"a tokenizer checkpoint": "encoder.latent_head.weight",
         "a DiT^DH checkpoint": "s_embedder.proj.weight",
         "DINOv2/v3 weights": "cls_token",
         "FID Inception weights": "Conv2d_1a_3x3.conv.weight",
         "latent statistics": "std"}

def file_kinds(path):
    """What `path` is, as a list of KINDS (a DiT^DH checkpoint also holds latent statistics), or in
    words."""
    path = released_file(path)
    if not os.path.isfile(path):
        return ["a folder" if os.path.isdir(path) else "missing"]
    if path.endswith(".npz"):
        return ["an .npz"]
    try:
        # zip-format files are memory-mapped, so a multi-GB checkpoint is not read twice
        with open(path, "rb") as f:
            ckpt = read_checkpoint(path, mmap=f.read(2) == b"PK")
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

def released_tokenizer_args(sd, path):
    """The construction arguments of a tokenizer in the authors' release layout, read off its
    tensors."""
    patch = sd["encoder.patch_embed.weight"].shape[-1]
    kw = dict(img_size=math.isqrt(sd["encoder.positional_embedding"].shape[1]) * patch,
              patch_size=patch,
              dim=sd["encoder.latent_head.weight"].shape[0] // 2,
              enc_size=_size_of(sd, "encoder."),
              dec_size=_size_of(sd, "decoder."),
              teacher_dim=0)
    if "sem_decoder.out.weight" in sd:
        kw.update(sem_type="transformer", sem_size=_size_of(sd, "sem_decoder."),
                  teacher_dim=sd["sem_decoder.out.weight"].shape[0])
    elif "sem_decoder.mlp.2.weight" in sd:
        kw.update(sem_type="mlp", teacher_dim=sd["sem_decoder.mlp.2.weight"].shape[0])
    return kw

def construction_args(ckpt, sd, path, released_args):
    """Our checkpoints' model_args, or for the authors' files (which hold no args)
    released_args(sd, path)."""
    if "model_args" in ckpt:
        return dict(ckpt["model_args"])
    if "args" in ckpt:
        raise SystemExit(f"{path}: saved by an older version of this code (no model_args); "
                         "train it again")
    return released_args(sd, path)

def load_tokenizer(path, ema=True, **overrides):
    """A Tokenizer from our checkpoints (rebuilt from their model_args) or the authors' release
    (`model` / `model_ema`, sized from the tensors); `overrides` (e.g. gamma=0) win."""
    ckpt = read_checkpoint(path)
    key = "model_ema" if ema and "model_ema" in ckpt else "model"
    if "encoder.latent_head.weight" not in ckpt.get(key, {}):
        raise SystemExit(f"{path}: not a tokenizer checkpoint "
                         f"(no {key}.encoder.latent_head.weight)")
    sd = _release_to_ours(ckpt[key])
    kw = construction_args(ckpt, sd, path, released_tokenizer_args)
    # saved without its semantic decoder (stage 2)
    if not any(k.startswith("sem_decoder.") for k in sd):
        kw["teacher_dim"] = 0
    kw.update(overrides)
    model = Tokenizer(**kw)
    load_state(model, sd, path)
    log.info(f"loaded tokenizer {path} ({key}): dim {kw['dim']}, "
             f"{kw['enc_size']}/{kw['dec_size']}, {kw['img_size']}px")
    return model

# ---- Frozen teachers (paper Sec. 3.2, E_VFM of Eq. 5): Meta's DINOv2 ViT-L/14 and DINOv3 ViT-L/16,
# with Meta's key names (strict loading)

# width, depth, heads; tiny = tests only
TEACHER_SIZES = {"tiny": (64, 2, 2), "large": (1024, 24, 16)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    dropped."""
    def __init__(self, name, size="large", grid=16, release_input=True, rope_rescale=1.0):
        super().__init__()
        width, depth, heads = TEACHER_SIZES[size]
        self.v3 = name == "dinov3_vitl16"
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

def load_teacher(name, path=None, size="large", grid=16, release_input=True, rope_rescale=1.0):
    """Frozen teacher on the tokenizer's `grid`: Meta's release .pth (strict keys), or random
    weights for path=None."""
    model = DinoTeacher(name, size, grid, release_input, rope_rescale)
    if path is None:
        log.warning(f"!!! teacher {name} ({size}) has RANDOM weights: its features are meaningless "
                    "(tests/demos only) !!!")
    else:
        load_state(model, read_checkpoint(path), path)
    return model.requires_grad_(False).eval()

def download_error(what, e):
    return SystemExit(f"could not load pretrained {what} ({str(e).splitlines()[0]}); "
                      "offline, place the file in "
                      f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}, "
                      "or run --demo (random weights)")

DINOV3_GATED = ("--teacher_ckpt: DINOv3 weights are gated; "
                "request dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth at "
                "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ "
                "and pass its path")
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"

def teacher_file(name, path):
    """Meta's release file: --teacher_ckpt, else DINOv2 downloaded once into the torch hub cache."""
    if path:
        return path
    if name == "dinov3_vitl16":
        raise SystemExit(DINOV3_GATED)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(DINOV2_URL))
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(DINOV2_URL, path)
        except Exception as e:
            raise download_error(f"DINOv2 ({DINOV2_URL})", e)
    return path

# ---- Networks of the tokenizer's losses (paper Eq. 4; the release's utils/losses.py):
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

# ---- DiT^DH (paper Sec. 4.1, after RAE): a LightningDiT encoder plus a wide, shallow head,
# named as in the release's ditdh*_epoch_*.pth

# name: (width, depth, heads, head width, head depth, head heads); "tiny" is for tests,
# "demo" for the CPU demo
DIT_SIZES = {"tiny": (32, 2, 2, 48, 2, 2), "demo": (96, 3, 4, 128, 2, 4),
             "S": (384, 12, 6, 2048, 2, 16), "B": (768, 12, 12, 2048, 2, 16),
             "L": (1024, 24, 16, 2048, 2, 16), "XL": (1152, 28, 16, 2048, 2, 16)}

def sincos_pos_embed(width, grid):
    """Fixed 2-D sin-cos embedding (grid*grid, width): first half encodes the column, second the
    row."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    # row-major tokens
    col = pos.repeat(grid)[:, None] * omega
    row = pos.repeat_interleave(grid)[:, None] * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], 1).float()

def dit_rope(head_dim, grid):
    """DiT^DH's EVA-style 2-D RoPE table (1, grid*grid, 2*head_dim) = [cos | sin] (the release's
    models/lightningdit.py): row half, then column half; each frequency 1/10000^(2j/(D/2)) is shared
    by an adjacent channel pair (a true rotation); integer positions."""
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    ang = (torch.arange(grid).float()[:, None] * freqs).repeat_interleave(2, -1)  # (grid, half)
    ang = torch.cat([ang[:, None].expand(grid, grid, half),
                     ang[None, :].expand(grid, grid, half)], -1)
    return torch.cat([ang.cos(), ang.sin()], -1).reshape(1, grid * grid, 2 * head_dim)

class RMSNorm(nn.Module):
    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):  # normalise in float32 even under bf16 autocast, as the authors do
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
                * self.weight)

class LightningBlock(nn.Module):
    """adaLN-Zero block (RMSNorm, RoPE attention, SwiGLU); c: (B, 1, width) in the encoder, per
    token in the head."""
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.norm2 = RMSNorm(width)
        self.attn = Attention(width, heads)
        # equals the authors' int(2/3 * int(4.0 * w)) for all sizes
        self.mlp = SwiGLU(width, int(2 / 3 * 4 * width))
        # c already went through a SiLU; the second one here is the released code's
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)

class FinalLayer(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)

# Gaussian Fourier features of t (256 fixed frequencies W ~ N(0, 1)) -> MLP
class FourierTimeEmbed(nn.Module):
    def __init__(self, width, n_freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_freqs), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        angle = t[:, None] * self.W[None] * 2 * math.pi
        return self.mlp(torch.cat([angle.sin(), angle.cos()], -1))

class DiTDH(nn.Module):
    """x (B, dim, grid, grid), t, y -> v, as released: t=0 noise, t=1 data, v = data - noise;
    y = num_classes: null."""
    def __init__(self, size="XL", dim=128, grid=16, num_classes=1000, label_drop=0.1):
        model_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # every construction argument, saved with the weights (load_dit)
        self.model_args = model_args
        width, self.depth, heads, head_width, head_depth, head_heads = DIT_SIZES[size]
        self.size = size
        self.dim = dim
        self.grid = grid
        self.num_classes = num_classes
        self.label_drop = label_drop
        # --grad_ckpt: recompute each block's activations in the backward pass
        self.grad_ckpt = False
        self.t_embedder = FourierTimeEmbed(width)
        # last row = null
        self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(num_classes + 1, width)))
        self.s_embedder = nn.ModuleDict(dict(proj=nn.Conv2d(dim, width, 1)))  # patch size 1
        self.x_embedder = nn.ModuleDict(dict(proj=nn.Conv2d(dim, head_width, 1)))
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, grid)[None], requires_grad=False)
        self.s_projector = nn.Linear(width, head_width)
        self.blocks = nn.ModuleList([LightningBlock(width, heads) for _ in range(self.depth)]
                                    + [LightningBlock(head_width, head_heads)
                                       for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, dim)
        # recomputed, not stored: the authors' "model" dicts hold them as *_feat_rope.freqs_*,
        # we drop those
        self.register_buffer("enc_rope", dit_rope(width // heads, grid), persistent=False)
        self.register_buffer("dec_rope", dit_rope(head_width // head_heads, grid),
                             persistent=False)
        self.initialize_weights()

    def initialize_weights(self):  # the authors' init; everything else keeps PyTorch's default
        for emb in (self.s_embedder.proj, self.x_embedder.proj):
            nn.init.xavier_uniform_(emb.weight.view(emb.weight.shape[0], -1))
            nn.init.zeros_(emb.bias)
        for w in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight,
                  self.t_embedder.mlp[2].weight):
            nn.init.normal_(w, std=0.02)
        for layer in ([b.adaLN_modulation[-1] for b in (*self.blocks, self.final_layer)]
                      + [self.final_layer.linear]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        B, _, H, W = x.shape
        if self.training:
            # label dropout: replace by the null class for classifier-free guidance
            y = torch.where(torch.rand(B, device=y.device) < self.label_drop, self.num_classes, y)
        t_emb = self.t_embedder(t)
        # one condition for all tokens
        c = F.silu(t_emb + self.y_embedder.embedding_table(y))[:, None]
        s = self.s_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks[: self.depth]:
            s = run_block(block, self.grad_ckpt, s, c, self.enc_rope)
        s = self.s_projector(F.silu(t_emb[:, None] + s))  # per-token condition of the head
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2)  # the head sees the same noisy x
        for block in self.blocks[self.depth:]:
            h = run_block(block, self.grad_ckpt, h, s, self.dec_rope)
        return self.final_layer(h, s).transpose(1, 2).reshape(B, -1, H, W)

def flow_loss(dit, x, y):
    """Rectified-flow velocity MSE (paper Eq. 2), x_t = t x + (1 - t) eps, target x - eps, with the
    released shifted t = 1 - s u / (1 + (s - 1) u), s = sqrt(H W dim / 4096) (applied only when
    s > 1, as released).
    Convention: here t = 1 is data and t = 0 is noise, the reverse of the tokenizer's z_t
    (Tokenizer.sample_t) and of the paper's Eq. 1; the release's transport/ code uses this direction
    for DiT^DH and its sampler."""
    s = math.sqrt(x[0].numel() / 4096)
    u = torch.rand(len(x), device=x.device)
    t = 1 - s * u / (1 + (s - 1) * u) if s > 1 else u
    eps = torch.randn_like(x)
    tb = t.view(-1, 1, 1, 1)
    return F.mse_loss(dit(tb * x + (1 - tb) * eps, t, y), x - eps)

def released_dit_args(sd, path):
    """The construction arguments of a DiT^DH in the authors' release layout, read off its
    tensors."""
    width = sd["s_embedder.proj.weight"].shape[0]
    head_width = sd["x_embedder.proj.weight"].shape[0]
    widths = [v.shape[0] for k, v in sd.items()
              if k.startswith("blocks.") and k.endswith(".norm1.weight")]
    shape = (width, widths.count(width), head_width, len(widths) - widths.count(width))
    size = next((n for n, c in DIT_SIZES.items() if (c[0], c[1], c[3], c[4]) == shape), None)
    if size is None:
        raise SystemExit(f"{path}: a DiT^DH of no known size "
                         f"(width/depth/head width/head depth {shape})")
    return dict(size=size, dim=sd["x_embedder.proj.weight"].shape[1],
                grid=math.isqrt(sd["pos_embed"].shape[1]),
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)

def load_dit(path, ema=True):
    """DiT^DH from our checkpoints (rebuilt from their model_args) or the authors' release
    (`model` / `model_ema`, sized from the tensors). Returns (model in eval mode, the checkpoint's
    other entries, e.g. latent_stats and args)."""
    ckpt = read_checkpoint(path)
    key = "model_ema" if ema and "model_ema" in ckpt else "model"
    if "s_embedder.proj.weight" not in ckpt.get(key, {}):
        raise SystemExit(f"{path}: not a DiT^DH checkpoint (no {key}.s_embedder.proj.weight)")
    # the release stores its RoPE tables
    sd = {k: v for k, v in ckpt[key].items() if "_feat_rope.freqs_" not in k}
    model = DiTDH(**construction_args(ckpt, sd, path, released_dit_args))
    load_state(model, sd, path)
    log.info(f"loaded DiT^DH-{model.size} {path} ({key}): dim {model.dim}, "
             f"{model.num_classes} classes")
    return model.eval(), {k: v for k, v in ckpt.items() if k not in ("model", "model_ema", "opt")}

# ---- FID Inception-v3 (paper Sec. 4.1, rFID / gFID): the 2015-12-05 TF graph, named as in
# pytorch-fid's weights (evaluate.load_inception)

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

# ---- The demo judges: small CNNs trained in seconds on demo images' labels (evaluate.demo_judge),
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
