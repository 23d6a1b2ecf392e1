"""
experiments.py -- the comparisons and the paper's analyses in miniature, one subcommand each.

    python experiments.py compare                # the ablation: 10 methods, same budget, no GAN
    python experiments.py compare --paper-ratio  # K = 8,192 on batches of 64: the paper's ratio
    python experiments.py stress                 # Fig. 2: encoder lr x0.1 ... x10, four arms
    python experiments.py controlled             # Fig. 3: a k-means start, then STE or NSVQ
    python experiments.py sensitivity            # Fig. 4: alpha x tau, absolute and relative
    python experiments.py phases                 # Table 3: the stage schedule's phases, with GAN
    python experiments.py plateau                # the paper's freeze trigger, firing
    python experiments.py scale-sim              # the paper's scale simulated, no encoder
    python experiments.py toy                    # 2-D codebooks on moving blobs (README figure)
    python experiments.py natural --data DIR     # real photographs: 7 methods, train_imagenet.py

Every MNIST subcommand trains train_mnist.py's model with its loop and data, changing only what
it names, prints a table and writes <out>/<subcommand>.json and .png (default --out:
runs/experiments/<subcommand>). Offline: --data DIR --no-download. --seeds N repeats every run
with seeds 0 .. N-1 and reports mean and standard deviation; --only REGEX keeps the runs whose
name matches (e.g. two arms of stress at x1 and x10: --only "^(replacement only|NSVQ).*@x10?$").
What each measured, with its command and the data it ran on, is in EXPERIMENTS.md.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import metrics
import nsvq
import train_mnist

# -----------------------------------------------------------------------------
# Shared: runs with the same seed, data and budget; tables; figures
# -----------------------------------------------------------------------------

TABLE_KEYS = ("utilization", "perplexity", "test_mse", "test_psnr", "test_ssim", "train_seconds")


def write_json_atomic(obj, path):
    train_mnist.write_atomic(path, lambda tmp: open(tmp, "w").write(json.dumps(obj, indent=1)))


def savefig_atomic(fig, path, **kwargs):
    train_mnist.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))


class UpkeepFromCodes(nsvq.CodebookUpkeep):
    """Replacement as the paper describes it: a dead code becomes a live code, drawn in
    proportion to usage, plus Gaussian noise of noise * RMS(codebook). Codes not yet seeded
    from data are seeded from the latent pool first (seeded=True: the initial codebook counts
    as seeded, and only usage decides). Rank 0's random draws are broadcast to every rank."""

    def __init__(self, codebook_size, dim, noise=0.01, seeded=False):
        super().__init__(codebook_size, dim)
        self.noise = noise
        self.seeded.fill_(seeded)

    @torch.no_grad()
    def reseed_(self, codebook, threshold=0.01):
        if not bool(self.seeded.all()):
            return super().reseed_(codebook, threshold)
        mask = self.dead(threshold)  # (K,)
        new = codebook[torch.multinomial(torch.where(mask, 0.0, self.usage) + 1e-30, len(mask), replacement=True)]
        new = new + self.noise * codebook.pow(2).mean().sqrt() * torch.randn_like(new)
        if dist.is_initialized():
            dist.broadcast(new, src=0)
        self.usage.masked_fill_(mask, 1.0 / len(mask))
        return mask, new


def duplicate_codes(codebook):
    """How many codes are exact copies of another (K - the number of distinct rows)."""
    return len(codebook) - len(torch.unique(codebook, dim=0))


class Probe:
    """train_mnist.main's on_step hook: every `every` steps, on a fixed batch of test images,
    the paper's encoder drift (RMS change of z_e since the previous probe; the first against
    the encoder before training), assignment churn, codes used, reconstruction MSE, scales and
    the codes that replacement counts as dead. Records land in self.history."""

    def __init__(self, images, every):
        self.images, self.every, self.previous, self.history = images, every, None, []

    @torch.no_grad()
    def measure(self, model):
        model.eval()
        images = self.images.to(next(model.parameters()).device)
        z = model.encoder(images)
        out = model.vq(z)
        x_hat = model.decoder(out.z_q)
        model.train()
        zr, zqr = nsvq.to_rows(z, model.vq.dim), nsvq.to_rows(out.z_q, model.vq.dim)  # (N, D)
        counts = torch.bincount(out.indices.flatten().cpu(), minlength=model.vq.codebook_size)
        record = {"utilization": metrics.codebook_stats(counts)["utilization"],
                  "mse": float(F.mse_loss(x_hat, images)),
                  "drift": float((z - self.previous[0]).pow(2).mean().sqrt()) if self.previous else 0.0,
                  "churn": float((out.indices != self.previous[1]).float().mean()) if self.previous else 0.0,
                  "latent_norm": float(zr.norm(dim=1).mean()), "quant_error": float((zr - zqr).norm(dim=1).mean()),
                  "code_norm": float(model.vq.codebook.norm(dim=1).mean()), "dead": int(model.vq.upkeep.dead().sum())}
        self.previous = (z, out.indices)
        return record

    def __call__(self, trainer, step):
        if step % self.every == 0:
            self.history.append({"step": step, **self.measure(trainer.model)})


def make_setup(probe, encoder_lr_mult=1.0, init_from="", replace_from="latents"):
    """train_mnist.main's setup hook for the knobs only experiments use: a faster or slower
    encoder (its Adam group's lr times encoder_lr_mult), a start from saved weights, the
    paper's replacement from live codes; then the probe's reference measurement."""
    def setup(trainer):
        trainer.opt.param_groups[0]["lr"] *= encoder_lr_mult  # group 0: the encoder
        if init_from:
            trainer.model.load_state_dict(torch.load(init_from, map_location="cpu", weights_only=True))
        if replace_from == "codes":
            vq = trainer.model.vq
            vq.upkeep = UpkeepFromCodes(vq.codebook_size, vq.dim, seeded=True).to(vq.codebook.device)
        probe.measure(trainer.model)
    return setup


EXTRA = ("encoder_lr_mult", "init_from", "replace_from")  # run options that are no Config field


def run_variants(base, runs, args):
    """Train each (name, overrides) whose name matches --only, for --epochs, with seeds
    0 .. --seeds - 1; a list of results (train_mnist.main's, without the config) with "name",
    "seed" and the probe's "history" added. Overrides are Config fields, or EXTRA ones."""
    if args.only:
        runs = [(name, o) for name, o in runs if re.search(args.only, name)]
        if not runs:
            raise ValueError(f"--only {args.only!r} matches none of this subcommand's runs")
    test_images = train_mnist.load_split(base, "test")[:1000]  # the probe's fixed batch
    results = []
    for name, overrides in runs:
        for seed in range(args.seeds):
            print(f"\n=== {name}" + (f", seed {seed}" if args.seeds > 1 else "") + " ===", flush=True)
            folder = name if args.seeds == 1 else f"{name}-seed{seed}"
            fields = {k: v for k, v in overrides.items() if k not in EXTRA}
            cfg = dataclasses.replace(base, epochs=args.epochs, seed=seed, quiet=True,
                                      out=os.path.join(args.out, safe_name(folder)), **fields)
            probe = Probe(test_images, getattr(args, "probe_every", 100))
            setup = make_setup(probe, **{k: v for k, v in overrides.items() if k in EXTRA})
            r = train_mnist.main(cfg, setup=setup, on_step=probe)
            results.append({"name": name, "seed": seed, "history": probe.history,
                            **{k: v for k, v in r.items() if k != "config"}})
    return results


