"""Smoke tests on tiny shapes, CPU only, no network: `python -m pytest -q test_smoke.py`."""
import atexit
import contextlib
import copy
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo
import evaluate as ev
import finetune_decoder as finetune_decoder_script
import models
import plumbing
import pretrained
import sample as sample_script
import train_dit as train_dit_script
import train_tokenizer as train_tokenizer_script
from models import euler_sample, time_grid

HERE = os.path.dirname(os.path.abspath(__file__))
# one intra-op thread: the numbers do not depend on the machine's core count (the golden values), and the
# second core is the side process's (compile_aside); two threads beside it would slow the suite down
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Shared fakes and helpers: tiny models and files, and the three ways a test runs a script (main_of in-process,
# ranks() on the session's two spawned ranks, run in a subprocess for torchrun and the command line)

def load_teacher(name, path=None, size="large", grid=16, release_input=True, rope_rescale=1.0):
    """pretrained.load_teacher with the stage-1 flags it reads."""
    args = SimpleNamespace(teacher_size=size, teacher_input="release" if release_input else "direct",
                           teacher_rope_rescale=rope_rescale, random_frozen_nets=path is None)
    return pretrained.load_teacher(name, grid, args, path)


def tiny_tokenizer(dim=16, img=64, teacher_dim=32, **kw):
    kw = dict(dict(patch_size=16, enc_size="tiny", dec_size="tiny", sem_size="tiny"), **kw)
    return models.Tokenizer(img_size=img, dim=dim, teacher_dim=teacher_dim, **kw)


def free_port():
    """A TCP port free on this machine now, for a process group (a fixed one clashes with another test run)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Two spawned processes (forked ones can deadlock in torch), kept for the whole session: ranks(fn, args) runs
    fn(rank, *args) in both, as two torchrun ranks would (spawning them and importing torch takes ~5 s on 2
    cores). Each, as a torchrun rank does, forks its loader workers and runs one thread; while they run, the side
    process `aside` (compile_aside's) stops (both_cores)."""

    def __init__(self, aside):
        self.procs, self.conns = [], []
        self.aside = aside
        atexit.register(self.close)  # also when pytest stops early

    def __call__(self, fn, args):
        with both_cores(self.aside):
            self.run(fn, args)

    def run(self, fn, args):
        from multiprocessing.connection import wait
        if not self.procs:
            ctx = torch.multiprocessing.get_context("spawn")
            for rank in range(2):
                mine, theirs = ctx.Pipe()
                self.procs.append(ctx.Process(target=rank_process, args=(rank, theirs)))  # may fork loaders
                self.procs[-1].start()
                self.conns.append(mine)
        for conn in self.conns:
            conn.send((fn, args))
        waiting = list(self.conns)
        while waiting:
            answered = wait(waiting, timeout=300)
            error = "" if answered else "a rank gave no answer in 300 s"
            for conn in answered:
                waiting.remove(conn)
                try:
                    error = error or conn.recv()
                except EOFError:
                    error = "a rank died"
            if error:  # the other rank may be waiting in a collective: start both afresh next time
                self.close()
                raise AssertionError(error)

    def close(self):
        for proc in self.procs:
            proc.kill()
        self.procs, self.conns = [], []


def rank_process(rank, conn):
    import multiprocessing
    import traceback
    multiprocessing.set_start_method("fork", force=True)
    pretrained.Perceptual = perceptual_memo(pretrained.Perceptual)  # a process of its own: its own memo
    while True:
        fn, args = conn.recv()
        try:
            fn(rank, *args)
            conn.send(None)
        except BaseException:
            conn.send(f"rank {rank}: {traceback.format_exc()}")


@pytest.fixture(scope="session")
def ranks(compile_aside):
    pool = Ranks(compile_aside)
    yield pool
    pool.close()


@contextlib.contextmanager
def both_cores(aside):
    """Two DDP ranks of this suite at once: the side process (compile_aside's `aside`) stops meanwhile (SIGSTOP),
    as the ranks run in lockstep, at the pace of the one that waits for a core."""
    if aside is None or aside.poll() is not None:
        yield
        return
    os.killpg(aside.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(aside.pid, signal.SIGCONT)


def command(script, *args, nproc=None):
    """The command line of one of this folder's scripts: plain python, or torchrun with nproc processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc else [sys.executable]
    return launcher + [os.path.join(HERE, script), *args]


def run(script, *args, timeout=300, nproc=None):
    return subprocess.run(command(script, *args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                          cwd=HERE)


TINY_FT = ["--demo", "--demo_images", "16", "--batch_size", "4", "--global_batch", "8", "--log_every", "1",
           "--perceptual_weight", "1", "--disc_weight", "0.1"]
TINY_TRAIN = TINY_FT + ["--img_size", "32", "--teacher", "dinov3_vitl16", "--teacher_size", "tiny"]  # not the judge


def main_of(module, argv):
    """module.main(argv), as every in-process test calls a script; the SIGTERM / SIGUSR1 handlers a training
    loop installs are undone after it."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        module.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def one_line_exit(script, argv, capsys):
    """The message of a script that must stop in one line (its own SystemExit, or argparse's last line)."""
    with pytest.raises(SystemExit) as e:
        main_of(importlib.import_module(script), argv)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg
    return msg


def tiny_dit(dim=4, grid=4, num_classes=10):
    torch.manual_seed(0)
    return models.DiTDH("tiny", dim=dim, grid=grid, num_classes=num_classes)


def randomise(model):  # the zero-initialised output layers would make most checks vacuous
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokenizer_file(path, img_size=32):
    torch.manual_seed(0)
    sd = models.Tokenizer(img_size=img_size, patch_size=8, dim=8, enc_size="tiny", dec_size="tiny",
                          teacher_dim=0).state_dict()
    torch.save({"model": sd, "model_ema": sd}, path)
    return str(path)


def shapes_folder(root, per_class, classes, seed=0, size=32):
    """An ImageNet-style folder of built-in shapes: `classes` sub-folders of `per_class` PNGs each."""
    ds = demo.Shapes(10 * per_class, size, seed=seed)
    for i in range(10 * per_class):
        arr, label = ds.render(i)
        if label < classes:
            (root / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / f"c{label}" / f"{i}.png")
    return str(root)


PERCEPTUAL_BUILT = {}  # convnext_weight -> the built net


def perceptual_memo(build):
    """pretrained.Perceptual with random weights, drawn once per convnext_weight (from seed 0, the caller's RNG
    stream left as it was): drawing its VGG-16 (the classifier too, 120M numbers that LPIPS then drops) takes ~1 s
    on 2 cores, in every tokenizer run of the tests. So the tests' in-process runs draw their later weights from
    another point of the RNG stream than the command line does: no test compares the two (the golden runs at the
    end build the real thing)."""

    def memo(convnext_weight, random_weights):
        if not random_weights:
            return build(convnext_weight, random_weights)
        if convnext_weight not in PERCEPTUAL_BUILT:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                PERCEPTUAL_BUILT[convnext_weight] = build(convnext_weight, random_weights)
        return copy.deepcopy(PERCEPTUAL_BUILT[convnext_weight])
    return memo


@pytest.fixture(autouse=True)
def perceptual_built_once(monkeypatch):
    """Every test's in-process runs build the loss networks through perceptual_memo (not the golden runs' module
    fixtures at the end, which build them themselves)."""
    monkeypatch.setattr(pretrained, "Perceptual", perceptual_memo(pretrained.Perceptual))


# The side process: from the suite's start, a second pytest process on the second core takes tests from the end
# of the suite's order (the compile tests first, the longest), while this one runs them from the start; they meet
# where their work does on this machine. Each test runs once, in the process that claims it first (a file per
# unit: tests that share a costly module fixture are one unit); this process reports the side's tests from the
# reports the side process writes as it goes. Tests of two DDP ranks (the ones that take `ranks`) stay here: the
# side process stops (SIGSTOP) while they run (both_cores).
SHARED_FIXTURES = ("demo_judges", "stage1", "dit_tokenizer")  # each built once, in one process


def unit_of(item):
    """The name under which `item` is claimed: its costly module fixture's, or its own."""
    return next((name for name in SHARED_FIXTURES if name in item.fixturenames), item.nodeid)


def claim(folder, unit, me):
    """Whether `me` ("here" or "aside") runs `unit`: it claimed it before or claims it now."""
    path = os.path.join(folder, re.sub(r"[^\w.-]", "_", unit))
    try:
        with open(path, "x") as f:
            f.write(me)
        return True
    except FileExistsError:
        with open(path) as f:
            return f.read() == me


class Foreground:
    """This process's pytest plugin: a test the side process claimed is reported from its reports (waiting for
    them); a test it has no reports of when it ended (crashed, or killed after 10 minutes) runs here."""

    def __init__(self, process, folder, movable):
        self.process, self.folder, self.movable = process, folder, movable
        self.reports, self.read = {}, 0  # nodeid -> its serialised reports; bytes of the reports file read

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if item.nodeid not in self.movable or claim(self.folder, unit_of(item), "here"):
            return None  # pytest runs it here
        reports = self.wait_for(item.nodeid)
        if reports is None:
            return None
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for data in reports:
            report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def wait_for(self, nodeid, timeout=600):
        """The side process's setup, call and teardown reports of `nodeid`, or None if it ends without them."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.process.poll() is not None
            with open(os.path.join(self.folder, "reports.jsonl"), "rb") as f:
                f.seek(self.read)
                lines = f.read().split(b"\n")
            self.read += sum(len(line) + 1 for line in lines[:-1])  # whole lines only
            for line in lines[:-1]:
                data = json.loads(line)
                self.reports.setdefault(data["nodeid"], []).append(data)
            done = self.reports.get(nodeid, [])
            if done and done[-1]["when"] == "teardown":
                return done
            if ended:
                return None
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                return None
            time.sleep(0.1)


class SideProcess:
    """The side process's pytest plugin: it runs the tests it claims and writes each report as it comes."""

    def __init__(self, config, folder):
        self.config, self.folder = config, folder

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if not claim(self.folder, unit_of(item), "aside"):
            return True  # the foreground runs it

    def pytest_runtest_logreport(self, report):
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(os.path.join(self.folder, "reports.jsonl"), "a") as f:
            f.write(json.dumps(data) + "\n")


@pytest.fixture(scope="session", autouse=True)
def compile_aside(request, tmp_path_factory):
    """The side process (None where there is none: inside it, or where no compile test is selected, or nothing
    but those), started before the first test; the tests it may take go in its order: the compile tests first
    (~1.7 minutes of one core on a fresh machine, mostly inductor's codegen and g++), then the others from the
    end, the tests of a unit one after another. The first of them is the side's from the start."""
    config = request.config
    if os.environ.get("RECTOK_ASIDE"):  # this is the side process
        plugin = SideProcess(config, os.environ["RECTOK_ASIDE"])
        config.pluginmanager.register(plugin, "rectok-side-process")
        yield None
        config.pluginmanager.unregister(plugin)
        return
    items = request.session.items
    movable = [item for item in items if "ranks" not in item.fixturenames]
    compiled = [item for item in movable if "inductor_as_tested" in item.fixturenames]
    if not compiled or len(compiled) == len(items):
        yield None
        return
    units = {}  # unit -> its tests in the suite's order, the units from the end
    for item in reversed([item for item in movable if item not in compiled]):
        units.setdefault(unit_of(item), []).insert(0, item)
    order = compiled + [item for tests in units.values() for item in tests]
    folder = str(tmp_path_factory.mktemp("aside"))
    open(os.path.join(folder, "reports.jsonl"), "w").close()
    claim(folder, unit_of(items[0]), "here")  # the test being set up now: the plugin comes after its start
    claim(folder, unit_of(order[0]), "aside")
    side = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *[item.nodeid for item in order]],
                            cwd=config.rootpath,
                            env=dict(os.environ, RECTOK_ASIDE=folder, TORCHINDUCTOR_COMPILE_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    plugin = Foreground(side, folder, {item.nodeid for item in movable})
    config.pluginmanager.register(plugin, "rectok-foreground")
    yield side
    config.pluginmanager.unregister(plugin)
    if side.poll() is None:  # the suite stopped first: the side process goes, with its g++ runs
        os.killpg(side.pid, signal.SIGKILL)
        side.wait()


@pytest.fixture
def inductor_as_tested():
    """The compile tests' inductor: eager's RNG inside compiled code; the C++ wrapper, one g++ run per graph, not
    one per kernel (a fifth to a third less compile time); scalar C++ loops in inductor's debug build (-O0 -g): a
    third less again (the two tests: ~150 -> ~100 CPU-s). The graphs are the ones `--compile` builds; on a GPU
    their kernels are Triton's, so neither inductor's CPU vectoriser nor g++'s optimiser is what is tested."""
    import torch._inductor.config  # here: importing inductor takes ~1.5 s, in every process that imports this file
    with torch._inductor.config.patch({"fallback_random": True, "cpp_wrapper": True, "cpp.simdlen": 0,
                                       "cpp.vec_isa_ok": False, "aot_inductor.debug_compile": True}):
        yield


class StandInInception(torch.nn.Module):
    """The real net's interface at a fraction of its cost (it takes ~0.2 s per image on 2 CPU cores); `dim`
    below 2048 keeps the FID's sqrtm cheap (a minute at 2048 on 2 cores)."""

    def __init__(self, dim=2048):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16 * 16 * 3, dim, generator=torch.Generator().manual_seed(0)),
                                    requires_grad=False)

    def forward(self, x):
        pool = torch.nn.functional.adaptive_avg_pool2d(x.float(), 16).flatten(1) @ self.w / 1000
        return pool, pool[:, :1008]


# ---------------------------------------------------------------------------------------------
# Tokenizer (models.py)

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
    assert ids_keep.shape[0] == 2 and 10 <= ids_keep.shape[1] <= 16  # ceil(16 (1 - ratio)), ratio in [0, 0.4]
    assert all(len(set(row.tolist())) == ids_keep.shape[1] for row in ids_keep)  # distinct tokens per image


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


def test_no_kl_is_a_deterministic_autoencoder(tmp_path):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=8, kl=False).train()
    assert m.encoder.latent_head.out_features == 8  # no logvar half
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(m.encode(x, sample=True), m.encode(x))
    m.gamma, m.mask_ratio = 0.0, 0.0
    x_hat, kl, _, _ = m(x)
    assert kl.item() == 0 and torch.equal(x_hat, m.decode(m.encode(x)))
    torch.save({"model": m.state_dict(), "model_ema": m.state_dict(), "model_args": m.model_args}, tmp_path / "ae.pt")
    loaded = pretrained.load_tokenizer(str(tmp_path / "ae.pt"))
    assert loaded.dim == 8 and not loaded.kl and torch.equal(loaded.encode(x), m.encode(x))


def test_masked_semantic_target_counts_only_masked_tokens():
    import train_tokenizer as tt
    target = torch.randn(2, 6, 4)
    pred = torch.randn(2, 6, 4, requires_grad=True)
    ids_keep = torch.tensor([[0, 2, 4, 5], [1, 2, 3, 5]])
    loss = tt.semantic_loss(pred, target, ids_keep, masked_only=True)
    cos = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    assert torch.allclose(loss, (cos[0, [1, 3]].sum() + cos[1, [0, 4]].sum()) / 4)
    loss.backward()
    kept = torch.zeros(2, 6, dtype=torch.bool).scatter(1, ids_keep, True)
    assert (pred.grad[kept] == 0).all() and (pred.grad[~kept] != 0).all()
    everything = torch.arange(6).expand(2, 6)  # nothing masked: zero loss, still in the graph (DDP)
    zero = tt.semantic_loss(pred, target, everything, masked_only=True)
    assert zero.item() == 0 and zero.requires_grad
    assert torch.allclose(tt.semantic_loss(pred, target, ids_keep), cos.mean())  # the release: every position


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
    """Each schedule's t: its mean, and its quantiles against the closed-form inverse CDF (shift: the time shift of
    a uniform u, t = s u / (1 + (s - 1) u); uniform: u; lognorm: sigmoid of a standard normal quantile)."""
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=128, img=256, noise_schedule=schedule)  # s = sqrt(256 * 128 / 4096) = 2.83
    t = m.sample_t(200_000, "cpu")
    assert t.min() >= 0 and t.max() <= 1
    s = math.sqrt(8)
    expected = {"shift": s / (s - 1) * (1 - math.log(s) / (s - 1)), "uniform": 0.5, "lognorm": 0.5}[schedule]
    assert abs(t.mean().item() - expected) < 3e-3
    if schedule == "shift":  # pushed towards noise: median = s / (1 + s)
        assert abs(t.median().item() - s / (1 + s)) < 3e-3
    q = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
    inverse_cdf = {"shift": s * q / (1 + (s - 1) * q), "uniform": q,
                   "lognorm": torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(q))}[schedule]
    torch.testing.assert_close(t.flatten().quantile(q), inverse_cdf, atol=4e-3, rtol=0)


def test_checkpoint_round_trip_and_release_layout(tmp_path):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=32).eval()
    sd = m.state_dict()
    model_args = dict(m.model_args, gamma=0.5, sem_noisy=False, noise_schedule="lognorm")  # not in the tensors
    torch.save({"model": sd, "model_ema": sd, "model_args": model_args}, tmp_path / "ours.pt")
    loaded = pretrained.load_tokenizer(str(tmp_path / "ours.pt")).eval()
    assert loaded.model_args == model_args
    assert (loaded.gamma, loaded.sem_noisy, loaded.noise_schedule) == (0.5, False, "lognorm")
    assert pretrained.load_tokenizer(str(tmp_path / "ours.pt"), gamma=0.0).gamma == 0.0  # overrides win
    torch.save({"model": sd, "model_ema": sd, "args": {"gamma": 0.5}}, tmp_path / "old.pt")  # before model_args
    with pytest.raises(SystemExit, match=r"old.pt: saved by an older version of this code \(no model_args\)"):
        pretrained.load_tokenizer(str(tmp_path / "old.pt"))
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
    theirs = pretrained.load_tokenizer(str(tmp_path / "release.pth")).eval()
    with torch.no_grad():
        assert torch.equal(theirs.decode(theirs.encode(x)), m.decode(m.encode(x)))
    del release["decoder.conv_out.weight"]
    torch.save({"model": release}, tmp_path / "broken.pth")
    with pytest.raises(SystemExit, match="decoder.conv_out.weight"):
        pretrained.load_tokenizer(str(tmp_path / "broken.pth"))


# ---------------------------------------------------------------------------------------------
# Teachers (models.py)

@pytest.mark.parametrize("name", ["dinov2_vitl14", "dinov3_vitl16"])
def test_teacher_shapes_frozen_and_round_trip(name, tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(name, None, "tiny", grid=4)
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
    loaded = load_teacher(name, str(tmp_path / "t.pth"), "tiny", grid=4)
    assert torch.equal(loaded(x), teacher(x))
    sd = teacher.state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"missing keys blocks\.1\.attn\.qkv\.weight"):
        load_teacher(name, str(tmp_path / "bad.pth"), "tiny", grid=4)


def test_teacher_release_input_truncates_to_uint8_and_resizes():
    v3 = load_teacher("dinov3_vitl16", None, "tiny", grid=16)  # release_input by default
    x = torch.stack([data.to_tensor(np.full((256, 256, 3), k, np.uint8)) for k in range(256)])
    level = (x[:, 0, 0, 0] + 1) / 2 * 255
    truncated, rounded = level.to(torch.uint8).float(), level.round()
    assert (truncated != rounded).sum() > 0  # some grey levels come back one lower through .to(torch.uint8)
    out = v3.preprocess(x)  # constant images stay constant through both resizes
    assert out.shape == (256, 3, 256, 256)
    expected = (truncated / 255 - v3.mean[0, 0, 0, 0]) / v3.std[0, 0, 0, 0]
    torch.testing.assert_close(out[:, 0, 100, 37], expected, atol=1e-5, rtol=0)
    direct = load_teacher("dinov3_vitl16", None, "tiny", grid=16, release_input=False)
    edge = torch.zeros(1, 3, 256, 256).index_fill_(3, torch.arange(128), 1.0) - 0.5  # a sharp vertical edge
    blurred, sharp = v3.preprocess(edge)[0, 0, 0], direct.preprocess(edge)[0, 0, 0]
    assert len(sharp.unique()) == 2  # a sharp edge, and the blurred one is flat away from it:
    assert torch.allclose(blurred[:124], blurred[0]) and torch.allclose(blurred[132:], blurred[-1])
    between = (blurred - blurred[0]).abs().gt(1e-3) & (blurred - blurred[-1]).abs().gt(1e-3)
    assert between.sum() == 4  # the 224-px round trip softens the edge over 4 pixels
    v2 = load_teacher("dinov2_vitl14", None, "tiny", grid=16)
    assert v2.preprocess(edge).shape == (1, 3, 224, 224) and v2(edge).shape == (1, 256, v2.dim)


