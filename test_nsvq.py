"""Tests for nsvq.py and the scripts: oracles, gradient routing, behaviour, DDP, smoke.

Run with:  python -m pytest -q test_nsvq.py
Everything runs on the CPU with tiny tensors and fixed seeds.
"""

import argparse
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import experiments
import metrics
import nsvq
import train_imagenet
import train_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
QUANTIZERS = [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.SimVQ, nsvq.NSVQ, nsvq.NSSimVQ]


def make_fsq(K, D):
    return nsvq.FSQ(nsvq.FSQ_LEVELS.get(K, (3, 2, 2)), D)


# --- naive oracles, written without the matrix expansions ---------------------------------

def brute_force_distances(z, codebook):
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (N, K) by explicit differences


def naive_dense_loss(z, codebook, indices, tau):
    """L_NS with a Python loop over latents and codes (T given, in squared-distance units)."""
    N, D = z.shape
    total = 0.0
    for i in range(N):
        d = ((z[i].detach() - codebook) ** 2).sum(1)  # (K,)
        w = torch.exp(-d.detach() / tau) / torch.exp(-d.detach() / tau).sum()
        for j in range(len(codebook)):
            if j != int(indices[i]):
                total = total + w[j] * d[j]
    return total / (N * D)


def dead_mask_as_list(mask):
    return mask.nonzero().flatten().tolist()


# --- 1. oracles ---------------------------------------------------------------------------------

def test_chunked_search_picks_a_nearest_code_like_brute_force():
    torch.manual_seed(0)
    z = torch.randn(103, 5, dtype=torch.float64)
    codebook = torch.randn(37, 5, dtype=torch.float64)
    d = brute_force_distances(z, codebook)
    for chunk in (1, 7, 1000):
        idx = nsvq.nearest_code(z, codebook, chunk_size=chunk)
        torch.testing.assert_close(d.gather(1, idx[:, None]).squeeze(1), d.min(1).values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tau_mode", ["absolute", "relative"])
@pytest.mark.parametrize("K", [11, 128])
def test_the_chunked_dense_loss_equals_the_plain_one_and_both_the_naive_loop(tau_mode, K):
    torch.manual_seed(1)
    z = torch.randn(23, 4, dtype=torch.float64)
    codebook = torch.randn(K, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(K, (23,))  # arbitrary winners: both must exclude exactly these
    plain, plain_mass, plain_T = nsvq.dense_loss_reference(z, codebook, indices, 0.7, tau_mode)
    fast, fast_mass, fast_T = nsvq.dense_loss(z, codebook, indices, 0.7, tau_mode, chunk_size=5)
    T = 0.7 * float(((z - codebook.detach()[indices]) ** 2).sum(1).mean()) if tau_mode == "relative" else 0.7
    ref = naive_dense_loss(z, codebook, indices, T)
    for loss, mass, t in ((plain, plain_mass, plain_T), (fast, fast_mass, fast_T)):
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        assert float(t) == pytest.approx(T, rel=1e-9)
        torch.testing.assert_close(mass, fast_mass, rtol=1e-9, atol=0)
        g, = torch.autograd.grad(loss, codebook)
        g_ref, = torch.autograd.grad(ref, codebook, retain_graph=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


def test_nsvq_forward_adds_the_dense_term_with_its_own_winners():
    torch.manual_seed(2)
    vq = nsvq.NSVQ(13, 3, alpha=0.3, tau=0.5, chunk_size=4).double()
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(13, 3))
    z_e = torch.randn(2, 3, 5, dtype=torch.float64)
    out = vq(z_e)
    z = z_e.movedim(1, -1).reshape(-1, 3)
    winners = brute_force_distances(z, vq.embedding.detach()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), winners)
    ref = 0.3 * naive_dense_loss(z, vq.embedding, winners, 0.5)
    torch.testing.assert_close(out.losses["ns"], ref, rtol=1e-6, atol=0)
    g, = torch.autograd.grad(out.losses["ns"], vq.embedding)
    g_ref, = torch.autograd.grad(ref, vq.embedding)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


def test_ema_update_matches_closed_form():
    torch.manual_seed(3)
    K, D, decay, eps = 6, 2, 0.9, 1e-3
    vq = nsvq.EMAVectorQuantizer(K, D, decay=decay, eps=eps).double()
    e0 = vq.embedding.clone()
    z_e = torch.randn(20, D, dtype=torch.float64)
    idx = vq(z_e).indices
    vq.update_(z_e, idx)
    counts = torch.tensor([float((idx == k).sum()) for k in range(K)], dtype=torch.float64)
    sums = torch.stack([z_e[idx == k].sum(0) for k in range(K)])
    cluster = decay * 1.0 + (1 - decay) * counts  # statistics start at one assignment per code
    n = cluster.sum()
    expected = (decay * e0 + (1 - decay) * sums) / ((cluster + eps) / (n + K * eps) * n)[:, None]
    torch.testing.assert_close(vq.cluster_size, cluster, rtol=1e-12, atol=0)
    torch.testing.assert_close(vq.embedding, expected, rtol=1e-12, atol=0)


def test_fsq_codebook_is_the_product_grid_and_its_indices_name_the_rounded_levels():
    levels = (8, 5, 3)
    vq = nsvq.FSQ(levels, 4)
    grid = vq.grid  # (K, d): every point once
    assert vq.codebook_size == 120 == len(torch.unique(grid, dim=0))
    for c, L in enumerate(levels):
        expected = (torch.arange(L) - L // 2).double() / (L // 2)
        assert torch.equal(torch.unique(grid[:, c]).double(), expected)
    torch.testing.assert_close(vq.codebook, vq.proj_out(grid))
    z_e = torch.randn(5, 4, 3) * 3
    out = vq(z_e)
    h = vq.proj_in(z_e.movedim(1, -1).reshape(-1, 4))
    L, half = torch.tensor(levels, dtype=torch.float32), torch.tensor([4.0, 2.0, 1.0])
    a, o = (L - 1) * 1.001 / 2, (1 - L % 2) * 0.5  # the bound, written out
    rounded = torch.round(a * torch.tanh(h + torch.atanh(o / a)) - o)  # (N, d) levels
    assert torch.equal(grid[out.indices.reshape(-1)], rounded / half)


# --- 2. gradient routing ------------------------------------------------------------------------

def grads_of(term, *tensors):
    gs = torch.autograd.grad(term, tensors, retain_graph=True, allow_unused=True)
    return [None if g is None or not g.abs().sum() else g for g in gs]


def test_codebook_term_reaches_codebook_only_and_commit_reaches_encoder_only():
    torch.manual_seed(4)
    vq = nsvq.VectorQuantizer(8, 3)
    z_e = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = vq(z_e)
    g_z, g_c = grads_of(out.losses["codebook"], z_e, vq.embedding)
    assert g_z is None and g_c is not None
    g_z, g_c = grads_of(out.losses["commit"], z_e, vq.embedding)
    assert g_z is not None and g_c is None


@pytest.mark.parametrize("cls", [nsvq.NSVQ, make_fsq])
def test_straight_through_passes_the_decoder_gradient_to_z_e(cls):
    torch.manual_seed(5)
    vq = cls(8, 3)
    z_e = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = vq(z_e)
    upstream = torch.randn_like(out.z_q)
    g_z, = torch.autograd.grad(out.z_q, z_e, upstream)
    if cls is nsvq.NSVQ:  # the identity
        assert torch.equal(g_z, upstream)
    else:  # FSQ: through W_out, the bound and W_in, as if there were no rounding
        z = z_e.detach().requires_grad_()
        h = vq.proj_in(z.movedim(1, -1))
        b = (vq.scale * torch.tanh(h + vq.shift) - vq.offset) / vq.mid
        smooth = torch.nn.functional.linear(b, vq.proj_out.weight).movedim(-1, 1)
        g_ref, = torch.autograd.grad(smooth, z, upstream)
        torch.testing.assert_close(g_z, g_ref)
        assert out.losses == {}


def test_dense_term_reaches_codebook_only_including_codes_that_win_nothing():
    torch.manual_seed(6)
    vq = nsvq.NSVQ(16, 2, tau=2.0)
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(16, 2))
    z_e = torch.randn(5, 2, requires_grad=True)
    out = vq(z_e)
    g_z, g_c = grads_of(out.losses["ns"], z_e, vq.embedding)
    assert g_z is None
    losers = torch.ones(16, dtype=torch.bool)
    losers[out.indices] = False
    assert (g_c[losers].abs().sum(1) > 0).all()  # every non-winner is pulled
    _, g_cb = torch.autograd.grad(out.losses["codebook"], (z_e, vq.embedding), allow_unused=True)
    assert (g_cb[losers] == 0).all()  # the STE codebook term moves winners only


def test_dense_term_is_a_zero_tensor_when_switched_off_and_keys_stay_fixed():
    vq = nsvq.NSVQ(8, 3)
    z_e = torch.randn(4, 3)
    assert set(vq(z_e).losses) == {"codebook", "commit", "ns"} and vq(z_e).losses["ns"] > 0
    vq.dense = False
    assert vq(z_e).losses["ns"] == 0 and vq(z_e).diagnostics == {}
    vq.dense = True
    vq.eval()
    assert vq(z_e).losses["ns"] == 0
    assert set(nsvq.EMAVectorQuantizer(8, 3)(z_e).losses) == {"commit"}
    assert set(nsvq.SimVQ(8, 3)(z_e).losses) == {"codebook", "commit"}


def test_simvq_trains_the_map_not_the_basis_and_with_the_dense_loss_matches_the_oracle():
    torch.manual_seed(12)
    vq = nsvq.SimVQ(8, 3)
    sum(vq(torch.randn(4, 3, 5)).losses.values()).backward()
    assert vq.proj.weight.grad.abs().sum() > 0 and vq.proj.bias.grad.abs().sum() > 0
    assert "basis" in dict(vq.named_buffers()) and not vq.basis.requires_grad
    vq = nsvq.NSSimVQ(16, 3, alpha=0.5, tau=0.2)
    torch.nn.init.normal_(vq.proj.weight, std=0.7)
    z_e = torch.randn(2, 3, 4, 5)
    out = vq(z_e)
    z = z_e.movedim(1, -1).reshape(-1, 3).double()
    weight = vq.proj.weight.detach().double().requires_grad_()
    book = torch.nn.functional.linear(vq.basis.double(), weight, vq.proj.bias.detach().double())
    indices = brute_force_distances(z, book.detach()).argmin(1)
    reference = 0.5 * naive_dense_loss(z, book, indices, 0.2)
    assert torch.equal(out.indices.reshape(-1), indices)
    torch.testing.assert_close(out.losses["ns"].double(), reference, rtol=1e-5, atol=1e-7)
    reference.backward()
    out.losses["ns"].backward()  # the dense term alone reaches W, through codes that win nothing
    torch.testing.assert_close(vq.proj.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-7)


# --- 3. behaviour -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", QUANTIZERS + [make_fsq])
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3), (2, 4, 3, 5)])
def test_decode_of_indices_equals_z_q_for_every_quantizer_and_layout(cls, shape):
    torch.manual_seed(7)
    vq = cls(256, 4)
    z_e = torch.randn(*shape)
    out = vq(z_e)
    assert out.z_q.shape == z_e.shape and out.indices.shape == (shape[0], *shape[2:])
    assert out.indices.dtype == torch.int64
    assert torch.equal(vq.decode(out.indices), out.z_q)


