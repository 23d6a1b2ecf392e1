"""
train_mnist.py -- the laptop demo: codebook collapse, and what each part of NSVQ does about it.

    python train_mnist.py                      # NSVQ: stage 1 -> freeze -> warm-up -> stage 2
    python train_mnist.py --quantizer ste      # plain VQ-VAE: watch the codebook collapse
    python train_mnist.py --data DIR --no-download   # offline, with the IDX files in DIR

Missing MNIST files are downloaded (md5-checked, written atomically) into --data.
Outputs go to --out (default runs/mnist/<quantizer>): results.json, ckpt.pt and figures.
A trained checkpoint is a tokenizer: see load_autoencoder() and the README.
This is the twin of train_imagenet.py: same helpers, same loop phases, without what scale adds.
The comparisons and the paper's analyses build on it in experiments.py.
"""

import argparse
import copy
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import metrics
import nsvq


@dataclass
class Config:
    # data
    data: str = "./data/mnist"           # folder of IDX files; missing ones are downloaded into it
    dataset: str = "mnist"               # mnist | fashion-mnist
    download: bool = True                # fetch missing files (--no-download: never touch the network)
    out: Optional[str] = None            # output folder (default runs/mnist/<quantizer>)
    overwrite: bool = False              # start afresh in an --out that holds an earlier run
    # model
    quantizer: str = "nsvq"              # nsvq | simvq | ema | ste | simvq-ns (SimVQ + the dense loss)
    codebook_size: int = 1024            # K: large enough that plain STE collapses
    dim: int = 16                        # D, the code dimension
    width: int = 64                      # channels of the conv autoencoder
    decoder_norm: bool = True            # GroupNorm on the decoder's first layer (EXPERIMENTS.md)
    beta: float = 0.25                   # commitment weight (VQ-VAE)
    ema_decay: float = 0.8               # EMAVectorQuantizer decay: 0.8 (the most used VQ library's
                                         # default) beat VQ-VAE-2's 0.99 by 14% test MSE (EXPERIMENTS.md)
    # NSVQ (EXPERIMENTS.md: how these were chosen)
    alpha: float = 0.1                   # weight of the dense loss
    tau: float = 0.35                    # kernel temperature, in units given by tau_mode
    tau_mode: str = "absolute"           # absolute (the paper's 0.35) | relative (units of the
                                         # batch's mean squared distance to the nearest code); equal here
    weighting: str = "softmax"           # softmax (paper) | clamped (authors' earlier code)
    lam: float = 0.01                    # clamp scale for weighting=clamped
    dense: Optional[bool] = None         # dense loss on in stage 1 (default: on for nsvq, simvq-ns)
    replace: Optional[bool] = None       # dead-code replacement in stage 1 (default: on for nsvq)
    replace_from: str = "latents"        # latents (authors' earlier code) | codes (paper)
    threshold: float = 0.01              # dead = usage below threshold / K
    usage_horizon: float = 64.0          # usage memory in expected assignments per code (scale-free)
    replace_every: int = 1               # steps between replacement calls
    reseed_at: int = 0                   # > 0: at this step every code is re-seeded again from the
                                         # latents of the then current encoder (ours: a later seeding)
    stages: Optional[bool] = None        # stage-wise training (default: on for nsvq, simvq-ns)
    patience: int = 10                   # epochs without a new best commitment loss (paper)
    freeze_epoch: Optional[int] = None   # freeze by then at the latest (None: leave the warm-up and,
                                         # with the GAN, one stage-2 epoch; 0: plateau only)
    warmup_epochs: int = 1               # encoder frozen, no GAN (ours)
    gan_ramp_epochs: int = 1             # stage-2 GAN ramp (paper: 2; shorter budget here)
    # losses
    gan: bool = True                     # adversarial loss (--no-gan: reconstruction only)
    gan_weight: float = 0.1              # generator's adversarial weight
    gan_stage1: bool = False             # the adversarial loss in stage 1 too, from step 0 (the paper
                                         # trains so; MNIST keeps it out: from step 0 it swamped this small
                                         # model and failed on one seed of three, EXPERIMENTS.md 9, 13.3)
    # optimisation
    epochs: int = 5                      # passes over the training split
    batch_size: int = 128
    lr: float = 1e-3                     # Adam, autoencoder and codebook
    encoder_lr_mult: float = 1.0         # encoder lr = lr * this: a faster or slower encoder
    codebook_lr_mult: float = 1.0        # codebook (quantizer parameters) lr = lr * this
    disc_lr: float = 2e-4                # Adam, critic
    # engine
    device: str = "auto"                 # auto | cpu | cuda | mps
    seed: int = 0
    resume: str = ""                     # '' | auto (<out>/ckpt.pt) | a path
    init_from: str = ""                  # start from these autoencoder weights (a state_dict file;
                                         # experiments.py controlled writes one)
    probe_every: int = 100               # steps between probes (drift, churn, utilization, scales)
    quiet: bool = False                  # no progress bars


