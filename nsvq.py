"""
nsvq.py -- vector quantizers for VQ autoencoders, and NSVQ (arXiv 2606.11363; not
Noise-Substitution VQ, which shares the acronym): a training method for large codebooks.

The paper's diagnosis is *encoder drift*: the encoder moves its latents every step, plain VQ
pulls only the winning code after them, so the rest lag behind and die (codebook collapse); the
quantization error grows, and the straight-through gradient feeds it back into the encoder:
  1. a dense non-stationary embedding loss: every code, not only the winner, is pulled towards
     each latent with a stop-gradient kernel weight softmax(-d / T)        (sections 2, 3)
  2. codebook replacement: codes that stop being used are re-seeded         (section 4)
  3. stage-wise training: once the commitment loss stops falling the encoder is frozen, a
     warm-up fits codebook and decoder, then the adversarial loss returns  (section 5)

Notation (paper -> code -> shape):
    K, D     codebook_size, dim    number of codes, code dimension
    z_e      z_e                   encoder output, channel first        (B, D, *spatial)
    z_i      z                     the same latents as rows             (N, D), N = B*H*W
    c_j      codebook[j]           code j                               codebook (K, D)
    q_i      indices               winning code of latent i             (N,) or (B, *spatial)
    z_q      z_q                   quantized latents                    as z_e
    d_ij     distances             ||z_i - c_j||^2                      (N, K)
    w_ij     w                     sg(softmax_j(-d_ij / T)), 0 at j = q_i
    T        tau                   temperature: absolute, or tau x mean_i d_{i,q_i}
    beta     beta, alpha           commitment weight, dense-loss weight
    u_j      upkeep.usage[j]       moving share of the assignments won by code j

Contents: 1 nearest code, STE  2 dense loss  3 NSVQ  4 replacement  5 stages  6 baselines  7 checks

The contract: `forward` is pure. It writes no buffer, calls no collective and reads nothing back
from the device, so it compiles and runs under DDP. Every state change and every collective
lives in `update_` and `replace_dead_codes_` (no grad; called after optimizer.step()), which
keep every rank's quantizer bitwise identical and never wait for the device either.

Where each part is called (the README's loop, tested the same; train_mnist.py re-seeds every step):

    for epoch in range(4):
        encoder.requires_grad_(schedule.encoder_trainable)  # part 3: frozen after stage 1
        vq.dense = schedule.dense_loss                      # part 1: stage 1 only
        commit = []
        for step, x in enumerate(batches):
            z_e = encoder(x)                                # (B, D, H, W), channel first
            out = vq(z_e)                                   # QuantizerOutput
            losses = {"rec": (decoder(out.z_q) - x).pow(2).mean(), **out.losses}
            if not schedule.commitment:                     # the encoder no longer moves
                losses.pop("commit", None)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            vq.update_(z_e.detach(), out.indices)           # after the step: usage, latent pool
            if schedule.replacement and vq.reseeds and step % 10 == 0:  # part 2, stage 1
                reseeded = vq.replace_dead_codes_()         # (K,) mask of the re-seeded codes
                nsvq.reset_adam_state_(opt, vq.embedding, reseeded)  # no stale momentum
            commit.append(out.losses.get("commit", torch.zeros(())).item())
        schedule.end_epoch(epoch, sum(commit) / len(commit))  # part 3: the epoch MEAN
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The nearest code and the STE quantizer
# -----------------------------------------------------------------------------

class QuantizerOutput(NamedTuple):
    """z_q like z_e; indices int64 (B, *spatial); losses: weighted scalars whose sum is the
    quantizer's loss, fixed keys per class; diagnostics: detached scalars, no loss."""
    z_q: torch.Tensor
    indices: torch.Tensor
    losses: dict
    diagnostics: dict


def to_rows(z_e, dim):
    """Channel-first latents (B, D, *spatial) as rows (N, D), in fp32 (fp64 stays fp64)."""
    check_latents(z_e, dim)
    z = z_e.movedim(1, -1).reshape(-1, dim)  # (N, D)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def from_rows(z, z_e):
    """Rows (N, D) back to the layout and dtype of z_e (B, D, *spatial)."""
    B, D, *spatial = z_e.shape
    return z.reshape(B, *spatial, D).movedim(-1, 1).to(z_e.dtype)


