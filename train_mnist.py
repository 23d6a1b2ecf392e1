"""
train_mnist.py -- the laptop demo: a VQ autoencoder on MNIST trained with NSVQ, stage by stage.

    python train_mnist.py                          # NSVQ: stage 1 -> freeze -> warm-up -> stage 2
    python train_mnist.py --quantizer ste          # plain VQ-VAE: watch the codebook collapse
    python train_mnist.py --data DIR --no-download # offline, the four IDX files in DIR

Outputs in --out (default runs/mnist/<quantizer>): results.json, curves.png and ckpt.pt, a
tokenizer (load_autoencoder). The twin of train_imagenet.py without what scale adds; the
comparisons and the paper's analyses (experiments.py) run on top of main().
"""

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import metrics
import nsvq


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    data: str = option("./data/mnist", "folder of the IDX files; missing ones are downloaded")
    download: bool = option(True, "fetch missing files (--no-download: never go online)")
    out: str = option("", "output folder (default runs/mnist/<quantizer>)")
    overwrite: bool = option(False, "replace the run in an --out that holds one")
    quantizer: str = option("nsvq", "nsvq | simvq | ema | ste | fsq | simvq-ns (+ dense loss)")
    codebook_size: int = option(1024, "K: large enough that plain STE collapses")
    dim: int = option(16, "D, the code dimension")
    width: int = option(64, "channels of the autoencoder (a multiple of 8)")
    beta: float = option(0.25, "commitment weight (VQ-VAE)")
    ema_decay: float = option(0.8, "EMA quantizer's decay (0.8 beat 0.99: EXPERIMENTS.md 4)")
    alpha: float = option(0.1, "weight of the dense loss")
    tau: float = option(0.35, "kernel temperature, in the units of --tau-mode")
    tau_mode: str = option("absolute", "absolute (paper) | relative (x mean d_{i,q_i}); equal here")
    replace: Optional[bool] = option(None, "dead-code replacement in stage 1 (default: nsvq)")
    replace_every: int = option(1, "steps between replacement calls")
    stages: Optional[bool] = option(None, "stage-wise training (default: nsvq, simvq-ns)")
    patience: int = option(10, "epochs with no new best commitment loss: freeze (paper)")
    freeze_epoch: Optional[int] = option(None, "freeze by then at the latest (default: time for "
                                         "the warm-up and a stage-2 epoch; 0: plateau only)")
    warmup_epochs: int = option(1, "encoder frozen, no GAN (ours)")
    gan_ramp_epochs: int = option(1, "stage-2 GAN ramp (paper: 2; a short budget here)")
    gan: bool = option(True, "adversarial loss (--no-gan: reconstruction only)")
    gan_weight: float = option(0.1, "generator's adversarial weight")
    gan_stage1: bool = option(False, "GAN from step 0, as the paper (failed 1 seed of 3 here)")
    epochs: int = option(5, "passes over the training split")
    batch_size: int = option(128, "images per step")
    lr: float = option(1e-3, "Adam, autoencoder and codebook (critic: 2e-4)")
    device: str = option("auto", "auto | cpu | cuda")
    seed: int = option(0, "seed of the weights and the data order")
    quiet: bool = option(False, "no progress bars")


# -----------------------------------------------------------------------------
# Data: MNIST IDX files, downloaded and checked
# -----------------------------------------------------------------------------

class DataError(RuntimeError):
    """A data file is missing, corrupt or not what it claims to be."""


MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
           "https://storage.googleapis.com/cvdf-datasets/mnist/"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),  # name, md5;
         "test": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3")}  # no labels


def read_idx(path):
    """A gzipped IDX image file as uint8 (n, 28, 28), after checking gzip, magic and size."""
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path}: permission denied")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); delete it") from None
    magic, n, h, w = struct.unpack(">4I", raw[:16]) if len(raw) >= 16 else (0, 0, 0, 0)
    if magic != 2051 or n == 0 or (h, w) != (28, 28) or len(raw) != 16 + n * h * w:
        raise DataError(f"{path} holds no IDX images of 28 x 28 (magic number {magic}, expected "
                        f"2051; header {n} x {h} x {w}; {len(raw)} bytes: truncated?); delete it")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(n, h, w)


