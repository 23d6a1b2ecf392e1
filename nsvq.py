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
    tau        tau                        kernel temperature (squared-distance units)
    lambda     lam                        clamp scale of the "clamped" weighting

Contents:
    1. Helpers: shapes, fp32 distances, the chunked nearest-code search
    2. The dense non-stationary loss (shares the chunked search)
    3. Baselines: VectorQuantizer (STE), EMAVectorQuantizer, SimVQ
    4. NSVQ: the STE quantizer plus the dense loss and replacement
    5. Codebook replacement helpers (Adam moments)
    6. The stage schedule
    7. Diagnostics: utilization, perplexity, drift, churn, kernel mass
    8. The 2-D toy demo (python nsvq.py)

Only torch is imported at module level; the demo imports matplotlib when it runs.
"""

import math
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WEIGHTINGS = ("softmax", "clamped")
REPLACE_FROM = ("latents", "codes")


# -----------------------------------------------------------------------------
# 1. Helpers: shapes, fp32 distances, the chunked nearest-code search
# -----------------------------------------------------------------------------

class QuantizerOutput(NamedTuple):
    """What every quantizer's forward returns.

    z_q:     quantized latents, same shape and dtype as z_e; gradient reaches z_e straight through.
    indices: int64 (B, *spatial), the winning code of each latent.
    losses:  dict of already-weighted scalar terms with a fixed set of keys per class, so that
             sum(out.losses.values()) is always the quantizer's whole loss.
    """
    z_q: torch.Tensor
    indices: torch.Tensor
    losses: dict


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
    z = z_e.movedim(1, -1).reshape(-1, dim)  # (N, D)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def unflatten_latents(z, z_e):
    """Inverse of flatten_latents: rows (N, D) back to z_e's layout (B, D, *spatial)."""
    B, D, *spatial = z_e.shape
    return z.reshape(B, *spatial, D).movedim(-1, 1)  # (B, D, *spatial)


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
    e_ij = 2^(scores_ij - m_i) (scores in log2 units, log2(e)/tau folded into the first GEMM),
    p_ij = e_ij / s_i with s_i = sum_j e_ij, so 1/s_i scales the rows of [z, 1, ||z||^2]
    (N*(D+2) numbers) instead of the (chunk, K) block. So on top of the search the dense
    loss costs one exp2 pass, one sum and one GEMM per block.
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
        scale = 1.0 if tau is None else math.log2(math.e) / tau  # scores in log2 units
        c_sq = codebook.pow(2).sum(1)  # (K,)
        winners = torch.empty(N, dtype=torch.long, device=z.device) if indices is None else indices
        stats = None
        if tau is not None:
            # Each row of z_aug is [z_i, 1, ||z_i||^2]: one GEMM z_aug^T w gives S, W and C at once.
            z_aug = torch.cat([z, z.new_ones(N, 1), z.pow(2).sum(1, keepdim=True)], 1)  # (N, D+2)
            stats = z.new_zeros(D + 2, K)  # transposed: the GEMM below runs faster this way round
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            # scores = (2 z.c - ||c||^2) * scale, scale = log2(e) / tau (1 without tau);
            # larger is nearer. (n, K)
            scores = torch.addmm(c_sq, z[rows], codebook.T, beta=-scale, alpha=2 * scale)
            row_max, nearest = _row_max(scores)  # (n,), (n,)
            if indices is None:
                winners[rows] = nearest
            if tau is None:
                continue
            q = winners[rows, None]  # (n, 1)
            e = scores.sub_(row_max[:, None]).exp2_()  # e_ij = p_ij * s_i, in place; (n, K)
            s = e.sum(1, keepdim=True)  # (n, 1)
            if weighting == "clamped":  # w = min(1, lam*K*p) = (lam*K / s) * min(e, s / (lam*K))
                e = torch.minimum(e, s / (lam * K), out=e)
                row_scale = (lam * K) / s
            else:  # w = p = e / s
                row_scale = 1.0 / s
            e.scatter_(1, q, 0.0)  # the winner's own term is excluded
            stats.addmm_(z_aug[rows].mul(row_scale).T, e)  # (D+2, K)
    return winners, None if stats is None else stats.T


def nearest_code(z, codebook, chunk_size=None):
    """Index of the nearest code for each row: q_i = argmin_j ||z_i - c_j||^2.

    Shapes: z (N, D), codebook (K, D) -> (N,) int64. Chunked and fp32, see _search.
    """
    return _search(z, codebook, chunk_size=chunk_size)[0]