QUANTIZERS = ("nsvq", "simvq", "ema", "ste", "simvq-ns")


# -----------------------------------------------------------------------------
# Data: MNIST IDX files, downloaded and checked
# -----------------------------------------------------------------------------

class DataError(RuntimeError):
    """A data file is missing, corrupt or not what it claims to be."""


FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
DATASETS = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
        "md5": {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
                "test_images": "9fb629c4189551a2d022fa330f9573f3",
                "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"}},
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                "test_images": "bef4ecab320f06d8554ea6380940ec79",
                "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"}},
}


def download(urls, path, md5):
    """Fetch the first mirror that answers, check its md5, then rename into place (atomic)."""
    errors = []
    for url in urls:
        tmp = f"{path}.part{os.getpid()}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
                f.write(response.read())
            with open(tmp, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
            if digest != md5:
                raise DataError(f"md5 {digest} != expected {md5}")
            os.replace(tmp, path)
            return
        except Exception as e:  # try the next mirror; report all failures together
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {os.path.basename(path)} ({'; '.join(errors)})")


def read_idx(path, kind):
    """Read a gzipped IDX file, checking gzip integrity, magic number, shape and size."""
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path}: permission denied")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); delete it and run again "
                        f"to download it again") from None
    magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: wrong magic number, expected {magic} for IDX {kind} "
                        f"({os.path.basename(path)} may be another file); delete it and run again")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if dims[0] == 0:
        raise DataError(f"{path} holds no {kind}")
    if kind == "images" and dims[1:] != (28, 28):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes after decompression, header says {expected} "
                        f"(truncated or corrupt); delete it and run again")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_split(cfg, split):
    """Images (n, 1, 28, 28) float in [0, 1] for split 'train' or 'test'; downloads if needed."""
    spec = DATASETS[cfg.dataset]
    if os.path.exists(cfg.data) and not os.path.isdir(cfg.data):
        raise DataError(f"--data {cfg.data} is a file, not a folder")
    tensors = {}
    for kind in ("images", "labels"):
        key = f"{split}_{kind}"
        path = os.path.join(cfg.data, FILES[key])
        if not os.path.exists(path):
            urls = [m + FILES[key] for m in spec["mirrors"]]
            if not cfg.download:
                raise DataError(f"missing {path}; --no-download is set. Fetch it from {urls[0]} "
                                f"or drop --no-download")
            print(f"downloading {FILES[key]} ...")
            os.makedirs(cfg.data, exist_ok=True)
            download(urls, path, spec["md5"][key])
        tensors[kind] = read_idx(path, kind)
    if len(tensors["images"]) != len(tensors["labels"]):
        raise DataError(f"{split}: {len(tensors['images'])} images but {len(tensors['labels'])} labels")
    return tensors["images"][:, None].float() / 255.0


