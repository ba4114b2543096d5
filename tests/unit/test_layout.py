"""Single-process checks of the sequence layouts and of the ring's per-step block plan."""
import pytest
import torch

from seqpar.parallel import (
    check_divisible,
    gather_shards,
    local_positions,
    plan_step,
    shard_sequence,
    unshard_sequence,
)

LAYOUTS = ("zigzag", "striped", "contiguous")


def test_positions_small_example():
    # S=8 over 2 ranks: zigzag chunks of 2 -> rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert local_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert local_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert local_positions(8, 0, 2, "striped").tolist() == [0, 2, 4, 6]
    assert local_positions(8, 1, 2, "striped").tolist() == [1, 3, 5, 7]
    assert local_positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_positions_partition_the_sequence_in_increasing_order(layout, n):
    s = 2 * n * 3
    pos = [local_positions(s, r, n, layout) for r in range(n)]
    assert sorted(torch.cat(pos).tolist()) == list(range(s))
    for p in pos:  # the ring's plan relies on local order being global order
        assert len(p) == s // n and bool((p[1:] > p[:-1]).all())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_gather_round_trip(layout, n, dim):
    shape = [3, 5, 2]
    shape[dim] = 2 * n * 3
    x = torch.randn(*shape)
    shards = [shard_sequence(x, dim, layout=layout, rank=r, world_size=n) for r in range(n)]
    for r, sh in enumerate(shards):  # each shard is exactly the tokens at local_positions
        torch.testing.assert_close(sh, x.index_select(dim, local_positions(x.shape[dim], r, n, layout)), rtol=0, atol=0)
        assert sh.is_contiguous()
    torch.testing.assert_close(gather_shards(shards, dim, layout), x, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_and_gather_are_differentiable(layout):
    # gather_shards writes each shard into views of the result: the gradient must still reach every shard.
    x = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    full = gather_shards([shard_sequence(x, 1, layout=layout, rank=r, world_size=3) for r in range(3)], 1, layout)
    weight = torch.randn_like(x)
    (full * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight, rtol=0, atol=0)


def test_single_process_without_group_is_identity():
    x = torch.randn(2, 7)  # odd length is fine for a ring of one, whatever the layout
    assert shard_sequence(x, 1) is x
    assert unshard_sequence(x, 1) is x
    assert local_positions(7, 0, 1, "zigzag").tolist() == list(range(7))


@pytest.mark.parametrize("layout,s,n,need", [("zigzag", 12, 4, 8), ("striped", 10, 4, 4), ("contiguous", 7, 2, 2)])
def test_divisibility_error_names_length_layout_and_multiple(layout, s, n, need):
    with pytest.raises(ValueError) as e:
        check_divisible(s, n, layout)
    msg = str(e.value)
    assert f"sequence length {s}" in msg and f"layout={layout}" in msg and f"multiple of {need}" in msg
    with pytest.raises(ValueError, match=f"multiple of {need}"):
        shard_sequence(torch.zeros(1, s), 1, layout=layout, rank=0, world_size=n)


def _plan_mask(layout, causal, q_rank, k_rank, n, L):
    """Count how often each (local query, local key) pair is computed by the plan."""
    cover = torch.zeros(L, L, dtype=torch.int64)
    for c in plan_step(layout, causal, q_rank, k_rank, n, L):
        block = torch.ones(c.q_end - c.q_start, c.k_end - c.k_start, dtype=torch.int64)
        if c.causal:
            assert c.q_end - c.q_start == c.k_end - c.k_start  # aligned diagonal: equal lengths
            block = block.tril()
        cover[c.q_start:c.q_end, c.k_start:c.k_end] += block
    return cover


# Odd local lengths only where the layout allows them (zigzag holds two equal chunks).
_PLAN_SIZES = [(layout, n, L) for layout in LAYOUTS
               for n, L in [(1, 4), (2, 2), (2, 6), (3, 4), (4, 6), (5, 2), (2, 1), (3, 5), (4, 3)]
               if not (layout == "zigzag" and L % 2)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,n,L", _PLAN_SIZES)
def test_plan_covers_exactly_the_visible_pairs(layout, causal, n, L):
    s = n * L
    for qr in range(n):
        qpos = local_positions(s, qr, n, layout)
        for kr in range(n):
            kpos = local_positions(s, kr, n, layout)
            want = (qpos[:, None] >= kpos[None, :]) if causal else torch.ones(L, L, dtype=torch.bool)
            got = _plan_mask(layout, causal, qr, kr, n, L)
            assert torch.equal(got, want.long()), (qr, kr, got, want)


def _visible_pairs(layout, n, L):
    """[step, rank] -> visible pairs computed (the causal work of that ring step on that rank)."""
    work = torch.zeros(n, n, dtype=torch.int64)
    for r in range(n):
        for step in range(n):
            work[step, r] = _plan_mask(layout, True, r, (r - step) % n, n, L).sum()
    return work


@pytest.mark.parametrize("n,L", [(2, 8), (3, 6), (4, 10), (8, 4)])
def test_causal_work_balance(n, L):
    zig = _visible_pairs("zigzag", n, L)
    # Zigzag: every rank does the same work in total and at every step (the ring moves in lockstep).
    assert len(set(zig.sum(0).tolist())) == 1
    assert all(len(set(row.tolist())) == 1 for row in zig)
    # Striped: rank r's queries see one extra diagonal per earlier rank: totals differ by at most
    # L*(N-1) out of ~N*L^2/2 pairs, i.e. under 2/L relative.
    st = _visible_pairs("striped", n, L).sum(0)
    assert int(st.max() - st.min()) == L * (n - 1)
    # Contiguous: rank r sees r full blocks plus its diagonal, so the last rank does ~2N-1 times more.
    ct = _visible_pairs("contiguous", n, L).sum(0)
    assert ct.tolist() == [r * L * L + L * (L + 1) // 2 for r in range(n)]


def test_rank_outside_the_group_is_a_clear_error():
    x = torch.arange(16).view(1, 16)
    for rank in (2, 5, -1):
        with pytest.raises(ValueError, match=r"rank=.* is outside \[0, world_size=2\)"):
            shard_sequence(x, 1, layout="zigzag", rank=rank, world_size=2)


def test_docs_layout_round_trip_needs_its_doc_ids():
    ids = torch.tensor([[0] * 3 + [1] * 20 + [2] * 9])
    x = torch.randn(2, 32, 3)
    shards = [shard_sequence(x, 1, layout="docs", rank=r, world_size=2, doc_ids=ids) for r in range(2)]
    torch.testing.assert_close(gather_shards(shards, 1, "docs", doc_ids=ids), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="doc_ids"):
        shard_sequence(x, 1, layout="docs", rank=0, world_size=2)
