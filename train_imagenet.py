"""
train_imagenet.py -- the full-scale NSVQ recipe: ImageNet-1k at 128x128, K = 65,536 codes.

    torchrun --nproc_per_node=8 train_imagenet.py --data /path/to/imagenet            # NSVQ, paper preset
    torchrun --nproc_per_node=8 train_imagenet.py --data ... --quantizer simvq        # the baseline
    torchrun --nproc_per_node=8 train_imagenet.py --data ... --resume auto            # continue a run
    torchrun --nproc_per_node=8 train_imagenet.py --data ... --eval-only --resume auto  # rFID etc.
    python train_imagenet.py --data ... --prepare --packed /fast/disk/in128           # optional packing
    python train_imagenet.py --preset tiny --data folder --device cpu --amp none      # CPU-sized

--data holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG. --batch-size is the global batch.
Outputs in --out (default runs/imagenet/<quantizer>): ckpt-*.pt, metrics.jsonl, recon-*.png,
results.json. A checkpoint is a tokenizer: see load_autoencoder() and the README.
This is the twin of train_mnist.py: same helpers, same loop phases, plus what scale adds
(DDP, bf16, torch.compile, exact resume, preemption, LPIPS/GAN, rFID).
"""

import copy
import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
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
    data: str = ""                       # ImageNet root with train/ and val/ class folders
    packed: str = ""                     # folder of packed uint8 arrays (--prepare writes it)
    prepare: bool = False                # pack --data into --packed, then exit
    image_size: int = 128                # SimVQ's ImageNet setting
    workers: int = 8                     # DataLoader workers per rank (README: loader throughput)
    out: Optional[str] = None            # output folder (default runs/imagenet/<quantizer>)
    preset: str = "paper"                # paper | tiny (a CPU-sized model for tests)
    # model: VQGAN-style, as SimVQ's ImageNet config
    ch: int = 128                        # base channels (SimVQ)
    ch_mult: str = "1,2,2,4"             # per level; 128 -> 16x16 tokens (SimVQ)
    num_res_blocks: int = 2              # per level (SimVQ)
    dim: int = 128                       # D, code dimension (SimVQ)
    # quantizer
    quantizer: str = "nsvq"              # nsvq | simvq | ema | ste
    codebook_size: int = 65536           # K (the paper's headline)
    beta: float = 0.25                   # commitment weight (VQ-VAE; SimVQ)
    ema_decay: float = 0.99              # EMAVectorQuantizer decay (VQ-VAE-2)
    alpha: float = 0.1                   # dense-loss weight (the paper, as best known)
    tau: float = 0.35                    # kernel temperature (the paper, as best known)
    weighting: str = "softmax"           # softmax (paper) | clamped (authors' earlier code)
    lam: float = 0.01                    # clamp scale for weighting=clamped
    replace_from: str = "latents"        # latents (authors' earlier code) | codes (paper)
    threshold: float = 0.01              # dead = usage below threshold / K (measured on MNIST)
    usage_decay: float = 0.9             # usage EMA decay per step (measured on MNIST)
    replace_every: int = 1               # replacement cadence in steps (measured on MNIST)
    # losses (SimVQ's recipe unless noted)
    l1_weight: float = 1.0               # pixel L1
    lpips_weight: float = 1.0            # LPIPS-VGG perceptual loss
    gan_weight: float = 0.1              # PatchGAN, non-saturating G / hinge D
    # stages (nsvq only; other quantizers stay in stage 1)
    patience: int = 10                   # epochs without a new best commitment loss (paper)
    freeze_epoch: Optional[int] = 60     # freeze by then at the latest (ours: leaves 2 warm-up + 8 stage-2 epochs of 70)
    warmup_epochs: int = 2               # encoder frozen, no GAN (ours: the paper gives none)
    gan_ramp_epochs: int = 2             # stage-2 GAN ramp (paper)
    # optimisation (SimVQ)
    epochs: int = 70
    batch_size: int = 128                # global batch, split evenly across ranks
    lr: float = 1e-4                     # Adam, no schedule
    beta1: float = 0.5
    beta2: float = 0.9
    weight_ema: float = 0.999            # EMA of the weights, used for evaluation
    # engine
    device: str = "auto"                 # auto | cpu | cuda
    amp: str = "bf16"                    # bf16 | fp16 (GradScaler) | none
    compile: bool = True                 # torch.compile the autoencoder and the critic
    seed: int = 0
    resume: str = ""                     # '' | auto (newest checkpoint in --out) | a path
    max_steps: int = 0                   # stop (with a checkpoint) after this many steps; 0: no limit
    ckpt_every: int = 2000               # steps between checkpoints (also at stage changes)
    keep_ckpts: int = 2                  # how many checkpoints to keep
    log_every: int = 100                 # steps between log lines
    max_bad_steps: int = 20              # non-finite losses in a row before stopping
    check_codebook: bool = False         # debug: compare codebook checksums across ranks at each log
    # evaluation
    eval_only: bool = False              # evaluate the checkpoint given by --resume, then exit
    eval_batch: int = 64                 # per rank
    eval_every: int = 10                 # epochs between evaluations (and always at the end)
    max_eval_images: int = 0             # 0: the whole val split (50k)
    lpips_weights: str = "auto"          # auto (download) | PATH folder with vgg16-397923af.pth, vgg.pth | random | none
    inception: str = "auto"              # auto (download) | PATH to pt_inception-2015-12-05-6726825d.pth | random | none
    bench_loader: int = 0                # time this many loader batches, then exit
    quiet: bool = False                  # no progress bars


