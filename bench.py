"""
bench.py -- speed, memory and FLOPs of the quantizers and of train_imagenet.py's step.

    python bench.py                    # the quantizer table on the CPU (~6 min on 2 cores)
    python bench.py --device cuda      # the same on a GPU
    python bench.py --quick            # small sizes, a few seconds (used by the tests)
    python bench.py --imagenet --device cuda   # train_imagenet.py's own training step
    python bench.py --flops                    # FLOPs of that step, NSVQ and SimVQ (any machine)

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

import metrics
import nsvq
import train_imagenet as ti


def naive_dense_loss(z, codebook, tau, chunk=64):
    """L_NS with an explicit (chunk, K, D) tensor, as the authors' code; backward per chunk."""
    N, D = z.shape
    for start in range(0, N, chunk):
        zc = z[start:start + chunk]  # (n, D)
        diff = zc[:, None, :] - codebook[None]  # (n, K, D)
        d = diff.pow(2).sum(-1)  # (n, K)
        w = torch.softmax(-d.detach() / tau, 1)
        w = w.scatter(1, d.detach().argmin(1, keepdim=True), 0.0)
        ((w * d).sum() / (N * D)).backward()


def time_round_robin(fns, repeats, device):
    """Median seconds of `repeats` warm runs of each function, in turns after a warm-up: on a
    shared machine the speed drifts by +-20% over a minute, which would go into their ratio."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
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
            f"    peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status')\n"
            f"            if l.startswith('VmHWM')][0]\n"
            f"except (OSError, IndexError):\n"
            f"    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            f"gpu = torch.cuda.max_memory_allocated() if '{device}' == 'cuda' else 0\n"
            f"print(json.dumps({{'rss': peak, 'gpu': gpu}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


QUANTIZERS = [("STE (VectorQuantizer)", nsvq.VectorQuantizer, {}),
              ("EMA", nsvq.EMAVectorQuantizer, {}), ("SimVQ", nsvq.SimVQ, {}),
              ("NSVQ", nsvq.NSVQ, {}),
              ("NSVQ relative tau", nsvq.NSVQ, {"tau": 1.0, "tau_mode": "relative"})]


def quantizer_table(args):
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # distances at full fp32 precision
    sizes = [(512, 1024, 16), (256, 4096, 128)] if args.quick else [(8192, 16384, 16),
                                                                     (4096, 65536, 128)]
    rows = []
    for N, K, D in sizes:
        torch.manual_seed(0)
        z_e = torch.randn(N, D, device=device, requires_grad=True)  # (B=N, D): no spatial dims
        steps = {name: quantizer_step(cls(K, D, **kw).to(device), z_e)
                 for name, cls, kw in QUANTIZERS}
        times = time_round_robin(steps, args.repeats, device)
        t_ste = times["STE (VectorQuantizer)"]
        rows += [(name, N, K, D, t, t / t_ste, t / times["SimVQ"]) for name, t in times.items()]
        if D == 16:
            codebook = torch.randn(K, D, device=device, requires_grad=True)
            naive = {"naive": lambda: naive_dense_loss(z_e.detach(), codebook, 0.35)}
            t_naive = time_round_robin(naive, args.repeats, device)["naive"]
            rows.append(("naive (chunk, K, D) dense loss", N, K, D, t_naive, t_naive / t_ste,
                         t_naive / times["SimVQ"]))
            ratio_naive = t_naive / times["NSVQ"]
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"\ndevice: {device} ({where}), torch {torch.__version__}; forward+backward, median of "
          f"{args.repeats} warm runs\n")
    print("| quantizer | N | K | D | ms | x STE | x SimVQ |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, n, k, d, t, r_ste, r_simvq in rows:
        print(f"| {name} | {n} | {k} | {d} | {t * 1e3:.1f} | {r_ste:.2f} | {r_simvq:.2f} |")
    mem_N, mem_K, mem_D = (1024, 4096, 64) if args.quick else (16384, 65536, 64)
    mem = peak_memory(mem_N, mem_K, mem_D, device)
    key = "gpu" if device == "cuda" else "rss"
    print(f"\nnaive / NSVQ at D = 16: {ratio_naive:.1f}x")
    print(f"NSVQ peak memory at N={mem_N}, K={mem_K}, D={mem_D}: {mem[key] / 2**30:.2f} GiB "
          f"({'GPU allocated' if key == 'gpu' else 'process RSS'})")
    return {"rows": rows, "peak_memory": mem, "device": device}


def steady_trainer(quantizer, amp, compile_, device, quick, batch):
    """train_imagenet.py's trainer in stage 1's steady state, LPIPS-VGG (random weights cost the
    same) and GAN on: every code alive (usage 1/K), spread over the encoder's latents plus 1%
    noise, the latent pool full, so that replacement costs its steady cycle, not the seeding."""
    cfg = ti.resolve(ti.make_config("tiny" if quick else "paper", data="-", quantizer=quantizer,
                                    amp=amp, compile=compile_, perceptual_weight=1.0,
                                    lpips_weights="random", device=device.type))
    torch.manual_seed(0)
    trainer = ti.build_trainer(cfg, device, metrics.LPIPS("vgg", "random").to(device))
    ti.apply_stage(cfg, trainer, nsvq.StageSchedule(None, None), 1, device)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    vq, encoder = trainer.model.vq, trainer.model.encoder
    with torch.no_grad():
        z = nsvq.to_rows(encoder(x).float(), vq.dim)  # (N, D)
        if vq.codebook_by_gradient and hasattr(vq, "embedding"):
            rows = z[torch.arange(vq.codebook_size, device=z.device) % len(z)]
            vq.embedding.copy_(rows + 0.01 * rows.std() * torch.randn_like(rows))
        vq.upkeep.usage.fill_(1.0 / vq.codebook_size)
        vq.upkeep.seeded.fill_(True)
        if len(vq.upkeep.latent_pool):
            vq.update_(encoder(x), vq(encoder(x)).indices)
    upkeep = quantizer == "nsvq"  # the baselines replace no code
    return cfg, (lambda replace: ti.train_step(cfg, trainer, x, cfg.gan_weight, True,
                                               upkeep and replace, upkeep, device))


def imagenet_flops(batch, quick):
    """FLOPs (conv + matmul, torch.utils.flop_counter, fp32 eager on the CPU: no machine changes
    them) of one train_imagenet.py step with a replacement call, NSVQ and SimVQ."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for quantizer in ("nsvq", "simvq"):
        _, step = steady_trainer(quantizer, "none", False, torch.device("cpu"), quick, batch)
        with FlopCounterMode(display=False) as counter:
            step(True)
        flops[quantizer] = counter.get_total_flops()
    print(f"FLOPs per step, {'tiny' if quick else 'paper'} preset, batch {batch} (conv + matmul):"
          f" NSVQ {flops['nsvq'] / 1e12:.3f} T, SimVQ {flops['simvq'] / 1e12:.3f} T, "
          f"ratio {flops['nsvq'] / flops['simvq']:.3f}")
    return flops