def load_split(cfg, split):
    """Images (n, 1, 28, 28) in [0, 1] of split 'train' or 'test', downloaded if missing."""
    if os.path.exists(cfg.data) and not os.path.isdir(cfg.data):
        raise DataError(f"--data {cfg.data} is a file, not a folder")
    name, md5 = FILES[split]
    path = os.path.join(cfg.data, name)
    if not os.path.exists(path) and not cfg.download:
        raise DataError(f"missing {path}; --no-download is set. Fetch it from {MIRRORS[0]}{name} "
                        f"or drop --no-download")
    if not os.path.exists(path):
        download([m + name for m in MIRRORS], path, md5)
    return read_idx(path)[:, None].float() / 255.0


def download(urls, path, md5):
    """The first mirror that answers with the right md5, written atomically."""
    print(f"downloading {os.path.basename(path)} ...")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                payload = response.read()
            if hashlib.md5(payload).hexdigest() != md5:
                raise DataError(f"md5 {hashlib.md5(payload).hexdigest()} != expected {md5}")
            return write_atomic(path, lambda tmp: open(tmp, "wb").write(payload))
        except (OSError, DataError) as e:  # try the next mirror; report every failure
            errors.append(f"{url}: {e}")
    raise DataError(f"could not download {os.path.basename(path)} ({'; '.join(errors)})")


# -----------------------------------------------------------------------------
# Model: a small conv autoencoder (28x28 -> 7x7 latents), a PatchGAN critic
# -----------------------------------------------------------------------------

def make_quantizer(cfg):
    K, D, beta = cfg.codebook_size, cfg.dim, cfg.beta
    dense = dict(alpha=cfg.alpha, tau=cfg.tau, tau_mode=cfg.tau_mode)
    return {"ste": lambda: nsvq.VectorQuantizer(K, D, beta),
            "ema": lambda: nsvq.EMAVectorQuantizer(K, D, beta, decay=cfg.ema_decay),
            "simvq": lambda: nsvq.SimVQ(K, D, beta),
            "simvq-ns": lambda: nsvq.NSSimVQ(K, D, beta, **dense),
            "fsq": lambda: nsvq.FSQ(nsvq.FSQ_LEVELS[K], D),
            "nsvq": lambda: nsvq.NSVQ(K, D, beta, **dense)}[cfg.quantizer]()


