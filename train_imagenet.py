"""
train_imagenet.py -- the full-scale NSVQ recipe: ImageNet-1k at 128x128, K = 65,536 codes.

    torchrun --nproc_per_node=4 train_imagenet.py --data /path/to/imagenet            # NSVQ, paper preset
    torchrun --nproc_per_node=4 train_imagenet.py --data ... --quantizer simvq        # the baseline
    torchrun --nproc_per_node=4 train_imagenet.py --data ... --resume auto            # continue a run
    torchrun --nproc_per_node=4 train_imagenet.py --data ... --eval-only --resume auto  # rFID etc.
    python train_imagenet.py --data ... --prepare --packed /fast/disk/in128           # optional packing
    python train_imagenet.py --preset tiny --data folder --device cpu --amp none      # CPU-sized

--data holds train/ and val/, each of class folders (<wnid>/*.JPEG) or of images directly.
--batch-size is the global batch (the paper: 4 GPUs x 32). A run stopped by SIGTERM / Ctrl-C
saves a checkpoint and exits with 143 / 130.
Outputs in --out (default runs/imagenet/<quantizer>): ckpt-*.pt, metrics.jsonl, recon-*.png,
results.json. A checkpoint is a tokenizer: see load_autoencoder() and the README.
Offline, pass the evaluation and LPIPS weights as files: --lpips-weights DIR, --inception FILE.
This is the twin of train_mnist.py: same helpers, same loop phases, plus what scale adds
(DDP, bf16, torch.compile, packed data, exact resume, preemption, LPIPS, rFID).
"""

import argparse
import copy
import dataclasses
import datetime
import glob
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import metrics
import nsvq


@dataclass
class Config:
    # data
    data: str = ""                       # ImageNet root: train/ and val/, each of class folders or
                                         # of image files (the official val archive is flat)
    packed: str = ""                     # folder of packed uint8 arrays (--prepare writes it)
    prepare: bool = False                # pack --data into --packed, then exit
    image_size: int = 128                # SimVQ's ImageNet setting
    workers: int = 8                     # DataLoader workers per rank (EXPERIMENTS.md: loader)
    out: Optional[str] = None            # output folder (default runs/imagenet/<quantizer>)
    overwrite: bool = False              # start afresh in an --out that holds an earlier run
    preset: str = "paper"                # paper | tiny (a CPU-sized model for tests)
    preset_applied: bool = False         # internal: True once the preset's values are filled in
    # model: SimVQ's ImageNet-128 encoder and decoder
    ch: int = 128                        # base channels
    ch_mult: str = "1,2,2,4"             # per level; 128 -> 16x16 tokens
    num_res_blocks: int = 2              # per level, and in the middle
    dim: int = 128                       # D, code dimension
    # quantizer
    quantizer: str = "nsvq"              # nsvq | simvq | ema | ste | simvq-ns (SimVQ + the dense loss
                                         # and the stages, as the paper also trains it)
    codebook_size: int = 65536           # K (the paper's headline)
    beta: float = 0.25                   # commitment weight (VQ-VAE; SimVQ)
    ema_decay: float = 0.99              # EMAVectorQuantizer decay (VQ-VAE-2)
    alpha: float = 0.1                   # dense-loss weight (the paper, as best known)
    tau: float = 1.0                     # kernel temperature, in units given by tau_mode
    tau_mode: str = "relative"           # relative: units of the batch's mean squared distance to the
                                         # nearest code (scale-free; chosen by the scale simulation)
                                         # | absolute: squared-distance units (the paper's 0.35)
    weighting: str = "softmax"           # softmax (paper) | clamped (authors' earlier code)
    lam: float = 0.01                    # clamp scale for weighting=clamped
    replace_from: str = "latents"        # latents (authors' earlier code) | codes (paper)
    threshold: float = 0.01              # dead = usage below threshold / K
    usage_horizon: float = 64.0          # usage memory in expected assignments per code (scale-free)
    replace_every: int = 10              # steps between replacement calls (each waits on the device
                                         # once); 5 expected assignments per code at the paper's scale
    # losses (SimVQ's recipe)
    l1_weight: float = 1.0               # pixel L1
    perceptual_weight: float = 1.0       # LPIPS-VGG training loss; 0 trains without it
    gan_weight: float = 0.1              # generator's adversarial weight (PatchGAN, hinge critic)
    # stages (nsvq and simvq-ns; the baselines train in one stage, as published)
    patience: int = 10                   # epochs without a new best commitment loss (paper)
    freeze_epoch: Optional[int] = 60     # freeze by then at the latest (ours; 0: plateau only)
    warmup_epochs: int = 2               # encoder frozen, no GAN (ours: the paper gives none)
    gan_ramp_epochs: int = 2             # stage-2 GAN ramp (paper)
    gan_stage1: bool = True              # the GAN in stage 1 too, from step 0 (ours: the sources leave
                                         # its start open; on MNIST, keeping it out was steadier)
    # optimisation
    epochs: int = 70                     # (the paper, as best known; SimVQ's config: 50)
    batch_size: int = 128                # global batch, split evenly across ranks
    lr: float = 1e-4                     # Adam, no schedule (SimVQ)
    beta1: float = 0.5                   # (SimVQ)
    beta2: float = 0.9                   # (SimVQ)
    weight_ema: float = 0.999            # EMA of the weights, used for evaluation (SimVQ uses one)
    # engine
    device: str = "auto"                 # auto | cpu | cuda
    amp: str = "bf16"                    # bf16 | fp16 (loss scaling, as SimVQ's 16-mixed) | none
    compile: bool = True                 # torch.compile the autoencoder and the critic's step
    deterministic: bool = False          # deterministic CUDA kernels, so a CUDA run and its resume
                                         # repeat bitwise (CPU runs always do); cost: README
    cudnn_benchmark: bool = False        # let cuDNN time its convolution algorithms (judge on a GPU)
    channels_last: bool = False          # NHWC memory format for the convolutions (judge on a GPU)
    dist_timeout: float = 60.0           # minutes a collective may wait (rank 0's first weight
                                         # downloads, a slow disk) before the run fails
    seed: int = 0
    resume: str = ""                     # '' | auto (newest intact checkpoint in --out) | a path
    max_steps: int = 0                   # stop (with a checkpoint) after this many steps; 0: no limit
    ckpt_minutes: float = 30.0           # minutes between checkpoints (also at stage changes, stops
                                         # and the end); each one is 1.18 GiB at the paper preset
    ckpt_every: int = 0                  # steps between checkpoints instead (0: by --ckpt-minutes)
    keep_ckpts: int = 2                  # how many checkpoints to keep
    log_every: int = 100                 # steps between log lines (the only reads from the device)
    max_bad_steps: int = 20              # stop when this many steps in a row had a non-finite loss
    check_codebook: bool = False         # debug: compare the quantizer across ranks at each log line
    # evaluation (SimVQ's protocol; README)
    eval_only: bool = False              # evaluate the checkpoint given by --resume, then exit
    eval_batch: int = 64                 # per rank; PSNR is averaged over batches of this size
    eval_every: int = 10                 # epochs between evaluations (and always at the end)
    max_eval_images: int = 0             # 0: the whole val split (50k)
    lpips_weights: str = "auto"          # auto (download) | DIR with the LPIPS files | random (tests)
    eval_lpips: bool = True              # report LPIPS-AlexNet and LPIPS-VGG
    inception: str = "auto"              # auto (download) | FILE pt_inception-2015-12-05-6726825d.pth
                                         # | none (no rFID) | random (tests)
    bench_loader: int = 0                # time this many loader batches, then exit
    quiet: bool = False                  # no progress bars


