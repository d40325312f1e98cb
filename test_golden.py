"""Golden values: today's numbers of every stage, pinned so that a change of the math fails
(`python -m pytest -q test_golden.py`, CPU, under a minute).

The runs go through each script's main(argv) and read what the scripts write (metrics.jsonl, tokenizer.pt,
tokenizer_ft.pt, dit.pt, samples.npz): the flags, their defaults and these files are the interface that
outlives a reorganisation of the modules. Only the sampler's float test imports code (euler_sample, and
models.DiTDH to build a random network).

Tiny models, 2 optimiser steps per stage, one thread, seeds fixed: stage 1 (FSD + RAD + KL + LPIPS/ConvNeXt +
GAN, a random tiny DINOv2 teacher), stage 2 from it, a one-step dim-32 tokenizer on a 16 x 16 grid (8192
numbers per latent: the DiT^DH time shift s = sqrt 2 is on), DiT^DH-tiny on its latents, sampling with CFG.

Tolerances: rtol 1e-5, so another CPU's kernels (AVX2, ATen's plain `default` ones) pass. metrics.jsonl rounds
to 6 decimals (abs 2e-6). The weight checksums are float64 sums and sums of squares. Signed sums of quantities
that cancel (the weight change, Adam's first moment, the sampler's output) moved by up to 3e-4 between CPUs,
so those are pinned by their absolute sums and sums of squares instead. A change of the code that is meant to
change the numbers: rerecord them (GOLDEN is what record() returns).
"""
import json
import os
import signal

import numpy as np
import pytest
import torch

import finetune_decoder
import sample
import train_dit
import train_tokenizer

REL = 1e-5  # relative tolerance of every golden value
METRIC_ABS = 2e-6  # metrics.jsonl rounds to 6 decimals


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the numbers do not depend on the machine's core count, and on 2 shared cores it is
    also the fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def main_of(module, argv):
    """module.main(argv); the SIGTERM / SIGUSR1 handlers a training loop installs are undone after it."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        module.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# The runs (module fixtures: each stage runs once and feeds the next)

COMMON = ["--demo", "--workers", "0", "--log_every", "1", "--vis_every", "100", "--epochs", "1", "--seed", "0"]

# 4 built-in 32-px images, global batch 2 = 1 x 2 accumulation: 2 steps
STAGE1 = COMMON + ["--demo_images", "4", "--batch_size", "1", "--global_batch", "2", "--random_frozen_nets",
                   "--img_size", "32", "--patch_size", "8", "--dim", "16", "--enc_size", "demo", "--dec_size", "demo",
                   "--sem_size", "demo", "--teacher", "dinov2_vitl14", "--teacher_size", "tiny", "--sem_weight", "1",
                   "--perceptual_weight", "1", "--convnext_weight", "0.1", "--disc_weight", "0.1",
                   "--disc_start_epoch", "0", "--kl_weight", "1e-3"]
# stage 2: rec + GAN (from epoch 0, the default) + the discriminator, no perceptual term: the random-weight
# LPIPS's gradients differ by ~1e-5 between CPU kernels, and where they drive the decoder alone (stage 2) AdamW's
# first step turns that into 1e-5 (step 1) and 6e-4 (step 2) in the grad norm; stage 1 pins LPIPS + ConvNeXt
STAGE2 = COMMON + ["--demo_images", "4", "--batch_size", "1", "--global_batch", "2", "--random_frozen_nets",
                   "--perceptual_weight", "0", "--convnext_weight", "0", "--disc_weight", "0.1"]
# the DiT^DH's tokenizer: one plain step (rec + KL), dim 32 on a 16 x 16 grid
DIT_TOKENIZER = COMMON + ["--demo_images", "4", "--batch_size", "4", "--global_batch", "4", "--random_frozen_nets",
                          "--img_size", "32", "--patch_size", "2", "--dim", "32", "--enc_size", "demo",
                          "--dec_size", "demo", "--sem_weight", "0", "--perceptual_weight", "0",
                          "--convnext_weight", "0", "--disc_weight", "0"]
# 8 images, global batch 4 = 2 x 2 accumulation: 2 steps (demo recipe: lr 2e-3, EMA 0.99, label drop 0.1)
DIT = COMMON + ["--demo_images", "8", "--batch_size", "2", "--global_batch", "4", "--model", "tiny",
                "--sample_steps", "3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="module")
def stage1(root):
    out = str(root / "stage1")
    main_of(train_tokenizer, STAGE1 + ["--out_dir", out])
    return out


@pytest.fixture(scope="module")
def stage2(root, stage1):
    out = str(root / "stage2")
    main_of(finetune_decoder, STAGE2 + ["--out_dir", out, "--tokenizer", os.path.join(stage1, "tokenizer.pt")])
    return out


@pytest.fixture(scope="module")
def dit_tokenizer(root):
    out = str(root / "dit_tokenizer")
    main_of(train_tokenizer, DIT_TOKENIZER + ["--out_dir", out])
    return out


@pytest.fixture(scope="module")
def dit_run(root, dit_tokenizer):
    out = str(root / "dit")
    main_of(train_dit, DIT + ["--out_dir", out, "--tokenizer", os.path.join(dit_tokenizer, "tokenizer.pt")])
    return out


# ---------------------------------------------------------------------------------------------
# What is read back

def metric_rows(out_dir, stage):
    """The per-step rows (and the epoch-end row of the tokenizer stages) of `stage` in metrics.jsonl, without
    the timing."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["stage"] == stage]
    return [{k: v for k, v in r.items() if k not in ("stage", "img_per_sec")} for r in rows]


