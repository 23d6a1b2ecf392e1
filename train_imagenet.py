"""
train_imagenet.py -- NSVQ's ImageNet recipe: 128x128 images, K = 65,536 codes, SimVQ's model;
and its 32x32 miniature for one GPU or a CPU.

    torchrun --nproc_per_node=4 train_imagenet.py --data /path/to/imagenet       # NSVQ, paper
    torchrun --nproc_per_node=4 train_imagenet.py --data ... --quantizer simvq   # the baseline
    torchrun --nproc_per_node=4 train_imagenet.py --data ... --resume auto       # continue a run
    python train_imagenet.py --preset cifar --data DIR --quantizer nsvq      # 32x32, 8x8 tokens

--data holds train/ and val/ (class folders, or images); --batch-size is global. SIGTERM or
Ctrl-C saves a checkpoint and exits with 143 or 130; an error on any rank stops every rank.
Outputs in --out: ckpt-*.pt (a tokenizer: load_autoencoder), metrics.jsonl, results.json; on a
finished run, --resume auto evaluates again. The twin of train_mnist.py, plus what scale adds.
"""

import argparse
import copy
import dataclasses
import datetime
import glob
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

import metrics
import nsvq


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data and outputs
    data: str = arg("", "root holding train/ and val/ (class folders, or images directly)")
    image_size: int = arg(128, "SimVQ's ImageNet setting")
    workers: int = arg(8, "loader workers per rank (~440 JPEGs/s each: EXPERIMENTS.md 11)")
    out: str = arg("", "output folder (default runs/imagenet/<quantizer>)")
    overwrite: bool = arg(False, "start afresh in an --out that holds an earlier run")
    preset: str = arg("paper", "paper | cifar (32x32: one GPU, or a CPU) | tiny (tests)")
    # model: SimVQ's ImageNet-128 encoder and decoder
    ch: int = arg(128, "base channels")
    ch_mult: str = arg("1,2,2,4", "channels per level, x ch; 128 px -> 16x16 tokens")
    num_res_blocks: int = arg(2, "per level, and in the middle")
    dim: int = arg(128, "D, the code dimension")
    # quantizer
    quantizer: str = arg("nsvq", "nsvq | simvq | ema | ste | fsq | simvq-ns (+ dense loss)")
    codebook_size: int = arg(65536, "K (the paper's headline)")
    beta: float = arg(0.25, "commitment weight (VQ-VAE; SimVQ)")
    alpha: float = arg(0.1, "dense-loss weight (the paper, as best known)")
    tau: float = arg(1.0, "kernel temperature, in the units of --tau-mode")
    tau_mode: str = arg("relative", "relative (ours, scale-free: EXPERIMENTS.md 3) | absolute")
    replace: Optional[bool] = arg(None, "dead-code replacement (default: nsvq only, as published)")
    replace_every: int = arg(10, "steps between replacement calls (ours: EXPERIMENTS.md 12)")
    usage_horizon: float = arg(64.0, "usage averages over this many assignments per code (ours)")
    # losses (SimVQ's recipe)
    perceptual_weight: float = arg(1.0, "LPIPS-VGG training loss; 0 trains without it")
    gan_weight: float = arg(0.1, "generator's adversarial weight (PatchGAN, hinge critic)")
    # stages (nsvq, simvq-ns; the baselines train in one stage, as published)
    patience: int = arg(10, "epochs with no new best commitment loss: freeze (paper)")
    freeze_epoch: int = arg(60, "freeze by then at the latest (ours; 0: plateau only)")
    warmup_epochs: int = arg(2, "encoder frozen, no GAN (ours: the paper gives none)")
    gan_ramp_epochs: int = arg(2, "stage-2 GAN ramp (paper)")
    gan_stage1: bool = arg(True, "the GAN from step 0 of stage 1 (ours: sources leave it open)")
    # optimisation
    epochs: int = arg(70, "the paper, as best known (SimVQ's config: 50)")
    batch_size: int = arg(128, "global batch, split evenly across ranks")
    lr: float = arg(1e-4, "Adam, no schedule (SimVQ)")
    weight_ema: float = arg(0.999, "EMA of the weights, used for evaluation (SimVQ)")
    # engine
    device: str = arg("auto", "auto | cpu | cuda")
    amp: str = arg("auto", "auto (bf16 on CUDA, none on a CPU) | bf16 | fp16 | none")
    compile: Optional[bool] = arg(None, "torch.compile model and critic (default: on CUDA)")
    seed: int = arg(0, "seed of the weights (the same on every rank) and of the data order")
    resume: str = arg("", "'' | auto (the newest intact checkpoint in --out) | a path")
    max_steps: int = arg(0, "stop with a checkpoint after this many steps (0: no limit)")
    ckpt_minutes: float = arg(30.0, "minutes between checkpoints (and at stages, stops, end)")
    timeout_minutes: float = arg(10.0, "[DDP] a collective waiting this long stops the run: a "
                                 "vanished rank or node (start-up waits 60 for downloads)")
    log_every: int = arg(100, "steps between log lines (each reads the device once)")
    # evaluation (SimVQ's protocol: metrics.evaluate)
    eval_every: int = arg(5, "epochs between quick evaluations (PSNR, SSIM, codes; 0: none)")
    eval_images: int = arg(5000, "the first this many val/ images, for the quick evaluation")
    lpips_weights: str = arg("auto", "auto (download) | DIR of the four LPIPS files | random")
    eval_lpips: bool = arg(True, "report LPIPS-AlexNet and LPIPS-VGG")
    inception: str = arg("auto", "auto (download) | FILE pt_inception-2015-12-05-6726825d.pth"
                         " | none (no rFID) | random (tests)")