def test_teacher_rope_rescale_is_one_log_uniform_draw_per_forward():
    teacher = load_teacher("dinov3_vitl16", None, "tiny", grid=16)
    sin, cos = teacher.rope(16, 16)
    base = torch.atan2(sin[-1, 7], cos[-1, 7])  # a low frequency: the angle never wraps
    assert torch.equal(teacher.rope(16, 16)[0], sin)  # rope_rescale 1 (evaluation): deterministic
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    teacher.rope_rescale = 2.0  # what train_tokenizer.py sets by default (--teacher_rope_rescale)
    scales = []
    for _ in range(2000):
        s, c = teacher.rope(16, 16)
        scales.append((torch.atan2(s[-1, 7], c[-1, 7]) / base).item())
        assert torch.allclose(torch.atan2(s[:, 7], c[:, 7]), scales[-1] * torch.atan2(sin[:, 7], cos[:, 7]), atol=1e-5)
    log_s = np.log(scales)  # one scalar for every token and both axes, log-uniform on [-ln 2, ln 2]
    assert -math.log(2) - 1e-4 < log_s.min() < -0.6 and 0.6 < log_s.max() < math.log(2) + 1e-4
    assert abs(log_s.mean()) < 0.03 and abs(log_s.std() - math.log(2) / math.sqrt(3)) < 0.02
    same = x[:1].expand(2, -1, -1, -1)
    out = teacher(same)
    assert torch.equal(out[0], out[1]) and not torch.equal(out, teacher(same))  # per forward, not per sample


def test_teacher_key_names_are_metas():
    with torch.device("meta"):
        v2 = load_teacher("dinov2_vitl14").state_dict()
        v3 = load_teacher("dinov3_vitl16").state_dict()
    assert len(v2) == 343 and v2["pos_embed"].shape == (1, 1370, 1024) and "blocks.23.ls2.gamma" in v2
    assert len(v3) == 368 and v3["storage_tokens"].shape == (1, 4, 1024) and "blocks.23.attn.qkv.bias_mask" in v3
    assert v3["rope_embed.periods"].shape == (16,) and "pos_embed" not in v3


# SigLIP 2 and DINOv3 ViT-B/16 (paper Tab. 6): timm's and Meta's key names; parity with timm's
# vit_large_patch16_siglip_256 and Meta's dinov3_vitb16 on random weights of the real shapes was exact
# (measured outside the tests, with timm and Meta's code, which the tests do not need)

def build_teacher(name, sd, size="tiny", grid=16):
    args = SimpleNamespace(teacher_size=size, teacher_input="release", teacher_rope_rescale=1.0)
    return pretrained.TEACHERS[name].build(sd, grid, args)