def safe_name(name):
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in name)


def summarize(results, keys=TABLE_KEYS):
    """One row per name: the mean over seeds of each key, and its standard deviation (key_sd)."""
    rows = {}
    for r in results:
        rows.setdefault(r["name"], []).append(r)
    summary = []
    for name, rs in rows.items():
        row = {"name": name, "seeds": len(rs)}
        for k in keys:
            values = [r[k] for r in rs]
            if any(math.isnan(v) for v in values):  # a key that does not apply to this run
                row[k], row[k + "_sd"] = math.nan, math.nan
                continue
            row[k] = statistics.mean(values)
            row[k + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def fmt(key, value):
    if key == "utilization":
        return f"{value:.1%}"
    if key == "test_mse":
        return f"{value:.5f}"
    if key in ("test_ssim", "kernel_mass"):
        return f"{value:.4f}"
    if key in ("ssim", "l1"):
        return f"{value:.3f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_table(rows, keys=TABLE_KEYS):
    print("\n| name | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        cells = [fmt(k, r[k]) + (f" ± {fmt(k, r[k + '_sd'])}" if r.get("seeds", 1) > 1 and k + "_sd" in r else "")
                 for k in keys]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


def report(results, keys=TABLE_KEYS):
    """summarize's rows, printed as a table."""
    rows = summarize(results, keys)
    print_table(rows, keys)
    return rows


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(results, rows, out, name, fig):
    """<out>/<name>.json (every run without its curves, and the summary) and <out>/<name>.png."""
    write_json_atomic({"runs": [{k: v for k, v in r.items() if k not in ("history", "epoch_log")}
                                for r in results], "summary": rows}, os.path.join(out, name + ".json"))
    savefig_atomic(fig, os.path.join(out, name + ".png"), dpi=70, bbox_inches="tight")
    print(f"wrote {os.path.join(out, name)}.json and .png")


def curves_by_step(results, keys, titles, ylog=()):
    """One panel per key: each run's probe history against steps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key, title in zip(axes[0], keys, titles):
        for r in results:
            ax.plot([h["step"] for h in r["history"]], [h[key] for h in r["history"]],
                    label=r["name"] + (f" s{r['seed']}" if r["seed"] else ""))
        ax.set(xlabel="step", title=title, yscale="log" if key in ylog else "linear")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# compare: the ablation, at MNIST's ratio or at the paper's
# -----------------------------------------------------------------------------

VARIANTS = {  # name -> overrides: each method with its customary settings
    "ste": dict(quantizer="ste", replace=False),
    "ste+replace": dict(quantizer="ste", replace=True),
    "ema": dict(quantizer="ema", replace=False),
    "ema+replace": dict(quantizer="ema", replace=True),
    "simvq": dict(quantizer="simvq"),
    "simvq-ns": dict(quantizer="simvq-ns"),  # SimVQ + the dense loss and the stages
    "nsvq-loss-only": dict(quantizer="nsvq", replace=False, stages=False),
    "nsvq-no-stages": dict(quantizer="nsvq", stages=False),
    "nsvq-replace-from-codes": dict(quantizer="nsvq", replace_from="codes"),
    "nsvq": dict(quantizer="nsvq"),
}
# The paper's ratio of latents to codes: 0.5 per code per step (K = 65,536 on 32,768 latents);
# here K = 8,192 on 64 x 49 = 3,136 latents, 0.38. Every method that replaces does so every 10
# steps, as train_imagenet.py does; NSVQ once more with the MNIST defaults (every step).
RATIO = dict(codebook_size=8192, batch_size=64)
RATIO_VARIANTS = {
    "ste+replace": dict(quantizer="ste", replace=True, replace_every=10),
    "ema+replace": dict(quantizer="ema", replace=True, replace_every=10),
    "simvq": dict(quantizer="simvq"),
    "nsvq, MNIST defaults (absolute tau 0.35, every step)": dict(quantizer="nsvq"),
    "nsvq, train_imagenet defaults (relative tau 1, every 10 steps)": dict(
        quantizer="nsvq", tau_mode="relative", tau=1.0, replace_every=10),
}


def compare_runs(paper_ratio):
    """(name, overrides) of each compare run."""
    if paper_ratio:
        return [(name, {**RATIO, **overrides}) for name, overrides in RATIO_VARIANTS.items()]
    return list(VARIANTS.items())


def compare(base, args):
    results = run_variants(base, compare_runs(args.paper_ratio), args)
    rows = report(results)
    fig = curves_by_step(results, ("utilization", "mse"), ("codes used (1,000 test images)",
                                                           "MSE (the same images)"), ylog=("mse",))
    save(results, rows, args.out, "compare", fig)
    return results


# -----------------------------------------------------------------------------
# stress: the paper's Fig. 2, encoder drift made faster or slower
# -----------------------------------------------------------------------------

# The paper's arms: plain VQ, each of NSVQ's two codebook parts alone, and both. All in one stage,
# so that the arms differ only in those parts.
STRESS_ARMS = {
    "plain VQ (STE)": dict(quantizer="ste", replace=False),
    "dense loss only": dict(quantizer="nsvq", replace=False, stages=False),
    "replacement only": dict(quantizer="ste", replace=True),
    "NSVQ (both)": dict(quantizer="nsvq", stages=False),
}
STRESS_MULTS = (0.1, 1.0, 3.0, 10.0)


def stress(base, args):
    runs = [(f"{arm} @x{mult:g}", dict(o, encoder_lr_mult=mult)) for arm, o in STRESS_ARMS.items()
            for mult in STRESS_MULTS]
    results = run_variants(base, runs, args)
    for r in results:
        probes = r["history"][1:]  # the first probe's drift is from the initial encoder
        r["drift"] = statistics.mean(h["drift"] for h in probes) if probes else 0.0
        r["churn"] = statistics.mean(h["churn"] for h in probes) if probes else 0.0
    keys = ("utilization", "test_mse", "drift", "churn")
    rows = report(results, keys)
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for arm in STRESS_ARMS:
        arm_rows = [r for r in rows if r["name"].startswith(arm + " @")]
        mults = [float(r["name"].split("@x")[1]) for r in arm_rows]
        for ax, key in zip(axes, keys):
            ax.errorbar(mults, [r[key] for r in arm_rows], [r[key + "_sd"] for r in arm_rows],
                        marker="o", capsize=3, label=arm)
    titles = ("codes used (test)", "test MSE", "encoder drift (RMS per 100 steps)", "assignment churn")
    for ax, title in zip(axes, titles):
        ax.set(xscale="log", xlabel="encoder learning rate multiplier", title=title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save(results, rows, args.out, "stress", fig)
    return results


# -----------------------------------------------------------------------------
# controlled: the paper's Fig. 3, drift and collapse from a k-means codebook
# -----------------------------------------------------------------------------

def kmeans(z, K, iters=25, seed=0):
    """Lloyd's k-means on z (N, D), started by k-means++ (each new centre drawn with probability
    proportional to the squared distance to the nearest centre so far); an empty cluster
    restarts at a random latent. Returns centroids (K, D) and each one's share of the latents (K,)."""
    g = torch.Generator().manual_seed(seed)
    centroids = z.new_empty(K, z.shape[1])
    centroids[0] = z[torch.randint(len(z), (1,), generator=g)]
    nearest = (z - centroids[0]).pow(2).sum(1)  # (N,) squared distance to the nearest centre
    for k in range(1, K):
        centroids[k] = z[torch.multinomial(nearest + 1e-12, 1, generator=g)]
        nearest = torch.minimum(nearest, (z - centroids[k]).pow(2).sum(1))
    for _ in range(iters):
        indices = nsvq.nearest_code(z, centroids)
        counts = torch.bincount(indices, minlength=K).to(z.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, indices, z)
        restart = z[torch.randint(len(z), (K,), generator=g)]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], restart)
    counts = torch.bincount(nsvq.nearest_code(z, centroids), minlength=K).to(z.dtype)
    return centroids, counts / len(z)


