import threading

import torch

from tokenizer import VectorQuantizer
from tokenizer.nearest import nearest_codes


def _plain_vq(k=8, d=4, beta=0.25):
    return VectorQuantizer(k, d, beta=beta, ema=False, kmeans_init=False, dead_code_threshold=0)


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
    q = VectorQuantizer(k, d, ema=True, decay=decay, eps=eps, kmeans_init=False, dead_code_threshold=0)
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
    q = VectorQuantizer(8, 4, ema=True, kmeans_init=False)
    _, _, losses = q(torch.randn(5, 4))
    assert set(losses) == {"commitment"}
    assert not isinstance(q.codebook, torch.nn.Parameter)


def test_dead_code_restart_revives_codes_from_encoder_outputs():
    torch.manual_seed(0)
    k, d = 8, 2
    q = VectorQuantizer(k, d, ema=True, kmeans_init=False, dead_code_threshold=0.5)
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


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0], [20, 0], [0, 20], [20, 20]])
    z = (centres[:, None, :] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    q = VectorQuantizer(4, 2, ema=True, kmeans_init=True, kmeans_iters=20, dead_code_threshold=0)
    assert int(q.initialized) == 0
    q.train()
    q(z)
    assert int(q.initialized) == 1
    dist = torch.cdist(centres, q.codebook).min(dim=1).values
    assert (dist < 0.5).all(), dist
    # EMA statistics start consistent with the centroids
    torch.testing.assert_close(q.ema_sum / q.ema_count[:, None], q.codebook, atol=0.5, rtol=0)


def test_cosine_codes_search_by_angle():
    q = VectorQuantizer(3, 2, ema=False, kmeans_init=False, l2_normalize=True)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [0, 5.0], [-1, -1]]))
    z = torch.tensor([[10.0, 1], [0.1, 3], [-2, -2.5]])
    assert q.nearest(z).tolist() == [0, 1, 2]


def test_low_dimensional_projection():
    q = VectorQuantizer(16, 32, codebook_dim=4, ema=True, kmeans_init=False)
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
    q = VectorQuantizer(64, 16, ema=True, kmeans_init=False).eval()
    z = torch.randn(300, 16)
    expected = nearest_codes(z, q.codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_nearest = q.nearest(z)
        _, got_forward, _ = q(z)
    assert torch.equal(got_nearest, expected)
    assert torch.equal(got_forward, expected)


class ThreadReplicas:
    """An in-process stand-in for data-parallel replicas: each thread's all-reduce call waits
    for the others and gets the sum, like torch.distributed.all_reduce(SUM)."""

    def __init__(self, world: int):
        self.world, self.barrier = world, threading.Barrier(world)
        self.slots: list = [None] * world
        self.calls: list[tuple] = []

    def hook(self, rank: int):
        def all_reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            t.copy_(total)
            if rank == 0:
                self.calls.append(tuple(t.shape))
        return all_reduce

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


def test_replicas_stay_identical_through_the_hook():
    torch.manual_seed(0)
    world, k, d = 2, 16, 4
    data = [torch.randn(6, 40, d) + 3 * r for r in range(world)]    # replicas see different data
    replicas = ThreadReplicas(world)
    quantizers = [VectorQuantizer(k, d, ema=True, kmeans_init=True, dead_code_threshold=2.0,
                                  all_reduce_fn=replicas.hook(r)) for r in range(world)]
    for q in quantizers:
        q.train()

    def steps(r):
        return lambda: [quantizers[r](batch) for batch in data[r]]
    replicas.run([steps(r) for r in range(world)])
    assert (k,) in replicas.calls and (k, d) in replicas.calls     # counts and sums reduced
    for name in ("codebook", "ema_count", "ema_sum"):
        assert torch.equal(getattr(quantizers[0], name), getattr(quantizers[1], name)), name


def test_two_replicas_match_one_replica_with_the_whole_batch():
    torch.manual_seed(0)
    k, d = 8, 3
    init = torch.randn(k, d)
    batches = torch.randn(4, 2, 30, d)                 # step, replica, rows, dim
    replicas = ThreadReplicas(2)

    def make(hook=None):
        q = VectorQuantizer(k, d, ema=True, kmeans_init=False, dead_code_threshold=0, all_reduce_fn=hook)
        q.codebook.copy_(init), q.ema_sum.copy_(init)
        return q.train()
    single = make()
    pair = [make(replicas.hook(r)) for r in range(2)]
    for step in batches:
        single(step.reshape(-1, d))
    replicas.run([lambda r=r: [pair[r](step[r]) for step in batches] for r in range(2)])
    torch.testing.assert_close(pair[0].codebook, single.codebook)
    torch.testing.assert_close(pair[0].ema_count, single.ema_count)


def test_usage_and_perplexity_are_reported():
    q = VectorQuantizer(4, 2, ema=False, kmeans_init=False)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    z = torch.tensor([[0.0, 0], [10, 0], [0.1, 0], [10, 0.1]])   # codes 0 and 1, twice each
    q(z)
    assert float(q.metrics["usage"]) == 0.5
    assert abs(float(q.metrics["perplexity"]) - 2.0) < 1e-5


def test_eval_forward_never_calls_the_hook():
    calls = []
    q = VectorQuantizer(8, 4, ema=True, kmeans_init=False, all_reduce_fn=lambda t: calls.append(t.shape))
    q.eval()
    q(torch.randn(10, 4))          # a rank evaluating alone must not enter a collective
    assert calls == []
    q.train()
    q(torch.randn(10, 4))
    assert calls


def test_election_picks_the_largest_draw_and_reports_a_tie():
    for draws, expected in (((0.3, 0.7), [False, True]), ((0.5, 0.5), [None, None])):
        replicas = ThreadReplicas(2)
        qs = [VectorQuantizer(8, 4, all_reduce_fn=replicas.hook(r)) for r in range(2)]
        got = [None, None]

        def elect(r):
            def fn():
                got[r] = qs[r]._elect(draws[r], torch.zeros(1))
            return fn
        replicas.run([elect(0), elect(1)])
        assert got == expected, draws