# timm's vit_large_patch16_siglip_256 state dict outside its 24 blocks (timm 1.0.19), and in each block
SIGLIP_TOP = ({"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
               "attn_pool.latent"}
              | {f"attn_pool.{m}.{p}" for m in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")})
SIGLIP_BLOCK = {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                for p in ("weight", "bias")}


def test_new_teacher_key_names_are_timms_and_metas():
    with torch.device("meta"):
        siglip = load_teacher("siglip")
        sd = siglip.state_dict()
        v3b = load_teacher("dinov3_vitb16", size="base").state_dict()
        # a weight file's sizes win over --teacher_size: ViT-L SigLIP / ViT-B DINOv3 files at "tiny"
        from_file = build_teacher("siglip", sd).state_dict()
        v3b_file = build_teacher("dinov3_vitb16", v3b)
        # timm's "gap" SigLIPs have no attention-pool head: none is built
        gap = build_teacher("siglip", {k: v for k, v in sd.items() if not k.startswith("attn_pool.")})
    assert len(sd) == 306 and {k for k in sd if not k.startswith("blocks.")} == SIGLIP_TOP
    assert all({k.split(".", 2)[2] for k in sd if k.startswith(f"blocks.{i}.")} == SIGLIP_BLOCK for i in range(24))
    assert sd["pos_embed"].shape == (1, 256, 1024) and sd["attn_pool.latent"].shape == (1, 1, 1024)
    assert sd["blocks.23.mlp.fc1.weight"].shape == (4096, 1024) and sd["attn_pool.kv.weight"].shape == (2048, 1024)
    assert siglip.dim == 1024 and siglip.blocks[0].heads == 16 and "cls_token" not in sd
    assert {k: v.shape for k, v in from_file.items()} == {k: v.shape for k, v in sd.items()}
    assert not any(k.startswith("attn_pool.") for k in gap.state_dict()) and gap.dim == 1024
    # DINOv3 ViT-B/16: Meta's ViT-L layout at 768 / 12 / 12 (hub/backbones.py dinov3_vitb16)
    assert len(v3b) == 188 and v3b["storage_tokens"].shape == (1, 4, 768) and "blocks.11.attn.qkv.bias_mask" in v3b
    assert "blocks.12.norm1.weight" not in v3b and v3b["rope_embed.periods"].shape == (16,)
    assert v3b_file.dim == 768 and v3b_file.heads == 12 and len(v3b_file.blocks) == 12
    assert v3b_file.norm.eps == 1e-5 and v3b_file.blocks[0].norm1.eps == 1e-5


def test_siglip_rejects_an_open_clip_file():
    with torch.device("meta"):
        sd = {"visual.trunk." + k: v for k, v in build_teacher("siglip", None).state_dict().items()}
    with pytest.raises(SystemExit, match="timm's SigLIP weights.*open_clip"):
        build_teacher("siglip", sd)


@pytest.mark.parametrize("name", ["siglip", "dinov3_vitb16"])
def test_new_teacher_shapes_frozen_and_round_trip(name, tmp_path):
    torch.manual_seed(0)
    teacher = load_teacher(name, None, "tiny", grid=4)
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
    loaded = load_teacher(name, str(tmp_path / "t.pth"), "tiny", grid=4)
    assert torch.equal(loaded(x), teacher(x))
    sd = teacher.state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match=r"missing keys blocks\.1\.attn\.qkv\.weight"):
        load_teacher(name, str(tmp_path / "bad.pth"), "tiny", grid=4)


def test_siglip_release_input_is_timms_eval_transform():
    """The release's path: short side to floor(256 / 0.9) = 284 px (bicubic), centre crop 256 (offset 14),
    mean = std = 0.5; so the teacher sees the central 256/284 of the image."""
    release = load_teacher("siglip", None, "tiny", grid=16)
    direct = load_teacher("siglip", None, "tiny", grid=16, release_input=False)
    grey = torch.full((2, 3, 256, 256), 0.3)  # [-1, 1] in, and mean = std = 0.5: a constant stays itself
    torch.testing.assert_close(release.preprocess(grey), grey, atol=1e-6, rtol=0)
    torch.testing.assert_close(direct.preprocess(grey), grey, atol=1e-6, rtol=0)
    # a horizontal ramp, linear in the pixel centres: cubic resampling keeps it linear away from the border,
    # so output column j shows the input at (j + 14 + 0.5) * 256 / 284 px
    ramp = ((torch.arange(256) + 0.5) / 256 * 2 - 1).expand(1, 3, 256, 256)
    out = release.preprocess(ramp)[0, 0, 100]
    j = torch.arange(256)
    expected = (j + 14 + 0.5) / 284 * 2 - 1
    assert out.shape == (256,) and torch.equal(direct.preprocess(ramp), ramp)
    torch.testing.assert_close(out[8:-8], expected[8:-8], atol=1e-5, rtol=0)
    assert release.preprocess(torch.zeros(1, 3, 128, 192)).shape == (1, 3, 256, 256)  # short side to 284, crop
    assert load_teacher("siglip", None, "tiny", grid=4).preprocess(ramp).shape == (1, 3, 64, 64)


# recorded from SiglipTeacher as written (issue 30) (torch 2.14.1 CPU); a change meant to change them rerecords
GOLDEN30 = {"release": [-0.6547852158546448, -0.09340895712375641, 1.3171306848526, -1.3517742156982422,
                        -0.3351857662200928, -1.397998571395874, -0.9594683051109314, 1.5009276866912842,
                        50.359458923339844],
            "direct": [-1.8640440702438354, -0.44096824526786804, 0.9287497401237488, -1.6485801935195923,
                       -0.6970083117485046, -0.8384884595870972, -0.7953179478645325, 1.0685654878616333,
                       -12.119440078735352]}


def siglip_golden_values():
    """A tiny random SigLIP (seeded), on both input paths, the direct one on a 3 x 3 grid (positions
    resampled from 16 x 16): a few numbers of each."""
    torch.manual_seed(0)
    teacher = load_teacher("siglip", None, "tiny", grid=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and biases off their init (ones / zeros), so that each one counts
        for p in teacher.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    release = teacher(x)
    teacher.release_input, teacher.grid = False, 3
    direct = teacher(x)
    assert release.shape == (2, 16, 64) and direct.shape == (2, 9, 64)
    w = torch.arange(64.0).cos()
    return {k: v[0, 0, :4].tolist() + v[1, -1, -4:].tolist() + [(v @ w).sum().item()]
            for k, v in (("release", release), ("direct", direct))}


def test_siglip_golden_forward():
    assert_close(siglip_golden_values(), GOLDEN30, "siglip", rel=1e-5, abs_=1e-6)


# SAM ViT-L and RADIOv2.5-L (paper Tab. 6): transformers' and NVIDIA's key names; the release builds both
# and runs neither, so their input paths and patch-token outputs are ours (README). Parity with transformers'
# SamVisionModel and NVlabs/RADIO's RADIOModel on random weights of the real shapes was exact (measured
# outside the tests, with their code, which the tests do not need)

SAM_LAYER = {f"{m}.{p}" for m in ("layer_norm1", "attn.qkv", "attn.proj", "layer_norm2", "mlp.lin1", "mlp.lin2")
             for p in ("weight", "bias")}
SAM_NECK = {"neck.conv1.weight", "neck.layer_norm1.weight", "neck.layer_norm1.bias", "neck.conv2.weight",
            "neck.layer_norm2.weight", "neck.layer_norm2.bias"}
RADIO_TOP = {"radio_model.input_conditioner.norm_mean", "radio_model.input_conditioner.norm_std",
             "radio_model.model.patch_generator.embedder.weight", "radio_model.model.patch_generator.pos_embed",
             "radio_model.model.patch_generator.cls_token.token"}


def sam_file(teacher):
    """A SamModel weight file as transformers saves facebook/sam-vit-*: the vision encoder under
    vision_encoder.*, with the absolute and relative positions the release's config drops (a window block's
    rel_pos 2 * 14 - 1 rows, a global one's 2 * 64 - 1), and the prompt encoder / mask decoder."""
    sd = {"vision_encoder." + k: v for k, v in teacher.state_dict().items()}
    sd["vision_encoder.pos_embed"] = torch.zeros(1, 64, 64, 8)
    for i, layer in enumerate(teacher.layers):
        rows = 2 * (layer.window or 64) - 1
        sd[f"vision_encoder.layers.{i}.attn.rel_pos_h"] = torch.zeros(rows, 4)
        sd[f"vision_encoder.layers.{i}.attn.rel_pos_w"] = torch.zeros(rows, 4)
    sd["prompt_encoder.point_embed.0.weight"] = torch.zeros(1, 256)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    sd["shared_image_embedding.positional_embedding"] = torch.zeros(2, 128)
    return sd


def save_safetensors(sd, path):
    """The safetensors layout (8-byte header length, JSON header, raw little-endian bytes), written here
    with torch and json alone, as huggingface_hub saves RADIO's model.safetensors."""
    header, blobs, offset = {}, [], 0
    for name, t in sd.items():
        raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_sam_and_radio_key_names_and_sizes_are_the_published_files():
    with torch.device("meta"):
        sam = load_teacher("sam")
        radio = load_teacher("radio")
        sd, rd = sam.state_dict(), radio.state_dict()
        # a file's sizes win over --teacher_size ("tiny"): windows and global blocks read off its rel_pos
        file = sam_file(sam)
        sam_from_file = build_teacher("sam", file)
        radio_file = dict(rd, **{"radio_model.summary_idxs": torch.zeros(4, dtype=torch.int64),
                                 "radio_model.adaptors.clip.head_mlp.final.weight": torch.zeros(8, 1024)})
        radio_from_file = build_teacher("radio", radio_file)
    # SAM-L: transformers' SamVisionEncoder less its positions (296 tensors), the 256-channel neck its output
    assert len(sd) == 296 and {k for k in sd if not k.startswith("layers.")} == SAM_NECK | {
        "patch_embed.projection.weight", "patch_embed.projection.bias"}
    assert all({k.split(".", 2)[2] for k in sd if k.startswith(f"layers.{i}.")} == SAM_LAYER for i in range(24))
    assert sd["patch_embed.projection.weight"].shape == (1024, 3, 16, 16) and sam.dim == 256
    assert [i for i, layer in enumerate(sam.layers) if layer.window == 0] == [5, 11, 17, 23]
    assert {layer.window for layer in sam.layers} == {0, 14} and sam.layers[0].heads == 16
    assert pretrained.sam_to_ours(file).keys() == sd.keys()
    assert [i for i, layer in enumerate(sam_from_file.layers) if layer.window == 0] == [5, 11, 17, 23]
    assert sam_from_file.state_dict().keys() == sd.keys() and sam_from_file.layers[3].window == 14
    # RADIOv2.5-L: NVIDIA's file less the summary indices and adaptor heads (293 tensors), no final norm
    assert len(rd) == 293 and {k for k in rd if ".blocks." not in k} == RADIO_TOP
    assert all({k.split(".", 4)[4] for k in rd if k.startswith(f"radio_model.model.blocks.{i}.")} == SIGLIP_BLOCK
               for i in range(24))
    assert rd["radio_model.model.patch_generator.pos_embed"].shape == (1, 128 * 128, 1024)
    assert rd["radio_model.model.patch_generator.cls_token.token"].shape == (8, 1024)
    assert rd["radio_model.model.patch_generator.embedder.weight"].shape == (1024, 768)
    assert pretrained.radio_to_ours(radio_file).keys() == rd.keys()
    assert radio_from_file.dim == 1024 and len(radio_from_file.blocks) == 24
    assert radio_from_file.blocks[0].heads == 16
    # ViT-H files (SAM's, RADIO's): 1280 wide, 16 heads of 80 channels (not 64)
    with torch.device("meta"):
        huge = {k: torch.empty(v.shape[:-1] + (1280,)) if k.endswith("pos_embed") else v for k, v in rd.items()}
        huge[pretrained.RADIO_PREFIX + "embedder.weight"] = torch.empty(1280, 768)
    assert pretrained.radio_size(huge, "tiny")["heads"] == 16
    assert pretrained.sam_size({f"vision_encoder.{k}": torch.empty(1280, *v.shape[1:])
                                if k == "patch_embed.projection.weight" else v for k, v in sd.items()},
                               "tiny")["heads"] == 16


def test_sam_and_radio_reject_other_files_in_one_line():
    with torch.device("meta"):
        meta_sam = {"image_encoder." + k: v for k, v in build_teacher("sam", None).state_dict().items()}
        dino = load_teacher("dinov2_vitl14", size="tiny").state_dict()
    with pytest.raises(SystemExit, match="SAM weights in transformers' layout.*segment-anything"):
        build_teacher("sam", meta_sam)
    with pytest.raises(SystemExit, match="RADIO weights in Hugging Face's layout.*cls_token"):
        build_teacher("radio", dino)


def test_sam_and_radio_load_their_files_frozen(tmp_path):
    """load_teacher: a SamModel .bin (prefix stripped, positions and the prompt / mask heads left out) and a
    RADIO .safetensors (read with torch alone; summary indices and adaptors left out) give the teacher that
    saved them; a missing tensor and a truncated file are one line; plumbing tells the files' kinds."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    sam = load_teacher("sam", None, "tiny", grid=4)
    radio = load_teacher("radio", None, "tiny", grid=4)
    with torch.no_grad():
        for p in [*sam.parameters(), *radio.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    torch.save(sam_file(sam), tmp_path / "sam.bin")
    rd = dict(radio.state_dict(), **{"radio_model.summary_idxs": torch.arange(4),
                                     "radio_model.adaptors.sam.feat_mlp.fc1.weight": torch.ones(3, 64)})
    save_safetensors(rd, tmp_path / "radio.safetensors")
    read = pretrained.read_safetensors(str(tmp_path / "radio.safetensors"))
    assert read.keys() == rd.keys() and all(torch.equal(read[k], rd[k]) for k in rd)
    for name, teacher, path in (("sam", sam, "sam.bin"), ("radio", radio, "radio.safetensors")):
        loaded = load_teacher(name, str(tmp_path / path), "tiny", grid=4)
        out = loaded(x)
        assert torch.equal(out, teacher(x)) and out.shape == (2, 16, teacher.dim) and not out.requires_grad
        assert not any(p.requires_grad for p in loaded.parameters())
        assert pretrained.TEACHERS[name].kind in plumbing.file_kinds(str(tmp_path / path))
    bad = sam_file(sam)
    del bad["vision_encoder.layers.1.attn.qkv.weight"]
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(SystemExit, match=r"missing keys layers\.1\.attn\.qkv\.weight"):
        load_teacher("sam", str(tmp_path / "bad.bin"), "tiny", grid=4)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "radio.safetensors").read_bytes()[:500])
    with pytest.raises(SystemExit, match="cut.safetensors is not a safetensors file, or a corrupt or truncated"):
        load_teacher("radio", str(tmp_path / "cut.safetensors"), "tiny", grid=4)


def test_sam_release_input_is_the_processors_and_windows_pad_the_map():
    """detok.py's SamImageProcessor call: uint8 (truncated), the longest edge to 256, ImageNet mean / std, then
    zeros to 256 x 256 at the bottom / right; the direct path: grid * 16 px. A 4 x 4 token map in 14 x 14
    windows: padded with zero tokens that the attention sees as keys, so unlike global attention."""
    sam = load_teacher("sam", None, "tiny", grid=16)
    mean, std = torch.tensor(pretrained.IMAGENET_MEAN), torch.tensor(pretrained.IMAGENET_STD)
    x = torch.full((1, 3, 256, 256), 2 * 0.5019 - 1)  # (x + 1) / 2 = 0.5019: 127.98 -> uint8 127
    torch.testing.assert_close(sam.preprocess(x)[0, :, 0, 0], (127 / 255 - mean) / std)
    wide = sam.preprocess(torch.zeros(1, 3, 128, 192))  # -> 171 x 256, then 85 rows of padding
    assert wide.shape == (1, 3, 256, 256) and torch.all(wide[:, :, 171:] == 0)
    torch.testing.assert_close(wide[0, :, 170, 0], (127 / 255 - mean) / std, atol=1 / 255 / 0.224, rtol=0)
    sam.release_input, sam.grid = False, 4
    direct = ((x[..., :64, :64] + 1) / 2 - mean.view(3, 1, 1)) / std.view(3, 1, 1)  # no uint8 step
    torch.testing.assert_close(sam.preprocess(x), direct)
    assert sam.preprocess(torch.zeros(1, 3, 128, 128)).shape == (1, 3, 64, 64)
    torch.manual_seed(0)
    layer = pretrained.SamBlock(8, 2, 16, window=14)
    tokens = torch.randn(1, 4, 4, 8)
    windowed = layer(tokens)
    layer.window = 0
    assert windowed.shape == (1, 4, 4, 8) and not torch.allclose(windowed, layer(tokens), atol=1e-3)
    layer.window = 2  # four 2 x 2 windows: each window's tokens alone
    local = layer(tokens)
    layer.window = 0
    torch.testing.assert_close(local[:, :2, :2], layer(tokens[:, :2, :2].contiguous()))


# recorded from SamTeacher / RadioTeacher as written (issue 30) (torch 2.14.1 CPU); a change meant to change
# them rerecords
GOLDEN_SAM_RADIO = {
    "sam release": [-0.6879881620407104, -0.009110996499657631, -0.16492702066898346, 0.8706825971603394,
                    0.3472053110599518, -1.453679084777832, -0.1809450387954712, 1.024857997894287,
                    203.95901489257812],
    "sam direct": [0.4584052860736847, -0.8366636633872986, -1.5445926189422607, -0.4308440685272217,
                   0.10081303119659424, -0.2566167712211609, -1.3742079734802246, 2.741122245788574,
                   281.7550048828125],
    "radio": [0.8138160109519958, -0.09192202985286713, 0.876921534538269, 0.2990722060203552,
              -0.21143431961536407, 0.0935911238193512, 0.023797377943992615, -1.1032155752182007,
              -9.555408477783203]}


def sam_radio_golden_values():
    """Tiny random SAM (both input paths) and RADIO (48 px: a 3 x 3 grid, its 128 x 128 positions resized),
    seeded, norms and biases off their init: a few numbers of each."""
    out = {}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    for name, grid in (("sam", 4), ("radio", 3)):
        torch.manual_seed(0)
        teacher = load_teacher(name, None, "tiny", grid=grid)
        with torch.no_grad():
            for p in teacher.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        paths = [("release", True), ("direct", False)] if name == "sam" else [("", True)]
        for path, release in paths:
            teacher.release_input = release
            v = teacher(x)
            assert v.shape == (2, grid * grid, teacher.dim)
            w = torch.arange(float(teacher.dim)).cos()
            out[f"{name} {path}".strip()] = v[0, 0, :4].tolist() + v[1, -1, -4:].tolist() + [(v @ w).sum().item()]
    return out


def test_sam_and_radio_golden_forward():
    assert_close(sam_radio_golden_values(), GOLDEN_SAM_RADIO, "sam / radio", rel=1e-5, abs_=1e-6)


def test_teacher_flag_takes_the_releases_names():
    """--teacher dinov3 / dinov3b / dinov2 (the release's names, its checkpoints' sem_decoders.<name>) are
    our dinov3_vitl16 / dinov3_vitb16 / dinov2_vitl14; sam, radio and siglip are the same in both."""
    names = train_tokenizer_script.teacher_names
    assert names("dinov3,siglip") == "dinov3_vitl16,siglip" and names("dinov3b") == "dinov3_vitb16"
    assert names("dinov2") == "dinov2_vitl14" and names("sam,radio") == "sam,radio"
    for bad in ("dinov3,dinov3_vitl16", "sam2", "judge,sam"):
        with pytest.raises(Exception, match="comma-separated and each once"):
            names(bad)

def test_semantic_loss_trains_encoder_never_teacher():
    import train_tokenizer as tt
    torch.manual_seed(0)
    m = tiny_tokenizer(teacher_dim=64).train()
    teacher = load_teacher("dinov3_vitl16", None, "tiny", grid=4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    _, _, pred, ids_keep = m(x)
    tt.semantic_loss(pred, teacher(x), ids_keep).backward()
    assert m.encoder.latent_head.weight.grad.abs().sum() > 0
    assert m.encoder.transformer[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.decoder.parameters())  # only the semantic path was used
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Training stages 1 and 2 (train_tokenizer.py, finetune_decoder.py, data.py)


def test_tokenizer_loss_falls_on_a_fixed_batch():
    import train_tokenizer as tt
    torch.manual_seed(0)
    m = tiny_tokenizer(img=32, patch_size=8, teacher_dim=64).train()
    teacher = load_teacher("dinov2_vitl14", None, "tiny", grid=4)
    perceptual, disc = pretrained.Perceptual(0.0, True), pretrained.patchgan()
    args = type("A", (), dict(rec_weight=1.0, perceptual_weight=1.0, kl_weight=1e-6, sem_weight=1.0, disc_weight=0.5,
                              sem_target="all"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.stack([demo.Shapes(4, 32)[i][0] for i in range(4)])
    target = teacher(x)  # a frozen teacher on a fixed batch: the same targets at every step
    assert torch.equal(teacher(x), target)
    losses = []
    for _ in range(10):  # two windows of 5 steps (seen: the last 5 at 5% of the first 5)
        x_hat, kl, pred, ids_keep = m(x)
        loss = sum(tt.generator_losses(args, x, x_hat, kl, pred, target, ids_keep, perceptual, disc, True).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(p.grad is None for p in disc.parameters())  # the generator step never trains the discriminator


def as_rank(rank, world, port):
    """The variables torchrun gives rank `rank` of `world`, on the rendezvous port `port`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def script_rank(rank, script, argv, port):
    """Rank `rank` of 2 (run by ranks()): `script`'s main(argv)."""
    as_rank(rank, 2, port)
    main_of(importlib.import_module(script), argv)


def train_rank(rank, world, argv, crash, port=None):
    """One rank of a tokenizer run (two run by ranks()); crash: die at the start of the second
    step of epoch 2, after the epoch-1 checkpoint and the log row of the step past it."""
    import train_tokenizer as tt
    if world > 1:
        as_rank(rank, world, port)
    lr = tt.cosine_lr

    def lr_or_crash(epoch_frac, *rest):
        if crash and epoch_frac >= 1.5:
            raise KeyboardInterrupt
        return lr(epoch_frac, *rest)
    tt.cosine_lr = lr_or_crash
    try:
        main_of(tt, argv)
    except KeyboardInterrupt:
        assert crash
        if torch.distributed.is_initialized():  # as the crashed process would: its process group gone
            torch.distributed.destroy_process_group()
    finally:
        tt.cosine_lr = lr


def train_ranks(rank, world, runs, ports):
    """Rank `rank` of `world`: the tokenizer runs (argv, crash, folder to copy the run's files to after it or
    None) one after another in this process, each on its own rendezvous port (on the last one's, a rank can
    reach the store of the run before as rank 0 takes it down)."""
    import shutil
    for (argv, crash, copy_to), port in zip(runs, ports):
        train_rank(rank, world, argv, crash, port)
        if copy_to and rank == 0:
            shutil.copytree(argv[argv.index("--out_dir") + 1], copy_to)


@pytest.mark.parametrize("workers,world,order", [(0, 1, []), (2, 1, ["--reshuffle"]), (2, 2, [])])
def test_resume_follows_the_same_trajectory(workers, world, order, tmp_path, ranks):
    argv = TINY_TRAIN + ["--epochs", "2", "--disc_start_epoch", "1", "--workers", str(workers)] + order  # 2 x 2 steps

    # with 2 ranks, one launch: the run, the crashed run (its files copied as the crash left them), the resumed run
    runs = [(argv + ["--out_dir", str(tmp_path / "a")], False, None),
            (argv + ["--out_dir", str(tmp_path / "b")], True, str(tmp_path / "b_crashed")),
            (argv + ["--out_dir", str(tmp_path / "b")], False, None)]
    if world > 1:
        ranks(train_ranks, (world, runs, [free_port() for _ in runs]))
    else:
        train_ranks(0, 1, runs, [None] * len(runs))
    assert models.read_checkpoint(str(tmp_path / "b_crashed" / "tokenizer.pt"))["step"] == 2
    assert '"step": 3' in (tmp_path / "b_crashed" / "metrics.jsonl").read_text()  # logged, then lost in the crash
    a, b = (models.read_checkpoint(str(tmp_path / d / "tokenizer.pt")) for d in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "model_ema", "disc"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    records = {d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in "ab"}
    for rows in records.values():
        for r in rows:
            r.pop("img_per_sec", None)
    assert records["a"] == records["b"]  # one row per step, every loss the uninterrupted run's
    assert [r["step"] for r in records["a"]] == [1, 2, 2, 3, 4, 4]  # the epoch-end rows: held-out PSNR
    assert {"step", "epoch", "loss", "rec", "perceptual", "kl", "sem", "lr", "grad_norm"} <= set(records["a"][0])
    assert "gan" in records["a"][-2] and "disc" in records["a"][-2]
    assert os.path.exists(tmp_path / "a" / "tokenizer_recon_epoch0002.png")
    assert f"{world} process(es)" in (tmp_path / "b" / "tokenizer.log").read_text()
    if world > 1:
        assert "weights identical on 2 ranks" in (tmp_path / "b" / "tokenizer.log").read_text()


def test_per_process_batch_is_derived_from_the_global_batch_and_world_size(monkeypatch):
    assert plumbing.per_process_batch(16, 2, 64) == 8 and plumbing.per_process_batch(1024, 8, 64) == 64
    assert plumbing.per_process_batch(1024, 3, 64) is None and plumbing.per_process_batch(96, 1, 64) == 48
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it: checked before any process group or model
    with pytest.raises(SystemExit, match="--global_batch 16 cannot be split over 3 processes"):
        main_of(importlib.import_module("train_tokenizer"), ["--demo"])
    with pytest.raises(SystemExit, match=r"--batch_size x processes = 4 x 3"):
        main_of(importlib.import_module("train_dit"), ["--demo", "--global_batch", "20", "--batch_size", "4"])


def test_every_demo_stage_runs_under_torchrun_with_two_processes(tmp_path, ranks):
    """The README's demo commands under `torchrun --nproc_per_node=2` (no --batch_size: derived), made tiny; one
    launch runs the four in turn (stages_in_one_launch, at the end of this file)."""
    out = ["--out_dir", str(tmp_path), "--demo_images", "32", "--epochs", "1", "--log_every", "1"]
    tiny_teacher = ["--teacher", "dinov2_vitl14", "--teacher_size", "tiny"]  # the judge would take minutes here
    stages = [("train_tokenizer", ["--demo", *out, *tiny_teacher]), ("finetune_decoder", ["--demo", *out]),
              ("train_dit", ["--demo", *out, "--global_batch", "16", "--sample_steps", "3"]),
              ("sample", ["--demo", "--out_dir", str(tmp_path), "--num_images", "6", "--steps", "3"])]
    with both_cores(ranks.aside):  # two ranks of its own: the side process stops as for ranks()
        r = run("test_smoke.py", json.dumps([(script, argv, free_port()) for script, argv in stages]), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("tokenizer", "tokenizer_ft", "dit", "sample"):
        assert re.search(rf"\[{stage}\] 2 process\(es\) on cpu", r.stderr), stage
    assert "global batch 16 = 8/GPU x 2 x 1 accumulation" in (tmp_path / "tokenizer_ft.log").read_text()
    assert "global batch 16 = 8/GPU x 2 x 1 accumulation" in (tmp_path / "dit.log").read_text()
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (6, 32, 32, 3)


def test_progress_lines_have_a_rate_and_the_time_left(caplog):
    caplog.set_level("INFO", logger="rectok")
    quiet = plumbing.Progress("latent statistics", 10, every=1e9)
    quiet.update(4)
    assert not caplog.records  # not before `every` seconds have passed
    quiet.update(6)
    assert caplog.records[-1].getMessage().startswith("latent statistics: 10/10 images, ")  # the end is always logged
    chatty = plumbing.Progress("sampling", 100, every=0)
    chatty.update(25)
    assert re.fullmatch(r"sampling: 25/100 images, [0-9.e+]+ images/s, [0-9.]+ min left", caplog.records[-1].getMessage())


def nan_images(monkeypatch, which):
    """Training images (the built-in set with seed 0) whose index is in `which` become NaN."""
    render = demo.Shapes.__getitem__

    def getitem(self, i):
        x, label = render(self, i)
        return (torch.full_like(x, math.nan) if self.seed == 0 and i in which else x), label
    monkeypatch.setattr(demo.Shapes, "__getitem__", getitem)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    import train_tokenizer as tt
    nan_images(monkeypatch, {5})  # one NaN image: one of the 2 steps of the epoch
    argv = TINY_TRAIN + ["--disc_start_epoch", "0", "--out_dir", str(tmp_path), "--epochs"]
    main_of(tt, argv + ["1"])
    ckpt = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))
    for key in ("model", "model_ema", "disc"):
        assert all(v.isfinite().all() for v in ckpt[key].values() if v.is_floating_point()), key
    for key in ("opt", "opt_disc"):  # one step applied, the other skipped whole: moments and count untouched
        assert {s["step"].item() for s in ckpt[key]["state"].values()} == {1.0}
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert sorted(r["skipped"] for r in rows) == [0, 1]
    assert [math.isnan(r["loss"]) for r in rows] == [r["skipped"] == 1 for r in rows]
    assert "skipped 1" in (tmp_path / "tokenizer.log").read_text()
    nan_images(monkeypatch, set(range(16)))  # every step non-finite: the run stops, the checkpoint stays
    monkeypatch.setattr(plumbing, "SKIPPED_IN_A_ROW", 2)
    with pytest.raises(SystemExit, match=r"^2 non-finite steps in a row .* stopped; the last good checkpoint is "
                                         r".*tokenizer.pt \("):
        main_of(tt, argv + ["3"])
    assert models.read_checkpoint(str(tmp_path / "tokenizer.pt"))["step"] == 2


def test_skipped_step_changes_nothing_and_a_finite_one_is_the_plain_step():
    import copy
    import train_dit
    from types import SimpleNamespace
    dit = randomise(tiny_dit())
    ref = copy.deepcopy(dit)
    step = train_dit.DiTStep(SimpleNamespace(lr=1e-3, ema=0.9, grad_clip=1.0, compile=False, grad_ckpt=False), dit,
                             torch.device("cpu"), 1)
    z, y = torch.randn(4, 4, 4, 4), torch.arange(4)
    # a finite step: bit-identical to the step without the skip (clip, AdamW step, EMA lerp by a scalar)
    ref_ema = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.0, fused=True)
    torch.manual_seed(0)
    models.flow_loss(ref, z, y).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ref_ema.parameters()), [p.detach() for p in ref.parameters()], 1 - 0.9)
    torch.manual_seed(0)
    assert step([(z, y)], 1e-3)[2]
    for a, b in ((dit, ref), (step.ema, ref_ema)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # a NaN batch: weights, EMA, AdamW moments and step count all stay
    before = copy.deepcopy((dit.state_dict(), step.ema.state_dict(), step.opt.state_dict()))
    assert not step([(z * math.nan, y)], 1e-3)[2]
    after = (dit.state_dict(), step.ema.state_dict(), step.opt.state_dict())
    for b, a in zip(before[:2], after[:2]):
        assert all(torch.equal(b[k], a[k]) for k in b)
    for s in before[2]["state"]:
        assert all(torch.equal(before[2]["state"][s][k], after[2]["state"][s][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # fused AdamW (CUDA's) takes the flag on the device: the same skip, and a finite step equals opt.step()
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [torch.optim.AdamW(ps, lr=1e-2, fused=True) for ps in (params, copies)]
    for grad in (torch.randn(8), torch.full((8,), math.nan)):
        for ps in (params, copies):
            for p in ps:
                p.grad = grad.clone()
        opts[0].found_inf = (~torch.tensor(grad.isfinite().all().item())).float()  # as the training steps skip
        opts[0].step()
        if grad.isfinite().all():
            opts[1].step()
        assert all(torch.equal(p, q) for p, q in zip(params, copies))
        assert all(torch.equal(opts[0].state[p]["step"], opts[1].state[q]["step"]) for p, q in zip(params, copies))
        assert all(torch.equal(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"]) for p, q in zip(params, copies))


def test_sigterm_stops_inside_the_epoch_and_the_resumed_run_is_the_same(tmp_path, monkeypatch):
    """A SIGTERM sent to the training process during step 2 (its real handler, sent in-process): the step
    finishes, a checkpoint inside the epoch is written, the run exits with status 0; the same command resumes
    from there and ends bit-identical to an uninterrupted run, with the same metric rows."""
    import train_tokenizer as tt
    argv = TINY_TRAIN + ["--demo_images", "32", "--epochs", "1", "--disc_start_epoch", "0"]  # 4 steps, GAN on
    main_of(tt, argv + ["--out_dir", str(tmp_path / "a")])
    lr = tt.cosine_lr

    def lr_and_signal(epoch_frac, *rest):  # what SLURM / torchrun send, arriving during the second step
        if epoch_frac == 0.25:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr(epoch_frac, *rest)
    monkeypatch.setattr(tt, "cosine_lr", lr_and_signal)
    with pytest.raises(SystemExit) as e:
        main_of(tt, argv + ["--out_dir", str(tmp_path / "b")])
    assert e.value.code == 0  # a clean exit
    assert "stopped on a signal after step 2" in (tmp_path / "b" / "tokenizer.log").read_text()
    ckpt = models.read_checkpoint(str(tmp_path / "b" / "tokenizer.pt"))
    assert ckpt["epoch"] == 0 and 0 < ckpt["epoch_step"] < 4 and ckpt["step"] == ckpt["epoch_step"]
    assert ckpt["epoch_step"] == 2  # the signalled step finished, the next one did not start
    monkeypatch.setattr(tt, "cosine_lr", lr)
    main_of(tt, argv + ["--out_dir", str(tmp_path / "b")])
    assert f"({ckpt['epoch_step']} steps into the epoch)" in (tmp_path / "b" / "tokenizer.log").read_text()
    ends = [models.read_checkpoint(str(tmp_path / d / "tokenizer.pt")) for d in "ab"]
    for key in ("model", "model_ema", "disc"):
        assert all(torch.equal(ends[0][key][k], ends[1][key][k]) for k in ends[0][key]), key
    records = {d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in "ab"}
    for rows in records.values():
        for r in rows:
            r.pop("img_per_sec", None)
    assert records["a"] == records["b"] and len(records["a"]) == 5  # 4 steps, the held-out row


def test_resume_on_another_number_of_ranks(tmp_path, ranks):
    import train_tokenizer as tt
    argv = TINY_TRAIN + ["--disc_start_epoch", "1", "--out_dir", str(tmp_path), "--epochs"]
    ranks(train_rank, (2, argv + ["1"], False, free_port()))  # 8 = 4/GPU x 2 ranks
    train_rank(0, 1, argv + ["2"], False)  # 8 = 4 x 1 rank x 2 accumulation
    log_text = (tmp_path / "tokenizer.log").read_text()
    assert "resuming 2 process(es)' run on 1" in log_text and "4/GPU x 1 x 2 accumulation" in log_text
    ckpt = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))
    assert ckpt["step"] == 4
    assert {s["step"].item() for s in ckpt["opt"]["state"].values()} == {4.0}  # AdamW continued
    assert {s["step"].item() for s in ckpt["opt_disc"]["state"].values()} == {2.0}  # the GAN from epoch 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    base = 1.6e-2 * 8 / 256
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(tt.cosine_lr(1.0, base, int(0.1 * 2), 2), abs=1e-6)  # a 2-epoch run's
    assert all(math.isfinite(r["loss"]) and r["gan"] != 0 for r in rows[2:])


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    import train_tokenizer as tt
    argv = TINY_TRAIN + ["--out_dir", str(tmp_path), "--epochs"]
    main_of(tt, argv + ["1"])
    good = (tmp_path / "tokenizer.pt").read_bytes()

    def full_disk(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"^could not write .*tokenizer.pt \(\[Errno 28\] No space left on device\); "
                                         r"the previous checkpoint is intact") as e:
        main_of(tt, argv + ["2"])
    assert "\n" not in str(e.value)
    assert (tmp_path / "tokenizer.pt").read_bytes() == good and not (tmp_path / "tokenizer.pt.tmp").exists()


@pytest.mark.parametrize("order,warmup_rate,warmup_epochs", [([], 0.5, 1), (["--reshuffle"], 0.3, 0)])
def test_whole_epoch_warmup_and_the_release_data_order(order, warmup_rate, warmup_epochs, tmp_path, monkeypatch):
    """Warm-up: int(warmup_rate * epochs) whole epochs (1 for 1.5, none for 0.9). Data order: one permutation for
    every epoch unless --reshuffle (the release never calls set_epoch)."""
    import train_tokenizer as tt
    seen, getitem = [], demo.Shapes.__getitem__

    def record(self, i):  # the training images (Shapes seed 0) in the order the loader asks for them
        if self.seed == 0:
            seen.append(i)
        return getitem(self, i)
    monkeypatch.setattr(demo.Shapes, "__getitem__", record)
    main_of(tt, TINY_TRAIN + ["--epochs", "3", "--warmup_rate", str(warmup_rate), "--out_dir", str(tmp_path)] + order)
    epochs = [seen[16 * e:16 * (e + 1)] for e in range(3)]  # 16 images, 2 steps of 8 per epoch
    assert all(sorted(e) == list(range(16)) for e in epochs)
    assert (epochs[0] == epochs[1] == epochs[2]) != bool(order)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    lrs = [r["lr"] for r in rows if "lr" in r]
    base = 1.6e-2 * 8 / 256  # the demo's blr at global batch 8
    expected = [tt.cosine_lr(s / 2, base, warmup_epochs, 3) for s in range(6)]
    assert lrs == pytest.approx(expected, abs=1e-6)  # the log rounds to 6 decimals
    assert (lrs[0] == 0) == (warmup_epochs > 0)  # the fractional 1.5 and 0.9 epochs would differ at steps 2 and 0


def test_loss_networks_run_in_fp32_unless_asked(tmp_path):
    import train_tokenizer as tt
    from types import SimpleNamespace
    m = tiny_tokenizer(img=32, patch_size=8, teacher_dim=0)
    x = torch.stack([demo.Shapes(2, 32)[i][0] for i in range(2)])
    for bf16_losses, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        args = SimpleNamespace(compile=False, grad_ckpt=False, blr=1e-4, global_batch=2, convnext_weight=0.0, ema=0.9, random_frozen_nets=True,
                               weight_decay=0.0, grad_clip=3.0, rec_weight=1.0, perceptual_weight=1.0, kl_weight=0.0,
                               sem_weight=0.0, disc_weight=0.1, bf16_losses=bf16_losses)
        step = tt.TokenizerStep(args, m, copy.deepcopy(m).eval().requires_grad_(False), None, torch.device("cpu"), 1)
        step.autocast = torch.autocast("cpu", torch.bfloat16)  # as on a GPU
        seen = []
        for net in (step.perceptual.lpips.net.slice1, step.disc):  # lpips calls its VGG's forward(), not the module
            net.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        step([x], 1e-4, True)
        assert len(seen) == 5 and set(seen) == {dtype}  # VGG on x and x_hat; D(x_hat) for G; D(x), D(x_hat) for D


def test_release_defaults_and_milestones(tmp_path):
    import train_tokenizer as tt
    parser = __import__("argparse").ArgumentParser()
    tt.common_args(parser)  # both stages' flags
    assert parser.parse_args([]).disc_weight == 0.1  # the GAN weight the release trains with
    main_of(tt, TINY_TRAIN + ["--epochs", "3", "--save_every", "2", "--out_dir", str(tmp_path)])
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["tokenizer.pt", "tokenizer_epoch0001.pt"]
    assert models.read_checkpoint(str(tmp_path / "tokenizer_epoch0001.pt"))["epoch"] == 2


def test_finetune_changes_only_the_pixel_decoder(tmp_path):
    import finetune_decoder as fd
    import train_tokenizer as tt
    main_of(tt, TINY_TRAIN + ["--epochs", "1", "--out_dir", str(tmp_path)])
    main_of(fd, TINY_FT + ["--epochs", "1", "--out_dir", str(tmp_path)])
    before = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))["model"]
    after = models.read_checkpoint(str(tmp_path / "tokenizer_ft.pt"))["model"]
    assert not any(k.startswith("sem_decoder") for k in after)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert "decoder.conv_out.weight" in changed and "decoder.mask_token" not in changed
    ft = pretrained.load_tokenizer(str(tmp_path / "tokenizer_ft.pt"))
    assert ft.sem_decoder is None and ft.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 4, 4)


class StubWandb:
    """Records what the training scripts send to Weights & Biases, without the package or a network."""

    def __init__(self):
        self.inits, self.logged, self.run = [], [], type("Run", (), {"summary": {}})()

    def init(self, **kw):
        self.inits.append(kw)

    def log(self, record, step=None, commit=True):
        self.logged.append((record, step, commit))

    def Image(self, path):
        assert os.path.isfile(path)
        return ("image", path)


def test_wandb_gets_the_metrics_records_and_grids(tmp_path, monkeypatch):
    import train_tokenizer as tt
    stub = StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.setattr(plumbing, "wandb", None)
    main_of(tt, TINY_TRAIN + ["--epochs", "1", "--out_dir", str(tmp_path), "--wandb", "rectok-test"])
    assert stub.inits[0]["project"] == "rectok-test" and stub.inits[0]["config"]["epochs"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    scalars = [(r, step) for r, step, commit in stub.logged if commit]
    assert len(scalars) == len(rows) >= 3
    for row, (sent, step) in zip(rows, scalars):
        assert step == row["step"] and sent == {f"tokenizer/{k}": v for k, v in row.items() if k != "stage"}
    assert [r for r, _, commit in stub.logged if not commit] == [
        {"tokenizer_recon_epoch0001": ("image", str(tmp_path / "tokenizer_recon_epoch0001.png"))}]


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    import train_dit
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    tokenizer_file(tmp_path / "tokenizer_ft.pt")
    with pytest.raises(SystemExit, match="--wandb: the wandb package is not installed"):
        main_of(train_dit, ["--demo", "--out_dir", str(tmp_path), "--wandb", "p"])


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


def test_bad_input_is_a_one_line_error():
    """At the command line, as a user meets it (a process per case, the three side by side): a non-zero exit,
    no traceback, and the flag named on the last line."""
    cases = [(["--data", "/no/such/folder"], "--data"), (["--noise_schedule", "cosine"], "--noise_schedule"),
             (["--demo", "--global_batch", "10", "--batch_size", "4"], "--global_batch")]
    procs = [subprocess.Popen(command("train_tokenizer.py", *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=HERE) for argv, _ in cases]
    for (argv, needle), proc in zip(cases, procs):
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode != 0 and "Traceback" not in stderr, (argv, stderr)
        assert needle in stderr.strip().splitlines()[-1], (argv, stderr)


@pytest.mark.parametrize("script,argv,needle", [
    ("train_tokenizer", ["--dim", "7"], "argument --dim: invalid choice: 7"),
    ("train_tokenizer", ["--dim", "0"], "argument --dim: invalid choice: 0"),
    ("train_tokenizer", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    ("train_tokenizer", ["--batch_size", "-4"], "--batch_size -4: must be >= 1"),
    ("train_tokenizer", ["--global_batch", "0"], "--global_batch 0: must be >= 1"),
    ("train_tokenizer", ["--epochs", "0"], "--epochs 0: must be >= 1"),
    ("train_tokenizer", ["--blr", "-1"], "--blr -1.0: must be >= 0"),
    ("train_tokenizer", ["--warmup_rate", "2"], "--warmup_rate 2.0: must be in [0, 1]"),
    ("train_tokenizer", ["--ema", "1.5"], "--ema 1.5: must be in [0, 1]"),
    ("train_tokenizer", ["--img_size", "30"], "--img_size 30 is not a multiple of --patch_size 8"),
    ("train_tokenizer", ["--eval_images", "0"], "--eval_images 0: must be >= 1"),
    ("finetune_decoder", ["--epochs", "-1"], "--epochs -1: must be >= 1"),
    ("train_dit", ["--epochs", "-1"], "--epochs -1: must be >= 0"),
    ("train_dit", ["--lr", "-0.1"], "--lr -0.1: must be >= 0"),
    ("train_dit", ["--cfg", "0.5"], "--cfg 0.5: must be >= 1"),
    ("train_dit", ["--sample_steps", "1"], "--sample_steps 1: must be >= 2"),
    ("sample", ["--num_images", "0"], "--num_images 0: must be >= 1"),
    ("sample", ["--steps", "1"], "--steps 1: must be >= 2"),
    ("sample", ["--per_proc_batch", "0"], "--per_proc_batch 0: must be >= 1"),
    ("evaluate", ["--batch_size", "0"], "--batch_size 0: must be >= 1")])
def test_bad_numeric_flag_is_one_line_naming_it(script, argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert needle in one_line_exit(script, ["--demo"] + argv, capsys)


def test_missing_inputs_are_reported_together_before_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = one_line_exit("train_tokenizer", ["--dim", "128", "--batch_size", "0"], capsys)
    for needle in ("--batch_size 0", "--out_dir is needed outside --demo", "--data is required", "--teacher_ckpt"):
        assert needle in msg
    msg = one_line_exit("sample", ["--out_dir", "run"], capsys)
    assert "--dit run/dit.pt: should be a DiT^DH checkpoint; it is missing" in msg and "--tokenizer run/tokenizer_ft.pt" in msg
    assert not os.path.exists(tmp_path / "run")  # stopped before setup made the folder


def test_file_flags_say_what_the_file_should_be_and_is(tmp_path, capsys):
    tok = tokenizer_file(tmp_path / "tokenizer_ft.pt")
    (tmp_path / "cut.pt").write_bytes(open(tok, "rb").read()[:5000])  # a truncated copy
    demo = ["--demo", "--out_dir", str(tmp_path)]
    for script, argv, needle in (
            ("train_dit", ["--latent_stats", tok], f"--latent_stats {tok}: should be latent statistics; it is a tokenizer"),
            ("sample", ["--latent_stats", tok], f"--latent_stats {tok}: should be latent statistics; it is a tokenizer"),
            ("train_dit", ["--inception", "/missing.pth"], "--inception /missing.pth: should be FID Inception weights; it is missing"),
            ("train_dit", ["--fid_ref", tok], f"--fid_ref {tok}: should be an .npz or a folder; it is a tokenizer"),
            ("train_tokenizer", ["--teacher_ckpt", tok], f"--teacher_ckpt {tok}: should be DINOv2/v3 weights; it is a tokenizer"),
            ("finetune_decoder", ["--tokenizer", str(tmp_path / "cut.pt")], "corrupt or truncated"),
            ("evaluate", ["--tokenizer", str(tmp_path / "cut.pt"), "--data", str(tmp_path)], "delete it")):
        assert needle in one_line_exit(script, argv + demo, capsys), script


@pytest.mark.parametrize("torch_v,vision_v,lpips_ok,needle", [
    ("2.13.0+cpu", "0.28.0+cu130", True, "torch 2.13.0+cpu and torchvision 0.28.0+cu130 do not go together "
                                         "(a CPU-only torch needs torchvision's CPU-only build)"),
    ("2.13.0+cpu", "0.29.1+cpu", True, "(torch 2.13 needs torchvision 0.28)"),
    ("2.14.1", "0.28.0", True, "(torch 2.14 needs torchvision 0.29)"),
    ("2.14.1", None, True, "torchvision is not installed"),
    ("2.14.1", "0.29.1", False, "lpips is not installed")])
def test_a_broken_install_is_one_line_at_start_up(torch_v, vision_v, lpips_ok, needle, tmp_path, monkeypatch,
                                                   capsys):
    problem = plumbing.install_problem(torch_v, vision_v, lpips_ok)
    assert needle in problem and "pip install" in problem
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plumbing, "install_problem", lambda *a: problem)
    for script in ("train_tokenizer", "finetune_decoder", "train_dit", "sample", "evaluate"):
        assert one_line_exit(script, ["--demo"], capsys) == problem, script
    assert not os.path.exists(tmp_path / "out")  # stopped before anything was made


@pytest.mark.parametrize("torch_v,vision_v", [("2.14.1", "0.29.1"), ("2.14.1+cu130", "0.29.1+cu130"),
                                              ("2.14.1+cpu", "0.29.1+cpu"), ("2.14.1+cu130", "0.29.1")])
def test_matching_pairs_pass_the_install_check(torch_v, vision_v):
    assert plumbing.install_problem(torch_v, vision_v, True) is None
    plumbing.check_install()  # this environment's pair


def test_requirements_pin_the_tested_pair_and_ci_runs_the_readme():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        pins = f.read().split()
    assert plumbing.TESTED_PAIR.split() == [p for p in pins if p.startswith(("torch==", "torchvision=="))]
    with open(os.path.join(HERE, ".ci", "run")) as f:
        ci = f.read()
    assert "README.md" in ci and "pip install" not in ci  # no install step of CI's own
    readme = open(os.path.join(HERE, "README.md")).read()
    quick = readme[readme.index("## Quick start"):]
    block = quick[quick.index("```bash\n") + len("```bash\n"):]
    demo, tests = block[:block.index("\n```")].split("\n")
    stages = ["train_tokenizer", "finetune_decoder", "train_dit", "sample", "evaluate"]
    assert demo.split(" && ") == ["pip install -r requirements.txt"] + [f"python {s}.py --demo" for s in stages]
    assert tests == "pip install -r requirements.txt pytest && python -m pytest -q test_smoke.py"


def test_resume_refuses_another_model_configuration(tmp_path):
    import train_tokenizer as tt
    torch.save({"args": {"dim": 32, "img_size": 32, "enc_size": "demo"}}, tmp_path / "tokenizer.pt")
    with pytest.raises(SystemExit, match=r"tokenizer.pt was trained with other settings: --dim 32 \(checkpoint\) "
                                         r"vs 16; give another --out_dir"):
        main_of(tt, TINY_TRAIN + ["--out_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# DiT^DH and the sampler (models.py, train_dit.py, sample.py)


def test_shapes_and_zero_init():
    model = tiny_dit().eval()
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 9, 10])  # 10 = null label
    v = model(x, t, y)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero + zero final layer
    assert randomise(model)(x, t, y).abs().max() > 0


def test_label_dropout_only_in_training():
    model = randomise(tiny_dit())
    x, t, y = torch.randn(64, 4, 4, 4), torch.rand(64), torch.zeros(64, dtype=torch.long)
    null = model.eval()(x, t, torch.full_like(y, 10))
    torch.manual_seed(0)
    dropped = (model.train()(x, t, y) - null).flatten(1).abs().amax(1) < 1e-6
    assert 0 < dropped.sum() < 20  # p = 0.1 replaces a label by the null row
    assert not ((model.eval()(x, t, y) - null).flatten(1).abs().amax(1) < 1e-6).any()


@pytest.mark.parametrize("size,count", [("S", 193_587_924), ("B", 291_182_292), ("L", 618_466_996), ("XL", 835_316_436)])
def test_dit_param_counts(size, count):
    with torch.device("meta"):
        model = models.DiTDH(size, dim=128)
    assert sum(p.numel() for p in model.parameters()) == count


def test_time_grid():
    g = time_grid(8, (128, 16, 16))  # s = sqrt(8)
    assert len(g) == 8 and g[0] == 0 and g[-1] == 1
    assert torch.allclose(g, 1 - (math.sqrt(8) * torch.linspace(0, 1, 8) / (1 + (math.sqrt(8) - 1) * torch.linspace(0, 1, 8))).flip(0))
    assert (g.diff()[1:] > g.diff()[:-1]).all()  # small steps near noise
    assert torch.allclose(time_grid(5, (16, 16, 16)), torch.linspace(0, 1, 5))  # s = 1


class PointMass(torch.nn.Module):
    """Exact velocity for data concentrated at m (per class): v = (m - x) / (1 - t). Euler lands
    exactly on m at the last step, whatever the grid, because that step has dt = 1 - t."""

    num_classes = 2

    def __init__(self, means):
        super().__init__()
        self.means, self.calls = means, 0

    def forward(self, x, t, y):
        self.calls += 1
        return (self.means[y] - x) / (1 - t).view(-1, 1, 1, 1)


def test_euler_reaches_point_mass_and_guidance():
    means = torch.stack([torch.full((4, 4, 4), 2.0), torch.full((4, 4, 4), -1.0), torch.zeros(4, 4, 4)])  # row 2 = null
    noise, labels = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    dit = PointMass(means)
    x = euler_sample(dit, noise, labels, steps=6)
    assert dit.calls == 5  # 6 grid points -> 5 Euler updates
    assert torch.allclose(x, means[labels], atol=1e-5)
    assert torch.equal(euler_sample(dit, noise, labels, 6, cfg=1.0), x)  # cfg 1 = conditional sample
    # CFG and AutoGuidance extrapolate the velocities, so they land on m_bad + w (m_good - m_bad)
    assert torch.allclose(euler_sample(dit, noise, labels, 6, cfg=1.5), 1.5 * means[labels], atol=1e-4)
    guide = PointMass(means * 0.5)
    assert torch.allclose(euler_sample(dit, noise, labels, 6, cfg=1.29, guide=guide), 1.145 * means[labels], atol=1e-4)


def test_cfg_one_equals_conditional_on_dit():
    model = randomise(tiny_dit()).eval()
    noise, labels = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    cond = euler_sample(model, noise, labels, 4)
    assert torch.equal(euler_sample(model, noise, labels, 4, cfg=1.0), cond)
    assert not torch.allclose(euler_sample(model, noise, labels, 4, cfg=2.0), cond)


def test_flow_loss_falls():
    model = tiny_dit(dim=4, grid=4).train()
    torch.manual_seed(0)
    latents, labels = 2 + 0.1 * torch.randn(8, 4, 4, 4), torch.arange(8) % 10  # learnable mean
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = models.flow_loss(model, latents, labels)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_load_roundtrip_and_release_layout(tmp_path):
    model = randomise(tiny_dit(num_classes=10))
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([3, 10])
    ours = tmp_path / "ours.pt"
    model_args = dict(model.model_args, label_drop=0.0)  # not in the tensors
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "model_args": model_args,
                "args": {"model": "tiny"}, "latent_stats": (1, 2)}, ours)
    loaded, extra = pretrained.load_dit(ours)
    assert (loaded.size, loaded.dim, loaded.grid, loaded.num_classes, loaded.training) == ("tiny", 4, 4, 10, False)
    assert loaded.label_drop == 0.0
    assert extra == {"model_args": model_args, "args": {"model": "tiny"}, "latent_stats": (1, 2)}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))
    # the authors' release: "model" also holds RoPE buffers, "model_ema" holds parameters only
    release = tmp_path / "release.pth"
    sd = dict(model.state_dict(), **{f"{p}_feat_rope.freqs_{f}": torch.zeros(1) for p in ("enc", "dec") for f in ("cos", "sin")})
    torch.save({"model": sd, "model_ema": dict(model.named_parameters())}, release)
    assert torch.equal(pretrained.load_dit(release, ema=False)[0](x, t, y), model(x, t, y))
    assert torch.equal(pretrained.load_dit(release)[0](x, t, y), model(x, t, y))