def float_tensors(sd):
    return [v.double() for _, v in sorted(sd.items()) if torch.is_tensor(v) and v.is_floating_point()]


def sums(tensors, signed=True):
    out = {"sumsq": sum((v * v).sum().item() for v in tensors),
           "abs": sum(v.abs().sum().item() for v in tensors)}
    if signed:
        out["sum"] = sum(v.sum().item() for v in tensors)
    return out


def checkpoint_sums(path):
    """A checkpoint's construction arguments (the defaults behind them too) and checksums of its weights and
    optimiser moments: for each network the sum and sum of squares of its float tensors (float64); model -
    model_ema (where the init cancels: what the steps did) and Adam's exp_avg by absolute sums and sums of
    squares (their signed sums cancel); exp_avg_sq by its sum."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    out = {"step": ck["step"], "epoch": ck["epoch"], "model_args": ck["model_args"]}
    for part in ("model", "model_ema", "disc"):
        if part in ck:
            s = sums(float_tensors(ck[part]))
            out[part] = {"sum": s["sum"], "sumsq": s["sumsq"]}
    model, ema = ck["model"], ck["model_ema"]
    out["model-ema"] = sums([model[k].double() - ema[k].double() for k in sorted(model)
                             if model[k].is_floating_point()], signed=False)
    for part in ("opt", "opt_disc"):
        if part in ck:
            states = [ck[part]["state"][i] for i in sorted(ck[part]["state"])]
            out[part] = {"exp_avg": sums([s["exp_avg"].double() for s in states], signed=False),
                         "exp_avg_sq": sum(s["exp_avg_sq"].double().sum().item() for s in states),
                         "step": sum(float(s["step"]) for s in states), "tensors": len(states)}
    if "latent_stats" in ck:
        out["latent_stats"] = {k: sums([ck["latent_stats"][k].double()]) for k in ("mean", "std")}
    return out


def samples_sums(path):
    a = np.load(path)["arr_0"]
    flat = a.reshape(-1).astype(np.float64)
    return {"shape": list(a.shape), "sum": float(flat.sum()), "sumsq": float((flat ** 2).sum()),
            "pixels": flat[::997][:12].tolist()}


def assert_close(got, want, path="", rel=REL, abs_=1e-12):
    """got == want, nested dicts / lists of numbers, floats to rel (and abs_), with the failing entry's name."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}", rel, abs_)
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]", rel, abs_)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=abs_), f"{path}: {got!r} != golden {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != golden {want!r}"


def assert_metrics(rows, want):
    assert_close(rows, want, "metrics.jsonl", abs_=METRIC_ABS)


# ---------------------------------------------------------------------------------------------
# The tests

def test_stage1_fsd_rad_gan_losses_and_weights(stage1):
    """Stage 1, 2 steps with every term on: rec, LPIPS + ConvNeXt, KL, FSD + RAD semantic loss, GAN (from
    epoch 0) and the discriminator's hinge; then the weights, EMA, PatchGAN and AdamW moments."""
    assert_metrics(metric_rows(stage1, "tokenizer"), GOLDEN["stage1_metrics"])
    assert_close(checkpoint_sums(os.path.join(stage1, "tokenizer.pt")), GOLDEN["stage1_checkpoint"], "tokenizer.pt")


def test_stage2_decoder_finetune_losses_and_weights(stage2):
    """Stage 2 from the stage-1 checkpoint, 2 steps: rec, GAN on from epoch 0 (the default), the discriminator."""
    assert_metrics(metric_rows(stage2, "tokenizer_ft"), GOLDEN["stage2_metrics"])
    assert_close(checkpoint_sums(os.path.join(stage2, "tokenizer_ft.pt")), GOLDEN["stage2_checkpoint"],
                 "tokenizer_ft.pt")


def test_dit_tokenizer_step(dit_tokenizer):
    """The dim-32, 16 x 16 tokenizer the DiT^DH trains on: one rec + KL step (FSD noise and RAD on)."""
    assert_metrics(metric_rows(dit_tokenizer, "tokenizer"), GOLDEN["dit_tokenizer_metrics"])
    assert_close(checkpoint_sums(os.path.join(dit_tokenizer, "tokenizer.pt")), GOLDEN["dit_tokenizer_checkpoint"],
                 "tokenizer.pt")


def test_dit_training_with_time_shift(dit_run):
    """DiT^DH-tiny, 2 steps on normalised posterior samples of flipped images, 8192 numbers per latent (time
    shift sqrt 2 on): loss and grad norm per step, latent statistics, weights, EMA, AdamW moments."""
    assert_metrics(metric_rows(dit_run, "dit"), GOLDEN["dit_metrics"])
    assert_close(checkpoint_sums(os.path.join(dit_run, "dit.pt")), GOLDEN["dit_checkpoint"], "dit.pt")


def perturbed_copy(src, dst, scale, seed, prefix=""):
    """A checkpoint with seeded noise on the EMA weights (what sample.py loads) whose names start with `prefix`."""
    ck = torch.load(src, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k in sorted(ck["model_ema"]):
        v = ck["model_ema"][k]
        if v.is_floating_point() and k.startswith(prefix):
            ck["model_ema"][k] = v + scale * torch.randn(v.shape, generator=g)
    torch.save(ck, dst)
    return dst


def sample_runs(dit_run, dit_tokenizer, out_dir):
    """samples.npz checksums of sample.py (seeded, CFG 2, 5 grid points, 4 images) with the trained DiT^DH and
    tokenizer, and with perturbed copies of both: 2 steps leave the DiT's zero-initialised output layers nearly
    zero, and a barely trained pixel decoder maps every latent to mid-grey (pixel std 3), so without the noise
    the samples would hardly show CFG or the time grid (with it: pixel std 23, nothing clipped)."""
    dit, tok = os.path.join(dit_run, "dit.pt"), os.path.join(dit_tokenizer, "tokenizer.pt")
    pairs = {"trained": (dit, tok),
             "perturbed": (perturbed_copy(dit, os.path.join(out_dir, "dit_perturbed.pt"), 0.3, 1),
                           perturbed_copy(tok, os.path.join(out_dir, "tokenizer_perturbed.pt"), 0.05, 2, "decoder."))}
    got = {}
    for name, (dit, tok) in pairs.items():
        out = os.path.join(out_dir, name, "samples.npz")
        main_of(sample, ["--dit", dit, "--tokenizer", tok, "--cfg", "2", "--steps", "5", "--num_images", "4",
                         "--per_proc_batch", "4", "--seed", "0", "--out", out])
        got[name] = samples_sums(out)
    return got


def test_sampling_with_cfg(dit_run, dit_tokenizer, tmp_path):
    """sample.py's samples.npz: shape, sum and sum of squares of the uint8 pixels, and 12 pixels. Another CPU
    may round a few pixels the other way: up to 48 such flips pass (sum +-48, sum of squares +-48 * 2 * 255,
    a pixel +-1); CFG or grid bugs move the perturbed run's sum by thousands."""
    got = sample_runs(dit_run, dit_tokenizer, str(tmp_path))
    for name, want in GOLDEN["samples"].items():
        g = got[name]
        assert g["shape"] == want["shape"], f"samples {name}: shape {g['shape']}"
        assert g["sum"] == pytest.approx(want["sum"], rel=REL, abs=48), f"samples {name}: sum {g['sum']} != golden {want['sum']}"
        assert g["sumsq"] == pytest.approx(want["sumsq"], rel=REL, abs=48 * 2 * 255), \
            f"samples {name}: sum of squares {g['sumsq']} != golden {want['sumsq']}"
        assert np.abs(np.array(g["pixels"]) - want["pixels"]).max() <= 1, f"samples {name}: pixels {g['pixels']}"


def euler_outputs():
    try:
        from models import euler_sample
    except ImportError:
        from sample import euler_sample
    import models
    torch.manual_seed(0)
    dit = models.DiTDH("tiny", 32, 16, 10).eval()  # 32 x 16 x 16 = 8192 numbers: time shift sqrt 2
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the output layers are zero-initialised
        for p in dit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    noise = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 7])
    out = {}
    for cfg in (1.0, 2.0):
        x = euler_sample(dit, noise, labels, 5, cfg).double()
        out[f"cfg {cfg}"] = {"abs": x.abs().sum().item(), "sumsq": (x * x).sum().item(),
                             "values": x.flatten()[::1001][:12].tolist()}
    return out


