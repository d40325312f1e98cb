"""The paper's networks: the RecTok tokenizer (ViT encoder, pixel decoder, semantic decoder) with
its forward flow, DiT^DH with its flow loss and Euler sampler, and loading our own checkpoints (the
networks made by others, the teachers and the loss networks among them, are in pretrained.py).
Names follow the paper: x (image in [-1, 1]), z (latent), t (flow time), eps (noise),
z_t = (1 - t) z + t eps (Eq. 1).
Parameter names follow the authors' release, so their files load with strict keys (pretrained.py
reads them)."""
import logging
import math

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

# ---- Flow time (paper Eq. 1, 2, 6). The two halves of the method run it in opposite directions,
# as the release does:
#   the tokenizer (FSD, Eq. 1):  z_t = (1 - t) z + t eps,  t = 0 the clean latent, t = 1 noise;
#   DiT^DH (the release's transport/, flow_loss and euler_sample below):  x_t = t x + (1 - t) eps,
#   t = 0 noise, t = 1 data, velocity x - eps.

def time_shift(u, s):
    """u in [0, 1] -> s u / (1 + (s - 1) u), the released code's shift for both halves, with
    s = sqrt(N_tokens * dim / 4096) (the paper prints 1/s): s > 1 pushes the time towards noise in
    both (the tokenizer's t = time_shift(u), DiT^DH's t = 1 - time_shift(u))."""
    return s * u / (1 + (s - 1) * u)

def tokenizer_flow(z, t, eps):
    """FSD's forward flow (Eq. 1): t = 0 is z, t = 1 is the noise eps."""
    return (1 - t) * z + t * eps

def dit_flow(x, t, eps):
    """DiT^DH's path (the release's transport/): t = 0 is the noise eps, t = 1 is the data x."""
    return t * x + (1 - t) * eps

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
                 mask_ratio_min=-0.1, gamma=1.0, noise_schedule="shift", sem_noisy=True, kl=True,
                 teachers=None):
        model_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        # every construction argument, saved with the weights (load_model)
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
        # one teacher (teacher_dim: its feature channels), or several at once (teachers: name ->
        # channels; paper Tab. 6): one semantic decoder each, named as the release's sem_decoders
        self.sem_decoder = None
        self.sem_decoders = None
        if teachers:
            self.sem_decoders = nn.ModuleDict({name: self.semantic_decoder(sem_type, sem_size, c)
                                               for name, c in teachers.items()})
        elif teacher_dim:
            self.sem_decoder = self.semantic_decoder(sem_type, sem_size, teacher_dim)
        sem_params = sum(n_params(m) for m in (self.sem_decoder, self.sem_decoders) if m)
        log.info(f"tokenizer: encoder+pixel decoder "
                 f"{n_params(self.encoder) + n_params(self.decoder):,} params, "
                 f"semantic decoder(s) {sem_params:,} params, dim {dim}")

    def semantic_decoder(self, sem_type, sem_size, teacher_dim):
        if sem_type == "transformer":
            return SemanticDecoder(sem_size, self.grid, self.dim, teacher_dim)
        return MLPSemanticDecoder(self.dim, teacher_dim)

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
        """Flow time per sample (paper Eq. 6): shift (default), uniform or lognorm; t = 1 is noise
        (tokenizer_flow)."""
        if self.noise_schedule == "lognorm":
            return torch.sigmoid(torch.randn(B, 1, 1, device=device))
        u = torch.rand(B, 1, 1, device=device)
        if self.noise_schedule == "uniform":
            return u
        return time_shift(u, self.shift)

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
            z_t = tokenizer_flow(z, t, self.gamma * torch.randn_like(z))
        x_hat = self.decoder(z_t, ids_keep)
        if self.kl:
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2)).mean()
        else:
            kl = mean.new_zeros(())
        # --no_fsd aligns the clean latent instead (Tab. 4)
        z_sem = z_t if self.sem_noisy else z
        pred = None
        if self.sem_decoder is not None:
            pred = self.sem_decoder(z_sem, ids_keep)
        elif self.sem_decoders is not None:  # several teachers: a prediction each, by name
            pred = {name: dec(z_sem, ids_keep) for name, dec in self.sem_decoders.items()}
        return x_hat, kl, pred, ids_keep

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
        # every construction argument, saved with the weights (load_model)
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
    """Rectified-flow velocity MSE (paper Eq. 2) on dit_flow's path (t = 1 is data), target x - eps,
    with the released shifted t = 1 - time_shift(u, s), s = sqrt(H W dim / 4096) (only when s > 1,
    as released)."""
    s = math.sqrt(x[0].numel() / 4096)
    u = torch.rand(len(x), device=x.device)
    t = 1 - time_shift(u, s) if s > 1 else u
    eps = torch.randn_like(x)
    return F.mse_loss(dit(dit_flow(x, t.view(-1, 1, 1, 1), eps), t, y), x - eps)