def test_load_errors(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        pretrained.load_dit(tmp_path / "absent.pt")
    sd = tiny_dit().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model_ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="unexpected keys extra.weight"):
        pretrained.load_dit(tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="not a DiT"):
        pretrained.load_dit(tmp_path / "bad.pt", ema=False)


def tiny_pipeline(tmp_path):
    """A tiny tokenizer (32 px, 4x4 tokens of dim 4) and a tiny random DiT^DH with latent statistics."""
    torch.manual_seed(0)
    tok = models.Tokenizer(img_size=32, patch_size=8, dim=4, enc_size="tiny", dec_size="tiny", teacher_dim=0)
    torch.save({"model": tok.state_dict(), "model_ema": tok.state_dict()}, tmp_path / "tok.pt")
    dit = randomise(tiny_dit(dim=4, grid=4, num_classes=10))
    stats = {"mean": torch.randn(4), "std": torch.rand(4) + 0.5}
    torch.save({"model": dit.state_dict(), "model_ema": dit.state_dict(), "latent_stats": stats}, tmp_path / "dit.pt")
    return ["--dit", str(tmp_path / "dit.pt"), "--tokenizer", str(tmp_path / "tok.pt"), "--num_images", "12",
            "--per_proc_batch", "5", "--steps", "4", "--cfg", "1.5", "--out_dir", str(tmp_path)]


def test_sampling_is_rank_independent_and_resumes(tmp_path, capsys, ranks):
    """sample.py on 2 ranks writes the images one process does (12 images in per-process
    batches of 5: uneven shards); a finished output is extended, an unfinished one finished, not restarted; other
    settings or fewer images are refused in one line (the single-process runs in-process)."""
    import sample
    argv = tiny_pipeline(tmp_path)
    main_of(sample, argv + ["--out", str(tmp_path / "one.npz")])
    ranks(script_rank, ("sample", argv + ["--out", str(tmp_path / "two.npz")], free_port()))
    assert "2 process(es)" in (tmp_path / "sample.log").read_text()
    one, two = (np.load(tmp_path / f)["arr_0"] for f in ("one.npz", "two.npz"))
    assert one.shape == (12, 32, 32, 3) and one.dtype == np.uint8 and one.std() > 0
    assert np.array_equal(one, two)
    # a finished run is extended to more images; an unfinished one (5 of 12 done) is finished, not restarted
    ext = argv + ["--out", str(tmp_path / "ext.npz"), "--num_images"]
    main_of(sample, ext + ["5"])
    capsys.readouterr()
    main_of(sample, ext + ["12"])
    assert "7 of 12 images left" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "ext.npz")["arr_0"], one)
    part = np.lib.format.open_memmap(tmp_path / "ext.npz.images.npy", "w+", np.uint8, one.shape)
    done = np.lib.format.open_memmap(tmp_path / "ext.npz.done.npy", "w+", np.bool_, (12,))
    part[:5], done[:5] = one[:5], True
    part.flush(), done.flush()
    os.remove(tmp_path / "ext.npz")
    main_of(sample, ext + ["12"])
    assert "7 of 12 images left" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "ext.npz")["arr_0"], one)
    # other settings, or fewer images, are refused with one line that names them (exit status 1: a message)
    for flags, needle in ((["12", "--cfg", "2.0"], "--cfg 1.5 (now 2.0)"), (["6"], "--num_images 12 (now 6)")):
        with pytest.raises(SystemExit) as e:
            main_of(sample, ext + flags)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and needle in e.value.code


def readme_python_snippets():
    """The ```python blocks of README.md's "Use from Python" section, as written."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    """The README's snippets, on tiny stand-ins under the released names (already in the hub cache: no download)."""
    snippets = readme_python_snippets()
    assert len(snippets) == 2
    cache = tmp_path / "hub" / "checkpoints"
    os.makedirs(cache)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a: pytest.fail("downloads"))
    torch.manual_seed(0)
    tok = models.Tokenizer(img_size=32, patch_size=8, dim=4, enc_size="tiny", dec_size="tiny", teacher_dim=0)
    torch.save({"model": tok.state_dict(), "model_ema": tok.state_dict()}, cache / "RecTok_decft.pth")
    dit = randomise(tiny_dit(dim=4, grid=4, num_classes=1000))
    torch.save({"model": dit.state_dict(), "model_ema": dit.state_dict()}, cache / "ditdhxl_epoch_0599.pth")
    torch.save({"mean": torch.zeros(4), "std": torch.ones(4)}, tmp_path / "latent_stats.pt")
    Image.fromarray(demo.Shapes(1, 48).render(0)[0]).save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippets[0], scope)
    assert scope["z"].shape == (1, 4, 4, 4) and Image.open("cat_recon.png").size == (128, 256)  # 2 rows, 4x enlarged
    exec(snippets[1], scope)
    assert scope["images"].shape == (4, 3, 32, 32) and os.path.exists("samples.png")
    x = scope["x"]
    for wrong in ((x + 1) * 127.5, (x + 1) / 2):  # [0, 255] and [0, 1] images
        with pytest.raises(ValueError, match=r"Tokenizer.encode: x spans .* it takes \[-1, 1\]"):
            scope["tokenizer"].encode(wrong)