PRESETS = {
    "paper": {},
    "tiny": dict(image_size=32, ch=16, ch_mult="1,2", num_res_blocks=1, dim=8, codebook_size=256,
                 epochs=3, batch_size=8, freeze_epoch=1, warmup_epochs=1, gan_ramp_epochs=1,
                 workers=0, compile=False, perceptual_weight=0.0, eval_lpips=False, inception="none",
                 log_every=2, replace_every=1, eval_batch=8),
}
QUANTIZERS = ("nsvq", "simvq", "ema", "ste", "simvq-ns")


def make_config(preset="paper", **changes):
    """A Config from a preset, with `changes` taking precedence (what --preset and flags do)."""
    nsvq.check_choice("preset", preset, tuple(PRESETS))
    return Config(**{**PRESETS[preset], **changes, "preset": preset, "preset_applied": True})


# -----------------------------------------------------------------------------
# Data: image folders (Pillow) or packed uint8 arrays (memory-mapped)
# -----------------------------------------------------------------------------

class DataError(RuntimeError):
    """The data folder is missing, empty, or not what the config expects."""


IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# SimVQ's loader leaves this training image out; so do we, so that both train on the same files.
SIMVQ_SKIPPED = ("n06596364_9591.JPEG",)


def list_images(root, split):
    """Image files of a split, sorted: <split>/<class>/* and <split>/* (reconstruction needs no
    labels, and the official validation archive unpacks to one flat folder of 50,000 JPEGs)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder}: --data must hold train/ and val/ (class folders or images)")
    candidates = glob.glob(os.path.join(folder, "*", "*")) + glob.glob(os.path.join(folder, "*"))
    files = sorted(p for p in candidates if p.lower().endswith(IMAGE_EXTS) and os.path.isfile(p)
                   and os.path.basename(p) not in SIMVQ_SKIPPED)
    if not files:
        raise DataError(f"{folder} holds no images (*.JPEG, *.png, ...), neither in class folders nor flat")
    return files


def read_rgb(path):
    """An image file as 8-bit RGB. 16-bit grey images are scaled (65535 -> 255), not clipped
    as Pillow's convert("RGB") would; float images are refused with a ValueError."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16L", "I;16B", "I"):
            levels = np.asarray(img, dtype=np.float64)
            if levels.min() < 0 or levels.max() > 65535:
                raise ValueError(f"{img.mode} image with values outside 0..65535")
            img = Image.fromarray(np.round(levels / 257).astype(np.uint8), "L")
        elif img.mode == "F":
            raise ValueError("32-bit float images are not supported")
        return img.convert("RGB")


