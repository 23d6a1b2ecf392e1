"""
bench.py -- speed and memory of the quantizers, and the paper's scale simulated on a CPU.

    python bench.py                    # the quantizer table on the CPU (~6 min on 2 cores)
    python bench.py --device cuda      # the same on a GPU
    python bench.py --quick            # small sizes, a few seconds (used by the tests)
    python bench.py --imagenet --device cuda   # train_imagenet.py's own training step
    python bench.py --imagenet --flops         # FLOPs of that step, NSVQ and SimVQ (any machine)
    python bench.py --scale-sim        # 0.5 latents per code per step, drifting latents (~9 min)

The table: forward + backward of each whole quantizer (search, losses, straight-through) on
random latents, median of --repeats warm runs taken in turns, at two sizes: N = 8,192,
K = 16,384, D = 16 (where the search is bandwidth-bound) and N = 4,096 (16 images x 16x16
tokens per GPU, half the paper's 32), K = 65,536, D = 128. Plus the dense loss written with
a materialised (chunk, K, D) tensor, and NSVQ's peak memory at N = 16,384, K = 65,536,
D = 64 (process RSS in a fresh interpreter; max_memory_allocated on CUDA).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import nsvq


def naive_dense_loss(z, codebook, tau, chunk=64):
    """Reference: L_NS with an explicit (chunk, K, D) difference tensor, as the authors' code
    builds it. Backward runs per chunk so memory stays bounded; returns the loss value."""
    N, D = z.shape
    total = 0.0
    for start in range(0, N, chunk):
        zc = z[start:start + chunk]  # (n, D)
        diff = zc[:, None, :] - codebook[None]  # (n, K, D)
        d = diff.pow(2).sum(-1)  # (n, K)
        w = torch.softmax(-d.detach() / tau, 1)
        w = w.scatter(1, d.detach().argmin(1, keepdim=True), 0.0)
        loss = (w * d).sum() / (N * D)
        loss.backward()
        total += float(loss.detach())
    return total


def time_round_robin(fns, repeats, device):
    """Median seconds of `repeats` warm runs of each function, taken in turns (one warm-up run
    each first). Why in turns: on a shared machine the speed drifts by +-20% over a minute,
    and timing one function after the other would put that drift into their ratio."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def quantizer_step(vq, z_e):
    def step():
        vq.zero_grad(set_to_none=True)
        z_e.grad = None
        out = vq(z_e)
        # z_q.sum() * 0 keeps the straight-through path to z_e in the timed backward.
        (out.z_q.sum() * 0 + sum(out.losses.values())).backward()
    return step