def test_euler_sample_float_output():
    """The sampler's float output on a random DiT^DH (before any uint8 rounding), without and with CFG."""
    got = euler_outputs()
    for k, want in GOLDEN["euler"].items():
        assert_close({"abs": got[k]["abs"], "sumsq": got[k]["sumsq"]}, {"abs": want["abs"], "sumsq": want["sumsq"]},
                     f"euler_sample {k}")
        assert_close(got[k]["values"], want["values"], f"euler_sample {k} values", abs_=1e-5)


def record():
    """The golden values of the code as it is (run by a recording script, not by pytest)."""
    import tempfile
    root = tempfile.mkdtemp(prefix="golden_")
    torch.set_num_threads(1)
    s1, s2, tk, dd = (os.path.join(root, d) for d in ("stage1", "stage2", "dit_tokenizer", "dit"))
    main_of(train_tokenizer, STAGE1 + ["--out_dir", s1])
    main_of(finetune_decoder, STAGE2 + ["--out_dir", s2, "--tokenizer", os.path.join(s1, "tokenizer.pt")])
    main_of(train_tokenizer, DIT_TOKENIZER + ["--out_dir", tk])
    main_of(train_dit, DIT + ["--out_dir", dd, "--tokenizer", os.path.join(tk, "tokenizer.pt")])
    golden = {"stage1_metrics": metric_rows(s1, "tokenizer"),
              "stage1_checkpoint": checkpoint_sums(os.path.join(s1, "tokenizer.pt")),
              "stage2_metrics": metric_rows(s2, "tokenizer_ft"),
              "stage2_checkpoint": checkpoint_sums(os.path.join(s2, "tokenizer_ft.pt")),
              "dit_tokenizer_metrics": metric_rows(tk, "tokenizer"),
              "dit_tokenizer_checkpoint": checkpoint_sums(os.path.join(tk, "tokenizer.pt")),
              "dit_metrics": metric_rows(dd, "dit"),
              "dit_checkpoint": checkpoint_sums(os.path.join(dd, "dit.pt")),
              "euler": euler_outputs()}
    golden["samples"] = sample_runs(dd, tk, root)
    return golden