def test_released_files_by_name_download_once_into_the_hub_cache(tmp_path, monkeypatch, capsys):
    import urllib.error
    tok = tokenizer_file(tmp_path / "local.pt", img_size=32)
    urls = []

    def download(url, dst):  # stands in for the network: Hugging Face serves `tok`
        urls.append(url)
        torch.save(torch.load(tok), dst)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    name = "hf://QingyuShi/RecTok/RecTok_decft.pth"
    assert plumbing.file_problem("--tokenizer", name, "a tokenizer checkpoint") is None  # check_args fetches it
    assert pretrained.load_tokenizer(name).grid == 4
    assert urls == ["https://huggingface.co/QingyuShi/RecTok/resolve/main/RecTok_decft.pth"]  # once
    assert os.path.isfile(tmp_path / "hub" / "checkpoints" / "RecTok_decft.pth")

    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    msg = one_line_exit("sample", ["--dit", "hf://QingyuShi/RecTok/ditdhxl_epoch_0599.pth", "--tokenizer", name,
                                   "--out_dir", str(tmp_path)], capsys)
    assert msg.startswith("could not download https://huggingface.co/QingyuShi/RecTok/resolve/main/ditdhxl_epoch_0599"
                          ".pth (<urlopen error [Errno -3] Temporary failure in name resolution>); offline, put the "
                          f"file in {tmp_path / 'hub' / 'checkpoints'}")
    with pytest.raises(SystemExit, match="hf://<org>/<repo>/<file>"):
        pretrained.load_dit("hf://QingyuShi/RecTok")


def test_guidance_search_picks_the_best_scale(tmp_path, monkeypatch):
    import sample
    argv = tiny_pipeline(tmp_path)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8))
    monkeypatch.setattr(pretrained, "load_inception", lambda path: StandInInception(dim=8))
    scores = iter([3.0, 1.0, 2.0])  # one FID per scale, in --cfg_list order
    monkeypatch.setattr(ev, "frechet_distance", lambda *a: next(scores))
    main_of(sample, argv + ["--cfg_list", "2.0", "1.25", "1.0", "--search_images", "10", "--ref",  # argv: --cfg 1.5
                            str(tmp_path / "ref.npz"), "--out", str(tmp_path / "best.npz")])
    search = json.load(open(tmp_path / "cfg_search.json"))
    assert search == {"images": 10, "fid": {"2.0": 3.0, "1.25": 1.0, "1.0": 2.0}, "best": 1.25}
    main_of(sample, argv + ["--cfg_list", "2.0", "1.25", "1.0", "--search_images", "10", "--ref",  # read back:
                            str(tmp_path / "ref.npz"), "--out", str(tmp_path / "again.npz")])  # no FID call
    main_of(sample, argv + ["--cfg", "1.25", "--out", str(tmp_path / "direct.npz")])
    assert np.array_equal(np.load(tmp_path / "again.npz")["arr_0"], np.load(tmp_path / "direct.npz")["arr_0"])
    assert np.array_equal(np.load(tmp_path / "best.npz")["arr_0"], np.load(tmp_path / "direct.npz")["arr_0"])


def test_train_dit_stats_and_resume(tmp_path):
    import train_dit
    torch.manual_seed(0)
    tok = models.Tokenizer(img_size=32, patch_size=8, dim=4, enc_size="tiny", dec_size="tiny", teacher_dim=0)
    torch.save({"model": tok.state_dict(), "model_ema": tok.state_dict()}, tmp_path / "tokenizer_ft.pt")
    argv = ["--demo", "--demo_images", "32", "--batch_size", "8", "--global_batch", "16", "--log_every", "1",
            "--vis_every", "1", "--sample_steps", "3", "--out_dir", str(tmp_path), "--epochs"]
    main_of(train_dit, argv + ["2"])
    ckpt = models.read_checkpoint(str(tmp_path / "dit.pt"))
    images = torch.stack([demo.Shapes(32, 32)[i][0] for i in range(32)])
    mean = tok.eval().posterior(images)[0].flatten(0, 1)
    torch.testing.assert_close(ckpt["latent_stats"]["mean"], mean.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ckpt["latent_stats"]["std"], mean.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert ckpt["step"] == 4 and os.path.exists(tmp_path / "dit_samples_epoch0002.png")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "img_per_sec"} <= set(records[-1])
    main_of(train_dit, argv + ["4"])  # resumes at epoch 2
    assert models.read_checkpoint(str(tmp_path / "dit.pt"))["step"] == 8
    three_classes = shapes_folder(tmp_path / "three", 8, 3)  # the checkpoint's DiT^DH has 10 classes
    with pytest.raises(SystemExit, match=r"dit.pt: does not match the model: .*wrong shapes y_embedder.embedding_table"):
        main_of(train_dit, argv + ["6", "--data", three_classes])


def test_flat_folder_trains_an_unconditional_dit_and_samples_without_guidance(tmp_path, capsys):
    import sample
    import train_dit
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for i in range(16):
        Image.fromarray(demo.Shapes(16, 32).render(i)[0]).save(flat / f"{i}.png")
    ds = data.ImageFolder(str(flat), 32)
    assert ds.num_classes == 1 and len(ds) == 16 and {label for _, label in ds.samples} == {0}
    tokenizer_file(tmp_path / "tokenizer_ft.pt")
    argv = ["--demo", "--data", str(flat), "--out_dir", str(tmp_path), "--global_batch", "8", "--epochs", "1",
            "--sample_steps", "3", "--label_drop", "0"]
    assert "guidance needs the null class" in one_line_exit("train_dit", argv, capsys)  # demo: --cfg 6
    main_of(train_dit, argv + ["--cfg", "1"])
    dit = pretrained.load_dit(str(tmp_path / "dit.pt"))[0]
    assert dit.num_classes == 1 and dit.label_drop == 0
    out = ["--out_dir", str(tmp_path), "--num_images", "4", "--steps", "3", "--per_proc_batch", "4"]
    assert "--label_drop 0, so it has no null class" in one_line_exit("sample", out + ["--cfg", "2"], capsys)
    main_of(sample, out + ["--cfg", "1", "--png", str(tmp_path / "png")])
    images = np.load(tmp_path / "samples.npz")["arr_0"]
    assert sorted(os.listdir(tmp_path / "png")) == [f"{i:06d}.png" for i in range(4)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000003.png")), images[3])


def test_sampling_chosen_classes(tmp_path, capsys):
    import sample
    argv = tiny_pipeline(tmp_path) + ["--out", str(tmp_path / "some.npz"), "--classes", "3", "7"]  # 12 images
    dit, extra = pretrained.load_dit(str(tmp_path / "dit.pt"))
    seen = []
    dit.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[2]))
    models.generate(dit, pretrained.load_tokenizer(str(tmp_path / "tok.pt")), extra["latent_stats"], [0, 1, 2, 5], 2,
                    classes=[3, 7])
    assert seen[0].tolist() == [3, 7, 3, 7]  # image i: classes[i % len(classes)]
    main_of(sample, argv)
    assert "--classes [3, 7] (now [3])" in one_line_exit("sample", argv[:-1], capsys)  # resumable output
    main_of(sample, argv + ["--png", str(tmp_path / "png")])  # finished: only the PNG export
    assert len(os.listdir(tmp_path / "png")) == 12
    assert "--classes 10: " in one_line_exit("sample", argv + ["10", "--out", str(tmp_path / "x.npz")], capsys)


def test_sigusr1_stops_train_dit_inside_the_epoch_and_it_resumes_exactly(tmp_path, monkeypatch):
    import train_dit
    torch.manual_seed(0)
    tok = models.Tokenizer(img_size=32, patch_size=8, dim=4, enc_size="tiny", dec_size="tiny", teacher_dim=0)
    argv = ["--demo", "--demo_images", "32", "--batch_size", "4", "--global_batch", "8", "--log_every", "1",
            "--vis_every", "9", "--sample_steps", "3", "--epochs", "2", "--out_dir"]  # 2 x 4 steps
    for d in "ab":
        os.makedirs(tmp_path / d)
        torch.save({"model": tok.state_dict(), "model_ema": tok.state_dict()}, tmp_path / d / "tokenizer_ft.pt")
    lr = train_dit.dit_lr

    def lr_and_signal(epoch_frac, *rest):  # SLURM's --signal=USR1 arriving during the second step
        if epoch_frac == 0.25:
            os.kill(os.getpid(), signal.SIGUSR1)
        return lr(epoch_frac, *rest)
    main_of(train_dit, argv + [str(tmp_path / "a")])
    monkeypatch.setattr(train_dit, "dit_lr", lr_and_signal)
    with pytest.raises(SystemExit) as e:
        main_of(train_dit, argv + [str(tmp_path / "b")])
    assert e.value.code == 0
    ckpt = models.read_checkpoint(str(tmp_path / "b" / "dit.pt"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (0, 2, 2)  # the signalled step finished
    monkeypatch.setattr(train_dit, "dit_lr", lr)
    main_of(train_dit, argv + [str(tmp_path / "b")])
    ends = [models.read_checkpoint(str(tmp_path / d / "dit.pt")) for d in "ab"]
    for key in ("model", "model_ema"):
        assert all(torch.equal(ends[0][key][k], ends[1][key][k]) for k in ends[0][key]), key
    records = {d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in "ab"}
    for rows in records.values():
        for r in rows:
            r.pop("img_per_sec", None)
    assert records["a"] == records["b"] and [r["step"] for r in records["a"]] == list(range(1, 9))
    assert all(r["skipped"] == 0 for r in records["a"])


# ---------------------------------------------------------------------------------------------
# Evaluation (evaluate.py)

def gaussian_stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = gaussian_stats(np.random.default_rng(0).normal(size=(500, 16)))
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(0)  # 10 samples in 64 dims: both covariances have rank 9
    fid = ev.frechet_distance(*gaussian_stats(rng.normal(size=(10, 64))), *gaussian_stats(rng.normal(size=(10, 64))))
    assert np.isfinite(fid) and fid > 0


def test_inception_score_bounds():
    """IS = exp(E KL(p(y|x) || p(y))): 1 for uniform predictions, C for confident ones spread over the C classes,
    and the closed form for soft predictions (1 - e on the image's class, e / (C - 1) on each other one)."""
    C = 7
    assert ev.inception_score(torch.zeros(10 * C, C)) == pytest.approx((1.0, 0.0))
    # one-hot predictions laid out so each of the 10 shuffled splits holds every class once -> IS = C
    perm = np.random.RandomState(2020).permutation(10 * C)
    labels = np.empty(10 * C, int)
    labels[perm] = np.arange(10 * C) % C
    mean, std = ev.inception_score(100.0 * torch.eye(C)[labels])
    assert mean == pytest.approx(C, rel=1e-9) and std < 1e-9
    e = 0.3  # p(y) is uniform in every split; KL(p(y|x) || 1/C) is the same for every image
    probs = torch.full((C, C), e / (C - 1), dtype=torch.float64).fill_diagonal_(1 - e)
    kl = (1 - e) * math.log((1 - e) * C) + e * math.log(e * C / (C - 1))
    mean, std = ev.inception_score(probs.log()[labels])
    assert mean == pytest.approx(math.exp(kl), rel=1e-9) and std < 1e-9  # 2.22


def test_precision_recall():
    """Precision: the share of fakes inside the reals' k-NN balls (k = 3); recall: the share of reals inside the
    fakes' balls; by hand on points of a line, where the two differ."""
    real = torch.randn(200, 8)
    assert ev.precision_recall(real, real, batch=64) == (1.0, 1.0)
    # fakes far from the reals: none inside the real manifold and vice versa
    assert ev.precision_recall(real, real + 100, batch=64) == (0.0, 0.0)
    on_a_line = lambda xs: torch.tensor(xs)[:, None] * torch.eye(8)[0]
    # reals 0..4: 4th-nearest distances (self included) 3, 2, 2, 2, 3; their balls cover [-3, 7]
    # fakes 6, 6.5, 8, 20: 6 and 6.5 inside (within 3 of 4), 8 and 20 outside -> precision 2 / 4;
    # their balls (radii 14, 13.5, 12, 14) cover every real -> recall 5 / 5
    real, fake = on_a_line([0.0, 1, 2, 3, 4]), on_a_line([6.0, 6.5, 8, 20])
    assert ev.precision_recall(real, fake, batch=2) == (0.5, 1.0)
    assert ev.precision_recall(fake, real, batch=2) == (1.0, 0.5)  # the roles swap


def test_tf1_resize_by_hand():
    # separable test image x[i, j] = a[i] + b[j]; TF1 samples src = dst * in / out, neighbours clamped
    a, b = torch.tensor([0.0, 30.0]), torch.tensor([0.0, 10.0, 20.0, 40.0])
    out = pretrained.tf1_resize((a[:, None] + b[None, :])[None, None], 3)
    A = torch.tensor([0.0, 20.0, 30.0])          # 2 -> 3: src 0, 2/3, 4/3 (right neighbour clamped to 1)
    B = torch.tensor([0.0, 40 / 3, 100 / 3])     # 4 -> 3: src 0, 4/3, 8/3
    torch.testing.assert_close(out[0, 0], A[:, None] + B[None, :])


def test_load_inception_refuses_missing_and_unexpected_keys(tmp_path):
    state = pretrained.InceptionV3().state_dict()
    state.pop("Mixed_6c.branch7x7dbl_3.bn.running_var")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(SystemExit, match="--inception .*: should be .* it has no key Mixed_6c.branch7x7dbl_3.bn.running_var"):
        pretrained.load_inception(str(tmp_path / "w.pth"))
    state = pretrained.InceptionV3().state_dict()
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(SystemExit, match="it has an unexpected key AuxLogits.fc.weight"):
        pretrained.load_inception(str(tmp_path / "w.pth"))


def test_inception_download_offline_is_one_line(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache: the weights must be downloaded
    with pytest.raises(SystemExit) as e:
        pretrained.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and "could not load pretrained FID Inception" in msg and "network blocked" in msg
    assert os.path.join(str(tmp_path), "checkpoints") in msg


def test_random_inception_shapes_and_warning(caplog):
    model = pretrained.load_inception("random")
    assert "RANDOM" in caplog.text
    pool, logits = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(logits).all()
    assert pool.abs().mean() > 0.01 and (pool[0] - pool[1]).abs().mean() > 1e-3  # He init: O(1), image-dependent
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(2, 3, 64, 64))


def test_rank_shards_cover_all_images_in_order(monkeypatch):
    imgs = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
    blocks = []
    for rank in range(3):  # 7 images over 3 ranks: 3 + 3 + 1 real, padded to 3 each
        monkeypatch.setattr(ev, "rank_world", lambda: (rank, 3))
        blocks.append(torch.cat(list(ev.image_batches(7, lambda i, j: imgs[i:j], batch_size=2))))
    assert [len(b) for b in blocks] == [3, 3, 3]
    assert torch.equal(torch.cat(blocks)[:7], torch.from_numpy(imgs).permute(0, 3, 1, 2))


def test_script_save_stats_and_evaluate(tmp_path, monkeypatch):
    imgs = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)  # IS needs >= 10 (splits)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "ref" / f"{i}.png")
    monkeypatch.setattr(pretrained, "load_inception", lambda path: StandInInception())
    common = ["--inception", "random", "--batch_size", "4"]
    main_of(ev, common + ["--samples", str(tmp_path / "ref"), "--save_stats", str(tmp_path / "stats.npz")])
    stats = np.load(tmp_path / "stats.npz")
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    # sqrtm of 2048 x 2048 takes a minute on 2 cores; FID itself is tested above, here only what reaches it
    seen = []
    monkeypatch.setattr(ev, "frechet_distance", lambda *a: seen.append(a) or 0.0)
    main_of(ev, common + ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref")])
    res = json.load(open(tmp_path / "samples_metrics.json"))
    assert res["n"] == 10 and res["precision"] == res["recall"] == 1.0  # the same images as the reference
    logits = StandInInception()(torch.from_numpy(imgs).permute(0, 3, 1, 2))[1]
    assert (res["is_mean"], res["is_std"]) == pytest.approx(ev.inception_score(logits))  # the samples' logits
    out = str(tmp_path / "r.json")
    main_of(ev, common + ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "stats.npz"), "--out", out])
    res = json.load(open(out))
    assert res["precision"] is None and res["recall"] is None  # stats only: no precision / recall
    # the .npz and the .png folder give the same features; the saved stats are those of the folder
    for mu1, sigma1, mu2, sigma2 in seen:
        np.testing.assert_allclose(mu1, stats["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mu2, stats["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma1, stats["sigma"], rtol=1e-4, atol=1e-8)


def test_reconstruction_mode_with_the_random_inception(tmp_path, monkeypatch):
    tok, val = tokenizer_file(tmp_path / "tok.pt"), shapes_folder(tmp_path / "val", 2, 2)  # 4 images
    ckpt = torch.load(tok)
    ckpt["model"] = {k: v + 0.01 * torch.randn_like(v) for k, v in ckpt["model"].items()}  # raw weights != EMA
    torch.save(ckpt, tok)
    seen = []  # sqrtm at 2048 dims takes a minute on 2 cores: FID itself is tested above; here what reaches it
    monkeypatch.setattr(ev, "frechet_distance", lambda *a: seen.append(a) or 1.0)
    main_of(ev, ["--tokenizer", tok, "--data", val, "--inception", "random", "--batch_size", "3", "--workers", "0",
             "--out_dir", str(tmp_path), "--grid", str(tmp_path / "grid.png"), "--weights", "raw", "ema"])
    res = json.load(open(tmp_path / "recon.json"))
    assert res.keys() == {"raw", "ema"} and res["raw"]["psnr"] != res["ema"]["psnr"]  # two weight sets, both scored
    res = res["ema"]
    assert res["n"] == 4 and np.isfinite(res["psnr"]) and 0 < res["psnr"] < 100 and res["rfid"] == 1.0
    (mu_fake, sigma_fake, mu_real, _), _ = seen
    assert mu_fake.shape == (2048,) and sigma_fake.shape == (2048, 2048) and np.isfinite(sigma_fake).all()
    assert not np.allclose(mu_fake, mu_real)  # reconstructions of a random tokenizer differ from the images
    assert Image.open(tmp_path / "grid.png").size == (4 * 128, 2 * 128)  # originals over reconstructions, x4


def test_reconstruction_metrics_of_a_perfect_tokenizer(tmp_path):
    class Identity(torch.nn.Module):
        encode = decode = staticmethod(lambda x: x)
    loader = data.make_loader(demo.Shapes(12, 16), 5, False, workers=0)
    res = ev.reconstruction_metrics(Identity(), loader, StandInInception(dim=8), torch.device("cpu"))
    assert res["n"] == 12 and res["psnr"] == pytest.approx(100) and abs(res["rfid"]) < 1e-6
    # against another set's statistics the FID is that of the two feature sets
    feats = StandInInception(dim=8)(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8))[0]
    ref = ev.feature_stats(feats)
    res = ev.reconstruction_metrics(Identity(), loader, StandInInception(dim=8), torch.device("cpu"), ref)
    real = torch.cat([StandInInception(dim=8)(data.to_uint8(x))[0] for x, _ in loader])
    assert res["rfid"] == pytest.approx(ev.fid_from_feats(real, *ref), rel=1e-9) and res["rfid"] > 0


def test_psnr_per_image():
    x, x_hat = torch.rand(3, 3, 8, 8) * 2 - 1, torch.rand(3, 3, 8, 8) * 2.4 - 1.2  # reconstructions beyond [-1, 1]
    mse = (((x + 1) / 2 - ((x_hat + 1) / 2).clamp(0, 1)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ev.psnr_per_image(x, x_hat), 10 * torch.log10(1 / mse))
    assert ev.psnr_per_image(x, x)[0].item() == pytest.approx(100)


def test_train_probe_separates_separable_features():
    """The linear probe separates separable classes; its top-1 is exact: with 50 of the 200 validation labels
    made wrong, it is 150 / 200."""
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=g)
    y = torch.arange(800) % 4
    x = centres[y] + torch.randn(800, 16, generator=g) + 5  # offset: the BatchNorm has to centre it
    acc = ev.train_probe(x[:600], y[:600], x[600:], y[600:], 4, epochs=20, lr=1e-2, batch_size=64)
    assert acc > 0.9
    assert acc == 1.0  # the centres are ~17 apart, the noise is 1 per dimension
    wrong = y[600:].clone()
    wrong[:50] = (wrong[:50] + 1) % 4
    assert ev.train_probe(x[:600], y[:600], x[600:], wrong, 4, epochs=20, lr=1e-2, batch_size=64) == 0.75
    # 601 images in batches of 600: the last batch holds one image (BatchNorm in training mode must cope)
    assert ev.train_probe(x[:601], y[:601], x[600:], y[600:], 4, epochs=20, lr=1e-2, batch_size=600) > 0.5


def test_linear_probe_mode(tmp_path, monkeypatch):
    """evaluate.py --linear_probe: a probe per feature kind, trained on --probe_images of --data and scored on
    --val_data; the file holds what each probe scored on the 6 validation images and their labels."""
    tok = tokenizer_file(tmp_path / "tok.pt")
    probes, train_probe = [], ev.train_probe

    def record(train_x, train_y, val_x, val_y, *rest, **kw):
        probes.append((len(train_x), train_y.tolist(), len(val_x), val_y.tolist(),
                       train_probe(train_x, train_y, val_x, val_y, *rest, **kw)))
        return probes[-1][-1]
    monkeypatch.setattr(ev, "train_probe", record)
    train, val = shapes_folder(tmp_path / "train", 4, 3), shapes_folder(tmp_path / "val", 2, 3, seed=1)
    main_of(ev, ["--linear_probe", "--tokenizer", tok, "--data", train, "--val_data", val, "--probe_images", "10",
             "--probe_epochs", "3", "--batch_size", "4", "--workers", "0", "--out_dir", str(tmp_path)])
    res = json.load(open(tmp_path / "linear_probe.json"))
    assert res["n_train"] == 10 and res["n_val"] == 6
    assert set(res["top1"]) == {"z_t0.0", "z_t0.5", "encoder_block-2"}
    assert all(acc * 6 == pytest.approx(round(acc * 6)) for acc in res["top1"].values())  # a share of the 6
    assert list(res["top1"].values()) == [acc for *_, acc in probes] and len(probes) == 3
    assert all(p[:4] == (10, p[1], 6, [0, 0, 1, 1, 2, 2]) and sorted(set(p[1])) == [0, 1, 2] for p in probes)