# -----------------------------------------------------------------------------
# Model: a small conv autoencoder (28x28 -> 7x7 latents) and a PatchGAN critic
# -----------------------------------------------------------------------------

def make_quantizer(cfg):
    K, D = cfg.codebook_size, cfg.dim
    upkeep = dict(beta=cfg.beta, replace_from=cfg.replace_from, usage_horizon=cfg.usage_horizon)
    if cfg.quantizer == "ste":
        return nsvq.VectorQuantizer(K, D, **upkeep)
    if cfg.quantizer == "ema":
        return nsvq.EMAVectorQuantizer(K, D, decay=cfg.ema_decay, **upkeep)
    if cfg.quantizer == "simvq":
        return nsvq.SimVQ(K, D, beta=cfg.beta, usage_horizon=cfg.usage_horizon)
    dense = dict(alpha=cfg.alpha, tau=cfg.tau, tau_mode=cfg.tau_mode, weighting=cfg.weighting, lam=cfg.lam)
    if cfg.quantizer == "simvq-ns":
        return nsvq.NSSimVQ(K, D, beta=cfg.beta, usage_horizon=cfg.usage_horizon, **dense)
    return nsvq.NSVQ(K, D, **dense, **upkeep)


class Autoencoder(nn.Module):
    """Conv encoder -> quantizer -> conv decoder. Images (B, 1, 28, 28) in [0, 1].

    SiLU, not ReLU: with ReLU a slow encoder (--encoder-lr-mult 0.1) let the decoder's first
    layer die and the model output the mean image. GroupNorm after the decoder's first conv
    (decoder_norm): without it a fast encoder (--encoder-lr-mult 3 or 10) left the codes behind
    until replacement re-seeded hundreds of them in one step, the decoder's input jumped ~15x
    in scale and its output went flat for good (EXPERIMENTS.md, "Encoder drift").
    """

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w // 2, 4, 2, 1), nn.SiLU(),          # 14x14
            nn.Conv2d(w // 2, w, 4, 2, 1), nn.SiLU(),          # 7x7
            nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(w, cfg.dim, 1))                          # (B, D, 7, 7)
        self.vq = make_quantizer(cfg)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.dim, w, 3, 1, 1),
            nn.GroupNorm(8, w) if cfg.decoder_norm else nn.Identity(), nn.SiLU(),
            nn.ConvTranspose2d(w, w // 2, 4, 2, 1), nn.SiLU(),  # 14x14
            nn.ConvTranspose2d(w // 2, 1, 4, 2, 1), nn.Sigmoid())  # 28x28

    def forward(self, x):
        z_e = self.encoder(x)
        out = self.vq(z_e)
        return self.decoder(out.z_q), z_e, out

    @torch.no_grad()
    def encode(self, images):
        """Images (B, 1, 28, 28) in [0, 1] -> code indices (B, 7, 7)."""
        return self.vq(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices):
        """Code indices (B, 7, 7) -> images (B, 1, 28, 28)."""
        return self.decoder(self.vq.decode(indices))


def make_discriminator(width=32):
    """A small PatchGAN critic: one logit per 7x7 patch."""
    return nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 1, 3, 1, 1))


def generator_gan_loss(logits):
    """Non-saturating generator loss on each image's mean logit: softplus(-mean)."""
    return F.softplus(-logits.flatten(1).mean(1)).mean()


def critic_hinge_loss(logits_real, logits_fake):
    """Hinge loss of the critic: 0.5 (E relu(1 - real) + E relu(1 + fake))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


# -----------------------------------------------------------------------------
# Helpers: files and checkpoints, the training step, probes, evaluation, figures
# -----------------------------------------------------------------------------

class OutputError(RuntimeError):
    """An output could not be written (full disk, read-only folder) or a checkpoint not read."""


def check_free_space(path, needed):
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"cannot write {path}: {free / 2**20:.0f} MiB free on its disk, "
                          f"about {needed / 2**20:.0f} MiB needed")


def write_atomic(path, write, needed=0):
    """write(tmp) to a temporary file unique to this process, then rename it to `path`: a
    crash, a signal or a full disk never leaves half a file, and the temporary file is removed."""
    check_free_space(path, needed)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
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


def savefig_atomic(fig, path, **kwargs):
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


def load_checkpoint(path):
    """A checkpoint of this script, loaded to the CPU. One-line errors for a file that is
    truncated, not a checkpoint, or another script's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OutputError(f"{path} is not a readable checkpoint (truncated, or not a torch file: "
                          f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "train_mnist":
        kind = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise OutputError(f"{path} is not a train_mnist.py checkpoint (it holds: {kind})")
    return ckpt