def test_usage_follows_the_formula_with_a_weight_of_n_over_k_h_per_call():
    K, H = 4, 8.0
    vq = nsvq.VectorQuantizer(K, 2, usage_horizon=H)
    expected = [0.0] * K
    g = torch.Generator().manual_seed(0)
    for n in (8, 3, 40, 1, 16):  # the last but one call alone is larger than K * H = 32
        idx = torch.randint(K, (n,), generator=g)
        vq.update_(torch.randn(n, 2, generator=g), idx)
        w = min(1.0, n / (K * H))
        for k in range(K):
            expected[k] += w * (sum(1 for i in idx.tolist() if i == k) / n - expected[k])
    torch.testing.assert_close(vq.upkeep.usage, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def steps_until_dead(K, latents_per_step, H=64.0):
    """Steps after a code stops being chosen until it counts as dead (usage < 0.01 / K)."""
    vq = nsvq.VectorQuantizer(K, 2, usage_horizon=H, buffer_size=0)
    vq.upkeep.usage.fill_(1.0 / K)
    idx = torch.arange(1, latents_per_step + 1) % (K - 1) + 1  # code 0 is never chosen again
    z = torch.zeros(latents_per_step, 2)
    for step in range(1, 100_000):
        vq.update_(z, idx)
        if vq.upkeep.dead()[0]:
            return step


def test_a_code_dies_after_the_same_number_of_expected_assignments_at_any_scale():
    # MNIST: K = 1024, 6 latents per code per step; a GPU of the paper: 0.06; its node: 0.5
    per_code = [steps_until_dead(K, n) * n / K for K, n in ((1024, 6272), (65536, 4096), (16384, 8192))]
    for a in per_code:
        assert a == pytest.approx(math.log(100) * 64, rel=0.05)  # ln(1/threshold) * H = 295


def test_at_half_a_latent_per_code_slow_codes_survive_and_never_chosen_codes_are_reseeded():
    # The paper's ratio: K = 16,384, 8,192 latents per step. A quarter of the codes is chosen at
    # 30% of the uniform rate, a quarter never; replacement runs every step.
    K, N, steps = 16384, 8192, 700
    g = torch.Generator().manual_seed(0)
    rate = torch.ones(K)
    rate[: K // 4], rate[K // 4: K // 2] = 0.3, 0.0
    vq = nsvq.VectorQuantizer(K, 4)
    seeded_at, reseeded = torch.full((K,), -1), torch.zeros(K, dtype=torch.long)
    for step in range(steps):
        idx = torch.multinomial(rate, N, replacement=True, generator=g)
        vq.update_(torch.randn(N, 4, generator=g), idx)
        mask = vq.replace_dead_codes_()
        reseeded += mask
        seeded_at[mask & (seeded_at < 0)] = step
    assert (seeded_at >= 0).all() and seeded_at.max() <= 3  # the first four calls seed every code
    assert reseeded[: K // 4].max() == 1  # live but slow: never re-seeded after the first seeding
    assert (reseeded[K // 4: K // 2] >= 2).all()  # never chosen: re-seeded again, ...
    assert reseeded[K // 2:].max() == 1  # ... and codes at the uniform rate are left alone


def mixture(n, modes, generator):
    pick = torch.randint(len(modes), (n,), generator=generator)
    return modes[pick] + 0.5 * torch.randn(n, modes.shape[1], generator=generator)


def test_replacement_writes_distinct_latents_and_the_codebook_covers_the_data_like_iid_samples():
    g = torch.Generator().manual_seed(1)
    K, D = 8192, 32
    modes = 2 * torch.randn(512, D, generator=g)
    vq = nsvq.NSVQ(K, D)
    for _ in range(4):
        z = mixture(4096, modes, g)
        vq.update_(z, vq(z).indices)
        vq.replace_dead_codes_()
    codebook = vq.codebook.detach()
    assert experiments.duplicate_codes(codebook) == 0 and vq.upkeep.seeded.all()
    fresh = mixture(16384, modes, g)
    used = len(torch.unique(nsvq.nearest_code(fresh, codebook)))
    assert used >= 0.95 * len(torch.unique(nsvq.nearest_code(fresh, mixture(K, modes, g))))


def test_identical_latents_and_copies_of_codes_are_never_written_twice():
    K, D = 16, 2
    vq = nsvq.VectorQuantizer(K, D, buffer_size=64)  # 16 latents enter the pool per call
    z = torch.zeros(16, D)  # a flat image region: every latent is the same vector, ...
    z[:5] = torch.arange(1.0, 11.0).view(5, 2)  # ... but five
    vq.update_(z, torch.zeros(16, dtype=torch.long))
    assert int(vq.replace_dead_codes_().sum()) == 6  # 5 distinct latents, one copy of the flat one
    assert experiments.duplicate_codes(vq.codebook.detach()) == 0 and (~vq.upkeep.seeded).sum() == 10
    vq.update_(z, torch.zeros(16, dtype=torch.long))
    assert int(vq.replace_dead_codes_().sum()) == 0  # only copies of existing codes are left: retired
    assert experiments.duplicate_codes(vq.codebook.detach()) == 0 and not vq.upkeep.pool_fresh.any()


@pytest.mark.parametrize("cls", [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.NSVQ])
def test_replacement_reseeds_exactly_the_dead_codes_and_leaves_live_ones_bit_identical(cls):
    torch.manual_seed(8)
    vq = cls(8, 3, buffer_size=64)
    vq.upkeep.seeded.fill_(True)  # a codebook already initialised: only usage decides
    z = torch.randn(64, 3)
    vq.update_(z, torch.tensor([0, 1, 2, 5] * 16))  # codes 3, 4, 6, 7 never used
    before = vq.codebook.detach().clone()
    mask = vq.replace_dead_codes_()
    assert dead_mask_as_list(mask) == [3, 4, 6, 7]
    after, live = vq.codebook.detach(), ~mask
    assert torch.equal(after[live], before[live]) and not torch.equal(after[mask], before[mask])
    torch.testing.assert_close(vq.upkeep.usage[mask], torch.full((4,), 1 / 8))
    assert (brute_force_distances(after[mask], z).min(1).values < 1e-10).all()  # recent latents
    if cls is nsvq.EMAVectorQuantizer:
        assert torch.equal(vq.embed_sum[mask], after[mask]) and (vq.cluster_size[mask] == 1).all()
    assert not vq.replace_dead_codes_().any()  # nothing is dead right after


def test_replacement_from_live_codes_plus_noise_as_the_paper_describes():
    torch.manual_seed(8)
    vq = nsvq.NSVQ(8, 3)
    vq.upkeep = experiments.UpkeepFromCodes(8, 3, seeded=True)
    vq.update_(torch.randn(64, 3), torch.tensor([0, 1, 2, 5] * 16))
    before = vq.codebook.detach().clone()
    mask = vq.replace_dead_codes_()
    assert dead_mask_as_list(mask) == [3, 4, 6, 7]
    d = brute_force_distances(vq.codebook.detach()[mask], before[~mask]).min(1).values.sqrt()
    assert (d < 0.1 * before.pow(2).mean().sqrt()).all()  # noise: 1% of the codebook's RMS


def test_upkeep_never_reads_the_device_it_runs_on_meta_tensors():
    # On the meta device every value is unknown: a .item(), a nonzero() or a boolean-mask index
    # (each a wait for the GPU there) raises. Usage, refill and replacement must run through.
    for vq in (nsvq.NSVQ(64, 3), nsvq.EMAVectorQuantizer(64, 3), nsvq.VectorQuantizer(64, 3)):
        vq = vq.to("meta")
        z_e = torch.randn(40, 3, device="meta")
        indices = torch.zeros(40, dtype=torch.long, device="meta")
        vq.update_(z_e, indices)
        opt = torch.optim.Adam([torch.zeros(64, 3, device="meta", requires_grad=True)])
        opt.state[opt.param_groups[0]["params"][0]] = {"exp_avg": torch.zeros(64, 3, device="meta")}
        nsvq.reset_adam_state_(opt, opt.param_groups[0]["params"][0], vq.replace_dead_codes_())
    with pytest.raises(NotImplementedError):  # and the test can fail: a read does raise there
        torch.zeros(3, device="meta").nonzero()


def test_replacement_needs_a_pool_and_before_any_update_seeds_nothing():
    for vq in (nsvq.SimVQ(4, 2), make_fsq(256, 2), nsvq.VectorQuantizer(4, 2, buffer_size=0)):
        with pytest.raises(NotImplementedError, match="no latent pool"):
            vq.replace_dead_codes_()
    vq = nsvq.NSVQ(4, 2)
    before = vq.codebook.detach().clone()
    assert not vq.replace_dead_codes_().any() and torch.equal(vq.codebook.detach(), before)
    vq.update_(torch.randn(8, 2), torch.arange(8) % 4)
    with pytest.raises(ValueError, match="threshold"):
        vq.replace_dead_codes_(threshold=2.0)


def test_non_finite_latents_leave_usage_pool_and_ema_codebook_as_they_were():
    torch.manual_seed(9)
    vq = nsvq.EMAVectorQuantizer(8, 3)
    z = torch.randn(32, 3)
    vq.update_(z, vq(z).indices)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.update_(torch.full((32, 3), float("nan")), torch.zeros(32, dtype=torch.long))  # a skipped step
    for k, v in vq.state_dict().items():
        if "pool" not in k:
            assert torch.equal(v, state[k]), k
    written = ~torch.isfinite(vq.upkeep.latent_pool).all(1)  # rows are written, ...
    assert written.any() and not (written & vq.upkeep.pool_fresh).any()  # ... never handed out


def test_reset_adam_state_zeroes_only_the_given_rows():
    vq = nsvq.VectorQuantizer(6, 2)
    opt = torch.optim.Adam(vq.parameters(), lr=0.1)
    sum(vq(torch.randn(10, 2)).losses.values()).backward()
    opt.step()
    state = opt.state[vq.embedding]
    state["exp_avg"].fill_(1.0)
    state["exp_avg_sq"].fill_(1.0)
    nsvq.reset_adam_state_(opt, vq.embedding, torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool))
    assert (state["exp_avg"][[1, 4]] == 0).all() and (state["exp_avg_sq"][[1, 4]] == 0).all()
    assert (state["exp_avg"][[0, 2, 3, 5]] == 1).all()


def test_stage_schedule_freezes_on_plateau_then_warms_up_then_ramps_the_gan():
    s = nsvq.StageSchedule(patience=2, warmup_epochs=2, gan_ramp_epochs=2)
    assert s.stage == "stage1" and s.encoder_trainable and s.dense_loss and s.gan_weight(0.5) == 1.0
    assert not s.end_epoch(0, 1.0)
    assert not s.end_epoch(1, 0.5)   # new best
    assert not s.end_epoch(2, 0.6)   # 1 epoch without a new best
    assert s.end_epoch(3, 0.5)       # 2 epochs (equal is not better) -> freeze
    assert s.stage == "warmup" and s.stage_start["warmup"] == 4
    assert not (s.encoder_trainable or s.dense_loss or s.replacement or s.commitment)
    assert s.gan_weight(4.5) == 0.0
    assert not s.end_epoch(4, 9.9)   # warm-up epoch 1 of 2
    assert s.end_epoch(5, 9.9)
    assert s.stage == "stage2" and s.stage_start["stage2"] == 6
    assert s.gan_weight(6.0) == 0.0 and s.gan_weight(7.0) == 0.5 and s.gan_weight(9.0) == 1.0
    late = nsvq.StageSchedule(patience=1, warmup_epochs=0, gan_ramp_epochs=0, gan_stage1=False)
    assert late.gan_weight(0.5) == 0.0  # the GAN kept out of stage 1
    late.end_epoch(0, 1.0)
    late.end_epoch(1, 1.0)
    assert late.stage == "stage2" and late.stage_start["stage2"] == 2 and late.gan_weight(2.0) == 1.0


def test_stage_schedule_freeze_epoch_a_single_stage_and_a_resume_mid_stage():
    s = nsvq.StageSchedule(patience=100, freeze_epoch=3, warmup_epochs=0)
    assert not s.end_epoch(0, 3.0) and not s.end_epoch(1, 2.0)
    assert s.end_epoch(2, 1.0)  # epoch + 1 >= freeze_epoch, although the loss still improves
    assert s.stage == "stage2" and s.stage_start == {"stage1": 0, "warmup": 3, "stage2": 3}
    one = nsvq.StageSchedule(patience=None, freeze_epoch=None)
    assert not any(one.end_epoch(epoch, 1.0) for epoch in range(50)) and one.stage == "stage1"
    a, b = nsvq.StageSchedule(patience=3, warmup_epochs=1), nsvq.StageSchedule(patience=3, warmup_epochs=1)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.1, 0.1]
    for epoch, loss in enumerate(losses[:3]):
        a.end_epoch(epoch, loss)
    b.load_state_dict(a.state_dict())
    for epoch, loss in enumerate(losses[3:], start=3):
        assert a.end_epoch(epoch, loss) == b.end_epoch(epoch, loss)
    assert a.state_dict() == b.state_dict() and b.stage == "stage2"
    with pytest.raises(ValueError, match="finite"):
        b.end_epoch(7, float("nan"))
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"stage": "warmup"})


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_state_dict_round_trip_preserves_codebook_statistics_and_buffers(cls):
    torch.manual_seed(9)
    vq = cls(8, 3)
    for _ in range(3):
        z = torch.randn(16, 3)
        vq.update_(z, vq(z).indices)
    clone = cls(8, 3)
    clone.load_state_dict(vq.state_dict())
    for (name, a), (_, b) in zip(vq.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(clone.codebook, vq.codebook)
    assert {"upkeep.usage", "upkeep.seeded", "upkeep.pool_fresh", "upkeep.pool_written"} <= set(vq.state_dict())


@pytest.mark.parametrize("bad, error", [
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(2, 4, 5)), "D = 3"),
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(3)), "channel-first"),
    (lambda: nsvq.NSVQ(8, 3)(torch.ones(2, 3, dtype=torch.long)), "floating"),
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(0, 3, 4)), "not empty"),
    (lambda: nsvq.VectorQuantizer(0, 3), "codebook_size"),
    (lambda: nsvq.VectorQuantizer(8, 3, beta=-1.0), "beta"),
    (lambda: nsvq.VectorQuantizer(8, 3, usage_horizon=0), "usage_horizon"),
    (lambda: nsvq.VectorQuantizer(8, 3, buffer_size=-1), "buffer_size"),
    (lambda: nsvq.EMAVectorQuantizer(8, 3, decay=1.5), "decay"),
    (lambda: nsvq.NSVQ(8, 3, tau=0.0), "tau"), (lambda: nsvq.NSVQ(8, 3, tau=float("inf")), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau=float("nan")), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau_mode="adaptive"), "tau_mode"),
    (lambda: nsvq.NSVQ(8, 3, alpha=float("nan")), "alpha"),
    (lambda: nsvq.NSVQ(8, 3).decode(torch.tensor([[0, 8]])), r"\[0, 8\)"),
    (lambda: nsvq.NSVQ(8, 3).decode(torch.tensor([0.0])), "int"),
    (lambda: nsvq.NSVQ(8, 3).update_(torch.randn(4, 3), torch.tensor([0, 1, 2, 9])), r"\[0, 8\)"),
    (lambda: nsvq.NSVQ(8, 3).update_(torch.randn(4, 3), torch.tensor([0, 1])), "4 latents"),
    (lambda: nsvq.StageSchedule(patience=0), "patience"),
    (lambda: nsvq.StageSchedule(warmup_epochs=1.5), "warmup_epochs"),
    (lambda: nsvq.StageSchedule(freeze_epoch=1).end_epoch(float("nan"), 1.0), "epoch"),
    (lambda: nsvq.StageSchedule().end_epoch(0, float("nan")), "commit_loss"),
    (lambda: nsvq.StageSchedule().gan_weight(float("nan")), "epoch_float"),
    (lambda: nsvq.StageSchedule().load_state_dict({**nsvq.StageSchedule().state_dict(), "stage": "bogus"}),
     "stage"),
    (lambda: nsvq.FSQ((), 4), "levels"), (lambda: nsvq.FSQ((8, 1, 5), 4), "levels"),
    (lambda: nsvq.FSQ((-8, -5), 4), "levels"), (lambda: nsvq.FSQ(8, 4), "levels"),
    (lambda: nsvq.FSQ((1,), 4), "levels"), (lambda: nsvq.FSQ((8.0, 5), 4), "levels"),
    (lambda: nsvq.VectorQuantizer(8, 3, chunk_size=-1), "chunk_size"),
])
def test_bad_inputs_raise_clear_errors(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        bad()


def test_a_tiny_absolute_tau_gives_the_one_hot_limit_not_nan():
    torch.manual_seed(0)
    z, codebook = torch.randn(50, 4), torch.randn(16, 4, requires_grad=True)
    indices = nsvq.nearest_code(z, codebook)
    for tau in (1e-40, 1e-20):
        loss, mass, _ = nsvq.dense_loss(z, codebook, indices, tau)
        assert torch.isfinite(loss) and float(mass) < 1e-12  # the winner takes all, and is left out
    assert float(nsvq.dense_loss(z, codebook, indices, 1e-3)[0].detach()) > 0  # wider: other codes pulled
    out = nsvq.NSVQ(16, 4, tau=1e-40)(torch.randn(3, 4, 5))
    assert all(torch.isfinite(v) for v in out.losses.values())


@pytest.mark.parametrize("cls", QUANTIZERS + [make_fsq])
def test_a_nan_latent_gets_a_valid_index_in_every_quantizer(cls):
    torch.manual_seed(0)
    vq = cls(256, 4)
    z_e = torch.randn(2, 4, 3)
    z_e[0, :, 1] = float("nan")
    out = vq(z_e)
    assert out.indices.shape == (2, 3) and 0 <= int(out.indices.min()) <= int(out.indices.max()) < 256
    assert torch.isnan(out.z_q[0, :, 1]).all() and torch.isfinite(out.z_q[1]).all()


def test_replacement_calls_no_operator_that_waits_for_the_device():
    # Every aten operator replacement calls is recorded: none of those that read a value back
    # to the host (an item, a data-dependent shape: unique, nonzero, masked_select, isin's sort
    # path). The meta-tensor test cannot see these, as some have meta kernels.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))
    syncing = ("_local_scalar_dense", "item", "unique", "_unique", "_unique2", "unique_consecutive", "nonzero",
               "masked_select", "is_nonzero", "equal", "isin")
    torch.manual_seed(0)
    for vq in (nsvq.NSVQ(64, 3), nsvq.EMAVectorQuantizer(64, 3)):
        vq.update_(torch.randn(40, 3), torch.randint(0, 64, (40,)))
        called = []
        with Record():
            mask = vq.replace_dead_codes_()
        assert mask.any() and called and not {c.split(".")[-1] for c in called} & set(syncing), called


@pytest.mark.parametrize("cls", QUANTIZERS + [make_fsq])
def test_indices_under_bf16_autocast_equal_the_fp32_indices(cls):
    torch.manual_seed(10)
    vq = cls(512, 8) if cls is not make_fsq else make_fsq(1024, 8)
    if isinstance(vq, nsvq.SimVQ):  # a trained-looking map, not the identity-ish initial one
        torch.nn.init.normal_(vq.proj.weight, std=0.5)
    elif not isinstance(vq, nsvq.FSQ):
        with torch.no_grad():
            vq.codebook.copy_(torch.randn(512, 8))
    conv = torch.nn.Conv2d(8, 8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_e = conv(torch.randn(4, 8, 8, 8))
        assert z_e.dtype == torch.bfloat16
        out = vq(z_e)
        assert vq.codebook.dtype == torch.float32
    assert out.z_q.dtype == torch.bfloat16
    assert torch.equal(out.indices, vq(z_e.float()).indices)  # the same latents without autocast
    if not isinstance(vq, nsvq.FSQ):
        z = z_e.float().movedim(1, -1).reshape(-1, 8).double()
        reference = brute_force_distances(z, vq.codebook.detach().double()).argmin(1)
        assert torch.equal(out.indices.reshape(-1), reference)
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def test_the_forward_compiles_in_one_graph_and_so_does_fsq():
    torch._dynamo.reset()
    for vq in (nsvq.NSVQ(32, 4, tau_mode="relative"), make_fsq(256, 4)):
        z_e = torch.randn(2, 4, 3, 3)
        eager = vq(z_e)
        compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)(z_e)  # fullgraph: no break
        assert torch.equal(compiled.indices, eager.indices)
        for key in eager.losses:
            torch.testing.assert_close(compiled.losses[key], eager.losses[key], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_codebook_stats_and_the_relative_temperature_keep_the_kernel_at_any_latent_scale():
    assert metrics.codebook_stats(torch.tensor([2, 2, 0, 0])) == {"utilization": 0.5, "perplexity": pytest.approx(2.0),
                                                               "dead_codes": 2}
    torch.manual_seed(13)
    z, codebook = torch.randn(256, 16), torch.randn(128, 16)
    idx = nsvq.nearest_code(z, codebook)
    d_mean = float((z - codebook[idx]).pow(2).sum(1).mean())
    base_loss, base_mass, base_T = nsvq.dense_loss(z, codebook, idx, 0.5, "relative")
    assert float(base_T) == pytest.approx(0.5 * d_mean, rel=1e-5)
    for scale in (0.1, 10.0):
        loss, mass, _ = nsvq.dense_loss(z * scale, codebook * scale, idx, 0.5, "relative")
        torch.testing.assert_close(mass, base_mass, rtol=1e-4, atol=0)
        torch.testing.assert_close(loss, base_loss * scale ** 2, rtol=1e-4, atol=0)
    absolute = [float(nsvq.dense_loss(z * s, codebook * s, idx, 0.5 * d_mean)[1]) for s in (0.1, 1.0, 10.0)]
    assert absolute[0] > 0.95 and absolute[2] < 0.05  # the same absolute tau: uniform, or inert


# --- 4. DDP: two gloo processes --------------------------------------------------------------

def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for name, make in (("nsvq", nsvq.NSVQ), ("ema", nsvq.EMAVectorQuantizer), ("ste", nsvq.VectorQuantizer),
                       ("from codes", nsvq.NSVQ)):
        torch.manual_seed(0)
        vq = make(32, 3)  # the same initial codebook on both ranks
        if name == "from codes":
            vq.upkeep = experiments.UpkeepFromCodes(32, 3)
        torch.manual_seed(100 + rank)  # ranks see different data and draw different random numbers
        for step in range(12):
            z_e = torch.randn(2, 3, 4, 4) * (1 + rank)
            if step == 5:
                z_e[:, :, :2] = 0.0  # identical latents on both ranks: copies must not be written
            vq.update_(z_e, vq(z_e).indices)
            if step % 2 == 1:
                vq.replace_dead_codes_()
        out[name] = {k: v.clone() for k, v in vq.state_dict().items()}
    results[rank] = out
    dist.destroy_process_group()


def test_ddp_ranks_with_different_data_keep_bitwise_identical_quantizer_state():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, 29500 + os.getpid() % 1000, results), nprocs=2, join=True)
    for name in ("nsvq", "ema", "ste", "from codes"):
        a, b = results[0][name], results[1][name]
        for key in a:  # codebook, usage, seeded, latent pool, EMA statistics: every buffer
            assert torch.equal(a[key], b[key]), (name, key)
        assert a["upkeep.seeded"].all() and experiments.duplicate_codes(a["embedding"]) == 0, name