def test_probe_features_pool_the_latents_and_the_hooked_block(tmp_path):
    tokenizer = pretrained.load_tokenizer(tokenizer_file(tmp_path / "tok.pt"))
    loader = data.make_loader(demo.Shapes(5, 32), 2, False, workers=0)
    feats, labels = ev.probe_features(tokenizer, loader, torch.device("cpu"))
    x = torch.stack([demo.Shapes(5, 32)[i][0] for i in range(5)])
    z = tokenizer.posterior(x)[0]
    torch.testing.assert_close(feats["z_t0.0"], z.mean(1), rtol=1e-4, atol=1e-5)
    assert feats["encoder_block-2"].shape == (5, 192) and labels.tolist() == [0, 1, 2, 3, 4]
    noise = (feats["z_t0.5"] - 0.5 * feats["z_t0.0"]) / 0.5  # the pooled eps: mean of 16 N(0, 1) per channel
    assert 0.1 < noise.std().item() < 0.5


def test_viz_mode_writes_pca_and_cosine_grids(tmp_path):
    tok, val = tokenizer_file(tmp_path / "tok.pt"), shapes_folder(tmp_path / "val", 3, 2)  # 6 images
    main_of(ev, ["--viz", "--tokenizer", tok, "--data", val, "--workers", "0", "--out_dir", str(tmp_path)])
    for name in ("pca", "cos"):  # rows: images; columns: the image, then t = 0, 0.25, 0.5, 0.75
        img = Image.open(tmp_path / f"latent_{name}.png")
        assert img.size == (5 * 128, 16 + 6 * 128)  # 32 px images, shown x4, under a 16 px strip of labels
        pixels = np.asarray(img)
        tile = pixels[16:16 + 128, 128:256]  # the t = 0 map of the first image: 4 x 4 tokens, 32 px each
        assert (tile == np.repeat(np.repeat(tile[::32, ::32], 32, 0), 32, 1)).all()
        # a label per column, black on white, written at its left: "image", "z_t, t = 0", ..., "z_t, t = 0.75"
        dark = (pixels[:16].min(-1) < 128).any(0).reshape(5, 128)  # per column: which x of its strip are inked
        ends = [int(np.nonzero(d)[0].max()) for d in dark]  # where each label ends: by its length
        assert ends[0] < ends[1] < ends[3] < ends[2] == ends[4] < 108  # image, t = 0, 0.5 < 0.25 = 0.75


def test_latent_map_colours_keep_their_direction_across_t(monkeypatch):
    """latent_maps gives each t's PCA component the sign of t = 0's, so that a colour means one direction in
    every column: with SVD's signs flipped at every other call, the same z_t twice maps to one picture."""
    torch.manual_seed(0)
    z = torch.randn(2, 16, 8) * torch.linspace(3, 0.5, 8)
    tokenizer = SimpleNamespace(posterior=lambda x: (z,))
    svd, calls = torch.linalg.svd, []

    def flipping_svd(a, full_matrices=True):
        usv = svd(a, full_matrices=full_matrices)
        calls.append(1)
        return SimpleNamespace(U=usv.U, S=usv.S, Vh=usv.Vh * (-1) ** len(calls))

    monkeypatch.setattr(torch.linalg, "svd", flipping_svd)
    pca, _ = ev.latent_maps(tokenizer, torch.zeros(2, 3, 32, 32), ts=(0.0, 0.0, 0.5))
    assert len(calls) == 3 and len(pca) == 4
    torch.testing.assert_close(pca[2], pca[1], rtol=0, atol=1e-6)
    assert (pca[1] - pca[3]).abs().max() > 0.1  # the noise at t = 0.5 does change it


@pytest.fixture(scope="module")
def demo_judges(tmp_path_factory):
    """Both demo judges at 32 px, trained once as the demo trains them (640 images), cached in a folder; with
    every Shapes set each was built with, as (size of it, seed)."""
    out = tmp_path_factory.mktemp("judges")
    seeds, init = [], demo.Shapes.__init__

    def record(self, n=512, size=64, seed=0):
        seeds.append((n, seed))
        init(self, n, size, seed)
    judges = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo.Shapes, "__init__", record)
        for role in ("teacher", "evaluator"):
            seeds.clear()
            judge, accuracy = demo.judge(str(out), 32, torch.device("cpu"), role, grid=8)
            judges[role] = (judge, accuracy, list(seeds))
    return out, judges


def test_demo_judges_learn_the_demo_classes_differ_and_are_cached(demo_judges, tmp_path):
    """The two demo judges learn the demo classes (held out), from other images and with other architectures;
    the cache is read back, not retrained, and training does not depend on the caller's RNG state."""
    out, judges = demo_judges
    for role in ("teacher", "evaluator"):
        assert judges[role][1] >= 0.9, role  # held-out Shapes (seed 1), after a few seconds of training
    assert judges["teacher"][2][0] == (640, 0)  # the teacher learns from demo training images (seed 0) ...
    assert judges["evaluator"][2][0][1] not in (0, 1, 2)  # ... the evaluator from others: not training, held-out, ref
    teacher, evaluator = judges["teacher"][0], judges["evaluator"][0]
    assert [p.shape for p in teacher.parameters()] != [p.shape for p in evaluator.parameters()]  # other architecture
    x = torch.stack([demo.Shapes(4, 32, seed=5)[i][0] for i in range(4)])
    assert teacher(x).shape == (4, 64, teacher.dim)  # the teachers' interface: patch features on the 8 x 8 token grid
    pool, logits = evaluator(data.to_uint8(x))  # the FID Inception's interface
    assert pool.shape == (4, evaluator.dim) and logits.shape == (4, 10)
    mtime = os.path.getmtime(out / "judge_teacher.pt")
    again = demo.judge(str(out), 32, torch.device("cpu"), "teacher", grid=8)[0]  # read back, not retrained
    assert os.path.getmtime(out / "judge_teacher.pt") == mtime and (out / "judge_evaluator.pt").exists()
    assert torch.equal(again(x), teacher(x)) and not any(p.requires_grad for p in again.parameters())
    # trained twice (on 64 images: the same code path, a tenth of the time), from two global RNG states, as in
    # another stage or on another rank: the same net
    nets = []
    for folder in ("one", "other"):
        torch.rand(7)  # another global RNG state
        os.makedirs(tmp_path / folder)
        nets.append(demo.judge(str(tmp_path / folder), 32, torch.device("cpu"), "teacher", grid=8, n_train=64)[0])
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))


def judge_calls(monkeypatch, n_train=64):
    """Every DemoJudge call outside the judges' own training, as (role, input dtype); the judges train on n_train
    images (64: fast, not accurate)."""
    calls, inside, forward, demo_judge = [], [], demo.DemoJudge.forward, demo.judge
    roles = {layers[-1][0]: role for role, layers in demo.JUDGE_LAYERS.items()}  # told apart by their width

    def record(self, x):  # the outer call only (the uint8 path calls the float one)
        if not inside:
            calls.append((roles[self.dim], x.dtype))
        inside.append(True)
        try:
            return forward(self, x)
        finally:
            inside.pop()

    def build(*args, **kw):
        inside.append(True)
        try:
            return demo_judge(*args, **kw, n_train=n_train)
        finally:
            inside.pop()
    monkeypatch.setattr(demo.DemoJudge, "forward", record)
    monkeypatch.setattr(demo, "judge", build)
    return calls


def test_training_feeds_on_the_teacher_and_metrics_read_the_evaluator(tmp_path, monkeypatch):
    """Stage 1 with the judge teacher and online metrics: the teacher only gives FSD targets (float images), the
    evaluator only scores (uint8 images, the FID Inception's interface)."""
    import train_tokenizer as tt
    calls = judge_calls(monkeypatch)
    main_of(tt, ["--demo", "--demo_images", "16", "--batch_size", "8", "--global_batch", "8", "--epochs", "1",
                 "--eval_every", "1", "--eval_images", "8", "--out_dir", str(tmp_path)])
    assert set(calls) == {("teacher", torch.float32), ("evaluator", torch.uint8)}
    assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])["eval_rfid"] > 0  # 1 epoch: not perfect


def test_demo_mode(tmp_path, monkeypatch, demo_judges):
    """evaluate.py --demo: every metric of the demo's outputs, read through the evaluator judge (the one the demo
    trains, from the module's judges folder: its cache in --out_dir)."""
    with pytest.raises(SystemExit, match="train_tokenizer.py --demo"):
        main_of(ev, ["--demo", "--out_dir", str(tmp_path)])
    tokenizer_file(tmp_path / "tokenizer.pt", img_size=32)
    with pytest.raises(SystemExit, match="sample.py --demo"):
        main_of(ev, ["--demo", "--out_dir", str(tmp_path)])
    real = demo.Shapes(20, 32, seed=3)  # "samples" that are real images of their class i % 10
    np.savez(tmp_path / "samples.npz", arr_0=np.stack([real.render(i)[0] for i in range(20)]))
    calls = judge_calls(monkeypatch, n_train=640)
    (tmp_path / "judge_evaluator.pt").write_bytes((demo_judges[0] / "judge_evaluator.pt").read_bytes())
    main_of(ev, ["--demo", "--out_dir", str(tmp_path)])
    assert set(calls) == {("evaluator", torch.uint8)}  # every demo metric reads the evaluator, never the teacher
    res = json.load(open(tmp_path / "eval.json"))
    assert res["evaluator"]["held_out_accuracy"] >= 0.9 and res["tokenizer"].endswith("tokenizer.pt")
    gen = res["generation"]
    assert gen["n"] == 20 and gen["class_accuracy"] >= 0.9 and gen["fid"] > 0 and gen["is_mean"] > 1
    assert gen["precision"] > 0.5 and gen["recall"] > 0.5  # real images of the reference's distribution
    rec = res["reconstruction"]
    assert rec["n"] == 200 and np.isfinite(rec["psnr"]) and rec["rfid"] > 0
    assert set(res["linear_probe_top1"]) == {"z_t0.0", "z_t0.5", "encoder_block-2"}
    assert all(v * 200 == pytest.approx(round(v * 200)) for v in res["linear_probe_top1"].values())  # of 200
    assert (tmp_path / "latent_pca.png").exists() and (tmp_path / "latent_cos.png").exists()


def test_bad_paths_name_the_flag(tmp_path):
    tok = tokenizer_file(tmp_path / "tok.pt")
    for argv, flag in ((["--tokenizer", str(tmp_path / "no.pt"), "--data", str(tmp_path)], "--tokenizer"),
                       (["--tokenizer", tok, "--data", str(tmp_path / "nowhere")], "--data"),
                       (["--linear_probe", "--tokenizer", tok, "--data", str(tmp_path), "--val_data", "x/"], "--val_data"),
                       (["--samples", str(tmp_path / "s.npz"), "--ref", "r.npz"], "--samples")):
        with pytest.raises(SystemExit, match=flag):
            main_of(ev, argv + ["--out_dir", str(tmp_path)])


class Dimmer(torch.nn.Module):  # a "tokenizer" whose reconstructions lose a different PSNR on every image
    encode = decode = staticmethod(lambda x: 0.9 * x)


def two_rank_worker(rank, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loader = data.make_loader(demo.Shapes(5, 16), 2, False, workers=0, world=2, rank=rank)  # 3 per rank, 1 padding
    res = ev.reconstruction_metrics(Dimmer(), loader, StandInInception(dim=8), torch.device("cpu"))
    labels = plumbing.gather_rows(torch.cat([y for _, y in loader]), 5, strided=True)
    gen = ev.generation_metrics(StandInInception(dim=8), [torch.full((10, 3, 16, 16), 50 * rank, dtype=torch.uint8)],
                                np.zeros(8), np.eye(8))
    if rank == 0:
        torch.save((res, labels, gen), out)
    else:
        assert res is None and gen is None
    torch.distributed.destroy_process_group()


def test_online_metrics_over_two_ranks_match_one_process(tmp_path, ranks):
    ranks(two_rank_worker, (str(tmp_path / "init"), str(tmp_path / "out.pt")))
    res, labels, gen = torch.load(tmp_path / "out.pt", weights_only=False)
    assert labels.tolist() == [0, 1, 2, 3, 4]  # dataset order, the sampler's padding dropped
    one = ev.reconstruction_metrics(Dimmer(), data.make_loader(demo.Shapes(5, 16), 2, False, workers=0),
                                    StandInInception(dim=8), torch.device("cpu"))
    assert res["n"] == 5 and res["psnr"] == pytest.approx(one["psnr"], rel=1e-6)
    assert res["rfid"] == pytest.approx(one["rfid"], rel=1e-6)
    assert gen["n"] == 20  # 10 images from each rank


def test_online_metrics_refuse_an_unsharded_loader(monkeypatch):
    monkeypatch.setattr(ev, "rank_world", lambda: (0, 2))  # as under torchrun with 2 ranks
    loader = data.make_loader(demo.Shapes(4, 16), 2, False, workers=0)  # world=1: every rank would see all images
    with pytest.raises(ValueError, match="sharded"):
        ev.reconstruction_metrics(Dimmer(), loader, StandInInception(dim=8), torch.device("cpu"))


def test_online_eval_in_the_training_scripts(tmp_path, monkeypatch, demo_judges):
    """--eval_every: stage 1 logs PSNR and rFID of the EMA model on --eval_images; train_dit.py logs gFID and the
    Inception Score of --eval_images samples: the IS of those samples' logits, whose closed form is tested above."""
    import train_dit
    import train_tokenizer as tt
    # the demo evaluator, read, not trained again
    (tmp_path / "judge_evaluator.pt").write_bytes((demo_judges[0] / "judge_evaluator.pt").read_bytes())
    monkeypatch.setattr(pretrained, "load_inception", lambda path: StandInInception(dim=8))
    scored, inception_score = [], ev.inception_score
    monkeypatch.setattr(ev, "inception_score", lambda logits: scored.append(logits) or inception_score(logits))
    main_of(tt, TINY_TRAIN + ["--epochs", "1", "--eval_every", "1", "--eval_images", "6", "--out_dir", str(tmp_path)])
    rec = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval_psnr" in line]
    assert len(rec) == 1 and rec[0]["eval_images"] == 6 and math.isfinite(rec[0]["eval_rfid"])
    torch.manual_seed(0)
    tok = models.Tokenizer(img_size=32, patch_size=8, dim=4, enc_size="tiny", dec_size="tiny", teacher_dim=0)
    torch.save({"model": tok.state_dict(), "model_ema": tok.state_dict()}, tmp_path / "tokenizer_ft.pt")
    main_of(train_dit, ["--demo", "--demo_images", "32", "--batch_size", "8", "--global_batch", "16", "--epochs", "1",
                        "--eval_every", "1", "--eval_images", "12", "--sample_steps", "3", "--out_dir", str(tmp_path)])
    gen = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "eval_gfid" in line]
    assert len(gen) == 1 and gen[0]["eval_images"] == 12 and gen[0]["eval_gfid"] > 0 and gen[0]["eval_is"] >= 1
    assert len(scored) == 1 and scored[0].shape == (12, 10)  # the demo evaluator's 10 classes, 12 samples
    assert gen[0]["eval_is"] == pytest.approx(inception_score(scored[0])[0], abs=1e-6)  # logged to 6 decimals


def test_gated_dinov3_needs_its_file():
    with pytest.raises(SystemExit, match="--teacher_ckpt"):
        pretrained.teacher_file("dinov3_vitl16", None)
    assert pretrained.teacher_file("dinov3_vitl16", "/some/file.pth") == "/some/file.pth"


# ---------------------------------------------------------------------------------------------
# Fast paths: torch.compile and bf16 autocast must not change the function (the compile tests: the file's last)

def test_a_toy_teacher_through_the_registry_trains_a_step(tmp_path, monkeypatch):
    """README, Fork it: another teacher is its class and one TEACHERS entry; --teacher NAME then trains with it
    (its .dim sizes the semantic decoder, its forward(x in [-1, 1]) gives the FSD targets)."""
    import train_tokenizer as tt
    seen = []

    class Toy(torch.nn.Module):
        dim = 12

        def __init__(self, grid):
            super().__init__()
            self.grid = grid
            self.proj = torch.nn.Conv2d(3, self.dim, 1)

        def forward(self, x):
            seen.append((x.dtype, tuple(x.shape), x.min().item() >= -1, x.max().item() <= 1))
            return torch.nn.functional.adaptive_avg_pool2d(self.proj(x), self.grid).flatten(2).transpose(1, 2)

    built = []
    def build(sd, grid, args):
        built.append((sd, grid, args.teacher_size))
        return Toy(grid)
    monkeypatch.setitem(pretrained.TEACHERS, "toy", pretrained.Teacher(build, url="https://example.invalid/toy.pth"))
    main_of(tt, ["--demo", "--demo_images", "8", "--batch_size", "8", "--global_batch", "8", "--epochs", "1",
                 "--log_every", "1", "--teacher", "toy", "--out_dir", str(tmp_path)])
    assert built == [(None, 4, "large")]  # --demo has random frozen nets: no file, the 4 x 4 token grid
    assert seen == [(torch.float32, (8, 3, 32, 32), True, True)]  # one step, one teacher forward
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["step"] == 1 and 0 < row["sem"] < 2 * 0.7  # 0.7 (1 - cos): the demo's weight times a cosine loss
    ckpt = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))
    assert ckpt["model"]["sem_decoder.out.weight"].shape[0] == Toy.dim and ckpt["args"]["teacher"] == "toy"


@pytest.mark.parametrize("name", ["siglip", "dinov3_vitb16"])
def test_a_stage1_step_with_each_new_teacher(name, tmp_path):
    """`train_tokenizer.py --teacher siglip` / `dinov3_vitb16` (paper Tab. 6) run a stage-1 step (random tiny
    weights here; the published files in real runs)."""
    import train_tokenizer as tt
    main_of(tt, ["--demo", "--demo_images", "8", "--batch_size", "8", "--global_batch", "8", "--epochs", "1",
                 "--log_every", "1", "--teacher", name, "--teacher_size", "tiny", "--out_dir", str(tmp_path)])
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["step"] == 1 and 0 < row["sem"] < 2 * 0.7
    sd = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))["model"]
    assert sd["sem_decoder.out.weight"].shape[0] == pretrained.TEACHER_SIZES["tiny"][0]


def test_a_stage1_step_with_sam_radio_and_dinov3b_at_once(tmp_path):
    """`train_tokenizer.py --teacher sam,radio,dinov3b` (paper Tab. 6; dinov3b: the release's name of DINOv3
    ViT-B/16) runs a stage-1 step (random tiny weights here): a decoder per teacher under the release's names,
    SAM's as wide as its 256-channel neck."""
    main_of(train_tokenizer_script, ["--demo", "--demo_images", "8", "--batch_size", "8", "--global_batch", "8",
                                     "--epochs", "1", "--log_every", "1", "--teacher", "sam,radio,dinov3b",
                                     "--teacher_size", "tiny", "--out_dir", str(tmp_path)])
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["step"] == 1 and 0 < row["sem"] < 2 * 0.7
    ckpt = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))
    assert ckpt["model_args"]["teachers"] == {"sam": 256, "radio": 64, "dinov3b": 64}
    assert ckpt["model"]["sem_decoders.sam.out.weight"].shape[0] == 256
    assert ckpt["args"]["teacher"] == "sam,radio,dinov3_vitb16"

def test_two_teachers_at_once_train_a_decoder_each_and_average_their_losses(tmp_path):
    """`--teacher dinov3_vitl16,siglip` (paper Tab. 6): one semantic decoder per teacher under the release's
    key names (sem_decoders.dinov3, sem_decoders.siglip), and the semantic loss the mean of the teachers'
    (the release's utils/losses.py: summed, then divided by their count)."""
    import train_tokenizer as tt
    main_of(tt, ["--demo", "--demo_images", "8", "--batch_size", "8", "--global_batch", "8", "--epochs", "1",
                 "--log_every", "1", "--teacher", "dinov3_vitl16,siglip", "--teacher_size", "tiny",
                 "--out_dir", str(tmp_path)])
    ckpt = models.read_checkpoint(str(tmp_path / "tokenizer.pt"))
    assert ckpt["model_args"]["teachers"] == {"dinov3": 64, "siglip": 64} and ckpt["model_args"]["teacher_dim"] == 0
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("sem_decoders.")} == {"dinov3", "siglip"}
    assert not any(k.startswith("sem_decoder.") for k in ckpt["model"])
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert 0 < row["sem"] < 2 * 0.7
    # the average, against the loss of each teacher on stub predictions
    args = SimpleNamespace(rec_weight=1.0, perceptual_weight=0.0, kl_weight=0.0, sem_weight=0.5, sem_target="all")
    x = torch.zeros(2, 3, 8, 8)
    pred = {"a": torch.randn(2, 4, 6), "b": torch.randn(2, 4, 6)}
    target = {"a": torch.randn(2, 4, 6), "b": torch.randn(2, 4, 6)}
    terms = tt.generator_losses(args, x, x, None, pred, target, None, None, None, False)
    each = [(1 - torch.nn.functional.cosine_similarity(pred[k], target[k], dim=-1)).mean() for k in "ab"]
    torch.testing.assert_close(terms["sem"], 0.5 * (each[0] + each[1]) / 2)
    # stage 2 from it: no semantic decoder left, and it reloads
    import finetune_decoder
    main_of(finetune_decoder, ["--demo", "--demo_images", "8", "--batch_size", "8", "--global_batch", "8",
                               "--epochs", "1", "--out_dir", str(tmp_path)])
    assert not any(k.startswith("sem_decoder") for k in models.read_checkpoint(str(tmp_path / "tokenizer_ft.pt"))["model"])