# -----------------------------------------------------------------------------
# 2. The dense non-stationary loss
# -----------------------------------------------------------------------------

class DenseLoss(NamedTuple):
    """Result of search_and_dense_loss: winners, the (unweighted) loss, the mean kernel mass."""
    indices: torch.Tensor  # (N,) int64
    loss: torch.Tensor     # scalar; gradient reaches the codebook only
    mass: torch.Tensor     # scalar, mean over latents of sum_{j != q_i} w_ij (no grad)


def search_and_dense_loss(z, codebook, tau, weighting="softmax", lam=0.01, indices=None,
                          chunk_size=None):
    """Nearest codes and the dense non-stationary loss L_NS in one chunked pass (paper, part 1).

        L_NS = 1/(N*D) * sum_i sum_{j != q_i} w_ij * ||sg(z_i) - c_j||^2
        p_ij = softmax_j(-||z_i - c_j||^2 / tau)      over all K codes
        w_ij = sg(p_ij)                               weighting="softmax" (the paper, as best known)
        w_ij = sg(min(1, lam*K*p_ij))                 weighting="clamped" (the authors' earlier code)

    Every code is pulled towards the latents that are near it, in proportion to how near, so
    codes that are not winning anything still follow the encoder as it drifts. The winner's own
    term is left out: the ordinary codebook term already trains it.
    With w and z constant the sum expands to
        sum_k W_k ||c_k||^2 - 2 sum_k c_k . S_k + sum_k C_k
    so only the (K, D+2) statistics from _search are needed, and the gradient
    dL/dc_k = 2 (W_k c_k - S_k) / (N*D) reaches the codebook only.
    If indices is given those are the winners excluded; otherwise the nearest codes are.
    Shapes: z (N, D), codebook (K, D), indices (N,) or None.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    N, D = z.shape
    indices, stats = _search(z.detach(), codebook.detach(), tau, weighting, lam, indices, chunk_size)
    c = codebook.to(stats.dtype)
    S, W, C = stats[:, :D], stats[:, D], stats[:, D + 1]  # (K, D), (K,), (K,)
    loss = ((W * c.pow(2).sum(1)).sum() - 2 * (S * c).sum() + C.sum()) / (N * D)
    return DenseLoss(indices, loss, W.sum() / N)


def non_stationary_loss(z, codebook, indices, tau, weighting="softmax", lam=0.01):
    """L_NS for given winners, as a readable entry point (same routine as NSVQ's forward).

    Shapes: z (N, D), codebook (K, D), indices (N,) -> scalar. See search_and_dense_loss.
    """
    return search_and_dense_loss(z, codebook, tau, weighting, lam, indices=indices).loss


# -----------------------------------------------------------------------------
# 3. Baselines: VectorQuantizer (STE), EMAVectorQuantizer, SimVQ
# -----------------------------------------------------------------------------

def _distributed():
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer (van den Oord et al., 2017) with a codebook trained by gradient.

        codebook = ||sg(z_e) - z_q||^2          moves the winning codes towards the latents
        commit   = beta * ||z_e - sg(z_q)||^2   keeps the encoder near its codes
        z_q      = sg(z_q) + z_e - sg(z_e)      straight-through estimator for the decoder path

    beta sits on the commitment term, as in the paper's eq. 3; several popular codebases put it
    on the codebook term instead, which slows the codebook down rather than the encoder.
    Upkeep (after optimizer.step()): update_ tracks usage and recent latents;
    replace_dead_codes_ re-seeds codes whose usage fell below threshold / K.
    Shapes: z_e (B, D, *spatial) -> z_q (B, D, *spatial), indices (B, *spatial).
    """

    codebook_by_gradient = True  # EMAVectorQuantizer moves its codes in update_ instead

    def __init__(self, codebook_size, dim, beta=0.25, replace_from="latents", noise=0.01,
                 usage_decay=0.9, buffer_size=4096, chunk_size=None):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size} and {dim}")
        if replace_from not in REPLACE_FROM:
            raise ValueError(f"unknown replace_from {replace_from!r}; expected one of {REPLACE_FROM}")
        if not 0.0 <= usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.replace_from, self.noise, self.usage_decay = replace_from, noise, usage_decay
        self.chunk_size = chunk_size
        # VQ-VAE's initialisation; with replacement the first call re-seeds every code from data.
        K = codebook_size
        self.embedding = nn.Parameter(torch.empty(K, dim).uniform_(-1.0 / K, 1.0 / K))
        # usage[k]: moving average of code k's share of assignments (sums to 1; uniform = 1/K).
        # usage_decay 0.9: an unused code falls below 1% of the uniform rate in ~44 calls. With
        # 0.99 (~460 calls) MNIST kept 13% of its codes dead in a short run (README).
        self.register_buffer("usage", torch.zeros(K))
        self.register_buffer("usage_calls", torch.zeros((), dtype=torch.long))
        # A ring of recent encoder outputs, the source of new codes for replace_from="latents".
        self.register_buffer("latent_buffer", torch.zeros(buffer_size, dim))
        self.register_buffer("latents_seen", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self):
        """The effective codebook, (K, D)."""
        return self.embedding

    def assign(self, z, codebook):
        """Winning codes (N,) and any extra loss terms; NSVQ overrides this one step."""
        return nearest_code(z, codebook, self.chunk_size), {}

    def forward(self, z_e):
        z = flatten_latents(z_e, self.dim)                   # (N, D)
        codebook = self.codebook                             # (K, D)
        indices, extra = self.assign(z.detach(), codebook)   # (N,)
        z_q = F.embedding(indices, codebook).to(z.dtype)     # (N, D)
        losses = {}
        if self.codebook_by_gradient:
            losses["codebook"] = F.mse_loss(z_q, z.detach())
        losses["commit"] = self.beta * F.mse_loss(z, z_q.detach())
        losses.update(extra)
        # Straight-through: the value is exactly z_q (z - sg(z) is exactly 0), the gradient goes to z_e.
        z_q = z_q.detach() + (z - z.detach())
        z_q = unflatten_latents(z_q, z_e).to(z_e.dtype)
        return QuantizerOutput(z_q, indices.view(z_e.shape[0], *z_e.shape[2:]), losses)

    @torch.no_grad()
    def decode(self, indices):
        """Codes for given indices: (B, *spatial) int -> (B, D, *spatial)."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def update_(self, z_e, indices):
        """Upkeep after optimizer.step(): track usage and remember recent latents.

        usage <- usage + w * (share - usage), share = this call's (all ranks') counts / total,
        w = max(1 - usage_decay, 1 / calls): a running mean for the first calls, then an EMA,
        so usage is a proper share from the first call on and never depends on batch size,
        world size or call cadence. Returns the all-reduced counts (K,).
        """
        if z_e.is_cuda and torch.backends.cuda.matmul.allow_tf32:
            warnings.warn("TF32 matmuls are on: nearest-code distances lose precision; set "
                          "torch.backends.cuda.matmul.allow_tf32 = False", stacklevel=2)
        K = self.codebook_size
        counts = torch.bincount(indices.reshape(-1), minlength=K).to(self.usage.dtype)  # (K,)
        if _distributed():
            dist.all_reduce(counts)
        share = counts / counts.sum().clamp(min=1)
        weight = (1.0 / (self.usage_calls + 1)).clamp(min=1.0 - self.usage_decay)
        self.usage.lerp_(share, weight.to(self.usage.dtype))
        self.usage_calls += 1
        capacity = self.latent_buffer.shape[0]
        if capacity and self.replace_from == "latents":
            z = flatten_latents(z_e.detach(), self.dim).to(self.latent_buffer.dtype)  # (N, D)
            n = min(len(z), capacity)
            recent = z[torch.randperm(len(z), device=z.device)[:n]]  # (n, D)
            slots = (self.latents_seen + torch.arange(n, device=z.device)) % capacity
            self.latent_buffer[slots] = recent
            self.latents_seen += n
        return counts

    @torch.no_grad()
    def replace_dead_codes_(self, threshold=0.01):
        """Re-seed codes whose usage is below threshold / K (paper, part 2); return their indices.

        New codes come from recent encoder outputs (replace_from="latents", the authors'
        earlier code) or from live codes drawn in proportion to usage plus Gaussian noise of
        noise * RMS(codebook) (replace_from="codes", the paper's description). Replaced codes
        restart at usage 1/K; live codes are not touched. Codes never used have usage 0, so the
        first call initialises the codebook from data. Under DDP rank 0 draws and broadcasts,
        so every rank writes identical codes (usage is already identical: update_ all-reduces).
        Cadence: call it every few steps in stage 1 (our default is every step, with
        threshold 0.01); once an epoch is too slow when the encoder drifts (see README).
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        K = self.codebook_size
        dead = torch.nonzero(self.usage < threshold / K).squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return dead
        new = torch.empty(dead.numel(), self.dim, device=dead.device, dtype=self.codebook.dtype)
        if not _distributed() or dist.get_rank() == 0:
            new.copy_(self._draw_codes(dead))
        if _distributed():
            dist.broadcast(new, src=0)
        self._write_codes_(dead, new)
        self.usage[dead] = 1.0 / K
        return dead

    def _draw_codes(self, dead):
        n = dead.numel()
        if self.replace_from == "latents":
            pool = self.latent_buffer[: int(self.latents_seen.clamp(max=len(self.latent_buffer)))]
            if len(pool) == 0:
                raise RuntimeError("no latents seen yet: call update_(z_e, indices) before "
                                   "replace_dead_codes_() when replace_from='latents'")
            if n <= len(pool):
                pick = torch.randperm(len(pool), device=pool.device)[:n]
            else:
                pick = torch.randint(len(pool), (n,), device=pool.device)
            return pool[pick]
        codebook = self.codebook.detach()
        live_usage = self.usage.clone()
        live_usage[dead] = 0.0
        source = torch.multinomial(live_usage, n, replacement=True)  # (n,) live codes
        rms = codebook.pow(2).mean().sqrt()
        return codebook[source] + self.noise * rms * torch.randn_like(codebook[source])

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
    Shapes: as VectorQuantizer.
    """

    codebook_by_gradient = False

    def __init__(self, codebook_size, dim, beta=0.25, decay=0.99, eps=1e-5, **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        self.decay, self.eps = decay, eps
        del self.embedding
        self.register_buffer("embedding", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.embedding.clone())

    @torch.no_grad()
    def update_(self, z_e, indices):
        """The EMA step (plus usage tracking); statistics are summed over all ranks."""
        counts = super().update_(z_e, indices)  # (K,), all ranks
        z = flatten_latents(z_e.detach(), self.dim).to(self.embed_sum.dtype)  # (N, D)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices.reshape(-1), z)  # (K, D)
        if _distributed():
            dist.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        self.embed_sum.lerp_(sums, 1.0 - self.decay)
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
    VectorQuantizer and reach W, b. The codebook is recomputed in every forward and decode
    applies the linear map too (the official code's decode forgets to).
    No replace_dead_codes_: a code is a fixed basis row seen through the shared map, so there
    is no per-code parameter to re-seed (and changing the basis would move the map's meaning).
    Shapes: as VectorQuantizer.
    """

    def __init__(self, codebook_size, dim, beta=0.25, **kwargs):
        kwargs.setdefault("buffer_size", 0)  # no replacement, so no latent buffer
        super().__init__(codebook_size, dim, beta, **kwargs)
        del self.embedding
        self.register_buffer("basis", torch.randn(codebook_size, dim) * dim ** -0.5)
        self.proj = nn.Linear(dim, dim)

    @property
    def codebook(self):
        return self.proj(self.basis)  # (K, D)

    def replace_dead_codes_(self, threshold=0.01):
        raise NotImplementedError("SimVQ has no per-code parameters to re-seed: its codes are a "
                                  "frozen basis seen through one shared linear map")


# -----------------------------------------------------------------------------
# 4. NSVQ: the STE quantizer plus the dense loss and replacement
# -----------------------------------------------------------------------------

class NSVQ(VectorQuantizer):
    """NSVQ (arXiv 2606.11363): VectorQuantizer + the dense non-stationary loss (part 1) +
    dead-code replacement (part 2, inherited), driven by StageSchedule (part 3).

        losses = {"codebook": ||sg(z_e) - z_q||^2, "commit": beta ||z_e - sg(z_q)||^2,
                  "ns": alpha * L_NS}                          L_NS: search_and_dense_loss

    The dense term is on while self.dense and self.training (the loop sets vq.dense from the
    schedule); otherwise "ns" is a zero tensor. Its weights are computed in the same chunked
    pass that finds the winners, so it costs one exp2 pass and one more GEMM per chunk
    (about as much again as the search itself; README, "Speed and memory").
    Which defaults are the paper's and which we measured: see the README.
    Warning (measured, README "Encoder drift"): under Adam a code moves by about its learning
    rate per step whatever its gradient, so the dense loss cannot make a slow codebook keep up
    with a fast encoder. Replacement then re-seeds the codes left behind, many in one step, and
    the decoder's input jumps in scale: on MNIST an unnormalised decoder died of that jump
    (output = mean image); a GroupNorm on its first layer made it indifferent.
    Shapes: as VectorQuantizer.
    """

    def __init__(self, codebook_size, dim, beta=0.25, alpha=0.1, tau=0.35, weighting="softmax",
                 lam=0.01, **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if alpha < 0 or lam <= 0:
            raise ValueError(f"alpha must be >= 0 and lam > 0, got alpha={alpha}, lam={lam}")
        self.alpha, self.tau, self.weighting, self.lam = alpha, tau, weighting, lam
        self.dense = True

    def assign(self, z, codebook):
        if self.dense and self.training:  # NSVQ: winners and L_NS in one pass
            indices, ns, _ = search_and_dense_loss(z, codebook, self.tau, self.weighting,
                                                   self.lam, chunk_size=self.chunk_size)
        else:
            indices, ns = nearest_code(z, codebook, self.chunk_size), codebook.new_zeros(())
        return indices, {"ns": self.alpha * ns}


# -----------------------------------------------------------------------------
# 5. Codebook replacement helpers
# -----------------------------------------------------------------------------

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
# 6. The stage schedule
# -----------------------------------------------------------------------------

STAGES = ("stage1", "warmup", "stage2")


class StageSchedule:
    """NSVQ's stage-wise training (paper, part 3) as a small, passive, resumable state machine.

        stage1: everything trains; dense loss and replacement on (GAN weight 1, if used).
        warmup: encoder frozen; codebook term + reconstruction only: no GAN, no dense loss,
                no replacement, no commitment (the encoder no longer moves).
        stage2: as warmup, plus the adversarial loss ramped linearly 0 -> 1 over
                gan_ramp_epochs epochs.

    Stage 1 ends at the end of an epoch when the epoch-mean commitment loss has made no new
    best for `patience` consecutive epochs, or when epoch + 1 >= freeze_epoch, whichever
    comes first. From the paper: the plateau trigger, patience 10, no GAN/dense/replacement in
    warm-up, the 2-epoch ramp. Ours: freeze_epoch (so short runs reach stage 2) and the warm-up
    length (the paper does not give it). The loop calls end_epoch once per epoch, with the
    loss all-reduced across ranks, so every rank changes stage on the same epoch.
    """

    def __init__(self, patience=10, freeze_epoch=None, warmup_epochs=1, gan_ramp_epochs=2):
        if patience < 1 or warmup_epochs < 0 or gan_ramp_epochs < 0:
            raise ValueError("need patience >= 1, warmup_epochs >= 0, gan_ramp_epochs >= 0")
        if freeze_epoch is not None and freeze_epoch < 1:
            raise ValueError(f"freeze_epoch must be >= 1 or None, got {freeze_epoch}")
        self.patience, self.freeze_epoch = patience, freeze_epoch
        self.warmup_epochs, self.gan_ramp_epochs = warmup_epochs, gan_ramp_epochs
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
            plateau = self.epochs_since_best >= self.patience
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
            return 1.0
        if self.stage == "warmup":
            return 0.0
        if self.gan_ramp_epochs == 0:
            return 1.0
        return min(1.0, max(0.0, (epoch_float - self.stage_start["stage2"]) / self.gan_ramp_epochs))

    def state_dict(self):
        return {"stage": self.stage, "best": self.best, "epochs_since_best": self.epochs_since_best,
                "stage_start": dict(self.stage_start)}

    def load_state_dict(self, state):
        if state["stage"] not in STAGES:
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
def kernel_mass(z, codebook, tau, weighting="softmax", lam=0.01):
    """Mean over latents of sum_{j != q_i} w_ij: how much pull the dense loss spreads.

    Near 0: tau is too small for the latent scale (the dense loss does nothing); near 1 with
    softmax weights: the winner gets almost no share (tau too large, codes blur together).
    Shapes: z (N, D), codebook (K, D).
    """
    return float(search_and_dense_loss(z, codebook, tau, weighting, lam).mass)


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
        # kernel was too wide once the data had shrunk and codes merged (36% used at the end).
        vq = NSVQ(K, 2, alpha=1.0, tau=0.02)
    with torch.no_grad():  # every method starts from the same codebook, on the data at t = 0
        vq.codebook.copy_(_toy_data(scenario, 0.0, K, gen))
        if method == "EMA":
            vq.embed_sum.copy_(vq.embedding)
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


def _toy_demo(path="nsvq_toy.png"):
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
    fig.savefig(path, dpi=60)
    print(f"wrote {path}")


if __name__ == "__main__":
    _toy_demo()