def resize_and_crop(img, size, offset_rng=None):
    """torchvision's Resize(size) + RandomCrop(size) (train) or CenterCrop(size) (val) on a
    Pillow image, as SimVQ's loader: bilinear (Pillow's, antialiased), the short side to
    `size`, the long side to int(size * long / short); the centre crop rounds its offset."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    if new != (w, h):
        img = img.resize(new, Image.BILINEAR)
    w, h = img.size
    if offset_rng is None:
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    else:
        left, top = offset_rng.randint(0, w - size), offset_rng.randint(0, h - size)
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """Items are (index, epoch) keys from a sampler -> (uint8 image (3, S, S), misses), misses =
    tensor([index, n]): files index .. index + n - 1 could not be read (n = 0: none).

    The random crop is a function of (seed, epoch, index), so a resumed run sees the same crops.
    An unreadable file is replaced by the next one; the loop counts each such file once, however
    often it is drawn (the first ten are named, per worker).
    """

    MAX_SKIP = 100

    def __init__(self, root, split, size, train, seed):
        self.files, self.size, self.train, self.seed = list_images(root, split), size, train, seed
        self.warned = 0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch = key
        tries = min(len(self.files), self.MAX_SKIP)
        for skipped in range(tries):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                img = read_rgb(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.warned += 1
                if self.warned <= 10:  # per worker process; all of them are counted in the log
                    print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            rng = random.Random(hash((self.seed, epoch, index))) if self.train else None
            array = np.asarray(resize_and_crop(img, self.size, rng))
            return torch.from_numpy(array.copy()).permute(2, 0, 1), torch.tensor([index, skipped])
        raise DataError(f"{tries} unreadable images in a row from {self.files[index]}: is --data right?")


class PackedImages(Dataset):
    """Images packed by --prepare: <split>.u8 of shape (N, S, S, 3) read by memory mapping."""

    def __init__(self, folder, split, size):
        meta_path = os.path.join(folder, f"{split}.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"no {meta_path}: run with --prepare first")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            n, packed_size = int(meta["n"]), int(meta["size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path} is not a packing record ({e}); run --prepare again") from None
        if packed_size != size:
            raise DataError(f"{folder}/{split}: packed at {packed_size}px, config wants {size}px")
        path = os.path.join(folder, f"{split}.u8")
        expected = n * size * size * 3
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            raise DataError(f"{path}: expected {expected} bytes for {n} images, "
                            f"found {os.path.getsize(path) if os.path.isfile(path) else 'no file'}")
        self.array = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        return torch.from_numpy(np.array(self.array[key[0]])).permute(2, 0, 1), torch.tensor([key[0], 0])


class EpochSampler(Sampler):
    """This rank's share of one training epoch as (index, epoch) keys; deterministic, resumable.

    Every rank draws the same permutation (seed + epoch), keeps whole global batches (the tail
    is dropped) and takes every world-th index; set_epoch(epoch, start_batch) skips the global
    batches a resumed run has already done.
    """

    def __init__(self, n, rank, world, local_batch, seed):
        self.n, self.rank, self.world, self.local_batch = n, rank, world, local_batch
        self.seed, self.epoch, self.start = seed, 0, 0
        self.batches = n // (world * local_batch)  # global batches per epoch
        if self.batches == 0:
            raise DataError(f"{n} training images are fewer than one global batch ({world * local_batch})")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches * self.world * self.local_batch][self.rank::self.world]
        return iter([(int(i), self.epoch) for i in mine[self.start * self.local_batch:]])

    def __len__(self):
        return (self.batches - self.start) * self.local_batch


def eval_batches(n, batch, rank, world):
    """Batches of `batch` consecutive images (as SimVQ's evaluation reads the val split),
    dealt round-robin to the ranks: batch b goes to rank b % world. Lists of (index, 0) keys."""
    batches = [[(i, 0) for i in range(start, min(start + batch, n))] for start in range(0, n, batch)]
    return batches[rank::world]


def make_loader(cfg, split, rank, world, train):
    if cfg.packed and not cfg.prepare:
        dataset = PackedImages(cfg.packed, split, cfg.image_size)
    else:
        dataset = ImageFolder(cfg.data, split, cfg.image_size, train, cfg.seed)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=cfg.workers > 0,
                  # Its own generator: a DataLoader iterator otherwise draws its worker seed from the
                  # global RNG, and a resumed run would create it at another point of that stream.
                  generator=torch.Generator().manual_seed(cfg.seed))
    if not train:
        n = min(cfg.max_eval_images or len(dataset), len(dataset))
        return DataLoader(dataset, batch_sampler=eval_batches(n, cfg.eval_batch, rank, world), **common)
    local_batch = cfg.batch_size // world
    sampler = EpochSampler(len(dataset), rank, world, local_batch, cfg.seed)
    return DataLoader(dataset, local_batch, sampler=sampler, drop_last=True, **common)


def prepare(cfg):
    """Pack train and val once into uint8 arrays (Resize + CenterCrop) for memory-mapped reading.

    Packed training data has no random crop (every image is its centre crop): the price of
    not decoding JPEGs every epoch. Written to temporary names and renamed when complete.
    """
    if os.path.exists(cfg.packed) and not os.path.isdir(cfg.packed):
        raise OutputError(f"--packed {cfg.packed} is a file, not a folder")
    os.makedirs(cfg.packed, exist_ok=True)
    for split in ("val", "train"):
        dataset = ImageFolder(cfg.data, split, cfg.image_size, train=False, seed=cfg.seed)
        S, n = cfg.image_size, len(dataset)
        path = os.path.join(cfg.packed, f"{split}.u8")
        check_free_space(path, n * S * S * 3)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, S, S, 3))
            loader = DataLoader(dataset, 256, sampler=[(i, 0) for i in range(n)], num_workers=cfg.workers)
            done, unreadable = 0, set()
            for images, misses in tqdm(loader, desc=f"packing {split}", disable=cfg.quiet):
                out[done:done + len(images)] = images.permute(0, 2, 3, 1).numpy()
                done += len(images)
                for index, m in misses.tolist():
                    unreadable.update((index + j) % n for j in range(m))
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        write_json_atomic({"n": n, "size": S, "unreadable": len(unreadable)}, os.path.join(cfg.packed, f"{split}.json"))
        print(f"packed {n} {split} images into {path} ({len(unreadable)} unreadable files replaced)")


def to_model_range(images):
    """uint8 images (B, 3, S, S) -> float32 in [-1, 1], as SimVQ's loader computes it
    (u / 127.5 - 1 in float64, then float32), so evaluation sees the same numbers."""
    return (images.double() / 127.5 - 1.0).float()


# -----------------------------------------------------------------------------
# Model: SimVQ's ImageNet-128 encoder / decoder (GroupNorm + SiLU, no attention), a PatchGAN
# -----------------------------------------------------------------------------

def Norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # 32 groups at every width of the paper preset


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv 3x3 (twice), with a 1x1 conv skip when the width changes; no biases
    in the convolutions (the GroupNorms carry them), as SimVQ's ResBlock."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.block = nn.Sequential(Norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                                   Norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class Upsample(nn.Module):
    """x2 by a conv to 4C channels and depth-to-space, as SimVQ's decoder. (Their depth-to-space
    orders the channels differently from pixel_shuffle; with i.i.d. initial weights the two are
    the same model up to a permutation of this conv's output channels.)"""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, 1, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


def make_quantizer(cfg):
    K, D = cfg.codebook_size, cfg.dim
    upkeep = dict(beta=cfg.beta, replace_from=cfg.replace_from, usage_horizon=cfg.usage_horizon,
                  buffer_size=None if cfg.quantizer == "nsvq" else 0)  # the baselines replace no code
    if cfg.quantizer == "ste":
        return nsvq.VectorQuantizer(K, D, **upkeep)
    if cfg.quantizer == "ema":
        return nsvq.EMAVectorQuantizer(K, D, decay=cfg.ema_decay, **upkeep)
    if cfg.quantizer == "simvq":
        return nsvq.SimVQ(K, D, beta=cfg.beta, usage_horizon=cfg.usage_horizon)
    dense = dict(alpha=cfg.alpha, tau=cfg.tau, tau_mode=cfg.tau_mode, weighting=cfg.weighting, lam=cfg.lam)
    if cfg.quantizer == "simvq-ns":  # no per-code parameters: nothing to re-seed
        return nsvq.NSSimVQ(K, D, beta=cfg.beta, usage_horizon=cfg.usage_horizon, **dense)
    return nsvq.NSVQ(K, D, **dense, **upkeep)


class Autoencoder(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> latents (B, D, S/f, S/f) -> quantizer -> images,
    f = 2^(len(ch_mult) - 1). The layout of SimVQ's ImageNet-128 model (configs/
    imagenet_simvq_128_B.yaml, its improved_model Encoder / Decoder)."""

    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * int(m) for m in cfg.ch_mult.split(",")]
        n = cfg.num_res_blocks
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
                dec.append(Upsample(c))
        dec += [Norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, x):
        z_e = self.encoder(x)
        out = self.vq(z_e)
        return self.decoder(out.z_q), z_e, out

    @torch.no_grad()
    def encode(self, images):
        """Images (B, 3, S, S) in [-1, 1] -> code indices (B, S/f, S/f)."""
        return self.vq(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices):
        """Code indices (B, h, w) -> images (B, 3, f*h, f*w) in about [-1, 1]."""
        return self.decoder(self.vq.decode(indices))


def make_discriminator(layers=3, width=64):
    """PatchGAN critic (pix2pix / taming, SimVQ's NLayerDiscriminator): one logit per patch.
    Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0, as theirs."""
    mods, c = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
    for n in range(1, layers + 1):
        c_out = width * min(2 ** n, 8)
        mods += [nn.Conv2d(c, c_out, 4, 2 if n < layers else 1, 1, bias=False),
                 nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        c = c_out
    mods.append(nn.Conv2d(c, 1, 4, 1, 1))
    disc = nn.Sequential(*mods)
    for m in disc.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return disc


def generator_gan_loss(logits):
    """Non-saturating generator loss on each image's mean logit, as SimVQ: softplus(-mean)."""
    return F.softplus(-logits.float().flatten(1).mean(1)).mean()


def critic_hinge_loss(logits_real, logits_fake):
    """Hinge loss of the critic, as taming / SimVQ: 0.5 (E relu(1 - real) + E relu(1 + fake))."""
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


# -----------------------------------------------------------------------------
# Helpers: distributed setup, files and checkpoints, the training step, logging, evaluation
# -----------------------------------------------------------------------------

def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs one process, no group."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device not in ("cpu", "cuda") or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"--device {cfg.device} is not available here; use auto, cpu or cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
    # An explicit timeout: the default (10 min for NCCL) is shorter than rank 0's first download of
    # the LPIPS and Inception weights on a slow link, which the other ranks wait for.
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


LOG_LOCK = threading.Lock()


def print_log(*parts):
    """Rank 0's log: one write per line, flushed at once (torchrun pipes stdout), and whole lines
    only (the checkpoint writer's thread logs too)."""
    with LOG_LOCK:
        sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
        sys.stdout.flush()


def dist_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def memory_format(cfg):
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def autocast(cfg, device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


class OutputError(RuntimeError):
    """An output could not be written (full disk, read-only folder) or a checkpoint not read."""


def check_free_space(path, needed):
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"cannot write {path}: {free / 2**20:.0f} MiB free on its disk, "
                          f"about {needed / 2**20:.0f} MiB needed")


def only_rank_zero(path):
    """Every file is written by rank 0: another rank writing one is a bug, and fails loudly."""
    if dist_rank() != 0:
        raise RuntimeError(f"rank {dist_rank()} tried to write {path}: only rank 0 writes files")


def write_atomic(path, write, needed=0):
    """write(tmp) to a temporary file unique to this process, then rename it to `path`: a
    crash, a signal or a full disk never leaves half a file, and the temporary file is removed."""
    only_rank_zero(path)
    check_free_space(path, needed)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OutputError):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OutputError(f"writing {path} failed ({reason}); {free / 2**20:.0f} MiB free on its "
                          f"disk, about {needed / 2**20:.0f} MiB needed") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tensor_bytes(obj):
    """Bytes of all tensors in a nested checkpoint object (a checkpoint's size, within a few %)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp), needed=tensor_bytes(obj) + 2**20)


def write_json_atomic(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def load_checkpoint(path):
    """A checkpoint of this script, loaded to the CPU (RNG states must stay CPU tensors; the
    caller moves model and optimizer state to its device). One-line errors for a file that is
    truncated, not a checkpoint, or another script's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OutputError(f"{path} is not a readable checkpoint (truncated, or not a torch file: "
                          f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "train_imagenet":
        kind = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise OutputError(f"{path} is not a train_imagenet.py checkpoint (it holds: {kind})")
    return ckpt


def find_checkpoint(cfg, log):
    """The checkpoint path for --resume: the given file, or with 'auto' the newest intact one.

    Rank 0 only. An unreadable checkpoint is renamed to *.unreadable (and the log says so): left
    in place it would keep ranking as the newest, and pruning would delete good ones instead.
    """
    if cfg.resume != "auto":
        if not os.path.isfile(cfg.resume):
            raise FileNotFoundError(f"--resume {cfg.resume}: no such file")
        load_checkpoint(cfg.resume)
        return cfg.resume
    for path in reversed(checkpoints(cfg.out)):
        try:
            load_checkpoint(path)
            return path
        except OutputError as e:
            os.replace(path, path + ".unreadable")
            log(f"warning: {e}; moved it to {path}.unreadable, trying an older checkpoint")
    raise FileNotFoundError(f"--resume auto: no intact checkpoint in {cfg.out}")


def on_rank_zero(fn, *args, share=True):
    """fn(*args) on rank 0; if it raises one of this script's errors, every rank raises it (no
    rank is left waiting in a collective). Returns its result on every rank (share=False: on
    rank 0 only, for results that are not worth sending, such as networks)."""
    result = [None, None]  # value, error
    if dist_rank() == 0:
        try:
            result[0] = fn(*args)
        except (DataError, ValueError, FileNotFoundError, OutputError, metrics.WeightsError) as e:
            result[1] = e
    value = result[0]
    if not share:
        result[0] = None
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise result[1]
    return value if dist_rank() == 0 else result[0]


def load_autoencoder(path, device="cpu"):
    """A trained tokenizer (the EMA weights): model.encode(images), model.decode(indices)."""
    ckpt = load_checkpoint(path)
    model = Autoencoder(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval()


def load_networks(cfg, device):
    """(LPIPS-VGG for the training loss or None, evaluation networks) -- all loaded at start-up,
    so missing weights stop the run before its first step, naming the option that fixes it."""
    if cfg.perceptual_weight > 0 and cfg.lpips_weights == "random":
        raise ValueError("--lpips-weights random is for tests and timing: a random VGG is no "
                         "perceptual loss. Pass the LPIPS files, or --perceptual-weight 0")
    vgg = metrics.LPIPS("vgg", cfg.lpips_weights).to(device) if cfg.perceptual_weight > 0 or cfg.eval_lpips else None
    nets = {"inception": metrics.InceptionFID(cfg.inception).to(device) if cfg.inception != "none" else None,
            "lpips_vgg": vgg if cfg.eval_lpips else None,
            "lpips_alex": metrics.LPIPS("alex", cfg.lpips_weights).to(device) if cfg.eval_lpips else None}
    return (vgg if cfg.perceptual_weight > 0 else None), nets


@dataclass
class Trainer:
    """Everything one training step touches. `model`, `disc`, `ema` are the raw modules (saved in
    checkpoints); `train_model` / `train_disc` are what the step calls (compiled, DDP-wrapped);
    `gan_disc` is the critic for the generator's term (the raw one: apply_stage says why);
    `frozen`: whether train_model was built with the encoder frozen."""
    model: nn.Module
    ema: nn.Module
    disc: nn.Module
    lpips: Optional[nn.Module]
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    train_model: nn.Module = None
    train_disc: nn.Module = None
    gan_disc: nn.Module = None
    frozen: bool = False


def build_trainer(cfg, device, lpips):
    """Model, critic, weight EMA, fused Adam and GradScalers. Call under the same seed on every
    rank: every rank builds the same weights, codebook and quantizer buffers."""
    model = Autoencoder(cfg).to(device, memory_format=memory_format(cfg))
    disc = make_discriminator().to(device, memory_format=memory_format(cfg))
    ema = copy.deepcopy(model).requires_grad_(False)
    # Fused Adam + GradScaler skip a step whose gradients are not finite without the host
    # reading any flag: the scaler hands found_inf to the fused kernel, which then does nothing.
    # Under bf16 / fp32 the scale starts at 1 and only halves on a skipped step (exact in
    # binary floating point); fp16 uses the usual dynamic loss scaling.
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    scaling = {} if cfg.amp == "fp16" else dict(init_scale=1.0, growth_interval=2 ** 30)
    return Trainer(model, ema, disc, lpips, torch.optim.Adam(model.parameters(), **adam),
                   torch.optim.Adam(disc.parameters(), **adam),
                   torch.amp.GradScaler(device.type, **scaling), torch.amp.GradScaler(device.type, **scaling))


def apply_stage(cfg, trainer, schedule, world, device):
    """Freeze the encoder and switch the quantizer's terms; (re)build what the step calls.

    DDP first, then torch.compile of the DDP module: the compiler splits the graph at DDP's
    bucket boundaries, so the gradient all-reduce overlaps the backward pass. The model's wrapper
    is rebuilt when the encoder freezes (DDP must not be told about a change of requires_grad on
    a live wrapper); warm-up and stage 2 train the same parameters and share it. The critic's
    step is wrapped and compiled once; the generator's adversarial term runs the raw critic in
    eager mode (its critic gradients are thrown away, so they need no all-reduce, and a second
    compiled graph for a small network is not worth its compile time). No buffer syncing in
    forward: the quantizer keeps its own buffers identical on every rank (its collectives live
    in update_ and replace_dead_codes_), and the critic's BatchNorm running statistics are never
    used (the critic always runs in training mode)."""
    frozen = not schedule.encoder_trainable
    if isinstance(trainer.model.vq, nsvq.NSVQ):
        trainer.model.vq.dense = schedule.dense_loss
    ids = [device.index] if device.type == "cuda" else None
    if trainer.train_model is None or trainer.frozen != frozen:
        trainer.model.encoder.requires_grad_(not frozen)
        model = DDP(trainer.model, device_ids=ids, forward_sync_buffers=False) if world > 1 else trainer.model
        trainer.train_model, trainer.frozen = torch.compile(model) if cfg.compile else model, frozen
    if trainer.train_disc is None:
        critic = DDP(trainer.disc, device_ids=ids, forward_sync_buffers=False) if world > 1 else trainer.disc
        trainer.train_disc = torch.compile(critic) if cfg.compile else critic
        trainer.gan_disc = trainer.disc


def skipped(scaler, optimizer):
    """True (a device tensor) when the scaler found a non-finite gradient and so skipped the
    optimizer's step. Gradients are all-reduced before the check, so every rank agrees. Read
    from the scaler's own record of this step (no wait on the device; a private attribute,
    stable since GradScaler was introduced)."""
    return sum(scaler._found_inf_per_device(optimizer).values()) > 0


def train_step(cfg, trainer, x, gan_w, commitment, replace, refill, device):
    """One training step, the one definition the loop and bench.py --imagenet both run:
    autoencoder + quantizer + LPIPS + GAN, the critic, codebook upkeep, the weight EMA.

    Returns (losses, out, counts, bad, dead): device tensors, nothing read on the host, except
    when `replace` is set: replacement reads how many codes are dead (one wait on the device),
    and `dead` holds the indices it re-seeded (None without replacement). `bad`: the step (or
    the critic's) was skipped for a non-finite gradient, the same flag on every rank. `refill`:
    keep the quantizer's latent pool fresh (only needed while codes may be replaced).
    """
    with autocast(cfg, device):
        x_hat, z_e, out = trainer.train_model(x)
        losses = {"l1": cfg.l1_weight * (x_hat.float() - x).abs().mean()}
        if trainer.lpips is not None:
            losses["lpips"] = cfg.perceptual_weight * trainer.lpips(x_hat, x).mean()
        losses.update(out.losses)
        if not commitment:
            losses["commit"] = losses["commit"].detach() * 0  # encoder frozen: nothing to commit
        if gan_w > 0:
            losses["gan"] = gan_w * generator_gan_loss(trainer.gan_disc(x_hat))
    trainer.opt.zero_grad(set_to_none=True)
    trainer.scaler.scale(sum(losses.values())).backward()
    trainer.scaler.step(trainer.opt)  # skipped, on the device, if a gradient is not finite
    bad = skipped(trainer.scaler, trainer.opt)
    trainer.scaler.update()
    if gan_w > 0:  # the critic's step: inputs of one dtype and layout, so one compiled graph serves both
        fake = x_hat.detach().float().contiguous(memory_format=memory_format(cfg))
        with autocast(cfg, device):
            d_loss = critic_hinge_loss(trainer.train_disc(x), trainer.train_disc(fake))
        trainer.opt_d.zero_grad(set_to_none=True)
        trainer.scaler_d.scale(d_loss).backward()
        trainer.scaler_d.step(trainer.opt_d)
        bad = bad | skipped(trainer.scaler_d, trainer.opt_d)
        trainer.scaler_d.update()
        losses["disc"] = d_loss.detach()
    # Codebook upkeep after the step, in the method's order; the collectives live in here.
    vq = trainer.model.vq
    counts = vq.update_(z_e.detach().float(), out.indices, refill=refill)
    dead = None
    if replace:
        dead = vq.replace_dead_codes_(cfg.threshold)
        if vq.codebook_by_gradient:
            nsvq.reset_adam_state_(trainer.opt, vq.embedding, dead)
    with torch.no_grad():  # the weight EMA for evaluation; buffers are copied
        torch._foreach_lerp_(list(trainer.ema.parameters()), list(trainer.model.parameters()),
                             1 - cfg.weight_ema)
        torch._foreach_copy_(list(trainer.ema.buffers()), list(trainer.model.buffers()))
        if dead is not None and vq.codebook_by_gradient:
            trainer.ema.vq.embedding[dead] = vq.embedding[dead]  # re-seeded codes: copied, not averaged
    losses = {k: v.detach().float() for k, v in losses.items()}
    return losses, out, counts, bad, dead


class RunFlags:
    """Two decisions every rank must take after the same step, without the host waiting on the
    device each step: stop (SIGTERM / SIGINT received by any rank) and save (rank 0's clock
    says a checkpoint is due; with --ckpt-minutes). Each step all ranks MAX-reduce their local
    flags on the device and start copying the result to the host; the loop reads the result of
    two steps back, which has long arrived (reading last step's would stall the GPU queue).

    The save flag is the number of checkpoint periods elapsed on rank 0's clock: a checkpoint is
    due when it exceeds the one last saved, so flags still in flight cannot ask twice."""

    def __init__(self, device, ckpt_minutes):
        self.signal = 0  # the signal number received (0: none)
        self.device = device
        self.start, self.period = time.time(), 60 * ckpt_minutes
        self.saved_period = 0
        self.pending = []  # (host flags, CUDA event or None), oldest first
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self):
        """Give SIGTERM and SIGINT back to the handlers they had before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.signal = signum  # a second signal ends the process at once
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def poll(self):
        """Call once per step: (signal number or 0, checkpoint due), agreed by all ranks."""
        periods = (time.time() - self.start) // self.period if self.period and dist_rank() == 0 else 0
        flags = torch.full((2,), float(self.signal), device=self.device)  # kernels, no host copy
        flags[1] = float(periods)
        all_reduce(flags, dist.ReduceOp.MAX if dist.is_initialized() else None)
        cuda = self.device.type == "cuda"
        host = torch.empty(2, pin_memory=cuda)
        host.copy_(flags, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self.pending.append((host, event))
        if len(self.pending) < 3:
            return 0, False
        host, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        signum, periods = int(host[0]), int(host[1])
        due = periods > self.saved_period
        self.saved_period = max(self.saved_period, periods)
        return signum, due


class Interrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


@torch.no_grad()
def probe(model, images, previous):
    """Latent norm, quantization error and drift of the encoder on a fixed batch (device tensors)."""
    was_training = model.training
    model.eval()
    z_e = model.encoder(images).float()
    z = nsvq.flatten_latents(z_e, model.vq.dim)
    indices = nsvq.nearest_code(z, model.vq.codebook.detach())
    model.train(was_training)
    scales = {"latent_norm": z.norm(dim=1).mean(),
              "quant_error": nsvq.mean_quantization_error(z, model.vq.codebook.detach(), indices),
              "drift": (z_e - previous).pow(2).mean().sqrt() if previous is not None else torch.zeros(())}
    return scales, z_e


def new_window(cfg, device):
    """Sums over one log interval, kept on the device."""
    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    return {"sums": {}, "n": {}, "steps": 0, "counts": torch.zeros(cfg.codebook_size, device=device),
            "bad": {"total": zero(), "run": zero(), "streak": zero()}, "dead_before": 0,
            "reseeded": 0, "scales": {}}


def accumulate(window, losses, out, counts, bad, dead):
    """Add one step to the window, on the device: nothing here waits for it. Losses and
    diagnostics are averaged over good steps; a skipped step only counts as bad."""
    ok = (~bad).float()
    for k, v in {**losses, **out.diagnostics}.items():
        window["sums"][k] = window["sums"].get(k, 0.0) + torch.where(bad, 0.0, v.float())
        window["n"][k] = window["n"].get(k, 0.0) + ok
    window["counts"] += counts
    window["bad"]["total"] += bad
    window["bad"]["run"] = (window["bad"]["run"] + 1) * bad  # the current streak of bad steps
    window["bad"]["streak"] = torch.maximum(window["bad"]["streak"], window["bad"]["run"])
    window["reseeded"] += 0 if dead is None else len(dead)
    window["steps"] += 1


def log_line(cfg, state, schedule, window, trainer, t_log, world, device, log):
    """One line per interval: losses by name, codebook health, the kernel, probe scales, stage,
    throughput, memory; also a metrics.jsonl record. The one place that reads the device."""
    keys = sorted(window["sums"])
    sums = all_reduce(torch.stack([window["sums"][k] for k in keys] + [window["n"][k] for k in keys]))
    means = {k: float(s / n.clamp(min=1)) for k, s, n in zip(keys, sums[:len(keys)], sums[len(keys):])}
    diagnostics = {k: means.pop(k) for k in ("kernel_mass", "tau") if k in means}
    health = nsvq.codebook_stats(window["counts"].cpu())  # counts are all-ranks already
    scales = {k: float(v) for k, v in window["scales"].items()}
    bad = {k: int(v) for k, v in window["bad"].items()}
    dead_now = int(trainer.model.vq.upkeep.dead(cfg.threshold).sum())
    dead_before = int(window["dead_before"])
    ips = window["steps"] * cfg.batch_size / (time.time() - t_log)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    quantizer = (f"util {health['utilization']:.1%} ppl {health['perplexity']:.0f} dead {dead_now} "
                 f"(before replacement {dead_before}) re-seeded {window['reseeded']}"
                 + "".join(f" {k} {v:.3g}" for k, v in diagnostics.items()))
    log(f"step {state['step']:7d} | ep {state['epoch']} {schedule.stage:6s} | "
        + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" | {quantizer} | "
        + " ".join(f"{k} {v:.4g}" for k, v in scales.items())
        + f" | {ips:.0f} img/s mem {mem:.1f}G unreadable {len(state['unreadable'])} bad {bad['total']}")
    if dist_rank() == 0:
        append_jsonl(cfg, {"step": state["step"], "epoch": state["epoch"], "stage": schedule.stage,
                           **means, **diagnostics, **health, **scales, "dead": dead_now, "dead_before_replacement":
                           dead_before, "reseeded": window["reseeded"],
                           "bad_steps": bad["total"], "img_per_s": ips})
    if cfg.check_codebook and world > 1:
        check_identical({f"vq.{k}": v for k, v in trainer.model.vq.state_dict().items()}, device)
    if cfg.amp != "fp16":  # undo the halvings of skipped steps
        reset_scale_(trainer.scaler, trainer.scaler_d)
    return bad["streak"]


def append_jsonl(cfg, record):
    path = os.path.join(cfg.out, "metrics.jsonl")
    only_rank_zero(path)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_identical(named_tensors, device):
    """Raise unless every tensor is bitwise equal on all ranks (rank 0's copy is broadcast)."""
    for name, t in named_tensors.items():
        reference = t.detach().clone()
        dist.broadcast(reference, src=0)
        bits = lambda u: u.reshape(-1).view(torch.uint8)  # noqa: E731  (NaN equals NaN, bit for bit)
        same = torch.tensor([float(torch.equal(bits(reference), bits(t.detach())))], device=device)
        if not all_reduce(same, dist.ReduceOp.MIN)[0]:
            raise RuntimeError(f"ranks disagree: {name} differs across ranks")


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled: small host objects only)."""
    objs = [obj] * world
    if world > 1:
        dist.all_gather_object(objs, obj)
    return objs


def to_cpu(obj):
    """A copy of a nested checkpoint object with every tensor in host memory, so that training
    can go on while it is written (on the CPU too: the copy is what gets written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """Rank 0 writes checkpoints in a background thread: every rank waits only for the copy of
    the state to host memory (README: the cost of a save), not for the disk. One write at a time;
    a failed write is raised at the next save or at wait(). After a write the oldest checkpoints
    beyond --keep-ckpts are deleted, never the one just written."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.thread, self.error = None, None

    def submit(self, obj, path, tag):
        self.wait()
        self.thread = threading.Thread(target=self._write, args=(obj, path, tag))
        self.thread.start()

    def _write(self, obj, path, tag):
        try:
            save_atomic(obj, path)
            for old in checkpoints(self.cfg.out)[:-self.cfg.keep_ckpts]:
                if os.path.abspath(old) != os.path.abspath(path):
                    os.remove(old)
            self.log(f"saved {path} {tag}")
        except BaseException as e:  # raised in the training thread by wait()
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def save_checkpoint(cfg, trainer, schedule, state, commit, unreadable, world, device, writer, tag=""):
    """Every rank's RNG state, epoch partial sums and unreadable files are gathered; rank 0
    copies the state to host memory and hands it to the writer. Returns the checkpoint's path."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    rngs = gather(rng, world)
    commits = gather(commit.detach().cpu(), world)  # (2,) per rank: this epoch's commitment sum, count
    state["unreadable"] = sorted(set().union(*gather(unreadable, world)))
    path = os.path.join(cfg.out, f"ckpt-{state['step']:09d}.pt")
    if dist_rank() == 0:
        ckpt = to_cpu({"kind": "train_imagenet", "config": dataclasses.asdict(cfg),
                       "model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                       "disc": trainer.disc.state_dict(), "opt": trainer.opt.state_dict(),
                       "opt_d": trainer.opt_d.state_dict(), "scaler": trainer.scaler.state_dict(),
                       "scaler_d": trainer.scaler_d.state_dict(), "schedule": schedule.state_dict(),
                       "state": copy.deepcopy(state), "rng": rngs, "commit": torch.stack(commits)})
        writer.submit(ckpt, path, tag)
    return path


def restore(ckpt, cfg, trainer, schedule, rank, world, device):
    """Load a checkpoint (already on the CPU) into the trainer; returns (loop state, this rank's
    commitment sum and count over the epoch so far, on the device)."""
    for key in ("quantizer", "codebook_size", "dim", "ch", "ch_mult", "num_res_blocks", "image_size"):
        if ckpt["config"][key] != getattr(cfg, key):
            raise ValueError(f"--resume: checkpoint has {key}={ckpt['config'][key]!r}, "
                             f"this run asks for {getattr(cfg, key)!r}")
    for name in ("model", "ema", "disc", "opt", "opt_d", "scaler", "scaler_d"):
        getattr(trainer, name).load_state_dict(ckpt[name])
    if cfg.amp != "fp16":
        reset_scale_(trainer.scaler, trainer.scaler_d)
    schedule.load_state_dict(ckpt["schedule"])
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    # The epoch so far: each rank's own partial sums, so the epoch mean that drives the stage
    # schedule is the uninterrupted run's, bit for bit (another world size: all on rank 0).
    commits = ckpt["commit"]  # (saved world, 2)
    if len(commits) == world:
        commit = commits[rank]
    else:
        commit = commits.sum(0) if rank == 0 else torch.zeros(2)
    return dict(ckpt["state"]), commit.to(device)


def reset_scale_(*scalers):
    """bf16 / fp32: the GradScaler's scale is a guard only (a skipped step halves it): set it
    back to 1. Through load_state_dict, which also works before the scaler's first step."""
    for scaler in scalers:
        if scaler.get_scale() != 1.0:
            scaler.load_state_dict({**scaler.state_dict(), "scale": 1.0})


def to_unit(x):
    return ((x.float() + 1) / 2).clamp(0, 1)


def save_grid(x, x_hat, path, n=8):
    """Originals over reconstructions as one PNG."""
    rows = torch.cat([to_unit(x[:n]), to_unit(x_hat[:n])], 0)  # (2n, 3, S, S)
    grid = rows.view(2, -1, *rows.shape[1:]).permute(0, 3, 1, 4, 2).reshape(2 * rows.shape[2], -1, 3)
    image = Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8))
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