class Autoencoder(nn.Module):
    """Conv encoder -> quantizer -> conv decoder, images (B, 1, 28, 28) in [0, 1]. SiLU, and a
    GroupNorm in the decoder: without them slow or fast encoders killed it (EXPERIMENTS.md 7)."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w // 2, 4, 2, 1), nn.SiLU(),                        # 14x14
            nn.Conv2d(w // 2, w, 4, 2, 1), nn.SiLU(),                        # 7x7
            nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(), nn.Conv2d(w, cfg.dim, 1))  # (B, D, 7, 7)
        self.vq = make_quantizer(cfg)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.dim, w, 3, 1, 1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.ConvTranspose2d(w, w // 2, 4, 2, 1), nn.SiLU(),              # 14x14
            nn.ConvTranspose2d(w // 2, 1, 4, 2, 1), nn.Sigmoid())           # 28x28

    def forward(self, x):
        z_e = self.encoder(x)
        out = self.vq(z_e)
        return self.decoder(out.z_q), z_e, out

    @torch.no_grad()
    def encode(self, images):  # (B, 1, 28, 28) in [0, 1] -> (B, 7, 7) code indices
        return self.vq(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices):  # (B, 7, 7) code indices -> (B, 1, 28, 28)
        return self.decoder(self.vq.decode(indices))


def make_discriminator(w=32):
    """A small PatchGAN critic: one logit per 7x7 patch."""
    return nn.Sequential(nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 2 * w, 4, 2, 1),
                         nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2), nn.Conv2d(2 * w, 1, 3, 1, 1))


# -----------------------------------------------------------------------------
# Helpers: files, the training step, probes, evaluation, figures
# -----------------------------------------------------------------------------

class OutputError(RuntimeError):
    """An output could not be written."""


def write_atomic(path, write):
    """write(tmp), then rename: a crash, Ctrl-C or a full disk never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"writing {path} failed ({str(e).strip()[:200]})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_autoencoder(path, device="cpu"):
    """The tokenizer in a ckpt.pt of this script: model.encode(images), model.decode(indices)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = Autoencoder(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def build_trainer(cfg, device):
    """What a step touches; channels_last made CPU convolutions 14% faster (EXPERIMENTS.md 9)."""
    model = Autoencoder(cfg).to(device, memory_format=torch.channels_last)
    disc = make_discriminator().to(device, memory_format=torch.channels_last)
    groups = [{"params": m.parameters()} for m in (model.encoder, model.decoder, model.vq)]
    return SimpleNamespace(model=model, disc=disc, opt=torch.optim.Adam(groups, lr=cfg.lr),
                           opt_d=torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9)))


def apply_stage(cfg, trainer, schedule):
    """Freeze the encoder and switch the dense loss (NSVQ, NSSimVQ) for the current stage."""
    trainer.model.encoder.requires_grad_(schedule.encoder_trainable)
    if hasattr(trainer.model.vq, "dense"):
        trainer.model.vq.dense = schedule.dense_loss


def train_step(cfg, trainer, x, gan_w, commitment, replace):
    """Autoencoder (+ GAN), critic, then codebook upkeep: (losses, out, counts, re-seeded)."""
    x_hat, z_e, out = trainer.model(x)
    losses = {"rec": F.mse_loss(x_hat, x), **out.losses}
    if not commitment and "commit" in losses:
        losses["commit"] = losses["commit"].detach() * 0  # the encoder is frozen: logged as 0
    if gan_w > 0:  # non-saturating, on each image's mean logit
        losses["gan"] = gan_w * F.softplus(-trainer.disc(x_hat).flatten(1).mean(1)).mean()
    trainer.opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    trainer.opt.step()
    if gan_w > 0:  # the critic's hinge loss
        real, fake = trainer.disc(x), trainer.disc(x_hat.detach())
        losses["disc"] = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        trainer.opt_d.zero_grad(set_to_none=True)
        losses["disc"].backward()
        trainer.opt_d.step()
    vq = trainer.model.vq
    counts = vq.update_(z_e.detach(), out.indices)
    reseeded = vq.replace_dead_codes_() if replace else None
    if reseeded is not None and vq.codebook_by_gradient:
        nsvq.reset_adam_state_(trainer.opt, vq.embedding, reseeded)
    return {k: float(v.detach()) for k, v in losses.items()}, out, counts, reseeded


def log_line(epoch, stage, window, test, seconds):
    """One line per epoch: losses by name, codebook health, the kernel, test error."""
    means = {k: v / window["steps"] for k, v in window["sums"].items()}
    health = metrics.codebook_stats(window["counts"])
    kernel = "".join(f" {k} {v / window['steps']:.3g}" for k, v in window["diagnostics"].items())
    print(f"epoch {epoch:2d} | {stage:6s} | " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
          + f" | util {health['utilization']:.1%} ppl {health['perplexity']:.0f} dead "
          f"{health['dead_codes']} re-seeded {window['reseeded']}{kernel} | test mse "
          f"{test['test_mse']:.5f} psnr {test['test_psnr']:.2f} used {test['utilization']:.1%} | "
          f"{seconds:.0f}s", flush=True)
    return means


@torch.no_grad()
def evaluate(model, images, batch_size=500):
    """Test MSE, mean per-image PSNR and SSIM (metrics.ssim), codebook health over a split."""
    model.eval()
    device = next(model.parameters()).device
    counts, sums = torch.zeros(model.vq.codebook_size), torch.zeros(3, dtype=torch.float64)
    for x in images.split(batch_size):
        x = x.to(device)
        x_hat, _, out = model(x)
        mse = (x_hat - x).pow(2).flatten(1).mean(1)  # (B,)
        per_image = torch.stack([mse, -10 * mse.clamp(min=1e-10).log10(), metrics.ssim(x_hat, x)])
        sums += per_image.double().sum(1).cpu()  # squared error, PSNR, SSIM
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=len(counts))
    model.train()
    mse, psnr, ssim = (sums / len(images)).tolist()
    return {"test_mse": mse, "test_psnr": psnr, "test_ssim": ssim, **metrics.codebook_stats(counts)}


def make_figures(model, images, epoch_log, out):
    """curves.png: test images over their reconstructions; codes used, MSE after each epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_hat = model.decode(model.encode(images[:16].to(next(model.parameters()).device))).cpu()
    grid = torch.cat([images[:16], x_hat], 2).clamp(0, 1)[:, 0].permute(1, 0, 2).reshape(56, 448)
    fig, axes = plt.subplot_mosaic([["grid"] * 2, ["utilization", "test_mse"]], figsize=(12, 5.5))
    axes["grid"].imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    axes["grid"].set(xticks=[], yticks=[14, 42], yticklabels=["test image", "reconstruction"])
    for key in ("utilization", "test_mse"):
        for stage in dict.fromkeys(e["stage"] for e in epoch_log):
            log = [e for e in epoch_log if e["stage"] == stage]
            axes[key].plot([e["epoch"] + 1 for e in log], [e[key] for e in log], "o-", label=stage)
        axes[key].set(xlabel="epoch", title=f"test split: {key}",
                      yscale="log" if key == "test_mse" else "linear")
    axes["utilization"].legend()
    fig.tight_layout()
    write_atomic(os.path.join(out, "curves.png"), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

def resolve(cfg):
    """Check the options (nsvq and Adam check their numbers); fill the defaults left open."""
    cfg = dataclasses.replace(cfg)
    nsvq.check_choice("--quantizer", cfg.quantizer, ("nsvq", "simvq", "ema", "ste", "fsq",
                                                      "simvq-ns"))
    cfg.stages = cfg.quantizer in ("nsvq", "simvq-ns") if cfg.stages is None else cfg.stages
    cfg.replace = cfg.quantizer == "nsvq" if cfg.replace is None else cfg.replace
    if cfg.replace and cfg.quantizer in ("simvq", "simvq-ns", "fsq"):
        raise ValueError(f"--replace does not apply to {cfg.quantizer}: no per-code parameters")
    if cfg.quantizer == "fsq" and cfg.codebook_size not in nsvq.FSQ_LEVELS:
        raise ValueError(f"--quantizer fsq takes --codebook-size in {sorted(nsvq.FSQ_LEVELS)}")
    for name in ("epochs", "batch_size", "replace_every", "width"):  # StageSchedule checks its own
        nsvq.check_count("--" + name.replace("_", "-"), getattr(cfg, name), 1)
    for name in ("gan_weight", "lr"):  # checked whether used or not
        nsvq.check_number("--" + name.replace("_", "-"), getattr(cfg, name), low=0)
    if cfg.width % 8:
        raise ValueError(f"--width must be a multiple of 8 (GroupNorm, 8 groups), got {cfg.width}")
    cfg.out = cfg.out or os.path.join("runs", "mnist", cfg.quantizer)
    available = {"cuda": torch.cuda.is_available(), "cpu": True}
    if cfg.device == "auto":
        cfg.device = next(name for name, there in available.items() if there)
    if not available.get(cfg.device):
        raise ValueError(f"--device {cfg.device} is not available here; use auto, cpu or cuda")
    return cfg


def make_schedule(cfg):
    """By default stage 1 leaves time for the warm-up and one epoch of stage 2's GAN."""
    if not cfg.stages:
        return nsvq.StageSchedule(None, None)
    default = max(1, cfg.epochs - cfg.warmup_epochs - int(cfg.gan))
    freeze = default if cfg.freeze_epoch is None else cfg.freeze_epoch or None
    return nsvq.StageSchedule(cfg.patience, freeze, cfg.warmup_epochs, cfg.gan_ramp_epochs,
                              gan_stage1=cfg.gan_stage1)


def check_out(cfg):
    """Refuse an --out that cannot be written or holds a run (as train_imagenet.py); make none."""
    parent = os.path.abspath(cfg.out)  # an --out that is a file stops here too
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OutputError(f"--out {cfg.out} cannot be made ({parent} is not a writable folder)")
    if not cfg.overwrite and os.path.exists(os.path.join(cfg.out, "ckpt.pt")):
        raise OutputError(f"--out {cfg.out} holds an earlier run: pass --overwrite to replace it")


def main(cfg, setup=None, on_step=None):
    """Train, evaluate and save one run; returns its results. Hooks for experiments.py:
    setup(trainer) once model and optimizers exist, on_step(trainer, step) after every step."""
    # Setup
    cfg = resolve(cfg)
    check_out(cfg)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    train_images, test_images = load_split(cfg, "train"), load_split(cfg, "test")
    steps = len(train_images) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({len(train_images)} images): no step would be taken")

    # Create model
    trainer, schedule = build_trainer(cfg, device), make_schedule(cfg)
    if setup:
        setup(trainer)
    os.makedirs(cfg.out, exist_ok=True)

    # Training loop
    epoch_log, seconds = [], 0.0
    for epoch in range(cfg.epochs):
        stage, t0 = schedule.stage, time.time()
        apply_stage(cfg, trainer, schedule)
        order = torch.randperm(len(train_images),
                               generator=torch.Generator().manual_seed(cfg.seed + epoch))
        window = {"sums": {}, "diagnostics": {}, "counts": 0, "reseeded": 0, "steps": steps}
        for i in tqdm(range(steps), desc=f"epoch {epoch} {stage}", disable=cfg.quiet, leave=False):
            x = train_images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(device)
            gan_w = cfg.gan_weight * schedule.gan_weight(epoch + i / steps) if cfg.gan else 0.0
            step = epoch * steps + i
            replace = cfg.replace and schedule.replacement and step % cfg.replace_every == 0
            losses, out, counts, reseeded = train_step(
                cfg, trainer, x.contiguous(memory_format=torch.channels_last), gan_w,
                schedule.commitment, replace)
            for group, values in (("sums", losses), ("diagnostics", out.diagnostics)):
                for k, v in values.items():
                    window[group][k] = window[group].get(k, 0.0) + float(v)
            window["counts"] += counts.cpu()
            window["reseeded"] += 0 if reseeded is None else int(reseeded.sum())
            if on_step:
                on_step(trainer, step + 1)
        seconds += time.time() - t0
        test = evaluate(trainer.model, test_images)
        means = log_line(epoch, stage, window, test, time.time() - t0)
        epoch_log.append({"epoch": epoch, "stage": stage, **means, **test,
                          **{k: v / steps for k, v in window["diagnostics"].items()}})
        if schedule.end_epoch(epoch, means.get("commit", 0.0)):  # the epoch mean decides
            print(f"stage change: {schedule.stage} from epoch {epoch + 1}")
        ckpt = {"config": dataclasses.asdict(cfg), "model": trainer.model.state_dict()}
        write_atomic(os.path.join(cfg.out, "ckpt.pt"), lambda tmp: torch.save(ckpt, tmp))

    # Save (test: the last epoch's evaluation of these weights)
    results = {"quantizer": cfg.quantizer, "codebook_size": trainer.model.vq.codebook_size, **test,
               "train_seconds": seconds, "epochs": cfg.epochs, "stage_start": schedule.stage_start,
               "epoch_log": epoch_log, "config": dataclasses.asdict(cfg)}
    write_atomic(os.path.join(cfg.out, "results.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(results)))
    make_figures(trainer.model, test_images, epoch_log, cfg.out)
    print(f"{cfg.quantizer}: test mse {test['test_mse']:.5f}, psnr {test['test_psnr']:.2f} dB, "
          f"utilization {test['utilization']:.1%}, perplexity {test['perplexity']:.0f}, "
          f"{seconds:.0f}s -> {cfg.out}")
    return results


def parse_args(argv=None):
    """One option per Config field, with its help; --name / --no-name for the switches."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        if f.type in (bool, Optional[bool]):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help)
        else:
            shown = "" if f.default in (None, "") else f" (default: {f.default})"
            parser.add_argument(flag, type={Optional[int]: int}.get(f.type, f.type),
                                default=f.default, help=help + shown)
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    cfg = parse_args()
    try:
        main(cfg)
    except (DataError, ValueError, FileNotFoundError, OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # one line, exit 130 (resuming is train_imagenet.py's job)
        print("interrupted: ckpt.pt in --out holds the last finished epoch", file=sys.stderr)
        sys.exit(130)