def chunk_rows(K, D, device, chunk_size=None):
    """Rows per chunk: a (rows, K) block of 2^18 floats on a CPU (in cache), 2^26 on a GPU; at
    least D / 2, so each code read serves D / 2 latents (bench.py: 4.6x at K = 65,536, D = 128)."""
    return chunk_size or max(1, D // 2, (2 ** 26 if device.type == "cuda" else 2 ** 18) // K)


@torch.no_grad()
def nearest_code(z, codebook, chunk_size=None):
    """q_i = argmin_j ||z_i - c_j||^2 = argmax_j (2 z_i.c_j - ||c_j||^2): one matrix product
    per chunk of rows, ties to the lowest index. fp32, autocast off: bf16's cancellation decides
    near-ties wrongly (keep TF32 off on CUDA). Shapes: z (N, D), codebook (K, D) -> (N,) int64."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, codebook = z.to(dtype), codebook.to(dtype)
        bias = -codebook.pow(2).sum(1)  # (K,)
        rows = chunk_rows(*codebook.shape, z.device, chunk_size)
        indices = torch.empty(len(z), dtype=torch.long, device=z.device)  # (N,)
        for i in range(0, len(z), rows):  # one tensor: a list of them pinned 4 GiB (EXPERIMENTS 15)
            indices[i:i + rows] = torch.addmm(bias, z[i:i + rows], codebook.T, alpha=2).argmax(1)
        return indices


class VectorQuantizer(nn.Module):
    """VQ-VAE's quantizer (van den Oord et al., 2017), codes trained by gradient.

        codebook = ||sg(z_e) - z_q||^2          pulls each winning code towards its latents
        commit   = beta * ||z_e - sg(z_q)||^2   keeps the encoder near its codes (eq. 3)
        z_q      = sg(z_q) + z_e - sg(z_e)      straight-through estimator for the decoder

    usage_horizon, buffer_size: CodebookUpkeep's (section 4); chunk_size: see chunk_rows.
    Shapes: z_e (B, D, *spatial) -> z_q like z_e, indices (B, *spatial).
    """

    codebook_by_gradient = True  # EMAVectorQuantizer moves its codes in update_ instead
    reseeds = property(lambda self: len(self.upkeep.latent_pool) > 0)  # not SimVQ, FSQ: no pool

    def __init__(self, codebook_size, dim, beta=0.25, usage_horizon=64.0, buffer_size=None,
                 chunk_size=None):
        super().__init__()
        check_count("codebook_size", codebook_size, 1)
        check_count("dim", dim, 1)
        check_number("beta", beta, low=0)
        if chunk_size is not None:
            check_count("chunk_size", chunk_size, 1)
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.chunk_size = chunk_size
        self.upkeep = CodebookUpkeep(codebook_size, dim, usage_horizon, buffer_size)
        self.make_codebook(codebook_size, dim)

    def make_codebook(self, K, D):  # VQ-VAE's start; replacement re-seeds every code from data
        self.embedding = nn.Parameter(torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K))

    @property
    def codebook(self):  # (K, D): what the latents are matched against
        return self.embedding

    def forward(self, z_e):
        z = to_rows(z_e, self.dim)                                      # (N, D)
        codebook = self.codebook                                        # (K, D)
        indices = nearest_code(z, codebook, self.chunk_size)            # (N,)
        z_q = F.embedding(indices, codebook).to(z.dtype)                # (N, D)
        losses = {"codebook": F.mse_loss(z_q, z.detach())} if self.codebook_by_gradient else {}
        losses["commit"] = self.beta * F.mse_loss(z, z_q.detach())
        z_q = z_q.detach() + (z - z.detach())  # value exactly z_q, gradient straight to z_e
        indices = indices.view(z_e.shape[0], *z_e.shape[2:])           # (B, *spatial)
        return QuantizerOutput(from_rows(z_q, z_e), indices, losses, {})

    @torch.no_grad()
    def decode(self, indices):
        """(B, *spatial) int -> (B, D, *spatial)."""
        check_indices(indices, self.codebook_size)
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def update_(self, z_e, indices, refill=True):
        """Usage and (refill) the latent pool from the batch just trained on; counts (K,)."""
        z = to_rows(z_e.detach(), self.dim)
        check_indices(indices, self.codebook_size, len(z))
        return self.upkeep.observe_(z, indices.reshape(-1).long(), refill)

    @torch.no_grad()
    def replace_dead_codes_(self, threshold=0.01):
        """After update_: re-seed the codes used below threshold / K (part 2), live ones untouched;
        the (K,) mask of re-seeded codes (for reset_adam_state_)."""
        if not len(self.upkeep.latent_pool):
            raise NotImplementedError(f"{type(self).__name__} keeps no latent pool to re-seed from")
        mask, new = self.upkeep.reseed_(self.codebook.detach(), threshold)
        self.write_codes_(mask, new)
        return mask

    def write_codes_(self, mask, new):
        self.embedding.copy_(torch.where(mask[:, None], new, self.embedding))


# -----------------------------------------------------------------------------
# 2. The dense non-stationary loss (paper, part 1): plainly, then chunked
# -----------------------------------------------------------------------------

def dense_loss_reference(z, codebook, indices, tau, tau_mode="absolute"):
    """L_NS with explicit (N, K) matrices: the version to read against the paper.

        L_NS = 1/(N*D) * sum_i sum_{j != q_i} w_ij * ||sg(z_i) - c_j||^2
        w_ij = sg(softmax_j(-d_ij / T)),  T = tau           tau_mode="absolute" (the paper)
                                          T = tau * mean_i d_{i,q_i}   "relative" (ours)

    Every code is pulled towards the latents near it, in proportion to how near, so codes that
    win nothing still follow the encoder as it drifts; the winner is left out (the codebook term
    trains it). Returns (loss, kernel mass mean_i sum_{j != q_i} w_ij, T); only the codebook
    gets a gradient. Shapes: z (N, D), codebook (K, D), indices (N,).
    """
    N, D = z.shape
    z = z.detach()
    distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.T + codebook.pow(2).sum(1)
    d = distances.detach()  # (N, K)
    T = tau * d.gather(1, indices[:, None]).mean() if tau_mode == "relative" else tau
    w = torch.softmax(-d / T, dim=1).scatter(1, indices[:, None], 0.0)  # winner excluded
    return (w * distances).sum() / (N * D), w.sum(1).mean(), torch.as_tensor(T, dtype=d.dtype)


def dense_loss(z, codebook, indices, tau, tau_mode="absolute", chunk_size=None):
    """dense_loss_reference's (loss, mass, T) one chunk of rows at a time, tested equal to it.
    The weights carry no gradient, so the double sum collapses into per-code statistics:
        sum_ij w_ij ||z_i - c_j||^2 = sum_j (W_j ||c_j||^2 - 2 c_j.S_j + C_j),
        W_j = sum_i w_ij,   S_j = sum_i w_ij z_i,   C_j = sum_i w_ij ||z_i||^2.
    [S | W | C] = w^T [z, 1, ||z||^2] is one matrix product per chunk, (K, D+2) in all; autograd
    gives dL/dc_j = 2 (W_j c_j - S_j) / (N*D). A chunk costs the search's product again, an exp
    pass and one more product; the softmax drops the row constant ||z_i||^2 / T. fp32.
    """
    (N, D), K = z.shape, len(codebook)
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, c = z.detach().to(dtype), codebook.to(dtype)
        c_sg = c.detach()
        if tau_mode == "relative":
            tau = tau * (z - c_sg[indices]).pow(2).sum(1).mean().clamp(min=1e-12)
        z_aug = torch.cat([z, torch.ones_like(z[:, :1]), z.pow(2).sum(1, keepdim=True)], 1)
        stats = z.new_zeros(K, D + 2)  # [S | W | C]
        rows = chunk_rows(K, D, z.device, chunk_size)
        for i in range(0, N, rows):
            logits = torch.addmm(-c_sg.pow(2).sum(1), z[i:i + rows], c_sg.T, alpha=2)  # (n, K)
            # max subtracted before / T: finite at any T > 0. exp >= -60: smaller weights change
            # nothing, and subnormals made the CPU's matrix product ~20x slower (EXPERIMENTS 10)
            e = ((logits - logits.amax(1, keepdim=True)) / tau).clamp_(min=-60.0).exp_()
            w = e.div_(e.sum(1, keepdim=True))  # the softmax over all K codes
            w.scatter_(1, indices[i:i + rows, None], 0.0)  # the winner's own term is excluded
            stats.addmm_(w.T, z_aug[i:i + rows])
        S, W, C = stats[:, :D], stats[:, D], stats[:, D + 1]
        loss = ((W * c.pow(2).sum(1)).sum() - 2 * (S * c).sum() + C.sum()) / (N * D)
    return loss, W.sum() / N, torch.as_tensor(tau, dtype=dtype)


# -----------------------------------------------------------------------------
# 3. NSVQ: the STE quantizer plus the dense loss
# -----------------------------------------------------------------------------

class NSVQ(VectorQuantizer):
    """NSVQ: VectorQuantizer + the dense loss (part 1) + replacement (part 2, inherited), driven
    by StageSchedule (part 3). losses: "codebook", "commit" and "ns" = alpha * L_NS; diagnostics:
    "kernel_mass" (mean_i sum_{j != q_i} w_ij: near 0 the kernel is one-hot and the term does
    nothing, near 1 the winner gets almost no share) and "tau" (the T used). The term is on while
    self.dense and self.training (the loop sets vq.dense); else "ns" is 0 and diagnostics empty.
    Under Adam a code moves by about its learning rate per step whatever its gradient: this term
    alone cannot keep a slow codebook up (EXPERIMENTS.md, 7); replacement catches the rest.
    """

    def __init__(self, codebook_size, dim, beta=0.25, alpha=0.1, tau=0.35, tau_mode="absolute",
                 **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        set_dense_options(self, alpha, tau, tau_mode)

    def forward(self, z_e):
        return with_dense_loss(self, z_e, super().forward(z_e))


def set_dense_options(vq, alpha, tau, tau_mode):
    """Check and keep the dense loss's options on a quantizer; the term starts switched on."""
    check_number("alpha", alpha, low=0)
    check_number("tau", tau, low=0, low_open=True)
    check_choice("tau_mode", tau_mode, ("absolute", "relative"))
    vq.alpha, vq.tau, vq.tau_mode, vq.dense = alpha, tau, tau_mode, True


def with_dense_loss(vq, z_e, out):
    """out plus "ns" = alpha * L_NS on vq.codebook (a zero tensor while the term is off)."""
    codebook = vq.codebook
    if not (vq.dense and vq.training):
        return out._replace(losses={**out.losses, "ns": codebook.new_zeros(())})
    loss, mass, T = dense_loss(to_rows(z_e, vq.dim), codebook, out.indices.reshape(-1), vq.tau,
                               vq.tau_mode, vq.chunk_size)
    return out._replace(losses={**out.losses, "ns": vq.alpha * loss},
                        diagnostics={"kernel_mass": mass.detach(), "tau": T.detach()})


# -----------------------------------------------------------------------------
# 4. Replacement (paper, part 2)
# -----------------------------------------------------------------------------

class CodebookUpkeep(nn.Module):
    """Usage tracking and dead-code replacement; every quantizer owns one.

        u_j <- u_j + w (n_j / n - u_j),   w = min(1, n / (K * usage_horizon))
        dead: u_j < threshold / K

    n_j: latents won by code j in this call, all ranks. u averages the last H *expected
    assignments per code*: "dead" means the same at any batch, world size and K (unused, a code
    dies after ln(1/threshold) H = 295: 48 steps on MNIST, 590 at the paper's scale). Never-seeded
    codes are replaced whatever their usage (the first calls seed the codebook: EXPERIMENTS.md
    12). New codes come from a pool of buffer_size recent latents (None: K), a quarter renewed
    per call from every rank (the authors' earlier code; the paper's live codes + noise measured
    worse), each handed out once, none a copy of a code or candidate (flat regions encode to
    identical latents). Fixed shapes: nothing here waits for the device.
    """

    def __init__(self, codebook_size, dim, usage_horizon=64.0, buffer_size=None):
        super().__init__()
        check_number("usage_horizon", usage_horizon, low=0, low_open=True)
        capacity = codebook_size if buffer_size is None else buffer_size
        check_count("buffer_size", capacity, 0)
        self.usage_horizon = usage_horizon
        self.register_buffer("usage", torch.zeros(codebook_size))  # (K,)
        self.register_buffer("seeded", torch.zeros(codebook_size, dtype=torch.bool))
        self.register_buffer("latent_pool", torch.zeros(capacity, dim))  # (C, D)
        self.register_buffer("pool_fresh", torch.zeros(capacity, dtype=torch.bool))
        self.register_buffer("pool_written", torch.zeros((), dtype=torch.long))
        # Rows are compared by their projection on one direction, the same on every rank.
        key = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.register_buffer("key_direction", key, persistent=False)

    @torch.no_grad()
    def observe_(self, z, indices, refill=True):
        """Usage from this call's assignments, and (refill) latents into the pool; a non-finite
        latent (a skipped step) counts for nothing and is never handed out. (N, D), (N,) -> (K,)"""
        K, C = len(self.usage), len(self.latent_pool)
        ok = torch.isfinite(z).all(1)  # (N,)
        counts = torch.zeros_like(self.usage).index_add_(0, indices, ok.to(self.usage.dtype))
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(counts)  # [DDP]
        n = counts.sum()
        self.usage.lerp_(counts / n.clamp(min=1), (n / (K * self.usage_horizon)).clamp(max=1.0))
        if refill and C:
            take = min(len(z), -(-C // (4 * world)))  # this rank's share of a quarter pool
            new = z[torch.randperm(len(z), device=z.device)[:take]].to(self.latent_pool.dtype)
            if world > 1:  # [DDP] the same pool on every rank
                gathered = new.new_empty(world * take, new.shape[1])
                dist.all_gather_single(gathered, new.contiguous())
                new = gathered
            new = new[-C:]
            slots = (self.pool_written + torch.arange(len(new), device=new.device)) % C
            self.latent_pool[slots] = new
            self.pool_fresh[slots] = torch.isfinite(new).all(1)
            self.pool_written += len(new)
        return counts

    def dead(self, threshold=0.01):
        """(K,) mask of the codes whose usage is below threshold / K."""
        return self.usage < threshold / len(self.usage)

    @torch.no_grad()
    def reseed_(self, codebook, threshold=0.01):
        """(mask (K,), new (K, D)): the codes to re-seed and their vectors (other rows unused).
        Usage and pool are the same on every rank, so every rank picks the same codes."""
        check_number("threshold", threshold, low=0, high=1)
        K, C = len(self.usage), len(self.latent_pool)
        mask = self.dead(threshold) | ~self.seeded  # (K,)
        usable = self.usable_slots(codebook)  # (C,)
        order = torch.argsort((~usable).to(torch.uint8), stable=True)  # usable slots first
        rank = mask.cumsum(0) - 1  # (K,): the r-th code to re-seed takes the r-th usable slot
        mask = mask & (rank < usable.sum())  # the rest wait for the next call
        new = self.latent_pool[order[rank.clamp(0, C - 1)]].to(codebook.dtype)
        position = torch.empty_like(order)
        position[order] = torch.arange(C, device=order.device)  # each slot's place in `order`
        self.pool_fresh.copy_(usable & (position >= mask.sum()))  # each handed out once
        self.usage.masked_fill_(mask, 1.0 / K)
        self.seeded |= mask
        return mask, new

    def usable_slots(self, codebook):
        """(C,) mask: fresh latents that copy neither an earlier fresh one nor a code. Rows are
        compared by key (a float64 projection: distinct rows collide with negligible odds)."""
        key = lambda rows: rows.double() @ self.key_direction.double()  # noqa: E731
        keys = torch.where(self.pool_fresh, key(self.latent_pool), math.nan)  # NaN equals nothing
        sorted_keys, order = torch.sort(keys, stable=True)
        repeat = torch.zeros_like(self.pool_fresh)
        repeat[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
        code_keys = torch.sort(key(codebook)).values  # torch.isin would read the device twice
        hit = code_keys[torch.searchsorted(code_keys, keys).clamp(max=len(code_keys) - 1)] == keys
        return self.pool_fresh & ~repeat & ~hit


@torch.no_grad()
def reset_adam_state_(optimizer, param, mask):
    """Zero Adam's moments (Adam, AdamW, amsgrad) in the rows of param that mask (K,) marks:
    a re-seeded code should not inherit the momentum of the dead code it replaces."""
    for key, moment in optimizer.state.get(param, {}).items():
        if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment.masked_fill_(mask[:, None], 0.0)


# -----------------------------------------------------------------------------
# 5. The stage schedule (paper, part 3)
# -----------------------------------------------------------------------------

class StageSchedule:
    """NSVQ's stage-wise training as a small, passive, resumable state machine.

        stage1: everything trains; dense loss and replacement on; adversarial weight 1
                (0 with gan_stage1=False: the sources leave its start open)
        warmup: encoder frozen; reconstruction and codebook term only (no GAN, dense loss,
                replacement or commitment term: the encoder no longer moves)
        stage2: as warmup, plus the adversarial loss ramped 0 -> 1 over gan_ramp_epochs

    Stage 1 ends after an epoch if the epoch-mean commitment loss made no new best for
    `patience` epochs, or after epoch freeze_epoch - 1 (both None: one stage, as the baselines
    train). The paper's: the trigger, patience 10, the warm-up's contents, the 2-epoch ramp; ours:
    freeze_epoch, the warm-up's length. Given the all-ranks mean, all ranks move together.
    """

    STATE = ("stage", "best", "epochs_since_best", "stage_start")  # what a checkpoint keeps

    def __init__(self, patience=10, freeze_epoch=None, warmup_epochs=1, gan_ramp_epochs=2,
                 gan_stage1=True):
        for name, value, low in (("patience", patience, 1), ("freeze_epoch", freeze_epoch, 1),
                                 ("warmup_epochs", warmup_epochs, 0),
                                 ("gan_ramp_epochs", gan_ramp_epochs, 0)):
            if value is not None or low == 0:
                check_count(name, value, low)
        self.patience, self.freeze_epoch, self.gan_stage1 = patience, freeze_epoch, gan_stage1
        self.warmup_epochs, self.gan_ramp_epochs = warmup_epochs, gan_ramp_epochs
        self.stage, self.best, self.epochs_since_best = "stage1", math.inf, 0
        self.stage_start = {"stage1": 0}  # stage -> its first epoch

    def end_epoch(self, epoch, commit_loss):
        """Record the finished epoch `epoch` (0-based); True if the stage changed."""
        check_count("epoch", epoch, 0)
        check_number("commit_loss", float(commit_loss))
        before, done = self.stage, epoch + 1
        if self.stage == "stage1":
            if commit_loss < self.best:
                self.best, self.epochs_since_best = commit_loss, 0
            else:
                self.epochs_since_best += 1
            plateau = self.patience is not None and self.epochs_since_best >= self.patience
            if plateau or (self.freeze_epoch is not None and done >= self.freeze_epoch):
                self.stage, self.stage_start["warmup"] = "warmup", done
        if self.stage == "warmup" and done - self.stage_start["warmup"] >= self.warmup_epochs:
            self.stage, self.stage_start["stage2"] = "stage2", done  # at once if warmup_epochs=0
        return self.stage != before

    @property
    def encoder_trainable(self):
        return self.stage == "stage1"

    # The dense loss, replacement and the commitment term all run in stage 1 only.
    dense_loss = replacement = commitment = encoder_trainable

    def gan_weight(self, epoch_float):
        """Adversarial weight in [0, 1] at a fractional epoch (epoch + step / steps)."""
        check_number("epoch_float", epoch_float, low=0)
        if self.stage == "stage1":
            return 1.0 if self.gan_stage1 else 0.0
        if self.stage == "warmup" or self.gan_ramp_epochs == 0:
            return float(self.stage == "stage2")
        return min(1.0, max(0.0, (epoch_float - self.stage_start["stage2"]) / self.gan_ramp_epochs))

    def state_dict(self):
        return {key: copy.copy(getattr(self, key)) for key in self.STATE}

    def load_state_dict(self, state):
        if set(self.STATE) - set(state):
            raise ValueError(f"schedule state is missing {sorted(set(self.STATE) - set(state))}")
        check_choice("stage", state["stage"], ("stage1", "warmup", "stage2"))
        for key in self.STATE:
            setattr(self, key, copy.copy(state[key]))


# -----------------------------------------------------------------------------
# 6. Baselines: EMAVectorQuantizer, SimVQ, NSSimVQ, FSQ
# -----------------------------------------------------------------------------

class EMAVectorQuantizer(VectorQuantizer):
    """VQ-VAE-2's quantizer (Razavi et al., 2019): each code is a moving average of its latents.

        cluster_j <- decay * cluster_j + (1 - decay) * n_j              n_j: latents won by j
        sum_j     <- decay * sum_j     + (1 - decay) * sum_{q_i = j} z_i
        c_j = sum_j / smoothed_j,   smoothed = (cluster + eps) / (n + K eps) * n   (Laplace)

    No "codebook" loss. decay is per call: 0.8 beats 0.99 on MNIST; at 0.5 latents per code per
    step codes starve (EXPERIMENTS.md, 4).
    """

    codebook_by_gradient = False

    def __init__(self, codebook_size, dim, beta=0.25, decay=0.99, eps=1e-5, **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        check_number("decay", decay, low=0, high=1, high_open=True)
        check_number("eps", eps, low=0, low_open=True)
        self.decay, self.eps = decay, eps

    def make_codebook(self, K, D):
        self.register_buffer("embedding", torch.randn(K, D))
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", self.embedding.clone())

    @torch.no_grad()
    def update_(self, z_e, indices, refill=True):
        """Usage, then the EMA step on every rank's latents (none finite: no change)."""
        counts = super().update_(z_e, indices, refill)  # (K,), all ranks, finite latents
        z = to_rows(z_e.detach(), self.dim).to(self.embed_sum.dtype)
        z = torch.where(torch.isfinite(z).all(1, keepdim=True), z, 0.0)  # (N, D)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices.reshape(-1).long(), z)
        if dist.is_initialized():
            dist.all_reduce(sums)  # [DDP]
        step = (counts.sum() > 0).to(counts.dtype) * (1.0 - self.decay)
        self.cluster_size.lerp_(counts, step)
        self.embed_sum.lerp_(sums, step)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        return counts

    def write_codes_(self, mask, new):
        self.embedding.copy_(torch.where(mask[:, None], new, self.embedding))
        self.embed_sum.copy_(torch.where(mask[:, None], new, self.embed_sum))
        self.cluster_size.masked_fill_(mask, 1.0)


class SimVQ(VectorQuantizer):
    """SimVQ (Zhu et al., arXiv 2411.02038): a frozen random basis seen through one learnt map.

        codebook = basis @ W^T + b,   basis ~ N(0, 1/D) frozen,   W, b learnable (nn.Linear)

    Every code moves whenever W moves, so none is left behind; VectorQuantizer's losses train W
    and b (fp32, in every forward). No per-code parameter, no pool, nothing to re-seed.
    """

    def __init__(self, codebook_size, dim, beta=0.25, **kwargs):
        super().__init__(codebook_size, dim, beta, **{"buffer_size": 0, **kwargs})

    def make_codebook(self, K, D):
        self.register_buffer("basis", torch.randn(K, D) * D ** -0.5)
        self.proj = nn.Linear(D, D)

    @property
    def codebook(self):
        with torch.autocast(self.basis.device.type, enabled=False):
            return F.linear(self.basis, self.proj.weight, self.proj.bias)  # (K, D), fp32


class NSSimVQ(SimVQ):
    """SimVQ trained with NSVQ's dense loss and stages, as the paper also trains it: + {"ns":
    alpha * L_NS} on the effective codebook, so the term trains W and b through every code."""

    def __init__(self, codebook_size, dim, beta=0.25, alpha=0.1, tau=0.35, tau_mode="absolute",
                 **kwargs):
        super().__init__(codebook_size, dim, beta, **kwargs)
        set_dense_options(self, alpha, tau, tau_mode)

    def forward(self, z_e):
        return with_dense_loss(self, z_e, super().forward(z_e))


class FSQ(VectorQuantizer):
    """Finite scalar quantization (Mentzer et al., arXiv 2309.15505): no code to learn.

        h = W_in z  (d = len(levels) channels),   b_c = a_c tanh(h_c + s_c) - o_c   (bounded)
        q_c = round(b_c) / (L_c // 2), straight through,   z_q = W_out q + bias

    a_c = (L_c - 1)(1 + 1e-3) / 2; o_c = 1/2 for even L_c, else 0; s_c = atanh(o_c / a_c). Codes:
    the grid through W_out, indexed by the digits round(b_c) + L_c // 2 in mixed radix; no losses.
    """

    def __init__(self, levels, dim, usage_horizon=64.0):
        check_levels(levels)
        self.levels = tuple(levels)  # read by make_codebook, which VectorQuantizer calls
        super().__init__(math.prod(levels), dim, 0.0, usage_horizon, buffer_size=0)

    def make_codebook(self, K, D):
        self.proj_in, self.proj_out = nn.Linear(D, len(self.levels)), nn.Linear(len(self.levels), D)
        L = torch.tensor(self.levels)
        radix = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)  # the first digit fastest
        mid, scale, offset = (L // 2).float(), (L - 1) * (1 + 1e-3) / 2, (1 - L % 2) * 0.5
        grid = ((torch.arange(K)[:, None] // radix) % L - mid) / mid  # (K, d)
        for name, value in (("radix", radix), ("mid", mid), ("scale", scale), ("offset", offset),
                            ("shift", torch.atanh(offset / scale)), ("grid", grid)):
            self.register_buffer(name, value, persistent=False)

    @property
    def codebook(self):  # every grid point through W_out, (K, D)
        with torch.autocast(self.grid.device.type, enabled=False):
            return self.proj_out(self.grid)

    def forward(self, z_e):
        z = to_rows(z_e, self.dim)  # (N, D)
        with torch.autocast(z.device.type, enabled=False):
            b = self.scale * torch.tanh(self.proj_in(z) + self.shift) - self.offset  # (N, d)
            digits = (torch.round(b) + self.mid).nan_to_num(0.0)  # NaN: code 0, as argmax's
            indices = (digits.long() * self.radix).sum(1)  # (N,)
            u = b / self.mid  # value: the code's; gradient: through the rounding, to W_in and z
            z_q = F.embedding(indices, self.codebook)
            z_q = z_q + F.linear(u - u.detach(), self.proj_out.weight)  # (N, D)
        indices = indices.view(z_e.shape[0], *z_e.shape[2:])
        return QuantizerOutput(from_rows(z_q, z_e), indices, {}, {})


# The paper's levels (its Table 1) for about K codes; 8,192 is ours, as its 64,000 for 65,536.
FSQ_LEVELS = {256: (8, 6, 5), 1024: (8, 5, 5, 5), 4096: (7, 5, 5, 5, 5),
              8192: (8, 8, 5, 5, 5), 16384: (8, 8, 8, 6, 5), 65536: (8, 8, 8, 5, 5, 5)}


# -----------------------------------------------------------------------------
# 7. Argument checks
# -----------------------------------------------------------------------------

def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """ValueError unless value is a finite real number in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def check_count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def check_levels(levels):
    if not isinstance(levels, (tuple, list)) or not all(type(L) is int and L > 1 for L in levels) \
            or not levels:
        raise ValueError(f"levels must be a non-empty tuple of integers >= 2, got {levels!r}")


def check_latents(z_e, dim):
    if not (isinstance(z_e, torch.Tensor) and z_e.is_floating_point()):
        raise TypeError(f"z_e must be a floating-point tensor, got {getattr(z_e, 'dtype', z_e)}")
    if z_e.dim() < 2 or z_e.shape[1] != dim or z_e.numel() == 0:
        raise ValueError(f"z_e must be channel-first (B, D, *spatial), not empty, with D = {dim} "
                         f"(the codebook dim); got shape {tuple(z_e.shape)}")


def check_indices(indices, K, n=None):
    """The range is checked on the CPU only: on a GPU it would wait for the device."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32 or int64 tensor, got {indices!r:.60}")
    if n is not None and indices.numel() != n:
        raise ValueError(f"indices has {indices.numel()} entries but z_e holds {n} latents")
    if indices.device.type == "cpu" and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if not 0 <= low <= high < K:
            raise ValueError(f"indices must lie in [0, {K}), got [{low}, {high}]")

