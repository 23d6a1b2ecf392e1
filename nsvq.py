"""
nsvq.py -- vector quantizers for VQ autoencoders, and NSVQ, a training method that keeps a
large codebook alive while the encoder that feeds it keeps moving.

Paper: "NSVQ" (arXiv 2606.11363). Not to be confused with Noise-Substitution VQ (Vali &
Backstrom, 2022), which shares the acronym. The paper's diagnosis is *encoder drift*: the
encoder moves its latents every step, but a plain VQ layer only pulls the winning code
towards them, so the other codes lag behind, lose their assignments and die. NSVQ answers
with three parts: (1) a dense, non-stationary embedding loss that pulls *every* code towards
nearby latents, (2) re-seeding of codes that stop being used, (3) stage-wise training that
freezes the encoder once it has settled, fits the codebook and decoder to the now fixed
latents, and only then adds the adversarial loss. This file holds (1) and (2), the schedule
for (3), the baselines it is compared with, and the diagnostics that show drift and collapse.

Notation (paper -> code -> shape):

    K          codebook_size / K          number of codes
    D          dim / D                    code dimension
    z_e        z_e                        encoder output, channel first (B, D, *spatial)
    z          z                          the same latents flattened, (N, D), N = B*H*W
    c_k        codebook[k]                code k; the codebook is (K, D)
    q_i        indices                    winning code of latent i, (N,) or (B, *spatial)
    z_q        z_q                        quantized latents, same shape as z_e
    d_ij       distances                  ||z_i - c_j||^2, (N, K), only ever built in row chunks
    p_ij       -                          softmax_j(-d_ij / tau), the kernel over all K codes
    w_ij       -                          stop-gradient weight of code j for latent i
    beta       beta                       commitment weight
    alpha      alpha                      weight of the dense loss L_NS
    tau        tau                        kernel temperature (absolute, or relative to the
                                          batch's mean squared distance to the nearest code)
    lambda     lam                        clamp scale of the "clamped" weighting
    u_k        upkeep.usage[k]            moving share of assignments of code k (uniform: 1/K)

Contents:
    1. Helpers: checks, shapes, the chunked fp32 nearest-code search
    2. The dense non-stationary loss (part 1 of the method)
    3. Usage and replacement (part 2): CodebookUpkeep, reset_adam_state_
    4. Baselines: VectorQuantizer (STE), EMAVectorQuantizer, SimVQ
    5. NSVQ: the STE quantizer plus the dense loss; NSSimVQ, SimVQ's codebook with it
    6. The stage schedule (part 3)
    7. Diagnostics: utilization, perplexity, drift, churn, kernel mass
    8. The 2-D toy demo (python nsvq.py)

Only torch is imported at module level; the demo imports matplotlib when it runs.
"""

import math
import numbers
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WEIGHTINGS = ("softmax", "clamped")
TAU_MODES = ("absolute", "relative")
REPLACE_FROM = ("latents", "codes")


# -----------------------------------------------------------------------------
# 1. Helpers: checks, shapes, the chunked fp32 nearest-code search
# -----------------------------------------------------------------------------

