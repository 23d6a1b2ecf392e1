"""Tests for nsvq.py and the training scripts: oracles, gradient routing, behaviour, DDP, smoke.

Run with:  python -m pytest -q test_nsvq.py
Everything runs on the CPU with tiny tensors and fixed seeds.
"""

import argparse
import dataclasses
import glob
import itertools
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import experiments
import nsvq

HERE = os.path.dirname(os.path.abspath(__file__))
QUANTIZERS = [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.SimVQ, nsvq.NSVQ, nsvq.NSSimVQ]


# --- naive oracles, written without the chunked expansion ------------------------------------

def brute_force_distances(z, codebook):
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (N, K) by explicit differences


def naive_dense_loss(z, codebook, indices, tau, weighting, lam):
    """L_NS with an explicit (N, K, D) difference tensor and a Python loop over latents."""
    N, D = z.shape
    K = codebook.shape[0]
    total = 0.0
    for i in range(N):
        diff = z[i].detach() - codebook  # (K, D)
        d = (diff ** 2).sum(1)  # (K,)
        p = torch.exp(-d.detach() / tau) / torch.exp(-d.detach() / tau).sum()
        w = p if weighting == "softmax" else torch.clamp(lam * K * p, max=1.0)
        for j in range(K):
            if j != int(indices[i]):
                total = total + w[j] * d[j]
    return total / (N * D)


# --- 1. oracles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [37, 256])  # 256: the blocked row maximum of _row_max
def test_chunked_search_picks_a_nearest_code_like_brute_force(K):
    torch.manual_seed(0)
    z = torch.randn(103, 5, dtype=torch.float64)
    codebook = torch.randn(K, 5, dtype=torch.float64)
    d = brute_force_distances(z, codebook)
    for chunk in (1, 7, 1000):
        idx = nsvq.nearest_code(z, codebook, chunk_size=chunk)
        chosen = d.gather(1, idx[:, None]).squeeze(1)
        torch.testing.assert_close(chosen, d.min(1).values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["softmax", "clamped"])
@pytest.mark.parametrize("K", [11, 128])
def test_non_stationary_loss_value_and_gradient_match_naive_oracle(weighting, K):
    torch.manual_seed(1)
    z = torch.randn(23, 4, dtype=torch.float64)
    codebook = torch.randn(K, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(K, (23,))  # arbitrary winners: the routine must exclude exactly these
    loss = nsvq.non_stationary_loss(z, codebook, indices, tau=0.7, weighting=weighting, lam=0.05)
    ref = naive_dense_loss(z, codebook, indices, 0.7, weighting, 0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    g, = torch.autograd.grad(loss, codebook)
    g_ref, = torch.autograd.grad(ref, codebook)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("weighting", ["softmax", "clamped"])
def test_nsvq_forward_ns_term_matches_naive_oracle_with_its_own_winners(weighting):
    torch.manual_seed(2)
    vq = nsvq.NSVQ(13, 3, alpha=0.3, tau=0.5, weighting=weighting, lam=0.1, chunk_size=4).double()
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(13, 3))
    z_e = torch.randn(2, 3, 5, dtype=torch.float64)
    out = vq(z_e)
    z = z_e.movedim(1, -1).reshape(-1, 3)
    winners = brute_force_distances(z, vq.embedding.detach()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), winners)
    ref = 0.3 * naive_dense_loss(z, vq.embedding, winners, 0.5, weighting, 0.1)
    torch.testing.assert_close(out.losses["ns"], ref, rtol=1e-6, atol=0)
    g, = torch.autograd.grad(out.losses["ns"], vq.embedding)
    g_ref, = torch.autograd.grad(ref, vq.embedding)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-12)


def test_row_max_equals_torch_max_with_ties_going_to_the_lowest_index():
    torch.manual_seed(3)
    for K in (50, 128, 1024):  # 50: the plain fallback; the others go through 64-wide blocks
        scores = torch.randint(0, 4, (64, K)).float()  # many exact ties in every row
        scores[5] = 7.0  # a row that is all ties
        values, indices = nsvq._row_max(scores)
        ref_values = scores.max(1).values
        first = torch.stack([torch.nonzero(row == row.max())[0, 0] for row in scores])
        assert torch.equal(values, ref_values) and torch.equal(indices, first)


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
    embed_sum = decay * e0 + (1 - decay) * sums
    n = cluster.sum()
    expected = embed_sum / ((cluster + eps) / (n + K * eps) * n)[:, None]
    torch.testing.assert_close(vq.cluster_size, cluster, rtol=1e-12, atol=0)
    torch.testing.assert_close(vq.embedding, expected, rtol=1e-12, atol=0)


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


def test_straight_through_passes_the_decoder_gradient_unchanged_to_z_e():
    torch.manual_seed(5)
    vq = nsvq.NSVQ(8, 3)
    z_e = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = vq(z_e)
    upstream = torch.randn_like(out.z_q)
    g_z, g_c = torch.autograd.grad(out.z_q, (z_e, vq.embedding), upstream, allow_unused=True)
    assert torch.equal(g_z, upstream)
    assert g_c is None


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
    _, g_cb = torch.autograd.grad(out.losses["codebook"], (z_e, vq.embedding), allow_unused=True,
                                  retain_graph=True)
    assert (g_cb[losers] == 0).all()  # the STE codebook term moves winners only


def test_dense_term_is_a_zero_tensor_when_switched_off_and_keys_stay_fixed():
    vq = nsvq.NSVQ(8, 3)
    z_e = torch.randn(4, 3)
    assert set(vq(z_e).losses) == {"codebook", "commit", "ns"}
    assert vq(z_e).losses["ns"] > 0
    vq.dense = False
    assert vq(z_e).losses["ns"] == 0
    vq.dense = True
    vq.eval()
    assert vq(z_e).losses["ns"] == 0
    assert set(nsvq.EMAVectorQuantizer(8, 3)(z_e).losses) == {"commit"}
    assert set(nsvq.SimVQ(8, 3)(z_e).losses) == {"codebook", "commit"}


def test_simvq_losses_train_the_linear_map_not_the_frozen_basis():
    vq = nsvq.SimVQ(8, 3)
    out = vq(torch.randn(4, 3, 5))
    sum(out.losses.values()).backward()
    assert vq.proj.weight.grad.abs().sum() > 0 and vq.proj.bias.grad.abs().sum() > 0
    assert "basis" in dict(vq.named_buffers()) and not vq.basis.requires_grad


def test_simvq_with_the_dense_loss_is_nsvqs_loss_on_the_effective_codebook_and_trains_the_map():
    torch.manual_seed(12)
    vq = nsvq.NSSimVQ(16, 3, alpha=0.5, tau=0.2)
    torch.nn.init.normal_(vq.proj.weight, std=0.7)
    z_e = torch.randn(2, 3, 4, 5)
    out = vq(z_e)
    codebook = vq.codebook.detach()
    z = z_e.movedim(1, -1).reshape(-1, 3)
    indices = brute_force_distances(z, codebook).argmin(1)
    expected = 0.5 * naive_dense_loss(z, codebook.clone().requires_grad_(), indices, 0.2, "softmax", 0.01)
    assert torch.equal(out.indices.reshape(-1), indices)
    torch.testing.assert_close(out.losses["ns"], expected.float(), rtol=1e-5, atol=1e-7)
    # The dense term alone reaches W and b, through every code that did not win a latent.
    weight = vq.proj.weight.detach().clone().requires_grad_()
    book = torch.nn.functional.linear(vq.basis, weight, vq.proj.bias.detach())
    reference = 0.5 * naive_dense_loss(z.double(), book.double(), indices, 0.2, "softmax", 0.01)
    reference.backward()
    out.losses["ns"].backward()
    assert vq.proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(vq.proj.weight.grad, weight.grad.float(), rtol=1e-4, atol=1e-7)
    with pytest.raises(NotImplementedError, match="SimVQ"):
        vq.replace_dead_codes_()
    vq.dense = False
    assert vq(z_e).losses["ns"] == 0


