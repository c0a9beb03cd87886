import threading

import pytest
import torch

from tokenizer import Collectives, QuantizerConfig, VectorQuantizer
from tokenizer.nearest import nearest_codes


def vq(k, d, collectives=None, **config):
    return VectorQuantizer(QuantizerConfig(codebook_size=k, **config), d, collectives)


def _plain_vq(k=8, d=4, beta=0.25):
    return vq(k, d, beta=beta, ema=False, kmeans_init=False, dead_code_threshold=0)


def test_codebook_term_moves_only_the_codebook():
    torch.manual_seed(0)
    q = _plain_vq()
    z = torch.randn(16, 4, requires_grad=True)
    _, _, losses = q(z)
    losses["codebook"].backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0
    assert q.codebook.grad is not None and torch.count_nonzero(q.codebook.grad) > 0


def test_commitment_term_moves_only_the_encoder_and_carries_beta():
    torch.manual_seed(0)
    beta = 0.25
    q = _plain_vq(beta=beta)
    z = torch.randn(16, 4, requires_grad=True)
    _, idx, losses = q(z)
    losses["commitment"].backward()
    assert q.codebook.grad is None or torch.count_nonzero(q.codebook.grad) == 0
    e = q.codebook.detach()[idx]
    expected = 2 * beta * (z.detach() - e) / z.numel()   # d/dz beta * mean((z - sg[e])^2)
    torch.testing.assert_close(z.grad, expected)


def test_straight_through_gradient_is_identity_and_value_is_the_code():
    torch.manual_seed(0)
    q = _plain_vq()
    z = torch.randn(10, 4, requires_grad=True)
    z_q, idx, _ = q(z)
    torch.testing.assert_close(z_q.detach(), q.codebook.detach()[idx])
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    k, d, decay, eps = 4, 3, 0.9, 1e-5
    q = vq(k, d, ema=True, decay=decay, eps=eps, kmeans_init=False, dead_code_threshold=0)
    book = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    q.codebook.copy_(book)
    q.ema_sum.copy_(book * 2)
    q.ema_count.fill_(2.0)
    z = torch.tensor([[1.0, 0, 0], [0, 1, 0], [9, 1, 0], [11, 0, 1], [0, 9, 0]])
    q.train()
    _, idx, _ = q(z)
    assert idx.tolist() == [0, 0, 1, 1, 2]
    counts = torch.tensor([2.0, 2, 1, 0])
    sums = torch.stack([z[0] + z[1], z[2] + z[3], z[4], torch.zeros(3)])
    n = decay * 2.0 + (1 - decay) * counts
    m = decay * book * 2 + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + k * eps) * n.sum()
    torch.testing.assert_close(q.ema_count, n)
    torch.testing.assert_close(q.ema_sum, m)
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])


def test_ema_mode_has_no_codebook_gradient_term():
    q = vq(8, 4, ema=True, kmeans_init=False)
    _, _, losses = q(torch.randn(5, 4))
    assert set(losses) == {"commitment"}
    assert not isinstance(q.codebook, torch.nn.Parameter)


def test_dead_code_restart_revives_codes_from_encoder_outputs():
    torch.manual_seed(0)
    k, d = 8, 2
    q = vq(k, d, ema=True, kmeans_init=False, dead_code_threshold=0.5)
    q.codebook.copy_(torch.full((k, d), 100.0))
    q.codebook[0] = 0.0                            # the only code near the data
    q.ema_sum.copy_(q.codebook)
    q.ema_count.fill_(1.0)
    q.ema_count[1:] = 0.01                         # codes 1.. are dead
    z = torch.randn(64, d)
    q.train()
    q(z)
    revived = q.codebook[1:]
    assert revived.abs().max() < 10, "dead codes should now sit among the encoder outputs"
    for row in revived:                            # each one is an actual encoder output
        assert torch.isclose(z, row).all(dim=1).any()
    assert float(q.metrics["restarted"]) == k - 1
    assert (q.ema_count[1:] >= 0.5).all()