def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError unless `value` is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def check_count(name, value, low):
    """Raise ValueError unless `value` is an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def check_tau(tau):
    """tau > 0, and small enough a tau that log2(e) / tau still fits in a float."""
    check_number("tau", tau, low=0, low_open=True)
    if not math.log2(math.e) / tau < 1e30:
        raise ValueError(f"tau must be >= 1e-30 (the kernel's scores log2(e)/tau overflow), got {tau}")


class QuantizerOutput(NamedTuple):
    """What every quantizer's forward returns.

    z_q:         quantized latents, same shape and dtype as z_e; gradient reaches z_e straight
                 through.
    indices:     int64 (B, *spatial), the winning code of each latent.
    losses:      dict of already-weighted scalar terms with a fixed set of keys per class, so
                 that sum(out.losses.values()) is always the quantizer's whole loss.
    diagnostics: dict of detached scalar tensors that are not losses (NSVQ: "kernel_mass",
                 "tau"); empty for the baselines. Never summed into the loss.
    """
    z_q: torch.Tensor
    indices: torch.Tensor
    losses: dict
    diagnostics: dict


def flatten_latents(z_e, dim):
    """Check channel-first latents (B, D, *spatial) and return them as rows z of shape (N, D).

    Half-precision inputs (autocast) are promoted to fp32: distances and losses are computed in
    fp32, or in fp64 when the input is fp64 (the tests' oracles).
    """
    if not isinstance(z_e, torch.Tensor):
        raise TypeError(f"z_e must be a torch.Tensor, got {type(z_e).__name__}")
    if not z_e.is_floating_point():
        raise TypeError(f"z_e must be a floating-point tensor, got dtype {z_e.dtype}")
    if z_e.dim() < 2:
        raise ValueError(f"z_e must be channel-first (B, D, *spatial) with at least 2 dims, "
                         f"got shape {tuple(z_e.shape)}")
    if z_e.shape[1] != dim:
        raise ValueError(f"z_e has {z_e.shape[1]} channels (dim 1) but the codebook dim is {dim}; "
                         f"quantizers take channel-first latents (B, D, *spatial), "
                         f"got shape {tuple(z_e.shape)}")
    if z_e.numel() == 0:
        raise ValueError(f"z_e is an empty batch, shape {tuple(z_e.shape)}: nothing to quantize")
    z = z_e.movedim(1, -1).reshape(-1, dim)  # (N, D)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def unflatten_latents(z, z_e):
    """Inverse of flatten_latents: rows (N, D) back to z_e's layout (B, D, *spatial)."""
    B, D, *spatial = z_e.shape
    return z.reshape(B, *spatial, D).movedim(-1, 1)  # (B, D, *spatial)


def check_indices(indices, K, n=None):
    """Indices must be an integer tensor (with n entries, if given) of values in [0, K).

    The range is checked on the CPU only: on a GPU the check would wait for the device every
    step (an out-of-range index there fails in the index_add_ that counts usage).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32 or int64 tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if n is not None and indices.numel() != n:
        raise ValueError(f"indices has {indices.numel()} entries but z_e holds {n} latents")
    if not indices.is_cuda and indices.numel() and (indices.min() < 0 or indices.max() >= K):
        raise ValueError(f"indices must lie in [0, {K}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def default_chunk_size(K, device):
    """Rows of z per search chunk, so that one (chunk, K) block stays small.

    Why: on a CPU a block of ~2**18 floats (1 MiB) stays in cache between the passes over it
    (8 to 128 rows tried at K = 16384: 16 to 64 equally fast, 8 and 128 slower); on a GPU
    bigger blocks keep the device busy, and 2**26 floats (256 MiB) is a few chunks per step at
    the ImageNet sizes.
    """
    budget = 2 ** 26 if torch.device(device).type == "cuda" else 2 ** 18
    return max(8, budget // max(K, 1))


def _row_max(scores, block=64):
    """(values, indices) of the largest entry of each row: torch.max(scores, 1), faster on CPU.

    Why: on a CPU torch's argmax/max along a row is a scalar loop (~1 ns per element here),
    while amax is vectorized. So take the max of each block of 64 entries (vectorized), the
    argmax over the few block maxima, then the argmax inside the winning block. The result is
    the same as torch.max, ties going to the lowest index. Shapes: (n, K) -> (n,), (n,).
    """
    n, K = scores.shape
    if K % block or K < 2 * block:
        return scores.max(1)
    blocks = scores.view(n, K // block, block)
    block_max = blocks.amax(2)  # (n, K/block)
    values, b = block_max.max(1)
    inner = blocks[torch.arange(n, device=scores.device), b].argmax(1)  # (n,)
    return values, b * block + inner


@torch.no_grad()
def _search(z, codebook, tau=None, weighting="softmax", lam=0.01, indices=None, chunk_size=None):
    """The one chunked pass over z that every quantizer uses: nearest code and, if tau is
    given, the statistics of the dense loss.

    Nearest code:  q_i = argmin_j ||z_i - c_j||^2 = argmax_j (2 z_i.c_j - ||c_j||^2), since
    ||z_i||^2 is the same for every j. With tau, the same block of scores, divided by tau, is
    the kernel's logits: p_ij = softmax_j(-d_ij / tau) = softmax_j((2 z_i.c_j - ||c_j||^2) / tau),
    because the constant ||z_i||^2 / tau cancels in the softmax. From p come the weights w_ij (winner
    excluded) and their sums

        S_k = sum_i w_ik z_i,   W_k = sum_i w_ik,   C_k = sum_i w_ik ||z_i||^2     ((K, D+2))

    accumulated with one GEMM per chunk, from which section 2 forms the loss. The softmax is
    never normalised in place: with m_i the row maximum (found by the search anyway) and
    e_ij = 2^(scores_ij - m_i) (scores in log2 units: log2(e)/tau is folded into the codebook
    side of the first GEMM, so tau may be a float or a 0-d tensor), p_ij = e_ij / s_i with
    s_i = sum_j e_ij, so 1/s_i scales the rows of [z, 1, ||z||^2] (N*(D+2) numbers) instead of
    the (chunk, K) block. So on top of the search the dense loss costs one exp2 pass, one sum
    and one GEMM per block.
    Memory is O(chunk*K + K*D) whatever N is; no (N, K) or (chunk, K, D) tensor is built.
    Shapes: z (N, D), codebook (K, D) -> indices (N,) int64, stats (K, D+2) or None.
    Why fp32: in bf16 the cancellation in ||z||^2 - 2 z.c + ||c||^2 decides near-ties wrongly,
    so autocast is switched off here. On CUDA also keep TF32 off for matmuls
    (torch.backends.cuda.matmul.allow_tf32 = False, PyTorch's default): TF32 would give these
    products a 10-bit mantissa.
    """
    N, D = z.shape
    K = codebook.shape[0]
    chunk = chunk_size or default_chunk_size(K, z.device)
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        z, codebook = z.to(dtype), codebook.to(dtype)
        # scores_ij = s (2 z_i.c_j - ||c_j||^2), s = log2(e) / tau (s = 1 without tau); larger is nearer.
        s = 1.0 if tau is None else math.log2(math.e) / tau
        c_side = (2 * s) * codebook  # (K, D)
        bias = -s * codebook.pow(2).sum(1)  # (K,)
        winners = torch.empty(N, dtype=torch.long, device=z.device) if indices is None else indices
        stats = None
        if tau is not None:
            # Each row of z_aug is [z_i, 1, ||z_i||^2]: one GEMM z_aug^T w gives S, W and C at once.
            z_aug = torch.cat([z, z.new_ones(N, 1), z.pow(2).sum(1, keepdim=True)], 1)  # (N, D+2)
            stats = z.new_zeros(D + 2, K)  # transposed: the GEMM below runs faster this way round
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            scores = torch.addmm(bias, z[rows], c_side.T)  # (n, K)
            row_max, nearest = _row_max(scores)  # (n,), (n,)
            if indices is None:
                winners[rows] = nearest
            if tau is None:
                continue
            q = winners[rows, None]  # (n, 1)
            # e_ij = p_ij * s_i, in place. Why the clamp: weights below 2^-100 of the row's largest
            # do not matter, but exp2 would make subnormal numbers of them, and the CPU GEMM below
            # runs ~20x slower on those (a one-hot kernel at N = 4096, K = 8192: 1.3 s vs 70 ms).
            e = scores.sub_(row_max[:, None]).clamp_(min=-100.0).exp2_()  # (n, K)
            s_row = e.sum(1, keepdim=True)  # (n, 1)
            if weighting == "clamped":  # w = min(1, lam*K*p) = (lam*K / s) * min(e, s / (lam*K))
                e = torch.minimum(e, s_row / (lam * K), out=e)
                row_scale = (lam * K) / s_row
            else:  # w = p = e / s
                row_scale = 1.0 / s_row
            e.scatter_(1, q, 0.0)  # the winner's own term is excluded
            stats.addmm_(z_aug[rows].mul(row_scale).T, e)  # (D+2, K)
    return winners, None if stats is None else stats.T


def nearest_code(z, codebook, chunk_size=None):
    """Index of the nearest code for each row: q_i = argmin_j ||z_i - c_j||^2.

    Shapes: z (N, D), codebook (K, D) -> (N,) int64. Chunked and fp32, see _search.
    """
    return _search(z, codebook, chunk_size=chunk_size)[0]


# -----------------------------------------------------------------------------
# 2. The dense non-stationary loss (part 1 of the method)
# -----------------------------------------------------------------------------

class DenseLoss(NamedTuple):
    """Result of search_and_dense_loss: winners, the (unweighted) loss and two diagnostics."""
    indices: torch.Tensor  # (N,) int64
    loss: torch.Tensor     # scalar; gradient reaches the codebook only
    mass: torch.Tensor     # scalar, mean over latents of sum_{j != q_i} w_ij (no grad)
    tau: torch.Tensor      # scalar, the temperature used, in squared-distance units (no grad)


@torch.no_grad()
def mean_quantization_error(z, codebook, indices):
    """mean_i ||z_i - c_{q_i}||^2, computed from the differences (no cancellation). Scalar."""
    return (z - codebook[indices].to(z.dtype)).pow(2).sum(1).mean()


def search_and_dense_loss(z, codebook, tau, weighting="softmax", lam=0.01, indices=None,
                          chunk_size=None, tau_mode="absolute"):
    """Nearest codes and the dense non-stationary loss L_NS in one chunked pass (paper, part 1).

        L_NS = 1/(N*D) * sum_i sum_{j != q_i} w_ij * ||sg(z_i) - c_j||^2
        p_ij = softmax_j(-||z_i - c_j||^2 / T)        over all K codes
        T    = tau                                    tau_mode="absolute" (the paper, as best known)
        T    = tau * mean_i ||z_i - c_{q_i}||^2       tau_mode="relative" (ours; scale-free)
        w_ij = sg(p_ij)                               weighting="softmax" (the paper, as best known)
        w_ij = sg(min(1, lam*K*p_ij))                 weighting="clamped" (the authors' earlier code)

    Every code is pulled towards the latents that are near it, in proportion to how near, so
    codes that are not winning anything still follow the encoder as it drifts. The winner's own
    term is left out: the ordinary codebook term already trains it.
    Why a relative T: an absolute T is in squared-distance units, so the same number is a
    uniform pull for small latents and a one-hot (inert) kernel for large ones; measured in
    units of the batch's own quantization error it means the same at any latent scale. It
    costs one more search pass (T must be known before the kernel's exponentials).
    With w and z constant the sum expands to
        sum_k W_k ||c_k||^2 - 2 sum_k c_k . S_k + sum_k C_k
    so only the (K, D+2) statistics from _search are needed, and the gradient
    dL/dc_k = 2 (W_k c_k - S_k) / (N*D) reaches the codebook only.
    If indices is given those are the winners excluded; otherwise the nearest codes are.
    Shapes: z (N, D), codebook (K, D), indices (N,) or None.
    """
    check_tau(tau)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("tau_mode", tau_mode, TAU_MODES)
    N, D = z.shape
    z_sg, c_sg = z.detach(), codebook.detach()
    if tau_mode == "relative":
        if indices is None:
            indices = nearest_code(z_sg, c_sg, chunk_size)
        tau = tau * mean_quantization_error(z_sg, c_sg, indices).clamp(min=1e-12)
    indices, stats = _search(z_sg, c_sg, tau, weighting, lam, indices, chunk_size)
    c = codebook.to(stats.dtype)
    S, W, C = stats[:, :D], stats[:, D], stats[:, D + 1]  # (K, D), (K,), (K,)
    loss = ((W * c.pow(2).sum(1)).sum() - 2 * (S * c).sum() + C.sum()) / (N * D)
    return DenseLoss(indices, loss, W.sum() / N, torch.as_tensor(tau, dtype=stats.dtype))


def non_stationary_loss(z, codebook, indices, tau, weighting="softmax", lam=0.01, tau_mode="absolute"):
    """L_NS for given winners, as a readable entry point (same routine as NSVQ's forward).

    Shapes: z (N, D), codebook (K, D), indices (N,) -> scalar. See search_and_dense_loss.
    """
    return search_and_dense_loss(z, codebook, tau, weighting, lam, indices, tau_mode=tau_mode).loss


# -----------------------------------------------------------------------------
# 3. Usage and replacement (part 2 of the method)
# -----------------------------------------------------------------------------

def _distributed():
    return dist.is_available() and dist.is_initialized()


def _rank():
    return dist.get_rank() if _distributed() else 0


class CodebookUpkeep(nn.Module):
    """Usage tracking and dead-code replacement (paper, part 2); every quantizer owns one.

        u_k  <- u_k + w (n_k / n - u_k),   w = min(1, n / (K * usage_horizon))
        dead  = {k : u_k < threshold / K}

    n_k: latents assigned to code k in this call, summed over all ranks; n = sum_k n_k.
    Why w = n / (K * H): it makes u a moving average over the last ~K*H assignments, i.e. over
    H *expected assignments per code*, so "dead" means the same at any batch size, world size
    and K. (An EMA per call would not: the same decay spans ~61 assignments per code on MNIST
    and ~5 at the paper's scale, where live but rarely chosen codes were then re-seeded.) An
    unused code falls from the uniform share 1/K below threshold / K after ln(1/threshold) * H
    expected assignments per code: 295 with the defaults, 48 steps on MNIST (6 latents per code
    per step), 590 steps at the paper's scale (0.5).
    With replace_from="latents" a code that has never been seeded from data (the initial
    codebook) is replaced whatever its usage, so the first calls initialise the whole codebook
    from encoder outputs. A re-seeded code restarts at u = 1/K and has to lose that share to
    die again. Warning (measured, EXPERIMENTS.md section 12): called every step, those first
    calls seed the whole codebook from the latents of an encoder that has taken at most three
    steps, and at the paper's ratio that cost 20% in test MSE for good; every 10 steps (a
    quarter at step 0, the rest at step 10) or one more seeding of every code at step ~10 avoids it.

    New codes come from a pool of recent encoder outputs (replace_from="latents", the authors'
    earlier code), or from live codes chosen in proportion to usage plus Gaussian noise of
    noise * RMS(codebook) (replace_from="codes", the paper's description). No vector is ever
    written into two codes: the pool hands out each latent once, and a candidate that equals
    an existing code or an earlier candidate (flat image regions encode to identical latents)
    is retired. When there are fewer usable candidates than dead codes, as many codes as there
    are candidates are re-seeded and the rest stay dead until the next call.

    Arguments:
        codebook_size, dim  K and D.
        replace_from        "latents" | "codes", as above.
        noise               replace_from="codes": noise std relative to the codebook's RMS.
        usage_horizon       H, in expected assignments per code (64: MNIST's measured setting).
        buffer_size         pool capacity in latents (None: K, so a whole codebook can be
                            seeded from distinct latents; 0: no pool). Each call adds about
                            capacity / 4 latents, drawn evenly from all ranks (all_gather), so
                            the pool is the same on every rank and turns over every ~4 calls.
    Under DDP every rank must call with the same number of latents (DDP's equal batches).
    """

    def __init__(self, codebook_size, dim, replace_from="latents", noise=0.01, usage_horizon=64.0,
                 buffer_size=None):
        super().__init__()
        check_choice("replace_from", replace_from, REPLACE_FROM)
        check_number("noise", noise, low=0)
        check_number("usage_horizon", usage_horizon, low=0, low_open=True)
        capacity = codebook_size if buffer_size is None else buffer_size
        check_count("buffer_size", capacity, 0)
        self.replace_from, self.noise, self.usage_horizon = replace_from, noise, float(usage_horizon)
        self.register_buffer("usage", torch.zeros(codebook_size))  # (K,), sums to 1 once warm
        # Seeded from data yet? With replace_from="codes" there is no data to seed from, so the
        # initial codes count as seeded and only usage decides.
        self.register_buffer("seeded", torch.full((codebook_size,), replace_from == "codes"))
        self.register_buffer("latent_pool", torch.zeros(capacity, dim))  # (capacity, D)
        self.register_buffer("pool_fresh", torch.zeros(capacity, dtype=torch.bool))  # not yet used
        self.register_buffer("pool_written", torch.zeros((), dtype=torch.long))  # latents ever added

    @torch.no_grad()
    def observe_(self, z, indices, refill=True):
        """Count this call's assignments into usage and (refill=True) add some latents to the pool.

        Latents with a non-finite value (a skipped training step) are ignored: they are not
        counted and never enter the pool. refill=False skips the pool and its all_gather, for
        calls after which no code will be replaced (e.g. once replacement is switched off).
        Shapes: z (N, D), indices (N,) -> counts (K,).
        """
        K = self.usage.numel()
        ok = torch.isfinite(z).all(1)  # (N,)
        counts = torch.zeros_like(self.usage).index_add_(0, indices.reshape(-1), ok.to(self.usage.dtype))
        if _distributed():
            dist.all_reduce(counts)
        n = counts.sum()
        weight = (n / (K * self.usage_horizon)).clamp(max=1.0)
        self.usage.lerp_(counts / n.clamp(min=1), weight)
        capacity = len(self.latent_pool)
        if refill and capacity and self.replace_from == "latents":
            world = dist.get_world_size() if _distributed() else 1
            take = min(len(z), -(-capacity // (4 * world)))  # this rank's share of the refill
            mine = z[torch.randperm(len(z), device=z.device)[:take]].to(self.latent_pool.dtype)
            if world > 1:
                parts = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(parts, mine.contiguous())
                mine = torch.cat(parts)  # (world*take, D), the same on every rank
            rows = mine[-capacity:]
            slots = (self.pool_written + torch.arange(len(rows), device=rows.device)) % capacity
            self.latent_pool[slots] = rows
            self.pool_fresh[slots] = torch.isfinite(rows).all(1)
            self.pool_written += len(rows)
        return counts

    def dead(self, threshold=0.01):
        """Boolean mask (K,) of the codes whose usage is below threshold / K."""
        return self.usage < threshold / self.usage.numel()

    @torch.no_grad()
    def reseed_(self, codebook, threshold=0.01):
        """Choose new vectors for the dead and the never-seeded codes: returns (codes, new),
        (n,) and (n, D).

        Rank 0 chooses and broadcasts, so every rank writes the same vectors (usage and the
        pool are already the same everywhere). Usage of the re-seeded codes restarts at 1/K.
        The number of dead codes is read on the host: each call waits for the device once.
        """
        check_number("threshold", threshold, low=0, high=1)
        K, D = codebook.shape
        mask = self.dead(threshold) | ~self.seeded  # (K,)
        # The one read from the device: how many codes to re-seed, and whether there is a source.
        n_dead, written, live = torch.stack([mask.sum(), self.pool_written, (self.usage > 0).sum()]).tolist()
        dead = torch.nonzero_static(mask, size=n_dead).squeeze(1)  # (n_dead,), no second wait
        if n_dead == 0:
            return dead, codebook.new_empty(0, D)
        if self.replace_from == "latents" and written == 0:
            raise RuntimeError("no latents seen yet: call update_(z_e, indices) before "
                               "replace_dead_codes_() when replace_from='latents'")
        if self.replace_from == "codes" and live == 0:
            raise RuntimeError("no live code to copy yet: call update_(z_e, indices) before "
                               "replace_dead_codes_() when replace_from='codes'")
        if self.replace_from == "latents":
            slots = torch.full_like(dead, -1)
            if _rank() == 0:
                slots = self._pick_pool_slots(dead.numel(), codebook)
            if _distributed():
                fresh = self.pool_fresh.to(torch.uint8)
                dist.broadcast(slots, src=0)
                dist.broadcast(fresh, src=0)
                self.pool_fresh.copy_(fresh.bool())
            filled = slots >= 0
            dead, new = dead[filled], self.latent_pool[slots[filled]].to(codebook.dtype)
        else:
            new = codebook.new_empty(dead.numel(), D)
            if _rank() == 0:
                new.copy_(self._noisy_live_codes(dead, codebook))
            if _distributed():
                dist.broadcast(new, src=0)
        self.usage[dead] = 1.0 / K
        self.seeded[dead] = True
        return dead, new

    def _pick_pool_slots(self, n, codebook):
        """Up to n pool slots holding distinct latents that equal no code; -1 pads. (n,)"""
        fresh = torch.nonzero(self.pool_fresh).squeeze(1)
        # Four candidates per dead code, in random order, so that copies rarely leave one unfilled.
        slots = fresh[torch.randperm(len(fresh), device=fresh.device)[: 4 * n]]  # (m,)
        picked = torch.full((n,), -1, dtype=torch.long, device=codebook.device)
        if len(slots) == 0:
            return picked
        rows = self.latent_pool[slots]  # (m, D)
        order = torch.arange(len(rows), device=rows.device)
        _, inverse = torch.unique(rows, dim=0, return_inverse=True)
        first = torch.full_like(order, len(rows)).scatter_reduce_(0, inverse, order, "amin")
        is_first = first[inverse] == order  # not a copy of an earlier candidate
        is_code = (codebook[nearest_code(rows, codebook)].to(rows.dtype) == rows).all(1)
        usable = slots[is_first & ~is_code][:n]
        self.pool_fresh[slots[~is_first | is_code]] = False  # copies are of no use, ever
        self.pool_fresh[usable] = False  # each latent is handed out once
        picked[: len(usable)] = usable
        return picked

    def _noisy_live_codes(self, dead, codebook):
        """Live codes drawn in proportion to usage, plus noise * RMS(codebook) noise. (n, D)"""
        weights = self.usage.clone()
        weights[dead] = 0.0
        if not bool(weights.sum() > 0):  # every code is dead: copy the least dead ones
            weights = self.usage
        source = torch.multinomial(weights, dead.numel(), replacement=True)  # (n,)
        rms = codebook.pow(2).mean().sqrt()
        return codebook[source] + self.noise * rms * torch.randn_like(codebook[source])


@torch.no_grad()
def reset_adam_state_(optimizer, param, indices):
    """Zero Adam's moments for the given rows of param (e.g. codes just replaced).

    Why: a re-seeded code should not inherit the momentum of the dead code it replaces.
    Works for Adam and AdamW (exp_avg, exp_avg_sq, max_exp_avg_sq when amsgrad).
    """
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key][indices] = 0.0


# -----------------------------------------------------------------------------
# 4. Baselines: VectorQuantizer (STE), EMAVectorQuantizer, SimVQ
# -----------------------------------------------------------------------------

class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer (van den Oord et al., 2017) with a codebook trained by gradient.

        codebook = ||sg(z_e) - z_q||^2          moves the winning codes towards the latents
        commit   = beta * ||z_e - sg(z_q)||^2   keeps the encoder near its codes
        z_q      = sg(z_q) + z_e - sg(z_e)      straight-through estimator for the decoder path

    beta sits on the commitment term, as in the paper's eq. 3; several popular codebases put it
    on the codebook term instead, which slows the codebook down rather than the encoder.
    Upkeep (after optimizer.step()): update_ counts usage and fills the latent pool;
    replace_dead_codes_ re-seeds codes whose usage fell below threshold / K (CodebookUpkeep).

    Arguments:
        codebook_size, dim  K and D.
        beta                commitment weight (VQ-VAE's 0.25).
        replace_from, noise, usage_horizon, buffer_size
                            passed to CodebookUpkeep (section 3).
        chunk_size          rows per search chunk (None: default_chunk_size).
    Shapes: z_e (B, D, *spatial) -> z_q (B, D, *spatial), indices (B, *spatial).
    """

    codebook_by_gradient = True  # EMAVectorQuantizer moves its codes in update_ instead

    def __init__(self, codebook_size, dim, beta=0.25, replace_from="latents", noise=0.01,
                 usage_horizon=64.0, buffer_size=None, chunk_size=None):
        super().__init__()
        check_count("codebook_size", codebook_size, 1)
        check_count("dim", dim, 1)
        check_number("beta", beta, low=0)
        if chunk_size is not None:
            check_count("chunk_size", chunk_size, 1)
        self.codebook_size, self.dim, self.beta, self.chunk_size = codebook_size, dim, beta, chunk_size
        # VQ-VAE's initialisation; with replacement the first call re-seeds every code from data.
        K = codebook_size
        self.embedding = nn.Parameter(torch.empty(K, dim).uniform_(-1.0 / K, 1.0 / K))
        self.upkeep = CodebookUpkeep(K, dim, replace_from, noise, usage_horizon, buffer_size)

    @property
    def codebook(self):
        """The effective codebook, (K, D)."""
        return self.embedding

    def assign(self, z, codebook):
        """Winning codes (N,), extra loss terms and diagnostics; NSVQ overrides this one step."""
        return nearest_code(z, codebook, self.chunk_size), {}, {}

    def forward(self, z_e):
        z = flatten_latents(z_e, self.dim)                   # (N, D)
        codebook = self.codebook                             # (K, D)
        indices, extra, diagnostics = self.assign(z.detach(), codebook)  # (N,)
        z_q = F.embedding(indices, codebook).to(z.dtype)     # (N, D)
        losses = {}
        if self.codebook_by_gradient:
            losses["codebook"] = F.mse_loss(z_q, z.detach())
        losses["commit"] = self.beta * F.mse_loss(z, z_q.detach())
        losses.update(extra)
        # Straight-through: the value is exactly z_q (z - sg(z) is exactly 0), the gradient goes to z_e.
        z_q = z_q.detach() + (z - z.detach())
        z_q = unflatten_latents(z_q, z_e).to(z_e.dtype)
        return QuantizerOutput(z_q, indices.view(z_e.shape[0], *z_e.shape[2:]), losses, diagnostics)

    @torch.no_grad()
    def decode(self, indices):
        """Codes for given indices: (B, *spatial) int -> (B, D, *spatial)."""
        check_indices(indices, self.codebook_size)
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def update_(self, z_e, indices, refill=True):
        """Upkeep after optimizer.step(): usage and the latent pool (CodebookUpkeep.observe_).

        Call it with the z_e and indices of the forward just trained on. Returns the
        all-ranks assignment counts (K,). refill=False leaves the latent pool alone (and its
        all_gather out) where no replacement will follow.
        """
        z = flatten_latents(z_e.detach(), self.dim)  # (N, D)
        check_indices(indices, self.codebook_size, len(z))
        return self.upkeep.observe_(z, indices.reshape(-1).long(), refill)

    @torch.no_grad()
    def replace_dead_codes_(self, threshold=0.01):
        """Re-seed codes whose usage is below threshold / K (paper, part 2); return their indices.

        Live codes are not touched. Call it after update_, every few steps in stage 1 (once an
        epoch is too slow when the encoder drifts; EXPERIMENTS.md). Reset the re-seeded rows'
        optimizer state with reset_adam_state_.
        """
        dead, new = self.upkeep.reseed_(self.codebook.detach(), threshold)
        self._write_codes_(dead, new)
        return dead

    def _write_codes_(self, dead, new):
        self.embedding[dead] = new


class EMAVectorQuantizer(VectorQuantizer):
    """VQ-VAE-2 quantizer (Razavi et al., 2019): codes are moving averages of their latents.

        cluster_size_k <- decay * cluster_size_k + (1 - decay) * n_k        n_k = #latents on k
        embed_sum_k    <- decay * embed_sum_k    + (1 - decay) * sum_{q_i=k} z_i
        c_k = embed_sum_k / smoothed_k,  smoothed = (cluster_size + eps) / (n + K*eps) * n

    Laplace smoothing (eps) keeps an unused code from dividing by ~0. No codebook gradient and
    no "codebook" loss key; the commitment term is as in VectorQuantizer. Statistics start as
    one assignment per code at its initial value, so unused codes stay put instead of blowing up.
    Arguments: those of VectorQuantizer, plus decay in [0, 1) and eps > 0. decay is per call,
    so its memory in assignments depends on the scale: 0.8 (the most used VQ library's default)
    beats VQ-VAE-2's 0.99 on MNIST, but at half a latent per code per step codes starved of
    assignments shrink to the origin (EXPERIMENTS.md, section 4).
    Shapes: as VectorQuantizer.
    """

    codebook_by_gradient = False

    def __init__(self, codebook_size, dim, beta=0.25, decay=0.99, eps=1e-5, **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        check_number("decay", decay, low=0, high=1, high_open=True)
        check_number("eps", eps, low=0, low_open=True)
        self.decay, self.eps = decay, eps
        del self.embedding
        self.register_buffer("embedding", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.embedding.clone())

    @torch.no_grad()
    def update_(self, z_e, indices, refill=True):
        """The EMA step (plus usage); statistics are summed over all ranks. A call whose
        latents are all non-finite (a skipped step) leaves the codebook as it was."""
        counts = super().update_(z_e, indices, refill)  # (K,), all ranks, finite latents only
        z = flatten_latents(z_e.detach(), self.dim).to(self.embed_sum.dtype)  # (N, D)
        z = torch.where(torch.isfinite(z).all(1, keepdim=True), z, 0.0)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices.reshape(-1).long(), z)  # (K, D)
        if _distributed():
            dist.all_reduce(sums)
        step = (counts.sum() > 0).to(counts.dtype) * (1.0 - self.decay)  # 0: nothing seen, no change
        self.cluster_size.lerp_(counts, step)
        self.embed_sum.lerp_(sums, step)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        return counts

    def _write_codes_(self, dead, new):
        self.embedding[dead] = new
        self.embed_sum[dead] = new
        self.cluster_size[dead] = 1.0


class SimVQ(VectorQuantizer):
    """SimVQ (Zhu et al., arXiv 2411.02038): a frozen random basis times one learnable linear map.

        codebook = basis @ W^T + b,   basis ~ N(0, 1/D) frozen,  W, b learnable (nn.Linear)

    Every code moves whenever W moves, so no code can be left behind; the losses are those of
    VectorQuantizer and reach W, b. The codebook is recomputed in every forward, in fp32 even
    under autocast (as NSVQ's codebook is), and decode applies the linear map too (the official
    code's decode forgets to).
    No replace_dead_codes_: a code is a fixed basis row seen through the shared map, so there
    is no per-code parameter to re-seed (and changing the basis would move the map's meaning).
    Shapes: as VectorQuantizer.
    """

    def __init__(self, codebook_size, dim, beta=0.25, **kwargs):
        kwargs.setdefault("buffer_size", 0)  # no replacement, so no latent pool
        super().__init__(codebook_size, dim, beta, **kwargs)
        del self.embedding
        self.register_buffer("basis", torch.randn(codebook_size, dim) * dim ** -0.5)
        self.proj = nn.Linear(dim, dim)

    @property
    def codebook(self):
        with torch.autocast(self.basis.device.type, enabled=False):
            return F.linear(self.basis, self.proj.weight, self.proj.bias)  # (K, D), fp32

    def replace_dead_codes_(self, threshold=0.01):
        raise NotImplementedError("SimVQ has no per-code parameters to re-seed: its codes are a "
                                  "frozen basis seen through one shared linear map")


# -----------------------------------------------------------------------------
# 5. NSVQ: the STE quantizer plus the dense loss (and NSSimVQ: SimVQ's codebook with it)
# -----------------------------------------------------------------------------

class NSVQ(VectorQuantizer):
    """NSVQ (arXiv 2606.11363): VectorQuantizer + the dense non-stationary loss (part 1) +
    dead-code replacement (part 2, inherited), driven by StageSchedule (part 3).

        losses = {"codebook": ||sg(z_e) - z_q||^2, "commit": beta ||z_e - sg(z_q)||^2,
                  "ns": alpha * L_NS}                          L_NS: search_and_dense_loss
        diagnostics = {"kernel_mass": mean_i sum_{j != q_i} w_ij, "tau": T used}

    The dense term is on while self.dense and self.training (the loop sets vq.dense from the
    schedule); otherwise "ns" is a zero tensor and diagnostics is empty. Its weights are
    computed in the same chunked pass that finds the winners, so it costs one exp2 pass and one
    more GEMM per chunk (tau_mode="relative": and one more search pass).
    The kernel mass tells whether the dense loss does anything: near 0 the kernel is one-hot
    (tau too small for the latent scale), near 1 the winner gets almost no share.
    Arguments: those of VectorQuantizer, plus alpha >= 0 (dense-loss weight), tau > 0,
    tau_mode ("absolute": tau in squared-distance units; "relative": in units of the batch's
    mean squared distance to the nearest code), weighting ("softmax" | "clamped"), lam > 0.
    Warning (measured, EXPERIMENTS.md "Encoder drift"): under Adam a code moves by about its
    learning rate per step whatever its gradient, so the dense loss cannot make a slow
    codebook keep up with a fast encoder; replacement then re-seeds the codes left behind.
    Shapes: as VectorQuantizer.
    """

    def __init__(self, codebook_size, dim, beta=0.25, alpha=0.1, tau=0.35, weighting="softmax",
                 lam=0.01, tau_mode="absolute", **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        check_number("alpha", alpha, low=0)
        check_tau(tau)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("tau_mode", tau_mode, TAU_MODES)
        check_number("lam", lam, low=0, low_open=True)
        self.alpha, self.tau, self.weighting, self.lam, self.tau_mode = alpha, tau, weighting, lam, tau_mode
        self.dense = True

    def assign(self, z, codebook):
        if self.dense and self.training:  # NSVQ: winners and L_NS in one pass
            dense = search_and_dense_loss(z, codebook, self.tau, self.weighting, self.lam,
                                          chunk_size=self.chunk_size, tau_mode=self.tau_mode)
            return dense.indices, {"ns": self.alpha * dense.loss}, {"kernel_mass": dense.mass,
                                                                    "tau": dense.tau}
        return nearest_code(z, codebook, self.chunk_size), {"ns": codebook.new_zeros(())}, {}


class NSSimVQ(NSVQ, SimVQ):
    """SimVQ's codebook trained with NSVQ's dense loss: the paper trains SimVQ with its loss and
    stages too, to show that the loss is not tied to one codebook parametrisation.

        codebook = basis @ W^T + b (SimVQ)     losses = NSVQ's, L_NS on that effective codebook

    Every code is a row of the effective codebook, so the dense term's gradient reaches W and b
    through all codes near each latent, not only through the winners. The class only combines
    the two: codebook and the missing replace_dead_codes_ come from SimVQ (no per-code
    parameters), assign (the dense loss) from NSVQ; the loop drives vq.dense as for NSVQ.
    Arguments: those of NSVQ; the replacement ones do not apply. Shapes: as VectorQuantizer.
    """


# -----------------------------------------------------------------------------
# 6. The stage schedule (part 3 of the method)
# -----------------------------------------------------------------------------

STAGES = ("stage1", "warmup", "stage2")


class StageSchedule:
    """NSVQ's stage-wise training (paper, part 3) as a small, passive, resumable state machine.

        stage1: everything trains; dense loss and replacement on; adversarial loss at weight 1
                (0 with gan_stage1=False: the sources leave its start open).
        warmup: encoder frozen; codebook term + reconstruction only: no GAN, no dense loss,
                no replacement, no commitment (the encoder no longer moves).
        stage2: as warmup, plus the adversarial loss ramped linearly 0 -> 1 over
                gan_ramp_epochs epochs.

    Stage 1 ends at the end of an epoch when the epoch-mean commitment loss has made no new
    best for `patience` consecutive epochs, or when epoch + 1 >= freeze_epoch, whichever
    comes first (patience=None: the plateau never triggers; both None: one stage only, as the
    baselines train). From the paper: the plateau trigger, patience 10, no GAN/dense/replacement
    in warm-up, the 2-epoch ramp. Ours: freeze_epoch (so short runs reach stage 2) and the
    warm-up length (the paper does not give it). The loop calls end_epoch once per epoch, with
    the loss all-reduced across ranks, so every rank changes stage on the same epoch.
    """

    def __init__(self, patience=10, freeze_epoch=None, warmup_epochs=1, gan_ramp_epochs=2, gan_stage1=True):
        for name, value, low in (("patience", patience, 1), ("freeze_epoch", freeze_epoch, 1),
                                 ("warmup_epochs", warmup_epochs, 0), ("gan_ramp_epochs", gan_ramp_epochs, 0)):
            if value is not None or name in ("warmup_epochs", "gan_ramp_epochs"):
                check_count(name, value, low)
        self.patience, self.freeze_epoch = patience, freeze_epoch
        self.warmup_epochs, self.gan_ramp_epochs = warmup_epochs, gan_ramp_epochs
        self.gan_stage1 = gan_stage1
        self.stage = "stage1"
        self.best = math.inf
        self.epochs_since_best = 0
        self.stage_start = {"stage1": 0}  # stage -> first epoch spent in it

    def end_epoch(self, epoch, commit_loss):
        """Record the finished epoch `epoch` (0-based); returns True if the stage changed."""
        commit_loss = float(commit_loss)
        if not math.isfinite(commit_loss):
            raise ValueError(f"commit_loss must be finite, got {commit_loss}")
        before = self.stage
        if self.stage == "stage1":
            if commit_loss < self.best:
                self.best, self.epochs_since_best = commit_loss, 0
            else:
                self.epochs_since_best += 1
            plateau = self.patience is not None and self.epochs_since_best >= self.patience
            if plateau or (self.freeze_epoch is not None and epoch + 1 >= self.freeze_epoch):
                self._enter("warmup", epoch + 1)
        elif self.stage == "warmup" and epoch + 1 - self.stage_start["warmup"] >= self.warmup_epochs:
            self._enter("stage2", epoch + 1)
        if self.stage == "warmup" and self.warmup_epochs == 0:
            self._enter("stage2", epoch + 1)
        return self.stage != before

    def _enter(self, stage, epoch):
        self.stage = stage
        self.stage_start[stage] = epoch

    @property
    def encoder_trainable(self):
        return self.stage == "stage1"

    # The dense loss, replacement and the commitment term all run in stage 1 only.
    dense_loss = replacement = commitment = encoder_trainable

    def gan_weight(self, epoch_float):
        """Adversarial weight in [0, 1] at a fractional epoch (e.g. epoch + step / steps)."""
        if self.stage == "stage1":
            return 1.0 if self.gan_stage1 else 0.0
        if self.stage == "warmup":
            return 0.0
        if self.gan_ramp_epochs == 0:
            return 1.0
        return min(1.0, max(0.0, (epoch_float - self.stage_start["stage2"]) / self.gan_ramp_epochs))

    def state_dict(self):
        return {"stage": self.stage, "best": self.best, "epochs_since_best": self.epochs_since_best,
                "stage_start": dict(self.stage_start)}

    def load_state_dict(self, state):
        missing = {"stage", "best", "epochs_since_best", "stage_start"} - set(state)
        if missing:
            raise ValueError(f"schedule state is missing {sorted(missing)}: not a StageSchedule state_dict")
        if state["stage"] not in STAGES or state["stage"] not in state["stage_start"]:
            raise ValueError(f"unknown stage {state['stage']!r} in schedule state")
        self.stage, self.best = state["stage"], float(state["best"])
        self.epochs_since_best = int(state["epochs_since_best"])
        self.stage_start = dict(state["stage_start"])


# -----------------------------------------------------------------------------
# 7. Diagnostics: utilization, perplexity, drift, churn, kernel mass
# -----------------------------------------------------------------------------

@torch.no_grad()
def codebook_stats(counts):
    """Health of a codebook from assignment counts (K,) gathered over an evaluation set.

        utilization = #{k : n_k > 0} / K       (over the whole set, not per batch)
        perplexity  = exp(-sum_k p_k log p_k), p = n / sum(n); K when usage is uniform
        dead_codes  = #{k : n_k = 0}
    """
    counts = counts.double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    used = int((counts > 0).sum())
    return {"utilization": used / len(counts), "perplexity": float(entropy.exp()),
            "dead_codes": len(counts) - used}


@torch.no_grad()
def encoder_drift(z_before, z_after):
    """RMS change of the encoder's output on a fixed probe batch between two checks.

    Why: this is the quantity the paper blames for collapse; large drift with small codebook
    motion means codes are being left behind.
    """
    return float((z_after.float() - z_before.float()).pow(2).mean().sqrt())


@torch.no_grad()
def assignment_churn(indices_before, indices_after):
    """Fraction of probe tokens whose code changed between two checks."""
    return float((indices_before != indices_after).float().mean())


@torch.no_grad()
def kernel_mass(z, codebook, tau, weighting="softmax", lam=0.01, tau_mode="absolute"):
    """Mean over latents of sum_{j != q_i} w_ij: how much pull the dense loss spreads.

    Near 0: tau is too small for the latent scale (the dense loss does nothing); near 1 with
    softmax weights: the winner gets almost no share (tau too large, codes blur together).
    NSVQ's forward reports the same number per step as out.diagnostics["kernel_mass"].
    Shapes: z (N, D), codebook (K, D).
    """
    return float(search_and_dense_loss(z, codebook, tau, weighting, lam, tau_mode=tau_mode).mass)


@torch.no_grad()
def duplicate_codes(codebook):
    """How many codes are exact copies of another code (K - number of distinct rows)."""
    return len(codebook) - len(torch.unique(codebook, dim=0))


# -----------------------------------------------------------------------------
# 8. The 2-D toy demo: python nsvq.py
# -----------------------------------------------------------------------------

def _toy_data(scenario, t, n, generator):
    """Samples of a 2-D mixture of 8 blobs at time t in [0, 1] that translates or shrinks."""
    centres = torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                           torch.sin(torch.arange(8) * math.pi / 4)], 1)  # (8, 2)
    x = centres[torch.randint(8, (n,), generator=generator)]
    x = x + 0.15 * torch.randn(n, 2, generator=generator)
    if scenario == "translate":
        return x + torch.tensor([4.0 * t, 0.0])
    return x * (1.0 - 0.8 * t)  # "shrink"


def _toy_run(method, scenario, steps=1500, K=64, seed=0):
    """Train one codebook online on the moving toy data; return it and utilization over time."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "STE":
        vq = VectorQuantizer(K, 2)
    elif method == "EMA":
        vq = EMAVectorQuantizer(K, 2, decay=0.95)
    else:
        # tau is in squared-distance units: 0.02 is about the spread within a blob. At 0.05 the
        # kernel was too wide once the data had shrunk and codes merged.
        vq = NSVQ(K, 2, alpha=1.0, tau=0.02)
    with torch.no_grad():  # every method starts from the same codebook, on the data at t = 0
        vq.codebook.copy_(_toy_data(scenario, 0.0, K, gen))
        if method == "EMA":
            vq.embed_sum.copy_(vq.embedding)
        vq.upkeep.usage.fill_(1.0 / K)  # these codes are data already: alive, not to be re-seeded
        vq.upkeep.seeded.fill_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2) if method != "EMA" else None
    usage = []
    for step in range(steps):
        t = step / (steps - 1)
        z_e = _toy_data(scenario, t, 256, gen)  # (256, 2): the "encoder output", moving in time
        out = vq(z_e)
        if opt:
            opt.zero_grad()
            sum(out.losses.values()).backward()
            opt.step()
        vq.update_(z_e, out.indices)
        if method == "NSVQ" and step % 10 == 0:
            reset_adam_state_(opt, vq.embedding, vq.replace_dead_codes_())
        if step % 25 == 0 or step == steps - 1:
            probe = _toy_data(scenario, t, 4096, gen)
            counts = torch.bincount(nearest_code(probe, vq.codebook.detach()), minlength=K)
            usage.append((t, codebook_stats(counts)["utilization"]))
    return vq.codebook.detach(), usage


def _toy_demo(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, scenarios = ("STE", "EMA", "NSVQ"), ("translate", "shrink")
    fig, axes = plt.subplots(2, 4, figsize=(15, 7))
    gen = torch.Generator().manual_seed(1)
    for row, scenario in enumerate(scenarios):
        data = _toy_data(scenario, 1.0, 2000, gen)
        for col, method in enumerate(methods):
            codebook, usage = _toy_run(method, scenario)
            ax = axes[row, col]
            ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgray")
            ax.scatter(codebook[:, 0], codebook[:, 1], s=12, c="C3")
            ax.set_title(f"{method}, {scenario}: final codebook")
            ax.set_aspect("equal")
            ts, us = zip(*usage)
            axes[row, 3].plot(ts, us, label=method)
            print(f"{scenario:9s} {method:5s} final utilization {us[-1]:.0%}")
        axes[row, 3].set(title=f"{scenario}: utilization", xlabel="time", ylim=(0, 1.05))
        axes[row, 3].legend()
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=60)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The 2-D toy: STE, EMA and NSVQ codebooks trained "
                                     "online on 8 blobs that translate or shrink (about 20 s).")
    parser.add_argument("--out", default="nsvq_toy.png", help="figure to write (default: nsvq_toy.png)")
    args = parser.parse_args()
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"--out {args.out}: folder {folder} does not exist or is not writable")
    _toy_demo(args.out)