# --- 3. behaviour -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3), (2, 4, 3, 5)])
def test_decode_of_indices_equals_z_q_for_every_quantizer_and_layout(cls, shape):
    torch.manual_seed(7)
    vq = cls(10, 4)
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
            share = sum(1 for i in idx.tolist() if i == k) / n
            expected[k] += w * (share - expected[k])
    torch.testing.assert_close(vq.upkeep.usage, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def steps_until_dead(K, latents_per_step, H=64.0):
    """Steps after a code stops being chosen until it counts as dead (usage < 0.01 / K)."""
    vq = nsvq.VectorQuantizer(K, 2, usage_horizon=H, buffer_size=0)
    vq.upkeep.usage.fill_(1.0 / K)  # every code at the uniform share
    idx = torch.arange(1, latents_per_step + 1) % (K - 1) + 1  # code 0 is never chosen again
    z = torch.zeros(latents_per_step, 2)
    for step in range(1, 100_000):
        vq.update_(z, idx)
        if vq.upkeep.dead()[0]:
            return step


def test_a_code_dies_after_the_same_number_of_expected_assignments_at_any_scale():
    # MNIST: K = 1024, 128 images x 49 latents = 6 latents per code per step;
    # the paper's GPU: K = 65,536, 16 images x 256 latents = 0.06; the paper's node: 0.5.
    per_code = [steps_until_dead(K, n) * n / K for K, n in ((1024, 6272), (65536, 4096), (16384, 8192))]
    expected = math.log(100) * 64  # ln(1/threshold) * usage_horizon = 295 assignments per code
    for a in per_code:
        assert a == pytest.approx(expected, rel=0.05)
    assert 44 <= steps_until_dead(1024, 6272) <= 52  # MNIST: as before (an EMA of 0.9 per step: 44)


def test_at_half_a_latent_per_code_slow_codes_survive_and_never_chosen_codes_are_reseeded():
    # The paper's ratio: K = 16,384 codes, 8,192 latents per step. A quarter of the codes is
    # chosen at 30% of the uniform rate, a quarter never; replacement runs every step.
    K, N, steps = 16384, 8192, 700
    g = torch.Generator().manual_seed(0)
    rate = torch.ones(K)
    rate[: K // 4], rate[K // 4: K // 2] = 0.3, 0.0
    vq = nsvq.VectorQuantizer(K, 4)
    seeded_at = torch.full((K,), -1)
    reseeded = torch.zeros(K, dtype=torch.long)
    for step in range(steps):
        idx = torch.multinomial(rate, N, replacement=True, generator=g)
        vq.update_(torch.randn(N, 4, generator=g), idx)
        dead = vq.replace_dead_codes_()
        reseeded[dead] += 1
        first = dead[seeded_at[dead] < 0]
        seeded_at[first] = step
    assert (seeded_at >= 0).all() and seeded_at.max() <= 3  # the first calls seed every code
    slow, never = slice(0, K // 4), slice(K // 4, K // 2)
    assert reseeded[slow].max() == 1  # live but slow: never re-seeded after the first seeding
    assert (reseeded[never] >= 2).all()  # never chosen: re-seeded again, ...
    assert reseeded[K // 2:].max() == 1  # ... and codes at the uniform rate are left alone


def mixture(n, modes, generator):
    """Latents from a mixture of Gaussians around the rows of `modes`."""
    pick = torch.randint(len(modes), (n,), generator=generator)
    return modes[pick] + 0.5 * torch.randn(n, modes.shape[1], generator=generator)


def test_replacement_writes_distinct_latents_and_the_codebook_covers_the_data_like_iid_samples():
    # One GPU at the paper's size: 16 images x 256 tokens = 4,096 latents per step, K = 8,192.
    g = torch.Generator().manual_seed(1)
    K, D = 8192, 32
    modes = 2 * torch.randn(512, D, generator=g)
    vq = nsvq.NSVQ(K, D)
    for _ in range(4):
        z = mixture(4096, modes, g)
        vq.update_(z, vq(z).indices)
        vq.replace_dead_codes_()
    codebook = vq.codebook.detach()
    assert nsvq.duplicate_codes(codebook) == 0 and vq.upkeep.seeded.all()
    fresh = mixture(16384, modes, g)
    used = len(torch.unique(nsvq.nearest_code(fresh, codebook)))
    used_iid = len(torch.unique(nsvq.nearest_code(fresh, mixture(K, modes, g))))
    assert used >= 0.95 * used_iid


def test_identical_latents_and_copies_of_codes_are_never_written_twice():
    K, D = 16, 2
    vq = nsvq.VectorQuantizer(K, D, buffer_size=64)  # 16 latents enter the pool per call
    z = torch.zeros(16, D)  # a flat image region: every latent is the same vector ...
    z[:5] = torch.arange(1.0, 11.0).view(5, 2)  # ... but five
    vq.update_(z, torch.zeros(16, dtype=torch.long))
    dead = vq.replace_dead_codes_()
    assert len(dead) == 6  # 5 distinct latents + one copy of the flat vector, 10 codes left dead
    codebook = vq.codebook.detach()
    assert nsvq.duplicate_codes(codebook) == 0
    assert (~vq.upkeep.seeded).sum() == 10
    vq.update_(z, torch.zeros(16, dtype=torch.long))
    assert len(vq.replace_dead_codes_()) == 0  # only copies of existing codes are left: retired
    assert nsvq.duplicate_codes(vq.codebook.detach()) == 0
    assert not vq.upkeep.pool_fresh.any()


@pytest.mark.parametrize("cls", [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.NSVQ])
@pytest.mark.parametrize("replace_from", ["latents", "codes"])
def test_replacement_reseeds_exactly_the_dead_codes_and_leaves_live_ones_bit_identical(cls, replace_from):
    torch.manual_seed(8)
    K = 8
    vq = cls(K, 3, replace_from=replace_from, buffer_size=64)
    vq.upkeep.seeded.fill_(True)  # a codebook already initialised: only usage decides
    z = torch.randn(64, 3)
    vq.update_(z, torch.tensor([0, 1, 2, 5] * 16))  # codes 3, 4, 6, 7 never used
    before = vq.codebook.detach().clone()
    dead = vq.replace_dead_codes_()
    assert dead.tolist() == [3, 4, 6, 7]
    after = vq.codebook.detach()
    live = torch.tensor([0, 1, 2, 5])
    assert torch.equal(after[live], before[live])
    assert not torch.equal(after[dead], before[dead])
    torch.testing.assert_close(vq.upkeep.usage[dead], torch.full((4,), 1 / K))
    if replace_from == "latents":  # new codes are actual recent latents
        d = brute_force_distances(after[dead], z).min(1).values
        assert (d < 1e-10).all()
    else:  # new codes sit near live codes (noise = 1% of the codebook RMS)
        d = brute_force_distances(after[dead], before[live]).min(1).values.sqrt()
        assert (d < 0.1 * before.pow(2).mean().sqrt()).all()
    if cls is nsvq.EMAVectorQuantizer:
        assert torch.equal(vq.embed_sum[dead], after[dead])
        assert (vq.cluster_size[dead] == 1).all()
    assert vq.replace_dead_codes_().numel() == 0  # nothing is dead right after


def test_replacement_needs_update_first_and_simvq_refuses():
    with pytest.raises(RuntimeError, match="update_"):
        nsvq.NSVQ(4, 2).replace_dead_codes_()
    with pytest.raises(RuntimeError, match="update_"):
        nsvq.NSVQ(4, 2, replace_from="codes").replace_dead_codes_()
    with pytest.raises(NotImplementedError, match="SimVQ"):
        nsvq.SimVQ(4, 2).replace_dead_codes_()
    vq = nsvq.NSVQ(4, 2)
    vq.update_(torch.randn(8, 2), torch.arange(8) % 4)
    with pytest.raises(ValueError, match="threshold"):
        vq.replace_dead_codes_(threshold=2.0)


def test_non_finite_latents_leave_usage_pool_and_ema_codebook_as_they_were():
    torch.manual_seed(9)
    vq = nsvq.EMAVectorQuantizer(8, 3)
    z = torch.randn(32, 3)
    vq.update_(z, vq(z).indices)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    bad = torch.full((32, 3), float("nan"))
    vq.update_(bad, torch.zeros(32, dtype=torch.long))  # a skipped (non-finite) training step
    for k, v in vq.state_dict().items():
        if not k.startswith("upkeep.pool") and not k.startswith("upkeep.latent_pool"):
            assert torch.equal(v, state[k]), k
    written = ~torch.isfinite(vq.upkeep.latent_pool).all(1)  # rows are written ...
    assert written.any() and not (written & vq.upkeep.pool_fresh).any()  # ... but never handed out


def test_reset_adam_state_zeroes_only_the_given_rows():
    vq = nsvq.VectorQuantizer(6, 2)
    opt = torch.optim.Adam(vq.parameters(), lr=0.1)
    out = vq(torch.randn(10, 2))
    sum(out.losses.values()).backward()
    opt.step()
    state = opt.state[vq.embedding]
    state["exp_avg"].fill_(1.0)
    state["exp_avg_sq"].fill_(1.0)
    nsvq.reset_adam_state_(opt, vq.embedding, torch.tensor([1, 4]))
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
    assert not s.commitment and not s.encoder_trainable
    late = nsvq.StageSchedule(patience=1, warmup_epochs=0, gan_ramp_epochs=2, gan_stage1=False)
    assert late.gan_weight(0.5) == 0.0  # the GAN kept out of stage 1: it starts with stage 2's ramp
    late.end_epoch(0, 1.0)
    late.end_epoch(1, 1.0)
    assert late.stage == "stage2" and late.gan_weight(3.0) == 0.5


def test_stage_schedule_freeze_epoch_zero_warmup_and_a_single_stage():
    s = nsvq.StageSchedule(patience=100, freeze_epoch=3, warmup_epochs=0)
    for epoch, loss in enumerate([3.0, 2.0]):
        assert not s.end_epoch(epoch, loss)
    assert s.end_epoch(2, 1.0)  # epoch + 1 >= freeze_epoch, although the loss still improves
    assert s.stage == "stage2" and s.stage_start == {"stage1": 0, "warmup": 3, "stage2": 3}
    one = nsvq.StageSchedule(patience=None, freeze_epoch=None)
    assert not any(one.end_epoch(epoch, 1.0) for epoch in range(50)) and one.stage == "stage1"


def test_stage_schedule_resumes_mid_stage_from_its_state_dict_and_refuses_a_partial_one():
    a = nsvq.StageSchedule(patience=3, warmup_epochs=1)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.1, 0.1]
    for epoch, loss in enumerate(losses[:3]):
        a.end_epoch(epoch, loss)
    b = nsvq.StageSchedule(patience=3, warmup_epochs=1)
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
    names = set(vq.state_dict())
    assert {"upkeep.usage", "upkeep.seeded", "upkeep.pool_fresh", "upkeep.pool_written"} <= names
    if cls is nsvq.EMAVectorQuantizer:
        assert {"cluster_size", "embed_sum", "embedding"} <= names


@pytest.mark.parametrize("bad, error", [
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(2, 4, 5)), "codebook dim is 3"),
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(3)), "channel-first"),
    (lambda: nsvq.NSVQ(8, 3)(torch.ones(2, 3, dtype=torch.long)), "floating"),
    (lambda: nsvq.NSVQ(8, 3)(torch.randn(0, 3, 4)), "empty batch"),
    (lambda: nsvq.VectorQuantizer(0, 3), "codebook_size"),
    (lambda: nsvq.VectorQuantizer(8, 3, beta=-1.0), "beta"),
    (lambda: nsvq.VectorQuantizer(8, 3, usage_horizon=0), "usage_horizon"),
    (lambda: nsvq.VectorQuantizer(8, 3, buffer_size=-1), "buffer_size"),
    (lambda: nsvq.VectorQuantizer(8, 3, replace_from="noise"), "replace_from"),
    (lambda: nsvq.EMAVectorQuantizer(8, 3, decay=1.5), "decay"),
    (lambda: nsvq.EMAVectorQuantizer(8, 3, decay=-1.0), "decay"),
    (lambda: nsvq.NSVQ(8, 3, tau=0.0), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau=float("inf")), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau=float("nan")), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau=1e-40), "tau"),
    (lambda: nsvq.NSVQ(8, 3, tau_mode="adaptive"), "tau_mode"),
    (lambda: nsvq.NSVQ(8, 3, weighting="gaussian"), "weighting"),
    (lambda: nsvq.NSVQ(8, 3, alpha=float("nan")), "alpha"),
    (lambda: nsvq.NSVQ(8, 3).decode(torch.tensor([[0, 8]])), r"\[0, 8\)"),
    (lambda: nsvq.NSVQ(8, 3).decode(torch.tensor([0.0])), "int"),
    (lambda: nsvq.NSVQ(8, 3).update_(torch.randn(4, 3), torch.tensor([0, 1, 2, 9])), r"\[0, 8\)"),
    (lambda: nsvq.NSVQ(8, 3).update_(torch.randn(4, 3), torch.tensor([0, 1])), "4 latents"),
    (lambda: nsvq.StageSchedule(patience=0), "patience"),
    (lambda: nsvq.StageSchedule(warmup_epochs=1.5), "warmup_epochs"),
])
def test_bad_inputs_raise_clear_errors(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        bad()


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_indices_under_bf16_autocast_equal_the_fp32_indices(cls):
    torch.manual_seed(10)
    vq = cls(512, 8)
    if issubclass(cls, nsvq.SimVQ):  # a trained-looking map, not the identity-ish initial one
        torch.nn.init.normal_(vq.proj.weight, std=0.5)
    else:
        with torch.no_grad():
            vq.codebook.copy_(torch.randn(512, 8))
    conv = torch.nn.Conv2d(8, 8, 1)
    x = torch.randn(4, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_e = conv(x)
        assert z_e.dtype == torch.bfloat16
        out = vq(z_e)
        assert vq.codebook.dtype == torch.float32
    assert out.z_q.dtype == torch.bfloat16
    z = z_e.float()
    reference = brute_force_distances(z.movedim(1, -1).reshape(-1, 8).double(),
                                      vq.codebook.detach().double()).argmin(1)
    assert torch.equal(out.indices.reshape(-1), reference)
    assert torch.equal(out.indices, vq(z).indices)  # the same latents without autocast
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def test_torch_compile_compiles_the_nsvq_forward():
    torch.manual_seed(11)
    vq = nsvq.NSVQ(32, 4, tau_mode="relative")
    z_e = torch.randn(2, 4, 3, 3)
    eager = vq(z_e)
    compiled = torch.compile(vq)(z_e)
    assert torch.equal(compiled.indices, eager.indices)
    for key in eager.losses:
        torch.testing.assert_close(compiled.losses[key], eager.losses[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.diagnostics["kernel_mass"], eager.diagnostics["kernel_mass"])


def test_codebook_stats_drift_and_churn_diagnostics():
    stats = nsvq.codebook_stats(torch.tensor([2, 2, 0, 0]))
    assert stats == {"utilization": 0.5, "perplexity": pytest.approx(2.0), "dead_codes": 2}
    assert nsvq.codebook_stats(torch.ones(7))["perplexity"] == pytest.approx(7.0)
    assert nsvq.encoder_drift(torch.zeros(2, 2), torch.full((2, 2), 3.0)) == pytest.approx(3.0)
    assert nsvq.assignment_churn(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    assert nsvq.duplicate_codes(torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 2.0]])) == 1


def test_kernel_mass_grows_with_tau_and_the_forward_reports_it():
    torch.manual_seed(12)
    z, codebook = torch.randn(64, 2), torch.randn(32, 2)
    masses = [nsvq.kernel_mass(z, codebook, tau) for tau in (1e-4, 0.1, 10.0)]
    assert masses[0] < 0.01 and masses[0] < masses[1] < masses[2] < 1.0
    assert masses[2] > 0.9
    vq = nsvq.NSVQ(32, 2, tau=0.1)
    with torch.no_grad():
        vq.embedding.copy_(codebook)
    out = vq(z)
    assert float(out.diagnostics["kernel_mass"]) == pytest.approx(masses[1], rel=1e-6)
    assert float(out.diagnostics["tau"]) == pytest.approx(0.1)
    vq.dense = False
    assert vq(z).diagnostics == {}


def test_relative_tau_keeps_the_kernel_when_the_latent_scale_changes_and_absolute_tau_does_not():
    torch.manual_seed(13)
    z, codebook = torch.randn(256, 16), torch.randn(128, 16)
    d_mean = float(nsvq.mean_quantization_error(z, codebook, nsvq.nearest_code(z, codebook)))
    for scale in (0.1, 10.0):
        rel = nsvq.search_and_dense_loss(z * scale, codebook * scale, 0.5, tau_mode="relative")
        base = nsvq.search_and_dense_loss(z, codebook, 0.5, tau_mode="relative")
        torch.testing.assert_close(rel.mass, base.mass, rtol=1e-4, atol=0)
        torch.testing.assert_close(rel.loss, base.loss * scale ** 2, rtol=1e-4, atol=0)
        assert float(base.tau) == pytest.approx(0.5 * d_mean, rel=1e-5)
    absolute = [nsvq.kernel_mass(z * s, codebook * s, 0.5 * d_mean) for s in (0.1, 1.0, 10.0)]
    assert absolute[0] > 0.95 and absolute[2] < 0.05  # the same absolute tau: uniform, or inert
    # relative tau is the absolute one at T = tau * mean nearest squared distance (oracle)
    ref = nsvq.search_and_dense_loss(z, codebook, 0.5 * d_mean)
    torch.testing.assert_close(base.loss, ref.loss, rtol=1e-5, atol=0)


# --- 4. DDP: two gloo processes --------------------------------------------------------------

def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for (name, cls), replace_from in itertools.product(
            [("nsvq", nsvq.NSVQ), ("ema", nsvq.EMAVectorQuantizer), ("ste", nsvq.VectorQuantizer)],
            ["latents", "codes"]):
        torch.manual_seed(0)
        vq = cls(32, 3, replace_from=replace_from)  # same initial codebook on both ranks
        torch.manual_seed(100 + rank)  # ranks see different data and draw different random numbers
        for step in range(8):
            z_e = torch.randn(2, 3, 4, 4) * (1 + rank)
            if step == 5:
                z_e[:, :, :2] = 0.0  # identical latents on both ranks: copies must not be written
            vq.update_(z_e, vq(z_e).indices)
            if step % 2 == 1:
                vq.replace_dead_codes_()
        out[name, replace_from] = {k: v.clone() for k, v in vq.state_dict().items()}
    results[rank] = out
    dist.destroy_process_group()


def test_ddp_ranks_with_different_data_keep_bitwise_identical_quantizer_state():
    port = 29500 + (os.getpid() % 1000)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    for name in itertools.product(("nsvq", "ema", "ste"), ("latents", "codes")):
        a, b = results[0][name], results[1][name]
        for key in a:  # codebook, usage, seeded, latent pool, EMA statistics: every buffer
            assert torch.equal(a[key], b[key]), (name, key)
        assert (a["upkeep.usage"] > 0).any() and a["upkeep.seeded"].all()
        codebook = a["embedding"]
        assert nsvq.duplicate_codes(codebook) == 0, name


# --- 5. smoke -------------------------------------------------------------------------------

def test_bench_quick_runs_and_prints_the_table(capsys):
    import bench
    bench.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| NSVQ softmax |" in out and "peak memory" in out


# --- 6. train_mnist.py ----------------------------------------------------------------------

import gzip  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402

import train_mnist  # noqa: E402


def write_idx(path, array, kind):
    magic = 2051 if kind == "images" else 2049
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", 28, 28) if kind == "images" else b"")
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def make_fake_mnist(folder, n_train=192, n_test=64, seed=0):
    """Blurry random strokes in the MNIST IDX layout, so the real loader path runs."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        canvas = torch.zeros(n, 1, 28, 28)
        for _ in range(3):
            r, c = torch.randint(4, 24, (2, n), generator=g)
            canvas[torch.arange(n), 0, r, c] = 1.0
        images = torch.nn.functional.avg_pool2d(canvas, 5, 1, 2).clamp(max=1 / 25) * 25 * 255
        prefix = "train" if split == "train" else "t10k"
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images.to(torch.uint8)[:, 0], "images")
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
                  torch.randint(10, (n,), generator=g).to(torch.uint8), "labels")
    return folder


def tiny_config(tmp_path, **overrides):
    data = make_fake_mnist(str(tmp_path / "data"))
    base = dict(data=data, download=False, out=str(tmp_path / "run"), codebook_size=64, dim=4,
                width=16, batch_size=32, epochs=3, freeze_epoch=1, warmup_epochs=1, probe_every=3,
                quiet=True, device="cpu")
    base.update(overrides)
    return train_mnist.Config(**base)


def test_mnist_main_runs_every_stage_and_writes_results_figures_and_a_usable_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    results = train_mnist.main(cfg)
    assert results["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    saved = json.load(open(tmp_path / "run" / "results.json"))
    for key in ("quantizer", "codebook_size", "test_mse", "test_psnr", "utilization", "perplexity",
                "dead_codes", "train_seconds", "epochs", "stage_start"):
        assert key in saved
    assert 0 < saved["utilization"] <= 1 and saved["test_mse"] > 0
    for name in ("reconstructions.png", "usage.png", "curves.png", "ckpt.pt"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert {h["stage"] for h in saved["history"]} == {"stage1", "warmup", "stage2"}
    for h in saved["history"]:  # the probe's scales: finite, and the triangle inequality holds
        assert 0 <= h["quant_error"] <= h["latent_norm"] + h["code_norm"] + 1e-6
        assert h["output_std"] >= 0 and math.isfinite(h["output_std"])
    model = train_mnist.load_autoencoder(str(tmp_path / "run" / "ckpt.pt"))
    images = train_mnist.load_split(cfg, "test")[:5]
    indices = model.encode(images)
    assert indices.shape == (5, 7, 7) and indices.dtype == torch.int64
    assert model.decode(indices).shape == (5, 1, 28, 28)


def test_mnist_encoder_is_frozen_after_stage_one(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    train_mnist.main(cfg)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    train_mnist.main(tiny_config(tmp_path, epochs=3, resume="auto"))  # epoch 2 is stage 2
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    for key, value in ckpt["model"].items():
        if key.startswith("encoder."):
            assert torch.equal(after["model"][key], value), key
    assert not torch.equal(after["model"]["decoder.0.weight"], ckpt["model"]["decoder.0.weight"])


def test_mnist_resume_matches_the_uninterrupted_run(tmp_path):
    train_mnist.main(tiny_config(tmp_path / "a", epochs=3))
    train_mnist.main(tiny_config(tmp_path / "b", epochs=2))
    train_mnist.main(tiny_config(tmp_path / "b", epochs=3, resume="auto"))
    a = torch.load(tmp_path / "a" / "run" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "ckpt.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["schedule"] == b["schedule"]


def test_mnist_resume_without_a_checkpoint_or_with_another_model_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        train_mnist.main(tiny_config(tmp_path, resume="auto"))
    train_mnist.main(tiny_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="codebook_size"):
        train_mnist.main(tiny_config(tmp_path, epochs=2, codebook_size=32, resume="auto"))
    with pytest.raises(ValueError, match="decoder_norm"):
        train_mnist.main(tiny_config(tmp_path, epochs=2, decoder_norm=False, resume="auto"))


def test_mnist_refuses_to_overwrite_an_earlier_run_unless_asked(tmp_path):
    train_mnist.main(tiny_config(tmp_path, epochs=1))
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(train_mnist.OutputError, match="--resume auto.*--overwrite"):
        train_mnist.main(tiny_config(tmp_path, epochs=1, seed=1))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    train_mnist.main(tiny_config(tmp_path, epochs=1, seed=1, overwrite=True))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() != before


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
    write_idx(path, torch.zeros(3, 28, 28, dtype=torch.uint8), "labels")  # labels magic on images
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
    md5 = __import__("hashlib").md5(b"payload").hexdigest()
    with pytest.raises(train_mnist.DataError, match="md5"):
        train_mnist.download([f"file://{src}/file.gz"], str(target), "0" * 32)
    assert list(tmp_path.iterdir()) == [src]  # nothing written beside the mirror
    train_mnist.download([f"file://{tmp_path}/missing.gz", f"file://{src}/file.gz"], str(target), md5)
    assert target.read_bytes() == b"payload"


def test_mnist_init_from_starts_from_the_given_weights_and_refuses_a_model_they_do_not_fit(tmp_path):
    cfg = train_mnist.resolve(tiny_config(tmp_path, quantizer="ste", replace=False, stages=False))
    model = train_mnist.Autoencoder(cfg)
    with torch.no_grad():
        model.vq.embedding.copy_(torch.randn(64, 4) * 3)  # far from the default initialisation
    torch.save(model.state_dict(), tmp_path / "init.pt")
    run = tiny_config(tmp_path, quantizer="ste", replace=False, stages=False, gan=False, epochs=1, lr=1e-9,
                      init_from=str(tmp_path / "init.pt"))
    train_mnist.main(run)
    trained = train_mnist.load_autoencoder(str(tmp_path / "run" / "ckpt.pt"))
    torch.testing.assert_close(trained.vq.embedding, model.vq.embedding, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        train_mnist.main(dataclasses.replace(run, width=32, overwrite=True))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="not a readable state_dict"):
        train_mnist.main(dataclasses.replace(run, init_from=str(tmp_path / "notes.txt"), overwrite=True))
    with pytest.raises(ValueError, match="pass one"):
        train_mnist.resolve(dataclasses.replace(run, resume="auto"))


def test_mnist_gan_in_stage_one_and_the_late_reseeding_act_where_they_say(tmp_path):
    r = train_mnist.main(tiny_config(tmp_path, gan_stage1=True, epochs=3, freeze_epoch=1))
    by_stage = {e["stage"]: e for e in r["epoch_log"]}
    assert "gan" in by_stage["stage1"] and "gan" not in by_stage["warmup"] and "gan" in by_stage["stage2"]
    r = train_mnist.main(tiny_config(tmp_path, overwrite=True, epochs=3, freeze_epoch=1))
    assert "gan" not in r["epoch_log"][0]  # the default keeps it out of stage 1
    # --reseed-at 4: from step 4 every code is re-seeded once more, live or not. The pool hands out
    # 16 latents per call here (a quarter of K), so each seeding of all 64 codes takes 4-5 calls.
    seen = {}
    real = nsvq.CodebookUpkeep.reseed_
    for at in (0, 4):
        seen[at] = []

        def spy(self, codebook, threshold=0.01):
            dead, new = real(self, codebook, threshold)
            seen[at].append(len(dead))
            return dead, new
        with pytest.MonkeyPatch.context() as m:
            m.setattr(nsvq.CodebookUpkeep, "reseed_", spy)
            train_mnist.main(tiny_config(tmp_path, overwrite=True, gan=False, epochs=2, stages=False, reseed_at=at))
    assert seen[4][:4] == seen[0][:4] and sum(seen[0][:5]) == 64  # the same first seeding
    assert sum(seen[4][4:9]) == 64 and sum(seen[0][4:9]) < 64
    with pytest.raises(ValueError, match="needs --replace"):
        train_mnist.resolve(tiny_config(tmp_path, quantizer="ste", reseed_at=3))


def test_mnist_evaluation_ssim_is_metrics_ssim_over_the_test_split(tmp_path):
    import metrics
    cfg = train_mnist.resolve(tiny_config(tmp_path))
    model = train_mnist.Autoencoder(cfg)
    images = torch.rand(30, 1, 28, 28)
    result, _ = train_mnist.evaluate(model, images, batch_size=7)
    with torch.no_grad():
        model.eval()
        expected = float(metrics.ssim(model(images)[0], images).mean())
    assert result["test_ssim"] == pytest.approx(expected, rel=1e-6)


def test_mnist_command_line_lists_every_config_field_and_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mnist.parse_args(["--help"])
    out = capsys.readouterr().out
    for f in train_mnist.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out
    assert "--no-gan" in out
    bad = subprocess.run([sys.executable, "train_mnist.py", "--quantizer", "vqgan", "--data",
                          make_fake_mnist(str(tmp_path / "d")), "--no-download", "--out", str(tmp_path / "o")],
                         cwd=HERE, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown --quantizer 'vqgan'" in bad.stderr
    with pytest.raises(ValueError, match="multiple of 8 with decoder_norm"):
        train_mnist.resolve(train_mnist.Config(width=12))
    # a comment that runs over two lines is printed whole
    assert "nearest code); equal here" in " ".join(out.split())


def test_mnist_default_freeze_epoch_leaves_the_warmup_and_a_stage_two_epoch():
    for epochs, warmup, gan, freeze in ((5, 1, True, 3), (5, 2, True, 2), (5, 2, False, 3), (2, 2, True, 1)):
        cfg = train_mnist.resolve(train_mnist.Config(epochs=epochs, warmup_epochs=warmup, gan=gan))
        assert cfg.freeze_epoch == freeze, (epochs, warmup, gan)
    s = nsvq.StageSchedule(patience=10, freeze_epoch=2, warmup_epochs=2)
    for epoch in range(5):
        s.end_epoch(epoch, 1.0)
    assert s.stage_start == {"stage1": 0, "warmup": 2, "stage2": 4}  # one stage-2 epoch of five


def test_readme_python_blocks_run():
    import re
    readme = open(os.path.join(HERE, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# --- 7. train_imagenet.py and metrics.py ----------------------------------------------------

import signal  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import metrics  # noqa: E402
import train_imagenet  # noqa: E402


def make_image_folder(root, n_train=24, n_val=8, seed=0, broken=True):
    """A tiny ImageNet-layout folder of smooth random JPEGs of varied sizes (plus one broken file)."""
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
        with open(os.path.join(root, "train", "n01", "broken.JPEG"), "wb") as f:
            f.write(b"not a jpeg")
    return root


def tiny_imagenet(tmp_path, **overrides):
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data)
    base = dict(data=data, out=str(tmp_path / "run"), device="cpu", amp="none", quiet=True)
    base.update(overrides)
    return train_imagenet.make_config("tiny", **base)


def test_imagenet_tiny_runs_all_stages_counts_a_corrupt_jpeg_and_gives_a_tokenizer(tmp_path):
    result = train_imagenet.main(tiny_imagenet(tmp_path))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    assert result["unreadable_images"] == 1 and result["images"] == 8
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["steps"] == 9 and 0 < saved["utilization"] <= 1
    assert (tmp_path / "run" / "recon-final.png").stat().st_size > 0
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {line["stage"] for line in lines if "stage" in line} == {"stage1", "warmup", "stage2"}
    first = lines[0]  # the quantizer at scale: re-seeded, dead, kernel, probe scales
    assert first["reseeded"] > 0 and 0 < first["kernel_mass"] < 1 and first["tau"] > 0
    assert first["quant_error"] > 0 and first["latent_norm"] > 0 and "drift" in first
    ckpts = train_imagenet.checkpoints(str(tmp_path / "run"))
    assert len(ckpts) == 2  # keep_ckpts
    model = train_imagenet.load_autoencoder(ckpts[-1])
    indices = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert indices.shape == (2, 16, 16) and model.decode(indices).shape == (2, 3, 32, 32)
    assert not [p for p in os.listdir(tmp_path / "run") if ".tmp" in p]  # no temporary file left


def test_imagenet_simvq_with_the_dense_loss_trains_in_stages_and_replaces_nothing(tmp_path):
    result = train_imagenet.main(tiny_imagenet(tmp_path, quantizer="simvq-ns", gan_stage1=False))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    stage1 = [line for line in lines if line.get("stage") == "stage1"]
    assert stage1 and all(line["ns"] > 0 and 0 < line["kernel_mass"] < 1 and line["reseeded"] == 0 for line in stage1)
    # --no-gan-stage1: the adversarial loss only after the freeze
    assert not any("gan" in line for line in stage1) and any("gan" in line for line in lines if line.get("stage") == "stage2")
    model = train_imagenet.load_autoencoder(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])
    assert isinstance(model.vq, nsvq.NSSimVQ) and len(model.vq.upkeep.latent_pool) == 0


def test_imagenet_resume_after_a_stop_matches_the_uninterrupted_run_bitwise(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path / "a"))
    train_imagenet.main(tiny_imagenet(tmp_path / "b", max_steps=4))  # stops mid-epoch, in warm-up
    train_imagenet.main(tiny_imagenet(tmp_path / "b", resume="auto"))
    a = torch.load(train_imagenet.checkpoints(str(tmp_path / "a" / "run"))[-1], weights_only=False)
    b = torch.load(train_imagenet.checkpoints(str(tmp_path / "b" / "run"))[-1], weights_only=False)
    for part in ("model", "ema", "disc"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["schedule"] == b["schedule"] and a["state"]["step"] == b["state"]["step"] == 9


def test_imagenet_resume_loads_checkpoints_to_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    # On a GPU node torch.load(map_location=device) would put the RNG states on the GPU, and
    # torch.set_rng_state accepts CPU tensors only. Emulate "another device" with the meta device:
    # any load that is not mapped to the CPU gets meta tensors and the resume fails.
    train_imagenet.main(tiny_imagenet(tmp_path, max_steps=2))
    real_load = torch.load

    def load(path, map_location=None, **kwargs):
        ckpt = real_load(path, map_location="cpu", **kwargs)
        if map_location != "cpu":
            ckpt = torch.utils._pytree.tree_map(lambda t: t.to("meta") if torch.is_tensor(t) else t, ckpt)
        return ckpt

    monkeypatch.setattr(torch, "load", load)
    result = train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", epochs=1))
    assert result["steps"] == 3
    model = train_imagenet.load_autoencoder(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])
    assert model.vq.codebook.device.type == "cpu"


def test_imagenet_eval_only_reports_simvq_metrics_with_random_networks(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    result = train_imagenet.main(tiny_imagenet(tmp_path, eval_only=True, resume="auto",
                                               lpips_weights="random", eval_lpips=True,
                                               inception="random", max_eval_images=6, eval_batch=4))
    assert result["images"] == 6
    for key in ("rfid", "lpips_alex", "lpips_vgg", "psnr", "ssim", "utilization", "perplexity"):
        assert math.isfinite(result[key]), key
    assert json.load(open(tmp_path / "run" / "eval.json"))["rfid"] == result["rfid"]
    # Evaluation runs in fp32 whatever --amp says (SimVQ's evaluation.py): the same numbers.
    fp32, bf16 = (train_imagenet.main(tiny_imagenet(tmp_path, eval_only=True, resume="auto", amp=amp,
                                                    max_eval_images=6, eval_batch=4)) for amp in ("none", "bf16"))
    assert bf16 == fp32


def run_torchrun(tmp_path, *options, quantizer="nsvq"):
    data = str(tmp_path / "data")
    if not os.path.isdir(data):
        make_image_folder(data)
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "train_imagenet.py", "--preset", "tiny",
           "--data", data, "--device", "cpu", "--amp", "none", "--out", str(tmp_path / quantizer),
           "--quiet", "--quantizer", quantizer, *options]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)


def test_imagenet_torchrun_two_ranks_end_bitwise_identical_and_only_rank_zero_writes(tmp_path, quantizer="nsvq"):
    # At the end of a multi-process run every rank compares, bitwise, all weights, every
    # quantizer buffer and the EMA weights with rank 0's (check_identical), and a non-zero rank
    # that tries to write a file raises: a mismatch or a stray write ends the run with an error.
    run = run_torchrun(tmp_path, "--check-codebook", "--epochs", "2", "--eval-every", "1",
                       quantizer=quantizer)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    saved = json.load(open(tmp_path / quantizer / "results.json"))
    assert saved["steps"] == 6  # global batch 8 split 4 + 4: the same steps as one process
    assert saved["images"] == 8  # every val image evaluated once, over both ranks


def test_imagenet_sigterm_saves_a_checkpoint_and_exits_with_143(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    cmd = [sys.executable, "train_imagenet.py", "--preset", "tiny", "--data", data, "--device", "cpu",
           "--amp", "none", "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1000",
           "--log-every", "1"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest  # saved, but not finished: `&&` stops here
    assert "(stopped by signal 15)" in rest and "continue it with --resume auto" in rest
    assert "Traceback" not in rest
    ckpts = train_imagenet.checkpoints(str(tmp_path / "run"))
    assert ckpts and train_imagenet.load_checkpoint(ckpts[-1])["state"]["step"] >= 3


def test_imagenet_non_finite_steps_are_skipped_then_stop_the_run_with_good_weights(tmp_path, monkeypatch):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    before = train_imagenet.checkpoints(str(tmp_path / "run"))
    good = train_imagenet.load_checkpoint(before[-1])
    monkeypatch.setattr(train_imagenet, "to_model_range", lambda images: torch.full(images.shape, float("nan")))
    with pytest.raises(RuntimeError, match="non-finite"):
        train_imagenet.main(tiny_imagenet(tmp_path, epochs=3, resume="auto", max_bad_steps=2, ckpt_every=1))
    after = train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])
    assert after["state"]["step"] > good["state"]["step"]  # steps were taken, and skipped:
    for part in ("model", "disc"):  # (the weight EMA keeps averaging the unchanged weights)
        for key, value in good[part].items():
            if "latent_pool" not in key and "pool_" not in key:  # NaN latents enter no pool slot as fresh
                assert torch.equal(after[part][key], value), (part, key)


def test_imagenet_packed_data_trains_and_rejects_a_wrong_size(tmp_path):
    cfg = tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), prepare=True)
    train_imagenet.main(cfg)
    meta = json.load(open(tmp_path / "packed" / "train.json"))
    assert meta["n"] == 25 and meta["unreadable"] == 1
    result = train_imagenet.main(tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), data="", epochs=1))
    assert result["images"] == 8
    with pytest.raises(train_imagenet.DataError, match="packed at 32px"):
        train_imagenet.main(tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), data="",
                                          image_size=64, epochs=1, overwrite=True))


def test_imagenet_paper_model_has_simvq_parameter_counts():
    cfg = train_imagenet.resolve(train_imagenet.Config(data="-"))
    with torch.device("meta"):
        model = train_imagenet.Autoencoder(cfg)
        disc = train_imagenet.make_discriminator()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.encoder) == pytest.approx(24.3e6, rel=0.02)
    assert count(model.decoder) == pytest.approx(39.9e6, rel=0.02)
    assert count(disc) == pytest.approx(2.77e6, rel=0.02)  # taming's 3-layer PatchGAN
    assert model.vq.codebook.shape == (65536, 128) and isinstance(model.vq, nsvq.NSVQ)
    assert model.vq.tau_mode == "relative"


def test_imagenet_preset_applies_in_resolve_and_tokens_follow_the_downsampling():
    cfg = train_imagenet.resolve(train_imagenet.Config(preset="tiny", data="-"))
    assert cfg.image_size == 32 and cfg.codebook_size == 256 and not cfg.compile
    assert train_imagenet.resolve(cfg) == cfg  # applied once
    explicit = train_imagenet.parse_args(["--preset", "tiny", "--compile", "--data", "-"])
    assert train_imagenet.resolve(explicit).compile and explicit.image_size == 32  # flags win
    model = train_imagenet.Autoencoder(cfg)
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16)  # f = 2 ** (2 - 1)


def test_imagenet_resize_and_crop_follow_torchvision_resize_and_center_crop():
    img = Image.fromarray(np.arange(131 * 64 * 3, dtype=np.uint32).reshape(64, 131, 3).astype(np.uint8))
    out = train_imagenet.resize_and_crop(img, 64)  # short side already 64: no resize
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(img)[:, 34:98])  # offset round(67 / 2) = 34
    wide = Image.new("RGB", (300, 200))
    assert train_imagenet.resize_and_crop(wide, 128).size == (128, 128)
    # Resize(128) of 300 x 200 is int(128 * 300 / 200) = 192 x 128 with Pillow's bilinear filter
    resized = wide.resize((192, 128), Image.BILINEAR)
    assert np.array_equal(np.asarray(train_imagenet.resize_and_crop(wide, 128)), np.asarray(resized)[:, 32:160])


def test_imagenet_16_bit_images_are_scaled_not_clipped(tmp_path):
    path = str(tmp_path / "deep.png")
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(path)
    rgb = np.asarray(train_imagenet.read_rgb(path))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert (rgb[..., 0] == 255).mean() < 0.01  # convert("RGB") would have clipped 99.6% to 255
    np.testing.assert_allclose(rgb[..., 0], np.round(levels / 257), atol=0)


def naive_ssim(x, y, window=7):
    """skimage's default SSIM written with explicit windows (one image, one channel)."""
    H, W = x.shape
    values = []
    for i in range(H - window + 1):
        for j in range(W - window + 1):
            a, b = x[i:i + window, j:j + window].flatten(), y[i:i + window, j:j + window].flatten()
            cov = np.cov(np.stack([a, b]))  # sample covariance (N - 1)
            ma, mb = a.mean(), b.mean()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            values.append((2 * ma * mb + c1) * (2 * cov[0, 1] + c2)
                          / ((ma ** 2 + mb ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    return np.mean(values)


def test_ssim_psnr_and_uint8_levels_follow_simvqs_evaluation():
    torch.manual_seed(14)
    x, y = torch.rand(2, 3, 12, 11), torch.rand(2, 3, 12, 11)
    got = metrics.ssim(x, y)
    for i in range(2):
        expected = np.mean([naive_ssim(x[i, c].double().numpy(), y[i, c].double().numpy()) for c in range(3)])
        assert float(got[i]) == pytest.approx(expected, rel=1e-9)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    levels = metrics.to_uint8_levels(torch.tensor([0.0, 0.5, 254.9 / 255, 1.0]))
    assert torch.equal(levels * 255, torch.tensor([0.0, 127.0, 254.0, 255.0]))  # truncation, as (x*255).to(uint8)
    big, small = torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
    small[0] = 0.1  # one image off by 0.1: the batch MSE is 0.01 / 4
    assert float(metrics.psnr_of_batch(big, small)) == pytest.approx(10 * math.log10(400), rel=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    torch.manual_seed(13)
    mu1, mu2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))  # the same rotation of both
    got = metrics.frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    stats = metrics.FeatureStats(3)
    f = torch.randn(50, 3, dtype=torch.float64)
    stats.add(f)
    mu, cov = stats.mean_cov()
    torch.testing.assert_close(cov, torch.cov(f.T))
    torch.testing.assert_close(mu, f.mean(0))


def test_lpips_networks_and_inception_shapes():
    torch.manual_seed(14)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for net in ("vgg", "alex"):
        lpips = metrics.LPIPS(net, "random")
        assert lpips(x, x).abs().max() == 0
        assert (lpips(x, torch.rand(2, 3, 64, 64) * 2 - 1) != 0).all()
    alex = metrics.LPIPS("alex", "random")
    assert [alex.features[i].out_channels for i in (0, 3, 6, 8, 10)] == [64, 192, 384, 256, 256]
    assert metrics.InceptionFID("random")(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


def test_missing_lpips_weights_stop_the_run_before_its_first_step_naming_the_flag(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(metrics.WeightsError, match="--lpips-weights .*vgg16-397923af.pth"):
        train_imagenet.main(tiny_imagenet(tmp_path, perceptual_weight=1.0, lpips_weights=str(empty)))
    with pytest.raises(ValueError, match="--perceptual-weight 0"):
        train_imagenet.main(tiny_imagenet(tmp_path, perceptual_weight=1.0, lpips_weights="random"))
    with pytest.raises(metrics.WeightsError, match="--inception"):
        train_imagenet.main(tiny_imagenet(tmp_path, inception=str(empty / "missing.pth")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    bad = subprocess.run([sys.executable, "train_imagenet.py", "--preset", "tiny", "--data",
                          str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "o"),
                          "--inception", str(empty)], cwd=HERE, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0  # one line
    assert "pt_inception-2015-12-05-6726825d.pth" in bad.stderr


def test_bench_imagenet_quick_times_the_trainers_own_step(capsys):
    import bench
    bench.main(["--imagenet", "--quick", "--repeats", "1", "--batch", "2"])
    out = capsys.readouterr().out
    assert "train_step" in out and "NSVQ / SimVQ, bf16 eager" in out and "steady state" in out
    nsvq_flops, simvq_flops = (float(v) for v in re.findall(r"(?:NSVQ|SimVQ) ([0-9.]+) T,", out))
    assert nsvq_flops > 0 and simvq_flops > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_scripts_refuse_a_device_that_is_not_there(tmp_path):
    with pytest.raises(ValueError, match="not available"):
        train_mnist.main(tiny_config(tmp_path, device="cuda"))
    with pytest.raises(ValueError, match="not available"):
        train_imagenet.main(tiny_imagenet(tmp_path, device="cuda"))


# --- 7a. a newcomer's first minutes: flags, help, exits -------------------------------------

def test_no_download_through_the_command_line_never_touches_the_network(tmp_path):
    assert not train_mnist.parse_args(["--no-download"]).download
    assert train_mnist.parse_args([]).download and not train_mnist.parse_args(["--no-gan"]).gan
    missing = str(tmp_path / "typo")
    run = subprocess.run([sys.executable, "train_mnist.py", "--data", missing, "--no-download", "--out",
                          str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--no-download is set" in run.stderr and "downloading" not in run.stdout
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out")  # nothing created


@pytest.mark.parametrize("script", [train_mnist, train_imagenet])
def test_generated_help_reads_as_written_by_hand(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=--)", text.split("options:")[1])[1:]  # one entry per option
    assert len(options) == len([f for f in dataclasses.fields(script.Config) if f.name != "preset_applied"])
    for entry in options:
        entry = " ".join(entry.split())
        assert "--no-no-" not in entry and "(default: None)" not in entry, entry
        assert entry.count("(default") <= 1, entry
    for entry in options:  # a section comment belongs to no option
        assert "NSVQ (EXPERIMENTS.md" not in entry and "# " not in entry, entry
    flat = " ".join(text.split())
    assert "--gan, --no-gan" in flat if script is train_mnist else "--compile, --no-compile" in flat


def test_mnist_ctrl_c_prints_one_line_naming_the_checkpoint_and_exits_130(tmp_path):
    data = make_fake_mnist(str(tmp_path / "data"))
    cmd = [sys.executable, "train_mnist.py", "--data", data, "--no-download", "--out", str(tmp_path / "run"),
           "--codebook-size", "64", "--dim", "4", "--width", "16", "--batch-size", "32", "--epochs", "1000",
           "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch  1"):  # the checkpoint of epoch 0 is on disk
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "ckpt.pt holds the run up to epoch" in err and "--resume auto" in err


def test_a_run_refused_before_it_starts_leaves_no_output_folder(tmp_path):
    with pytest.raises(train_mnist.DataError):
        train_mnist.main(train_mnist.Config(data=str(tmp_path / "none"), download=False, out=str(tmp_path / "m")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(train_imagenet.DataError):
        train_imagenet.main(tiny_imagenet(tmp_path, data=str(tmp_path / "empty"), out=str(tmp_path / "i")))
    with pytest.raises(metrics.WeightsError, match="--lpips-weights"):  # checked though LPIPS is off
        train_imagenet.main(tiny_imagenet(tmp_path, lpips_weights=str(tmp_path / "nowhere"), out=str(tmp_path / "l")))
    assert sorted(os.listdir(tmp_path)) == ["data", "empty"]


# --- 7b. train_imagenet.py before a multi-day run: resume, skipped steps, DDP, compile ------

def test_imagenet_stop_and_resume_anywhere_gives_the_uninterrupted_schedule_and_weights(tmp_path):
    # Two steps an epoch (25 files, global batch 12); the plateau trigger (patience 2) is live, so
    # the epoch-mean commitment loss decides when stage 1 ends. Stops after an epoch's last batch
    # (step 2) and mid-epoch (step 5); a resumed run must see the same epoch means.
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
    # and metrics.jsonl holds every step once, as the uninterrupted run's does
    steps = lambda run: [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "step" in r]  # noqa: E731
    assert steps(tmp_path / "b" / "run") == steps(tmp_path / "a" / "run") == list(range(1, 15))


def test_imagenet_metrics_written_after_the_checkpoint_are_not_repeated_on_resume(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, max_steps=5, ckpt_every=2, keep_ckpts=3))
    os.remove(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])  # lost in a crash at step 5
    train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", log_every=1))  # from step 4
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r["step"] for r in records if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 9


def tiny_trainer(tmp_path, **overrides):
    cfg = train_imagenet.resolve(tiny_imagenet(tmp_path, **overrides))
    torch.manual_seed(0)
    trainer = train_imagenet.build_trainer(cfg, torch.device("cpu"), None)
    train_imagenet.apply_stage(cfg, trainer, nsvq.StageSchedule(None, None), 1, torch.device("cpu"))
    return cfg, trainer


def test_imagenet_a_step_skipped_for_a_nan_gradient_counts_as_bad_though_its_loss_is_finite(tmp_path):
    cfg, trainer = tiny_trainer(tmp_path)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    step = lambda: train_imagenet.train_step(cfg, trainer, x, 0.1, True, False, True,  # noqa: E731
                                             torch.device("cpu"))
    assert not step()[3]
    for module in (trainer.model.decoder, trainer.disc):  # the generator's step, the critic's
        before = {k: v.clone() for k, v in module.state_dict().items()}
        weight = next(p for p in module.parameters() if p.dim() == 4)
        hook = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        losses, out, counts, bad, dead = step()
        hook.remove()
        assert bool(bad) and all(torch.isfinite(v) for v in losses.values())
        for key, value in module.state_dict().items():
            if "running_" not in key and "num_batches" not in key:  # BatchNorm statistics move in forward
                assert torch.equal(value, before[key]), key
    assert not step()[3]


def test_lpips_feature_normalisation_has_a_finite_gradient_at_an_all_zero_feature_vector():
    h = torch.randn(2, 5, 3, 3)
    h[0, :, 1, 1] = 0.0  # one position with all-zero features
    h.requires_grad_(True)
    f = metrics.unit_normalize(h)
    f.sum().backward()
    assert torch.isfinite(h.grad).all()
    reference = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # the lpips package's formula
    assert torch.equal(f[1], reference[1]) and torch.equal(f[0, :, 0, 0], reference[0, :, 0, 0])


def test_imagenet_a_resume_in_warmup_with_a_halved_critic_scale_does_not_assert(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, max_steps=4))  # stops in warm-up (steps 3-5)
    path = train_imagenet.checkpoints(str(tmp_path / "run"))[-1]
    ckpt = torch.load(path, weights_only=True)
    ckpt["scaler_d"]["scale"] = 0.5  # the critic skipped a step in stage 1
    torch.save(ckpt, path)
    # The log line at step 5 comes before the critic's first step since the load.
    result = train_imagenet.main(tiny_imagenet(tmp_path, resume="auto", log_every=1))
    assert result["steps"] == 9
    final = train_imagenet.load_checkpoint(train_imagenet.checkpoints(str(tmp_path / "run"))[-1])
    assert final["scaler_d"]["scale"] == 1.0


def test_imagenet_reads_flat_folders_and_leaves_out_the_file_simvq_skips(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), broken=False)
    for path in glob.glob(os.path.join(data, "val", "*", "*")):
        os.replace(path, os.path.join(data, "val", os.path.basename(os.path.dirname(path)) + os.path.basename(path)))
    assert len(train_imagenet.list_images(data, "val")) == 8  # val/*.JPEG, as the official archive
    skipped = os.path.join(data, "train", "n01", "n06596364_9591.JPEG")
    os.replace(os.path.join(data, "train", "n01", "img0.JPEG"), skipped)
    assert skipped not in train_imagenet.list_images(data, "train")
    assert len(train_imagenet.list_images(data, "train")) == 23


def test_baselines_keep_no_latent_pool_and_update_without_refill_leaves_the_pool_alone(tmp_path):
    for quantizer in ("ste", "ema"):
        cfg = train_imagenet.resolve(tiny_imagenet(tmp_path, quantizer=quantizer))
        assert len(train_imagenet.Autoencoder(cfg).vq.upkeep.latent_pool) == 0
    vq = nsvq.NSVQ(16, 3)
    z_e = torch.randn(2, 3, 4, 4)
    vq.update_(z_e, vq(z_e).indices, refill=False)
    assert int(vq.upkeep.pool_written) == 0 and vq.upkeep.usage.sum() > 0
    vq.update_(z_e, vq(z_e).indices)
    assert int(vq.upkeep.pool_written) > 0


def test_imagenet_compiled_run_compiles_each_graph_once_across_replacement_logs_stages_and_eval(
        tmp_path, monkeypatch):
    # Recompiles are decided by dynamo's guards, whatever the backend: aot_eager keeps this fast.
    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="aot_eager", **kw))
    from torch._dynamo.utils import counters
    counters.clear()
    result = train_imagenet.main(tiny_imagenet(tmp_path, compile=True, eval_every=1))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    # The autoencoder once with the encoder training and once frozen; the critic's step once.
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def _imagenet_ddp_worker(rank, world, port, root, results):
    """check_identical, then train_imagenet.main on two gloo ranks, several runs: each must end
    the same on both ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    nan = torch.tensor([float("nan"), 1.0])
    train_imagenet.check_identical({"same": torch.ones(3), "nan": nan}, torch.device("cpu"))  # bit for bit
    try:
        w = torch.tensor([1.0, 2.0])
        if rank == 1:
            w[1] = torch.nextafter(w[1], torch.tensor(3.0))  # one unit in the last place
        train_imagenet.check_identical({"w": w}, torch.device("cpu"))
        results[(rank, "check_identical")] = "no error"
    except RuntimeError as e:
        results[(rank, "check_identical")] = str(e)
    dist.destroy_process_group()
    base = dict(data=os.path.join(root, "data"), device="cpu", amp="none", quiet=True, epochs=1,
                check_codebook=True)
    # ste and simvq: a codebook and a linear map trained through DDP (nsvq: the torchrun test;
    # the EMA statistics' all-reduce: test_ddp_ranks_with_different_data_...)
    runs = [(q, dict(quantizer=q, out=os.path.join(root, q))) for q in ("ste", "simvq")]
    runs += [("out is a file", dict(out=os.path.join(root, "file"))),  # rank 0 finds it; rank 1 must stop too
             ("nan on rank 1", dict(out=os.path.join(root, "nan"), max_bad_steps=2, log_every=2))]
    for i, (name, overrides) in enumerate(runs):
        os.environ["MASTER_PORT"] = str(port + i)
        if name == "nan on rank 1" and rank == 1:  # only this rank's data is bad; the gradients of all are
            train_imagenet.to_model_range = lambda images: torch.full(images.shape, float("nan"))
        try:
            results[(rank, name)] = train_imagenet.main(train_imagenet.make_config("tiny", **base, **overrides))["steps"]
        except Exception as e:
            results[(rank, name)] = f"{type(e).__name__}: {e}"
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def test_imagenet_ranks_agree_bitwise_on_weights_on_errors_and_on_skipped_steps(tmp_path):
    make_image_folder(str(tmp_path / "data"))
    (tmp_path / "file").write_text("")
    results = mp.Manager().dict()
    port = 31000 + os.getpid() % 1000
    context = mp.spawn(_imagenet_ddp_worker, args=(2, port, str(tmp_path), results), nprocs=2, join=False)
    deadline = time.time() + 300
    while not context.join(timeout=5):  # a rank left waiting in a collective would hang: fail instead
        assert time.time() < deadline, f"a rank hung; results so far: {dict(results)}"
    assert results[(0, "check_identical")] == results[(1, "check_identical")] == "ranks disagree: w differs across ranks"
    for q in ("ste", "simvq"):  # check_identical compared every weight and buffer bitwise
        assert results[(0, q)] == results[(1, q)] == 3, (q, dict(results))
    for name, error in (("out is a file", "OutputError: --out"), ("nan on rank 1", "RuntimeError: 2 steps")):
        assert results[(0, name)] == results[(1, name)] and results[(0, name)].startswith(error), dict(results)


# --- 8. bad input: a clear error, and nothing half-written ---------------------------------

@pytest.mark.parametrize("overrides, error", [
    (dict(tau=float("inf")), "tau"), (dict(tau=float("nan")), "tau"), (dict(tau=1e-40), "tau"),
    (dict(ema_decay=1.5), "--ema-decay"), (dict(beta=-1.0), "--beta"), (dict(lr=float("nan")), "--lr"),
    (dict(probe_every=0), "--probe-every"), (dict(batch_size=0), "--batch-size"),
    (dict(usage_horizon=0.0), "--usage-horizon"), (dict(tau_mode="adaptive"), "--tau-mode"),
])
def test_mnist_options_are_checked_where_they_are_parsed(tmp_path, overrides, error):
    with pytest.raises(ValueError, match=error):
        train_mnist.resolve(tiny_config(tmp_path, **overrides))


@pytest.mark.parametrize("overrides, error", [
    (dict(tau=float("inf")), "tau"), (dict(log_every=0), "--log-every"), (dict(batch_size=0), "--batch-size"),
    (dict(max_eval_images=-5), "--max-eval-images"), (dict(lr=float("nan")), "--lr"),
    (dict(image_size=0), "--image-size"), (dict(ch_mult="1,a"), "--ch-mult"), (dict(epochs=0), "--epochs"),
    (dict(ema_decay=1.5), "--ema-decay"), (dict(weight_ema=1.0), "--weight-ema"),
    (dict(image_size=33), "--image-size 33 is not divisible"),
])
def test_imagenet_options_are_checked_where_they_are_parsed(tmp_path, overrides, error):
    with pytest.raises(ValueError, match=error):
        train_imagenet.resolve(tiny_imagenet(tmp_path, **overrides))


def test_mnist_batch_larger_than_the_training_split_is_an_error_not_an_empty_run(tmp_path):
    with pytest.raises(ValueError, match="larger than the training split"):
        train_mnist.main(tiny_config(tmp_path, batch_size=1000))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("script", ["mnist", "imagenet"])
def test_a_full_disk_gives_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, script):
    module = train_mnist if script == "mnist" else train_imagenet
    path = str(tmp_path / "ckpt.pt")
    obj = {"w": torch.zeros(1000)}
    monkeypatch.setattr(module.shutil, "disk_usage", lambda p: shutil_usage(free=1000))
    with pytest.raises(module.OutputError, match=r"ckpt.pt: 0 MiB free .* about 1 MiB needed"):
        module.save_atomic(obj, path)
    monkeypatch.undo()

    def torch_save_fails_halfway(o, f):  # what torch's writer does when the disk fills up
        open(f, "wb").write(b"x" * 100)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(module.torch, "save", torch_save_fails_halfway)
    with pytest.raises(module.OutputError, match="writing .*ckpt.pt failed .*file write failed.*MiB free"):
        module.save_atomic(obj, path)
    assert os.listdir(tmp_path) == []  # no ckpt.pt, no ckpt.pt.tmp<pid>


def shutil_usage(free):
    import collections
    return collections.namedtuple("usage", "total used free")(10 ** 12, 10 ** 12 - free, free)


def test_an_interrupted_figure_write_leaves_no_temporary_file(tmp_path):
    class Interrupting:
        def savefig(self, path, **kwargs):
            open(path, "wb").write(b"half a png")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_mnist.savefig_atomic(Interrupting(), str(tmp_path / "curves.png"))
    assert os.listdir(tmp_path) == []


def test_imagenet_checkpoints_that_are_truncated_foreign_or_not_torch_files_get_one_line(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    good = train_imagenet.checkpoints(str(tmp_path / "run"))[-1]
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    mnist = tmp_path / "mnist.pt"
    train_mnist.main(tiny_config(tmp_path / "m", epochs=1))
    mnist.write_bytes((tmp_path / "m" / "run" / "ckpt.pt").read_bytes())
    for path, error in ((text, "not a readable checkpoint"), (truncated, "not a readable checkpoint"),
                        (other, "not a train_imagenet.py checkpoint"), (mnist, r"it holds: train_mnist")):
        with pytest.raises(train_imagenet.OutputError, match=error):
            train_imagenet.main(tiny_imagenet(tmp_path, resume=str(path)))
    with pytest.raises(train_mnist.OutputError, match="not a train_mnist.py checkpoint"):
        train_mnist.main(tiny_config(tmp_path / "m", resume=good))


def test_imagenet_an_unreadable_newest_checkpoint_is_moved_aside_and_pruning_keeps_progress(tmp_path, capsys):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=2))  # checkpoints at steps 3 and 6
    older, newest = train_imagenet.checkpoints(str(tmp_path / "run"))
    open(newest, "wb").write(open(newest, "rb").read()[:1000])  # damaged
    # One step from step 3: the new checkpoint (step 4) is older than the damaged one (step 6).
    # Were the damaged file left in place, it would rank as the newest and --keep-ckpts 1 would
    # delete the checkpoint just written.
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=2, resume="auto", keep_ckpts=1, max_steps=1))
    assert f"moved it to {newest}.unreadable" in capsys.readouterr().out
    assert os.path.isfile(newest + ".unreadable") and not os.path.exists(newest)
    (kept,) = train_imagenet.checkpoints(str(tmp_path / "run"))
    assert train_imagenet.load_checkpoint(kept)["state"]["step"] == 4
    result = train_imagenet.main(tiny_imagenet(tmp_path, epochs=2, resume="auto", keep_ckpts=1))
    assert result["steps"] == 6


def test_imagenet_checkpoints_by_time_are_agreed_written_and_pruned(tmp_path):
    # --ckpt-minutes tiny: a checkpoint is due at every step (read two steps late, as RunFlags does)
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=2, ckpt_minutes=1e-9, keep_ckpts=100))
    steps = [train_imagenet.load_checkpoint(p)["state"]["step"]
             for p in train_imagenet.checkpoints(str(tmp_path / "run"))]
    assert steps == [3, 4, 5, 6]  # 4 and 5 are neither stage changes nor the end: time made them
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=3, resume="auto", ckpt_minutes=1e-9, keep_ckpts=2))
    assert len(train_imagenet.checkpoints(str(tmp_path / "run"))) == 2


@pytest.mark.parametrize("script", ["mnist", "imagenet"])
def test_out_that_is_a_file_or_not_writable_is_refused(tmp_path, script):
    module, config = (train_mnist, tiny_config) if script == "mnist" else (train_imagenet, tiny_imagenet)
    (tmp_path / "file").write_text("")
    with pytest.raises(module.OutputError, match="is a file"):
        module.main(config(tmp_path, out=str(tmp_path / "file")))
    locked = str(tmp_path / "locked")  # a read-only mount (root ignores chmod, so the check is faked)
    os.makedirs(locked)
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(module.os, "access", lambda p, mode: False if p == locked else real_access(p, mode))
        with pytest.raises(module.OutputError, match="not writable"):
            module.main(config(tmp_path, out=locked))


def test_imagenet_prepare_into_a_file_and_an_all_corrupt_folder_give_one_line(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), broken=False)
    (tmp_path / "packed").write_text("")
    with pytest.raises(train_imagenet.OutputError, match="--packed .* is a file"):
        train_imagenet.main(tiny_imagenet(tmp_path, data=data, packed=str(tmp_path / "packed"), prepare=True))
    for path in glob.glob(os.path.join(data, "train", "*", "*")):
        open(path, "wb").write(b"broken")
    cmd = [sys.executable, "train_imagenet.py", "--preset", "tiny", "--data", data, "--device", "cpu",
           "--out", str(tmp_path / "o"), "--workers", "2", "--quiet"]
    run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 24 unreadable images in a row"), run.stderr[-1500:]
    assert "Traceback" not in run.stderr
    assert run.stderr.count("warning: skipping") <= 20  # ten per worker


def test_mnist_unreadable_and_empty_idx_files_get_clear_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    path = os.path.join(cfg.data, "t10k-images-idx3-ubyte.gz")
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 0, 28, 28))
    with pytest.raises(train_mnist.DataError, match="holds no images"):
        train_mnist.load_split(cfg, "test")
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp_:  # an unreadable file (root ignores chmod, so it is faked)
        mp_.setattr(train_mnist.os, "access", lambda p, mode: False if p == path else real_access(p, mode))
        with pytest.raises(train_mnist.DataError, match="permission denied"):
            train_mnist.load_split(cfg, "test")


@pytest.mark.parametrize("args, error", [
    (["--repeats", "0"], "--repeats must be >= 1"), (["--flops"], "pass --imagenet too"), (["--json", "/nonexistent/dir/out.json"], "cannot write"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]))
def test_bench_checks_its_options_before_running(args, error, capsys):
    import bench
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(args)
    assert exit_.value.code == 2 and error in capsys.readouterr().err


def test_nsvq_demo_help_prints_usage_and_runs_nothing(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(HERE, "nsvq.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "usage:" in run.stdout and "--out" in run.stdout
    assert os.listdir(tmp_path) == []


# --- 9. experiments.py: each subcommand on tiny data ---------------------------------------


def tiny_experiment(tmp_path, **args):
    base = tiny_config(tmp_path, gan=False)
    return base, argparse.Namespace(**{"out": str(tmp_path / "exp"), "epochs": 2, "seeds": 1, "only": "", **args})


def test_experiments_compare_runs_every_variant_and_the_ratio_preset_is_the_papers(tmp_path, monkeypatch):
    runs = experiments.compare_runs(paper_ratio=True)
    for _, overrides in runs:  # 49 latents per image: 0.38 latents per code per step (ImageNet: 0.5)
        assert 0.3 < overrides["batch_size"] * 49 / overrides["codebook_size"] < 0.5
    assert {o["quantizer"] for _, o in runs} == {"ste", "ema", "simvq", "nsvq"}
    assert "simvq-ns" in experiments.VARIANTS and "nsvq-replace-from-codes" in experiments.VARIANTS
    monkeypatch.setattr(experiments, "VARIANTS", {k: experiments.VARIANTS[k] for k in ("ste", "simvq-ns")})
    base, args = tiny_experiment(tmp_path, paper_ratio=False, seeds=2)
    results = experiments.compare(base, args)
    assert [(r["name"], r["seed"]) for r in results] == [("ste", 0), ("ste", 1), ("simvq-ns", 0), ("simvq-ns", 1)]
    saved = json.load(open(tmp_path / "exp" / "compare.json"))
    row = saved["summary"][1]
    mses = [r["test_mse"] for r in results if r["name"] == "simvq-ns"]
    assert row["name"] == "simvq-ns" and row["test_mse"] == pytest.approx(sum(mses) / 2)
    assert row["test_mse_sd"] == pytest.approx(abs(mses[0] - mses[1]) / 2 ** 0.5)
    assert (tmp_path / "exp" / "compare.png").stat().st_size > 0


def test_experiments_stress_and_sensitivity_run_their_grids(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "STRESS_MULTS", (3.0,))
    base, args = tiny_experiment(tmp_path)
    results = experiments.stress(base, args)
    assert [r["name"] for r in results] == [f"{arm} @x3" for arm in experiments.STRESS_ARMS]
    assert all(r["drift"] > 0 for r in results)
    monkeypatch.setattr(experiments, "TAUS", {"absolute": (0.35,), "relative": (1.0,)})
    args.alphas = [0.0, 0.3]
    results = experiments.sensitivity(base, args)
    mass = {r["name"]: r["kernel_mass"] for r in results}
    assert list(mass) == ["alpha 0", "absolute tau 0.35, alpha 0.3", "relative tau 1, alpha 0.3"]
    assert math.isnan(mass.pop("alpha 0")) and all(0 < m < 1 for m in mass.values())
    assert (tmp_path / "exp" / "sensitivity.png").stat().st_size > 0
    args.only, args.out = "^relative", str(tmp_path / "only")  # --only: a part of the grid, the rest left blank
    assert [r["name"] for r in experiments.sensitivity(base, args)] == ["relative tau 1, alpha 0.3"]
    assert [r["name"] for r in json.load(open(tmp_path / "only" / "sensitivity.json"))["runs"]] == ["relative tau 1, alpha 0.3"]
    args.only, args.seeds = "^alpha 0$", 2  # seeds of a run without a kernel: its mass is no number
    experiments.sensitivity(base, args)
    (row,) = json.load(open(tmp_path / "only" / "sensitivity.json"))["summary"]
    assert row["seeds"] == 2 and math.isnan(row["kernel_mass"]) and row["test_mse"] > 0
    args.only = "^no such run$"
    with pytest.raises(ValueError, match="matches none"):
        experiments.stress(base, args)


def test_experiments_kmeans_finds_separated_blobs_and_pearson_matches_numpy():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [0.0, 10.0], [10.0, 0.0], [10.0, 10.0]])  # sorted by (x, y)
    z = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=g)
    found, shares = experiments.kmeans(z, 4)
    order = sorted(range(4), key=lambda k: (round(float(found[k, 0])), round(float(found[k, 1]))))
    torch.testing.assert_close(found[order], centres, atol=0.05, rtol=0)
    assert torch.allclose(shares, torch.full((4,), 0.25))
    a, b = torch.randn(20, generator=g).tolist(), torch.randn(20, generator=g).tolist()
    assert experiments.pearson(a, b) == pytest.approx(float(np.corrcoef(a, b)[0, 1]))


def test_experiments_controlled_starts_both_arms_from_the_same_kmeans_codebook(tmp_path):
    base, args = tiny_experiment(tmp_path, pretrain_epochs=2, probe_every=2)
    results = experiments.controlled(base, args)
    assert [r["name"] for r in results] == list(experiments.CONTROLLED_ARMS)
    start = torch.load(tmp_path / "exp" / "kmeans_start.pt")
    assert bool(start["vq.upkeep.seeded"].all()) and start["vq.upkeep.usage"].sum() == pytest.approx(1.0)
    for r in results:  # the first probe sees the k-means codebook: its codes, not the random init
        assert r["history"][0]["code_norm"] == pytest.approx(float(start["vq.embedding"].norm(dim=1).mean()), rel=0.2)
        assert -1 <= r["corr_drift_churn"] <= 1 or math.isnan(r["corr_drift_churn"])
    assert (tmp_path / "exp" / "controlled.png").stat().st_size > 0


def test_experiments_phases_and_plateau_follow_their_schedules(tmp_path):
    base, args = tiny_experiment(tmp_path)
    args.epochs = 4  # the staged arms freeze after 60% of it, epoch 2
    results = {r["name"]: r for r in experiments.phases(base, args)}
    assert results["stage 1 only, GAN from step 0"]["stage_start"] == {"stage1": 0}
    assert results["freeze, no warm-up, stage 2"]["stage_start"] == {"stage1": 0, "warmup": 2, "stage2": 2}
    assert results["full: freeze, warm-up, stage 2"]["stage_start"] == {"stage1": 0, "warmup": 2, "stage2": 3}
    full = results["full: freeze, warm-up, stage 2"]["epoch_log"]
    assert "gan" not in full[0] and "gan" in full[-1] and "gan" in results["full, GAN from step 0 of stage 1 (the paper)"]["epoch_log"][0]
    assert all("gan" not in e for e in results["full, no GAN at all"]["epoch_log"])
    assert all(-1 <= r["test_ssim"] <= 1 for r in results.values())
    args.patience, args.epochs = 1, 4
    (r,) = experiments.plateau(base, args)
    commit = [e["commit"] for e in r["epoch_log"] if e["stage"] == "stage1"]
    if r["stage_start"].get("warmup") is None:  # never fired: every epoch set a new best
        assert all(b < min(commit[:i + 1]) for i, b in enumerate(commit[1:]))
    else:  # fired right after the first epoch that set no new best
        frozen = r["stage_start"]["warmup"]
        assert len(commit) == frozen and commit[-1] >= min(commit[:-1])
        assert all(b < min(commit[:i + 1]) for i, b in enumerate(commit[1:-1]))
        assert r["freeze_fraction"] == frozen / 4


def test_experiments_scale_sim_runs_every_method_and_checks_its_options(tmp_path, capsys):
    methods = list(experiments.SIM_METHODS + experiments.EXTRA_SIM_METHODS)
    results = experiments.main(["scale-sim", "--out", str(tmp_path / "sim"), "--sim-codes", "64",
                                "--sim-steps", "40", "--sim-speeds", "1", "--sim-methods", *methods])
    assert [r["method"] for r in results] == methods
    assert all(r["duplicates"] == 0 and r["live_reseeded"] == 0 for r in results)
    assert (tmp_path / "sim" / "scale-sim.png").stat().st_size > 0
    for argv, error in ((["scale-sim", "--sim-steps", "5"], "--sim-steps"), (["scale-sim", "--relative-tau", "nan"], "--relative-tau"),
                        (["stress", "--epochs", "0"], "--epochs"), (["compare", "--seeds", "-1"], "--seeds"),
                        (["phases", "--only", "(unclosed"], "not a regular expression"),
                        (["sensitivity", "--alphas", "0.1", "-1"], "--alphas"), (["sensitivity", "--alphas", "nan"], "--alphas")):
        with pytest.raises(SystemExit) as exit_:
            experiments.parse_args(argv)
        assert exit_.value.code == 2 and error in capsys.readouterr().err
    assert [experiments.parse_args(a).epochs for a in (["compare"], ["compare", "--paper-ratio"], ["stress"])] == [12, 8, 6]
    with pytest.raises(train_mnist.DataError, match="--no-download"):
        experiments.main(["compare", "--data", str(tmp_path / "nothing"), "--no-download", "--out", str(tmp_path / "c")])