def test_the_releases_two_teacher_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    m = tiny_tokenizer(dim=32, teacher_dim=0, teachers={"dinov3": 48, "siglip": 40}).eval()
    release = {}
    for k, v in m.state_dict().items():
        release[k.replace("encoder.patch_embed.", "encoder.patch_embed.0.").replace("decoder.to_pixels.",
                                                                                     "decoder.ffn.1.")] = v
    release["sem_foundation_models.siglip.pos_embed"] = torch.zeros(1)  # the teachers' weights: skipped
    torch.save({"model": release, "model_ema": release}, tmp_path / "release.pth")
    theirs = pretrained.load_tokenizer(str(tmp_path / "release.pth")).eval()
    assert theirs.model_args["teachers"] == {"dinov3": 48, "siglip": 40} and theirs.sem_decoder is None
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.manual_seed(1)
    ours = m.train()(x)[2]
    torch.manual_seed(1)
    loaded = theirs.train()(x)[2]
    assert ours.keys() == loaded.keys() == {"dinov3", "siglip"}
    assert all(torch.equal(ours[k], loaded[k]) for k in ours) and loaded["siglip"].shape == (2, 16, 40)


def test_dino_sizes_are_read_from_the_weight_file():
    """The registry's DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14 (and DINOv3 ViT-L/16) take their sizes from the file,
    whatever --teacher_size says (it sizes random weights only)."""
    with torch.device("meta"):
        for name, size, shape in (("dinov2_vits14", "small", (384, 12, 6)), ("dinov2_vitb14", "base", (768, 12, 12)),
                                  ("dinov2_vitl14", "large", (1024, 24, 16)), ("dinov3_vitl16", "large", (1024, 24, 16))):
            sd = load_teacher(name, size=size).state_dict()
            assert pretrained.dino_size(sd, "tiny") == shape
            assert load_teacher(name, size=size).dim == shape[0]
    assert sorted(pretrained.TEACHERS) == ["dinov2_vitb14", "dinov2_vitl14", "dinov2_vits14", "dinov3_vitb16",
                                           "dinov3_vitl16", "radio", "sam", "siglip"]
    assert pretrained.TEACHERS["dinov2_vits14"].url.endswith("/dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert pretrained.TEACHERS["dinov3_vitl16"].url is None and "gated" in pretrained.TEACHERS["dinov3_vitl16"].gated


def test_bench_tokenizer_times_fp32_and_bf16_losses(capsys, monkeypatch):
    """bench.py --dtype bf16 times the stage-1 step twice: its loss networks (LPIPS's VGG, the PatchGAN) in fp32,
    then in bf16; images/s is the images of the timed calls over their seconds (a clock of 0.5 s per reading)."""
    import bench
    seen, step_class = [], bench.train_tokenizer.TokenizerStep

    class Recorded(step_class):  # the loss networks' output dtypes, per timed row
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            for net in (self.perceptual.lpips.net.slice1, self.disc):
                net.register_forward_hook(lambda mod, inp, out: seen[-1].add(out.dtype))
    measure = bench.measure

    def measure_a_row(*args, **kw):
        seen.append(set())
        return measure(*args, **kw)
    monkeypatch.setattr(bench.train_tokenizer, "TokenizerStep", Recorded)
    monkeypatch.setattr(bench, "measure", measure_a_row)
    clock = iter(0.5 * k for k in range(1000))
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # bench's clock only
    main_of(bench, ["--only", "tokenizer", "--tok_size", "tiny", "--img_size", "32", "--dtype", "bf16",
                    "--repeats", "1", "--convnext_weight", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tokenizer step")]
    assert len(rows) == 2 and "fp32 losses" in rows[0] and "bf16 losses" in rows[1]
    assert all(float(row.split("|")[2]) > 0 for row in rows)
    assert seen == [{torch.float32}, {torch.bfloat16}]  # each row ran what its name says
    assert [float(row.split("|")[2]) for row in rows] == [4.0, 4.0]  # 1 call x batch 2 in 0.5 s
    assert [float(row.split("|")[6]) for row in rows] == [0.5, 0.5]  # the warm-up: 0 calls, two readings


def test_grad_ckpt_gives_the_same_loss_and_gradients():
    """--grad_ckpt recomputes each transformer block in the backward pass: the step's numbers must not change."""
    tok = tiny_tokenizer(img=32, patch_size=8, teacher_dim=8).train()
    dit = randomise(tiny_dit()).train()
    x = torch.stack([demo.Shapes(2, 32)[i][0] for i in range(2)])
    z, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])

    def loss_and_grads(grad_ckpt):
        for net in (tok.encoder, tok.decoder, tok.sem_decoder, dit):
            net.grad_ckpt = grad_ckpt
            net.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same RAD mask, flow times and noise in both runs
        x_hat, kl, pred, _ = tok(x)
        loss = (x_hat - x).square().mean() + kl + pred.square().mean() + models.flow_loss(dit, z, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for net in (tok, dit) for p in net.parameters() if p.grad is not None]
    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert len(grads) == len(grads_ckpt) > 50
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)

    def n_saved(grad_ckpt):  # tensors kept for the backward pass: with it, a block keeps only its inputs
        saved = []
        tok.decoder.grad_ckpt = grad_ckpt
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            tok.decoder(torch.randn(2, 16, 16))
        return len(saved)
    assert n_saved(True) < n_saved(False) / 2


def test_every_size_has_a_flash_attention_head_dim():
    # flash SDPA takes head dims that are multiples of 8 up to 256; any other silently runs a slower kernel
    dims = [w // h for w, _, h in list(models.SIZES.values()) + list(pretrained.TEACHER_SIZES.values())]
    dims += [d for w, _, h, hw, _, hh in models.DIT_SIZES.values() for d in (w // h, hw // hh)]
    assert all(d % 8 == 0 and d <= 256 for d in dims), dims
    assert 72 in dims and 128 in dims  # DiT^DH-XL's encoder and the wide head


# ---------------------------------------------------------------------------------------------
# Golden values: the numbers of every stage, recorded before issue 28 moved the code between files, so that a
# change of the math fails (a one-line bug in FSD's input, the hinge sign, the DiT^DH latent normalisation, the
# time shift, the sampler's grid or CFG: each was planted once and failed here).
# The runs go through each script's main(argv) and read what the scripts write (metrics.jsonl, tokenizer.pt,
# tokenizer_ft.pt, dit.pt, samples.npz): the flags, their defaults and these files outlive a reorganisation.
# Tiny models, 2 optimiser steps per stage, one thread, seeds fixed: stage 1 (FSD + RAD + KL + LPIPS/ConvNeXt +
# GAN, a random tiny DINOv2 teacher), stage 2 from it, a one-step dim-32 tokenizer on a 16 x 16 grid (8192
# numbers per latent: the DiT^DH time shift s = sqrt 2 is on), DiT^DH-tiny on its latents, sampling with CFG.
# Tolerances: rtol 1e-5, so another CPU's kernels (AVX2, ATen's plain `default` ones) pass; metrics.jsonl rounds
# to 6 decimals (abs 2e-6). Signed sums of quantities that cancel (the weight change, Adam's first moment, the
# sampler's output) moved by up to 3e-4 between CPUs, so those are pinned by their absolute sums and sums of
# squares. A change that is meant to change the numbers rerecords them (GOLDEN is what record() returns).

REL = 1e-5  # relative tolerance of every golden value
METRIC_ABS = 2e-6  # metrics.jsonl rounds to 6 decimals


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
    main_of(train_tokenizer_script, STAGE1 + ["--out_dir", out])
    return out


@pytest.fixture(scope="module")
def stage2(root, stage1):
    out = str(root / "stage2")
    main_of(finetune_decoder_script, STAGE2 + ["--out_dir", out, "--tokenizer", os.path.join(stage1, "tokenizer.pt")])
    return out


@pytest.fixture(scope="module")
def dit_tokenizer(root):
    out = str(root / "dit_tokenizer")
    main_of(train_tokenizer_script, DIT_TOKENIZER + ["--out_dir", out])
    return out


@pytest.fixture(scope="module")
def dit_run(root, dit_tokenizer):
    out = str(root / "dit")
    main_of(train_dit_script, DIT + ["--out_dir", out, "--tokenizer", os.path.join(dit_tokenizer, "tokenizer.pt")])
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
        main_of(sample_script, ["--dit", dit, "--tokenizer", tok, "--cfg", "2", "--steps", "5", "--num_images", "4",
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
    s1, s2, tk, dd = (os.path.join(root, d) for d in ("stage1", "stage2", "dit_tokenizer", "dit"))
    main_of(train_tokenizer_script, STAGE1 + ["--out_dir", s1])
    main_of(finetune_decoder_script, STAGE2 + ["--out_dir", s2, "--tokenizer", os.path.join(s1, "tokenizer.pt")])
    main_of(train_tokenizer_script, DIT_TOKENIZER + ["--out_dir", tk])
    main_of(train_dit_script, DIT + ["--out_dir", dd, "--tokenizer", os.path.join(tk, "tokenizer.pt")])
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
                                                      'teacher_dim': 0,
                                                      'teachers': None},
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
                                               'teacher_dim': 64,
                                               'teachers': None},
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
                                               'teacher_dim': 64,
                                               'teachers': None},
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


# ---------------------------------------------------------------------------------------------
# The paper's math, one behaviour at a time: each test against a closed form or a value computed by hand, on
# tiny inputs, with stand-in networks whose outputs are known.

class Stub(torch.nn.Module):
    """A stand-in network: records the inputs of every call in `seen` and returns out(*inputs); `attrs` are
    the attributes its caller reads (e.g. num_classes)."""

    def __init__(self, out, **attrs):
        super().__init__()
        self.out = out
        self.seen = []
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, *inputs):
        self.seen.append(inputs)
        return self.out(*inputs)


def test_flow_loss_shifted_time_path_and_velocity_target():
    """models.flow_loss on a 128 x 8 x 8 latent, where s = sqrt(8192 / 4096) = sqrt 2 > 1 and the shift runs
    (SPEC 4, the release's transport/): the DiT^DH sees t = 1 - s u / (1 + (s - 1) u) and
    x_t = t x + (1 - t) eps (t = 1 data), and the loss is the MSE to x - eps = d x_t / d t (paper Eq. 2).
    Below s = 1, t = u."""
    x = torch.randn(2, 128, 8, 8)
    y = torch.tensor([3, 5])
    dit = Stub(lambda x_t, t, y: x_t)  # v = x_t: the loss then sees the target's sign
    torch.manual_seed(0)
    loss = models.flow_loss(dit, x, y)
    torch.manual_seed(0)  # flow_loss's two draws, in its order: u, then eps
    u = torch.rand(2)
    eps = torch.randn_like(x)
    s = math.sqrt(2)
    t = 1 - s * u / (1 + (s - 1) * u)
    t4 = t.view(-1, 1, 1, 1)
    x_t, t_seen, y_seen = dit.seen[0]
    torch.testing.assert_close(t_seen, t)
    torch.testing.assert_close(x_t, t4 * x + (1 - t4) * eps)
    assert torch.equal(y_seen, y)
    # the target is the time derivative of the path as built (forward-mode autograd through models.dit_flow)
    _, dxdt = torch.func.jvp(lambda tau: models.dit_flow(x, tau, eps), (t4,), (torch.ones_like(t4),))
    torch.testing.assert_close(dxdt, x - eps)
    torch.testing.assert_close(loss, ((x_t - dxdt) ** 2).mean())
    # 16 x 4 x 4: s = 1/4, no shift
    dit = Stub(lambda x_t, t, y: x_t)
    torch.manual_seed(0)
    models.flow_loss(dit, x[:, :16, :4, :4], y)
    torch.manual_seed(0)
    torch.testing.assert_close(dit.seen[0][1], torch.rand(2))


def test_euler_sample_of_a_constant_velocity_lands_on_noise_plus_it():
    """dx/dt = c has the exact flow x(1) = x(0) + c, on which Euler is exact whatever the grid: from noise
    eps with c = x - eps (flow_loss's target, t = 1 data) models.euler_sample lands on x, feeding the DiT^DH
    the rising times of the release's grid (t = 0 noise): with s = sqrt 2 (128 x 8 x 8) and 5 points,
    1 - reversed(s g / (1 + (s - 1) g)), g = linspace(0, 1, 5), all but the last point (SPEC 5)."""
    x = torch.randn(2, 128, 8, 8)
    eps = torch.randn(2, 128, 8, 8)
    dit = Stub(lambda x_t, t, y: x - eps, num_classes=10)
    out = euler_sample(dit, eps, torch.tensor([0, 1]), steps=5)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    s = math.sqrt(2)
    g = torch.linspace(0, 1, 5)
    grid = 1 - (s * g / (1 + (s - 1) * g)).flip(0)
    torch.testing.assert_close(torch.stack([t[0] for _, t, _ in dit.seen]), grid[:-1])
    assert all(len(set(t.tolist())) == 1 for _, t, _ in dit.seen)  # one t for the whole batch


LATENT_STATS = {"mean": torch.tensor([1.0, -2.0, 0.5, 3.0]), "std": torch.tensor([2.0, 0.5, 4.0, 1.0])}


def test_train_dit_feeds_latents_normalised_by_the_statistics_it_saves(tmp_path, monkeypatch):
    """train_dit.train: the DiT^DH learns (z - mean) / std per channel, z the tokenizer's posterior sample
    and (mean, std) the statistics saved in dit.pt (SPEC 4). A stub tokenizer records its images and returns
    z[b, c] = (c + 1) x[b].mean() + c; the step (DiTStep) records its batches."""
    def encode(x, sample, check_range):
        assert sample and not check_range  # a posterior sample; the loop's own [-1, 1] images
        z = x.mean((1, 2, 3))[:, None, None, None] * torch.arange(1.0, 5.0).view(1, 4, 1, 1)
        z = z + torch.arange(4.0).view(1, 4, 1, 1) + torch.zeros(len(x), 4, 2, 2)
        encoded.append(z)
        return z
    encoded, batches = [], []
    tokenizer = SimpleNamespace(dim=4, grid=2, encode=encode, decode=lambda z: z[:, :3].tanh())
    images = [(torch.full((3, 4, 4), v), i % 2) for i, v in enumerate([-0.5, 0.1, 0.3, 0.9])]
    dataset = type("Four", (list,), {"num_classes": 2})(images)  # a list with the classes' count

    def step(self, batch, lr):
        batches.extend(batch)
        return torch.tensor(0.0), torch.tensor(0.0), torch.tensor(True)
    monkeypatch.setattr(train_dit_script.DiTStep, "__call__", step)
    args = SimpleNamespace(model="tiny", label_drop=0.1, seed=0, global_batch=2, batch_size=2, workers=0,
                           out_dir=str(tmp_path), eval_every=0, epochs=1, reshuffle=False, lr=1e-3,
                           min_lr=1e-3, decay_start_epoch=1, decay_end_epoch=2, log_every=1, vis_every=1,
                           sample_steps=2, cfg=1.0, save_every=0, ema=0.9, grad_clip=1.0, grad_ckpt=False,
                           compile=False, img_size=4)
    train_dit_script.train(args, tokenizer, dataset, LATENT_STATS, 0, 1, torch.device("cpu"))
    saved = models.read_checkpoint(str(tmp_path / "dit.pt"))["latent_stats"]
    assert len(batches) == len(encoded) == 2
    for (z_in, _), z in zip(batches, encoded):
        want = (z - saved["mean"].view(1, 4, 1, 1)) / saved["std"].view(1, 4, 1, 1)
        torch.testing.assert_close(z_in, want)
    for k in ("mean", "std"):
        assert torch.equal(saved[k], LATENT_STATS[k])


def test_generate_maps_samples_back_with_the_statistics():
    """models.generate (sample.py's sampler): the DiT^DH's sample x is decoded as z = x std + mean per
    channel (the inverse of train_dit's normalisation). The stub DiT^DH is PointMass's exact velocity
    towards m[y], so Euler lands on m[y] (test_euler_reaches_point_mass_and_guidance); the stub tokenizer's
    decode is z."""
    m = torch.stack([torch.full((4, 2, 2), 0.5), torch.full((4, 2, 2), -1.0), torch.zeros(4, 2, 2)])
    dit = PointMass(m)
    dit.dim, dit.grid = 4, 2
    tokenizer = SimpleNamespace(decode=lambda z: z)
    images = models.generate(dit, tokenizer, LATENT_STATS, [0, 1, 2], steps=4)
    want = m[[0, 1, 0]] * LATENT_STATS["std"].view(1, 4, 1, 1) + LATENT_STATS["mean"].view(1, 4, 1, 1)
    torch.testing.assert_close(images, want, atol=1e-5, rtol=1e-5)


def test_fsd_semantic_decoder_reads_z_t_unless_no_fsd(tmp_path, monkeypatch):
    """Tokenizer.forward (paper Sec. 3.2, Eq. 1; FSD): z = mean + exp(logvar / 2) n and
    z_t = (1 - t) z + t gamma eps; the pixel decoder reads z_t, and so does the semantic decoder, which reads
    z with --no_fsd (sem_noisy False, Tab. 4). Stubs: the encoder returns known (mean, logvar), sample_t a
    fixed t, randn_like n and then eps."""
    m = tiny_tokenizer(dim=4, img=32, mask_ratio=0.0, gamma=0.5)  # 2 x 2 tokens, no mask
    mean = torch.randn(2, 4, 4)
    logvar = torch.full((2, 4, 4), math.log(0.25))  # std 0.5
    m.encoder = Stub(lambda x, ids_keep: torch.cat([mean, logvar], -1))
    m.decoder = Stub(lambda z, ids_keep: torch.zeros(2, 3, 32, 32))
    m.sem_decoder = Stub(lambda z, ids_keep: z)
    t = torch.tensor([0.25, 0.75]).view(2, 1, 1)
    monkeypatch.setattr(m, "sample_t", lambda B, device: t)
    n, eps = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    z = mean + 0.5 * n
    z_t = (1 - t) * z + t * 0.5 * eps
    for sem_noisy, sem_in in ((True, z_t), (False, z)):
        m.sem_noisy = sem_noisy
        noises = iter([n, eps])
        monkeypatch.setattr(torch, "randn_like", lambda like: next(noises))
        m(torch.zeros(2, 3, 32, 32))
        torch.testing.assert_close(m.decoder.seen[-1][0], z_t)
        torch.testing.assert_close(m.sem_decoder.seen[-1][0], sem_in)
    # the flag: train_tokenizer's --no_fsd builds the tokenizer with sem_noisy False
    built = []
    monkeypatch.setattr(train_tokenizer_script, "train", lambda args, stage, model, *_: built.append(model))
    main_of(train_tokenizer_script, TINY_TRAIN + ["--out_dir", str(tmp_path), "--no_fsd"])
    assert not built[0].sem_noisy


def loss_weights(**kw):
    """generator_losses' flags: each weight distinct, so a term can only match its own."""
    return SimpleNamespace(**dict(dict(rec_weight=1.0, perceptual_weight=0.5, kl_weight=0.25, sem_weight=2.0,
                                       disc_weight=0.1, sem_target="all"), **kw))


def test_generator_losses_ranges_and_each_weight_scales_its_term():
    """train_tokenizer.generator_losses (paper Eq. 4, the release's utils/losses.py): rec = MSE on [0, 1]
    images, the GAN term -w D((x_hat + 1) / 2), every term times its own weight. x = 0 and x_hat = 0.4 are
    0.5 and 0.7 on [0, 1], so rec = 0.2^2 = 0.04 (0.16 on [-1, 1]); the stub D is the identity, so
    gan = -0.1 * 0.7; the stub perceptual net returns 0.3; kl = 2; sem = 2 (1 - cos((1, 0), (1, 1))) =
    2 (1 - 1/sqrt 2)."""
    x = torch.zeros(1, 3, 2, 2)
    x_hat = torch.full((1, 3, 2, 2), 0.4)
    perceptual = Stub(lambda x, x_hat: torch.tensor(0.3))
    disc = Stub(lambda img: img)
    inputs = (x, x_hat, torch.tensor(2.0), torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]]]), None,
              perceptual, disc, True)
    terms = train_tokenizer_script.generator_losses(loss_weights(), *inputs)
    want = {"rec": 0.04, "perceptual": 0.5 * 0.3, "kl": 0.25 * 2.0, "sem": 2.0 * (1 - 2 ** -0.5),
            "gan": -0.1 * 0.7}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want, rel=1e-6)
    assert torch.equal(perceptual.seen[0][0], x) and torch.equal(perceptual.seen[0][1], x_hat)  # [-1, 1]
    names = {"rec": "rec_weight", "perceptual": "perceptual_weight", "kl": "kl_weight", "sem": "sem_weight",
             "gan": "disc_weight"}
    for term, flag in names.items():
        args = loss_weights(**{flag: 2 * getattr(loss_weights(), flag)})
        doubled = train_tokenizer_script.generator_losses(args, *inputs)
        twice = dict(want, **{term: 2 * want[term]})
        assert {k: v.item() for k, v in doubled.items()} == pytest.approx(twice)