def _watchdog_worker(rank, port, done):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report = train_imagenet.watch_for_failures(rank)
    if rank == 1:  # fails, and stays alive without taking part: a peer that cannot exit
        report("DataError: injected")
        time.sleep(60)
    dist.barrier()  # rank 0 waits here for a rank that never comes: only the watchdog ends it
    done.value = 1


def test_a_failed_rank_that_stays_alive_stops_the_others_within_seconds():
    done = mp.get_context("spawn").Value("i", 0)
    port = 31500 + os.getpid() % 1000
    procs = [mp.get_context("spawn").Process(target=_watchdog_worker, args=(r, port, done)) for r in (0, 1)]
    for p in procs:
        p.start()
    t0 = time.time()
    procs[0].join(timeout=30)
    elapsed = time.time() - t0
    procs[1].kill()
    assert procs[0].exitcode == 1 and done.value == 0 and elapsed < 25


# --- 5. train_mnist.py ----------------------------------------------------------------------

def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(array), 28, 28) + array.numpy().tobytes())


def make_fake_mnist(folder, n_train=192, n_test=64, seed=0):
    """Blurry random strokes in the MNIST IDX layout, so the real loader path runs."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        canvas = torch.zeros(n, 1, 28, 28)
        for _ in range(3):
            r, c = torch.randint(4, 24, (2, n), generator=g)
            canvas[torch.arange(n), 0, r, c] = 1.0
        images = torch.nn.functional.avg_pool2d(canvas, 5, 1, 2).clamp(max=1 / 25) * 25 * 255
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images.to(torch.uint8)[:, 0])
    return folder


def tiny_config(tmp_path, **overrides):
    base = dict(data=make_fake_mnist(str(tmp_path / "data")), download=False, out=str(tmp_path / "run"),
                codebook_size=64, dim=4, width=16, batch_size=32, epochs=3, freeze_epoch=1,
                warmup_epochs=1, quiet=True, device="cpu")
    return train_mnist.Config(**{**base, **overrides})


def test_mnist_runs_every_stage_freezes_the_encoder_and_writes_a_usable_tokenizer(tmp_path):
    frozen = {}

    def record(trainer, step):  # the encoder's weights after steps 1, 6, 12, 18 (6 steps an epoch)
        if step == 1 or step % 6 == 0:
            frozen[step] = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    results = train_mnist.main(tiny_config(tmp_path), on_step=record)
    assert results["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    assert [e["stage"] for e in results["epoch_log"]] == ["stage1", "warmup", "stage2"]
    assert "gan" not in results["epoch_log"][0] and "gan" in results["epoch_log"][2]  # kept to stage 2
    assert "ns" in results["epoch_log"][0] and results["epoch_log"][1]["ns"] == 0
    for key in frozen[6]:  # trained in stage 1, frozen after it
        assert not torch.equal(frozen[1][key], frozen[6][key]), key
        assert torch.equal(frozen[6][key], frozen[12][key]) and torch.equal(frozen[12][key], frozen[18][key]), key
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert 0 < saved["utilization"] <= 1 and saved["test_mse"] > 0 and -1 <= saved["test_ssim"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    model = train_mnist.load_autoencoder(str(tmp_path / "run" / "ckpt.pt"))
    images = train_mnist.load_split(tiny_config(tmp_path), "test")
    indices = model.encode(images[:5])
    assert indices.shape == (5, 7, 7) and model.decode(indices).shape == (5, 1, 28, 28)
    with torch.no_grad():  # the tokenizer is the trained model: the same test MSE
        assert float((model(images)[0] - images).pow(2).mean()) == pytest.approx(saved["test_mse"], rel=1e-4)


def test_mnist_setup_hook_and_the_stress_multiplier_reach_the_encoders_learning_rate(tmp_path):
    seen = {}
    probe = experiments.Probe(torch.rand(8, 1, 28, 28), every=1000)
    inner = experiments.make_setup(probe, encoder_lr_mult=3.0)
    train_mnist.main(tiny_config(tmp_path, epochs=1, gan=False),
                     setup=lambda t: (inner(t), seen.update(lrs=[g["lr"] for g in t.opt.param_groups])))
    assert seen["lrs"] == pytest.approx([3e-3, 1e-3, 1e-3])  # encoder, decoder, quantizer


def test_mnist_loader_rejects_corrupt_truncated_wrong_magic_and_missing_files(tmp_path):
    cfg = tiny_config(tmp_path)
    path = os.path.join(cfg.data, "t10k-images-idx3-ubyte.gz")
    good = open(path, "rb").read()
    open(path, "wb").write(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(train_mnist.DataError, match="t10k-images"):
        train_mnist.load_split(cfg, "test")
    open(path, "wb").write(b"not a gzip file at all")
    with pytest.raises(train_mnist.DataError, match="gzip"):
        train_mnist.load_split(cfg, "test")
    with gzip.open(path, "wb") as f:  # a labels file's magic number
        f.write(struct.pack(">II", 2049, 3) + bytes(3))
    with pytest.raises(train_mnist.DataError, match="magic"):
        train_mnist.load_split(cfg, "test")
    with gzip.open(path, "wb") as f:  # header promises 10 images, body holds 2
        f.write(struct.pack(">IIII", 2051, 10, 28, 28) + bytes(2 * 784))
    with pytest.raises(train_mnist.DataError, match="truncated"):
        train_mnist.load_split(cfg, "test")
    os.remove(path)
    with pytest.raises(train_mnist.DataError, match="ossci-datasets"):
        train_mnist.load_split(cfg, "test")


def test_mnist_download_checks_md5_and_never_leaves_a_partial_file(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "file.gz").write_bytes(b"payload")
    target = tmp_path / "file.gz"
    with pytest.raises(train_mnist.DataError, match="md5"):
        train_mnist.download([f"file://{src}/file.gz"], str(target), "0" * 32)
    assert list(tmp_path.iterdir()) == [src]  # nothing written beside the mirror
    md5 = __import__("hashlib").md5(b"payload").hexdigest()
    train_mnist.download([f"file://{tmp_path}/missing.gz", f"file://{src}/file.gz"], str(target), md5)
    assert target.read_bytes() == b"payload"


def test_mnist_command_line_help_options_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mnist.parse_args(["--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=--)", text.split("options:")[1])[1:]
    assert len(options) == len(dataclasses.fields(train_mnist.Config))
    for entry in options:
        assert "(default: None)" not in entry and " ".join(entry.split()).count("(default") <= 1
    assert "--gan, --no-gan" in text and not train_mnist.parse_args(["--no-download"]).download
    assert train_mnist.resolve(train_mnist.Config(quantizer="ema")).replace is False
    for bad, error in ((dict(quantizer="vqgan"), "unknown --quantizer 'vqgan'"), (dict(width=12), "multiple of 8"),
                       (dict(batch_size=0), "--batch-size"), (dict(quantizer="simvq", replace=True), "does not apply"),
                       (dict(quantizer="fsq", codebook_size=1000), "--codebook-size in")):
        with pytest.raises(ValueError, match=error):
            train_mnist.resolve(train_mnist.Config(**bad))
    for epochs, warmup, gan, freeze in ((5, 1, True, 3), (5, 2, False, 3), (2, 2, True, 1)):
        cfg = train_mnist.resolve(train_mnist.Config(epochs=epochs, warmup_epochs=warmup, gan=gan))
        assert train_mnist.make_schedule(cfg).freeze_epoch == freeze, (epochs, warmup, gan)
    with pytest.raises(ValueError, match="larger than the training split"):
        train_mnist.main(tiny_config(tmp_path, batch_size=1000))
    missing = str(tmp_path / "typo")
    run = subprocess.run([sys.executable, "train_mnist.py", "--data", missing, "--no-download", "--out",
                          str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--no-download is set" in run.stderr and "downloading" not in run.stdout
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out")  # nothing created


def test_mnist_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    data = make_fake_mnist(str(tmp_path / "data"))
    cmd = [sys.executable, "train_mnist.py", "--data", data, "--no-download", "--out", str(tmp_path / "run"),
           "--codebook-size", "64", "--dim", "4", "--width", "16", "--batch-size", "32", "--epochs", "1000",
           "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch  1"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "ckpt.pt" in err


def readme_loop_blocks():
    readme = open(os.path.join(HERE, "README.md")).read()
    return [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "for epoch in range" in b]


def test_the_readme_loop_is_the_docstring_loop_of_nsvq_py():
    doc = nsvq.__doc__
    loop = doc[doc.index("    for epoch in range"):].rstrip()
    loop = "\n".join(line[4:] for line in loop.split("\n"))
    assert len(readme_loop_blocks()) == 1 and loop in readme_loop_blocks()[0]


@pytest.mark.parametrize("construct", ["nsvq.NSVQ(codebook_size=1024, dim=16)",
                                       "nsvq.VectorQuantizer(codebook_size=1024, dim=16)",
                                       "nsvq.EMAVectorQuantizer(codebook_size=1024, dim=16)",
                                       "nsvq.SimVQ(codebook_size=1024, dim=16)",
                                       "nsvq.NSSimVQ(codebook_size=1024, dim=16)", "nsvq.FSQ((8, 5, 5, 5), 16)"])
def test_the_readme_loop_keeps_its_promises_with_every_quantizer_it_offers(construct):
    # The README's loop, run as printed with each quantizer its comment offers, instrumented:
    # the schedule receives the epoch MEAN commitment loss; the encoder does not move after
    # the freeze; the commitment and dense terms are off then; re-seeded codes lose their
    # Adam moments.
    block = readme_loop_blocks()[0]
    assert "vq = nsvq.NSVQ(codebook_size=1024, dim=16)" in block
    block = block.replace("vq = nsvq.NSVQ(codebook_size=1024, dim=16)", f"vq = {construct}")
    g, seen = {}, {"means": [], "reset": 0, "frozen_encoder": None}

    class Schedule(nsvq.StageSchedule):
        def end_epoch(self, epoch, commit_loss):
            assert commit_loss == pytest.approx(sum(g["commit"]) / len(g["commit"]), abs=0)
            if "commit" in g["out"].losses:
                assert len(g["commit"]) == 3 and g["commit"][-1] == g["out"].losses["commit"].item()
            seen["means"].append(commit_loss)
            if epoch == 1:  # the last epoch of stage 1: the encoder as it is frozen
                seen["frozen_encoder"] = [p.detach().clone() for p in g["encoder"].parameters()]
            return super().end_epoch(epoch, commit_loss)

    def reset(optimizer, param, mask):
        nsvq.reset_adam_state_(optimizer, param, mask)
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            assert not state or not state[key][mask].any(), key
        seen["reset"] += bool(mask.any() and state)
    fake = type("nsvq", (), {**{k: getattr(nsvq, k) for k in dir(nsvq) if not k.startswith("__")},
                             "StageSchedule": Schedule, "reset_adam_state_": staticmethod(reset)})
    torch.manual_seed(0)
    g["nsvq"] = fake
    exec(compile(block.replace("import nsvq\n", ""), "README.md", "exec"), g)
    vq = g["vq"]
    assert g["schedule"].stage_start == {"stage1": 0, "warmup": 2, "stage2": 3} and len(seen["means"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["frozen_encoder"], g["encoder"].parameters()))
    assert all(p.grad is None for p in g["encoder"].parameters())
    assert "commit" not in g["losses"] and float(g["losses"].get("ns", 0.0)) == 0.0
    assert g["out"].diagnostics == {}  # no kernel: the dense term is off
    assert seen["reset"] == (2 if isinstance(vq, nsvq.VectorQuantizer) and vq.codebook_by_gradient
                             and vq.reseeds else 0)  # once in each epoch of stage 1
    assert g["tokens"].shape == (32, 7, 7) and torch.equal(vq.decode(g["tokens"]), vq(g["encoder"](g["batches"][0])).z_q)


# --- The documents: every command parses, every code name exists, every section cited exists --

import bench  # noqa: E402

SCRIPTS = {"train_mnist.py": train_mnist.parse_args, "train_imagenet.py": train_imagenet.parse_args,
           "experiments.py": experiments.parse_args, "bench.py": bench.parse_args}
MODULES = (nsvq, train_mnist, train_imagenet, experiments, metrics, bench)
FILES = (".py", ".pt", ".json", ".jsonl", ".png", ".md", ".pth", ".JPEG", ".yaml", ".txt", ".gz", ".tmp")


def live_text(name):
    """A document without its historical sections: those marked, in the line under their
    heading, "> **Historical**" (their commands name options since removed), with their
    subsections."""
    kept, skipping, level = [], False, 0
    lines = open(os.path.join(HERE, name)).read().split("\n")
    for i, line in enumerate(lines):
        heading = re.match(r"(#+) ", line)
        if heading:
            depth = len(heading.group(1))
            following = next((x for x in lines[i + 1:] if x.strip()), "")
            if skipping and depth <= level or not skipping:
                skipping, level = following.startswith("> **Historical**"), depth
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def documented_commands(text):
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` in the text."""
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    found = []
    for match in re.finditer(r"(?:^|[`\s])(python|torchrun)\s+((?:'[^'\n]*'|[^`\n#|'])*)", text, re.M):
        words = shlex.split(match.group(2))
        script = next((w for w in words if w.endswith(".py")), None)
        if script is None or match.group(1) == "python" and words[0] != script:
            continue  # python -m pytest, prose
        args = words[words.index(script) + 1:]
        found.append((script, ["1" if a in ("N", "K") else a for a in args]))
    return found


