"""Tests for nsvq.py and the training scripts: oracles, gradient routing, behaviour, DDP, smoke.

Run with:  python -m pytest -q test_nsvq.py
Everything runs on the CPU with tiny tensors and fixed seeds.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsvq

HERE = os.path.dirname(os.path.abspath(__file__))
QUANTIZERS = [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.SimVQ, nsvq.NSVQ]


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


def test_usage_is_a_share_that_does_not_depend_on_batch_size():
    K = 4
    share_batch = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])  # shares 2/8, 1/8, 3/8, 2/8
    small, large = nsvq.VectorQuantizer(K, 2), nsvq.VectorQuantizer(K, 2)
    z = torch.zeros(8, 2)
    for _ in range(30):
        small.update_(z, share_batch)
        large.update_(z.repeat(5, 1), share_batch.repeat(5))
    expected = torch.tensor([2, 1, 3, 2]) / 8
    torch.testing.assert_close(small.usage, expected)
    torch.testing.assert_close(large.usage, small.usage)
    uniform = nsvq.VectorQuantizer(K, 2)
    uniform.update_(torch.zeros(4, 2), torch.arange(4))
    torch.testing.assert_close(uniform.usage, torch.full((K,), 1 / K))  # 1/K from the first call


def test_usage_decays_for_a_code_that_stops_being_chosen():
    vq = nsvq.VectorQuantizer(2, 1, usage_decay=0.9)
    z = torch.zeros(4, 1)
    for _ in range(200):
        vq.update_(z, torch.tensor([0, 0, 1, 1]))
    for _ in range(10):
        vq.update_(z, torch.tensor([0, 0, 0, 0]))
    torch.testing.assert_close(vq.usage[1], torch.tensor(0.5 * 0.9 ** 10))


@pytest.mark.parametrize("cls", [nsvq.VectorQuantizer, nsvq.EMAVectorQuantizer, nsvq.NSVQ])
@pytest.mark.parametrize("replace_from", ["latents", "codes"])
def test_replacement_reseeds_exactly_the_dead_codes_and_leaves_live_ones_bit_identical(cls, replace_from):
    torch.manual_seed(8)
    K = 8
    vq = cls(K, 3, replace_from=replace_from)
    z = torch.randn(64, 3)
    vq.update_(z, torch.tensor([0, 1, 2, 5] * 16))  # codes 3, 4, 6, 7 never used
    before = vq.codebook.detach().clone()
    dead = vq.replace_dead_codes_()
    assert dead.tolist() == [3, 4, 6, 7]
    after = vq.codebook.detach()
    live = torch.tensor([0, 1, 2, 5])
    assert torch.equal(after[live], before[live])
    assert not torch.equal(after[dead], before[dead])
    torch.testing.assert_close(vq.usage[dead], torch.full((4,), 1 / K))
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


def test_replacement_needs_latents_first_and_simvq_refuses():
    with pytest.raises(RuntimeError, match="update_"):
        nsvq.NSVQ(4, 2).replace_dead_codes_()
    with pytest.raises(NotImplementedError, match="SimVQ"):
        nsvq.SimVQ(4, 2).replace_dead_codes_()
    with pytest.raises(ValueError, match="threshold"):
        nsvq.NSVQ(4, 2).replace_dead_codes_(threshold=2.0)


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


def test_stage_schedule_freeze_epoch_and_zero_warmup():
    s = nsvq.StageSchedule(patience=100, freeze_epoch=3, warmup_epochs=0)
    for epoch, loss in enumerate([3.0, 2.0]):
        assert not s.end_epoch(epoch, loss)
    assert s.end_epoch(2, 1.0)  # epoch + 1 >= freeze_epoch, although the loss still improves
    assert s.stage == "stage2" and s.stage_start == {"stage1": 0, "warmup": 3, "stage2": 3}


def test_stage_schedule_resumes_mid_stage_from_its_state_dict():
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
    assert {"usage", "usage_calls"} <= names
    if cls is nsvq.EMAVectorQuantizer:
        assert {"cluster_size", "embed_sum", "embedding"} <= names


def test_bad_inputs_raise_clear_errors():
    vq = nsvq.NSVQ(8, 3)
    with pytest.raises(ValueError, match="3"):
        vq(torch.randn(2, 4, 5))  # 4 channels, dim 3
    with pytest.raises(ValueError, match="channel-first"):
        vq(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        vq(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_size"):
        nsvq.VectorQuantizer(0, 3)
    with pytest.raises(ValueError, match="tau"):
        nsvq.NSVQ(8, 3, tau=0.0)
    with pytest.raises(ValueError, match="weighting"):
        nsvq.NSVQ(8, 3, weighting="gaussian")
    with pytest.raises(ValueError, match="replace_from"):
        nsvq.NSVQ(8, 3, replace_from="noise")
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.decode(torch.tensor([[0, 8]]))
    with pytest.raises(TypeError, match="int"):
        vq.decode(torch.tensor([0.0]))


def test_indices_under_bf16_autocast_equal_the_fp32_indices():
    torch.manual_seed(10)
    vq = nsvq.NSVQ(512, 8)
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(512, 8))
    conv = torch.nn.Conv2d(8, 8, 1)
    x = torch.randn(4, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_e = conv(x)
        assert z_e.dtype == torch.bfloat16
        out = vq(z_e)
    assert out.z_q.dtype == torch.bfloat16
    ref = vq(z_e.float()).indices  # the same bf16 latents, searched in fp32 without autocast
    assert torch.equal(out.indices, ref)
    assert all(v.dtype == torch.float32 for v in out.losses.values())


def test_torch_compile_compiles_the_nsvq_forward():
    torch.manual_seed(11)
    vq = nsvq.NSVQ(32, 4)
    z_e = torch.randn(2, 4, 3, 3)
    eager = vq(z_e)
    compiled = torch.compile(vq)(z_e)
    assert torch.equal(compiled.indices, eager.indices)
    for key in eager.losses:
        torch.testing.assert_close(compiled.losses[key], eager.losses[key], rtol=1e-5, atol=1e-6)


def test_codebook_stats_drift_and_churn_diagnostics():
    stats = nsvq.codebook_stats(torch.tensor([2, 2, 0, 0]))
    assert stats == {"utilization": 0.5, "perplexity": pytest.approx(2.0), "dead_codes": 2}
    assert nsvq.codebook_stats(torch.ones(7))["perplexity"] == pytest.approx(7.0)
    assert nsvq.encoder_drift(torch.zeros(2, 2), torch.full((2, 2), 3.0)) == pytest.approx(3.0)
    assert nsvq.assignment_churn(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5


def test_kernel_mass_grows_with_tau():
    torch.manual_seed(12)
    z, codebook = torch.randn(64, 2), torch.randn(32, 2)
    masses = [nsvq.kernel_mass(z, codebook, tau) for tau in (1e-4, 0.1, 10.0)]
    assert masses[0] < 0.01 and masses[0] < masses[1] < masses[2] < 1.0
    assert masses[2] > 0.9


# --- 4. DDP: two gloo processes --------------------------------------------------------------

def _ddp_worker(rank, world, port, replace_from, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks see different data and draw different random numbers
    out = {}
    for name, cls in [("nsvq", nsvq.NSVQ), ("ema", nsvq.EMAVectorQuantizer)]:
        torch.manual_seed(0)
        vq = cls(32, 3, replace_from=replace_from)  # same initial codebook on both ranks
        torch.manual_seed(100 + rank)
        for step in range(6):
            z_e = torch.randn(2, 3, 4, 4) * (1 + rank)
            vq.update_(z_e, vq(z_e).indices)
            if step % 2 == 1:
                vq.replace_dead_codes_()
        out[name] = (vq.codebook.detach().clone(), vq.usage.clone())
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.parametrize("replace_from", ["latents", "codes"])
def test_ddp_ranks_with_different_data_keep_bitwise_identical_codebooks_and_usage(replace_from):
    port = 29500 + (os.getpid() % 1000) + (0 if replace_from == "latents" else 1000)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, replace_from, results), nprocs=2, join=True)
    for name in ("nsvq", "ema"):
        (c0, u0), (c1, u1) = results[0][name], results[1][name]
        assert torch.equal(c0, c1) and torch.equal(u0, u1), name
        assert (u0 > 0).any()


# --- 5. smoke -------------------------------------------------------------------------------

def test_bench_quick_runs_and_prints_the_table():
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--repeats", "1"], cwd=HERE,
                         capture_output=True, text=True, check=True, timeout=300).stdout
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
    base = dict(data_dir=data, no_download=True, out=str(tmp_path / "run"), codebook_size=64, dim=4,
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
    train_mnist.main(tiny_config(tmp_path, epochs=3, resume=True))  # epoch 2 is stage 2
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    for key, value in ckpt["model"].items():
        if key.startswith("encoder."):
            assert torch.equal(after["model"][key], value), key
    assert not torch.equal(after["model"]["decoder.0.weight"], ckpt["model"]["decoder.0.weight"])


def test_mnist_resume_matches_the_uninterrupted_run(tmp_path):
    train_mnist.main(tiny_config(tmp_path / "a", epochs=3))
    train_mnist.main(tiny_config(tmp_path / "b", epochs=2))
    train_mnist.main(tiny_config(tmp_path / "b", epochs=3, resume=True))
    a = torch.load(tmp_path / "a" / "run" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "ckpt.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["schedule"] == b["schedule"]


def test_mnist_resume_without_a_checkpoint_or_with_another_model_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        train_mnist.main(tiny_config(tmp_path, resume=True))
    train_mnist.main(tiny_config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="codebook_size"):
        train_mnist.main(tiny_config(tmp_path, epochs=2, codebook_size=32, resume=True))
    with pytest.raises(ValueError, match="decoder_norm"):
        train_mnist.main(tiny_config(tmp_path, epochs=2, decoder_norm=False, resume=True))


def test_mnist_loader_rejects_corrupt_truncated_wrong_magic_and_missing_files(tmp_path):
    cfg = tiny_config(tmp_path)
    path = os.path.join(cfg.data_dir, "t10k-images-idx3-ubyte.gz")
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


def test_mnist_compare_variants_are_the_eight_named_methods():
    assert list(train_mnist.VARIANTS) == ["ste", "ste+replace", "ema", "ema+replace", "simvq",
                                          "nsvq-loss-only", "nsvq-no-stages", "nsvq"]


def test_mnist_command_line_lists_every_config_field_and_rejects_bad_options(tmp_path):
    out = subprocess.run([sys.executable, "train_mnist.py", "--help"], cwd=HERE, capture_output=True,
                         text=True, check=True).stdout
    for f in train_mnist.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out
    assert "--no-gan" in out
    bad = subprocess.run([sys.executable, "train_mnist.py", "--quantizer", "vqgan", "--data-dir",
                          make_fake_mnist(str(tmp_path / "d")), "--no-download", "--out", str(tmp_path / "o")],
                         cwd=HERE, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown quantizer 'vqgan'" in bad.stderr
    with pytest.raises(ValueError, match="multiple of 8 with decoder_norm"):
        train_mnist.resolve(train_mnist.Config(width=12))


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
    base = dict(train_imagenet.PRESETS["tiny"], preset="tiny", data=data, out=str(tmp_path / "run"),
                device="cpu", amp="none", quiet=True)
    base.update(overrides)
    return train_imagenet.Config(**base)


def test_imagenet_tiny_runs_all_stages_counts_a_corrupt_jpeg_and_gives_a_tokenizer(tmp_path):
    result = train_imagenet.main(tiny_imagenet(tmp_path))
    assert result["stage_start"] == {"stage1": 0, "warmup": 1, "stage2": 2}
    assert result["skipped_images"] >= 1 and result["images"] == 8
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["steps"] == 9 and 0 < saved["utilization"] <= 1
    assert (tmp_path / "run" / "recon-final.png").stat().st_size > 0
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {line["stage"] for line in lines if "stage" in line} == {"stage1", "warmup", "stage2"}
    ckpts = train_imagenet.checkpoints(str(tmp_path / "run"))
    assert len(ckpts) == 2  # keep_ckpts
    model = train_imagenet.load_autoencoder(ckpts[-1])
    indices = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert indices.shape == (2, 16, 16) and model.decode(indices).shape == (2, 3, 32, 32)


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


def test_imagenet_eval_only_reports_rfid_and_lpips_with_random_networks(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    result = train_imagenet.main(tiny_imagenet(tmp_path, eval_only=True, resume="auto",
                                               lpips_weights="random", inception="random",
                                               max_eval_images=4))
    assert result["images"] == 4
    for key in ("rfid", "lpips", "psnr", "ssim", "utilization", "perplexity"):
        assert math.isfinite(result[key]), key
    assert json.load(open(tmp_path / "run" / "eval.json"))["rfid"] == result["rfid"]


def test_imagenet_torchrun_two_ranks_end_with_identical_weights_and_codebooks(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "train_imagenet.py", "--preset", "tiny",
           "--data", data, "--device", "cpu", "--amp", "none", "--out", str(tmp_path / "run"),
           "--quiet", "--check-codebook"]
    run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "ranks disagree" not in run.stderr
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["steps"] == 9  # global batch 8 split 4 + 4: same number of steps as one process


def test_imagenet_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
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
    assert proc.returncode == 0, rest
    assert "(SIGTERM)" in rest
    assert train_imagenet.checkpoints(str(tmp_path / "run"))


def test_imagenet_non_finite_losses_stop_the_run_and_leave_the_last_checkpoint(tmp_path):
    train_imagenet.main(tiny_imagenet(tmp_path, epochs=1))
    before = train_imagenet.checkpoints(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="non-finite"):
        train_imagenet.main(tiny_imagenet(tmp_path, epochs=3, resume="auto", l1_weight=float("nan"),
                                          max_bad_steps=2))
    assert train_imagenet.checkpoints(str(tmp_path / "run")) == before
    torch.load(before[-1], weights_only=False)  # still a complete checkpoint


def test_imagenet_packed_data_trains_and_rejects_a_wrong_size(tmp_path):
    cfg = tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), prepare=True)
    train_imagenet.main(cfg)
    meta = json.load(open(tmp_path / "packed" / "train.json"))
    assert meta["n"] == 25 and meta["skipped"] == 1
    result = train_imagenet.main(tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), data="", epochs=1))
    assert result["images"] == 8
    with pytest.raises(train_imagenet.DataError, match="packed at 32px"):
        train_imagenet.main(tiny_imagenet(tmp_path, packed=str(tmp_path / "packed"), data="",
                                          image_size=64, epochs=1))


def test_imagenet_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(train_imagenet.DataError, match="no folder"):
        train_imagenet.main(tiny_imagenet(tmp_path, data=str(tmp_path / "nowhere")))
    os.makedirs(tmp_path / "empty" / "train" / "n01")
    os.makedirs(tmp_path / "empty" / "val" / "n01")
    with pytest.raises(train_imagenet.DataError, match="holds no images"):
        train_imagenet.main(tiny_imagenet(tmp_path, data=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="amp"):
        train_imagenet.main(tiny_imagenet(tmp_path, amp="fp8"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_imagenet.main(tiny_imagenet(tmp_path, resume="auto"))
    with pytest.raises(ValueError, match="eval-only"):
        train_imagenet.main(tiny_imagenet(tmp_path, eval_only=True))
    with pytest.raises(FileNotFoundError, match="Inception"):
        metrics.InceptionFID(str(tmp_path / "missing.pth"))


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


def test_image_metrics_psnr_ssim_lpips_and_inception_shapes():
    torch.manual_seed(14)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2))
    assert metrics.ssim(x, torch.rand(2, 3, 32, 32)).max() < 0.5
    assert metrics.psnr(x, x * 0 + x + 0.1).sub(20).abs().max() < 1e-3  # mse 0.01 -> 20 dB
    lpips = metrics.LPIPS("random", "random")
    assert lpips(x * 2 - 1, x * 2 - 1).abs().max() == 0
    assert (lpips(x * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1) > 0).all()
    assert metrics.InceptionFID("random")(x).shape == (2, 2048)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_scripts_refuse_a_device_that_is_not_there(tmp_path):
    with pytest.raises(ValueError, match="not available"):
        train_mnist.main(tiny_config(tmp_path, device="cuda"))
    with pytest.raises(ValueError, match="not available"):
        train_imagenet.main(tiny_imagenet(tmp_path, device="cuda"))