# ---- Sampling DiT^DH (paper Sec. 4.1; the release's transport/transport.py)

def time_grid(steps, latent_shape):
    """The released grid: `steps` POINTS of linspace(0, 1), shifted by time_shift with
    s = sqrt(H W dim / 4096), flipped to 1 - reversed(grid) so the small steps fall near noise
    (t = 0); like the release, only when s > 1."""
    s = math.sqrt(math.prod(latent_shape) / 4096)
    g = time_shift(torch.linspace(0, 1, steps), s)
    return (1 - g).flip(0) if s > 1 else g

@torch.no_grad()
def euler_sample(dit, noise, labels, steps, cfg=1.0, guide=None):
    """Integrate dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1) in steps - 1 Euler updates.
    cfg > 1 (all channels, all t): CFG v_null + cfg (v_cond - v_null), or with `guide` (a weak
    DiT^DH) AutoGuidance v_bad + cfg (v_good - v_bad)."""
    x = noise
    ts = time_grid(steps, noise.shape[1:]).to(noise.device)
    null = torch.full_like(labels, dit.num_classes)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        t = t0.expand(len(x))
        if cfg > 1 and guide is not None:
            v_good = dit(x, t, labels)
            v_bad = guide(x, t, labels)
            v = v_bad + cfg * (v_good - v_bad)
        elif cfg > 1:  # conditional and null label in one forward of a doubled batch
            v_cond, v_null = dit(torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([labels, null])).chunk(2)
            v = v_null + cfg * (v_cond - v_null)
        else:
            v = dit(x, t, labels)
        x = x + (t1 - t0) * v
    return x

@torch.no_grad()
def generate(dit, tokenizer, stats, idx, steps, cfg=1.0, guide=None, seed=0, classes=None):
    """Decoded images in [-1, 1] for global image indices idx: image i has noise seeded by (seed, i)
    and label i % num_classes (or classes[i % len(classes)]), so any split of the indices over ranks
    gives the same images. stats: the latent statistics DiT^DH was trained with (mean, std)."""
    device = stats["mean"].device
    noise = []
    for i in idx:  # image i's own generator: the same noise on any rank
        generator = torch.Generator().manual_seed((seed << 32) + i)
        noise.append(torch.randn(dit.dim, dit.grid, dit.grid, generator=generator))
    noise = torch.stack(noise).to(device)
    classes = classes or range(dit.num_classes)
    labels = torch.tensor([classes[i % len(classes)] for i in idx], device=device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        z = euler_sample(dit, noise, labels, steps, cfg, guide)
        # back to the tokenizer's scale
        z = z.float() * stats["std"][:, None, None] + stats["mean"][:, None, None]
        return tokenizer.decode(z).float()

# ---- Our checkpoints: the weights and the model's construction arguments (model_args, nanoGPT's
# idea), so a new hyper-parameter is added in the constructor alone

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

def read_checkpoint(path, mmap=False):
    """torch.load of a local file onto the CPU, weights only; a missing or broken file is one line
    (pretrained.read_weights also takes hf:// names and the authors' files)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path}")
    except Exception as e:
        raise SystemExit(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}): "
                         "delete it to start its stage again, or point at the previous milestone "
                         "(an earlier copy of it)")

def load_model(cls, ckpt, path, ema=True, **overrides):
    """A Tokenizer or DiTDH rebuilt from a checkpoint in our layout: cls(**model_args), `overrides`
    winning, then the weights of `model_ema` (ema, where it has one) or `model`. Returns (model, the
    key it was loaded from)."""
    key = "model_ema" if ema and "model_ema" in ckpt else "model"
    model = cls(**dict(ckpt["model_args"], **overrides))
    load_state(model, ckpt[key], path)
    return model, key