def pretrain_continuous(cfg, train_images, test_images, max_epochs):
    """Train encoder and decoder without the quantizer until the test MSE improves by less than
    1% over 3 epochs (or max_epochs); returns the model and the test MSE per epoch."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = train_mnist.Autoencoder(cfg).to(device, memory_format=torch.channels_last)
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = len(train_images) // cfg.batch_size
    curve = []
    for epoch in range(max_epochs):
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(steps):
            x = train_images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].to(device)
            loss = F.mse_loss(model.decoder(model.encoder(x)), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = test_images.to(device)
            curve.append(float(F.mse_loss(model.decoder(model.encoder(x)), x)))
        print(f"continuous autoencoder, epoch {epoch}: test mse {curve[-1]:.5f}", flush=True)
        if len(curve) > 3 and curve[-1] > 0.99 * curve[-4]:
            break
    return model, curve


@torch.no_grad()
def kmeans_start(model, train_images, K, seed):
    """The pretrained model with its codebook set to k-means centroids of its training latents:
    every code counts as seeded, with its k-means share as usage."""
    device = next(model.parameters()).device
    z = torch.cat([nsvq.to_rows(model.encoder(x.to(device)), model.vq.dim).cpu()
                   for x in train_images.split(1000)])  # (N, D)
    centroids, shares = kmeans(z, K, seed=seed)
    model.vq.embedding.copy_(centroids)
    model.vq.upkeep.seeded.fill_(True)
    model.vq.upkeep.usage.copy_(shares)
    error = float((z - centroids[nsvq.nearest_code(z, centroids)]).pow(2).sum(1).mean())
    return {"kmeans_error": error, "kmeans_used": float((shares > 0).float().mean())}


def pearson(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float("nan")


CONTROLLED_ARMS = {
    "plain VQ (STE)": dict(quantizer="ste", replace=False, stages=False),
    "NSVQ (stage 1)": dict(quantizer="nsvq", stages=False),
}


def controlled(base, args):
    cfg = train_mnist.resolve(dataclasses.replace(base, quantizer="ste", replace=False, stages=False))
    train_images, test_images = train_mnist.load_split(cfg, "train"), train_mnist.load_split(cfg, "test")
    os.makedirs(args.out, exist_ok=True)
    model, curve = pretrain_continuous(cfg, train_images, test_images, args.pretrain_epochs)
    start = kmeans_start(model, train_images, cfg.codebook_size, cfg.seed)
    init = os.path.join(args.out, "kmeans_start.pt")
    state = model.state_dict()
    train_mnist.write_atomic(init, lambda tmp: torch.save(state, tmp))
    print(f"k-means start: {start['kmeans_used']:.1%} of the codes hold latents, mean squared "
          f"quantization error {start['kmeans_error']:.4f}")
    runs = [(name, dict(o, init_from=init)) for name, o in CONTROLLED_ARMS.items()]
    results = run_variants(base, runs, args)
    for r in results:
        h = r["history"][1:]  # from the second probe: the first has no previous one
        drift, churn, dead = [p["drift"] for p in h], [p["churn"] for p in h], [p["dead"] for p in h]
        r["corr_drift_churn"] = pearson(drift, churn)
        r["corr_drift_new_dead"] = pearson(drift[1:], [b - a for a, b in zip(dead, dead[1:])])
        r["corr_churn_quant_error"] = pearson(churn, [p["quant_error"] for p in h])
        r["final_dead"] = h[-1]["dead"] if h else 0
        r.update(start, continuous_test_mse=curve[-1], pretrain_epochs=len(curve))
    keys = ("utilization", "test_mse", "final_dead", "corr_drift_churn", "corr_drift_new_dead",
            "corr_churn_quant_error")
    rows = report(results, keys)
    fig = curves_by_step(results, ("drift", "churn", "dead", "utilization", "quant_error"),
                         ("encoder drift (RMS)", "assignment churn", "dead codes (usage)",
                          "codes used (probe)", "quantization error |z - z_q|"))
    save(results, rows, args.out, "controlled", fig)
    return results


# -----------------------------------------------------------------------------
# sensitivity: the paper's Fig. 4, alpha x tau
# -----------------------------------------------------------------------------

ALPHAS = (0.0, 0.01, 0.1, 1.0)  # a decade apart, within 15 minutes; --alphas for a finer grid
TAUS = {"absolute": (0.035, 0.35, 3.5), "relative": (0.1, 1.0, 10.0)}  # a decade either side of the defaults


def sensitivity(base, args):
    runs = [("alpha 0", dict(quantizer="nsvq", stages=False, alpha=0.0))]  # no dense loss: tau plays no part
    runs += [(f"{mode} tau {tau:g}, alpha {alpha:g}", dict(quantizer="nsvq", stages=False, alpha=alpha,
                                                         tau=tau, tau_mode=mode))
             for mode, taus in TAUS.items() for tau in taus for alpha in args.alphas if alpha > 0]
    results = run_variants(base, runs, args)
    for r in results:
        last = r["epoch_log"][-1]
        r["kernel_mass"] = last["kernel_mass"] if r["name"] != "alpha 0" else math.nan  # no kernel in the loss
    keys = ("utilization", "test_mse", "kernel_mass")
    rows = report(results, keys)
    save(results, rows, args.out, "sensitivity", heatmaps(rows, keys, args.alphas))
    return results


def heatmaps(rows, keys, alphas):
    """One heatmap per key and tau mode (alpha across, tau down), one colour scale per key; the
    box marks the defaults (alpha 0.1; tau 0.35 absolute, 1 relative); blank: not run."""
    by_name = {r["name"]: r for r in rows}
    grids = {(mode, key): [[by_name.get("alpha 0" if a == 0 else f"{mode} tau {t:g}, alpha {a:g}", {}).get(key, math.nan)
                            for a in alphas] for t in taus] for mode, taus in TAUS.items() for key in keys}
    plt = pyplot()
    fig, axes = plt.subplots(len(TAUS), len(keys), figsize=(4.6 * len(keys), 3.2 * len(TAUS)), squeeze=False)
    for i, (mode, taus) in enumerate(TAUS.items()):
        for j, key in enumerate(keys):
            values = [v for m in TAUS for row in grids[(m, key)] for v in row if not math.isnan(v)]
            ax = axes[i, j]
            ax.imshow(grids[(mode, key)], aspect="auto", cmap="viridis_r" if key == "test_mse" else "viridis",
                      vmin=min(values, default=0), vmax=max(values, default=1))
            for ti, row in enumerate(grids[(mode, key)]):
                for ai, value in enumerate(row):
                    ax.text(ai, ti, "" if math.isnan(value) else fmt(key, value), ha="center", va="center",
                            fontsize=7, bbox=dict(fc="w", alpha=0.7, lw=0, pad=1))
            if 0.1 in alphas:
                default = 0.35 if mode == "absolute" else 1.0
                ax.add_patch(plt.Rectangle((alphas.index(0.1) - 0.5, taus.index(default) - 0.5), 1, 1,
                                           fill=False, ec="r", lw=2))
            ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
            ax.set_yticks(range(len(taus)), [f"{t:g}" for t in taus])
            ax.set(xlabel="alpha", ylabel=f"{mode} tau", title=f"{key} ({mode} tau)")
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# phases: the paper's Table 3, the stage schedule with the adversarial loss
# -----------------------------------------------------------------------------

def phase_arms(epochs):
    """Same budget for every arm; the staged ones freeze after 60% of it."""
    freeze = max(1, round(0.6 * epochs))
    return {
        "stage 1 only, GAN from step 0": dict(stages=False, gan_stage1=True),
        "freeze, no warm-up, stage 2": dict(freeze_epoch=freeze, warmup_epochs=0),
        "full: freeze, warm-up, stage 2": dict(freeze_epoch=freeze),
        "full, GAN from step 0 of stage 1 (the paper)": dict(freeze_epoch=freeze, gan_stage1=True),
        "full, no GAN at all": dict(freeze_epoch=freeze, gan=False),
    }


def phases(base, args):
    runs = [(name, dict(o, quantizer="nsvq", gan=o.get("gan", True))) for name, o in phase_arms(args.epochs).items()]
    results = run_variants(base, runs, args)
    keys = ("test_psnr", "test_ssim", "test_mse", "utilization")
    rows = report(results, keys)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for r in results:
        t = [e["epoch"] + 1 for e in r["epoch_log"]]
        axes[0].plot(t, [e["test_mse"] for e in r["epoch_log"]], label=r["name"])
        axes[1].plot([h["step"] for h in r["history"]], [h["utilization"] for h in r["history"]], label=r["name"])
    axes[0].set(xlabel="epoch", ylabel="test MSE", yscale="log", title="reconstruction (test split)")
    axes[1].set(xlabel="step", ylabel="codes used (probe)", title="utilization")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save(results, rows, args.out, "phases", fig)
    return results


# -----------------------------------------------------------------------------
# plateau: the paper's freeze trigger (no new best commitment loss for `patience` epochs)
# -----------------------------------------------------------------------------

def plateau(base, args):
    run = dict(quantizer="nsvq", freeze_epoch=0, patience=args.patience, gan=True)  # 0: the plateau only
    results = run_variants(base, [(f"nsvq, patience {args.patience}", run)], args)
    rows = []
    for r in results:
        frozen = r["stage_start"].get("warmup")
        r["freeze_epoch"] = frozen if frozen is not None else float("nan")
        r["freeze_fraction"] = frozen / args.epochs if frozen is not None else float("nan")
        commit = [e["commit"] for e in r["epoch_log"] if e["stage"] == "stage1"]
        r["best_epoch"] = commit.index(min(commit)) if commit else -1
        print(f"seed {r['seed']}: " + (f"froze after epoch {frozen - 1} of {args.epochs} ({frozen / args.epochs:.0%} "
              f"of the budget), best commitment loss at epoch {r['best_epoch']}" if frozen is not None
              else f"the trigger never fired in {args.epochs} epochs"))
        rows.append({"name": r["name"], "seed": r["seed"], **{k: r[k] for k in
                     ("freeze_epoch", "freeze_fraction", "best_epoch", "test_mse", "test_psnr", "utilization")}})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in results:
        log = [e for e in r["epoch_log"] if e["stage"] == "stage1"]
        ax.plot([e["epoch"] for e in log], [e["commit"] for e in log], marker=".", label=f"seed {r['seed']}")
        if r["stage_start"].get("warmup") is not None:
            ax.axvline(r["stage_start"]["warmup"] - 0.5, color="k", ls="--", lw=1)
    ax.set(xlabel="epoch", ylabel="epoch-mean commitment loss", yscale="log",
           title=f"stage 1; dashed: the freeze (patience {args.patience})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(results, rows, args.out, "plateau", fig)
    return results


# -----------------------------------------------------------------------------
# scale-sim: the paper's scale on a CPU, 0.5 latents per code per step, latents that drift
# -----------------------------------------------------------------------------

class DriftingMixture:
    """A stand-in for an encoder whose output keeps moving: `modes` Gaussian blobs (std 0.5 per
    dimension, centres N(0, 4 I)) whose centres travel along their own random directions while
    the whole cloud grows. At speed 1 a centre moves one blob radius (0.5 sqrt(D)) every 2,000
    steps, a quarter of what an Adam step of lr 1e-3 can move a code (1e-3 sqrt(D)), and the
    cloud grows by 10% over `steps`; `speed` multiplies both (the paper's Fig. 2 multiplies the
    encoder's learning rate by 0.1 ... 10): at 10 a code moved by its gradient cannot keep up."""

    def __init__(self, modes, dim, steps, speed, generator):
        self.centres = 2.0 * torch.randn(modes, dim, generator=generator)
        directions = torch.randn(modes, dim, generator=generator)
        self.velocity = directions / directions.norm(dim=1, keepdim=True) * speed * 0.5 * dim ** 0.5 / 2000
        self.growth = 0.1 * speed / steps
        self.generator = generator

    def sample(self, n, step):
        pick = torch.randint(len(self.centres), (n,), generator=self.generator)
        centres = self.centres + step * self.velocity  # (modes, D)
        z = centres[pick] + 0.5 * torch.randn(n, self.centres.shape[1], generator=self.generator)
        return z * (1.0 + self.growth * step)  # (n, D)


SIM_METHODS = ("ste+replace", "ema+replace", "simvq", "nsvq-no-replace", "nsvq")
EXTRA_SIM_METHODS = ("nsvq-absolute-tau", "nsvq-replace-from-codes", "ste+replace-from-codes")


def make_sim_quantizer(method, K, D, args):
    """(quantizer, replaces during training) for a method name of the simulation."""
    if method.startswith("ste+replace"):
        vq, replaces = nsvq.VectorQuantizer(K, D), True
    elif method == "ema+replace":
        vq, replaces = nsvq.EMAVectorQuantizer(K, D, decay=args.ema_decay), True
    elif method == "simvq":
        vq, replaces = nsvq.SimVQ(K, D), False
    elif method == "nsvq-absolute-tau":
        vq, replaces = nsvq.NSVQ(K, D, tau=args.absolute_tau), True
    else:
        vq, replaces = nsvq.NSVQ(K, D, tau=args.relative_tau, tau_mode="relative"), method != "nsvq-no-replace"
    if method.endswith("from-codes"):  # seeded from the latent pool first, like every other method
        vq.upkeep = UpkeepFromCodes(K, D)
    return vq, replaces


def simulate(method, speed, args, seed=0):
    """Train one codebook on the drifting mixture; return its curves (every 20 steps) and totals.

    Every method starts from the same data: replacement runs until every code has been seeded
    from latents (SimVQ has no per-code parameters and starts from its own initialisation; a
    codebook re-seeded from codes is seeded from latents first, so that it starts where the
    others do); then runs every --sim-replace-every steps for the methods that replace. Curves:
    utilization and perplexity of the codes used in the last 20 steps (10 expected assignments
    per code), quantization error relative to the latents' variance, kernel mass, duplicates.
    """
    K, N, D, steps = args.sim_codes, args.sim_codes // 2, args.sim_dim, args.sim_steps
    torch.manual_seed(seed)
    data = DriftingMixture(K // 32, D, steps, speed, torch.Generator().manual_seed(seed))
    vq, replaces = make_sim_quantizer(method, K, D, args)
    params = list(vq.parameters())
    opt = torch.optim.Adam(params, lr=args.sim_lr) if params else None
    curves, window, previous = [], torch.zeros(K), torch.zeros(K)
    sums = {"error": 0.0, "mass": 0.0}
    reseeded = live_reseeded = 0
    for step in range(steps):
        z = data.sample(N, step)  # (N, D)
        out = vq(z)
        if opt:
            opt.zero_grad(set_to_none=True)
            sum(out.losses.values()).backward()
            opt.step()
        counts = vq.update_(z, out.indices)
        window += counts
        seeding = method != "simvq" and not bool(vq.upkeep.seeded.all())
        if seeding or (replaces and step % args.sim_replace_every == 0):
            dead = vq.replace_dead_codes_()
            if opt:
                nsvq.reset_adam_state_(opt, vq.embedding, dead)
            if not seeding:  # "live": chosen in the last 20 to 40 steps
                reseeded += int(dead.sum())
                live_reseeded += int(((window + previous)[dead] > 0).sum())
        error = (z - vq.codebook.detach()[out.indices]).pow(2).sum(1).mean()
        sums["error"] += float(error / z.var(0).sum())
        sums["mass"] += float(out.diagnostics.get("kernel_mass", float("nan")))
        if (step + 1) % 20 == 0:
            health = metrics.codebook_stats(window)
            curves.append({"step": step + 1, "utilization": health["utilization"],
                           "perplexity": health["perplexity"], "rel_error": sums["error"] / 20,
                           "kernel_mass": sums["mass"] / 20,
                           "duplicates": duplicate_codes(vq.codebook.detach())})
            window, previous = torch.zeros(K), window
            sums = {"error": 0.0, "mass": 0.0}
    last = curves[len(curves) // 2:]  # the second half of the run
    return {"method": method, "speed": speed, "curves": curves,
            "utilization": curves[-1]["utilization"], "perplexity": curves[-1]["perplexity"],
            "rel_error": statistics.mean(c["rel_error"] for c in last),
            "kernel_mass": statistics.mean(c["kernel_mass"] for c in curves),
            "reseeded": reseeded, "live_reseeded": live_reseeded,
            "duplicates": max(c["duplicates"] for c in curves)}


def scale_sim(args):
    t0 = time.time()
    K = args.sim_codes
    print(f"K = {K} codes, {K // 2} latents per step (0.5 per code), D = {args.sim_dim}, "
          f"{K // 32} drifting modes, {args.sim_steps} steps, Adam lr {args.sim_lr}, replacement "
          f"every {args.sim_replace_every} steps; relative tau {args.relative_tau}, absolute tau "
          f"{args.absolute_tau}, EMA decay {args.ema_decay}")
    results = []
    for speed in args.sim_speeds:
        for method in args.sim_methods:
            r = simulate(method, speed, args)
            results.append(r)
            print(f"x{speed:<4g} {method:24s} util {r['utilization']:6.1%} ppl {r['perplexity']:6.0f} "
                  f"rel.error {r['rel_error']:.4f} re-seeded {r['reseeded']:5d} (live {r['live_reseeded']:4d}) "
                  f"duplicates {r['duplicates']} mass {r['kernel_mass']:.2f}  [{time.time() - t0:.0f}s]",
                  flush=True)
    print("\n| method | drift | utilization | perplexity | quant. error / var | re-seeded (live) | duplicates | kernel mass |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mass = "—" if math.isnan(r["kernel_mass"]) else f"{r['kernel_mass']:.2f}"
        print(f"| {r['method']} | x{r['speed']:g} | {r['utilization']:.1%} | {r['perplexity']:.0f} | "
              f"{r['rel_error']:.4f} | {r['reseeded']} ({r['live_reseeded']}) | {r['duplicates']} | {mass} |")
    print(f"\n{time.time() - t0:.0f} s")
    plt = pyplot()
    speeds = list(dict.fromkeys(r["speed"] for r in results))
    fig, axes = plt.subplots(2, len(speeds), figsize=(4 * len(speeds), 6), squeeze=False)
    for col, speed in enumerate(speeds):
        for r in (r for r in results if r["speed"] == speed):
            steps = [c["step"] for c in r["curves"]]
            axes[0, col].plot(steps, [c["utilization"] for c in r["curves"]], label=r["method"])
            axes[1, col].plot(steps, [c["rel_error"] for c in r["curves"]], label=r["method"])
        axes[0, col].set(title=f"drift x{speed:g}", ylim=(0, 1.02), ylabel="codes used (last 20 steps)")
        axes[1, col].set(xlabel="step", yscale="log", ylabel="quant. error / latent variance")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(results, os.path.join(args.out, "scale-sim.json"))
    savefig_atomic(fig, os.path.join(args.out, "scale-sim.png"), dpi=55)
    print(f"wrote {os.path.join(args.out, 'scale-sim')}.json and .png")
    return results


# -----------------------------------------------------------------------------
# natural: real photographs through train_imagenet.py's cifar preset
# -----------------------------------------------------------------------------

NATURAL_METHODS = {  # name -> train_imagenet options; the same preset, budget and seed for all
    "STE": dict(quantizer="ste", replace=False),
    "STE + replacement": dict(quantizer="ste", replace=True),
    "EMA + replacement": dict(quantizer="ema", replace=True),
    "SimVQ": dict(quantizer="simvq"),
    "FSQ": dict(quantizer="fsq"),
    "NSVQ": dict(quantizer="nsvq"),
    "SimVQ + dense loss": dict(quantizer="simvq-ns"),
    # NSVQ's parts one at a time: no dense loss; no stages (one stage, as the baselines train)
    "NSVQ, alpha 0": dict(quantizer="nsvq", alpha=0.0),
    "NSVQ without stages": dict(quantizer="nsvq", freeze_epoch=0, patience=100),
}
# How the preset was chosen (NSVQ, seed 0): the critic, the learning rate, the upsampling's
# initialisation, and the same network with no quantizer (the ceiling at this budget).
NATURAL_ABLATION = {
    "continuous (no quantizer)": dict(quantizer="ste", replace=False, model="continuous"),
    "NSVQ": dict(),  # the preset: no critic, lr 6e-4
    "continuous (no quantizer), lr 2e-4": dict(quantizer="ste", replace=False, lr=2e-4,
                                               model="continuous"),
    "NSVQ, lr 2e-4": dict(lr=2e-4),
    "NSVQ, lr 2e-4, critic in stage 2": dict(lr=2e-4, gan_weight=0.1),
    "NSVQ, lr 2e-4, critic from step 0": dict(lr=2e-4, gan_weight=0.1, gan_stage1=True),
    "NSVQ, ICNR upsampling": dict(model="icnr"),
    "NSVQ, lr 1e-3": dict(lr=1e-3),
}
NATURAL_KEYS = ("psnr", "ssim", "l1", "utilization", "perplexity", "seconds")
ARTEFACT_KEYS = ("grid", "tint")  # the checkerboard and the colour shift, measured: artefacts()
RUN_ONLY = ("data", "out", "overwrite", "resume", "device", "workers", "log_every", "eval_every",
            "eval_images", "ckpt_minutes", "timeout_minutes", "max_steps")  # not the training


class Continuous(nsvq.VectorQuantizer):
    """No quantizer: z_q = z_e, one "code" (the ceiling of the same network at this budget)."""

    def __init__(self, dim):
        super().__init__(1, dim, buffer_size=0)

    def forward(self, z_e):
        indices = torch.zeros(z_e.shape[0], *z_e.shape[2:], dtype=torch.long, device=z_e.device)
        return nsvq.QuantizerOutput(z_e, indices, {}, {})


def icnr_(conv, factor=2):
    """ICNR (Aitken et al., 2017): the conv before a pixel shuffle starts as one conv repeated
    for the factor^2 sub-pixels, so the upsampled output starts free of checkerboard."""
    weight = conv.weight.detach()
    with torch.no_grad():
        conv.weight.copy_(weight[::factor ** 2].repeat_interleave(factor ** 2, 0))


def natural_model(variant):
    """train_imagenet.Autoencoder, or its variant for the ablation (None: the script's own)."""
    import train_imagenet

    class Variant(train_imagenet.Autoencoder):
        def __init__(self, cfg):
            super().__init__(cfg)
            if variant == "continuous":
                self.vq = Continuous(cfg.dim)
            for i, m in enumerate(self.decoder):
                if variant == "icnr" and isinstance(m, torch.nn.PixelShuffle):
                    icnr_(self.decoder[i - 1])
    return Variant if variant else train_imagenet.Autoencoder


def artefacts(recon, x):
    """The two artefacts the eye sees, measured on (n, 3, H, W) images in [-1, 1]:
    grid = P(recon) / P(x), P the power at the 2-pixel period (DFT bins (H/2, 0), (0, W/2),
      (H/2, W/2)), where the last x2 pixel shuffle draws its checkerboard: 1, as much as the
      photographs have; below, blur; above, a pattern the decoder adds;
    tint = mean over images and R, G, B of |mean(recon) - mean(x)|, in 8-bit levels: a grey
      sky returned purple."""
    H, W = x.shape[-2:]
    bins = lambda y: torch.fft.fft2(y.double())[..., [H // 2, 0, H // 2], [0, W // 2, W // 2]]
    grid = bins(recon).abs().pow(2).sum() / bins(x).abs().pow(2).sum()
    tint = (recon.mean((2, 3)) - x.mean((2, 3))).abs().mean() * 127.5
    return {"grid": float(grid), "tint": float(tint)}


@functools.lru_cache(1)
def val_images(data):
    """All of --data's val/ images at 32 x 32, in [-1, 1]: (n, 3, 32, 32)."""
    val = metrics.ImageFolder(data, "val", 32, False, 0)
    return (torch.stack([val[(i, 0)][0] for i in range(len(val))]).double() / 127.5 - 1).float()


def scored(summary, summary_path, checkpoint, variant, data):
    """The summary with artefacts() of the checkpoint's reconstructions of val/, written back
    (a summary without a checkpoint at hand keeps what it has: NaN if nothing)."""
    import train_imagenet
    if "grid" not in summary and os.path.exists(checkpoint):
        with patched(train_imagenet, "Autoencoder", natural_model(variant)):
            model = train_imagenet.load_autoencoder(checkpoint)
        x = val_images(data)
        with torch.no_grad():
            recon = torch.cat([model(x[i:i + 256])[0].clamp(-1, 1) for i in range(0, len(x), 256)])
        summary = {**summary, **artefacts(recon, x)}
        write_json_atomic(summary, summary_path)
    return {**{k: math.nan for k in ARTEFACT_KEYS}, **summary, "checkpoint": checkpoint,
            "model": variant}


def natural_run(name, seed, overrides, args):
    """One run's summary: read back if a finished run with the same options exists (in
    --summaries, or its folder in --out), else trained (continued with --resume)."""
    import train_imagenet
    overrides = dict(overrides)
    variant = overrides.pop("model", None)
    tag = safe_name(name if seed == 0 else f"{name}-seed{seed}")  # seed 0 read back by --seeds 3
    out, summary_path = os.path.join(args.out, tag), os.path.join(args.summaries, tag + ".json")
    extra = {"epochs": args.epochs} if args.epochs else {}
    cfg = train_imagenet.resolve(train_imagenet.make_config(
        "cifar", data=args.data, out=out, seed=seed, device=args.device, **overrides, **extra))
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    key["model"] = variant
    if os.path.exists(summary_path) and json.load(open(summary_path))["config"] == key:
        print(f"=== {name}, seed {seed}: finished ({summary_path})")
        ckpts = train_imagenet.checkpoints(out) if os.path.isdir(out) else [""]
        return scored(json.load(open(summary_path)), summary_path, ckpts[-1], variant, args.data)
    if args.table_only:
        return None
    print(f"\n=== {name}, seed {seed} ===", flush=True)
    done = os.path.join(out, "results.json")
    ckpts = train_imagenet.checkpoints(out) if os.path.isdir(out) else []
    saved = train_imagenet.load_checkpoint(ckpts[-1])["config"] if ckpts else {}
    same = saved and {k: v for k, v in saved.items() if k not in RUN_ONLY} == \
        {k: v for k, v in key.items() if k != "model"}
    with patched(train_imagenet, "Autoencoder", natural_model(variant)):
        if same and os.path.exists(done):
            r = json.load(open(done))  # a finished run of these options: read back
        else:
            resume = "auto" if args.resume and same else ""
            r = train_imagenet.main(dataclasses.replace(cfg, resume=resume, overwrite=not resume))
    path = os.path.join(out, "metrics.jsonl")  # absent if the run was shorter than a log interval
    log = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    log = list({h["step"]: h for h in log if "eval" not in h}.values())  # resumes log again
    summary = {"name": name, "seed": seed, **{k: r[k] for k in NATURAL_KEYS},
               "stage_start": r["stage_start"], "steps": r["steps"], "config": key,
               "codes_used": [[h["step"], round(h["utilization"], 4)] for h in log],
               "l1_train": [[h["step"], round(h["l1"], 4)] for h in log]}
    os.makedirs(args.summaries, exist_ok=True)
    write_json_atomic(summary, summary_path)
    return scored(summary, summary_path, train_imagenet.checkpoints(out)[-1], variant, args.data)


class patched:
    """setattr(obj, name, value) for the duration of a with block."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


def natural(args):
    """Every run of --arms (verdict: NATURAL_METHODS; ablation: NATURAL_ABLATION) through
    train_imagenet.py's cifar preset (32x32 images, 8x8 tokens, K = 8,192, the paper's 0.5
    latents per code per step) on --data's train/, scored on its val/. Each finished run's
    summary goes to --summaries at once, and a second invocation skips it; the table and the
    figure (real images and each reconstruction, codes used over training) are built from the
    finished runs whose checkpoints are at hand."""
    import train_imagenet
    for split in ("train", "val"):  # a wrong --data stops here, before any run
        metrics.list_images(args.data, split)
    arms = NATURAL_ABLATION if args.arms == "ablation" else NATURAL_METHODS
    runs = [(n, o) for n, o in arms.items() if not args.only or re.search(args.only, n)]
    if not runs:
        raise ValueError(f"--only {args.only!r} matches none of this subcommand's runs")
    results = [natural_run(name, seed, overrides, args)
               for name, overrides in runs for seed in range(args.seeds)]
    results = [r for r in results if r is not None]  # --table-only: the finished runs
    if not results:
        raise ValueError(f"no finished run of these options in {args.summaries}")
    rows = report(results, NATURAL_KEYS + ARTEFACT_KEYS)
    os.makedirs(args.out, exist_ok=True)
    plt = pyplot()
    x = val_images(args.data)
    x = x[::max(1, len(x) // 8)][:8]  # every class
    firsts = [r for r in results if r["seed"] == 0 and os.path.exists(r.get("checkpoint", ""))]
    fig = plt.figure(figsize=(13, 2.2 + 0.9 * (len(firsts) + 1)))
    grid = fig.add_gridspec(len(firsts) + 1, 2, width_ratios=(len(x) / 8, 1.1))
    curve = fig.add_subplot(grid[:, 1])
    for row, r in enumerate([None] + firsts):
        if r is None:
            shown, label = x, "val images"
        else:
            with patched(train_imagenet, "Autoencoder", natural_model(r["model"])):
                model = train_imagenet.load_autoencoder(r["checkpoint"])
            shown, label = model(x)[0].clamp(-1, 1), r["name"]
            curve.plot(*zip(*r["codes_used"]), label=r["name"])
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(((shown.detach() + 1) / 2).permute(2, 0, 3, 1).reshape(32, -1, 3).clamp(0, 1).numpy())
        ax.set(xticks=[], yticks=[])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    curve.set(xlabel="step", ylabel="codes used in the last 20 steps", ylim=(0, 1.02))
    if firsts:
        curve.legend(fontsize=7)
    fig.tight_layout()
    save(results, rows, args.out, "natural" if args.arms == "verdict" else "natural_ablation", fig)
    return results


# -----------------------------------------------------------------------------
# toy: the README's first figure, codebooks on moving 2-D blobs
# -----------------------------------------------------------------------------

def toy_data(scenario, t, n, generator):
    """n samples of 8 blobs in 2-D at time t in [0, 1]: translating, or shrinking."""
    angle = torch.arange(8) * math.pi / 4
    x = torch.stack([angle.cos(), angle.sin()], 1)[torch.randint(8, (n,), generator=generator)]
    x = x + 0.15 * torch.randn(n, 2, generator=generator)
    return x + torch.tensor([4.0 * t, 0.0]) if scenario == "translate" else x * (1.0 - 0.8 * t)


def toy_run(method, scenario, steps=1500, K=64):
    """A codebook trained online on the moving blobs: (final codes, [(t, utilization)])."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vq = {"STE": lambda: nsvq.VectorQuantizer(K, 2), "EMA": lambda: nsvq.EMAVectorQuantizer(K, 2, decay=0.95),
          "NSVQ": lambda: nsvq.NSVQ(K, 2, alpha=1.0, tau=0.02)}[method]()  # tau ~ a blob's spread
    with torch.no_grad():  # every method starts from the same live codes, on the data at t = 0
        vq.embedding.copy_(toy_data(scenario, 0.0, K, gen))
        if method == "EMA":
            vq.embed_sum.copy_(vq.embedding)
        vq.upkeep.usage.fill_(1.0 / K)
        vq.upkeep.seeded.fill_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2) if method != "EMA" else None
    usage = []
    for step in range(steps):
        t = step / (steps - 1)
        z_e = toy_data(scenario, t, 256, gen)  # (256, 2): the "encoder output", moving
        out = vq(z_e)
        if opt:
            opt.zero_grad()
            sum(out.losses.values()).backward()
            opt.step()
        vq.update_(z_e, out.indices)
        if method == "NSVQ" and step % 10 == 0:
            nsvq.reset_adam_state_(opt, vq.embedding, vq.replace_dead_codes_())
        if step % 25 == 0 or step == steps - 1:
            probe = nsvq.nearest_code(toy_data(scenario, t, 4096, gen), vq.codebook)
            usage.append((t, metrics.codebook_stats(torch.bincount(probe, minlength=K))["utilization"]))
    return vq.codebook.detach(), usage


def toy(args):
    """STE, EMA and NSVQ codebooks of 64 codes trained online on 8 blobs that translate or
    shrink: where each leaves its codes, and the share of them in use over time."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 7))
    for row, scenario in enumerate(("translate", "shrink")):
        data = toy_data(scenario, 1.0, 2000, torch.Generator().manual_seed(1))
        for col, method in enumerate(("STE", "EMA", "NSVQ")):
            codebook, usage = toy_run(method, scenario)
            axes[row, col].scatter(data[:, 0], data[:, 1], s=2, c="lightgray")
            axes[row, col].scatter(codebook[:, 0], codebook[:, 1], s=12, c="C3")
            axes[row, col].set(title=f"{method}, {scenario}: final codebook", aspect="equal")
            axes[row, 3].plot(*zip(*usage), label=method)
            print(f"{scenario:9s} {method:5s} final utilization {usage[-1][1]:.0%}")
        axes[row, 3].set(title=f"{scenario}: utilization", xlabel="time", ylim=(0, 1.05))
        axes[row, 3].legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    savefig_atomic(fig, os.path.join(args.out, "toy.png"), dpi=60)
    print(f"wrote {os.path.join(args.out, 'toy.png')}")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

SUBCOMMANDS = {  # name -> (function, default epochs per run, one line of help)
    "compare": (compare, 12, "the ablation table, same seed, data and budget, no GAN (--paper-ratio: 8 epochs)"),
    "stress": (stress, 6, "encoder lr x0.1, x1, x3, x10 for plain VQ, each part alone and NSVQ"),
    "controlled": (controlled, 8, "continuous autoencoder -> k-means codebook -> STE or NSVQ"),
    "sensitivity": (sensitivity, 3, "alpha x tau grid, absolute and relative tau"),
    "phases": (phases, 10, "the stage schedule's phases with the adversarial loss"),
    "plateau": (plateau, 60, "NSVQ frozen by the plateau trigger only"),
    "scale-sim": (scale_sim, None, "K = 4,096 codes on 2,048 drifting latents per step, no encoder"),
    "toy": (toy, None, "2-D codebooks on moving blobs: the README's first figure (about 20 s)"),
    "natural": (natural, None, "every method on real photographs: train_imagenet.py --preset cifar"),
}


def positive(kind):
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (_, epochs, help) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--out", default=os.path.join("runs", "experiments", name), help="output folder")
        if name == "toy":
            continue
        if name == "natural":
            p.add_argument("--data", required=True, help="a folder of train/ and val/ images")
            p.add_argument("--device", default="auto", help="auto | cpu | cuda")
            p.add_argument("--epochs", type=positive(int), default=None, help="(default: the preset's)")
            p.add_argument("--seeds", type=positive(int), default=1, help="seeds 0 .. N-1 for every run")
            p.add_argument("--only", default="", metavar="REGEX", help="run only the runs whose name matches")
            p.add_argument("--resume", action="store_true",
                           help="continue the runs a killed invocation left in --out (same options)")
            p.add_argument("--arms", choices=("verdict", "ablation"), default="verdict",
                           help="verdict: every method; ablation: how the preset was chosen")
            p.add_argument("--summaries", default=None, metavar="DIR",
                           help="where each finished run's summary goes (default: --out)")
            p.add_argument("--table-only", action="store_true",
                           help="the table and figure of the finished runs; train nothing")
            continue
        if name == "scale-sim":
            p.add_argument("--sim-codes", type=positive(int), default=4096, help="K; K/2 latents per step")
            p.add_argument("--sim-dim", type=positive(int), default=32, help="D")
            p.add_argument("--sim-steps", type=positive(int), default=1200)
            p.add_argument("--sim-speeds", type=positive(float), nargs="+", default=[0.1, 1.0, 3.0, 10.0])
            p.add_argument("--sim-methods", nargs="+", default=list(SIM_METHODS),
                           choices=SIM_METHODS + EXTRA_SIM_METHODS)
            p.add_argument("--sim-lr", type=positive(float), default=1e-3, help="Adam lr of the codebooks")
            p.add_argument("--sim-replace-every", type=positive(int), default=10)
            p.add_argument("--relative-tau", type=positive(float), default=1.0)
            p.add_argument("--absolute-tau", type=positive(float), default=0.35)
            p.add_argument("--ema-decay", type=float, default=0.99,
                           help="(0.8 breaks at 0.5 latents per code per step: EXPERIMENTS.md)")
            continue
        p.add_argument("--data", default="./data/mnist", help="folder of the MNIST IDX files")
        p.add_argument("--no-download", dest="download", action="store_false", help="never touch the network")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--epochs", type=positive(int), default=None, help=f"budget of each run (default {epochs})")
        p.add_argument("--seeds", type=positive(int), default=1, help="seeds 0 .. N-1 for every run")
        p.add_argument("--only", default="", metavar="REGEX",
                       help="run only the runs whose name matches (e.g. to repeat two arms with --seeds 3)")
        if name == "compare":
            p.add_argument("--paper-ratio", action="store_true",
                           help="K = 8,192 on batches of 64: 0.38 latents per code per step (the paper: 0.5)")
        p.add_argument("--probe-every", type=positive(int), default=10 if name == "controlled" else 100,
                       help="steps between probes of drift, churn and codes used")
        if name == "controlled":
            p.add_argument("--pretrain-epochs", type=positive(int), default=30,
                           help="at most this many epochs of the continuous autoencoder")
        if name == "sensitivity":
            p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS),
                           help="the alpha axis; 0 is one run without the dense loss (default: %(default)s)")
        if name == "plateau":
            p.add_argument("--patience", type=positive(int), default=10, help="epochs without a new best")
    args = parser.parse_args(argv)
    if args.command not in ("scale-sim", "toy", "natural") and args.epochs is None:
        # 8 epochs at the paper's ratio: 1,000 steps, past the recovery at step ~780, within 15 minutes
        args.epochs = 8 if getattr(args, "paper_ratio", False) else SUBCOMMANDS[args.command][1]
    if args.command == "natural":
        args.summaries = args.summaries or args.out
    if getattr(args, "only", ""):
        try:
            re.compile(args.only)
        except re.error as e:
            parser.error(f"--only {args.only!r} is not a regular expression: {e}")
    if any(not (math.isfinite(a) and a >= 0) for a in getattr(args, "alphas", ())):
        parser.error(f"--alphas must be finite numbers >= 0, got {args.alphas}")
    if args.command == "scale-sim":
        if args.sim_codes < 64 or args.sim_steps < 20:
            parser.error("--sim-codes must be >= 64 and --sim-steps >= 20")
        if not 0 <= args.ema_decay < 1:
            parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


def base_config(args):
    """train_mnist's Config for these runs: no GAN unless a subcommand asks for it, checked."""
    base = train_mnist.Config(data=args.data, download=args.download, device=args.device,
                              gan=False, overwrite=True)  # a run is repeated afresh
    train_mnist.resolve(base)  # a bad --device or data folder stops here, before any run
    return base


def main(argv=None):
    args = parse_args(argv)
    train_mnist.check_out(train_mnist.Config(out=args.out))
    if args.command in ("scale-sim", "toy", "natural"):
        return SUBCOMMANDS[args.command][0](args)
    function = SUBCOMMANDS[args.command][0]
    return function(base_config(args), args)


if __name__ == "__main__":
    import train_imagenet
    try:
        main()
    except (train_mnist.DataError, metrics.DataError, ValueError, FileNotFoundError,
            train_mnist.OutputError, train_imagenet.OutputError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted; experiments start their runs afresh (natural: --resume goes on)",
              file=sys.stderr)
        sys.exit(130)
    except Exception:  # as train_imagenet.cli: loader workers ignore SIGTERM; exit at once
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