def peak_memory(N, K, D, device):
    """Peak memory (bytes) of one NSVQ forward+backward, in a fresh interpreter. The RSS peak is
    read from /proc (VmHWM): ru_maxrss would carry over the parent's peak through fork + exec."""
    code = (f"import torch, resource, json, nsvq\n"
            f"vq = nsvq.NSVQ({K}, {D}).to('{device}')\n"
            f"z = torch.randn({N}, {D}, device='{device}', requires_grad=True)\n"
            f"out = vq(z); sum(out.losses.values()).backward()\n"
            f"try:\n"
            f"    peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            f"except (OSError, IndexError):\n"
            f"    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            f"gpu = torch.cuda.max_memory_allocated() if '{device}' == 'cuda' else 0\n"
            f"print(json.dumps({{'rss': peak, 'gpu': gpu}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


QUANTIZERS = [("STE (VectorQuantizer)", nsvq.VectorQuantizer, {}), ("EMA", nsvq.EMAVectorQuantizer, {}),
              ("SimVQ", nsvq.SimVQ, {}), ("NSVQ softmax", nsvq.NSVQ, {}),
              ("NSVQ clamped", nsvq.NSVQ, {"weighting": "clamped"}),
              ("NSVQ relative tau", nsvq.NSVQ, {"tau": 1.0, "tau_mode": "relative"})]


def quantizer_table(args):
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # distances at full fp32 precision
    sizes = [(512, 1024, 16), (256, 4096, 128)] if args.quick else [(8192, 16384, 16), (4096, 65536, 128)]
    rows = []
    for N, K, D in sizes:
        torch.manual_seed(0)
        z_e = torch.randn(N, D, device=device, requires_grad=True)  # (B=N, D): no spatial dims
        steps = {name: quantizer_step(cls(K, D, **kw).to(device), z_e) for name, cls, kw in QUANTIZERS}
        times = time_round_robin(steps, args.repeats, device)
        t_ste = times["STE (VectorQuantizer)"]
        rows += [(name, N, K, D, t, t / t_ste, t / times["SimVQ"]) for name, t in times.items()]
        if D == 16:
            codebook = torch.randn(K, D, device=device, requires_grad=True)
            zd = z_e.detach()
            t_naive = time_round_robin({"naive": lambda: naive_dense_loss(zd, codebook, 0.35)},
                                       args.repeats, device)["naive"]
            rows.append(("naive (chunk, K, D) dense loss", N, K, D, t_naive, t_naive / t_ste,
                         t_naive / times["SimVQ"]))
            ratio_naive = t_naive / times["NSVQ softmax"]
    print(f"\ndevice: {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                   f" ({torch.get_num_threads()} threads)")
          + f", torch {torch.__version__}; forward+backward, median of {args.repeats} warm runs\n")
    print("| quantizer | N | K | D | ms | x STE | x SimVQ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, k, d, t, r_ste, r_simvq in rows:
        print(f"| {name} | {n} | {k} | {d} | {t * 1e3:.1f} | {r_ste:.2f} | {r_simvq:.2f} |")
    mem_N, mem_K, mem_D = (1024, 4096, 64) if args.quick else (16384, 65536, 64)
    mem = peak_memory(mem_N, mem_K, mem_D, device)
    key = "gpu" if device == "cuda" else "rss"
    print(f"\nnaive / NSVQ softmax at D = 16: {ratio_naive:.1f}x")
    print(f"NSVQ peak memory at N={mem_N}, K={mem_K}, D={mem_D}: {mem[key] / 2**30:.2f} GiB "
          f"({'GPU allocated' if key == 'gpu' else 'process RSS'})")
    return {"rows": rows, "peak_memory": mem, "device": device}


def seed_codebook_(vq, trainer, x):
    """Put a quantizer in the steady state of training: every code seeded and alive (usage 1/K),
    the codes spread over the encoder's latents on x (latents plus 1% noise), the latent pool
    full. What replacement costs then is its cadence's one wait, not the initial seeding, which
    re-seeds thousands of codes every step for the first few hundred steps."""
    with torch.no_grad():
        z = nsvq.flatten_latents(trainer.model.encoder(x).float(), vq.dim)  # (N, D)
        if vq.codebook_by_gradient and hasattr(vq, "embedding"):
            rows = z[torch.arange(vq.codebook_size, device=z.device) % len(z)]
            vq.embedding.copy_(rows + 0.01 * rows.std() * torch.randn_like(rows))
        vq.upkeep.usage.fill_(1.0 / vq.codebook_size)
        vq.upkeep.seeded.fill_(True)
        if len(vq.upkeep.latent_pool):
            vq.update_(trainer.model.encoder(x), vq(trainer.model.encoder(x)).indices)


def imagenet_flops(batch, quick):
    """FLOPs of one train_imagenet.py training step (convolutions and matrix products, counted by
    torch.utils.flop_counter in fp32 eager on the CPU; no machine changes them), NSVQ and SimVQ,
    in the steady state of stage 1 with a replacement call, LPIPS-VGG and the GAN on."""
    import metrics
    import train_imagenet as ti
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for quantizer in ("nsvq", "simvq"):
        cfg = ti.resolve(ti.make_config("tiny" if quick else "paper", data="-", quantizer=quantizer, amp="none",
                                        compile=False, perceptual_weight=1.0, lpips_weights="random"))
        torch.manual_seed(0)
        trainer = ti.build_trainer(cfg, torch.device("cpu"), metrics.LPIPS("vgg", "random"))
        ti.apply_stage(cfg, trainer, nsvq.StageSchedule(None, None), 1, torch.device("cpu"))
        x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
        seed_codebook_(trainer.model.vq, trainer, x)
        upkeep = quantizer == "nsvq"
        with FlopCounterMode(display=False) as counter:
            ti.train_step(cfg, trainer, x, cfg.gan_weight, True, upkeep, upkeep, torch.device("cpu"))
        flops[quantizer] = counter.get_total_flops()
    print(f"FLOPs per step, {'tiny' if quick else 'paper'} preset, batch {batch} (conv + matmul): "
          f"NSVQ {flops['nsvq'] / 1e12:.3f} T, SimVQ {flops['simvq'] / 1e12:.3f} T, "
          f"ratio {flops['nsvq'] / flops['simvq']:.3f}")
    return flops


def imagenet_steps(device, batch, repeats, quick):
    """train_imagenet.py's own train_step in the steady state of stage 1, at `batch` images per
    device (the paper: 4 GPUs x 32), NSVQ and SimVQ, in fp32 eager, bf16 eager and bf16 +
    compile (quick: the tiny preset, eager only). Each timed unit is one replacement cycle of
    the preset (--replace-every steps, replacement on the first), reported per step. Random
    LPIPS weights (they do not change the cost). Plus a figure that no machine changes: the
    FLOPs of one step (imagenet_flops)."""
    import metrics
    import train_imagenet as ti
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = [("none", False), ("bf16", False)] + ([] if quick else [("bf16", True)])  # compiling: ~1 min
    rows = []
    for quantizer in ("nsvq", "simvq"):
        for amp, compile_ in runs:
            cfg = ti.resolve(ti.make_config("tiny" if quick else "paper", data="-", quantizer=quantizer, amp=amp,
                                            compile=compile_, perceptual_weight=1.0, lpips_weights="random"))
            torch.manual_seed(0)
            trainer = ti.build_trainer(cfg, device, metrics.LPIPS("vgg", "random").to(device))
            ti.apply_stage(cfg, trainer, nsvq.StageSchedule(None, None), 1, device)
            x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
            seed_codebook_(trainer.model.vq, trainer, x)
            upkeep = quantizer == "nsvq"  # the baselines replace no code

            def cycle():
                for i in range(cfg.replace_every):
                    ti.train_step(cfg, trainer, x, cfg.gan_weight, True, upkeep and i == 0, upkeep, device)
            cycle()  # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time_round_robin({"cycle": cycle}, repeats, device.type)["cycle"] / cfg.replace_every
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            rows.append({"quantizer": quantizer, "amp": amp, "compile": compile_, "ms": t * 1e3,
                         "img_per_s": batch / t, "peak_gib": mem})
    print(f"\ntrain_imagenet.py train_step, {'tiny' if quick else 'paper'} preset, batch {batch} per "
          f"device, {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f", steady state, replacement every {cfg.replace_every} steps\n")
    print("| quantizer | run | ms/step | img/s | peak GiB |\n|---|---|---:|---:|---:|")
    for r in rows:
        run = f"{r['amp']}{' + compile' if r['compile'] else ''}"
        print(f"| {r['quantizer']} | {run} | {r['ms']:.0f} | {r['img_per_s']:.1f} | {r['peak_gib']:.2f} |")
    for i, run in enumerate(("fp32 eager", "bf16 eager", "bf16 + compile")[:len(runs)]):
        nsvq_row, simvq_row = rows[i], rows[i + len(runs)]
        print(f"NSVQ / SimVQ, {run}: time {nsvq_row['ms'] / simvq_row['ms']:.2f}x, "
              f"memory {nsvq_row['peak_gib'] / simvq_row['peak_gib']:.2f}x")
    return {"rows": rows, "flops": imagenet_flops(batch, quick), "batch": batch}


# -----------------------------------------------------------------------------
# The paper's scale on a CPU: 0.5 latents per code per step, latents that drift
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
EXTRA_SIM_METHODS = ("nsvq-absolute-tau",)  # with --sim-methods


def make_sim_quantizer(method, K, D, args):
    """(quantizer, replaces during training) for a method name of the simulation."""
    if method == "ste+replace":
        return nsvq.VectorQuantizer(K, D), True
    if method == "ema+replace":
        return nsvq.EMAVectorQuantizer(K, D, decay=args.ema_decay), True
    if method == "simvq":
        return nsvq.SimVQ(K, D), False
    if method == "nsvq-absolute-tau":
        return nsvq.NSVQ(K, D, tau=args.absolute_tau), True
    relative = nsvq.NSVQ(K, D, tau=args.relative_tau, tau_mode="relative")
    return relative, method == "nsvq"


def simulate(method, speed, args, seed=0):
    """Train one codebook on the drifting mixture; return its curves (every 20 steps) and totals.

    Every method starts from the same data: replacement runs until every code has been seeded
    from latents (SimVQ has no per-code parameters and starts from its own initialisation); then
    runs every --sim-replace-every steps for the methods that replace. Curves: utilization and
    perplexity of the codes used in the last 20 steps (10 expected assignments per code),
    quantization error relative to the latents' variance, kernel mass, duplicate codes.
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
                reseeded += len(dead)
                live_reseeded += int(((window + previous)[dead] > 0).sum())
        error = nsvq.mean_quantization_error(z, vq.codebook.detach(), out.indices)
        sums["error"] += float(error / z.var(0).sum())
        sums["mass"] += float(out.diagnostics.get("kernel_mass", float("nan")))
        if (step + 1) % 20 == 0:
            health = nsvq.codebook_stats(window)
            curves.append({"step": step + 1, "utilization": health["utilization"],
                           "perplexity": health["perplexity"], "rel_error": sums["error"] / 20,
                           "kernel_mass": sums["mass"] / 20,
                           "duplicates": nsvq.duplicate_codes(vq.codebook.detach())})
            window, previous = torch.zeros(K), window
            sums = {"error": 0.0, "mass": 0.0}
    last = curves[len(curves) // 2:]  # the second half of the run
    return {"method": method, "speed": speed, "curves": curves,
            "utilization": curves[-1]["utilization"], "perplexity": curves[-1]["perplexity"],
            "rel_error": statistics.mean(c["rel_error"] for c in last),
            "kernel_mass": statistics.mean(c["kernel_mass"] for c in curves),
            "reseeded": reseeded, "live_reseeded": live_reseeded,
            "duplicates": max(c["duplicates"] for c in curves)}


def scale_simulation(args):
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
            print(f"x{speed:<4g} {method:18s} util {r['utilization']:6.1%} ppl {r['perplexity']:6.0f} "
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
    if args.figure:
        plot_simulation(results, args)
    return results


def plot_simulation(results, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    tmp = f"{args.figure}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=55)
        os.replace(tmp, args.figure)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.figure}")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9, help="warm runs per timing (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--imagenet", action="store_true", help="time train_imagenet.py's training step")
    parser.add_argument("--batch", type=int, default=32, help="--imagenet: images per device (the paper: 32)")
    parser.add_argument("--flops", action="store_true", help="--imagenet: only count the FLOPs of a step "
                        "(a few minutes on a CPU at the paper preset)")
    parser.add_argument("--scale-sim", action="store_true", help="run the scale simulation instead")
    parser.add_argument("--sim-codes", type=int, default=4096, help="K; K/2 latents per step")
    parser.add_argument("--sim-dim", type=int, default=32, help="D")
    parser.add_argument("--sim-steps", type=int, default=1200)
    parser.add_argument("--sim-speeds", type=float, nargs="+", default=[0.1, 1.0, 3.0, 10.0])
    parser.add_argument("--sim-methods", nargs="+", default=list(SIM_METHODS),
                        choices=SIM_METHODS + EXTRA_SIM_METHODS)
    parser.add_argument("--sim-lr", type=float, default=1e-3, help="Adam lr of the codebooks")
    parser.add_argument("--sim-replace-every", type=int, default=10)
    parser.add_argument("--relative-tau", type=float, default=1.0)
    parser.add_argument("--absolute-tau", type=float, default=0.35)
    parser.add_argument("--ema-decay", type=float, default=0.99, help="(0.8 breaks at 0.5 latents "
                        "per code per step: EXPERIMENTS.md)")
    parser.add_argument("--figure", default=None, help="--scale-sim: write the figure here")
    args = parser.parse_args(argv)
    if args.flops and not args.imagenet:
        parser.error("--flops counts train_imagenet.py's step: pass --imagenet too")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    for name in ("repeats", "batch", "sim_steps", "sim_replace_every", "sim_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sim_codes < 64 or args.sim_steps < 20:
        parser.error("--sim-codes must be >= 64 and --sim-steps >= 20")
    for name in ("sim_lr", "relative_tau", "absolute_tau"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if not 0 <= args.ema_decay < 1 or not all(math.isfinite(s) and s > 0 for s in args.sim_speeds):
        parser.error("--ema-decay must be in [0, 1) and every --sim-speeds value > 0")
    for path in (args.json, args.figure):  # found out now, not after minutes of benchmarking
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and (not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
            parser.error(f"cannot write {path}: folder {folder} does not exist or is not writable")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.imagenet and args.flops:
        result = imagenet_flops(args.batch, args.quick)
    elif args.imagenet:
        result = imagenet_steps(args.device, args.batch, args.repeats, args.quick)
    elif args.scale_sim:
        result = scale_simulation(args)
    else:
        result = quantizer_table(args)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.json)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


if __name__ == "__main__":
    main()
