"""
train_mnist.py -- the laptop demo: codebook collapse, and what each part of NSVQ does about it.

    python train_mnist.py                      # NSVQ: stage 1 -> freeze -> warm-up -> stage 2 (GAN)
    python train_mnist.py --quantizer ste      # plain VQ-VAE: watch the codebook collapse
    python train_mnist.py --compare            # the ablation table: 8 methods, same budget, no GAN
    python train_mnist.py --stress             # encoder drift: encoder lr x0.1, x1, x3, x10
    python train_mnist.py --data-dir ../shared/data/mnist-offline --no-download   # offline

Missing MNIST files are downloaded (md5-checked, written atomically) into --data-dir.
Outputs go to --out (default runs/mnist/<quantizer>): results.json, ckpt.pt and figures.
A trained checkpoint is a tokenizer: see load_autoencoder() and the README.
"""

import copy
import dataclasses
import gzip
import hashlib
import json
import math
import os
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

import nsvq


@dataclass
class Config:
    # data
    data_dir: str = "./data/mnist"       # IDX files; missing ones are downloaded here
    dataset: str = "mnist"               # mnist | fashion-mnist
    no_download: bool = False            # never touch the network
    out: Optional[str] = None            # output folder (default runs/mnist/<quantizer>)
    # model
    quantizer: str = "nsvq"              # ste | ema | simvq | nsvq
    codebook_size: int = 1024            # K: large enough that plain STE collapses (README)
    dim: int = 16                        # D, the code dimension
    width: int = 64                      # channels of the conv autoencoder
    decoder_norm: bool = True            # GroupNorm on the decoder's first layer (README: drift)
    beta: float = 0.25                   # commitment weight (VQ-VAE)
    ema_decay: float = 0.99              # EMAVectorQuantizer decay (VQ-VAE-2's customary value)
    # NSVQ (defaults measured on MNIST, see README)
    alpha: float = 0.1                   # weight of the dense loss
    tau: float = 0.35                    # kernel temperature, squared-distance units
    weighting: str = "softmax"           # softmax (paper) | clamped (authors' earlier code)
    lam: float = 0.01                    # clamp scale for weighting=clamped
    dense: Optional[bool] = None         # dense loss on in stage 1 (default: on for nsvq)
    replace: Optional[bool] = None       # dead-code replacement in stage 1 (default: on for nsvq)
    replace_from: str = "latents"        # latents (authors' earlier code) | codes (paper)
    threshold: float = 0.01              # dead = usage below threshold / K
    usage_decay: float = 0.9             # usage EMA decay per step: how fast an unused code dies
    replace_every: int = 1               # replacement cadence in steps
    stages: Optional[bool] = None        # stage-wise training (default: on for nsvq)
    patience: int = 10                   # epochs without a new best commitment loss (paper: 10)
    freeze_epoch: Optional[int] = None   # freeze no later than this; None: leave 1 epoch for warm-up
                                         # and 1 for stage 2 (GAN) or just 1 (no GAN); 0: plateau only
    warmup_epochs: int = 1               # warm-up length after the freeze (ours)
    gan_ramp_epochs: int = 1             # stage-2 GAN ramp (paper: 2; shorter budget here)
    gan: bool = True                     # adversarial loss in stage 2 (--no-gan skips it)
    gan_weight: float = 0.1              # weight of the generator's adversarial term
    # optimisation
    epochs: int = 5                      # passes over the training split
    compare_epochs: int = 2              # budget of each of the 8 --compare runs
    stress_epochs: int = 1               # budget of each of the 16 --stress runs
    batch_size: int = 128
    lr: float = 1e-3                     # Adam, autoencoder and codebook
    encoder_lr_mult: float = 1.0         # encoder lr = lr * this: a faster or slower encoder
    codebook_lr_mult: float = 1.0        # codebook (quantizer parameters) lr = lr * this
    disc_lr: float = 2e-4                # Adam, discriminator
    probe_every: int = 50                # steps between probes (drift, churn, utilization, scales)
    device: str = "auto"                 # auto | cpu | cuda | mps
    seed: int = 0
    resume: bool = False                 # continue from <out>/ckpt.pt
    # modes
    compare: bool = False                # run the ablation table instead of one run
    stress: bool = False                 # run the drift stress test instead of one run
    quiet: bool = False                  # no progress bars


# -----------------------------------------------------------------------------
# Data: MNIST IDX files, downloaded and checked
# -----------------------------------------------------------------------------

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