def load_autoencoder(path, device="cpu"):
    """A trained tokenizer from a checkpoint: model.encode(images), model.decode(indices)."""
    ckpt = load_checkpoint(path)
    model = Autoencoder(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


@dataclass
class Trainer:
    """Everything one training step touches."""
    model: nn.Module
    disc: nn.Module
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


def build_trainer(cfg, device):
    # channels_last (NHWC): the CPU convolutions of a training step ran 14% faster (EXPERIMENTS.md)
    model = Autoencoder(cfg).to(device, memory_format=torch.channels_last)
    disc = make_discriminator().to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam([
        {"params": model.encoder.parameters(), "lr": cfg.lr * cfg.encoder_lr_mult},
        {"params": model.decoder.parameters(), "lr": cfg.lr},
        {"params": model.vq.parameters(), "lr": cfg.lr * cfg.codebook_lr_mult}])
    return Trainer(model, disc, opt, torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)))


def apply_stage(cfg, trainer, schedule):
    """Freeze the encoder and switch the quantizer's terms for the current stage."""
    trainer.model.encoder.requires_grad_(schedule.encoder_trainable)
    if isinstance(trainer.model.vq, nsvq.NSVQ):
        trainer.model.vq.dense = cfg.dense and schedule.dense_loss


def train_step(cfg, trainer, x, gan_w, commitment, replace):
    """One training step: autoencoder + quantizer (+ GAN), the critic, codebook upkeep.
    Returns (losses, out, counts, dead); dead is None when there was no replacement."""
    x_hat, z_e, out = trainer.model(x)
    losses = {"rec": F.mse_loss(x_hat, x), **out.losses}
    if not commitment:
        losses["commit"] = losses["commit"].detach() * 0  # encoder frozen: nothing to commit
    if gan_w > 0:
        losses["gan"] = gan_w * generator_gan_loss(trainer.disc(x_hat))
    trainer.opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    trainer.opt.step()
    if gan_w > 0:  # the critic's step
        d_loss = critic_hinge_loss(trainer.disc(x), trainer.disc(x_hat.detach()))
        trainer.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        trainer.opt_d.step()
        losses["disc"] = d_loss.detach()
    # Codebook upkeep after the step, in the method's order.
    vq = trainer.model.vq
    counts = vq.update_(z_e.detach(), out.indices)
    dead = None
    if replace:
        dead = vq.replace_dead_codes_(cfg.threshold)
        if vq.codebook_by_gradient:
            nsvq.reset_adam_state_(trainer.opt, vq.embedding, dead)
    return {k: float(v.detach()) for k, v in losses.items()}, out, counts, dead


@torch.no_grad()
def probe(model, images, previous):
    """Utilization, reconstruction and scales on a fixed batch, and drift / churn since the
    previous probe: is the codebook keeping up, and does the decoder still listen?"""
    model.eval()
    z = model.encoder(images)
    out = model.vq(z)
    model.train()
    x_hat = model.decoder(out.z_q)
    zr, zqr = (nsvq.flatten_latents(t, model.vq.dim) for t in (z, out.z_q))  # (N, D)
    counts = torch.bincount(out.indices.flatten().cpu(), minlength=model.vq.codebook_size)
    record = {"utilization": nsvq.codebook_stats(counts)["utilization"],
              "mse": float(F.mse_loss(x_hat, images)),
              "drift": nsvq.encoder_drift(previous[0], z) if previous else 0.0,
              "churn": nsvq.assignment_churn(previous[1], out.indices) if previous else 0.0,
              "latent_norm": float(zr.norm(dim=1).mean()),
              "code_norm": float(model.vq.codebook.detach().norm(dim=1).mean()),
              "quant_error": float((zr - zqr).norm(dim=1).mean()),
              "dead": int(model.vq.upkeep.dead().sum()),  # by the usage that replacement reads
              "output_std": float(x_hat.std(0).mean())}
    return record, (z, out.indices)