def test_every_command_in_the_readme_and_experiments_parses_with_its_script():
    commands = documented_commands(live_text("README.md")) + documented_commands(live_text("EXPERIMENTS.md"))
    assert len(commands) > 8
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)  # `--device cuda` is a command for a GPU
        for script, argv in commands:
            assert script in SCRIPTS, f"{script} {' '.join(argv)}: {script} has no command line"
            try:
                SCRIPTS[script](argv)
            except SystemExit as e:
                raise AssertionError(f"{script} {' '.join(argv)} stops with exit {e.code}") from None


def all_options():
    options = set()
    for parse in SCRIPTS.values():
        parsers = []
        with pytest.MonkeyPatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self) or exit(0))
            with pytest.raises(SystemExit):
                parse([])
        stack = parsers
        while stack:
            p = stack.pop()
            for action in p._actions:
                options.update(action.option_strings)
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
    return options


def test_every_code_name_and_flag_in_backticks_exists_in_the_code():
    options = all_options() | {"--nnodes", "--nproc_per_node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                               "--shutdown-timeout", "--requeue", "--signal"}  # torchrun's and SLURM's
    external = {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "KillWait", "TORCHELASTIC_RESTART_COUNT"}
    code = " ".join(open(os.path.join(HERE, m.__name__ + ".py")).read() for m in MODULES)
    code += open(os.path.join(HERE, "test_nsvq.py")).read()  # tests are named too
    classes = {n: c for m in MODULES for n, c in vars(m).items() if isinstance(c, type)}
    missing = []
    for doc in ("README.md", "EXPERIMENTS.md"):
        text = re.sub(r"~~`[^`\n]+`~~", "", live_text(doc))  # struck through: named as removed
        for span in re.findall(r"`([^`\n]+)`", text):
            word = span.split()[0].rstrip(",:;")
            if word.startswith("--"):
                if word.split("=")[0] not in options:
                    missing.append((doc, span))
                continue
            name = word[:-2] if word.endswith("()") else word
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name) or name.endswith(FILES) or \
                    not ("_" in name or "." in name or any(c.isupper() for c in name[1:])):
                continue  # prose, values, paths, files
            head, *rest = name.split(".")
            owner = next((m for m in (*MODULES, torch) if m.__name__ == head), classes.get(head))
            if name in external:
                continue
            if owner is None and not rest:
                ok = re.search(rf"\b{re.escape(name)}\b", code) is not None
            else:
                ok = owner is not None and all(hasattr(owner := getattr(owner, part, None), "__class__")
                                               and owner is not None for part in rest)
            if not ok:
                missing.append((doc, span))
    assert not missing, "\n".join(map(str, missing))