class DataError(RuntimeError):
    """A data file is missing, corrupt or not what it claims to be."""


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
    raise DataError(f"could not download {os.path.basename(path)}:\n  " + "\n  ".join(errors))


def read_idx(path, kind):
    """Read a gzipped IDX file, checking gzip integrity, magic number, shape and size."""
    name = os.path.basename(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); delete it and run again "
                        f"to re-download it") from None
    magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: wrong magic number, expected {magic} for IDX {kind} ({name} "
                        f"may be a different file); delete it and run again")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if kind == "images" and dims[1:] != (28, 28):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes after decompression, header says {expected} "
                        f"(truncated or corrupt); delete it and run again")
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    return data.view(*dims)


def load_split(cfg, split):
    """Images (n, 1, 28, 28) float in [0, 1] for split 'train' or 'test'; downloads if needed."""
    spec = DATASETS[cfg.dataset]
    if os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
        raise DataError(f"--data-dir {cfg.data_dir} is a file, not a folder")
    os.makedirs(cfg.data_dir, exist_ok=True)
    tensors = {}
    for kind in ("images", "labels"):
        key = f"{split}_{kind}"
        path = os.path.join(cfg.data_dir, FILES[key])
        if not os.path.exists(path):
            urls = [m + FILES[key] for m in spec["mirrors"]]
            if cfg.no_download:
                raise DataError(f"missing {path}; --no-download is set. Fetch it from {urls[0]} "
                                f"or drop --no-download")
            print(f"downloading {FILES[key]} ...")
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
    """Conv encoder -> quantizer -> conv decoder. Images (B, 1, 28, 28) in [0, 1].

    SiLU, not ReLU: with ReLU a slow encoder (--encoder-lr-mult 0.1) let the decoder's first
    layer die and the model output the mean image (test MSE 0.123); SiLU has no dead zone.
    GroupNorm after the decoder's first conv (decoder_norm): without it a fast encoder
    (--encoder-lr-mult 3 or 10) left the codes behind until replacement re-seeded hundreds of
    them in one step; the decoder's input jumped ~15x in scale, its output went flat and never
    recovered. Normalising the decoder's first features makes it indifferent to that jump
    (README, "Encoder drift"); VQGAN-style decoders, like train_imagenet.py's, normalise too.
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


# -----------------------------------------------------------------------------
# Helpers: checkpoints, evaluation, probes, figures
# -----------------------------------------------------------------------------

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


def savefig_atomic(fig, path, **kwargs):
    """Save a matplotlib figure through a temporary file, as save_atomic does for checkpoints."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)