def imagenet_steps(device, batch, repeats, quick):
    """train_imagenet.py's own train_step in the steady state of stage 1, at `batch` images per
    device (the paper: 4 GPUs x 32), NSVQ and SimVQ, in fp32 eager, bf16 eager and bf16 +
    compile (quick: the tiny preset, eager only). Each timed unit is one replacement cycle
    (--replace-every steps, replacement on the first), reported per step; plus the FLOPs."""
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = [("none", False), ("bf16", False)] + ([] if quick else [("bf16", True)])
    rows = []
    for quantizer in ("nsvq", "simvq"):
        for amp, compile_ in runs:  # compiling takes about a minute
            cfg, step = steady_trainer(quantizer, amp, compile_, device, quick, batch)

            def cycle():
                for i in range(cfg.replace_every):
                    step(i == 0)
            cycle()  # warm-up (and compilation)
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time_round_robin({"c": cycle}, repeats, device.type)["c"] / cfg.replace_every
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
            rows.append({"quantizer": quantizer, "amp": amp, "compile": compile_,
                         "ms": t * 1e3, "img_per_s": batch / t, "peak_gib": mem})
    name = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    print(f"\ntrain_imagenet.py train_step, {'tiny' if quick else 'paper'} preset, batch {batch} "
          f"per device, {device}{name}, steady state, replacement every {cfg.replace_every} "
          f"steps\n")
    print("| quantizer | run | ms/step | img/s | peak GiB | time x SimVQ |\n"
          "|---|---|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        simvq = rows[len(runs) + i % len(runs)]  # the same run with SimVQ
        run = f"{r['amp']}{' + compile' if r['compile'] else ''}"
        print(f"| {r['quantizer']} | {run} | {r['ms']:.0f} | {r['img_per_s']:.1f} "
              f"| {r['peak_gib']:.2f} | {r['ms'] / simvq['ms']:.2f} |")
    return {"rows": rows, "flops": imagenet_flops(batch, quick), "batch": batch}


def loader_rate(data, workers, batch, batches=12):
    """Images per second of train_imagenet.py's training loader alone (decode, resize, crop),
    for sizing --workers; the first batch, which pays for the workers' start, is not timed."""
    cfg = ti.resolve(ti.make_config("paper", data=data, workers=workers, batch_size=batch,
                                    device="cpu"))
    t0, n = None, 0
    for i, (images, _) in enumerate(ti.make_loader(cfg, "train", 0, 1, train=True)):
        t0, n = (time.time(), 0) if i == 1 else (t0, n + len(images))
        if i == batches:
            break
    rate = n / (time.time() - t0)
    print(f"loader: {rate:.0f} images/s with {workers} workers "
          f"({rate / max(workers, 1):.0f} per worker)")
    return rate


def checkpoint_seconds(out, quick):
    """Seconds of train_imagenet.py's synchronous checkpoint, paper preset (tiny with quick):
    weights, weight EMA, critic, Adam moments, scalers and a full latent pool, to `out`."""
    cfg = ti.resolve(ti.make_config("tiny" if quick else "paper", data="-", out=out,
                                    perceptual_weight=0.0, device="cpu"))
    trainer = ti.build_trainer(cfg, torch.device("cpu"), None)
    for opt in (trainer.opt, trainer.opt_d):  # Adam's moments exist after a first step
        for p in opt.param_groups[0]["params"]:
            opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
    os.makedirs(out, exist_ok=True)
    state, t0 = {"epoch": 0, "batch": 0, "step": 0, "bad_steps": 0}, time.perf_counter()
    path = ti.save_checkpoint(cfg, trainer, nsvq.StageSchedule(), state, torch.zeros(2), 1,
                              torch.device("cpu"), lambda *a: None)
    seconds, size = time.perf_counter() - t0, os.path.getsize(path) / 2 ** 30
    print(f"checkpoint: {size:.2f} GiB in {seconds:.1f} s ({path})")
    return {"seconds": seconds, "gib": size}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--repeats", type=int, default=9, help="warm runs per timing (median)")
    add("--quick", action="store_true", help="small sizes, for a smoke test")
    add("--json", default=None, help="also write the results to this file")
    add("--imagenet", action="store_true", help="time train_imagenet.py's training step")
    add("--batch", type=int, default=32, help="images per device (the paper: 32)")
    add("--flops", action="store_true", help="count the FLOPs of train_imagenet.py's step "
        "(any machine; a few minutes on a CPU at the paper preset)")
    add("--loader", metavar="DIR", help="time train_imagenet.py's loader on DIR/train")
    add("--workers", type=int, default=1, help="--loader: DataLoader workers")
    add("--checkpoint", metavar="DIR", help="time one paper-preset checkpoint written to DIR")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    for name, low in (("repeats", 1), ("batch", 1), ("workers", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.checkpoint and os.path.exists(args.checkpoint) and not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint} is a file: name a folder")
    if args.loader and not os.path.isdir(os.path.join(args.loader, "train")):
        parser.error(f"--loader {args.loader} holds no train/ folder of images")
    if args.json:  # found out now, not after minutes of benchmarking
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"cannot write {args.json}: {folder} is not a writable folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.loader:
        result = loader_rate(args.loader, args.workers, args.batch)
    elif args.checkpoint:
        result = checkpoint_seconds(args.checkpoint, args.quick)
    elif args.flops:
        result = imagenet_flops(args.batch, args.quick)
    elif args.imagenet:
        result = imagenet_steps(args.device, args.batch, args.repeats, args.quick)
    else:
        result = quantizer_table(args)
    if args.json:  # whole or not at all
        ti.write_atomic(args.json, lambda tmp: json.dump(result, open(tmp, "w"), indent=1))


if __name__ == "__main__":
    main()
