"""
metrics.py -- the evaluation networks and metrics of train_imagenet.py, in plain torch.

  - LPIPS (Zhang et al., 2018, v0.1) with VGG16 or AlexNet features: features unit-normalised
    per channel, squared differences weighted by learned 1x1 "lin" layers, averaged over space.
  - InceptionV3 with the TF-FID weights (Heusel et al., 2017; the graph pytorch-fid ports): pool3
    features (2048) for the Frechet distance.
  - Frechet distance with the matrix square root from eigendecompositions in float64 (no scipy).
  - PSNR and SSIM as SimVQ's evaluation reports them (see each function), `evaluate`, its whole
    protocol over a validation loader, and its loader's way of reading, resizing and cropping
    images (ImageFolder), which training and evaluation share.

Weights: "auto" downloads the public files once with torch.hub (cached under ~/.cache/torch/hub);
a path loads them offline; "random" keeps random weights (tests and timing only).
The architectures are written from the papers' descriptions; only the parameter names follow the
public weight files so those load directly.
"""

import glob
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import nsvq

WEIGHT_FILES = {  # file name -> public URL
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet-owt-7be5be79.pth": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    "alex.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
    "pt_inception-2015-12-05-6726825d.pth": ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                                             "fid_weights/pt_inception-2015-12-05-6726825d.pth"),
}


class WeightsError(RuntimeError):
    """Network weights could not be downloaded or read."""


def weights_path(spec, name, option):
    """The file that the folder or file `spec` gives for the public file `name`, or a
    WeightsError naming `option` and where to download it."""
    path = os.path.join(spec, name) if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise WeightsError(f"{option} {spec}: no file {path} (download {WEIGHT_FILES[name]})")
    return path


def load_weights(spec, name, option):
    """State dict of the public file `name`: from torch.hub ("auto": download once, cached), or
    from the folder or file `spec`. `option` is the command-line flag that sets spec."""
    url = WEIGHT_FILES[name]
    if spec == "auto":
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception as e:
            raise WeightsError(f"could not download {name} ({type(e).__name__}: {e}); on an offline "
                               f"machine download {url} elsewhere and pass its folder with {option}") from None
    path = weights_path(spec, name, option)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{option} {spec}: {path} is not a readable weights file ({type(e).__name__})") from None


@torch.no_grad()
def codebook_stats(counts):
    """From assignment counts (K,) over an evaluation set: utilization (share of codes used),
    perplexity exp(-sum_j p_j log p_j) (K when uniform), dead_codes (never used)."""
    p = counts.double() / counts.sum().clamp(min=1)
    used = int((counts > 0).sum())
    return {"utilization": used / len(counts), "dead_codes": len(counts) - used,
            "perplexity": float((-(p * p.clamp(min=1e-30).log()).sum()).exp())}



# -----------------------------------------------------------------------------
# LPIPS (VGG16 or AlexNet features)
# -----------------------------------------------------------------------------

VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
INCEPTION_FILES = ["pt_inception-2015-12-05-6726825d.pth"]
LPIPS_FILES = ["vgg16-397923af.pth", "vgg.pth", "alexnet-owt-7be5be79.pth", "alex.pth"]
LPIPS_NETS = {  # features, indices of the ReLUs tapped, their widths, weight files (torchvision, lin)
    "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512), "vgg16-397923af.pth", "vgg.pth"),
    "alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256), "alexnet-owt-7be5be79.pth", "alex.pth"),
}