PRESETS = {
    "paper": {},
    # Ours: SimVQ's model scaled down to 32x32 images, 8x8 tokens (f4), at the paper's 0.5
    # latents per code per step (64 images x 64 tokens on K = 8,192), no critic (without a
    # perceptual loss it cost 4 dB and drew a checkerboard; --gan-weight 0.1 with
    # --perceptual-weight 1 --lpips-weights DIR brings both back), lr 6e-4 (+1.8 dB over 2e-4 at
    # this budget). EXPERIMENTS.md 17.
    "cifar": dict(image_size=32, ch=32, ch_mult="1,2,2", num_res_blocks=1, dim=32,
                  codebook_size=8192, usage_horizon=8.0, batch_size=64, epochs=8, freeze_epoch=5,
                  warmup_epochs=1, gan_ramp_epochs=1, gan_stage1=False, gan_weight=0.0, lr=6e-4,
                  weight_ema=0.99, workers=2, eval_every=0, perceptual_weight=0.0,
                  eval_lpips=False, inception="none", log_every=20),
    "tiny": dict(image_size=32, ch=16, ch_mult="1,2", num_res_blocks=1, dim=8, codebook_size=256,
                 epochs=3, batch_size=8, freeze_epoch=1, warmup_epochs=1, gan_ramp_epochs=1,
                 workers=0, perceptual_weight=0.0, eval_lpips=False, inception="none",
                 log_every=2, replace_every=1, eval_every=0),
}


def make_config(preset="paper", **changes):
    """A Config from a preset, `changes` over it (what --preset and the flags do)."""
    nsvq.check_choice("--preset", preset, tuple(PRESETS))
    return Config(**{**PRESETS[preset], **changes, "preset": preset})


# -----------------------------------------------------------------------------
# Data: image folders, read as SimVQ's loader reads them (metrics.ImageFolder)
# -----------------------------------------------------------------------------

class EpochSampler(Sampler):
    """This rank's share of an epoch as (index, epoch) keys: every rank draws the same order
    (seed + epoch), keeps whole global batches, takes every world-th index; set_epoch(epoch,
    start_batch) skips what a resumed run has already done."""

    def __init__(self, n, rank, world, local_batch, seed):
        self.n, self.rank, self.world, self.local_batch = n, rank, world, local_batch
        self.seed = seed
        self.epoch, self.start, self.batches = 0, 0, n // (world * local_batch)  # global batches
        if self.batches == 0:
            raise metrics.DataError(f"{n} training images: fewer than one global batch "
                            f"({world * local_batch})")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        mine = torch.randperm(self.n, generator=g)[:self.batches * self.world * self.local_batch]
        mine = mine[self.rank::self.world][self.start * self.local_batch:]
        return iter([(int(i), self.epoch) for i in mine])