def tokenizer_step(monkeypatch, **kw):
    """A TokenizerStep of a tiny tokenizer (32 px, 2 x 2 tokens, no teacher) and its EMA, with a stand-in
    for the perceptual nets (weight 0: never called)."""
    monkeypatch.setattr(pretrained, "Perceptual", lambda *a: torch.nn.Identity())
    step_flags = dict(compile=False, grad_ckpt=False, blr=1e-3, global_batch=256, ema=0.9,
                      random_frozen_nets=True, weight_decay=0.05, grad_clip=1e9, bf16_losses=False,
                      convnext_weight=0.0)
    args = SimpleNamespace(**step_flags, **vars(loss_weights(perceptual_weight=0.0, **kw)))
    torch.manual_seed(0)
    model = tiny_tokenizer(dim=4, img=32, teacher_dim=0, enc_size="demo", dec_size="demo")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return train_tokenizer_script.TokenizerStep(args, model, ema, None, torch.device("cpu"), 1)


def test_discriminator_hinge_loss_on_images_in_0_1(monkeypatch):
    """TokenizerStep's discriminator loss (the release's hinge):
    0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake))) with real = (x + 1) / 2 and fake = (x_hat + 1) / 2,
    x_hat the generator's (its GAN term's D input). The stub D returns fixed maps by call (G term, real,
    fake): real r = (2, 0.5, -1, 0) gives relu(1 - r) = (0, 0.5, 2, 1), mean 0.875; fake
    f = (-2, 0.5, 0, -0.5) gives relu(1 + f) = (0, 1.5, 1, 0.5), mean 0.75; loss 0.5 (0.875 + 0.75) =
    0.8125."""
    step = tokenizer_step(monkeypatch)
    maps = iter([torch.zeros(1, 1, 2, 2), torch.tensor([2.0, 0.5, -1.0, 0.0]).view(1, 1, 2, 2),
                 torch.tensor([-2.0, 0.5, 0.0, -0.5]).view(1, 1, 2, 2)])
    scale = torch.nn.Parameter(torch.tensor(1.0))
    step.disc = step.ddp_disc = Stub(lambda img: scale * next(maps))
    step.disc.scale = scale  # a parameter, so the loss has gradients
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    terms = step([x], 1e-4, use_gan=True)[0]
    assert terms["disc"].item() == pytest.approx(0.8125, rel=1e-6)
    (gen,), (real,), (fake,) = step.disc.seen
    assert torch.equal(real, (x + 1) / 2)
    assert torch.equal(fake, gen)
    assert 0 < gen.min() and gen.max() < 1  # x_hat, a near-zero output, on [0, 1]


def test_lr_schedules_by_hand():
    """The tokenizer's lr (train_tokenizer.cosine_lr, the release's utils/train_utils.py): linear warm-up
    from 0 to base over warmup epochs, then half-cycle cosine to min_lr; DiT^DH's (train_dit.dit_lr,
    SPEC 4): constant to decay_start, linear to min_lr at decay_end, then flat. Values by hand: base 1,
    warm-up 2 of 10 epochs, cos(pi / 4) = 0.70710678 at a quarter of the cosine; lr 2e-4 to 2e-5 over
    epochs 40 to 800, mid-way 420."""
    cosine = train_tokenizer_script.cosine_lr
    assert [cosine(e, 1.0, 2, 10) for e in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine(4, 1.0, 2, 10) == pytest.approx(0.5 * (1 + 0.70710678))  # progress 2 / 8
    assert cosine(6, 1.0, 2, 10) == pytest.approx(0.5)  # mid-way
    assert cosine(10, 1.0, 2, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(6, 1.0, 2, 10, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(10, 1.0, 2, 10, min_lr=0.1) == pytest.approx(0.1)
    dit_lr = train_dit_script.dit_lr
    assert [dit_lr(e, 2e-4, 2e-5, 40, 800) for e in (0, 20, 40)] == pytest.approx([2e-4] * 3)
    assert dit_lr(420, 2e-4, 2e-5, 40, 800) == pytest.approx(1.1e-4)  # (2e-4 + 2e-5) / 2
    assert dit_lr(599, 2e-4, 2e-5, 40, 800) == pytest.approx(2e-4 - 1.8e-4 * 559 / 760)  # the 600-epoch model
    assert [dit_lr(e, 2e-4, 2e-5, 40, 800) for e in (800, 900)] == pytest.approx([2e-5] * 2)


def stage2_setup(tmp_path, monkeypatch):
    """finetune_decoder.main up to its train() call, from a stage-1 file (2 x 2 tokens, dim 4, a semantic
    decoder) whose raw and EMA weights differ. Returns the stage-1 raw and EMA models and what train() was
    given."""
    torch.manual_seed(0)
    raw = models.Tokenizer(img_size=32, patch_size=16, dim=4, enc_size="demo", dec_size="demo",
                           sem_size="demo", teacher_dim=8)
    ema = randomise(copy.deepcopy(raw))
    path = tmp_path / "tokenizer.pt"
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "model_args": raw.model_args}, path)
    given = {}
    names = ("args", "stage", "model", "ema", "teacher", "rank", "world", "device")
    monkeypatch.setattr(finetune_decoder_script, "train", lambda *a: given.update(zip(names, a)))
    main_of(finetune_decoder_script, ["--tokenizer", str(path), "--data", str(tmp_path),
                                      "--out_dir", str(tmp_path / "ft")])
    return raw, ema, SimpleNamespace(**given)


def test_stage2_set_up_from_stage1_without_noise_mask_kl_or_teacher(tmp_path, monkeypatch):
    """finetune_decoder.py (paper Sec. 3.2, "Decoder Finetuning"; SPEC 3): the model is stage 1's raw
    weights and its EMA copy starts from stage 1's EMA pixel decoder (the released code), with the raw
    (frozen) encoder in both; gamma 0 and mask ratio 0 (no flow noise, no mask), KL and semantic weights 0,
    no teacher or semantic decoder; only the pixel decoder trains (its mask token, unused without a mask, is
    frozen); the release's stage-2 recipe: 100 epochs, blr 5e-5, warm-up 5%, GAN from epoch 0."""
    raw, ema, given = stage2_setup(tmp_path, monkeypatch)
    model, args = given.model, given.args
    pairs = ((model.encoder, raw.encoder), (model.decoder, raw.decoder), (given.ema.encoder, raw.encoder),
             (given.ema.decoder, ema.decoder))
    for got, want in pairs:
        for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), k
    for net in (model, given.ema):
        assert net.gamma == 0 and net.mask_ratio == 0 and net.random_keep(2, "cpu") is None
        assert net.sem_decoder is None and net.sem_decoders is None
    assert args.kl_weight == 0 and args.sem_weight == 0 and given.teacher is None
    assert given.stage == "tokenizer_ft"
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    decoder = {k for k, _ in model.named_parameters() if k.startswith("decoder.")}
    assert trainable == decoder - {"decoder.mask_token"}
    assert (args.epochs, args.blr, args.warmup_rate, args.disc_start_epoch) == (100, 5e-5, 0.05, 0)


def test_perceptual_is_lpips_plus_a_tenth_convnext_over_1_1(monkeypatch):
    """pretrained.Perceptual with the default --convnext_weight 0.1 (the release; SPEC 3):
    (LPIPS + 0.1 ConvNeXt) / 1.1, LPIPS on the [-1, 1] images, ConvNeXt-S's logit MSE on them at 224 px on
    [0, 1], ImageNet-normalised. Stand-ins through the same constructor (random weights, as in tests): LPIPS
    is the per-image mean squared difference, ConvNeXt the per-channel mean. On images constant per channel
    the resize changes nothing, so the logits are ((v + 1) / 2 - mean_c) / std_c and their MSE is the mean of
    ((x_hat - x) / (2 std_c))^2."""
    import lpips
    import torchvision
    monkeypatch.undo()  # the class itself, not perceptual_built_once's memo of it (which hands out copies)
    nets = {}

    def lpips_stub(net, pnet_rand, verbose):
        nets["lpips"] = Stub(lambda a, b: ((a - b) ** 2).mean((1, 2, 3), keepdim=True), random=pnet_rand)
        return nets["lpips"]

    def convnext_stub(weights):
        nets["convnext"] = Stub(lambda img: img.mean((2, 3)), weights=weights)
        return nets["convnext"]
    monkeypatch.setattr(lpips, "LPIPS", lpips_stub)
    monkeypatch.setattr(torchvision.models, "convnext_small", convnext_stub)
    perceptual = pretrained.Perceptual(0.1, True)
    x = torch.tensor([[0.2, -0.4, 0.6], [-1.0, 0.0, 1.0]]).view(2, 3, 1, 1).expand(2, 3, 8, 8)
    x_hat = torch.tensor([[0.0, 0.1, 0.6], [-0.5, 0.5, 0.2]]).view(2, 3, 1, 1).expand(2, 3, 8, 8)
    lp = ((x_hat - x) ** 2).mean()
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv = (((x_hat - x) / (2 * std)) ** 2).mean()
    assert perceptual(x, x_hat).item() == pytest.approx(((lp + 0.1 * conv) / 1.1).item(), rel=1e-5)
    assert nets["lpips"].random and nets["convnext"].weights is None
    assert [tuple(img.shape) for img, in nets["convnext"].seen] == [(2, 3, 224, 224)] * 2


def test_masked_encoder_keeps_each_tokens_position_and_rope_row():
    """Encoder.forward with ids_keep (RAD, SPEC 2: "a masked encoder gathers the RoPE rows of the kept
    tokens"): keeping every token in a shuffled order gives the unmasked encoding in that order (attention
    is permutation-equivariant once each token carries its own position embedding and RoPE row), and a kept
    subset equals the trunk on those tokens picked by index, with their own rows of the position and RoPE
    tables."""
    torch.manual_seed(0)
    enc = tiny_tokenizer(dim=4, img=64, teacher_dim=0, enc_size="demo").encoder  # 4 x 4 tokens
    randomise(enc)  # sharper attention than the init's, so positions weigh
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    keep = perm[:, :7]
    with torch.no_grad():
        full = enc(x)
        shuffled = enc(x, perm)
        subset = enc(x, keep)
        tokens = enc.patch_embed(x).flatten(2).transpose(1, 2)  # (2, 16, width), row-major
        for b in range(2):
            torch.testing.assert_close(shuffled[b], full[b, perm[b]], atol=1e-5, rtol=1e-5)
            h = tokens[b, keep[b]] + enc.positional_embedding[0, keep[b]]
            by_index = enc.latent_head(enc.trunk(h[None], enc.rope_tensor[:, keep[b]]))
            torch.testing.assert_close(subset[b], by_index[0], atol=1e-5, rtol=1e-5)


def test_random_flip_mirrors_the_width_of_the_drawn_items():
    """data.random_flip: each item flipped with probability 1/2 (one uniform draw per item, < 0.5), along
    the width only: out[b, c, i, j] = x[b, c, i, W - 1 - j] for a flipped item, x[b] otherwise."""
    x = torch.arange(6 * 3 * 2 * 3, dtype=torch.float32).view(6, 3, 2, 3)
    torch.manual_seed(0)
    out = data.random_flip(x)
    torch.manual_seed(0)
    flipped = (torch.rand(6) < 0.5).tolist()
    assert 0 < sum(flipped) < 6  # this seed draws both kinds
    for b in range(6):
        want = x[b][:, :, [2, 1, 0]] if flipped[b] else x[b]
        assert torch.equal(out[b], want)


def adamw_groups(opt, model):
    """(weight decay, betas, the parameters' names) of each of an optimiser's groups."""
    name = {id(p): k for k, p in model.named_parameters()}
    return [(g["weight_decay"], g["betas"], {name[id(p)] for p in g["params"]}) for g in opt.param_groups]


def test_adamw_groups_and_betas_of_each_stage(tmp_path, monkeypatch):
    """AdamW in each stage (SPEC 3, 4; the release's utils/train_utils.py): betas (0.9, 0.95); the
    tokenizer's weight decay (--weight_decay) on the matrices only, none on biases, norms, embeddings and
    tokens (the authors' name rule: it also spares the patch and decoder embeddings' weights), nor on the
    discriminator's BatchNorm; stage 2 the same over the pixel decoder's trainable parameters; DiT^DH none
    at all."""
    step = tokenizer_step(monkeypatch)
    (wd0, betas0, spared), (wd1, betas1, decayed) = adamw_groups(step.opt, step.model)
    assert (wd0, betas0, wd1, betas1) == (0.0, (0.9, 0.95), 0.05, (0.9, 0.95))
    assert spared | decayed == {k for k, _ in step.model.named_parameters()} and not spared & decayed
    assert {"encoder.patch_embed.weight", "encoder.patch_embed.bias", "encoder.positional_embedding",
            "encoder.ln_pre.weight", "encoder.transformer.0.norm1.weight",
            "encoder.transformer.0.attn.qkv.bias", "encoder.transformer.1.mlp.w3.bias",
            "decoder.decoder_embed.weight", "decoder.mask_token",
            "decoder.ln_post.weight", "decoder.conv_out.bias"} <= spared
    assert {"encoder.transformer.0.attn.qkv.weight", "encoder.transformer.1.attn.proj.weight",
            "encoder.transformer.0.mlp.w12.weight", "encoder.latent_head.weight", "decoder.to_pixels.weight",
            "decoder.conv_out.weight", "decoder.transformer.1.mlp.w3.weight"} <= decayed
    # PatchGAN: convs 0, 2, 5, 8, 11 (a bias on the first and last only), BatchNorms 3, 6, 9
    (wd0, betas0, spared), (wd1, betas1, decayed) = adamw_groups(step.opt_d, step.disc)
    assert (wd0, betas0, wd1, betas1) == (0.0, (0.9, 0.95), 0.05, (0.9, 0.95))
    assert decayed == {"0.weight", "2.weight", "5.weight", "8.weight", "11.weight"}
    assert spared == {"0.bias", "11.bias"} | {f"{i}.{k}" for i in (3, 6, 9) for k in ("weight", "bias")}
    # stage 2
    model = stage2_setup(tmp_path, monkeypatch)[2].model
    ema = copy.deepcopy(model)
    step = train_tokenizer_script.TokenizerStep(step.args, model, ema, None, torch.device("cpu"), 1)
    (_, betas0, spared), (_, betas1, decayed) = adamw_groups(step.opt, model)
    assert betas0 == betas1 == (0.9, 0.95)
    assert spared | decayed == {k for k, p in model.named_parameters() if p.requires_grad}
    assert {"decoder.decoder_embed.weight", "decoder.conv_out.bias"} <= spared
    assert {"decoder.to_pixels.weight", "decoder.conv_out.weight"} <= decayed
    # DiT^DH: one group, no decay, every trainable parameter (not the fixed position embedding and Fourier W)
    args = SimpleNamespace(lr=1e-3, ema=0.9, grad_clip=1.0, grad_ckpt=False, compile=False)
    dit = tiny_dit()
    step = train_dit_script.DiTStep(args, dit, torch.device("cpu"), 1)
    (wd, betas, names), = adamw_groups(step.opt, dit)
    assert (wd, betas) == (0.0, (0.9, 0.95))
    assert names == {k for k, _ in dit.named_parameters()} - {"pos_embed", "t_embedder.W"}


def test_ema_step_is_a_lerp_by_one_minus_the_flag(monkeypatch):
    """The EMA after each optimiser step, in both training loops (TokenizerStep, DiTStep; the release's
    update_ema): ema <- ema + (1 - decay) (p - ema), decay = --ema (0.9 here), p the weights just stepped;
    frozen parameters are left alone."""
    def check(step, model, ema, batches):
        before = [e.clone() for e in ema.parameters()]
        step(*batches)
        for (k, p), e, e0 in zip(model.named_parameters(), ema.parameters(), before):
            want = e0 + (1 - 0.9) * (p.detach() - e0) if p.requires_grad else e0
            torch.testing.assert_close(e, want, atol=1e-6, rtol=0, msg=k)
        assert any(not torch.equal(e, e0) for e, e0 in zip(ema.parameters(), before))
    step = tokenizer_step(monkeypatch, disc_weight=0.0)
    randomise(step.ema)  # an EMA that differs from the weights
    check(step, step.model, step.ema, ([torch.rand(2, 3, 32, 32) * 2 - 1], 1e-3, False))
    args = SimpleNamespace(lr=1e-3, ema=0.9, grad_clip=1.0, grad_ckpt=False, compile=False)
    step = train_dit_script.DiTStep(args, tiny_dit(), torch.device("cpu"), 1)
    randomise(step.ema)
    batch = [(torch.randn(2, 4, 4, 4), torch.tensor([1, 2]))]
    check(step, step.dit, step.ema, (batch, 1e-3))


# ---------------------------------------------------------------------------------------------
# torch.compile, last: the side process (compile_aside) runs these first, from the suite's start

def test_compiled_tokenizer_step_matches_eager(inductor_as_tested):
    """Three stage-1 steps (GAN on) compiled give the eager steps' losses and, but for weights whose gradient is
    ~0, the eager weights."""
    import train_tokenizer as tt
    from types import SimpleNamespace
    x = torch.stack([demo.Shapes(4, 32)[i][0] for i in range(4)])
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        m = tiny_tokenizer(img=32, patch_size=8, teacher_dim=64)
        teacher = load_teacher("dinov2_vitl14", None, "tiny", grid=4)
        args = SimpleNamespace(compile=compile, grad_ckpt=False, blr=1e-4, global_batch=8, convnext_weight=0.0, ema=0.9, random_frozen_nets=True,
                               weight_decay=1e-4, grad_clip=3.0, rec_weight=1.0, perceptual_weight=1.0, kl_weight=1e-6,
                               sem_weight=1.0, disc_weight=0.5, bf16_losses=False, sem_target="all")
        step = tt.TokenizerStep(args, m, copy.deepcopy(m).eval().requires_grad_(False), teacher, torch.device("cpu"), 1)
        torch.manual_seed(1)  # three steps with the GAN on: three different RAD mask ratios through one graph
        runs.append(([step([x], 1e-3, True)[0] for _ in range(3)], m.state_dict()))
    (eager, w_eager), (fast, w_fast) = runs
    for a, b in zip(eager, fast):
        assert a.keys() == b.keys() == {"rec", "perceptual", "kl", "sem", "gan", "disc"}
        assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6) for k in a), (a, b)
    assert w_eager.keys() == w_fast.keys()  # compiled in place: the checkpoint keys do not change
    # Adam moves an element whose gradient is ~0 by up to lr = 1e-3 per step in either direction, whatever the
    # rounding that decided its sign: two such steps apart is the bound (seen: 1.02e-3 on the Shapes of this version)
    assert all(torch.allclose(w_eager[k], w_fast[k], atol=2e-3) for k in w_eager)
    # ... and those elements are few: a missed (or doubled) step moves almost every weight by ~lr, so below a
    # fifth of one step's update all but a thousandth of the weights agree
    diff = torch.cat([(w_eager[k] - w_fast[k]).abs().flatten() for k in w_eager if w_eager[k].is_floating_point()])
    assert (diff > 2e-4).double().mean() < 1e-3, (diff > 2e-4).double().mean()


def test_dit_compile_and_bf16_stay_within_tolerance(inductor_as_tested):
    import bench
    cpu, fp32 = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    assert bench.check_precision("tiny", cpu, fp32, False) == [0.0, 0.0, 0.0]  # the comparison itself is exact
    assert max(bench.check_precision("tiny", cpu, fp32, True)) < 1e-5  # compiled loss, gradient and CFG sampler
    err_loss, err_grad, err_x = bench.check_precision("tiny", cpu, torch.autocast("cpu", torch.bfloat16), False)
    assert err_loss < 2e-2 and 0 < err_grad < 2e-2 and 0 < err_x < 2e-2  # bf16 really ran, within its tolerance


def stages_in_one_launch(stages):
    """Run by torchrun with this file as its script: each (script, argv, port) of the JSON list `stages` in turn,
    in this process, each stage on its own rendezvous port with rank 0 holding the store (a second process group
    on the launcher's store would meet the first one's keys there)."""
    pretrained.Perceptual = perceptual_memo(pretrained.Perceptual)  # stage 2 copies stage 1's loss networks
    for script, argv, port in json.loads(stages):
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=str(port))
        main_of(importlib.import_module(script), argv)


if __name__ == "__main__":
    stages_in_one_launch(sys.argv[1])