@torch.no_grad()
def evaluate(cfg, model, loader, device, nets, out_png=None):
    """SimVQ's evaluation protocol (their evaluation.py) on the val loader; README, "Evaluation".

    rfid: pytorch-fid's Inception pool3 features of originals and reconstructions in [0, 1]
    (fp32, not quantised), Frechet distance over all images; lpips_alex / lpips_vgg: mean over
    images of LPIPS on [-1, 1]; psnr: per-batch PSNR (MSE over the whole batch) on images
    quantised to uint8, averaged over batches; ssim: skimage's default SSIM per image on the
    same uint8 images, averaged per batch, then over batches; utilization, perplexity.
    """
    model.eval()
    K = cfg.codebook_size
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # images, batches, psnr, ssim, alex, vgg
    counts = torch.zeros(K, dtype=torch.long, device=device)
    real, fake = metrics.FeatureStats(2048, device), metrics.FeatureStats(2048, device)
    for i, (images, _) in enumerate(tqdm(loader, desc="eval", disable=cfg.quiet or dist_rank() > 0)):
        x = to_model_range(images.to(device, non_blocking=True))
        x_hat, _, out = model(x)  # in fp32 whatever --amp says, as SimVQ's evaluation.py
        x_hat = x_hat.clamp(-1, 1)
        if i == 0 and out_png and dist_rank() == 0:
            save_grid(x, x_hat, out_png)
        a, b = to_unit(x), to_unit(x_hat)
        a8, b8 = metrics.to_uint8_levels(a), metrics.to_uint8_levels(b)
        sums[0] += len(x)  # a scalar argument: no copy from the host, no wait
        sums[1] += 1
        sums[2] += metrics.psnr_of_batch(a8, b8).double()
        sums[3] += metrics.ssim(b8, a8).mean().double()
        for j, k in ((4, "lpips_alex"), (5, "lpips_vgg")):
            if nets[k]:
                sums[j] += nets[k](x, x_hat).sum().double()
        counts += torch.bincount(out.indices.flatten(), minlength=K)
        if nets["inception"]:
            real.add(nets["inception"](a))
            fake.add(nets["inception"](b))
    for t in [sums, counts] + (real.tensors() + fake.tensors() if nets["inception"] else []):
        all_reduce(t)
    n, batches = float(sums[0]), float(sums[1])
    result = {"images": int(n), "psnr": float(sums[2]) / batches, "ssim": float(sums[3]) / batches,
              **nsvq.codebook_stats(counts.cpu())}
    if nets["lpips_alex"]:
        result.update(lpips_alex=float(sums[4]) / n, lpips_vgg=float(sums[5]) / n)
    if nets["inception"]:
        result["rfid"] = metrics.frechet_distance(*real.mean_cov(), *fake.mean_cov())
    model.train()
    return result