def _vgg16_features():
    layers, c = [], 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def _alexnet_features():  # torchvision's AlexNet layout, up to relu5
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]: (B, 3, H, W) x 2 -> (B,).

    net: "vgg" (the training loss of VQGAN and SimVQ) or "alex" (the metric LPIPS recommends).
    weights: "auto", a folder holding the two files of LPIPS_NETS[net], or "random".
    """

    def __init__(self, net="vgg", weights="auto", option="--lpips-weights"):
        super().__init__()
        self.taps, widths, features_file, lin_file = LPIPS_NETS[net]
        self.features = _vgg16_features() if net == "vgg" else _alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in widths)
        # Input scaling of LPIPS v0.1 (maps ImageNet-normalised statistics onto [-1, 1] inputs).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if weights != "random":
            state = load_weights(weights, features_file, option)
            self.features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                           if k.startswith("features.")})
            lin = load_weights(weights, lin_file, option)
            for i, layer in enumerate(self.lins):
                layer.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.requires_grad_(False)
        self.eval()

    def forward(self, x, y):
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total, lin = 0.0, iter(self.lins)
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                f = unit_normalize(h)
                fx, fy = f.chunk(2)
                total = total + next(lin)((fx - fy).pow(2)).mean((1, 2, 3))
        return total


def unit_normalize(h, eps=1e-10):
    """h / (||h|| + eps) over channels (dim 1), as LPIPS. The norm is sqrt(sum h^2 + eps^2), not
    sqrt(sum h^2): the same value wherever sum h^2 >> 1e-20, and a finite gradient (0) at an
    all-zero feature vector, where the gradient of sqrt at 0 would make it 0 * inf = NaN."""
    return h / ((h.pow(2).sum(1, keepdim=True) + eps * eps).sqrt() + eps)


# -----------------------------------------------------------------------------
# InceptionV3 (TF-FID graph)
# -----------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # the TF graph's average pools ignore the zero padding
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's last block max-pools where torchvision averages
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class InceptionFID(nn.Module):
    """InceptionV3 pool3 features (B, 2048) of images in [0, 1], resized to 299 bilinearly."""

    def __init__(self, weights="auto"):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        if weights != "random":
            state = load_weights(weights, "pt_inception-2015-12-05-6726825d.pth", "--inception")
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # (B, 2048)


# -----------------------------------------------------------------------------
# Frechet distance, PSNR, SSIM
# -----------------------------------------------------------------------------

class FeatureStats:
    """Running sums for a Gaussian fit of features: n, sum f, sum f f^T (float64)."""

    def __init__(self, dim, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, f):
        f = f.double()
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def tensors(self):
        return [self.n, self.sum, self.outer]  # all_reduce these to combine ranks

    def mean_cov(self):
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def _sqrt_psd(m):
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD, so
    both square roots come from eigh, with tiny negative eigenvalues (round-off) clamped to 0.
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    s1 = _sqrt_psd(cov1)
    inner = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * inner)


def to_uint8_levels(x):
    """Images in [0, 1] quantised as SimVQ's evaluation does: (x * 255).to(uint8) truncates,
    then back to [0, 1] in float32. (B, 3, H, W) -> same shape."""
    return (x.float() * 255.0).to(torch.uint8).float() / 255.0


def psnr_of_batch(x, y):
    """PSNR of a whole batch, as SimVQ's loop computes it: 10 log10(1 / MSE) with the MSE taken
    over every pixel of the batch (float64 mean of float32 differences), images in [0, 1].
    SimVQ reports the mean of this over its evaluation batches of 64 images."""
    mse = (x.float() - y.float()).pow(2).double().mean()
    return 10 * torch.log10(1.0 / mse)


def ssim(x, y, window=7):
    """Per-image SSIM (B,) for images in [0, 1], as skimage.metrics.structural_similarity with
    its defaults (SimVQ's evaluation): a uniform 7x7 window, sample covariances (N / (N - 1)),
    K1 = 0.01, K2 = 0.03, data range 1, the mean over the windows that fit inside the image,
    averaged over channels. Computed in float64."""
    x, y = x.double(), y.double()
    box = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731  (valid windows only)
    mx, my = box(x), box(y)
    norm = window ** 2 / (window ** 2 - 1)  # sample covariance
    vx, vy = norm * (box(x * x) - mx ** 2), norm * (box(y * y) - my ** 2)
    cxy = norm * (box(x * y) - mx * my)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# -----------------------------------------------------------------------------
# SimVQ's images: folders, reading, resizing and cropping as its loader does
# -----------------------------------------------------------------------------

class DataError(RuntimeError):
    """The data folder is missing, empty, or not what the config expects."""


IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIMVQ_SKIPPED = ("n06596364_9591.JPEG",)  # SimVQ's loader leaves this training image out


def list_images(root, split):
    """The sorted images of <root>/<split>/<class>/* and <root>/<split>/* (the official
    validation archive unpacks flat; reconstruction needs no labels)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"no folder {folder}: --data must hold train/ and val/")
    paths = glob.glob(os.path.join(folder, "*", "*")) + glob.glob(os.path.join(folder, "*"))
    files = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTS) and os.path.isfile(p)
                   and os.path.basename(p) not in SIMVQ_SKIPPED)
    if not files:
        raise DataError(f"{folder} holds no images (*.JPEG, *.png, ...), in class folders or flat")
    return files


def read_rgb(path):
    """8-bit RGB; 16-bit grey is scaled (65535 -> 255), not clipped as convert("RGB") would."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16L", "I;16B", "I"):
            levels = np.asarray(img, dtype=np.float64)
            if levels.min() < 0 or levels.max() > 65535:
                raise ValueError(f"{img.mode} image with values outside 0..65535")
            img = Image.fromarray(np.round(levels / 257).astype(np.uint8), "L")
        if img.mode == "F":
            raise ValueError("32-bit float images are not supported")
        return img.convert("RGB")


def resize_and_crop(img, size, rng=None):
    """torchvision's Resize(size) + RandomCrop(size) (rng given) or CenterCrop(size), as SimVQ:
    Pillow's antialiased bilinear, short side to size, long to int(size * long / short)."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize(new, Image.BILINEAR) if new != (w, h) else img
    w, h = img.size
    if rng is None:
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    else:
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """(index, epoch) -> (uint8 image (3, S, S), skipped: how many unreadable files were replaced
    by the next one). The crop depends on (seed, epoch, index) alone: a resumed run sees the
    same crops."""

    def __init__(self, root, split, size, train, seed):
        self.files, self.size, self.train, self.seed = list_images(root, split), size, train, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch = key
        for skipped in range(min(len(self.files), 100)):
            path = self.files[(index + skipped) % len(self.files)]
            try:
                img = read_rgb(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            rng = random.Random(hash((self.seed, epoch, index))) if self.train else None
            array = np.asarray(resize_and_crop(img, self.size, rng))
            return torch.from_numpy(array.copy()).permute(2, 0, 1), skipped
        raise DataError(f"{skipped + 1} unreadable images in a row from {self.files[index]}: "
                        f"is --data right?")


# -----------------------------------------------------------------------------
# SimVQ's evaluation protocol
# -----------------------------------------------------------------------------

def load_networks(cfg, device):
    """train_imagenet.py's (LPIPS-VGG for the loss or None, evaluation networks) at start-up:
    missing weights stop the run before its first step, naming the option that fixes it."""
    if cfg.perceptual_weight > 0 and cfg.lpips_weights == "random":
        raise ValueError("--lpips-weights random is for tests and timing, no perceptual loss: "
                         "pass the LPIPS files, or --perceptual-weight 0")
    lpips = lambda net: LPIPS(net, cfg.lpips_weights).to(device)  # noqa: E731
    vgg = lpips("vgg") if cfg.perceptual_weight > 0 or cfg.eval_lpips else None
    inception = InceptionFID(cfg.inception).to(device) if cfg.inception != "none" else None
    nets = {"inception": inception, "lpips_vgg": vgg if cfg.eval_lpips else None,
            "lpips_alex": lpips("alex") if cfg.eval_lpips else None}
    return (vgg if cfg.perceptual_weight > 0 else None), nets


@torch.no_grad()
def evaluate(model, loader, nets, device, stop=None):
    """SimVQ's protocol (its evaluation.py) for an autoencoder, model(x) -> (x_hat, z_e, out),
    over a loader of uint8 images (B, 3, S, S), in fp32 (no autocast) with TF32 off:
    rfid      pytorch-fid's Inception features of originals and reconstructions in [0, 1],
              the Frechet distance over all images (nets["inception"]; None: left out)
    lpips_*   LPIPS-AlexNet and -VGG on [-1, 1], mean over images (None: left out)
    psnr      per batch, on uint8-truncated images, averaged over batches (psnr_of_batch)
    ssim      skimage's default SSIM per image on the same images, averaged per batch
    l1        mean absolute error on [-1, 1]; utilization, perplexity (codebook_stats)
    Under DDP every rank reads its own batches and the sums are all-reduced. stop(i), if given,
    is called before batch i (it may raise to abandon the evaluation). Returns (results, a PIL
    image of 8 originals over their reconstructions)."""
    was_training, tf32 = model.training, torch.backends.cudnn.allow_tf32
    model.eval()
    torch.backends.cudnn.allow_tf32 = False
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # images, batches, psnr, ssim, l1, alex, vgg
    counts = torch.zeros(model.vq.codebook_size, dtype=torch.long, device=device)
    real, fake, first = FeatureStats(2048, device), FeatureStats(2048, device), None
    try:
        for i, (images, _) in enumerate(loader):
            if stop:
                stop(i)
            x = (images.to(device).double() / 127.5 - 1.0).float()  # as SimVQ's loader
            x_hat, _, out = model(x)
            x_hat = x_hat.clamp(-1, 1)
            first = first or (x[:8].cpu(), x_hat[:8].cpu())
            a, b = (x + 1) / 2, (x_hat + 1) / 2
            a8, b8 = to_uint8_levels(a), to_uint8_levels(b)
            sums += torch.stack([torch.full((), float(len(x)), device=device), torch.ones((), device=device),
                                 psnr_of_batch(a8, b8), ssim(b8, a8).mean(), (x_hat - x).abs().flatten(1).mean(1).sum(),
                                 *[nets[k](x, x_hat).sum() if nets[k] else torch.zeros((), device=device)
                                   for k in ("lpips_alex", "lpips_vgg")]]).double()
            counts += torch.bincount(out.indices.flatten(), minlength=len(counts))
            if nets["inception"]:
                real.add(nets["inception"](a))
                fake.add(nets["inception"](b))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        model.train(was_training)
    for t in [sums, counts] + (real.tensors() + fake.tensors() if nets["inception"] else []):
        if dist.is_initialized():
            dist.all_reduce(t)
    n, batches = float(sums[0]), float(sums[1])
    result = {"images": int(n), "psnr": float(sums[2]) / batches, "ssim": float(sums[3]) / batches,
              "l1": float(sums[4]) / n, **codebook_stats(counts.cpu())}
    if nets["lpips_alex"]:
        result.update(lpips_alex=float(sums[5]) / n, lpips_vgg=float(sums[6]) / n)
    if nets["inception"]:
        result["rfid"] = frechet_distance(*real.mean_cov(), *fake.mean_cov())
    if first is None:  # this rank read no batch
        return result, None
    rows = ((torch.cat(first).float() + 1) / 2).clamp(0, 1)  # (16, 3, S, S)
    grid = rows.view(2, -1, *rows.shape[1:]).permute(0, 3, 1, 4, 2).reshape(2 * rows.shape[2], -1, 3)
    return result, Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))


def quick_evaluation(model, loader, state, device, log):
    """train_imagenet.py's --eval-every: PSNR, SSIM, L1, codes used and perplexity of model on
    a fixed subset of val/ (no rFID or LPIPS: those at the end); logged, and returned as a
    metrics.jsonl record (its key "eval": the number of images)."""
    t0, nets = time.time(), dict.fromkeys(("inception", "lpips_alex", "lpips_vgg"))
    result = evaluate(model, loader, nets, device)[0]
    record = {"step": state["step"], "epoch": state["epoch"], "eval": result["images"],
              **{k: result[k] for k in ("psnr", "ssim", "l1", "utilization", "perplexity")},
              "seconds": time.time() - t0}
    log("eval {step:7d} | ep {epoch} | {eval} val images: psnr {psnr:.2f} ssim {ssim:.3f} l1 "
        "{l1:.4f} util {utilization:.1%} ppl {perplexity:.0f} | {seconds:.1f} s".format(**record))
    return record