def test_every_experiments_section_cited_is_a_heading():
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", open(os.path.join(HERE, "EXPERIMENTS.md")).read(), re.M))
    cited = []
    for name in ("README.md", *(m.__name__ + ".py" for m in MODULES), "test_nsvq.py"):
        text = open(os.path.join(HERE, name)).read()
        for match in re.finditer(r"EXPERIMENTS(?:\.md)?,? (?:sections? )?(\d+(?:\.\d+)?)((?:(?:,| and) \d+(?:\.\d+)?)*)",
                                 text):
            for number in [match.group(1)] + re.findall(r"\d+(?:\.\d+)?", match.group(2)):
                cited.append((name, number.rstrip(".")))
    assert len(cited) > 10
    assert not [c for c in cited if c[1] not in headings], [c for c in cited if c[1] not in headings]


def test_readme_python_blocks_run():
    readme = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# --- 6. train_imagenet.py and metrics.py ----------------------------------------------------

def make_image_folder(root, n_train=24, n_val=8, seed=0, broken=True):
    """A tiny ImageNet-layout folder of smooth random JPEGs of varied sizes (plus a broken one)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("n01", "n02"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n // 2):
                h, w = rng.integers(36, 60, 2)
                img = (rng.integers(0, 255, (1, 1, 3)) + rng.normal(0, 40, (h, w, 3)).cumsum(1) / 5)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, c, f"img{i}.JPEG"), quality=90)
    if broken:
        open(os.path.join(root, "train", "n01", "broken.JPEG"), "wb").write(b"not a jpeg")
    return root


def tiny_imagenet(tmp_path, **overrides):
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data)
    return train_imagenet.make_config("tiny", **{"data": data, "out": str(tmp_path / "run"), "device": "cpu",
                                                 **overrides})


def test_imagenet_tiny_runs_all_stages_skips_a_corrupt_jpeg_and_gives_a_tokenizer(tmp_path, capfd):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt-000000001.pt.tmp123").write_bytes(b"a save killed halfway")
    result = train_imagenet.main(tiny_imagenet(tmp_path, eval_every=1, eval_images=4))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    assert result["images"] == 8 and result["steps"] == 9 and 0 < result["utilization"] <= 1
    captured = capfd.readouterr()
    assert "warning: skipping" in captured.err and "broken.JPEG" in captured.err
    assert json.load(open(tmp_path / "run" / "results.json"))["steps"] == 9
    assert (tmp_path / "run" / "recon-final.png").stat().st_size > 0
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    quick = [line for line in lines if "eval" in line]  # --eval-every 1: after epochs 1 and 2, not the last
    assert [(q["epoch"], q["step"], q["eval"]) for q in quick] == [(1, 3, 4), (2, 6, 4)]
    assert all(math.isfinite(q["psnr"]) and 0 < q["utilization"] <= 1 for q in quick)
    assert "eval       3 | ep 1 | 4 val images: psnr" in captured.out
    lines = [line for line in lines if "eval" not in line]
    assert {line["stage"] for line in lines} == {"stage1", "warmup", "stage2"}
    first = lines[0]  # the quantizer at work: re-seeded, the kernel, the temperature
    assert first["reseeded"] > 0 and 0 < first["kernel_mass"] < 1 and first["tau"] > 0
    ckpts = train_imagenet.checkpoints(str(tmp_path / "run"))
    assert len(ckpts) == 2  # the two newest are kept
    ckpt = train_imagenet.load_checkpoint(ckpts[-1])
    assert not [k for k in ckpt["ema"] if "upkeep" in k]  # the latent pool is stored once
    model = train_imagenet.load_autoencoder(ckpts[-1])
    indices = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert indices.shape == (2, 16, 16) and model.decode(indices).shape == (2, 3, 32, 32)
    assert not [p for p in os.listdir(tmp_path / "run") if ".tmp" in p]  # a killed save's file is gone


def test_imagenet_baselines_with_and_without_replacement_simvq_ns_and_fsq(tmp_path):
    r = train_imagenet.main(tiny_imagenet(tmp_path, quantizer="simvq-ns", gan_stage1=False))
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    stage1 = [line for line in lines if line["stage"] == "stage1"]
    assert r["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    assert all(line["ns"] > 0 and line["reseeded"] == 0 and "gan" not in line for line in stage1)
    assert any("gan" in line for line in lines if line["stage"] == "stage2")  # --no-gan-stage1
    for quantizer, replace in (("ema", True), ("ste", False), ("fsq", False)):
        cfg = tiny_imagenet(tmp_path, quantizer=quantizer, replace=replace, epochs=1, overwrite=True)
        assert train_imagenet.main(cfg)["stage_start"] == {"stage1": 0}
        lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
        assert (lines[0]["reseeded"] > 0) == replace, quantizer
    model = train_imagenet.Autoencoder(train_imagenet.resolve(tiny_imagenet(tmp_path, quantizer="ste")))
    assert len(model.vq.upkeep.latent_pool) == 0  # the baselines keep no pool unless they replace


def test_imagenet_stop_and_resume_anywhere_gives_the_uninterrupted_schedule_and_weights(tmp_path):
    # Two steps an epoch (25 files, global batch 12); the plateau trigger (patience 2) is live, so
    # the epoch-mean commitment loss decides when stage 1 ends. Stops after an epoch's last batch
    # (step 2) and mid-epoch (step 5); the resumed run must see the same epoch means.
    opts = dict(batch_size=12, epochs=7, patience=2, freeze_epoch=6, log_every=1)
    train_imagenet.main(tiny_imagenet(tmp_path / "a", **opts))
    train_imagenet.main(tiny_imagenet(tmp_path / "b", max_steps=2, **opts))
    train_imagenet.main(tiny_imagenet(tmp_path / "b", max_steps=3, resume="auto", **opts))
    train_imagenet.main(tiny_imagenet(tmp_path / "b", resume="auto", **opts))
    a = train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "a" / "run"))[-1])
    b = train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "b" / "run"))[-1])
    assert a["schedule"] == b["schedule"] and a["state"]["step"] == b["state"]["step"] == 14
    assert a["schedule"]["best"] > 0
    for part in ("model", "ema", "disc"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_imagenet_evaluation_in_fp32_whatever_amp_and_a_finished_run_evaluates_again(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    again = [train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", epochs=1, amp=amp, lpips_weights="random",
                                               eval_lpips=True, inception="random")) for amp in ("none", "bf16")]
    assert again[0] == {**again[1], "seconds": again[0]["seconds"]}
    for key in ("rfid", "lpips_alex", "lpips_vgg", "psnr", "ssim", "l1", "utilization", "perplexity"):
        assert math.isfinite(again[0][key]), key


def test_imagenet_signal_during_evaluation_saves_and_stops(tmp_path, monkeypatch):
    make_image_folder(str(tmp_path / "data"), n_val=140)  # three evaluation batches of 64
    real, calls = metrics.psnr_of_batch, []

    def psnr_and_a_signal(a, b):  # SIGTERM arrives while the first batch is scored
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(a, b)
    monkeypatch.setattr(metrics, "psnr_of_batch", psnr_and_a_signal)
    with pytest.raises(SystemExit) as stopped:
        train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    assert stopped.value.code == 143 and len(calls) == 1  # the second batch was not scored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back
    assert train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])["state"]["step"] == 3


def test_imagenet_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_143(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    cmd = [sys.executable, "train_imagenet.py", "--preset", "tiny", "--data", data, "--out", str(tmp_path / "run"),
           "--epochs", "1000", "--log-every", "1", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a session of its own, as torchrun starts ranks
    for line in proc.stdout:
        if line.startswith("step"):
            break
    os.killpg(proc.pid, signal.SIGTERM)  # as torchrun and SLURM stop it: every process of the group
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest  # saved, not finished: `&&` stops here
    assert "(stopped by signal 15)" in rest and "--resume auto" in rest and "Traceback" not in rest
    assert train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])["state"]["step"] >= 1


def start_script(tmp_path, inject, *options):
    """train_imagenet.cli in a session of its own (as torchrun starts a rank), after `inject`
    (Python that patches the module `ti`); the Popen, its output merged."""
    (tmp_path / "inject.py").write_text(f"import os, sys, time, torch\nsys.path.insert(0, {HERE!r})\n"
                                        f"import train_imagenet as ti\n{inject}\nti.cli(sys.argv[1:])\n")
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data)
    cmd = [sys.executable, str(tmp_path / "inject.py"), "--preset", "tiny", "--data", data, "--out",
           str(tmp_path / "run"), *options]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_imagenet_an_unexpected_error_with_loader_workers_ends_every_process_within_seconds(tmp_path):
    # An error outside the listed ones (CUDA out of memory, NCCL, a bug) at step 3, with two
    # loader workers that ignore SIGTERM: the traceback, exit 1, and no process left behind.
    proc = start_script(tmp_path, """
