"""
bench.py -- speed, memory and FLOPs of the quantizers and of train_imagenet.py's step.

    python bench.py                    # the quantizer table on the CPU (~6 min on 2 cores)
    python bench.py --device cuda      # the same on a GPU
    python bench.py --quick            # small sizes, a few seconds (used by the tests)
    python bench.py --imagenet --device cuda   # train_imagenet.py's own training step
    python bench.py --imagenet --flops         # FLOPs of that step, NSVQ and SimVQ (any machine)

The table: forward + backward of each whole quantizer (search, losses, straight-through) on
random latents, median of --repeats warm runs taken in turns, at two sizes: N = 8,192,
K = 16,384, D = 16 (where the search is bandwidth-bound) and N = 4,096 (16 images x 16x16
tokens per GPU, half the paper's 32), K = 65,536, D = 128. Plus the dense loss written with
a materialised (chunk, K, D) tensor, and NSVQ's peak memory at N = 16,384, K = 65,536,
D = 64 (process RSS in a fresh interpreter; max_memory_allocated on CUDA).
"""

import argparse
import json
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
    args = parser.parse_args(argv)
    if args.flops and not args.imagenet:
        parser.error("--flops counts train_imagenet.py's step: pass --imagenet too")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.json:  # found out now, not after minutes of benchmarking
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"cannot write {args.json}: folder {folder} does not exist or is not writable")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.imagenet and args.flops:
        result = imagenet_flops(args.batch, args.quick)
    elif args.imagenet:
        result = imagenet_steps(args.device, args.batch, args.repeats, args.quick)
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
