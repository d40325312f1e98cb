"""Smoke tests on tiny shapes, CPU only, no network: `python -m pytest -q test_smoke.py`."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import models

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def tiny_tokenizer(dim=16, img=64, teacher_dim=32, **kw):
    kw = dict(dict(patch_size=16, enc_size="tiny", dec_size="tiny", sem_size="tiny"), **kw)
    return models.Tokenizer(img_size=img, dim=dim, teacher_dim=teacher_dim, **kw)


def run(script, *args, timeout=300, nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_port=29533"] if nproc else [sys.executable]
    return subprocess.run(launcher + [os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


# ---------------------------------------------------------------------------------------------
# Tokenizer (issue: models.py)

@pytest.mark.parametrize("dim", [16, 32, 64, 128])
def test_tokenizer_shapes(dim):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=dim).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = m.encode(x)
    assert z.shape == (2, dim, 4, 4)
    assert m.decode(z).shape == (2, 3, 64, 64)
    x_hat, kl, pred, ids_keep = m(x)
    assert x_hat.shape == (2, 3, 64, 64) and kl.shape == () and pred.shape == (2, 16, 32)
    assert ids_keep is None or (ids_keep.shape[0] == 2 and ids_keep.shape[1] <= 16)


def test_param_counts_match_the_authors():
    with torch.device("meta"):
        for dim, expected in ((128, 171_970_900), (16, 171_712_628)):
            m = models.Tokenizer(dim=dim, teacher_dim=1024)
            assert models.n_params(m.encoder) + models.n_params(m.decoder) == expected
            if dim == 128:
                assert models.n_params(m.sem_decoder) == 1_606_336


def test_rope_matches_slow_per_channel_loop():
    D, g = 16, 4
    table = models.tokenizer_rope(D, g)
    freqs = [7.0 * (7.0 / 7e-4) ** (-k / (D // 4 - 1)) for k in range(D // 4)]
    per_channel = freqs + freqs  # concatenated, not interleaved (the released quirk)
    x = torch.randn(1, 1, g * g, D)
    out = models.apply_rope(x, table[None])
    slow = torch.empty_like(x)
    for n in range(g * g):
        r, c = divmod(n, g)
        coord = [r / (g - 1)] * (D // 2) + [c / (g - 1)] * (D // 2)
        a = [2 * math.pi * per_channel[ch % (D // 2)] * coord[ch] for ch in range(D)]
        for i in range(D // 2):
            x0, x1 = x[0, 0, n, 2 * i].item(), x[0, 0, n, 2 * i + 1].item()
            slow[0, 0, n, 2 * i] = x0 * math.cos(a[2 * i]) - x1 * math.sin(a[2 * i])
            slow[0, 0, n, 2 * i + 1] = x1 * math.cos(a[2 * i + 1]) + x0 * math.sin(a[2 * i + 1])
    torch.testing.assert_close(out, slow, atol=1e-5, rtol=1e-5)


def test_masking_keeps_ceil_and_decoders_restore_order():
    torch.manual_seed(0)
    m = tiny_tokenizer(mask_ratio=0.4, mask_ratio_min=0.3).train()  # ratio in [0.3, 0.4]
    for _ in range(5):
        ids = m.random_keep(3, "cpu")
        assert 16 - math.floor(16 * 0.4) <= ids.shape[1] <= math.ceil(16 * 0.7)
        assert all(len(set(row.tolist())) == ids.shape[1] for row in ids)
    torch.manual_seed(1)
    m.mask_ratio_min = m.mask_ratio = 0.25
    assert m.random_keep(2, "cpu").shape[1] == math.ceil(16 * 0.75)
    # keeping every token in a shuffled order must give exactly the unmasked result: the decoders restore order
    z = torch.randn(2, 16, 16)
    perm = torch.stack([torch.randperm(16) for _ in range(2)])
    shuffled = z.gather(1, perm[..., None].expand(-1, -1, 16))
    with torch.no_grad():
        torch.testing.assert_close(m.decoder(shuffled, perm), m.decoder(z), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.sem_decoder(shuffled, perm), m.sem_decoder(z), atol=1e-5, rtol=1e-5)
        # a dropped token cannot influence the output; a kept one does
        keep = perm[:, :10]
        kept = z.gather(1, keep[..., None].expand(-1, -1, 16))
        out = m.decoder(kept, keep)
        assert out.shape == (2, 3, 64, 64)
        assert not torch.allclose(out, m.decoder(kept + 1, keep))


def test_encode_deterministic_in_both_modes_and_stochastic_when_sampling():
    torch.manual_seed(0)
    m = tiny_tokenizer(mask_ratio=0.4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for mode in (True, False):
        m.train(mode)
        assert torch.equal(m.encode(x), m.encode(x))
        assert torch.equal(m.decode(m.encode(x)), m.decode(m.encode(x)))
    assert not torch.equal(m.encode(x, sample=True), m.encode(x, sample=True))


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    m = tiny_tokenizer(gamma=0.0, mask_ratio=0.0).train()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    _, kl, _, _ = m(x)
    mean, logvar = m.posterior(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["shift", "uniform", "lognorm"])
def test_noise_schedule_distribution(schedule):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=128, img=256, noise_schedule=schedule)  # s = sqrt(256 * 128 / 4096) = 2.83
    t = m.sample_t(200_000, "cpu")
    assert t.min() >= 0 and t.max() <= 1
    s = math.sqrt(8)
    expected = {"shift": s / (s - 1) * (1 - math.log(s) / (s - 1)), "uniform": 0.5, "lognorm": 0.5}[schedule]
    assert abs(t.mean().item() - expected) < 3e-3
    if schedule == "shift":  # pushed towards noise: median = s / (1 + s)
        assert abs(t.median().item() - s / (1 + s)) < 3e-3


def test_checkpoint_round_trip_and_release_layout(tmp_path):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=32).eval()
    sd = m.state_dict()
    torch.save({"model": sd, "model_ema": sd, "args": {"gamma": 0.5}}, tmp_path / "ours.pt")
    loaded = models.load_tokenizer(str(tmp_path / "ours.pt")).eval()
    assert loaded.gamma == 0.5
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), m.decode(m.encode(x)))
    # the authors' key names (Sequential indices, sem_decoders.<teacher>, teacher weights to skip)
    release = {}
    for k, v in sd.items():
        k = k.replace("encoder.patch_embed.", "encoder.patch_embed.0.").replace("decoder.to_pixels.", "decoder.ffn.1.")
        release[k.replace("sem_decoder.", "sem_decoders.dinov3.")] = v
    release["sem_foundation_models.dinov3.embeddings.cls_token"] = torch.zeros(1)
    torch.save({"model": release, "model_ema": release}, tmp_path / "release.pth")
    theirs = models.load_tokenizer(str(tmp_path / "release.pth")).eval()
    with torch.no_grad():
        assert torch.equal(theirs.decode(theirs.encode(x)), m.decode(m.encode(x)))
    del release["decoder.conv_out.weight"]
    torch.save({"model": release}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="decoder.conv_out.weight"):
        models.load_tokenizer(str(tmp_path / "broken.pth"))


# ---------------------------------------------------------------------------------------------
# Teachers (issue: models.py)

@pytest.mark.parametrize("name", ["dinov2_vitl14", "dinov3_vitl16"])
def test_teacher_shapes_frozen_and_round_trip(name, tmp_path):
    torch.manual_seed(0)
    teacher = models.load_teacher(name, None, "tiny", grid=4)
    x = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    out = teacher(x)
    assert out.shape == (2, 16, teacher.dim) and not out.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(teacher.state_dict(), tmp_path / "t.pth")
    loaded = models.load_teacher(name, str(tmp_path / "t.pth"), "tiny", grid=4)
    assert torch.equal(loaded(x), teacher(x))
    sd = teacher.state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys blocks\.1\.attn\.qkv\.weight"):
        models.load_teacher(name, str(tmp_path / "bad.pth"), "tiny", grid=4)


def test_teacher_key_names_are_metas():
    with torch.device("meta"):
        v2 = models.load_teacher("dinov2_vitl14").state_dict()
        v3 = models.load_teacher("dinov3_vitl16").state_dict()
    assert len(v2) == 343 and v2["pos_embed"].shape == (1, 1370, 1024) and "blocks.23.ls2.gamma" in v2
    assert len(v3) == 368 and v3["storage_tokens"].shape == (1, 4, 1024) and "blocks.23.attn.qkv.bias_mask" in v3
    assert v3["rope_embed.periods"].shape == (16,) and "pos_embed" not in v3


def test_semantic_loss_trains_encoder_never_teacher():
    import train_tokenizer as tt
    torch.manual_seed(0)
    m = tiny_tokenizer(teacher_dim=64).train()
    teacher = models.load_teacher("dinov3_vitl16", None, "tiny", grid=4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _, _, pred, ids_keep = m(x)
    tt.semantic_loss(pred, teacher(x), ids_keep).backward()
    assert m.encoder.latent_head.weight.grad.abs().sum() > 0
    assert m.encoder.transformer[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.decoder.parameters())  # only the semantic path was used
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Training stages 1 and 2 (issue: train_tokenizer.py, finetune_decoder.py, data.py)

TINY_FT = ["--demo", "--demo_images", "16", "--batch_size", "4", "--global_batch", "8", "--log_every", "1"]
TINY_TRAIN = TINY_FT + ["--img_size", "32"]


def main_of(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py"] + argv)
    module.main()


def test_tokenizer_loss_falls_on_a_fixed_batch():
    import train_tokenizer as tt
    torch.manual_seed(0)
    m = tiny_tokenizer(img=32, patch_size=8, teacher_dim=64).train()
    teacher = models.load_teacher("dinov2_vitl14", None, "tiny", grid=4)
    perceptual, disc = tt.Perceptual(0.0, True), tt.patchgan()
    args = type("A", (), dict(rec_weight=1.0, perceptual_weight=1.0, kl_weight=1e-6, sem_weight=1.0, disc_weight=0.5))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.stack([data.Shapes(4, 32)[i][0] for i in range(4)])
    losses = []
    for _ in range(30):
        x_hat, kl, pred, ids_keep = m(x)
        loss = sum(tt.generator_losses(args, x, x_hat, kl, pred, teacher(x), ids_keep, perceptual, disc, True).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(p.grad is None for p in disc.parameters())  # the generator step never trains the discriminator


def test_resume_follows_the_same_trajectory(tmp_path, monkeypatch):
    import train_tokenizer as tt
    argv = TINY_TRAIN + ["--epochs", "2", "--disc_start_epoch", "1"]  # 2 epochs x 2 steps, GAN in epoch 2
    main_of(tt, argv + ["--out_dir", str(tmp_path / "a")], monkeypatch)
    save = tt.save_checkpoint

    def crash_after_saving(path, state):
        save(path, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(tt, "save_checkpoint", crash_after_saving)
    with pytest.raises(KeyboardInterrupt):
        main_of(tt, argv + ["--out_dir", str(tmp_path / "b")], monkeypatch)
    monkeypatch.setattr(tt, "save_checkpoint", save)
    assert models.read_checkpoint(str(tmp_path / "b" / "tokenizer.pt"))["step"] == 2
    main_of(tt, argv + ["--out_dir", str(tmp_path / "b")], monkeypatch)
    a, b = (models.read_checkpoint(str(tmp_path / d / "tokenizer.pt")) for d in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "model_ema", "disc"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"step", "epoch", "loss", "rec", "perceptual", "kl", "sem", "lr", "grad_norm", "img_per_sec"} <= set(records[0])
    assert "gan" in records[-2] and "disc" in records[-2]
    assert os.path.exists(tmp_path / "a" / "tokenizer_recon_epoch0002.png")


def test_finetune_changes_only_the_pixel_decoder(tmp_path, monkeypatch):
    import finetune_decoder as fd
    import train_tokenizer as tt
    main_of(tt, TINY_TRAIN + ["--epochs", "1", "--out_dir", str(tmp_path)], monkeypatch)
    main_of(fd, TINY_FT + ["--epochs", "1", "--out_dir", str(tmp_path)], monkeypatch)
    before = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))["model"]
    after = models.read_checkpoint(str(tmp_path / "tokenizer_ft.pt"))["model"]
    assert not any(k.startswith("sem_decoder") for k in after)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert "decoder.conv_out.weight" in changed and "decoder.mask_token" not in changed
    ft = models.load_tokenizer(str(tmp_path / "tokenizer_ft.pt"))
    assert ft.sem_decoder is None and ft.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)


def test_two_process_ddp_ranks_agree(tmp_path):
    r = run("train_tokenizer.py", *TINY_TRAIN, "--epochs", "1", "--out_dir", str(tmp_path), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights identical on 2 ranks" in r.stderr
    assert "2 process(es)" in r.stderr


def test_corrupt_image_is_skipped(tmp_path, caplog):
    for c in ("a", "b"):
        os.makedirs(tmp_path / c)
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / c / f"{i}.jpg")
    good = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "0.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (tmp_path / "b" / "junk.png").write_bytes(b"not an image")
    ds = data.ImageFolder(str(tmp_path), size=32)
    assert len(ds) == 5 and [label for _, label in ds.samples] == [0, 0, 1, 1, 1]
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 for x, _ in items)
    # index 0 skips the truncated file; index 4 skips junk.png, wraps to index 0 and skips it again
    assert ds.skipped == 3 and "skipping unreadable image" in caplog.text


def test_center_crop_is_adm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), np.uint8))
    out = data.center_crop(img, 64)  # 700x300 -> BOX 350x150 -> BOX 175x75 -> BICUBIC 149x64 -> centre crop
    half = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX).resize((149, 64), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(half)[:, 42:106])


@pytest.mark.parametrize("argv,needle", [(["--data", "/no/such/folder"], "--data"),
                                         (["--noise_schedule", "cosine"], "--noise_schedule"),
                                         (["--demo", "--global_batch", "10"], "--global_batch")])
def test_bad_input_is_a_one_line_error(argv, needle):
    r = run("train_tokenizer.py", *argv, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]