PRESETS = {
    "paper": {},
    "tiny": dict(image_size=32, ch=16, ch_mult="1,2", num_res_blocks=1, dim=8, codebook_size=256,
                 epochs=3, batch_size=8, freeze_epoch=1, warmup_epochs=1, gan_ramp_epochs=1,
                 workers=0, compile=False, lpips_weights="none", inception="none", log_every=2,
                 ckpt_every=1000, eval_batch=8),
}


# -----------------------------------------------------------------------------
# Data: image folders (Pillow) or packed uint8 arrays (memory-mapped)
# -----------------------------------------------------------------------------

class DataError(RuntimeError):
    """The data folder is missing, empty, or not what the config expects."""


IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def list_images(root, split):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder}: --data must hold train/<class>/*.JPEG and val/<class>/*.JPEG")
    files = sorted(p for p in glob.glob(os.path.join(folder, "*", "*")) if p.lower().endswith(IMAGE_EXTS))
    if not files:
        raise DataError(f"{folder} holds no images in class sub-folders (*.JPEG, *.png, ...)")
    return files


def resize_and_crop(img, size, offset_rng=None):
    """Resize the shorter side to `size` (bicubic), then a random (train) or centre (val) crop."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if offset_rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = offset_rng.randint(0, w - size), offset_rng.randint(0, h - size)
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """Items are (index, epoch) keys from EpochSampler -> (uint8 image (3, S, S), images skipped).

    The random crop is a function of (seed, epoch, index), so a resumed run sees the same crops.
    An unreadable file is skipped (the next file is used instead) and counted, never fatal.
    """

    def __init__(self, root, split, size, train, seed):
        self.files, self.size, self.train, self.seed = list_images(root, split), size, train, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch = key
        for skipped in range(min(len(self.files), 100)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
            rng = random.Random(hash((self.seed, epoch, index))) if self.train else None
            array = np.asarray(resize_and_crop(img, self.size, rng))
            return torch.from_numpy(array.copy()).permute(2, 0, 1), skipped
        raise DataError(f"100 unreadable images in a row from {self.files[index]}: is --data right?")


class PackedImages(Dataset):
    """Images packed by --prepare: <split>.u8 of shape (N, S, S, 3) read by memory mapping."""

    def __init__(self, folder, split, size):
        meta_path = os.path.join(folder, f"{split}.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"no {meta_path}: run with --prepare first")
        meta = json.load(open(meta_path))
        if meta["size"] != size:
            raise DataError(f"{folder}/{split}: packed at {meta['size']}px, config wants {size}px")
        path = os.path.join(folder, f"{split}.u8")
        expected = meta["n"] * size * size * 3
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            raise DataError(f"{path}: expected {expected} bytes for {meta['n']} images, "
                            f"found {os.path.getsize(path) if os.path.isfile(path) else 'no file'}")
        self.array = np.memmap(path, dtype=np.uint8, mode="r", shape=(meta["n"], size, size, 3))

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        return torch.from_numpy(np.array(self.array[key[0]])).permute(2, 0, 1), 0


class EpochSampler(Sampler):
    """This rank's share of one epoch as (index, epoch) keys; deterministic and resumable.

    Training: every rank draws the same permutation (seed + epoch), keeps whole global
    batches (the tail is dropped) and takes every world-th index; set_epoch(epoch, start_batch)
    skips the global batches a resumed run has already done. Evaluation: all n images in
    order, every world-th to this rank.
    """

    def __init__(self, n, rank, world, local_batch, seed, train):
        self.n, self.rank, self.world, self.local_batch = n, rank, world, local_batch
        self.seed, self.train, self.epoch, self.start = seed, train, 0, 0
        self.batches = n // (world * local_batch)  # global batches per training epoch
        if self.batches == 0 and train:
            raise DataError(f"{n} training images are fewer than one global batch ({world * local_batch})")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        if not self.train:
            return iter([(i, 0) for i in range(self.rank, self.n, self.world)])
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches * self.world * self.local_batch][self.rank::self.world]
        return iter([(int(i), self.epoch) for i in mine[self.start * self.local_batch:]])

    def __len__(self):
        if not self.train:
            return len(range(self.rank, self.n, self.world))
        return (self.batches - self.start) * self.local_batch


def make_loader(cfg, split, rank, world, train):
    local_batch = cfg.batch_size // world if train else cfg.eval_batch
    if cfg.packed and not cfg.prepare:
        dataset = PackedImages(cfg.packed, split, cfg.image_size)
    else:
        dataset = ImageFolder(cfg.data, split, cfg.image_size, train, cfg.seed)
    n = min(cfg.max_eval_images, len(dataset)) if not train and cfg.max_eval_images else len(dataset)
    sampler = EpochSampler(n, rank, world, local_batch, cfg.seed, train=train)
    # Its own generator: a DataLoader iterator otherwise draws its worker seed from the global
    # RNG, and a resumed run would create that iterator at a different point of the RNG stream.
    return DataLoader(dataset, local_batch, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=cfg.workers > 0,
                      drop_last=train, generator=torch.Generator().manual_seed(cfg.seed))


def prepare(cfg):
    """Pack train and val once into uint8 arrays (Resize + CenterCrop) for memory-mapped reading.

    Packed training data has no random crop (every image is its centre crop): the price of
    not decoding JPEGs every epoch. Written to a temporary name and renamed when complete.
    """
    os.makedirs(cfg.packed, exist_ok=True)
    for split in ("val", "train"):
        dataset = ImageFolder(cfg.data, split, cfg.image_size, train=False, seed=cfg.seed)
        S, n = cfg.image_size, len(dataset)
        path = os.path.join(cfg.packed, f"{split}.u8")
        out = np.memmap(path + ".tmp", dtype=np.uint8, mode="w+", shape=(n, S, S, 3))
        loader = DataLoader(dataset, 256, sampler=[(i, 0) for i in range(n)], num_workers=cfg.workers)
        done, skipped = 0, 0
        for images, skips in tqdm(loader, desc=f"packing {split}", disable=cfg.quiet):
            out[done:done + len(images)] = images.permute(0, 2, 3, 1).numpy()
            done, skipped = done + len(images), skipped + int(skips.sum())
        out.flush()
        del out
        os.replace(path + ".tmp", path)
        write_json_atomic({"n": n, "size": S, "skipped": skipped}, os.path.join(cfg.packed, f"{split}.json"))
        print(f"packed {n} {split} images into {path} ({skipped} unreadable files replaced)")


# -----------------------------------------------------------------------------
# Model: VQGAN-style encoder / decoder (GroupNorm + SiLU, no attention) and a PatchGAN critic
# -----------------------------------------------------------------------------

def Norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.block = nn.Sequential(Norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1),
                                   Norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_quantizer(cfg):
    K, D = cfg.codebook_size, cfg.dim
    upkeep = dict(replace_from=cfg.replace_from, usage_decay=cfg.usage_decay)
    if cfg.quantizer == "ste":
        return nsvq.VectorQuantizer(K, D, cfg.beta, **upkeep)
    if cfg.quantizer == "ema":
        return nsvq.EMAVectorQuantizer(K, D, cfg.beta, decay=cfg.ema_decay, **upkeep)
    if cfg.quantizer == "simvq":
        return nsvq.SimVQ(K, D, cfg.beta, usage_decay=cfg.usage_decay)
    if cfg.quantizer == "nsvq":
        return nsvq.NSVQ(K, D, cfg.beta, cfg.alpha, cfg.tau, cfg.weighting, cfg.lam, **upkeep)
    raise ValueError(f"unknown quantizer {cfg.quantizer!r}; expected ste, ema, simvq or nsvq")


class Autoencoder(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> latents (B, D, S/f, S/f) -> quantizer -> images."""

    def __init__(self, cfg):
        super().__init__()
        mult = [int(m) for m in cfg.ch_mult.split(",")]
        chans = [cfg.ch * m for m in mult]
        enc, c = [nn.Conv2d(3, cfg.ch, 3, 1, 1)], cfg.ch
        for level, c_out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                enc.append(ResBlock(c, c_out))
                c = c_out
            if level < len(chans) - 1:
                enc.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
        enc += [ResBlock(c, c), ResBlock(c, c), Norm(c), nn.SiLU(), nn.Conv2d(c, cfg.dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.vq = make_quantizer(cfg)
        dec = [nn.Conv2d(cfg.dim, c, 3, 1, 1), ResBlock(c, c), ResBlock(c, c)]
        for level in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks):
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
        """Images (B, 3, S, S) in [-1, 1] -> code indices (B, S/8, S/8)."""
        return self.vq(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices):
        """Code indices (B, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]."""
        return self.decoder(self.vq.decode(indices))


def make_discriminator(layers=3, width=64):
    """PatchGAN critic (pix2pix / taming): `layers` stride-2 blocks, one logit per patch."""
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
    return disc


# -----------------------------------------------------------------------------
# Helpers: distributed setup, checkpoints, evaluation, figures
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
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def load_autoencoder(path, device="cpu"):
    """A trained tokenizer (the EMA weights): model.encode(images), model.decode(indices)."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = Autoencoder(Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval()


def to_unit(x):
    return ((x.float() + 1) / 2).clamp(0, 1)


def save_grid(x, x_hat, path, n=8):
    """Originals over reconstructions as one PNG (written atomically)."""
    rows = torch.cat([to_unit(x[:n]), to_unit(x_hat[:n])], 0)  # (2n, 3, S, S)
    grid = rows.view(2, -1, *rows.shape[1:]).permute(0, 3, 1, 4, 2).reshape(2 * rows.shape[2], -1, 3)
    tmp = path + ".tmp.png"
    Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(cfg, model, loader, device, nets, out_png=None):
    """rFID, PSNR, SSIM, LPIPS, utilization and perplexity of `model` on the val loader.

    rFID protocol: val images Resize(S)+CenterCrop(S) as uint8, reconstructions clamped to
    [0, 1]; both resized to 299x299 bilinearly (fp32) inside the TF-FID Inception; pool3
    features; Frechet distance between the two Gaussians, all val images (50k) by default.
    """
    model.eval()
    K = cfg.codebook_size
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, psnr, ssim, lpips
    counts = torch.zeros(K, device=device)
    real, fake = metrics.FeatureStats(2048, device), metrics.FeatureStats(2048, device)
    inception, lpips = nets
    for i, (images, _) in enumerate(tqdm(loader, desc="eval", disable=cfg.quiet or dist_rank() > 0)):
        x = images.to(device).float() / 127.5 - 1
        with autocast(cfg, device):
            x_hat, _, out = model(x)
        x_hat = x_hat.float().clamp(-1, 1)
        if i == 0 and out_png:
            save_grid(x, x_hat, out_png)
        a, b = to_unit(x), to_unit(x_hat)
        sums += torch.stack([torch.tensor(float(len(x)), device=device), metrics.psnr(a, b).sum(),
                             metrics.ssim(a, b).sum(),
                             lpips(x, x_hat).sum() if lpips else torch.zeros((), device=device)]).double()
        counts += torch.bincount(out.indices.flatten(), minlength=K).float()
        if inception:
            real.add(inception(a))
            fake.add(inception(b))
    for t in [sums, counts] + (real.tensors() + fake.tensors() if inception else []):
        all_reduce(t)
    n = float(sums[0])
    result = {"images": int(n), "psnr": float(sums[1]) / n, "ssim": float(sums[2]) / n,
              **nsvq.codebook_stats(counts.cpu())}
    if lpips:
        result["lpips"] = float(sums[3]) / n
    if inception:
        result["rfid"] = metrics.frechet_distance(*real.mean_cov(), *fake.mean_cov())
    model.train()
    return result


def dist_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def autocast(cfg, device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def load_nets(cfg, device, rank):
    """(Inception, LPIPS) for evaluation, or None for a metric switched off."""
    def build(spec, what, make):
        if spec == "none":
            if rank == 0:
                print(f"warning: {what} is switched off ('none'): it will not be reported")
            return None
        return make().to(device)
    lpips_spec = cfg.lpips_weights
    vgg, lin = ((os.path.join(lpips_spec, "vgg16-397923af.pth"), os.path.join(lpips_spec, "vgg.pth"))
                if lpips_spec not in ("auto", "random", "none") else (lpips_spec, lpips_spec))
    return (build(cfg.inception, "rFID (--inception)", lambda: metrics.InceptionFID(cfg.inception)),
            build(lpips_spec, "LPIPS (--lpips-weights)", lambda: metrics.LPIPS(vgg, lin)))


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def resolve(cfg):
    """Check the options and fill the defaults that depend on others."""
    cfg = copy.deepcopy(cfg)
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; expected one of {list(PRESETS)}")
    if cfg.amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"unknown --amp {cfg.amp!r}; expected bf16, fp16 or none")
    if not cfg.data and not (cfg.packed and not cfg.prepare):
        raise ValueError("--data is required (a folder with train/ and val/), or --packed")
    if cfg.prepare and not cfg.packed:
        raise ValueError("--prepare needs --packed DIR to write into")
    if cfg.eval_only and not cfg.resume:
        raise ValueError("--eval-only needs --resume auto or a checkpoint path")
    if cfg.quantizer not in ("nsvq", "simvq", "ema", "ste"):
        raise ValueError(f"unknown quantizer {cfg.quantizer!r}; expected nsvq, simvq, ema or ste")
    if cfg.image_size % 2 ** (len(cfg.ch_mult.split(",")) - 1):
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the downsampling factor")
    cfg.out = cfg.out or os.path.join("runs", "imagenet", cfg.quantizer)
    return cfg


def main(cfg):
    cfg = resolve(cfg)
    if cfg.prepare:
        return prepare(cfg)
    rank, world, device = setup_distributed(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by {world} ranks")
    torch.backends.cuda.matmul.allow_tf32 = False  # nearest-code distances at full fp32 precision
    torch.backends.cudnn.allow_tf32 = True         # convolutions may use TF32
    torch.manual_seed(cfg.seed + rank)
    os.makedirs(cfg.out, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    model = Autoencoder(cfg).to(device)
    disc = make_discriminator().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    stages = cfg.quantizer == "nsvq"  # baselines train in one stage, as published
    schedule = nsvq.StageSchedule(cfg.patience if stages else 10 ** 9,
                                  cfg.freeze_epoch if stages else None,
                                  cfg.warmup_epochs, cfg.gan_ramp_epochs)
    state = {"epoch": 0, "batch": 0, "step": 0, "skipped_images": 0, "bad_steps_total": 0,
             "commit_sum": 0.0, "commit_n": 0}

    if cfg.resume:
        found = checkpoints(cfg.out) if cfg.resume == "auto" else [cfg.resume]
        if not found or not os.path.isfile(found[-1]):
            raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint found"
                                    + (f" in {cfg.out}" if cfg.resume == "auto" else ""))
        ckpt = torch.load(found[-1], map_location=device, weights_only=False)
        for key in ("quantizer", "codebook_size", "dim", "ch", "ch_mult", "image_size"):
            if ckpt["config"][key] != getattr(cfg, key):
                raise ValueError(f"--resume: checkpoint has {key}={ckpt['config'][key]!r}, "
                                 f"this run asks for {getattr(cfg, key)!r}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["opt"])
        opt_d.load_state_dict(ckpt["opt_d"])
        scaler.load_state_dict(ckpt["scaler"])
        scaler_d.load_state_dict(ckpt["scaler_d"])
        schedule.load_state_dict(ckpt["schedule"])
        state = ckpt["state"]
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        log(f"resumed from {found[-1]}: epoch {state['epoch']}, batch {state['batch']}, {schedule.stage}")

    nets = load_nets(cfg, device, rank)
    lpips = nets[1] if cfg.lpips_weight > 0 else None
    val_loader = make_loader(cfg, "val", rank, world, train=False)
    if cfg.eval_only:
        result = evaluate(cfg, ema, val_loader, device, nets, os.path.join(cfg.out, "recon-eval.png"))
        log(json.dumps(result))
        if rank == 0:
            write_json_atomic(result, os.path.join(cfg.out, "eval.json"))
        return result
    train_loader = make_loader(cfg, "train", rank, world, train=True)
    if cfg.bench_loader:
        return bench_loader(cfg, train_loader, log)

    def ddp(module):
        """DDP after compiling; the quantizer synchronises its own buffers."""
        if world == 1:
            return module
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False)

    def apply_stage():
        """Freeze the encoder and switch the quantizer's terms; rebuild the DDP wrappers.

        Returns the autoencoder and critic to train, and the critic for the generator's term
        (not DDP-wrapped: its gradients are discarded, so they need no all-reduce).
        """
        model.encoder.requires_grad_(schedule.encoder_trainable)
        model.vq.dense = schedule.dense_loss
        critic = torch.compile(disc) if cfg.compile else disc
        return ddp(torch.compile(model) if cfg.compile else model), ddp(critic), critic

    def save(tag=""):
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if rank == 0:
            path = os.path.join(cfg.out, f"ckpt-{state['step']:09d}.pt")
            save_atomic({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                         "ema": ema.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                         "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
                         "scaler_d": scaler_d.state_dict(), "schedule": schedule.state_dict(),
                         "state": dict(state), "rng": rngs}, path)
            for old in checkpoints(cfg.out)[:-cfg.keep_ckpts]:
                os.remove(old)
            log(f"saved {path} {tag}")
        if world > 1:
            dist.barrier()

    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    train_model, train_disc, gan_disc = apply_stage()
    steps_per_epoch = train_loader.sampler.batches
    vq = model.vq
    window, bad_in_row, steps_this_run, t_log = {}, 0, 0, time.time()
    counts = torch.zeros(cfg.codebook_size, device=device)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        train_loader.sampler.set_epoch(epoch, state["batch"])
        bar = tqdm(total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch} {schedule.stage}",
                   disable=cfg.quiet or rank > 0, dynamic_ncols=True)
        for images, skipped in train_loader:
            state["skipped_images"] += int(skipped.sum())
            x = images.to(device, non_blocking=True).float() / 127.5 - 1
            gan_w = cfg.gan_weight * schedule.gan_weight(epoch + state["batch"] / steps_per_epoch)
            with autocast(cfg, device):
                x_hat, z_e, out = train_model(x)
                losses = {"l1": cfg.l1_weight * (x_hat.float() - x).abs().mean()}
                if lpips:
                    losses["lpips"] = cfg.lpips_weight * lpips(x_hat, x).mean()
                losses.update(out.losses)
                if "commit" in losses and not schedule.commitment:
                    losses["commit"] = losses["commit"].detach() * 0  # encoder frozen
                if gan_w > 0:
                    losses["gan"] = gan_w * F.softplus(-gan_disc(x_hat).float()).mean()
            loss = sum(losses.values())
            # One collective decides for every rank: skip a non-finite step, stop on SIGTERM.
            flags = all_reduce(torch.tensor([float(not torch.isfinite(loss)), float(stop["sigterm"])],
                                            device=device), dist.ReduceOp.MAX if world > 1 else None)
            if flags[0]:
                bad_in_row += 1
                state["bad_steps_total"] += 1
                opt.zero_grad(set_to_none=True)
                log(f"non-finite loss at step {state['step']}: step skipped ({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    raise RuntimeError(f"{bad_in_row} non-finite losses in a row at step {state['step']}; "
                                       f"stopping. The last good checkpoint in {cfg.out} is intact.")
                state["batch"] += 1
                bar.update(1)
                continue
            bad_in_row = 0
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if gan_w > 0:  # critic step, hinge loss
                with autocast(cfg, device):
                    d_loss = (F.relu(1 - train_disc(x).float()).mean()
                              + F.relu(1 + train_disc(x_hat.detach()).float()).mean())
                opt_d.zero_grad(set_to_none=True)
                scaler_d.scale(d_loss).backward()
                scaler_d.step(opt_d)
                scaler_d.update()
                losses["disc"] = d_loss.detach()
            # Codebook upkeep after the step, in the method's order; collectives live in here.
            vq.update_(z_e.detach().float(), out.indices)
            if stages and schedule.replacement and state["step"] % cfg.replace_every == 0:
                dead = vq.replace_dead_codes_(cfg.threshold)
                if vq.codebook_by_gradient:
                    nsvq.reset_adam_state_(opt, vq.embedding, dead)
                ema.vq.embedding.data[dead] = vq.embedding.data[dead]  # copied, not averaged
            with torch.no_grad():  # weight EMA for evaluation; buffers are copied
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p.detach(), 1 - cfg.weight_ema)
                for b_ema, b in zip(ema.buffers(), model.buffers()):
                    b_ema.copy_(b)
            counts += torch.bincount(out.indices.flatten(), minlength=cfg.codebook_size).float()
            for k, v in losses.items():  # kept on the device: no sync per step
                window[k] = window.get(k, 0.0) + v.detach().float()
            if "commit" in out.losses:
                state["commit_sum"] += float(out.losses["commit"].detach())
                state["commit_n"] += 1
            state["step"] += 1
            state["batch"] += 1
            steps_this_run += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0:
                log_line(cfg, state, schedule, window, counts, vq, t_log, world, device, log)
                window, t_log = {}, time.time()
                counts.zero_()
            if state["step"] % cfg.ckpt_every == 0:
                save()
            if flags[1] or (cfg.max_steps and steps_this_run >= cfg.max_steps):
                save("(SIGTERM)" if flags[1] else "(--max-steps)")
                bar.close()
                return None
        bar.close()
        # End of epoch: the schedule sees the all-ranks mean commitment loss.
        commit = all_reduce(torch.tensor([state["commit_sum"], float(state["commit_n"])], device=device))
        state.update(epoch=epoch + 1, batch=0, commit_sum=0.0, commit_n=0)
        if schedule.end_epoch(epoch, float(commit[0] / commit[1].clamp(min=1))):
            log(f"stage change: {schedule.stage} from epoch {epoch + 1}")
            train_model, train_disc, gan_disc = apply_stage()
            save(f"(entering {schedule.stage})")
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            result = evaluate(cfg, ema, val_loader, device, nets, os.path.join(cfg.out, f"recon-{epoch:03d}.png"))
            log(f"eval epoch {epoch}: " + json.dumps(result))
            append_jsonl(cfg, rank, {"epoch": epoch, "eval": result})
    save("(final)")
    result = evaluate(cfg, ema, val_loader, device, nets, os.path.join(cfg.out, "recon-final.png"))
    skipped = all_reduce(torch.tensor([float(state["skipped_images"])], device=device))
    result.update(stage_start=schedule.stage_start, skipped_images=int(skipped[0]),
                  bad_steps=state["bad_steps_total"], steps=state["step"])
    if rank == 0:
        write_json_atomic(result, os.path.join(cfg.out, "results.json"))
    log(json.dumps(result))
    if world > 1:
        check_identical(list(model.parameters()) + [model.vq.codebook, model.vq.usage], device)
    return result


def append_jsonl(cfg, rank, record):
    if rank == 0:
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def check_identical(tensors, device):
    """Raise if any of the tensors differs across ranks (compared through float64 checksums)."""
    local = torch.stack([t.detach().double().sum() for t in tensors])
    ref = local.clone()
    dist.broadcast(ref, src=0)
    same = all_reduce(torch.tensor([float(torch.equal(local, ref))], device=device), dist.ReduceOp.MIN)
    if not same[0]:
        raise RuntimeError("ranks disagree: weights or codebook differ across ranks")


def log_line(cfg, state, schedule, window, counts, vq, t_log, world, device, log):
    """One line per interval: losses by name, codebook health, stage, throughput, memory."""
    keys = sorted(window)
    vals = all_reduce(torch.stack([torch.as_tensor(window[k], device=device) for k in keys])) / world
    all_reduce(counts)
    health = nsvq.codebook_stats(counts.cpu())
    dead = int((vq.usage < cfg.threshold / cfg.codebook_size).sum())
    ips = cfg.log_every * cfg.batch_size / (time.time() - t_log)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0
    means = {k: float(v) / cfg.log_every for k, v in zip(keys, vals)}
    log(f"step {state['step']:7d} | ep {state['epoch']} {schedule.stage:6s} | "
        + " ".join(f"{k} {v:.4f}" for k, v in means.items())
        + f" | util {health['utilization']:.1%} ppl {health['perplexity']:.0f} dead {dead} | "
        f"{ips:.0f} img/s mem {mem:.1f}G skipped {state['skipped_images']}")
    append_jsonl(cfg, dist_rank(), {"step": state["step"], "stage": schedule.stage, **means,
                                    **health, "dead_usage": dead, "img_per_s": ips})
    if cfg.check_codebook and world > 1:
        check_identical([vq.codebook, vq.usage], device)


def bench_loader(cfg, loader, log):
    """Images per second of the loader alone (decode + resize + crop), for sizing --workers."""
    t0, n = None, 0
    for i, (images, _) in enumerate(loader):
        if i == 1:
            t0, n = time.time(), 0  # the first batch includes worker start-up
        n += len(images)
        if i == cfg.bench_loader:
            break
    rate = n / (time.time() - t0)
    log(f"loader: {rate:.0f} images/s with {cfg.workers} workers "
        f"({rate / max(cfg.workers, 1):.0f} per worker)")
    return rate


def parse_args(argv=None):
    """An argparse parser generated from Config; explicit options override the preset."""
    import argparse
    import inspect
    import re
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            base = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", "paper")
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    return Config(**{**PRESETS[preset], **given})


if __name__ == "__main__":
    cfg = parse_args()
    try:
        main(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