def bench_loader(cfg, loader, log):
    """Images per second of the loader alone (decode + resize + crop), for sizing --workers."""
    t0, n = None, 0
    for i, (images, _) in enumerate(loader):
        if i == 1:
            t0, n = time.time(), 0  # the first batch includes worker start-up
        n += len(images)
        if i == cfg.bench_loader:
            break
    if t0 is None:
        raise DataError("--bench-loader needs at least two batches of training images")
    rate = n / (time.time() - t0)
    log(f"loader: {rate:.0f} images/s with {cfg.workers} workers ({rate / max(cfg.workers, 1):.0f} per worker)")
    return rate


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def resolve(cfg):
    """Apply the preset, check every option and fill the defaults that depend on others."""
    cfg = copy.deepcopy(cfg)
    nsvq.check_choice("preset", cfg.preset, tuple(PRESETS))
    if not cfg.preset_applied:  # Config(preset="tiny"): fill the fields left at their paper default
        defaults = Config()
        for key, value in PRESETS[cfg.preset].items():
            if getattr(cfg, key) == getattr(defaults, key):
                setattr(cfg, key, value)
        cfg.preset_applied = True
    nsvq.check_choice("--quantizer", cfg.quantizer, QUANTIZERS)
    nsvq.check_choice("--amp", cfg.amp, ("bf16", "fp16", "none"))
    nsvq.check_choice("--tau-mode", cfg.tau_mode, nsvq.TAU_MODES)
    nsvq.check_choice("--weighting", cfg.weighting, nsvq.WEIGHTINGS)
    nsvq.check_choice("--replace-from", cfg.replace_from, nsvq.REPLACE_FROM)
    if not cfg.data and not (cfg.packed and not cfg.prepare):
        raise ValueError("--data is required (a folder with train/ and val/), or --packed")
    if cfg.prepare and not cfg.packed:
        raise ValueError("--prepare needs --packed DIR to write into")
    if cfg.eval_only and not cfg.resume:
        raise ValueError("--eval-only needs --resume auto or a checkpoint path")
    for name in ("image_size", "ch", "num_res_blocks", "dim", "codebook_size", "epochs", "batch_size",
                 "replace_every", "patience", "keep_ckpts", "log_every", "max_bad_steps",
                 "eval_batch", "eval_every"):
        nsvq.check_count("--" + name.replace("_", "-"), getattr(cfg, name), 1)
    for name in ("workers", "max_steps", "max_eval_images", "bench_loader", "warmup_epochs",
                 "gan_ramp_epochs", "ckpt_every"):
        nsvq.check_count("--" + name.replace("_", "-"), getattr(cfg, name), 0)
    for name in ("beta", "alpha", "l1_weight", "perceptual_weight", "gan_weight"):
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0)
    for name in ("lr", "lam", "usage_horizon", "ckpt_minutes", "dist_timeout"):
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0, low_open=True)
    for name in ("ema_decay", "beta1", "beta2", "weight_ema"):
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0, high=1, high_open=True)
    nsvq.check_number("--threshold", cfg.threshold, low=0, high=1)
    nsvq.check_tau(cfg.tau)
    try:
        mult = [int(m) for m in cfg.ch_mult.split(",")]
    except ValueError:
        raise ValueError(f"--ch-mult must be comma-separated integers, got {cfg.ch_mult!r}") from None
    if not mult or min(mult) < 1:
        raise ValueError(f"--ch-mult must be positive integers, got {cfg.ch_mult!r}")
    if cfg.image_size % 2 ** (len(mult) - 1):
        raise ValueError(f"--image-size {cfg.image_size} is not divisible by the downsampling factor "
                         f"{2 ** (len(mult) - 1)} of --ch-mult {cfg.ch_mult}")
    if cfg.freeze_epoch is not None:
        nsvq.check_count("--freeze-epoch", cfg.freeze_epoch, 0)
        cfg.freeze_epoch = cfg.freeze_epoch or None  # 0: freeze on the plateau only
    if cfg.deterministic and cfg.cudnn_benchmark:
        raise ValueError("--deterministic and --cudnn-benchmark exclude each other (benchmarking "
                         "picks convolution algorithms by timing)")
    # Weight files given by path are checked even where the run does not use them (the tiny
    # preset turns LPIPS off): a mistyped path is found now, not when it is first needed.
    if cfg.lpips_weights not in ("auto", "random"):
        for name in ("vgg16-397923af.pth", "vgg.pth", "alexnet-owt-7be5be79.pth", "alex.pth"):
            metrics.weights_path(cfg.lpips_weights, name, "--lpips-weights")
    if cfg.inception not in ("auto", "none", "random"):
        metrics.weights_path(cfg.inception, "pt_inception-2015-12-05-6726825d.pth", "--inception")
    cfg.out = cfg.out or os.path.join("runs", "imagenet", cfg.quantizer)
    return cfg