@pytest.mark.parametrize("threshold, count, steps_unused", [(1.0, 1.0, 1), (0.5, 1.0, 69), (0.0625, 0.125, 69)])
def test_a_restarted_code_is_rejudged_within_its_grace(threshold, count, steps_unused):
    """A restarted code counts min(1, 2 x threshold): left unused it falls below the threshold
    again after ~ln 2 / (1 - decay) steps at most (a count of 1 against a threshold of 1/16 would
    keep a stale code ~280 steps)."""
    torch.manual_seed(0)
    q = vq(4, 2, ema=True, kmeans_init=False, dead_code_threshold=threshold, decay=0.99)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    q.ema_sum.copy_(q.codebook)
    q.ema_count.copy_(torch.tensor([1000.0, 0.0, 1000.0, 1000.0]))   # code 1 is dead
    q.train()
    q(torch.randn(32, 2) * 0.01)                    # every row goes to code 0
    assert float(q.ema_count[1]) == pytest.approx(count)
    torch.testing.assert_close(q.ema_sum[1], q.codebook[1] * count)
    away = torch.tensor([[70.0, 70.0]]).expand(32, 2) # from now on code 1 is never the nearest
    restarted_at = None
    for step in range(1, 400):
        before = q.codebook[1].clone()
        q(away + torch.randn(32, 2) * 0.01)
        if not torch.equal(before, q.codebook[1]) and float(q.ema_count[1]) == pytest.approx(count):
            restarted_at = step
            break
    assert restarted_at == steps_unused


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0], [20, 0], [0, 20], [20, 20]])
    z = (centres[:, None, :] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    q = vq(4, 2, ema=True, kmeans_init=True, kmeans_iters=20, dead_code_threshold=0)
    assert int(q.initialized) == 0
    q.train()
    q(z)
    assert int(q.initialized) == 1
    dist = torch.cdist(centres, q.codebook).min(dim=1).values
    assert (dist < 0.5).all(), dist
    # EMA statistics start consistent with the centroids
    torch.testing.assert_close(q.ema_sum / q.ema_count[:, None], q.codebook, atol=0.5, rtol=0)


def test_cosine_codes_search_by_angle():
    q = vq(3, 2, ema=False, kmeans_init=False, l2_normalize=True)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [0, 5.0], [-1, -1]]))
    z = torch.tensor([[10.0, 1], [0.1, 3], [-2, -2.5]])
    assert q.nearest(z).tolist() == [0, 1, 2]


def test_low_dimensional_projection():
    q = vq(16, 32, codebook_dim=4, ema=True, kmeans_init=False)
    assert q.codebook.shape == (16, 4)
    z = torch.randn(2, 3, 32, requires_grad=True)
    z_q, idx, losses = q(z)
    assert z_q.shape == z.shape and idx.shape == (2, 3)
    (sum(losses.values()) + z_q.pow(2).mean()).backward()   # a decoder would consume z_q
    assert q.in_proj.weight.grad is not None and q.out_proj.weight.grad is not None
    q.eval()                                   # no EMA update: forward and search agree
    assert torch.equal(q.nearest(z), q(z)[1])