# ---------------------------------------------------------------------------------------------
# Recorded on an AVX-512 EPYC (torch 2.14.1, 1 thread); checked with ATEN_CPU_CAPABILITY=avx2 and =default.

GOLDEN = {'dit_checkpoint': {'epoch': 1,
                             'latent_stats': {'mean': {'abs': 1.8966330082621425,
                                                       'sum': 0.5239844003226608,
                                                       'sumsq': 0.1852468053184757},
                                              'std': {'abs': 7.048147067427635,
                                                      'sum': 7.048147067427635,
                                                      'sumsq': 1.5617591827490027}},
                             'model': {'sum': 3827.576436620618, 'sumsq': 5403.382760473793},
                             'model-ema': {'abs': 28.163305247493593, 'sumsq': 0.05355016584143061},
                             'model_args': {'dim': 32, 'grid': 16, 'label_drop': 0.1, 'num_classes': 10, 'size': 'tiny'},
                             'model_ema': {'sum': 3826.284245534614, 'sumsq': 5403.189945300826},
                             'opt': {'exp_avg': {'abs': 6.063632361324064, 'sumsq': 0.0317577501242529},
                                     'exp_avg_sq': 0.09054069412921759,
                                     'step': 128.0,
                                     'tensors': 64},
                             'step': 2},
          'dit_metrics': [{'epoch': 0.5, 'grad_norm': 0.923845, 'loss': 23.545952, 'lr': 0.002, 'skipped': 0, 'step': 1},
                          {'epoch': 1.0, 'grad_norm': 1.528038, 'loss': 23.586018, 'lr': 0.002, 'skipped': 0, 'step': 2}],
          'dit_tokenizer_checkpoint': {'disc': {'sum': 1802.388882617429, 'sumsq': 2112.9971791706726},
                                       'epoch': 1,
                                       'model': {'sum': 1505.1853025299067, 'sumsq': 2369.863079927093},
                                       'model-ema': {'abs': 150.29675138914578, 'sumsq': 0.03099559700507444},
                                       'model_args': {'dec_size': 'demo',
                                                      'dim': 32,
                                                      'enc_size': 'demo',
                                                      'gamma': 1.0,
                                                      'img_size': 32,
                                                      'kl': True,
                                                      'mask_ratio': 0.4,
                                                      'mask_ratio_min': -0.1,
                                                      'noise_schedule': 'shift',
                                                      'patch_size': 2,
                                                      'sem_noisy': True,
                                                      'sem_size': 'demo',
                                                      'sem_type': 'transformer',
                                                      'teacher_dim': 0},
                                       'model_ema': {'sum': 1506.2549861458767, 'sumsq': 2369.9425751462322},
                                       'opt': {'exp_avg': {'abs': 0.09064837924816434, 'sumsq': 9.931791593531613e-05},
                                               'exp_avg_sq': 0.0004965895639950546,
                                               'step': 57.0,
                                               'tensors': 57},
                                       'opt_disc': {'exp_avg': {'abs': 0, 'sumsq': 0},
                                                    'exp_avg_sq': 0,
                                                    'step': 0,
                                                    'tensors': 0},
                                       'step': 1},
          'dit_tokenizer_metrics': [{'epoch': 1.0,
                                     'grad_norm': 0.099658,
                                     'kl': 0.000311,
                                     'loss': 0.055158,
                                     'loss_no_gan': 0.055158,
                                     'lr': 0.00025,
                                     'rec': 0.054847,
                                     'skipped': 0,
                                     'step': 1},
                                    {'epoch': 1, 'held_out_psnr_ema': 13.687294, 'step': 1}],
          'euler': {'cfg 1.0': {'abs': 16805.48522689799,
                                'sumsq': 27283.739689668393,
                                'values': [-1.0937364101409912, -0.11479508131742477, -0.6091858148574829, 1.3681172132492065,
                                           0.7437875270843506, -0.16315950453281403, -1.3029260635375977, 0.9523075819015503,
                                           -0.9599997997283936, -0.9226489663124084, -1.3686496019363403,
                                           0.028373301029205322]},
                    'cfg 2.0': {'abs': 16800.17322947271,
                                'sumsq': 27263.345916306836,
                                'values': [-1.1131577491760254, -0.10881198942661285, -0.6146892309188843, 1.3718453645706177,
                                           0.7389799952507019, -0.18345904350280762, -1.2963106632232666, 0.9695039987564087,
                                           -0.9585237503051758, -0.9324535131454468, -1.3584734201431274,
                                           0.012497887015342712]}},
          'samples': {'perturbed': {'pixels': [148.0, 110.0, 137.0, 153.0, 161.0, 152.0, 146.0, 127.0, 98.0, 156.0, 135.0,
                                               107.0],
                                    'shape': [4, 32, 32, 3],
                                    'sum': 1572147.0,
                                    'sumsq': 207707109.0},
                      'trained': {'pixels': [126.0, 124.0, 130.0, 132.0, 131.0, 130.0, 128.0, 126.0, 127.0, 125.0, 123.0,
                                             135.0],
                                  'shape': [4, 32, 32, 3],
                                  'sum': 1566089.0,
                                  'sumsq': 199701763.0}},
          'stage1_checkpoint': {'disc': {'sum': 1209.4154033919517, 'sumsq': 1331.0021143360516},
                                'epoch': 1,
                                'model': {'sum': 2369.600462251367, 'sumsq': 3647.3848238280075},
                                'model-ema': {'abs': 190.48553353262778, 'sumsq': 0.030378294666979604},
                                'model_args': {'dec_size': 'demo',
                                               'dim': 16,
                                               'enc_size': 'demo',
                                               'gamma': 1.0,
                                               'img_size': 32,
                                               'kl': True,
                                               'mask_ratio': 0.4,
                                               'mask_ratio_min': -0.1,
                                               'noise_schedule': 'shift',
                                               'patch_size': 8,
                                               'sem_noisy': True,
                                               'sem_size': 'demo',
                                               'sem_type': 'transformer',
                                               'teacher_dim': 64},
                                'model_ema': {'sum': 2369.7676255791616, 'sumsq': 3647.3814120340767},
                                'opt': {'exp_avg': {'abs': 55.50781036096018, 'sumsq': 0.05032167892114814},
                                        'exp_avg_sq': 0.20635630409234257,
                                        'step': 170.0,
                                        'tensors': 85},
                                'opt_disc': {'exp_avg': {'abs': 307.4638643084125, 'sumsq': 0.14300102387480831},
                                             'exp_avg_sq': 0.8775228803263162,
                                             'step': 26.0,
                                             'tensors': 13},
                                'step': 2},
          'stage1_metrics': [{'disc': 1.080203,
                              'epoch': 0.5,
                              'gan': -0.006591,
                              'grad_norm': 1.370589,
                              'kl': 0.008097,
                              'loss': 1.355194,
                              'loss_no_gan': 1.361785,
                              'lr': 0.000125,
                              'perceptual': 0.2785,
                              'rec': 0.065607,
                              'sem': 1.009581,
                              'skipped': 0,
                              'step': 1},
                             {'disc': 0.63534,
                              'epoch': 1.0,
                              'gan': 0.162669,
                              'grad_norm': 1.530535,
                              'kl': 0.006492,
                              'loss': 1.560986,
                              'loss_no_gan': 1.398317,
                              'lr': 6.3e-05,
                              'perceptual': 0.315982,
                              'rec': 0.044079,
                              'sem': 1.031764,
                              'skipped': 0,
                              'step': 2},
                             {'epoch': 1, 'held_out_psnr_ema': 13.686661, 'step': 2}],
          'stage2_checkpoint': {'disc': {'sum': 1220.283797391911, 'sumsq': 1335.514353284962},
                                'epoch': 1,
                                'model': {'sum': 1559.688429270548, 'sumsq': 1906.628737364264},
                                'model-ema': {'abs': 130.31032363505923, 'sumsq': 0.051618903826096005},
                                'model_args': {'dec_size': 'demo',
                                               'dim': 16,
                                               'enc_size': 'demo',
                                               'gamma': 0.0,
                                               'img_size': 32,
                                               'kl': True,
                                               'mask_ratio': 0.0,
                                               'mask_ratio_min': -0.1,
                                               'noise_schedule': 'shift',
                                               'patch_size': 8,
                                               'sem_noisy': True,
                                               'sem_size': 'demo',
                                               'sem_type': 'transformer',
                                               'teacher_dim': 64},
                                'model_ema': {'sum': 1559.7721015986444, 'sumsq': 1906.5485140322005},
                                'opt': {'exp_avg': {'abs': 2.5339370994659065, 'sumsq': 0.0008987838088123717},
                                        'exp_avg_sq': 0.0035034768437708463,
                                        'step': 58.0,
                                        'tensors': 29},
                                'opt_disc': {'exp_avg': {'abs': 312.05513855992973, 'sumsq': 0.14778739272063718},
                                             'exp_avg_sq': 0.8775251795878813,
                                             'step': 26.0,
                                             'tensors': 13},
                                'step': 2},
          'stage2_metrics': [{'disc': 0.934856,
                              'epoch': 0.5,
                              'gan': 0.031418,
                              'grad_norm': 0.213194,
                              'loss': 0.097088,
                              'loss_no_gan': 0.06567,
                              'lr': 0.00025,
                              'rec': 0.06567,
                              'skipped': 0,
                              'step': 1},
                             {'disc': 0.726799,
                              'epoch': 1.0,
                              'gan': 0.277215,
                              'grad_norm': 0.163983,
                              'loss': 0.321243,
                              'loss_no_gan': 0.044028,
                              'lr': 0.000125,
                              'rec': 0.044028,
                              'skipped': 0,
                              'step': 2},
                             {'epoch': 1, 'held_out_psnr_ema': 13.687196, 'step': 2}]}