def check_out(cfg):
    """Refuse an --out that cannot be written, or that holds an earlier run without --resume or
    --overwrite. Creates nothing: a run refused later (bad data, bad resume) leaves no folder."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise OutputError(f"--out {cfg.out} is a file, not a folder")
    parent = os.path.abspath(cfg.out)
    while not os.path.exists(parent):  # the folder that --out would be created in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OutputError(f"--out {cfg.out} is not writable ({parent} cannot be written)")
    if not cfg.resume and not cfg.overwrite and os.path.isdir(cfg.out) and checkpoints(cfg.out):
        raise OutputError(f"--out {cfg.out} holds an earlier run: continue it with --resume auto, "
                          f"or pass --overwrite to start afresh (its checkpoints are deleted)")


def make_out(cfg):
    """Create --out once the run is sure to start; --overwrite deletes the earlier run's files."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {cfg.out}: cannot create it ({e.strerror})") from None
    if not cfg.resume:
        for path in checkpoints(cfg.out) + glob.glob(os.path.join(cfg.out, "metrics.jsonl")):
            os.remove(path)


def trim_metrics(cfg, state):
    """On resume: drop the metrics.jsonl records written after the checkpoint (the resumed run
    writes them again), so that every step and evaluation appears once."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if (r["step"] <= state["step"] if "step" in r else r["epoch"] < state["epoch"])]
    if len(kept) < len(records):
        def write(tmp):
            with open(tmp, "w") as out:
                out.writelines(json.dumps(r) + "\n" for r in kept)
        write_atomic(path, write)


def main(cfg):
    cfg = resolve(cfg)
    if cfg.prepare:
        return prepare(cfg)

    # Setup DDP
    if cfg.deterministic:  # before CUDA starts: cuBLAS reads it once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rank, world, device = setup_distributed(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by {world} ranks")
    torch.backends.cuda.matmul.allow_tf32 = False  # nearest-code distances at full fp32 precision
    torch.backends.cudnn.allow_tf32 = True         # convolutions may use TF32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.deterministic = cfg.deterministic
    log = print_log if rank == 0 else (lambda *a: None)
    on_rank_zero(check_out, cfg)

    # Create model: one seed for construction on every rank; per-rank seeds only afterwards
    networks = on_rank_zero(load_networks, cfg, device, share=False)  # downloads missing weights
    lpips, nets = networks if rank == 0 else load_networks(cfg, device)  # the others: from its cache
    torch.manual_seed(cfg.seed)
    trainer = build_trainer(cfg, device, lpips)
    torch.manual_seed(cfg.seed + rank)
    stages = cfg.quantizer in ("nsvq", "simvq-ns")  # the baselines train in one stage, as published
    schedule = nsvq.StageSchedule(cfg.patience if stages else None, cfg.freeze_epoch if stages else None,
                                  cfg.warmup_epochs, cfg.gan_ramp_epochs,
                                  gan_stage1=cfg.gan_stage1 or not stages)  # baselines: the GAN throughout
    state = {"epoch": 0, "batch": 0, "step": 0, "unreadable": [], "bad_steps_total": 0}
    commit = torch.zeros(2, device=device)  # this rank's commitment-loss sum and count this epoch
    if cfg.resume:
        path = on_rank_zero(find_checkpoint, cfg, log)
        state, commit = restore(load_checkpoint(path), cfg, trainer, schedule, rank, world, device)
        log(f"resumed from {path}: epoch {state['epoch']}, batch {state['batch']}, {schedule.stage}")

    # Setup data
    val_loader = make_loader(cfg, "val", rank, world, train=False)
    train_loader = None if cfg.eval_only else make_loader(cfg, "train", rank, world, train=True)
    if cfg.bench_loader:
        return bench_loader(cfg, train_loader, log)
    on_rank_zero(make_out, cfg)
    if cfg.eval_only:
        result = evaluate(cfg, trainer.ema, val_loader, device, nets, os.path.join(cfg.out, "recon-eval.png"))
        log(json.dumps(result))
        if rank == 0:
            write_json_atomic(result, os.path.join(cfg.out, "eval.json"))
        return result
    on_rank_zero(trim_metrics, cfg, state)
    probe_images = torch.stack([val_loader.dataset[(i, 0)][0] for i in range(min(8, len(val_loader.dataset)))])
    probe_images = to_model_range(probe_images.to(device))  # a fixed batch, the same on every rank

    # Training loop
    apply_stage(cfg, trainer, schedule, world, device)
    flags = RunFlags(device, cfg.ckpt_minutes if not cfg.ckpt_every else 0)
    writer = CheckpointWriter(cfg, log)
    unreadable = set(state["unreadable"])  # this rank's view: file indices that could not be read
    save = lambda tag="": save_checkpoint(cfg, trainer, schedule, state, commit, unreadable, world,  # noqa: E731
                                          device, writer, tag)
    steps_per_epoch = train_loader.sampler.batches
    steps_this_run, t_log, previous_z = 0, time.time(), None
    window = new_window(cfg, device)
    try:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            train_loader.sampler.set_epoch(epoch, state["batch"])
            bar = tqdm(total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch} {schedule.stage}",
                       disable=cfg.quiet or rank > 0, dynamic_ncols=True)
            for images, misses in train_loader:
                for index, n in misses.tolist():  # a CPU tensor from the loader: no wait on the device
                    unreadable.update((index + j) % len(train_loader.dataset) for j in range(n))
                x = to_model_range(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format(cfg))
                gan_w = cfg.gan_weight * schedule.gan_weight(epoch + state["batch"] / steps_per_epoch)
                refill = cfg.quantizer == "nsvq" and schedule.replacement  # the pool only serves replacement
                replace = refill and state["step"] % cfg.replace_every == 0
                if replace:  # kept on the device, read at the log line
                    window["dead_before"] = trainer.model.vq.upkeep.dead(cfg.threshold).sum()
                losses, out, counts, bad, dead = train_step(cfg, trainer, x, gan_w, schedule.commitment,
                                                            replace, refill, device)
                accumulate(window, losses, out, counts, bad, dead)
                commit += torch.stack([torch.where(bad, 0.0, out.losses["commit"].detach().float()),
                                       (~bad).float()])
                state["step"] += 1
                state["batch"] += 1
                steps_this_run += 1
                bar.update(1)
                if state["step"] % cfg.log_every == 0:
                    state["unreadable"] = sorted(set().union(*gather(unreadable, world)))
                    window["scales"], previous_z = probe(trainer.model, probe_images, previous_z)
                    streak = log_line(cfg, state, schedule, window, trainer, t_log, world, device, log)
                    state["bad_steps_total"] += int(window["bad"]["total"])
                    if streak >= cfg.max_bad_steps:  # the same streak on every rank: all stop here
                        raise RuntimeError(f"{streak} steps in a row were skipped for non-finite gradients "
                                           f"(up to step {state['step']}); stopping. The checkpoints in "
                                           f"{cfg.out} hold the last good weights.")
                    window, t_log = new_window(cfg, device), time.time()
                signum, due = flags.poll()
                if signum:
                    path = save(f"(stopped by signal {signum})")
                    writer.wait()
                    raise Interrupted(f"stopped by signal {signum} at step {state['step']}; {path} holds "
                                      f"the run: continue it with --resume auto", 128 + signum)
                if cfg.max_steps and steps_this_run >= cfg.max_steps:
                    save("(--max-steps)")
                    writer.wait()
                    bar.close()
                    return None
                if due or (cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0):
                    save()
            bar.close()
            # End of epoch: the schedule sees the all-ranks mean commitment loss.
            total = all_reduce(commit.clone())
            commit.zero_()
            state.update(epoch=epoch + 1, batch=0)
            if schedule.end_epoch(epoch, float(total[0] / total[1].clamp(min=1))):
                log(f"stage change: {schedule.stage} from epoch {epoch + 1}")
                apply_stage(cfg, trainer, schedule, world, device)
                save(f"(entering {schedule.stage})")
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                result = evaluate(cfg, trainer.ema, val_loader, device, nets,
                                  os.path.join(cfg.out, f"recon-{epoch:03d}.png"))
                log(f"eval epoch {epoch}: " + json.dumps(result))
                if rank == 0:
                    append_jsonl(cfg, {"epoch": epoch, "eval": result})

        # Save and evaluate
        save("(final)")
        result = evaluate(cfg, trainer.ema, val_loader, device, nets, os.path.join(cfg.out, "recon-final.png"))
        result.update(stage_start=schedule.stage_start, unreadable_images=len(state["unreadable"]),
                      bad_steps=state["bad_steps_total"], steps=state["step"])
        if rank == 0:
            write_json_atomic(result, os.path.join(cfg.out, "results.json"))
        log(json.dumps(result))
        if world > 1:  # bitwise: weights, every quantizer buffer, the EMA weights
            check_identical({**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
                             **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
                             **{f"disc.{k}": v for k, v in trainer.disc.named_parameters()}}, device)
        return result
    finally:
        flags.close()
        writer.wait()  # a checkpoint being written is finished (or its error raised) before leaving


def config_help():
    """{field: help text} from the comments in Config's source: a field's comment, plus the
    comment-only lines indented under it (a comment at the field's own indentation opens the
    next section and belongs to no field)."""
    comments, last, indent = {}, None, 0
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"^(\s+)(\w+):.*?#\s*(.*)$", line)
        more = re.match(r"^(\s+)#\s*(.*)$", line)
        if field:
            indent, last = len(field.group(1)), field.group(2)
            comments[last] = field.group(3)
        elif more and last and len(more.group(1)) > indent:
            comments[last] += " " + more.group(2)
        else:
            last = None
    return comments


class Switch(argparse.Action):
    """--name sets a bool field, --no-name clears it; one help line for the pair."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def parse_args(argv=None):
    """An argparse parser generated from Config: --help lists every field with its comment and
    paper default; a bool field is a pair of flags (--compile / --no-compile). Options given on
    the command line override the preset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = config_help()
    for f in dataclasses.fields(Config):
        if f.name == "preset_applied":
            continue
        name = f.name.replace("_", "-")
        help = comments.get(f.name, "")
        if f.default is not None and not re.search(r"\(default\b", help):  # None: its comment explains
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            help += f" (default: {shown if shown != '' else repr(shown)})"
        help = help.replace("%", "%%")
        if f.type is bool:
            parser.add_argument(f"--{name}", f"--no-{name}", action=Switch, default=argparse.SUPPRESS, help=help)
        else:
            base = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(f"--{name}", type=base, default=argparse.SUPPRESS, help=help)
    given = vars(parser.parse_args(argv))
    try:
        return make_config(given.pop("preset", "paper"), **given)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    cfg = parse_args()
    try:
        main(cfg)
    except (DataError, ValueError, FileNotFoundError, OutputError, metrics.WeightsError) as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line says it
            message = message.splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"error: {message}")
    except Interrupted as e:  # saved; not finished: 128 + the signal number, as a shell reports it
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.code)
    except KeyboardInterrupt:  # Ctrl-C before training began (the loop saves and stops on its own)
        print("interrupted before training began: nothing was written", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