real_step, calls = ti.train_step, []
def step(*a):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("CUDA out of memory (injected)")
    return real_step(*a)
ti.train_step = step""", "--epochs", "50", "--log-every", "1", "--workers", "2")
    t0 = time.time()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "Traceback" in out and "CUDA out of memory (injected)" in out, out[-2000:]
    deadline = time.time() + 15  # the workers see their parent gone (they check every 5 s)
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), f"processes left running {time.time() - t0:.0f} s after the error"


def test_imagenet_more_signals_during_the_save_change_nothing(tmp_path):
    # SLURM signals every process, then torchrun its ranks: the second and third SIGTERM arrive
    # while the checkpoint is being written (made slow here); the save completes, exit 143.
    proc = start_script(tmp_path, """
real_save = ti.torch.save
def slow_save(obj, f):
    print("SAVING", flush=True)
    time.sleep(1.5)
    real_save(obj, f)
ti.torch.save = slow_save""", "--epochs", "1000", "--log-every", "1", "--workers", "2")
    for line in proc.stdout:
        if line.startswith("step"):
            os.killpg(proc.pid, signal.SIGTERM)
        if line.startswith("SAVING"):
            for _ in range(2):
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, rest
    run = str(tmp_path / "run")
    assert train_imagenet.load_checkpoint(train_imagenet.checkpoints(run)[-1])["state"]["step"] >= 1
    assert not glob.glob(os.path.join(run, "*.tmp*"))


def test_imagenet_every_error_reaches_every_rank_and_a_restart_starts_clean(tmp_path, monkeypatch):
    # The store outlives a torchrun restart, and ranks report errors one after another: the
    # watcher of a restarted run ignores the last run's error, and an error reported by a rank
    # after another rank's does not hide the first from it.
    port = 33000 + os.getpid() % 1000
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    stopped = []

    def fake_exit(code):  # what os._exit would end: here, the watcher's thread
        stopped.append(threading.current_thread().name)
        raise SystemExit
    monkeypatch.setattr(train_imagenet.os, "_exit", fake_exit)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    train_imagenet.watch_for_failures(5)("DataError: the last run's")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    reports, threads = {}, {}
    for rank in (0, 1, 2):
        before = set(threading.enumerate())
        reports[rank] = train_imagenet.watch_for_failures(rank)
        threads[rank] = (set(threading.enumerate()) - before).pop().name
    time.sleep(1.6)  # the watchers poll every second
    assert stopped == []  # the last run's error is not this run's
    reports[2]("DataError: rank 2's")
    reports[1]("RuntimeError: rank 1's, right after")
    time.sleep(1.6)
    assert sorted(stopped) == sorted(threads.values())  # rank 1 learnt of rank 2's, rank 2 of rank 1's
    del master


def test_imagenet_a_frozen_rank_on_another_node_stops_the_run_after_the_collective_timeout(tmp_path):
    # A node that vanishes without a TCP reset: rank 1 is stopped (SIGSTOP) after start-up. Rank
    # 0 waits in a collective for --timeout-minutes (here 0.1: 6 s), not the start-up's hour.
    (tmp_path / "wrapper.py").write_text(f"""import os, signal, sys