def load_autoencoder(path, device="cpu"):
    """A trained tokenizer from a checkpoint: model.encode(images), model.decode(indices)."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = Autoencoder(Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def evaluate(model, images, batch_size=500):
    """Test MSE, mean per-image PSNR and codebook health over a whole split."""
    model.eval()
    K = model.vq.codebook_size
    counts, se, psnr = torch.zeros(K), 0.0, 0.0
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x_hat, _, out = model(x)
        per_image = (x_hat - x).pow(2).flatten(1).mean(1)
        se += float(per_image.sum())
        psnr += float((10 * torch.log10(1.0 / per_image.clamp(min=1e-10))).sum())
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=K)
    model.train()
    return {"test_mse": se / len(images), "test_psnr": psnr / len(images),
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
    fig, axes = plt.subplots(2, 16, figsize=(16, 2.3))
    for i in range(16):
        for row, img in enumerate((test_images[i], x_hat[i])):
            axes[row, i].imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("original", loc="left", fontsize=9)
    axes[1, 0].set_title("reconstruction", loc="left", fontsize=9)
    savefig_atomic(fig, os.path.join(out, "reconstructions.png"), dpi=60, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(counts)), counts.sort(descending=True).values.numpy(), width=1.0)
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
    """Fill the per-quantizer defaults (None fields) and check the options."""
    cfg = copy.deepcopy(cfg)
    is_nsvq = cfg.quantizer == "nsvq"
    for field in ("dense", "replace", "stages"):
        if getattr(cfg, field) is None:
            setattr(cfg, field, is_nsvq)
    if cfg.quantizer == "simvq" and cfg.replace:
        raise ValueError("--replace does not apply to simvq (it has no per-code parameters)")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; expected one of {list(DATASETS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.replace_every < 1:
        raise ValueError("epochs, batch_size and replace_every must be >= 1")
    if cfg.width < 2 or (cfg.decoder_norm and cfg.width % 8):
        raise ValueError(f"width must be >= 2, and a multiple of 8 with decoder_norm (GroupNorm "
                         f"with 8 groups), got {cfg.width}; or pass --no-decoder-norm")
    if cfg.encoder_lr_mult <= 0:
        raise ValueError(f"encoder_lr_mult must be > 0, got {cfg.encoder_lr_mult}")
    if cfg.freeze_epoch is None:
        cfg.freeze_epoch = max(1, cfg.epochs - (2 if cfg.gan else 1))
    cfg.freeze_epoch = cfg.freeze_epoch or None  # 0: freeze on the plateau only
    cfg.out = cfg.out or os.path.join("runs", "mnist", cfg.quantizer)
    if cfg.device == "auto":
        cfg.device = ("cuda" if torch.cuda.is_available() else
                      "mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(cfg.device, False):
        raise ValueError(f"--device {cfg.device} is not available here; use auto, cpu, cuda or mps")
    return cfg


def main(cfg):
    cfg = resolve(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    train_images, test_images = load_split(cfg, "train"), load_split(cfg, "test")
    probe = test_images[:1000].to(device)  # fixed batch for drift, churn and curves

    model = Autoencoder(cfg).to(device)
    disc = make_discriminator().to(device)
    opt = torch.optim.Adam([
        {"params": model.encoder.parameters(), "lr": cfg.lr * cfg.encoder_lr_mult},
        {"params": model.decoder.parameters(), "lr": cfg.lr},
        {"params": model.vq.parameters(), "lr": cfg.lr * cfg.codebook_lr_mult}])
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    # Without stages the schedule never leaves stage 1.
    schedule = nsvq.StageSchedule(cfg.patience, cfg.freeze_epoch if cfg.stages else None,
                                  cfg.warmup_epochs, cfg.gan_ramp_epochs)
    if not cfg.stages:
        schedule.patience = math.inf
    start_epoch, step, history, train_seconds = 0, 0, [], 0.0
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        for key in ("quantizer", "codebook_size", "dim", "width", "decoder_norm"):
            if ckpt["config"].get(key) != getattr(cfg, key):
                raise ValueError(f"--resume: checkpoint has {key}={ckpt['config'].get(key)!r}, "
                                 f"this run asks for {getattr(cfg, key)!r}")
        model.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["opt"])
        opt_d.load_state_dict(ckpt["opt_d"])
        schedule.load_state_dict(ckpt["schedule"])
        start_epoch, step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]
        train_seconds = ckpt["train_seconds"]
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at epoch {start_epoch} ({schedule.stage})")

    vq = model.vq
    steps_per_epoch = len(train_images) // cfg.batch_size
    with torch.no_grad():
        prev_z, prev_idx = model.encoder(probe), None
    for epoch in range(start_epoch, cfg.epochs):
        # Apply the stage: freeze the encoder, switch the dense loss and replacement.
        stage = schedule.stage
        model.encoder.requires_grad_(schedule.encoder_trainable)
        vq.dense = cfg.dense and schedule.dense_loss
        replace = cfg.replace and schedule.replacement
        use_gan = cfg.gan and stage == "stage2"
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        sums, counts, n_rep, t0 = {}, torch.zeros(cfg.codebook_size), 0, time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch} {stage}", disable=cfg.quiet,
                   leave=False, dynamic_ncols=True)
        for i in bar:
            x = train_images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(device)
            x_hat, z_e, out = model(x)
            losses = {"rec": F.mse_loss(x_hat, x), **out.losses}
            if "commit" in losses and not schedule.commitment:
                losses["commit"] = losses["commit"].detach() * 0  # encoder frozen: nothing to commit
            if use_gan:
                ramp = schedule.gan_weight(epoch + i / steps_per_epoch)
                losses["gan"] = cfg.gan_weight * ramp * F.softplus(-disc(x_hat)).mean()
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_gan:  # hinge loss for the critic
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat.detach())).mean()
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            # Codebook upkeep, after the optimizer step, in the method's order.
            vq.update_(z_e.detach(), out.indices)
            if replace and step % cfg.replace_every == 0:
                dead = vq.replace_dead_codes_(cfg.threshold)
                n_rep += len(dead)
                if vq.codebook_by_gradient:
                    nsvq.reset_adam_state_(opt, vq.embedding, dead)
            counts += torch.bincount(out.indices.flatten().cpu(), minlength=cfg.codebook_size)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            step += 1
            if step % cfg.probe_every == 0:  # fixed intervals, so drift and churn compare
                with torch.no_grad():
                    model.eval()
                    z = model.encoder(probe)
                    p_out = vq(z)
                    model.train()
                    probe_counts = torch.bincount(p_out.indices.flatten().cpu(), minlength=cfg.codebook_size)
                    probe_hat = model.decoder(p_out.z_q)
                    zr, zqr = (nsvq.flatten_latents(t, cfg.dim) for t in (z, p_out.z_q))  # (N, D)
                    history.append({
                        "epoch": epoch + (i + 1) / steps_per_epoch, "step": step, "stage": stage,
                        "utilization": nsvq.codebook_stats(probe_counts)["utilization"],
                        "mse": float(F.mse_loss(probe_hat, probe)),
                        "drift": nsvq.encoder_drift(prev_z, z),
                        "churn": nsvq.assignment_churn(prev_idx, p_out.indices) if prev_idx is not None else 0.0,
                        # scales: is the codebook keeping up, and does the decoder still listen?
                        "latent_norm": float(zr.norm(dim=1).mean()),
                        "code_norm": float(vq.codebook.detach().norm(dim=1).mean()),
                        "quant_error": float((zr - zqr).norm(dim=1).mean()),
                        "output_std": float(probe_hat.std(0).mean())})
                    prev_z, prev_idx = z, p_out.indices
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", util=f"{history[-1]['utilization']:.0%}")
        train_seconds += time.time() - t0

        means = {k: v / steps_per_epoch for k, v in sums.items()}
        last = history[-1] if history else {"drift": 0.0, "churn": 0.0}
        health = nsvq.codebook_stats(counts)
        test, _ = evaluate(model, test_images)
        mass = ""
        if isinstance(vq, nsvq.NSVQ):
            with torch.no_grad():
                z = nsvq.flatten_latents(model.encoder(probe), cfg.dim)
                mass = f" mass {nsvq.kernel_mass(z, vq.codebook, vq.tau, vq.weighting, vq.lam):.2f}"
        print(f"epoch {epoch:2d} | {stage:6s} | " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f" | util {health['utilization']:.1%} ppl {health['perplexity']:.0f} "
              f"dead {health['dead_codes']} replaced {n_rep}{mass} | test mse {test['test_mse']:.5f} "
              f"psnr {test['test_psnr']:.2f} | drift {last['drift']:.4f} "
              f"churn {last['churn']:.1%} | {time.time() - t0:.0f}s", flush=True)
        changed = schedule.end_epoch(epoch, means.get("commit", 0.0))
        if changed:
            print(f"stage change: {schedule.stage} from epoch {epoch + 1}")
        save_atomic({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                     "disc": disc.state_dict(), "opt": opt.state_dict(), "opt_d": opt_d.state_dict(),
                     "schedule": schedule.state_dict(), "epoch": epoch, "step": step,
                     "history": history, "train_seconds": train_seconds,
                     "rng": torch.get_rng_state()}, ckpt_path)

    test, counts = evaluate(model, test_images)
    results = {"quantizer": cfg.quantizer, "codebook_size": cfg.codebook_size, **test,
               "train_seconds": train_seconds, "epochs": cfg.epochs,
               "stage_start": schedule.stage_start, "history": history,
               "config": dataclasses.asdict(cfg)}
    write_json_atomic(results, os.path.join(cfg.out, "results.json"))
    make_figures(model, test_images, counts, history, schedule.stage_start, cfg.epochs, cfg.out)
    print(f"{cfg.quantizer}: test mse {test['test_mse']:.5f}, psnr {test['test_psnr']:.2f} dB, "
          f"utilization {test['utilization']:.1%}, perplexity {test['perplexity']:.0f}, "
          f"{train_seconds:.0f}s -> {cfg.out}")
    return results


# -----------------------------------------------------------------------------
# Comparison and stress modes
# -----------------------------------------------------------------------------

VARIANTS = {  # name -> overrides: each method with its customary settings
    "ste": dict(quantizer="ste", replace=False),
    "ste+replace": dict(quantizer="ste", replace=True),
    "ema": dict(quantizer="ema", replace=False),
    "ema+replace": dict(quantizer="ema", replace=True),
    "simvq": dict(quantizer="simvq"),
    "nsvq-loss-only": dict(quantizer="nsvq", replace=False, stages=False),
    "nsvq-no-stages": dict(quantizer="nsvq", stages=False),
    "nsvq": dict(quantizer="nsvq"),
}
# The stress test adds NSVQ with the first version of the demo model, whose decoder had no
# normalisation: under a fast encoder it collapsed to the mean image (README, "Encoder drift").
STRESS_VARIANTS = {**VARIANTS, "nsvq-no-decoder-norm": dict(quantizer="nsvq", decoder_norm=False)}
TABLE_KEYS = ("utilization", "perplexity", "test_mse", "test_psnr", "train_seconds")


def run_variants(cfg, runs, out, epochs):
    """Train each (name, overrides) with the same seed, data and budget; return the results."""
    results = []
    for name, overrides in runs:
        print(f"\n=== {name} ===")
        run_cfg = dataclasses.replace(cfg, compare=False, stress=False, gan=False, resume=False,
                                      epochs=epochs, quiet=True, out=os.path.join(out, name), **overrides)
        results.append({"name": name, **{k: v for k, v in main(run_cfg).items() if k != "config"}})
    return results


def print_table(results, extra=()):
    cols = list(extra) + list(TABLE_KEYS)
    print("\n| name | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        cells = [f"{r[c]:.1%}" if c == "utilization" else f"{r[c]:.5f}" if c == "test_mse"
                 else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


def compare(cfg):
    out = cfg.out or os.path.join("runs", "mnist", "compare")
    results = run_variants(cfg, list(VARIANTS.items()), out, cfg.compare_epochs)
    print_table(results)
    write_json_atomic([{k: v for k, v in r.items() if k != "history"} for r in results],
                      os.path.join(out, "compare.json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([h["epoch"] for h in r["history"]], [h["utilization"] for h in r["history"]], label=r["name"])
    ax.set(xlabel="epoch", ylabel="probe utilization", ylim=(0, 1.02), title="codebook utilization")
    ax.legend(fontsize=8)
    savefig_atomic(fig, os.path.join(out, "compare.png"), dpi=70, bbox_inches="tight")
    return results


STRESS_METHODS = ("ste+replace", "ema+replace", "nsvq", "nsvq-no-decoder-norm")
STRESS_MULTS = (0.1, 1.0, 3.0, 10.0)


def stress(cfg):
    out = cfg.out or os.path.join("runs", "mnist", "stress")
    runs = [(f"{m}@x{mult:g}", dict(STRESS_VARIANTS[m], encoder_lr_mult=mult))
            for m in STRESS_METHODS for mult in STRESS_MULTS]
    results = run_variants(cfg, runs, out, cfg.stress_epochs)
    for r in results:
        r["method"], r["encoder_lr_mult"] = r["name"].split("@x")[0], float(r["name"].split("@x")[1])
        r["max_drift"] = max(h["drift"] for h in r["history"])
        r["mean_churn"] = sum(h["churn"] for h in r["history"]) / len(r["history"])
    print_table(results, extra=("max_drift", "mean_churn"))
    write_json_atomic([{k: v for k, v in r.items() if k != "history"} for r in results],
                      os.path.join(out, "stress.json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in STRESS_METHODS:
        rs = [r for r in results if r["method"] == m]
        axes[0].plot([r["encoder_lr_mult"] for r in rs], [r["utilization"] for r in rs], "o-", label=m)
        axes[1].plot([r["encoder_lr_mult"] for r in rs], [r["test_mse"] for r in rs], "o-", label=m)
    axes[0].set(xscale="log", xlabel="encoder lr multiplier", ylabel="test utilization", ylim=(0, 1.02))
    axes[1].set(xscale="log", yscale="log", xlabel="encoder lr multiplier", ylabel="test MSE")
    axes[0].legend()
    fig.tight_layout()
    savefig_atomic(fig, os.path.join(out, "stress.png"), dpi=70)
    return results


def parse_args(argv=None):
    """An argparse parser generated from Config: --help lists every field with its default."""
    import argparse
    import inspect
    import re
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type is bool and not f.default:
            parser.add_argument(flag, action="store_true", help=help)
        elif f.type in (bool, Optional[bool]):  # --gan / --no-gan
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            base = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=base, default=f.default, help=help)
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    cfg = parse_args()
    try:
        if cfg.compare:
            compare(cfg)
        elif cfg.stress:
            stress(cfg)
        else:
            main(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