def log_line(epoch, stage, window, test, record, seconds):
    """One line per epoch: losses by name, codebook health, the kernel, test error, drift."""
    means = {k: v / window["steps"] for k, v in window["sums"].items()}
    health = nsvq.codebook_stats(window["counts"])
    kernel = "".join(f" {k} {v / window['steps']:.3g}" for k, v in window["diagnostics"].items())
    print(f"epoch {epoch:2d} | {stage:6s} | " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
          + f" | util {health['utilization']:.1%} ppl {health['perplexity']:.0f} dead {health['dead_codes']} "
          f"re-seeded {window['reseeded']}{kernel} | test mse {test['test_mse']:.5f} psnr {test['test_psnr']:.2f} "
          f"| drift {record['drift']:.4f} churn {record['churn']:.1%} | {seconds:.0f}s", flush=True)
    return means


@torch.no_grad()
def evaluate(model, images, batch_size=500):
    """Test MSE, mean per-image PSNR and SSIM (metrics.ssim) and codebook health over a whole split."""
    model.eval()
    K = model.vq.codebook_size
    counts, se, psnr, ssim = torch.zeros(K), 0.0, 0.0, 0.0
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x_hat, _, out = model(x)
        per_image = (x_hat - x).pow(2).flatten(1).mean(1)
        se += float(per_image.sum())
        psnr += float((10 * torch.log10(1.0 / per_image.clamp(min=1e-10))).sum())
        ssim += float(metrics.ssim(x_hat.float(), x.float()).sum())
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=K)
    model.train()
    return {"test_mse": se / len(images), "test_psnr": psnr / len(images), "test_ssim": ssim / len(images),
            **nsvq.codebook_stats(counts)}, counts


def shade_stages(ax, stage_start, end):
    """Shade warm-up and stage 2 on a plot against epochs."""
    colors = {"warmup": "0.85", "stage2": "0.93"}
    starts = sorted(stage_start.items(), key=lambda kv: kv[1]) + [("end", end)]
    for (stage, s), (_, e) in zip(starts, starts[1:]):
        if stage in colors and e > s:
            ax.axvspan(s, e, color=colors[stage], label=stage)