sys.path.insert(0, {HERE!r})
import torch.distributed as dist
import train_imagenet as ti
open(os.path.join({str(tmp_path)!r}, "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
real_step, calls = ti.train_step, []
def step(*a):
    calls.append(1)
    if dist.get_rank() == 1 and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGSTOP)
    return real_step(*a)
ti.train_step = step
ti.cli(sys.argv[1:])
""")
    make_image_folder(str(tmp_path / "data"))
    port = 34000 + os.getpid() % 1000
    command = ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", "--max-restarts=0",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nsvq", str(tmp_path / "wrapper.py"), "--preset",
               "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "50",
               "--log-every", "1", "--timeout-minutes", "0.1"]
    logs = [open(tmp_path / f"agent{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(command, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True) for log in logs]
    try:
        t0 = time.time()
        while all(p.poll() is None for p in procs) and time.time() - t0 < 150:
            time.sleep(0.5)
        seconds, codes = time.time() - t0, [p.poll() for p in procs]
    finally:  # the agents, and the ranks: torchrun starts each in its own session, and the
        for p in procs:  # stopped one outlives its agent
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for path in tmp_path.glob("pid*"):
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    out = (tmp_path / "agent0.log").read_text() + (tmp_path / "agent1.log").read_text()
    assert seconds < 100 and any(c not in (None, 0) for c in codes), (seconds, codes, out[-3000:])
    assert "Timed out" in out or "timed out" in out.lower(), out[-3000:]


def test_imagenet_a_step_with_non_finite_gradients_is_skipped_and_fp16_calibration_is_not_bad(tmp_path):
    cfg = train_imagenet.resolve(tiny_imagenet(tmp_path))
    torch.manual_seed(0)
    trainer = train_imagenet.build_trainer(cfg, torch.device("cpu"), None)
    train_imagenet.apply_stage(cfg, trainer, nsvq.StageSchedule(None, None), 1, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    step = lambda: train_imagenet.train_step(cfg, trainer, x, 0.1, True, False, True, torch.device("cpu"))  # noqa
    assert not step()[5]
    for module in (trainer.model.decoder, trainer.disc):  # the generator's step, the critic's
        before = {k: v.clone() for k, v in module.state_dict().items()}
        hook = next(p for p in module.parameters() if p.dim() == 4).register_hook(
            lambda g: torch.full_like(g, float("nan")))
        losses, out, counts, reseeded, found, bad = step()
        hook.remove()
        assert bool(found) and bool(bad) and all(torch.isfinite(v) for v in losses.values())
        for key, value in module.state_dict().items():
            if "running_" not in key and "num_batches" not in key:  # BatchNorm statistics move in forward
                assert torch.equal(value, before[key]), key
    assert float(trainer.scaler.get_scale()) == 1.0  # bf16 / fp32: the scale stays 1
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # fp16's: a skip at a large scale
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    scaler.scale((p * torch.tensor([1e30, 1.0, 1.0])).sum() * 1e10).backward()
    scaler.step(opt)
    found, bad = train_imagenet.skipped(scaler, opt)
    assert bool(found) and not bool(bad)


def torchrun(tmp_path, script, *options, nnodes=1, timeout=120):
    """train_imagenet.cli under torchrun, two processes (two agents of one each for nnodes 2),
    through a small script that injects a fault or checks the ranks; (return codes, output)."""
    (tmp_path / "wrapper.py").write_text(f"import os, sys, time, torch, torch.distributed as dist\n"
                                         f"sys.path.insert(0, {HERE!r})\nimport train_imagenet as ti\n{script}\n"
                                         f"ti.cli(sys.argv[1:])\n")
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data)
    args = ["--preset", "tiny", "--data", data, "--out", str(tmp_path / "run"), *options]
    port = 32000 + os.getpid() % 1000
    if nnodes == 1:
        commands = [["torchrun", "--standalone", "--nproc_per_node=2", str(tmp_path / "wrapper.py"), *args]]
    else:
        commands = [["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", "--max-restarts=0",
                     f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nsvq", str(tmp_path / "wrapper.py"), *args]] * 2
    procs = [subprocess.Popen(c, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in commands]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [p.returncode for p in procs], "".join(outs)


IDENTITY_CHECK = """
real_main = ti.main
def main(cfg, report=None):  # after the run: every weight and buffer bitwise equal on both ranks
    built = []
    real_build = ti.build_trainer
    ti.build_trainer = lambda *a: built.append(real_build(*a)) or built[-1]
    result = real_main(cfg, report)
    for name, t in [*built[0].model.state_dict().items(), *built[0].ema.state_dict().items()]:
        ref = t.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(ref.view(torch.uint8) if ref.is_floating_point() else ref, t.view(torch.uint8)
                           if t.is_floating_point() else t), name
    print(f"rank {dist.get_rank()}: identical", flush=True)
    return result
ti.main = main
"""


def test_imagenet_two_ranks_end_bitwise_identical_and_only_rank_zero_writes(tmp_path):
    codes, out = torchrun(tmp_path, "", "--epochs", "2", "--max-steps", "4")
    assert codes == [143 - 143], out[-3000:]
    # Rank 1 sees no checkpoint (node-local disks, a stale NFS cache): it resumes rank 0's.
    blind = "real = ti.checkpoints\nti.checkpoints = lambda out: [] if dist.get_rank() == 1 else real(out)\n"
    codes, out = torchrun(tmp_path, blind + IDENTITY_CHECK, "--epochs", "2", "--resume", "auto")
    assert codes == [0], out[-3000:]
    assert "resumed" in out and "ckpt-000000004.pt" in out
    assert "rank 0: identical" in out and "rank 1: identical" in out
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["steps"] == 6 and saved["images"] == 8  # global batch 8 = 4 + 4; val read once
    with pytest.raises(RuntimeError, match="only rank 0 writes"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(train_imagenet, "rank_of", lambda: 1)
            train_imagenet.write_atomic(str(tmp_path / "x"), lambda tmp: None)


NAN_ON_RANK_1 = """
real_step = ti.train_step
def step(cfg, trainer, x, *a):  # only rank 1's data is bad; after the all-reduce, every gradient is
    return real_step(cfg, trainer, x * float("nan") if dist.get_rank() == 1 else x, *a)
ti.train_step = step
"""


def test_imagenet_non_finite_data_on_one_rank_skips_the_steps_of_all_and_stops_both(tmp_path):
    codes, out = torchrun(tmp_path, NAN_ON_RANK_1, "--epochs", "5", "--log-every", "2")
    assert codes == [1], out[-3000:]
    assert out.count("error: every step of the last 2 had non-finite gradients") == 2  # on both ranks


STUCK_RANK_1 = """
real_step, calls = ti.train_step, []
real_exit = os._exit
def step(*a):  # after start-up, rank 1 fails and lingers for 8 s (as a rank stuck in NCCL would);
    calls.append(1)  # rank 0, in a collective that only that rank's exit would end, must not wait
    if dist.get_rank() == 1 and len(calls) == 3:
        os._exit = lambda code: (time.sleep(8), real_exit(code))
        raise ti.metrics.DataError("injected failure at step 3")
    return real_step(*a)
ti.train_step = step
"""


def test_imagenet_an_error_on_one_rank_of_two_nodes_stops_the_other_within_seconds(tmp_path):
    t0 = time.time()
    codes, out = torchrun(tmp_path, STUCK_RANK_1, "--epochs", "50", "--log-every", "1", nnodes=2, timeout=90)
    assert time.time() - t0 < 60 and codes == [1, 1], out[-3000:]
    assert "error: injected failure at step 3" in out
    assert "error: stopping, rank 1: DataError: injected failure at step 3" in out  # rank 0, told


def test_imagenet_compiled_run_compiles_each_graph_once_across_replacement_logs_and_stages(tmp_path, monkeypatch):
    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="aot_eager", **kw))
    from torch._dynamo.utils import counters
    counters.clear()
    result = train_imagenet.main(tiny_imagenet(tmp_path, compile=True))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    # The autoencoder once with the encoder training and once frozen; the critic's step once.
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_imagenet_model_data_and_options_as_simvq_and_as_documented(tmp_path):
    cfg = train_imagenet.resolve(train_imagenet.Config(data="-"))
    with torch.device("meta"):
        model, disc = train_imagenet.Autoencoder(cfg), train_imagenet.make_discriminator()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.encoder) == pytest.approx(24.3e6, rel=0.02)
    assert count(model.decoder) == pytest.approx(39.9e6, rel=0.02)
    assert count(disc) == pytest.approx(2.77e6, rel=0.02)  # taming's 3-layer PatchGAN
    assert model.vq.codebook.shape == (65536, 128) and model.vq.tau_mode == "relative"
    cifar = train_imagenet.resolve(train_imagenet.make_config("cifar", data="-"))
    tokens = train_imagenet.Autoencoder(cifar).encode(torch.zeros(1, 3, 32, 32)).shape
    assert tokens == (1, 8, 8) and 64 * 64 / cifar.codebook_size == 0.5  # the paper's ratio
    for quantizer in ("nsvq", "ste", "ema", "simvq", "simvq-ns", "fsq"):  # --usage-horizon reaches all
        flags = train_imagenet.parse_args(["--preset", "cifar", "--data", "-", "--quantizer", quantizer])
        assert train_imagenet.make_quantizer(flags).upkeep.usage_horizon == 8.0  # the preset's
        flags = train_imagenet.parse_args(["--data", "-", "--quantizer", quantizer, "--usage-horizon", "3"])
        assert train_imagenet.make_quantizer(flags).upkeep.usage_horizon == 3.0
    flags = train_imagenet.parse_args(["--preset", "tiny", "--compile", "--data", "-"])
    assert flags.compile and flags.image_size == 32 and flags.codebook_size == 256  # flags win, preset fills
    data = make_image_folder(str(tmp_path / "data"), broken=False)
    for path in glob.glob(os.path.join(data, "val", "*", "*")):  # val/*.JPEG, as the official archive
        os.replace(path, os.path.join(data, "val", os.path.basename(os.path.dirname(path)) + os.path.basename(path)))
    assert len(metrics.list_images(data, "val")) == 8
    os.replace(os.path.join(data, "train", "n01", "img0.JPEG"), os.path.join(data, "train", "n01", "n06596364_9591.JPEG"))
    assert len(metrics.list_images(data, "train")) == 23  # SimVQ's skipped file
    for bad, error in ((dict(log_every=0), "--log-every"), (dict(batch_size=0), "--batch-size"),
                       (dict(ch_mult="1,a"), "--ch-mult"), (dict(image_size=33), "--image-size"),
                       (dict(epochs=0), "--epochs"), (dict(quantizer="simvq", replace=True), "does not apply"),
                       (dict(amp="fp8"), "--amp")):
        with pytest.raises(ValueError, match=error):
            train_imagenet.resolve(tiny_imagenet(tmp_path, **bad))


def test_imagenet_resize_and_crop_follow_torchvision_and_16_bit_images_are_scaled(tmp_path):
    img = Image.fromarray(np.arange(131 * 64 * 3, dtype=np.uint32).reshape(64, 131, 3).astype(np.uint8))
    assert np.array_equal(np.asarray(metrics.resize_and_crop(img, 64)), np.asarray(img)[:, 34:98])  # round(67/2)
    wide = Image.new("RGB", (300, 200))
    resized = wide.resize((192, 128), Image.BILINEAR)  # Resize(128): int(128 * 300 / 200) x 128
    assert np.array_equal(np.asarray(metrics.resize_and_crop(wide, 128)), np.asarray(resized)[:, 32:160])
    path = str(tmp_path / "deep.png")
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(path)
    rgb = np.asarray(metrics.read_rgb(path))
    np.testing.assert_allclose(rgb[..., 0], np.round(levels / 257), atol=0)  # convert("RGB") clips


def naive_ssim(x, y, window=7):
    """skimage's default SSIM written with explicit windows (one image, one channel)."""
    H, W = x.shape
    values = []
    for i in range(H - window + 1):
        for j in range(W - window + 1):
            a, b = x[i:i + window, j:j + window].flatten(), y[i:i + window, j:j + window].flatten()
            cov = np.cov(np.stack([a, b]))  # sample covariance (N - 1)
            ma, mb, c1, c2 = a.mean(), b.mean(), 0.01 ** 2, 0.03 ** 2
            values.append((2 * ma * mb + c1) * (2 * cov[0, 1] + c2) / ((ma ** 2 + mb ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    return np.mean(values)


def test_ssim_psnr_frechet_and_lpips_follow_their_definitions():
    torch.manual_seed(14)
    x, y = torch.rand(2, 3, 12, 11), torch.rand(2, 3, 12, 11)
    got = metrics.ssim(x, y)
    for i in range(2):
        expected = np.mean([naive_ssim(x[i, c].double().numpy(), y[i, c].double().numpy()) for c in range(3)])
        assert float(got[i]) == pytest.approx(expected, rel=1e-9)
    levels = metrics.to_uint8_levels(torch.tensor([0.0, 0.5, 254.9 / 255, 1.0]))
    assert torch.equal(levels * 255, torch.tensor([0.0, 127.0, 254.0, 255.0]))  # truncation
    big, small = torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
    small[0] = 0.1  # one image off by 0.1: the batch MSE is 0.01 / 4
    assert float(metrics.psnr_of_batch(big, small)) == pytest.approx(10 * math.log10(400), rel=1e-6)
    mu1, mu2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))  # the same rotation of both
    got = metrics.frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()), rel=1e-9)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    for net in ("vgg", "alex"):
        lpips = metrics.LPIPS(net, "random")
        assert lpips(images, images).abs().max() == 0 and (lpips(images, -images) != 0).all()
    h = torch.randn(2, 5, 3, 3)
    h[0, :, 1, 1] = 0.0  # an all-zero feature vector: a finite gradient
    h.requires_grad_(True)
    metrics.unit_normalize(h).sum().backward()
    assert torch.isfinite(h.grad).all()
    assert metrics.InceptionFID("random")(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


def test_imagenet_bad_input_gives_one_line_and_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(metrics.WeightsError, match="--lpips-weights .*vgg16-397923af.pth"):
        train_imagenet.main(tiny_imagenet(tmp_path, perceptual_weight=1.0, lpips_weights=str(empty)))
    with pytest.raises(ValueError, match="--perceptual-weight 0"):
        train_imagenet.main(tiny_imagenet(tmp_path, perceptual_weight=1.0, lpips_weights="random"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(metrics.DataError):
        train_imagenet.main(tiny_imagenet(tmp_path, data=str(tmp_path / "empty")))
    (tmp_path / "file").write_text("")
    with pytest.raises(train_imagenet.OutputError, match="is a file"):
        train_imagenet.main(tiny_imagenet(tmp_path, out=str(tmp_path / "file")))
    assert not (tmp_path / "run").exists()  # refused before the first step: no --out
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    with pytest.raises(train_imagenet.OutputError, match="--resume auto.*--overwrite"):
        train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    with pytest.raises(train_imagenet.OutputError, match="--codebook-size 256, not 128"):
        train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", codebook_size=128))
    good = train_imagenet.checkpoints(str(tmp_path / "run"))[-1]
    (tmp_path / "truncated.pt").write_bytes(open(good, "rb").read()[:5000])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    for path, error in (("truncated.pt", "damaged or not a checkpoint"), ("other.pt", "it holds: unknown"),
                        ("missing.pt", "no such checkpoint file"), ("", "a folder: --resume auto")):
        with pytest.raises(train_imagenet.OutputError, match=error):
            train_imagenet.main(tiny_imagenet(tmp_path, resume=str(tmp_path / path)))
    real = train_imagenet.torch.save

    def save_fails_halfway(obj, f):  # what torch's writer does when the disk fills up
        open(f, "wb").write(b"x" * 100)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_imagenet.torch, "save", save_fails_halfway)
        with pytest.raises(train_imagenet.OutputError, match="writing .*failed .*file write failed.*MiB free"):
            train_imagenet.main(tiny_imagenet(tmp_path, epochs=1, overwrite=True))
    assert train_imagenet.torch.save is real and not glob.glob(str(tmp_path / "run" / "*.tmp*"))
    bad = subprocess.run([sys.executable, "train_imagenet.py", "--preset", "tiny", "--data", str(tmp_path / "data"),
                          "--out", str(tmp_path / "o"), "--inception", str(empty)], cwd=HERE,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0, bad.stderr  # one line
    assert "pt_inception-2015-12-05-6726825d.pth" in bad.stderr and not (tmp_path / "o").exists()
    unreadable = make_image_folder(str(tmp_path / "unreadable"), broken=False)
    for path in glob.glob(os.path.join(unreadable, "*", "*", "*")):
        open(path, "wb").write(b"not an image")
    with pytest.raises(metrics.DataError, match="unreadable images in a row"):
        train_imagenet.main(tiny_imagenet(tmp_path, data=unreadable, out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # failed before anything was written: no empty --out
    with pytest.raises(train_imagenet.OutputError, match="cannot be made .*not a writable folder"):
        train_imagenet.main(tiny_imagenet(tmp_path, out=str(tmp_path / "file" / "run")))  # under a file


@pytest.mark.parametrize("bad, flag", [
    (dict(gan_weight=float("nan")), "--gan-weight"), (dict(gan_weight=-1.0), "--gan-weight"),
    (dict(weight_ema=float("nan")), "--weight-ema"), (dict(weight_ema=1.5), "--weight-ema"),
    (dict(max_steps=-1), "--max-steps"), (dict(ckpt_minutes=float("nan")), "--ckpt-minutes"),
    (dict(num_res_blocks=-1), "--num-res-blocks"), (dict(perceptual_weight=-1.0), "--perceptual-weight"),
    (dict(timeout_minutes=0.0), "--timeout-minutes"), (dict(eval_every=-1), "--eval-every"),
    (dict(quantizer="fsq", codebook_size=1000), "--codebook-size in"), (dict(lr=float("inf")), "--lr"),
])
def test_imagenet_options_out_of_range_are_refused_naming_the_option(bad, flag):
    with pytest.raises(ValueError, match=flag):
        train_imagenet.resolve(train_imagenet.make_config("tiny", data="-", **bad))


def test_mnist_out_of_range_options_and_an_earlier_run_are_refused_as_train_imagenet_does(tmp_path):
    for bad, flag in ((dict(gan_weight=float("nan")), "--gan-weight"), (dict(gan_weight=-1.0), "--gan-weight"),
                      (dict(gan=False, gan_weight=-1.0), "--gan-weight"), (dict(lr=-1e-3), "--lr")):
        with pytest.raises(ValueError, match=flag):
            train_mnist.resolve(train_mnist.Config(**bad))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"an earlier run")
    with pytest.raises(train_mnist.OutputError, match="holds an earlier run: pass --overwrite"):
        train_mnist.main(tiny_config(tmp_path, overwrite=False))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == b"an earlier run"


def test_imagenet_resume_auto_takes_the_newest_intact_checkpoint_and_an_empty_out_starts_fresh(tmp_path, capsys):
    fresh = train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", epochs=1))  # a requeued job's first launch
    assert fresh["steps"] == 3
    train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", epochs=2, max_steps=2))  # saves at step 5
    older, newest = train_imagenet.checkpoints(str(tmp_path / "run"))
    open(newest, "r+b").truncate(5000)  # the newest is damaged
    capsys.readouterr()
    result = train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", epochs=2))
    out = capsys.readouterr().out
    assert f"warning: {newest} is damaged" in out and f"resumed {older}" in out
    assert result["steps"] == 6


# --- 7. bench.py, experiments.py, nsvq.py's demo --------------------------------------------

def test_bench_quick_runs_its_tables_and_checks_its_options(tmp_path, capsys):
    import bench
    bench.main(["--quick", "--repeats", "1"])
    bench.main(["--imagenet", "--quick", "--repeats", "1", "--batch", "2"])
    bench.main(["--checkpoint", str(tmp_path / "ck"), "--quick"])
    bench.main(["--loader", make_image_folder(str(tmp_path / "data")), "--workers", "0", "--batch", "4"])
    out = capsys.readouterr().out
    assert "| NSVQ |" in out and "peak memory" in out and "| nsvq | bf16 |" in out
    assert "checkpoint:" in out and "images/s" in out
    assert all(float(v) > 0 for v in re.findall(r"(?:NSVQ|SimVQ) ([0-9.]+) T,", out))
    assert re.search(r"\| simvq \| bf16 \| .* \| 1\.00 \|", out)  # its own time x SimVQ
    (tmp_path / "file").write_text("")
    for args, error in ((["--repeats", "0"], "--repeats must be >= 1"),
                        (["--json", "/no/such/x.json"], "not a writable folder"),
                        (["--loader", str(tmp_path / "none")], "holds no train/"),
                        (["--workers", "-1"], "--workers must be >= 0"),
                        (["--checkpoint", str(tmp_path / "file")], "is a file")):
        with pytest.raises(SystemExit):
            bench.parse_args(args)
        assert error in capsys.readouterr().err


def tiny_experiment(tmp_path, **args):
    base = tiny_config(tmp_path, gan=False)
    return base, argparse.Namespace(**{"out": str(tmp_path / "exp"), "epochs": 2, "seeds": 1, "only": "",
                                       "probe_every": 2, **args})


def test_experiments_compare_with_seeds_and_the_paper_ratio_preset(tmp_path, monkeypatch):
    for _, overrides in experiments.compare_runs(paper_ratio=True):  # 49 latents per image
        assert 0.3 < overrides["batch_size"] * 49 / overrides["codebook_size"] < 0.5
    monkeypatch.setattr(experiments, "VARIANTS", {k: experiments.VARIANTS[k] for k in ("ste", "nsvq-replace-from-codes")})
    base, args = tiny_experiment(tmp_path, paper_ratio=False, seeds=2)
    results = experiments.compare(base, args)
    assert [(r["name"], r["seed"]) for r in results] == [("ste", 0), ("ste", 1), ("nsvq-replace-from-codes", 0),
                                                         ("nsvq-replace-from-codes", 1)]
    row = json.load(open(tmp_path / "exp" / "compare.json"))["summary"][1]
    mses = [r["test_mse"] for r in results if r["name"] == "nsvq-replace-from-codes"]
    assert row["test_mse"] == pytest.approx(sum(mses) / 2)
    assert row["test_mse_sd"] == pytest.approx(abs(mses[0] - mses[1]) / 2 ** 0.5)
    assert [h["step"] for h in results[0]["history"]] == [2, 4, 6, 8, 10, 12]  # the probe, every 2 steps


def test_experiments_stress_sensitivity_controlled_phases_and_plateau_run(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "STRESS_MULTS", (3.0,))
    base, args = tiny_experiment(tmp_path)
    results = experiments.stress(base, args)
    assert [r["name"] for r in results] == [f"{arm} @x3" for arm in experiments.STRESS_ARMS]
    assert all(r["drift"] > 0 for r in results)
    monkeypatch.setattr(experiments, "TAUS", {"absolute": (0.35,), "relative": (1.0,)})
    args.alphas = [0.0, 0.3]
    mass = {r["name"]: r["kernel_mass"] for r in experiments.sensitivity(base, args)}
    assert math.isnan(mass.pop("alpha 0")) and all(0 < m < 1 for m in mass.values())
    args.only = "^no such run$"
    with pytest.raises(ValueError, match="matches none"):
        experiments.stress(base, args)
    base, args = tiny_experiment(tmp_path / "c", pretrain_epochs=2)
    for r in experiments.controlled(base, args):  # the first probe sees the k-means codebook
        start = torch.load(tmp_path / "c" / "exp" / "kmeans_start.pt")
        assert r["history"][0]["code_norm"] == pytest.approx(float(start["vq.embedding"].norm(dim=1).mean()), rel=0.2)
    base, args = tiny_experiment(tmp_path / "p")
    args.epochs = 4  # the staged arms freeze after 60% of it, epoch 2
    phases = {r["name"]: r for r in experiments.phases(base, args)}
    assert phases["full: freeze, warm-up, stage 2"]["stage_start"] == {"stage1": 0, "warmup": 2, "stage2": 3}
    assert "gan" in phases["full, GAN from step 0 of stage 1 (the paper)"]["epoch_log"][0]
    args.patience = 1
    (r,) = experiments.plateau(base, args)
    commit = [e["commit"] for e in r["epoch_log"] if e["stage"] == "stage1"]
    if r["stage_start"].get("warmup") is not None:  # fired right after an epoch with no new best
        assert commit[-1] >= min(commit[:-1])


def test_experiments_scale_sim_toy_natural_and_their_options(tmp_path, capsys):
    methods = list(experiments.SIM_METHODS + experiments.EXTRA_SIM_METHODS)
    codebook, usage = experiments.toy_run("NSVQ", "translate", steps=30)
    assert codebook.shape == (64, 2) and 0 < usage[-1][1] <= 1
    results = experiments.main(["scale-sim", "--out", str(tmp_path / "sim"), "--sim-codes", "64", "--sim-steps", "40",
                                "--sim-speeds", "1", "--sim-methods", *methods])
    assert [r["method"] for r in results] == methods and all(r["duplicates"] == 0 for r in results)
    data = make_image_folder(str(tmp_path / "data"), n_train=130, n_val=8)
    import train_imagenet as ti
    tiny = {k: v for k, v in ti.PRESETS["tiny"].items() if k not in ("codebook_size", "epochs")}
    with pytest.MonkeyPatch.context() as m:  # the cifar preset at a test's size
        m.setitem(ti.PRESETS, "cifar", {**ti.PRESETS["cifar"], **tiny, "batch_size": 64})
        names = ("FSQ", "NSVQ", "NSVQ without stages")
        m.setattr(experiments, "NATURAL_METHODS", {k: experiments.NATURAL_METHODS[k] for k in names})
        out = ["--data", data, "--out", str(tmp_path / "nat"), "--epochs", "1"]
        runs = experiments.main(["natural", *out])
        m.setattr(ti, "main", lambda cfg: pytest.fail("a finished run was trained again"))
        again = experiments.main(["natural", *out, "--only", "^FSQ$"])  # read back, not trained
        table = experiments.main(["natural", *out, "--table-only", "--only", "NSVQ"])
        seeds = experiments.main(["natural", *out, "--table-only", "--only", "^FSQ$", "--seeds", "3"])
        m.undo()
        m.setitem(ti.PRESETS, "cifar", {**ti.PRESETS["cifar"], **tiny, "batch_size": 64})
        m.setattr(experiments, "NATURAL_ABLATION", {k: experiments.NATURAL_ABLATION[k] for k in (
            "continuous (no quantizer)", "NSVQ, ICNR upsampling")})
        ablation = experiments.main(["natural", *out, "--arms", "ablation"])
    keys = ("psnr", "ssim", "steps", "seconds", "codes_used")
    assert len(again) == 1 and [again[0][k] for k in keys] == [runs[0][k] for k in keys]
    assert [r["name"] for r in table] == ["NSVQ", "NSVQ without stages"]
    assert [r["seed"] for r in seeds] == [0]  # --seeds 3 finds seed 0's run; 1 and 2 are to train
    assert [r["name"] for r in runs] == list(names) and all(0 < r["utilization"] <= 1 for r in runs)
    assert runs[1]["stage_start"] == {"stage1": 0, "warmup": 1} and runs[2]["stage_start"] == {"stage1": 0}
    assert (tmp_path / "nat" / "natural.png").stat().st_size > 0 and (tmp_path / "nat" / "FSQ.json").exists()
    assert ablation[0]["utilization"] == 1.0 and ablation[0]["perplexity"] == 1.0  # no quantizer: one "code"
    assert all(math.isfinite(r["grid"]) and r["tint"] >= 0 for r in runs + ablation)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    checker = (torch.arange(32)[:, None] + torch.arange(32)) % 2 * 0.2 - 0.1  # a 2-pixel period
    shifted, grid = experiments.artefacts(x + 0.1, x), experiments.artefacts(x + checker, x)
    assert experiments.artefacts(x, x) == {"grid": 1.0, "tint": 0.0}
    assert shifted["tint"] == pytest.approx(12.75) and shifted["grid"] == pytest.approx(1.0)
    assert grid["grid"] > 5 and grid["tint"] < 1e-3
    conv = torch.nn.Conv2d(3, 8, 3)
    experiments.icnr_(conv)  # the 4 sub-pixels of each output channel start equal: no checkerboard
    assert torch.equal(conv.weight.view(2, 4, 3, 3, 3), conv.weight[::4, None].expand(2, 4, 3, 3, 3))
    for argv, error in ((["scale-sim", "--sim-steps", "5"], "--sim-steps"), (["stress", "--epochs", "0"], "--epochs"),
                        (["phases", "--only", "(unclosed"], "not a regular expression"),
                        (["sensitivity", "--alphas", "0.1", "-1"], "--alphas")):
        with pytest.raises(SystemExit):
            experiments.parse_args(argv)
        assert error in capsys.readouterr().err
    assert [experiments.parse_args(a).epochs for a in (["compare"], ["compare", "--paper-ratio"])] == [12, 8]
    with pytest.raises(train_mnist.DataError, match="--no-download"):
        experiments.main(["compare", "--data", str(tmp_path / "nothing"), "--no-download", "--out", str(tmp_path / "c")])
