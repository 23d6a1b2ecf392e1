"""
bench.py -- speed and memory of the quantizers, printed as a markdown table.

    python bench.py                  # CPU, the sizes the targets name (a few minutes)
    python bench.py --device cuda    # the same on a GPU
    python bench.py --quick          # small sizes, a few seconds (used by the tests)
    python bench.py --imagenet --device cuda   # the GPU check of train_imagenet.py (~5 min)

Targets (issue 2), medians of >= 5 warm runs, forward + backward of the whole quantizer:
  - NSVQ <= 1.5x the STE quantizer at N=8192, K=16384, D=16 (both use the same chunked search);
  - NSVQ >= 20x faster than the dense loss written with a materialised (chunk, K, D) tensor;
  - NSVQ at N=16384, K=65536, D=64 under 2 GB peak memory (RSS on CPU, measured in a fresh
    subprocess; max_memory_allocated on CUDA).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

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


def time_it(fn, repeats, device):
    """Median seconds of `repeats` warm runs (one warm-up run first)."""
    return time_round_robin({"fn": fn}, repeats, device)["fn"]


def time_round_robin(fns, repeats, device):
    """Median seconds of `repeats` warm runs of each function, taken in turns (one warm-up run
    each first). Why in turns: on a shared VM the speed drifts by +-20% over a minute, and
    timing one function after the other would put that drift into their ratio."""
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
    """Peak memory (bytes) of one NSVQ forward+backward, in a fresh interpreter."""
    code = (f"import torch, resource, json, nsvq\n"
            f"vq = nsvq.NSVQ({K}, {D}).to('{device}')\n"
            f"z = torch.randn({N}, {D}, device='{device}', requires_grad=True)\n"
            f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            f"out = vq(z); sum(out.losses.values()).backward()\n"
            f"peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            f"gpu = torch.cuda.max_memory_allocated() if '{device}' == 'cuda' else 0\n"
            f"print(json.dumps({{'rss': peak, 'rss_before': base, 'gpu': gpu}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def imagenet_steps(device, steps, batch, quick):
    """Training-step time and peak memory of train_imagenet.py's paper preset on synthetic data.

    Rows: NSVQ in fp32 eager, bf16 eager, bf16 + compile; SimVQ in bf16 + compile. Randomly
    initialised LPIPS (the weights do not change the cost). Targets (issue 4): NSVQ <= 1.10x
    SimVQ's step time and <= 1.05x its memory.
    """
    import train_imagenet as ti
    import metrics
    preset = ti.PRESETS["tiny"] if quick else {}
    rows = []
    for quantizer, amp, compile_ in [("nsvq", "none", False), ("nsvq", "bf16", False),
                                     ("nsvq", "bf16", True), ("simvq", "bf16", True)]:
        cfg = ti.Config(**{**preset, "quantizer": quantizer, "amp": amp, "compile": compile_})
        torch.manual_seed(0)
        model = ti.Autoencoder(cfg).to(device)
        disc = ti.make_discriminator().to(device)
        lpips = metrics.LPIPS("random", "random").to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
        run_model = torch.compile(model) if compile_ else model
        run_disc = torch.compile(disc) if compile_ else disc
        x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1

        def step():
            with ti.autocast(cfg, torch.device(device)):
                x_hat, z_e, out = run_model(x)
                loss = ((x_hat.float() - x).abs().mean() + lpips(x_hat, x).mean()
                        + sum(out.losses.values()) + 0.1 * F.softplus(-run_disc(x_hat).float()).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with ti.autocast(cfg, torch.device(device)):
                d_loss = (F.relu(1 - run_disc(x).float()).mean()
                          + F.relu(1 + run_disc(x_hat.detach()).float()).mean())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            model.vq.update_(z_e.detach().float(), out.indices)
            if quantizer == "nsvq":
                model.vq.replace_dead_codes_()

        for _ in range(3):  # warm-up (and compilation)
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time_it(step, steps, device)
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
        name = f"{quantizer} {amp}{' + compile' if compile_ else ''}"
        rows.append((name, t, batch / t, mem))
    print(f"\ntrain_imagenet.py step, batch {batch} per device, {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "") + "\n")
    print("| run | ms/step | img/s | peak GiB |\n|---|---:|---:|---:|")
    for name, t, ips, mem in rows:
        print(f"| {name} | {t * 1e3:.0f} | {ips:.0f} | {mem:.1f} |")
    print(f"\nNSVQ / SimVQ (bf16 + compile): time {rows[2][1] / rows[3][1]:.2f}x (target <= 1.10), "
          f"memory {rows[2][3] / rows[3][3]:.2f}x (target <= 1.05)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9, help="warm runs per timing (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--imagenet", action="store_true", help="time train_imagenet.py steps instead")
    parser.add_argument("--batch", type=int, default=32, help="--imagenet: images per step")
    args = parser.parse_args()
    device = args.device
    if args.imagenet:
        return imagenet_steps(device, args.repeats, args.batch, args.quick)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # distances at full fp32 precision
    N, K, D = (512, 1024, 16) if args.quick else (8192, 16384, 16)
    mem_N, mem_K, mem_D = (1024, 4096, 64) if args.quick else (16384, 65536, 64)
    rows = []

    torch.manual_seed(0)
    z_e = torch.randn(N, D, device=device, requires_grad=True)  # (B=N, D): no spatial dims
    steps = {name: quantizer_step(cls(K, D, **kw).to(device), z_e) for name, cls, kw in [
        ("STE (VectorQuantizer)", nsvq.VectorQuantizer, {}), ("EMA", nsvq.EMAVectorQuantizer, {}),
        ("SimVQ", nsvq.SimVQ, {}), ("NSVQ softmax", nsvq.NSVQ, {}),
        ("NSVQ clamped", nsvq.NSVQ, {"weighting": "clamped"})]}
    times = time_round_robin(steps, args.repeats, device)
    t_ste, t_nsvq = times["STE (VectorQuantizer)"], times["NSVQ softmax"]
    rows += [(name, N, K, D, t, t / t_ste) for name, t in times.items()]

    codebook = torch.randn(K, D, device=device, requires_grad=True)
    zd = z_e.detach()
    t_naive = time_it(lambda: naive_dense_loss(zd, codebook, 0.35), args.repeats, device)
    rows.append(("naive (chunk, K, D) dense loss", N, K, D, t_naive, t_naive / t_ste))

    print(f"\ndevice: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"forward+backward, median of {args.repeats} warm runs\n")
    print("| quantizer | N | K | D | ms | x STE |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, k, d, t, ratio in rows:
        print(f"| {name} | {n} | {k} | {d} | {t * 1e3:.1f} | {ratio:.2f} |")
    mem = peak_memory(mem_N, mem_K, mem_D, device)
    key = "gpu" if device == "cuda" else "rss"
    print(f"\nNSVQ / STE: {t_nsvq / t_ste:.2f}x (target <= 1.5); "
          f"naive / NSVQ: {t_naive / t_nsvq:.1f}x (target >= 20)")
    print(f"NSVQ peak memory at N={mem_N}, K={mem_K}, D={mem_D}: {mem[key] / 2**30:.2f} GiB "
          f"({'GPU allocated' if key == 'gpu' else 'process RSS'}; target < 2 GB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "peak_memory": mem, "device": device}, f, indent=1)


if __name__ == "__main__":
    main()