def make_figures(model, test_images, counts, history, stage_start, epochs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    with torch.no_grad():
        x = test_images[:16].to(device)
        x_hat = model.decode(model.encode(x)).cpu()
    rows = torch.stack([test_images[:16], x_hat]).clamp(0, 1)  # (2, 16, 1, 28, 28): originals, reconstructions
    grid = rows[:, :, 0].permute(0, 2, 1, 3).reshape(2 * 28, 16 * 28)  # one image, one axes: fast
    fig, ax = plt.subplots(figsize=(16, 2.3))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([14, 42], ["original", "reconstruction"], fontsize=9)
    ax.set_xticks([])
    savefig_atomic(fig, os.path.join(out, "reconstructions.png"), dpi=60, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.fill_between(range(len(counts)), counts.sort(descending=True).values.numpy(), step="post")
    ax.set(yscale="log", xlabel="code (sorted by use)", ylabel="test tokens", title="code usage")
    savefig_atomic(fig, os.path.join(out, "usage.png"), dpi=70, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    t = [h["epoch"] for h in history]
    for ax, key, title in zip(axes, ("utilization", "mse", "drift", "churn"),
                              ("probe utilization", "probe reconstruction MSE",
                               "encoder drift (RMS)", "assignment churn")):
        shade_stages(ax, stage_start, epochs)
        ax.plot(t, [h[key] for h in history])
        ax.set(title=title, xlabel="epoch")
    axes[1].set_yscale("log")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    savefig_atomic(fig, os.path.join(out, "curves.png"), dpi=60)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def resolve(cfg):
    """Check every option and fill the defaults that depend on others (None fields)."""
    cfg = copy.deepcopy(cfg)
    nsvq.check_choice("--quantizer", cfg.quantizer, QUANTIZERS)
    nsvq.check_choice("--dataset", cfg.dataset, tuple(DATASETS))
    nsvq.check_choice("--tau-mode", cfg.tau_mode, nsvq.TAU_MODES)
    nsvq.check_choice("--weighting", cfg.weighting, nsvq.WEIGHTINGS)
    nsvq.check_choice("--replace-from", cfg.replace_from, nsvq.REPLACE_FROM)
    for field in ("dense", "replace", "stages"):  # on for the method, off for the baselines
        if getattr(cfg, field) is None:
            setattr(cfg, field, cfg.quantizer == "nsvq" or (cfg.quantizer == "simvq-ns" and field != "replace"))
    if cfg.reseed_at and not cfg.replace:
        raise ValueError("--reseed-at re-seeds through replacement: it needs --replace")
    if cfg.quantizer in ("simvq", "simvq-ns") and cfg.replace:
        raise ValueError(f"--replace does not apply to {cfg.quantizer} (it has no per-code parameters)")
    if cfg.init_from and cfg.resume:
        raise ValueError("--init-from starts a new run from given weights; --resume continues one: pass one")
    for name in ("codebook_size", "dim", "epochs", "batch_size", "replace_every", "patience",
                 "probe_every"):
        nsvq.check_count("--" + name.replace("_", "-"), getattr(cfg, name), 1)
    for name in ("warmup_epochs", "gan_ramp_epochs", "reseed_at"):
        nsvq.check_count("--" + name.replace("_", "-"), getattr(cfg, name), 0)
    for name in ("beta", "alpha", "gan_weight"):
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0)
    for name in ("lr", "encoder_lr_mult", "codebook_lr_mult", "disc_lr", "lam", "usage_horizon"):
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0, low_open=True)
    nsvq.check_number("--ema-decay", cfg.ema_decay, low=0, high=1, high_open=True)
    nsvq.check_number("--threshold", cfg.threshold, low=0, high=1)
    nsvq.check_tau(cfg.tau)
    nsvq.check_count("--width", cfg.width, 2)
    if cfg.decoder_norm and cfg.width % 8:
        raise ValueError(f"--width must be a multiple of 8 with decoder_norm (GroupNorm with 8 groups), "
                         f"got {cfg.width}; or pass --no-decoder-norm")
    if cfg.freeze_epoch is None:  # leave the warm-up, and with the GAN one stage-2 epoch
        cfg.freeze_epoch = max(1, cfg.epochs - cfg.warmup_epochs - (1 if cfg.gan else 0))
    nsvq.check_count("--freeze-epoch", cfg.freeze_epoch, 0)
    cfg.freeze_epoch = cfg.freeze_epoch or None  # 0: freeze on the plateau only
    cfg.out = cfg.out or os.path.join("runs", "mnist", cfg.quantizer)
    if cfg.device == "auto":
        cfg.device = ("cuda" if torch.cuda.is_available() else
                      "mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(cfg.device, False):
        raise ValueError(f"--device {cfg.device} is not available here; use auto, cpu, cuda or mps")
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
    if not cfg.resume and not cfg.overwrite and os.path.exists(os.path.join(cfg.out, "ckpt.pt")):
        raise OutputError(f"--out {cfg.out} holds an earlier run: continue it with --resume auto, "
                          f"or pass --overwrite to start afresh (its checkpoint is deleted)")


def make_out(cfg):
    """Create --out once the run is sure to start; --overwrite deletes the earlier checkpoint."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {cfg.out}: cannot create it ({e.strerror})") from None
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    if not cfg.resume and os.path.exists(ckpt):
        os.remove(ckpt)


def main(cfg):
    # Setup
    cfg = resolve(cfg)
    check_out(cfg)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)

    # Setup data
    train_images, test_images = load_split(cfg, "train"), load_split(cfg, "test")
    steps_per_epoch = len(train_images) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({len(train_images)} images): no step would be taken")
    probe_images = test_images[:1000].to(device)  # a fixed batch for drift, churn and curves

    # Create model
    trainer = build_trainer(cfg, device)
    schedule = nsvq.StageSchedule(cfg.patience if cfg.stages else None,
                                  cfg.freeze_epoch if cfg.stages else None,
                                  cfg.warmup_epochs, cfg.gan_ramp_epochs, gan_stage1=cfg.gan_stage1)
    state = {"epoch": 0, "step": 0, "history": [], "epoch_log": [], "train_seconds": 0.0}
    if cfg.resume:
        path = os.path.join(cfg.out, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint at {path}")
        ckpt = load_checkpoint(path)
        for key in ("quantizer", "codebook_size", "dim", "width", "decoder_norm"):
            if ckpt["config"].get(key) != getattr(cfg, key):
                raise ValueError(f"--resume: checkpoint has {key}={ckpt['config'].get(key)!r}, "
                                 f"this run asks for {getattr(cfg, key)!r}")
        for name in ("model", "disc", "opt", "opt_d"):
            getattr(trainer, name).load_state_dict(ckpt[name])
        schedule.load_state_dict(ckpt["schedule"])
        state = ckpt["state"]
        state.setdefault("epoch_log", [])  # checkpoints written before it was kept
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {path} at epoch {state['epoch']} ({schedule.stage})")
    elif cfg.init_from:
        if not os.path.isfile(cfg.init_from):
            raise FileNotFoundError(f"--init-from {cfg.init_from}: no such file")
        try:
            weights = torch.load(cfg.init_from, map_location=device, weights_only=True)
        except Exception as e:  # not a torch file, truncated, or not plain tensors
            raise ValueError(f"--init-from {cfg.init_from} is not a readable state_dict file ({e})") from None
        try:
            trainer.model.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"--init-from {cfg.init_from} does not fit this model: {e}") from None
    make_out(cfg)

    # Training loop
    _, previous = probe(trainer.model, probe_images, None)  # the reference for the first drift
    while state["epoch"] < cfg.epochs:
        epoch, stage = state["epoch"], schedule.stage
        apply_stage(cfg, trainer, schedule)
        replace = cfg.replace and schedule.replacement
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        window = {"sums": {}, "diagnostics": {}, "counts": torch.zeros(cfg.codebook_size), "reseeded": 0, "steps": 0}
        t0 = time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch} {stage}", disable=cfg.quiet,
                   leave=False, dynamic_ncols=True)
        for i in bar:
            x = train_images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            if cfg.reseed_at and state["step"] == cfg.reseed_at:  # the next call re-seeds every code
                trainer.model.vq.upkeep.seeded.zero_()
            gan_w = cfg.gan_weight * schedule.gan_weight(epoch + i / steps_per_epoch) if cfg.gan else 0.0
            losses, out, counts, dead = train_step(cfg, trainer, x, gan_w, schedule.commitment,
                                                   replace and state["step"] % cfg.replace_every == 0)
            for k, v in losses.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            for k, v in out.diagnostics.items():  # NSVQ: kernel mass and tau, per step
                window["diagnostics"][k] = window["diagnostics"].get(k, 0.0) + float(v)
            window["counts"] += counts.cpu()
            window["reseeded"] += 0 if dead is None else len(dead)
            window["steps"] += 1
            state["step"] += 1
            if state["step"] % cfg.probe_every == 0:  # fixed intervals, so drift and churn compare
                record, previous = probe(trainer.model, probe_images, previous)
                state["history"].append({"epoch": epoch + (i + 1) / steps_per_epoch, "step": state["step"],
                                         "stage": stage, **record})
                bar.set_postfix(loss=f"{sum(losses.values()):.4f}", util=f"{record['utilization']:.0%}")
        state["train_seconds"] += time.time() - t0
        test, _ = evaluate(trainer.model, test_images)
        last = state["history"][-1] if state["history"] else {"drift": 0.0, "churn": 0.0}
        means = log_line(epoch, stage, window, test, last, time.time() - t0)
        state["epoch_log"].append({"epoch": epoch, "stage": stage, **means, "test_mse": test["test_mse"],
                                **{k: v / window["steps"] for k, v in window["diagnostics"].items()}})
        if schedule.end_epoch(epoch, means.get("commit", 0.0)):
            print(f"stage change: {schedule.stage} from epoch {epoch + 1}")
        state["epoch"] = epoch + 1
        save_atomic({"kind": "train_mnist", "config": dataclasses.asdict(cfg),
                     "model": trainer.model.state_dict(), "disc": trainer.disc.state_dict(),
                     "opt": trainer.opt.state_dict(), "opt_d": trainer.opt_d.state_dict(),
                     "schedule": schedule.state_dict(), "state": state, "rng": torch.get_rng_state()},
                    os.path.join(cfg.out, "ckpt.pt"))

    # Save and evaluate
    test, counts = evaluate(trainer.model, test_images)
    results = {"quantizer": cfg.quantizer, "codebook_size": cfg.codebook_size, **test,
               "train_seconds": state["train_seconds"], "epochs": cfg.epochs,
               "stage_start": schedule.stage_start, "history": state["history"], "epoch_log": state["epoch_log"],
               "config": dataclasses.asdict(cfg)}
    write_json_atomic(results, os.path.join(cfg.out, "results.json"))
    make_figures(trainer.model, test_images, counts, state["history"], schedule.stage_start, cfg.epochs, cfg.out)
    print(f"{cfg.quantizer}: test mse {test['test_mse']:.5f}, psnr {test['test_psnr']:.2f} dB, "
          f"utilization {test['utilization']:.1%}, perplexity {test['perplexity']:.0f}, "
          f"{state['train_seconds']:.0f}s -> {cfg.out}")
    return results


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

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
    """An argparse parser generated from Config: --help lists every field with its comment
    and default; a bool field is a pair of flags (--gan / --no-gan)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = config_help()
    for f in dataclasses.fields(Config):
        name = f.name.replace("_", "-")
        help = comments.get(f.name, "")
        if f.default is not None and not re.search(r"\(default\b", help):  # None: its comment explains
            shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
            help += f" (default: {shown if shown != '' else repr(shown)})"
        help = help.replace("%", "%%")
        if f.type in (bool, Optional[bool]):
            parser.add_argument(f"--{name}", f"--no-{name}", action=Switch, default=f.default, help=help)
        else:
            base = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(f"--{name}", type=base, default=f.default, help=help)
    return Config(**vars(parser.parse_args(argv)))


def interrupted(cfg):
    """The one line Ctrl-C prints: where the last checkpoint is and how to continue."""
    path = os.path.join(cfg.out or os.path.join("runs", "mnist", cfg.quantizer), "ckpt.pt")
    try:
        epoch = load_checkpoint(path)["state"]["epoch"]
    except OutputError:
        return "interrupted before the first checkpoint: nothing to resume"
    return f"interrupted: {path} holds the run up to epoch {epoch}; continue it with --resume auto"


if __name__ == "__main__":
    cfg = parse_args()
    try:
        main(cfg)
    except (DataError, ValueError, FileNotFoundError, OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(interrupted(cfg), file=sys.stderr)
        sys.exit(130)