def test_distances_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    q = vq(64, 16, ema=True, kmeans_init=False).eval()
    z = torch.randn(300, 16)
    expected = nearest_codes(z, q.codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_nearest = q.nearest(z)
        _, got_forward, _ = q(z)
    assert torch.equal(got_nearest, expected)
    assert torch.equal(got_forward, expected)


class ThreadReplicas:
    """In-process data-parallel replicas: one thread each, and per rank a `Collectives` whose
    calls wait for every replica's call and then sum, or copy `src`'s tensor, as
    torch.distributed does. Rank 0 records each call (op, result)."""

    def __init__(self, world: int):
        self.world, self.barrier = world, threading.Barrier(world)
        self.slots: list = [None] * world
        self.calls: list[tuple[str, torch.Tensor]] = []

    def collectives(self, rank: int) -> Collectives:
        replicas = self

        class Replica(Collectives):
            def sum_(self, t):
                replicas._exchange(rank, t, "sum", lambda slots: sum(slots))

            def broadcast_(self, t, src=0):
                replicas._exchange(rank, t, "broadcast", lambda slots: slots[src])
        c = Replica()
        c.rank, c.world_size = rank, self.world
        return c

    def _exchange(self, rank, t, op, combine):
        self.slots[rank] = t.clone()
        self.barrier.wait()
        shapes = {(tuple(x.shape), x.dtype) for x in self.slots}
        assert len(shapes) == 1, f"{op}: replicas disagree on shape or dtype: {shapes}"
        result = combine(self.slots)
        self.barrier.wait()
        t.copy_(result)
        if rank == 0:
            self.calls.append((op, result.clone()))

    def shapes(self, op: str) -> set:
        return {tuple(t.shape) for o, t in self.calls if o == op}

    def run(self, fns):
        errors = []

        def wrap(fn):
            try:
                fn()
            except BaseException as e:  # surface thread failures in the test
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert not errors, errors


def assert_replicas_equal(quantizers):
    for name, tensor in quantizers[0].state_dict().items():
        for other in quantizers[1:]:
            assert torch.equal(tensor, other.state_dict()[name]), name


def test_the_default_collectives_are_a_single_process_no_op():
    c = Collectives()
    assert (c.rank, c.world_size) == (0, 1)
    t = torch.randn(3, 2)
    before = t.clone()
    c.sum_(t)
    c.broadcast_(t, src=0)
    assert torch.equal(t, before)
    assert type(vq(8, 4).collectives) is Collectives


def test_the_quantizer_takes_its_config():
    config = QuantizerConfig(codebook_size=16, codebook_dim=4, l2_normalize=True)
    q = VectorQuantizer(config, 32)
    assert q.config is config and q.codebook.shape == (16, 4)
    with pytest.raises(TypeError, match="config must be a QuantizerConfig, got int"):
        VectorQuantizer(512, 64)                                 # the old keyword-list form


def test_replicas_stay_identical_through_kmeans_ema_and_restarts():
    torch.manual_seed(0)
    world, k, d = 2, 16, 4
    # replicas see different data, and rank 1 fewer rows than there are codes
    data = [torch.randn(6, 40, d) + 3, torch.randn(6, 5, d) - 3]
    replicas = ThreadReplicas(world)
    quantizers = [vq(k, d, replicas.collectives(r), kmeans_init=True, dead_code_threshold=2.0).train()
                  for r in range(world)]

    def steps(r):
        return lambda: [quantizers[r](batch) for batch in data[r]]
    replicas.run([steps(r) for r in range(world)])
    assert {(k,), (k, d)} <= replicas.shapes("sum")             # counts and sums reduced
    assert (k, d) in replicas.shapes("broadcast")               # k-means seeds
    assert all(int(q.initialized) == 1 and "restarted" in q.metrics for q in quantizers)
    assert_replicas_equal(quantizers)


def test_kmeans_seeds_and_restart_candidates_are_rank_0_rows():
    torch.manual_seed(0)
    k, d = 8, 2
    data = [torch.randn(30, d) + 10, torch.randn(2, d) - 10]   # rank 1: 2 rows, 7 dead codes
    replicas = ThreadReplicas(2)
    seeded = [vq(k, d, replicas.collectives(r), kmeans_init=True, dead_code_threshold=0).train()
              for r in range(2)]
    replicas.run([lambda r=r: seeded[r](data[r]) for r in range(2)])
    (seeds,) = [t for op, t in replicas.calls if op == "broadcast"]
    for row in seeds:
        assert torch.isclose(data[0], row).all(dim=1).any()
    assert_replicas_equal(seeded)

    replicas = ThreadReplicas(2)
    restarted = [vq(k, d, replicas.collectives(r), kmeans_init=False, dead_code_threshold=0.5).train()
                 for r in range(2)]
    for q in restarted:
        q.codebook.copy_(torch.full((k, d), 100.0))
        q.codebook[0] = 0.0
        q.ema_sum.copy_(q.codebook)
        q.ema_count.fill_(1.0)
        q.ema_count[1:] = 0.01                                   # codes 1.. are dead
    replicas.run([lambda r=r: restarted[r](data[r]) for r in range(2)])
    for row in restarted[0].codebook[1:]:
        assert torch.isclose(data[0], row).all(dim=1).any()
    assert float(restarted[0].metrics["restarted"]) == k - 1
    assert_replicas_equal(restarted)


def test_a_step_where_rank_0_has_no_rows_postpones_restarts():
    k, d = 8, 2
    replicas = ThreadReplicas(2)
    qs = [vq(k, d, replicas.collectives(r), kmeans_init=False, dead_code_threshold=0.5).train()
          for r in range(2)]
    for q in qs:                                                 # the same start on both
        q.codebook.copy_(torch.arange(k * d, dtype=torch.float32).reshape(k, d))
        q.ema_sum.copy_(q.codebook)
        q.ema_count.fill_(0.01)                                  # every code dead
    torch.manual_seed(0)
    batches = [[torch.empty(0, d), torch.randn(20, d)], [torch.randn(20, d), torch.randn(20, d)]]

    def step(r, i):
        return lambda: qs[r](batches[r][i])
    replicas.run([step(r, 0) for r in range(2)])
    assert "restarted" not in qs[0].metrics and (qs[0].ema_count < 0.5).all()
    assert_replicas_equal(qs)
    replicas.run([step(r, 1) for r in range(2)])
    assert float(qs[0].metrics["restarted"]) > 0 and (qs[0].ema_count >= 0.5).all()
    assert_replicas_equal(qs)


def test_two_replicas_match_one_replica_with_the_whole_batch():
    torch.manual_seed(0)
    k, d = 8, 3
    init = torch.randn(k, d)
    batches = torch.randn(4, 2, 30, d)                 # step, replica, rows, dim
    replicas = ThreadReplicas(2)

    def make(collectives=None):
        q = vq(k, d, collectives, kmeans_init=False, dead_code_threshold=0)
        q.codebook.copy_(init), q.ema_sum.copy_(init)
        return q.train()
    single = make()
    pair = [make(replicas.collectives(r)) for r in range(2)]
    for step in batches:
        single(step.reshape(-1, d))
    replicas.run([lambda r=r: [pair[r](step[r]) for step in batches] for r in range(2)])
    torch.testing.assert_close(pair[0].codebook, single.codebook)
    torch.testing.assert_close(pair[0].ema_count, single.ema_count)


def test_usage_and_perplexity_are_reported():
    q = _plain_vq(4, 2)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    z = torch.tensor([[0.0, 0], [10, 0], [0.1, 0], [10, 0.1]])   # codes 0 and 1, twice each
    q(z)
    assert float(q.metrics["usage"]) == 0.5
    assert abs(float(q.metrics["perplexity"]) - 2.0) < 1e-5


def test_eval_forward_never_calls_the_collectives():
    calls = []

    class Recording(Collectives):
        def sum_(self, t):
            calls.append(("sum", t.shape))

        def broadcast_(self, t, src=0):
            calls.append(("broadcast", t.shape))
    q = vq(8, 4, Recording(), kmeans_init=True)
    q.eval()
    q(torch.randn(10, 4))          # a rank evaluating alone must not enter a collective
    assert calls == []
    q.train()
    q(torch.randn(10, 4))
    assert ("broadcast", (8, 4)) in calls and ("sum", (8,)) in calls


def test_an_ema_step_sums_its_statistics_in_one_collective_and_usage_counts_every_replica():
    # per step, the counts and sums travel together and usage reuses those counts: a second
    # or third collective per step would be latency every training step pays
    k, d = 8, 2
    book = torch.tensor([[float(i), 0.0] for i in range(k)])
    replicas = ThreadReplicas(2)
    pair = [vq(k, d, replicas.collectives(r), kmeans_init=False, dead_code_threshold=0).train()
            for r in range(2)]
    for q in pair:
        q.codebook.copy_(book), q.ema_sum.copy_(book)
    rows = [book[[0, 1, 1]], book[[2, 3, 3]]]            # rank 0 uses codes 0, 1; rank 1 codes 2, 3
    replicas.run([lambda r=r: pair[r](rows[r]) for r in range(2)])
    assert [(op, tuple(t.shape)) for op, t in replicas.calls] == [("sum", (k, d + 1))]
    for q in pair:                                       # usage over both replicas' codes
        assert float(q.metrics["usage"]) == 4 / k
        p = torch.tensor([1, 2, 1, 2]) / 6
        assert abs(float(q.metrics["perplexity"]) - float((-(p * p.log()).sum()).exp())) < 1e-5


def test_rotation_trick_keeps_the_code_value_and_rotates_the_gradient():
    """gradient=rotation: forward value is the code; the gradient reaching z is lambda R^T g, R the
    rotation taking z's direction onto the code's, lambda = |e| / |z| (Fifty et al. 2024)."""
    torch.manual_seed(0)
    q = vq(8, 4, ema=False, kmeans_init=False, dead_code_threshold=0, gradient="rotation")
    z = torch.randn(10, 4, requires_grad=True)
    z_q, idx, _ = q(z)
    codes = q.codebook.detach()[idx]
    torch.testing.assert_close(z_q.detach(), codes)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    for i in range(10):
        e, c = z[i].detach(), codes[i]
        e_hat, c_hat = e / e.norm(), c / c.norm()
        r = (e_hat + c_hat) / (e_hat + c_hat).norm()
        rot = torch.eye(4) - 2 * torch.outer(r, r) + 2 * torch.outer(c_hat, e_hat)
        torch.testing.assert_close(rot @ rot.T, torch.eye(4), atol=1e-5, rtol=0)
        scale = c.norm() / e.norm()
        torch.testing.assert_close(scale * rot @ e, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z.grad[i], scale * rot.T @ upstream[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z.grad, upstream)          # not the straight-through identity


def test_gradient_option_is_validated():
    with pytest.raises(ValueError, match="model.quantizer.gradient = 'rotate' must be straight_through or rotation"):
        QuantizerConfig(gradient="rotate")


def _simvq(k=8, d=4, collectives=None, **config):
    config = {"ema": False, "simvq": True, "kmeans_init": False, **config}
    return vq(k, d, collectives, **config)


def test_simvq_codes_are_the_learned_map_of_a_frozen_basis():
    torch.manual_seed(0)
    q = _simvq(k=32, d=4)
    assert "codebook" not in dict(q.named_parameters()) and "codebook" in dict(q.named_buffers())
    expected = q.codebook @ q.codebook_map.weight.T + q.codebook_map.bias
    assert torch.allclose(q.search_codebook(), expected)
    z = torch.randn(50, 4)
    assert torch.equal(q.nearest(z), nearest_codes(z, expected.detach()))


def test_simvq_codebook_loss_moves_every_code_through_the_map_and_never_the_basis():
    torch.manual_seed(0)
    q = _simvq(k=64, d=4)
    basis, before = q.codebook.clone(), q.search_codebook().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    _, idx, losses = q(torch.randn(8, 4))           # 8 rows reach at most 8 of the 64 codes
    losses["codebook"].backward()
    assert q.codebook_map.weight.grad is not None and torch.count_nonzero(q.codebook_map.weight.grad) > 0
    opt.step()
    after = q.search_codebook()
    unused = torch.ones(64, dtype=torch.bool)
    unused[idx.unique()] = False
    assert int(unused.sum()) >= 56
    assert bool((after[unused] != before[unused]).any(dim=1).all())   # unused codes moved too
    assert torch.equal(q.codebook, basis)


def test_simvq_eval_search_follows_an_update_of_the_map():
    torch.manual_seed(0)
    q = _simvq(k=16, d=4).eval()
    first = q.search_codebook()
    assert q.search_codebook() is first                       # cached while nothing changes
    with torch.no_grad():
        q.codebook_map.weight.mul_(-1)
    assert torch.allclose(q.search_codebook(), q.codebook @ q.codebook_map.weight.T + q.codebook_map.bias)


def test_simvq_kmeans_init_seeds_the_basis_under_an_identity_map():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0], [-5, 0], [0, 5], [0, -5]])
    z = (centres[:, None] + 0.01 * torch.randn(4, 50, 2)).reshape(-1, 2)
    q = _simvq(k=4, d=2, kmeans_init=True).train()
    q(z)
    assert torch.equal(q.codebook_map.weight.detach(), torch.eye(2))
    found = sorted(map(tuple, q.search_codebook().round().tolist()))
    assert found == sorted(map(tuple, centres.tolist()))


def test_simvq_replicas_stay_identical():
    torch.manual_seed(0)
    world, k, d = 2, 16, 4
    data = [torch.randn(3, 40, d) + 3, torch.randn(3, 5, d) - 3]
    replicas = ThreadReplicas(world)
    quantizers = []
    for r in range(world):      # DDP starts every replica from rank 0's parameters and buffers
        torch.manual_seed(1)
        quantizers.append(_simvq(k, d, replicas.collectives(r), kmeans_init=True, codebook_dim=2,
                                 l2_normalize=True).train())
    replicas.run([lambda r=r: [quantizers[r](batch) for batch in data[r]] for r in range(world)])
    assert_replicas_equal(quantizers)


def test_simvq_needs_ema_off():
    from tokenizer import ConfigError
    with pytest.raises(ConfigError, match="model.quantizer.simvq = True needs ema: false"):
        QuantizerConfig(simvq=True)