def ignore_stop_signals(worker_id):
    """Loader workers ignore SIGTERM and SIGINT. Failure it prevents: torchrun and SLURM signal
    the process group, and a worker killed by it makes the rank raise before it has saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(cfg, split, rank, world, train, limit=None):
    dataset = metrics.ImageFolder(cfg.data, split, cfg.image_size, train, cfg.seed)
    dataset.files = dataset.files[:limit]  # the quick evaluation's fixed subset
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=train and cfg.workers > 0, worker_init_fn=ignore_stop_signals,
                  generator=torch.Generator().manual_seed(cfg.seed))  # its own: resumable
    if not train:  # SimVQ's evaluation: consecutive batches of 64, batch b on rank b % world
        n = len(dataset)
        batches = [[(i, 0) for i in range(s, min(s + 64, n))] for s in range(0, n, 64)]
        return DataLoader(dataset, batch_sampler=batches[rank::world], **common)
    sampler = EpochSampler(len(dataset), rank, world, cfg.batch_size // world, cfg.seed)
    return DataLoader(dataset, cfg.batch_size // world, sampler=sampler, drop_last=True, **common)


# -----------------------------------------------------------------------------
# Model: SimVQ's ImageNet-128 encoder / decoder (GroupNorm + SiLU, no attention), a PatchGAN
# -----------------------------------------------------------------------------

def Norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # 32 groups at every width of the paper


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, conv 3x3) twice, a 1x1 conv skip when the width changes, no conv
    biases (the GroupNorms carry them): SimVQ's ResBlock."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.block = nn.Sequential(
            Norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            Norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


def make_quantizer(cfg):
    K, D, beta, H = cfg.codebook_size, cfg.dim, cfg.beta, dict(usage_horizon=cfg.usage_horizon)
    vq = dict(H, buffer_size=None if cfg.replace else 0)
    dense = dict(H, alpha=cfg.alpha, tau=cfg.tau, tau_mode=cfg.tau_mode)
    return {"ste": lambda: nsvq.VectorQuantizer(K, D, beta, **vq),
            "ema": lambda: nsvq.EMAVectorQuantizer(K, D, beta, **vq),  # decay 0.99
            "simvq": lambda: nsvq.SimVQ(K, D, beta, **H),
            "fsq": lambda: nsvq.FSQ(nsvq.FSQ_LEVELS[K], D, **H),
            "simvq-ns": lambda: nsvq.NSSimVQ(K, D, beta, **dense),
            "nsvq": lambda: nsvq.NSVQ(K, D, beta, **dense)}[cfg.quantizer]()


class Autoencoder(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> latents (B, D, S/f, S/f), f = 2^(levels - 1) ->
    quantizer -> images: SimVQ's ImageNet-128 layout (configs/imagenet_simvq_128_B.yaml). Up:
    a conv to 4C channels and depth-to-space (theirs orders channels otherwise than
    pixel_shuffle: the same model up to a permutation of that conv's outputs)."""

    def __init__(self, cfg):
        super().__init__()
        chans, n = [cfg.ch * int(m) for m in cfg.ch_mult.split(",")], cfg.num_res_blocks
        enc, c = [nn.Conv2d(3, cfg.ch, 3, 1, 1, bias=False)], cfg.ch
        for level, c_out in enumerate(chans):
            for _ in range(n):
                enc.append(ResBlock(c, c_out))
                c = c_out
            if level < len(chans) - 1:
                enc.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
        enc += [ResBlock(c, c) for _ in range(n)] + [Norm(c), nn.SiLU(), nn.Conv2d(c, cfg.dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.vq = make_quantizer(cfg)
        dec = [nn.Conv2d(cfg.dim, c, 3, 1, 1)] + [ResBlock(c, c) for _ in range(n)]
        for level in reversed(range(len(chans))):
            for _ in range(n):
                dec.append(ResBlock(c, chans[level]))
                c = chans[level]
            if level > 0:
                dec += [nn.Conv2d(c, 4 * c, 3, 1, 1), nn.PixelShuffle(2)]  # upsample x2
        self.decoder = nn.Sequential(*dec, Norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, 1, 1))

    def forward(self, x):
        z_e = self.encoder(x)
        out = self.vq(z_e)
        return self.decoder(out.z_q), z_e, out

    @torch.no_grad()
    def encode(self, images):  # (B, 3, S, S) in [-1, 1] -> (B, S/f, S/f) code indices
        return self.vq(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices):  # (B, h, w) code indices -> (B, 3, f*h, f*w), about [-1, 1]
        return self.decoder(self.vq.decode(indices))


def make_discriminator(layers=3, width=64):
    """PatchGAN critic (pix2pix, taming; SimVQ's NLayerDiscriminator), a logit per patch; conv
    weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0, as theirs."""
    mods, c = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
    for n in range(1, layers + 1):
        c_out = width * min(2 ** n, 8)
        mods += [nn.Conv2d(c, c_out, 4, 2 if n < layers else 1, 1, bias=False),
                 nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        c = c_out
    disc = nn.Sequential(*mods, nn.Conv2d(c, 1, 4, 1, 1))
    for m in disc.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
    return disc


# -----------------------------------------------------------------------------
# Helpers: processes, files and checkpoints, the training step, logging
# -----------------------------------------------------------------------------

class OutputError(RuntimeError):
    """An output could not be written, or a checkpoint not read."""


class Stopped(Exception):
    """Every rank agreed to stop at this step (a signal): raised where the loop saves."""


def rank_of():
    return dist.get_rank() if dist.is_initialized() else 0


def setup_distributed(cfg):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; plain python is one process and no group."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
    # Training collectives time out after --timeout-minutes: a rank killed hard or a node gone
    # without a TCP reset would otherwise hold every GPU for the default hour (start_up: 60 min)
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def watch_for_failures(rank):
    """[DDP] An error on any rank stops every rank within seconds. Failure it prevents: after
    start-up, one rank's error leaves the others in a collective until the NCCL timeout (across
    nodes; torchrun ends one node's group). The failing rank writes its error to the store (the
    returned function); a thread on each rank polls it every second and ends its process. Keys
    per restart (the agent's store outlives a restart) and per error (none masks another)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(seconds=60))
    key = f"nsvq/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def watch(seen=0):
        while True:
            time.sleep(1.0)
            for n in range(seen + 1, store.add(key, 0) + 1):
                message, seen = store.get(f"{key}/{n}").decode(), n
                if not message.startswith(f"rank {rank}:"):
                    print(f"error: stopping, {message}", file=sys.stderr, flush=True)
                    os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    return lambda message: store.set(f"{key}/{store.add(key, 1)}", f"rank {rank}: {message}")


class Control:
    """What every rank must decide at the same step: stop (SIGTERM or SIGINT on any rank) and
    checkpoint (rank 0's clock). [DDP] One all_reduce of two numbers per step on a host-side
    (gloo) group: it never waits for the GPU. Later signals change nothing: SLURM signals every
    process and torchrun then its ranks, and a second signal must not kill the save."""

    def __init__(self, cfg, world):
        self.signal, self.period, self.last = 0, 60.0 * cfg.ckpt_minutes, time.time()
        timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(self, signum, frame):
        self.signal = self.signal or signum

    def poll(self):
        due = rank_of() == 0 and time.time() - self.last > self.period
        flags = torch.tensor([self.signal, due])
        if self.group is not None:
            dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.group)
        self.last = time.time() if flags[1] else self.last
        return int(flags[0]), bool(flags[1])

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def write_atomic(path, write):
    """Only rank 0 writes (a write from another rank is a bug, and fails loudly): write(tmp),
    then rename, so that a crash, a signal or a full disk never leaves half a file."""
    if rank_of() != 0:
        raise RuntimeError(f"rank {rank_of()} tried to write {path}: only rank 0 writes")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        raise OutputError(f"writing {path} failed ({str(e).strip()[:200]}); {free:.0f} MiB "
                          f"free on its disk") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def load_checkpoint(path):
    """A checkpoint of this script, on the CPU, memory-mapped (a truncated file fails at once,
    before anything is read); one-line errors for anything else."""
    if not os.path.isfile(path):
        raise OutputError(f"{path}: no such checkpoint file" + (" (a folder: --resume auto "
                          "--out FOLDER takes its newest)" if os.path.isdir(path) else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise OutputError(f"{path} is damaged or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "train_imagenet":
        holds = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise OutputError(f"{path} is not a train_imagenet.py checkpoint (it holds: {holds})")
    return ckpt


def load_autoencoder(path, device="cpu"):
    """The trained tokenizer, EMA weights: model.encode(images), model.decode(indices)."""
    ckpt = load_checkpoint(path)
    model = Autoencoder(Config(**ckpt["config"]))
    model.load_state_dict({**model.state_dict(), **ckpt["ema"]})  # the EMA keeps no upkeep
    return model.to(device).eval()


def build_trainer(cfg, device, lpips):
    """What a step touches, the same on every rank under one seed. The scaler hands found_inf to
    fused Adam, which skips a non-finite step on the device, no host read (bf16 and fp32 keep
    the scale at 1). The weight EMA leaves out the quantizer's upkeep (the pool: 32 MiB)."""
    model, disc = Autoencoder(cfg).to(device), make_discriminator().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    adam = dict(lr=cfg.lr, betas=(0.5, 0.9), fused=True)  # SimVQ's betas
    scale = {} if cfg.amp == "fp16" else {"init_scale": 1.0}
    pairs = [(e, b) for (name, e), b in zip(ema.named_buffers(), model.buffers())
             if "upkeep" not in name]
    return SimpleNamespace(
        model=model, ema=ema, disc=disc, lpips=lpips, train_model=None, train_disc=None,
        frozen=None, opt=torch.optim.Adam(model.parameters(), **adam),
        opt_d=torch.optim.Adam(disc.parameters(), **adam), scaler=torch.amp.GradScaler(
            device.type, **scale), scaler_d=torch.amp.GradScaler(device.type, **scale),
        ema_params=list(ema.parameters()), params=list(model.parameters()),
        ema_buffers=[e for e, _ in pairs], buffers=[b for _, b in pairs])


def apply_stage(cfg, trainer, schedule, world, device):
    """Freeze the encoder, switch the dense loss, (re)build what the step calls: DDP, then compile
    the DDP module (the all-reduce overlaps the backward pass); rebuilt at the freeze, which DDP
    must not see. No buffer syncing in forward: the quantizer keeps its buffers identical."""
    frozen = not schedule.encoder_trainable
    if hasattr(trainer.model.vq, "dense"):
        trainer.model.vq.dense = schedule.dense_loss
    ids = [device.index] if device.type == "cuda" else None
    wrap = lambda m: DDP(m, device_ids=ids, forward_sync_buffers=False) if world > 1 else m  # noqa
    build = (lambda m: torch.compile(wrap(m))) if cfg.compile else wrap
    if trainer.frozen != frozen:
        trainer.model.encoder.requires_grad_(not frozen)
        trainer.train_model, trainer.frozen = build(trainer.model), frozen
    trainer.train_disc = trainer.train_disc or build(trainer.disc)


def skipped(scaler, optimizer):
    """Device flags (non-finite gradients found, bad = found at a loss scale of at most 1: fp16's
    calibration skips at larger scales) from the scaler's (private, long stable) record of
    the step, after DDP's all-reduce, so every rank agrees."""
    found = sum(scaler._found_inf_per_device(optimizer).values()) > 0
    return found, found & (scaler._scale <= 1)


def autocast(cfg, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def train_step(cfg, trainer, x, gan_w, commitment, replace, refill, device):
    """One step in the method's order: autoencoder + quantizer + LPIPS + GAN, critic, upkeep,
    weight EMA (the loop's and bench.py's). It never waits for the device. Returns device
    tensors (losses, out, counts (K,), re-seeded mask or None, skipped, bad)."""
    with autocast(cfg, device):
        x_hat, z_e, out = trainer.train_model(x)
        losses = {"l1": (x_hat.float() - x).abs().mean()}
        if trainer.lpips is not None:
            losses["lpips"] = cfg.perceptual_weight * trainer.lpips(x_hat, x).mean()
        losses.update(out.losses)
        if not commitment and "commit" in losses:
            losses["commit"] = losses["commit"].detach() * 0  # the encoder is frozen: logged as 0
        if gan_w > 0:  # non-saturating, each image's mean logit; the raw critic (its gradients
            logits = trainer.disc(x_hat).float().flatten(1)  # here are discarded: no all-reduce)
            losses["gan"] = gan_w * F.softplus(-logits.mean(1)).mean()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.scaler.scale(sum(losses.values())).backward()
    trainer.scaler.step(trainer.opt)  # skipped, on the device, if a gradient is not finite
    found, bad = skipped(trainer.scaler, trainer.opt)
    trainer.scaler.update(None if cfg.amp == "fp16" else 1.0)
    if gan_w > 0:  # the critic's hinge loss, as taming and SimVQ; one dtype: one compiled graph
        with autocast(cfg, device):
            fake = x_hat.detach().float().contiguous()  # x's layout: no recompile for its strides
            real, fake = trainer.train_disc(x).float(), trainer.train_disc(fake).float()
            losses["disc"] = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        trainer.opt_d.zero_grad(set_to_none=True)
        trainer.scaler_d.scale(losses["disc"]).backward()
        trainer.scaler_d.step(trainer.opt_d)
        found, bad = (a | b for a, b in zip((found, bad), skipped(trainer.scaler_d, trainer.opt_d)))
        trainer.scaler_d.update(None if cfg.amp == "fp16" else 1.0)
    vq = trainer.model.vq  # the upkeep after the step: its collectives live in here
    counts = vq.update_(z_e.detach().float(), out.indices, refill=refill)
    reseeded = vq.replace_dead_codes_() if replace else None
    with torch.no_grad():  # the weight EMA for evaluation; re-seeded codes are copied
        torch._foreach_lerp_(trainer.ema_params, trainer.params, 1 - cfg.weight_ema)
        for ema_buffer, buffer in zip(trainer.ema_buffers, trainer.buffers):  # few and small
            ema_buffer.copy_(buffer)
        if reseeded is not None and vq.codebook_by_gradient:
            nsvq.reset_adam_state_(trainer.opt, vq.embedding, reseeded)
            codes = trainer.ema.vq.embedding
            codes.copy_(torch.where(reseeded[:, None], vq.embedding, codes))
    return {k: v.detach().float() for k, v in losses.items()}, out, counts, reseeded, found, bad


def log_line(cfg, state, schedule, window, trainer, t_log, world, log):
    """A log line and a metrics.jsonl record of the interval: losses (over its good steps),
    codebook health, the kernel, stage, speed, memory. [DDP] One all_reduce, then the interval's
    one read from the device (tolist). Returns the number of bad steps."""
    keys = sorted(window["sums"])
    local = torch.cat([torch.stack([window["sums"][k] for k in keys] + window["totals"]),
                       window["counts"]])
    if world > 1:
        dist.all_reduce(local)  # every rank's loss sums, step counts and code counts
    p = local[len(keys) + 4:] / local[len(keys) + 4:].sum().clamp(min=1)
    health = torch.stack([(p > 0).float().mean(), torch.exp(-(p * p.clamp(min=1e-30).log()).sum()),
                          trainer.model.vq.upkeep.dead().sum().float()])
    values = torch.cat([local[:len(keys) + 4], health]).tolist()  # the one wait for the device
    good, bad, found, reseeded = (v / world for v in values[len(keys):len(keys) + 4])
    record = {"step": state["step"], "epoch": state["epoch"], "stage": schedule.stage,
              **{k: v / max(good * world, 1) for k, v in zip(keys, values)},
              **dict(zip(("utilization", "perplexity", "dead"), values[-3:])), "reseeded": reseeded,
              "bad_steps": bad, "skipped_steps": found,
              "img_per_s": window["steps"] * cfg.batch_size / (time.time() - t_log)}
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    losses = " ".join(f"{k} {record[k]:.4f}" for k in keys)
    log(f"step {state['step']:7d} | ep {state['epoch']} {schedule.stage:6s} | {losses} | util "
        "{utilization:.1%} ppl {perplexity:.0f} dead {dead:.0f} re-seeded {reseeded:.0f} | "
        "{img_per_s:.0f} img/s bad {bad_steps:.0f} skipped {skipped_steps:.0f}".format(**record)
        + f" mem {mem:.1f}G")
    append_record(cfg, record)
    return bad


def append_record(cfg, record):
    if rank_of() == 0:
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def gather(obj, world):
    """[rank 0's obj, rank 1's, ...] on every rank (small host objects only)."""
    objs = [obj] * world
    if world > 1:
        dist.all_gather_object(objs, obj)
    return objs


def save_checkpoint(cfg, trainer, schedule, state, commit, world, device, log, tag=""):
    """Every rank's RNG states and epoch partial sums are gathered; rank 0 writes (synchronously:
    a few seconds at the paper preset, EXPERIMENTS.md 11) and prunes, never the new file."""
    cuda = torch.cuda.get_rng_state() if device.type == "cuda" else None
    rng = {"cpu": torch.get_rng_state(), "cuda": cuda}
    rngs, commits = gather(rng, world), gather(commit.detach().cpu(), world)  # (2,) per rank
    path = os.path.join(cfg.out, f"ckpt-{state['step']:09d}.pt")
    if rank_of() == 0:
        t0 = time.time()
        ckpt = {"kind": "train_imagenet", "config": dataclasses.asdict(cfg),
                "schedule": schedule.state_dict(),
                "ema": {k: v for k, v in trainer.ema.state_dict().items() if "upkeep" not in k},
                "state": copy.deepcopy(state), "rng": rngs, "commit": torch.stack(commits),
                **{k: getattr(trainer, k).state_dict() for k in STATEFUL}}
        write_atomic(path, lambda tmp: torch.save(ckpt, tmp))
        for old in checkpoints(cfg.out)[:-2]:  # the two newest stay
            if old != path:  # after a resume from an older checkpoint, new files sort older
                os.remove(old)
        log(f"saved {path} in {time.time() - t0:.1f} s {tag}")
    return path


STATEFUL = ("model", "disc", "opt", "opt_d", "scaler", "scaler_d")


def pick_checkpoint(cfg, log):
    """--resume's file: the path given, or (auto) the newest intact one in --out, the damaged
    ones named; None (auto, no checkpoint yet): a fresh start, as a requeued job's first launch."""
    if cfg.resume != "auto":
        return cfg.resume or None
    for path in reversed(checkpoints(cfg.out)):
        try:
            return load_checkpoint(path) and path
        except OutputError as e:
            log(f"warning: {e}")
    return None


MODEL = ("image_size", "ch", "ch_mult", "num_res_blocks", "dim", "quantizer", "codebook_size")


def restore(path, cfg, trainer, schedule, rank, world, device):
    """A checkpoint into the trainer: (loop state, this rank's commitment sum and count in the
    epoch so far: the epoch mean that drives the schedule is the uninterrupted run's)."""
    ckpt = load_checkpoint(path)
    for name in MODEL:
        if ckpt["config"][name] != getattr(cfg, name):
            raise OutputError(f"{path} holds a model with --{name.replace('_', '-')} "
                              f"{ckpt['config'][name]}, not {getattr(cfg, name)}: resume with "
                              f"the options it was trained with")
    trainer.ema.load_state_dict({**trainer.ema.state_dict(), **ckpt["ema"]})
    for name in STATEFUL:
        getattr(trainer, name).load_state_dict(ckpt[name])
    schedule.load_state_dict(ckpt["schedule"])
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    commits = ckpt["commit"]  # (saved world, 2)
    commit = commits[rank] if len(commits) == world else commits.sum(0) * (rank == 0)
    return dict(ckpt["state"]), commit.to(device)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def resolve(cfg):
    """Check the options (nsvq's classes and Adam check their numbers) and fill those left to
    the machine. Weight files given by path are checked even where this run would not use them."""
    cfg = dataclasses.replace(cfg)
    for name, choices in (("quantizer", ("nsvq", "simvq", "ema", "ste", "fsq", "simvq-ns")),
                          ("amp", ("auto", "bf16", "fp16", "none")),
                          ("device", ("auto", "cpu", "cuda"))):
        nsvq.check_choice("--" + name, getattr(cfg, name), choices)
    if not cfg.data:
        raise ValueError("--data is required: a folder holding train/ and val/")
    cfg.replace = cfg.quantizer == "nsvq" if cfg.replace is None else cfg.replace
    if cfg.replace and cfg.quantizer not in ("nsvq", "ste", "ema"):
        raise ValueError(f"--replace does not apply to {cfg.quantizer}: no per-code parameters")
    if cfg.quantizer == "fsq" and cfg.codebook_size not in nsvq.FSQ_LEVELS:
        raise ValueError(f"--quantizer fsq takes --codebook-size in {sorted(nsvq.FSQ_LEVELS)}")
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for low, names in ((1, ("image_size", "ch", "num_res_blocks", "epochs", "batch_size",
                            "log_every", "replace_every", "eval_images")),
                       (0, ("max_steps", "eval_every", "workers", "freeze_epoch"))):
        for name in names:
            nsvq.check_count(flag(name), getattr(cfg, name), low)
    for name, high in (("lr", None), ("gan_weight", None), ("perceptual_weight", None),
                       ("weight_ema", 1), ("ckpt_minutes", None), ("timeout_minutes", None)):
        nsvq.check_number(flag(name), getattr(cfg, name), 0, high, name.endswith("s"), True)
    levels = cfg.ch_mult.split(",")
    if not all(m.strip().isdigit() and int(m) > 0 for m in levels) or \
            cfg.image_size % 2 ** (len(levels) - 1):
        raise ValueError(f"--ch-mult must be n comma-separated positive integers, --image-size "
                         f"divisible by 2^(n - 1); got {cfg.ch_mult!r} and {cfg.image_size}")
    for option, value, files in (("--lpips-weights", cfg.lpips_weights, metrics.LPIPS_FILES),
                                 ("--inception", cfg.inception, metrics.INCEPTION_FILES)):
        for name in files if value not in ("auto", "none", "random") else []:
            metrics.weights_path(value, name, option)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda is not available here; use auto or cpu")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.amp = ("bf16" if cfg.device == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
    cfg.compile = cfg.device == "cuda" if cfg.compile is None else cfg.compile
    cfg.out = cfg.out or os.path.join("runs", "imagenet", cfg.quantizer)
    return cfg


def check_out(cfg):
    """Refuse an --out that is a file, unwritable, or holds a run; creates nothing (no folder)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise OutputError(f"--out {cfg.out} is a file, not a folder")
    parent = os.path.abspath(cfg.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OutputError(f"--out {cfg.out} cannot be made ({parent} is not a writable folder)")
    if not cfg.resume and not cfg.overwrite and os.path.isdir(cfg.out) and checkpoints(cfg.out):
        raise OutputError(f"--out {cfg.out} holds an earlier run: continue it with --resume "
                          f"auto, or pass --overwrite to start afresh (its checkpoints go)")


def main(cfg, report=None):
    """Train one run, or evaluate a finished one again with --resume; returns its results.
    report, a list, receives the function that tells the other ranks of an error (cli's)."""
    cfg, t_start = resolve(cfg), time.time()

    # Setup DDP
    rank, world, device = setup_distributed(cfg)
    if world > 1 and report is not None:
        report.append(watch_for_failures(rank))
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} ranks")
    torch.backends.cuda.matmul.allow_tf32 = False  # nearest-code distances at full fp32 precision
    torch.backends.cudnn.allow_tf32 = True  # training convolutions may use TF32 (not evaluation)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if rank == 0:
        check_out(cfg)

    # Create model: rank 0 fetches missing weights first and the others read its cache (for up
    # to an hour); one seed for construction on every rank, per-rank seeds only afterwards
    start_up = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=60)) \
        if world > 1 else None
    for first in (True, False):
        if (rank == 0) == first:
            lpips, nets = metrics.load_networks(cfg, device)
        if world > 1:
            dist.barrier(group=start_up)
    torch.manual_seed(cfg.seed)
    trainer = build_trainer(cfg, device, lpips)
    torch.manual_seed(cfg.seed + rank)
    staged = cfg.quantizer in ("nsvq", "simvq-ns")  # the baselines train in one stage, as published
    schedule = nsvq.StageSchedule(cfg.patience if staged else None,
                                  staged and cfg.freeze_epoch or None, cfg.warmup_epochs,
                                  cfg.gan_ramp_epochs, gan_stage1=cfg.gan_stage1 or not staged)
    state = {"epoch": 0, "batch": 0, "step": 0, "bad_steps": 0, "seconds": 0.0}
    commit = torch.zeros(2, device=device)  # this rank's commitment-loss sum and count this epoch
    path = gather(pick_checkpoint(cfg, log) if rank == 0 else None, world)[0]  # rank 0's choice
    if path:
        state, commit = restore(path, cfg, trainer, schedule, rank, world, device)
        log(f"resumed {path}: epoch {state['epoch']}, batch {state['batch']}, {schedule.stage}")
    earlier = state.setdefault("seconds", 0.0)  # the run's earlier sessions (older files: 0)

    # Setup data
    val_loader = make_loader(cfg, "val", rank, world, train=False)
    train_loader = make_loader(cfg, "train", rank, world, train=True)
    quick_loader = make_loader(cfg, "val", rank, world, False, cfg.eval_images) \
        if cfg.eval_every else None
    made = rank == 0 and not os.path.isdir(cfg.out)  # removed again if the run fails empty
    if rank == 0:  # a new run deletes an earlier run's files; any run, a killed save's
        os.makedirs(cfg.out, exist_ok=True)
        old = [] if path else checkpoints(cfg.out) + glob.glob(f"{cfg.out}/*.jsonl")
        for name in old + glob.glob(f"{cfg.out}/ckpt-*.pt.tmp*"):
            os.remove(name)
    control = Control(cfg, world)
    polls = min(gather(len(val_loader.batch_sampler), world))  # as many polls on every rank

    def stop_now(i):  # evaluation's check before batch i
        if i < polls and control.poll()[0]:
            raise Stopped()
    def save(tag=""):  # the wall time to this checkpoint, summed over the run's sessions
        state["seconds"] = earlier + time.time() - t_start
        return save_checkpoint(cfg, trainer, schedule, state, commit, world, device, log, tag)
    try:
        # Training loop
        apply_stage(cfg, trainer, schedule, world, device)
        steps_per_epoch, steps_this_run, t_log = train_loader.sampler.batches, 0, time.time()
        window = new_window(trainer, device)
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            train_loader.sampler.set_epoch(epoch, state["batch"])
            for images, _ in train_loader:
                x = (images.to(device, non_blocking=True).double() / 127.5 - 1.0).float()  # SimVQ's
                gan_w = schedule.gan_weight(epoch + state["batch"] / steps_per_epoch)
                refill = cfg.replace and schedule.replacement  # the pool serves replacement alone
                replace = refill and state["step"] % cfg.replace_every == 0
                losses, out, counts, reseeded, found, bad = train_step(
                    cfg, trainer, x, cfg.gan_weight * gan_w, schedule.commitment, replace, refill,
                    device)
                for k, v in {**losses, **out.diagnostics}.items():  # the window, on the device
                    window["sums"][k] = window["sums"].get(k, 0) + torch.where(bad, 0.0, v.float())
                window["totals"] = [a + b.float() for a, b in zip(window["totals"], (
                    ~bad, bad, found, reseeded.sum() if reseeded is not None else 0 * bad))]
                window["counts"] += counts
                window["steps"] += 1
                commit += torch.stack([torch.where(bad, 0.0, losses.get("commit", 0.0 * bad)),
                                       (~bad).float()])
                state.update(step=state["step"] + 1, batch=state["batch"] + 1)
                steps_this_run += 1
                if state["step"] % cfg.log_every == 0:
                    bad_steps = log_line(cfg, state, schedule, window, trainer, t_log, world, log)
                    state["bad_steps"] += int(bad_steps)
                    if bad_steps == window["steps"]:  # the same on every rank: all stop here
                        raise FloatingPointError(f"every step of the last {cfg.log_every} had "
                            f"non-finite gradients and was skipped (up to step {state['step']}); "
                            f"the checkpoints in {cfg.out} hold the last good weights")
                    window, t_log = new_window(trainer, device), time.time()
                signum, due = control.poll()
                if signum:
                    raise Stopped()
                if cfg.max_steps and steps_this_run >= cfg.max_steps:
                    return save("(--max-steps)") and None
                if due:
                    save()
            # End of epoch: the schedule sees the all-ranks mean commitment loss
            total = commit.clone()
            if world > 1:
                dist.all_reduce(total)
            commit.zero_()
            state.update(epoch=epoch + 1, batch=0)
            if schedule.end_epoch(epoch, float(total[0] / total[1].clamp(min=1))):
                log(f"stage change: {schedule.stage} from epoch {epoch + 1}")
                apply_stage(cfg, trainer, schedule, world, device)
                save(f"(entering {schedule.stage})")
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                record = metrics.quick_evaluation(trainer.ema, quick_loader, state, device, log)
                append_record(cfg, record)

        # Save and evaluate
        if steps_this_run:  # a finished run, resumed, is evaluated again
            save("(final)")
        result, pair = metrics.evaluate(trainer.ema, val_loader, nets, device, stop_now)
        result.update(stage_start=schedule.stage_start, bad_steps=state["bad_steps"],
                      steps=state["step"], seconds=state["seconds"])
        log(json.dumps(result))
        if rank == 0:
            write_atomic(f"{cfg.out}/results.json", lambda t: json.dump(result, open(t, "w")))
            write_atomic(f"{cfg.out}/recon-final.png", lambda t: pair.save(t, format="PNG"))
        return result
    except Stopped:  # saved, not finished: exit 128 + the signal, as a shell reports it
        path = save(f"(stopped by signal {control.signal})")
        print(f"stopped by signal {control.signal} at step {state['step']}; {path} holds the run: "
              f"continue it with --resume auto", file=sys.stderr, flush=True)
        raise SystemExit(128 + control.signal) from None
    except Exception:
        if made and not os.listdir(cfg.out):
            os.rmdir(cfg.out)
        raise
    finally:
        control.close()


def new_window(trainer, device):
    """Sums over a log interval, on the device: losses, step tallies, re-seeded codes, counts."""
    return {"sums": {}, "totals": [torch.zeros((), device=device)] * 4, "steps": 0,
            "counts": torch.zeros(trainer.model.vq.codebook_size, device=device)}


def parse_args(argv=None):
    """One option per Config field, with its help; the preset's values are the defaults and
    flags win over both; --name / --no-name for the switches."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        switch = f.type in (bool, Optional[bool])
        kind = dict(action=argparse.BooleanOptionalAction) if switch else dict(type=f.type)
        shown = "" if switch or f.default == "" else f" (paper: {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f.metadata["help"].replace("%", "%%") + shown, **kind)
    given = vars(parser.parse_args(argv))
    try:
        return make_config(given.pop("preset", "paper"), **given)
    except ValueError as e:
        parser.error(str(e))


def cli(argv=None):
    """The command line: one line for a user's mistake, the traceback for anything else (CUDA
    out of memory, NCCL, a bug); any error is told to every rank (watch_for_failures), then the
    process ends at once. Failure it prevents: at a normal exit multiprocessing waits, without
    a timeout, for loader workers that ignore SIGTERM; on os._exit they see their parent gone."""
    report = []
    try:
        main(parse_args(argv), report)
    except Exception as e:
        message = str(e).strip().splitlines()[-1] if "Original Traceback" in str(e) else str(e)
        if report:  # (a loader worker's error: its last line says it)
            report[0](f"{type(e).__name__}: {message}")
        if isinstance(e, (metrics.DataError, ValueError, FileNotFoundError, OutputError,
                          FloatingPointError, metrics.WeightsError)):
            print(f"error: {message}", file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # no teardown: [DDP] the others may sit in a collective with this rank
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli()
