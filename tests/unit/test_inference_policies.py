"""Cache policies against float64 references built from each paper's rule: which keys a query sees and at
which RoPE distance (StreamingLLM, LM-Infinite, Dual Chunk Attention), H2O's eviction simulated naively;
a whole-sequence forward equals token-by-token decoding with eviction; each policy reduces to full
attention when its budget covers everything."""
import pytest
import torch

from seqpar.inference import KVCache, generate, make_policy, policy_forward
from seqpar.inference.attend import attend
from seqpar.inference.cache import LayerCache
from seqpar.inference.generate import prompt_layout
from seqpar.inference.runner import policy_step
from tests.unit.test_inference import left_pad, prompts, tiny_model, uncached

# The model's RoPE angles are float32 (as HF's); the references rotate with float64 angles, and the
# policies rotate at shifted positions (same distances, other float32 roundings): ~1e-7 relative.
TOL = dict(rtol=1e-5, atol=1e-6)


def rope64(x, d, theta):
    """Rotate ``x [..., D]`` by integer distance(s) ``d`` (broadcast to x[..., 0]) with float64 angles."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = d.to(torch.float64)[..., None] * inv
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)


def pair_reference(q, k, v, visible, dist, theta):
    """Naive attention where pair (i, j) scores ``rope(q_i, dist[i, j]) . k_j / sqrt(D)`` if ``visible[i, j]``.
    q ``[B, S, H, D]``, k/v ``[B, S, Hkv, D]``, visible/dist ``[B, S, S]``."""
    B, S, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)  # [B, S, H, D]
    qd = rope64(q[:, :, None], dist[..., None], theta)  # [B, S(i), S(j), H, D]: q_i rotated by dist[i, j]
    scores = torch.einsum("bijhd,bjhd->bhij", qd, kk) / D ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, vv), probs


def layer_inputs(S=19, H=4, Hkv=2, D=8, pads=(0, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(pads), S, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    mask = torch.ones(len(pads), S, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    pos, valid = prompt_layout(torch.zeros(len(pads), S, dtype=torch.long), mask)
    return q, k, v, pos, valid


def streaming_rule(i, j, sinks=3, window=5):
    vis = (j < sinks) | (i - j < window)
    dist = torch.where(j >= sinks, i - j, i.clamp(max=sinks + window - 1) - j)
    return vis, dist


def lm_infinite_rule(i, j, n_global=2, n_local=4, train_len=6):
    return (j < n_global) | (i - j < n_local), (i - j).clamp(max=train_len)


def dca_rule(i, j, train_len=10, chunk_size=6, local_window=2):
    s, c, w = chunk_size, train_len, local_window
    gap, r = i // s - j // s, i % s
    qpos = torch.where(gap == 0, r, torch.where((gap == 1) & (r < w), s + r, torch.full_like(r, c - 1)))
    return torch.ones_like(gap, dtype=torch.bool), qpos - j % s


def full_rule(i, j):
    return torch.ones_like(i, dtype=torch.bool), i - j


CASES = [
    ("full", {}, full_rule),
    ("streaming", dict(sinks=3, window=5), streaming_rule),
    ("streaming", dict(sinks=0, window=4), lambda i, j: streaming_rule(i, j, 0, 4)),
    ("lm_infinite", dict(n_global=2, n_local=4, train_len=6), lm_infinite_rule),
    ("lm_infinite", dict(n_global=3, train_len=5), lambda i, j: lm_infinite_rule(i, j, 3, 5, 5)),
    ("dca", dict(train_len=10, chunk_size=6, local_window=2), dca_rule),
    ("dca", dict(train_len=8), lambda i, j: dca_rule(i, j, 8, 6, 0)),  # defaults: s = 3c/4, w = c/16
    ("h2o", {}, full_rule),  # H2O's mask is causal; its rule is the eviction (tested below)
]


@pytest.mark.parametrize("name, opts, rule", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@torch.no_grad()
def test_policy_attention_matches_its_rule(name, opts, rule):
    model = tiny_model()
    q, k, v, pos, valid = layer_inputs()
    policy = make_policy(name, model, valid.sum(1), 0, **opts)
    lc = LayerCache()
    lc.append(k, v, pos, valid)
    out = torch.cat([attend(model, q[:, a:a + 7], k, v, policy.branches(pos[:, a:a + 7], valid[:, a:a + 7], lc),
                            8 ** -0.5)[0] for a in range(0, q.shape[1], 7)], 1)  # in query chunks
    i, j = pos[:, :, None], pos[:, None, :]  # [B, S, 1], [B, 1, S] original positions
    vis, dist = rule(i, j)
    vis = vis & (j <= i) & valid[:, :, None] & valid[:, None, :]
    ref, _ = pair_reference(q, k, v, vis, dist, model.cfg.rope_theta)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("name, opts", [
    ("streaming", dict(sinks=2, window=5)), ("streaming", dict(sinks=0, window=3)),
    ("lm_infinite", dict(n_global=2, n_local=4, train_len=6)), ("dca", dict(train_len=8, chunk_size=5, local_window=1)),
])
@torch.no_grad()
def test_whole_sequence_forward_equals_decoding_with_eviction(name, opts):
    """The rule on original positions (one pass, e.g. for perplexity) == a real evicting cache, token by token,
    whose memory never exceeds the policy's budget (+1 for the token being added)."""
    model = tiny_model()
    ids, mask = left_pad(prompts([23, 17], seed=4))
    hidden = policy_forward(model, ids, policy=name, attention_mask=mask, q_chunk=6, **opts)
    pos, valid = prompt_layout(ids, mask)
    policy = make_policy(name, model, valid.sum(1), 0, **opts)
    cache = KVCache(len(model.layers))
    for s in range(ids.shape[1]):
        h = policy_step(model, ids[:, s:s + 1], pos[:, s:s + 1], valid[:, s:s + 1], cache, policy)
        for b in range(2):
            if valid[b, s]:
                torch.testing.assert_close(h[b, 0], hidden[b, s], **TOL)
        if policy.budget is not None:
            assert cache.length <= policy.budget, (s, cache.length)


def naive_h2o(q, k, v, P, n_heavy, n_recent, theta):
    """H2O on one row by its definition, per kv head with Python sets: prefill P tokens with full causal
    attention, scores = column sums over queries and the group's heads, evict; then per new token: attend
    over the kept set, add its attention, evict. Returns (decode outputs [S-P, H, D], kept sets per step)."""
    S, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    outs, kept_log = [], []
    kept = [list(range(P)) for _ in range(Hkv)]
    score = [dict() for _ in range(Hkv)]

    def attend_one(i, g, keys):
        row = torch.zeros(D, H, dtype=torch.float64)
        for h in range(g * G, (g + 1) * G):
            qi = rope64(q[i, h], torch.tensor(i), theta)
            s = torch.stack([qi @ rope64(k[j, g], torch.tensor(j), theta) for j in keys]) / D ** 0.5
            p = s.softmax(0)
            for j, pj in zip(keys, p):
                score[g][j] = score[g].get(j, 0.0) + float(pj)
            row[:, h] = (p[:, None] * v[keys, g]).sum(0)
        return row

    def evict(g, t):
        recent = [j for j in kept[g] if j > t - n_recent]
        others = sorted((j for j in kept[g] if j <= t - n_recent), key=lambda j: (-score[g][j], j))
        kept[g] = sorted(recent + others[:n_heavy])

    for g in range(Hkv):
        for i in range(P):
            attend_one(i, g, list(range(i + 1)))
        evict(g, P - 1)
    for i in range(P, S):
        out = torch.zeros(H, D, dtype=torch.float64)
        for g in range(Hkv):
            kept[g].append(i)
            out[g * G:(g + 1) * G] = attend_one(i, g, kept[g]).T[g * G:(g + 1) * G]
            evict(g, i)
        outs.append(out)
        kept_log.append([list(kg) for kg in kept])
    return torch.stack(outs), kept_log


@torch.no_grad()
def test_h2o_eviction_matches_naive_simulation():
    model = tiny_model()
    S, P = 26, 20
    q, k, v, _, _ = layer_inputs(S=S, pads=(0,), seed=5)
    pos = torch.arange(S)[None]
    valid = torch.ones(1, S, dtype=torch.bool)
    policy = make_policy("h2o", model, torch.tensor([P]), S - P, heavy=0.15, recent=0.1)  # 3 heavy + 2 recent
    assert (int(policy.n_heavy), int(policy.n_recent)) == (3, 2)
    ref_out, ref_kept = naive_h2o(q[0], k[0], v[0], P, 3, 2, model.cfg.rope_theta)
    lc = LayerCache()
    lc.append(k[:, :P], v[:, :P], pos[:, :P], valid[:, :P])
    _, acc = attend(model, q[:, :P], lc.k, lc.v, policy.branches(pos[:, :P], valid[:, :P], lc), 8 ** -0.5, True)
    lc.score += acc
    policy.evict(lc, torch.tensor([P - 1]))
    for step, i in enumerate(range(P, S)):
        lc.append(k[:, i:i + 1], v[:, i:i + 1], pos[:, i:i + 1], valid[:, i:i + 1])
        out, acc = attend(model, q[:, i:i + 1], lc.k, lc.v, policy.branches(pos[:, i:i + 1], valid[:, i:i + 1], lc),
                          8 ** -0.5, True)
        lc.score += acc
        policy.evict(lc, torch.tensor([i]))
        torch.testing.assert_close(out[0, 0], ref_out[step], **TOL)
        kept = [sorted(lc.pos[0, lc.valid[0, :, g], g].tolist()) for g in range(2)]
        assert kept == ref_kept[step], step
        assert lc.length == 5


@pytest.mark.parametrize("name, opts", [
    ("streaming", dict(sinks=4, window=64)), ("lm_infinite", dict(train_len=64)), ("dca", dict(train_len=64)),
    ("h2o", dict(heavy=1.0, recent=1.0)),
])
@torch.no_grad()
def test_policy_with_room_for_everything_is_full_attention(name, opts):
    model = tiny_model()
    rows = prompts([10, 6], seed=6)
    ids, mask = left_pad(rows)
    out = generate(model, ids, 7, policy=name, attention_mask=mask, **opts)
    for b, r in enumerate(rows):
        assert torch.equal(out[b, ids.shape[1]:], uncached(model, r, 7)[len(r):]), (name, b)


@torch.no_grad()
def test_streaming_decoding_rotates_at_cache_slots():
    """Pos-shift: in a full rolling cache the newest token sits at slot sinks + window - 1 whatever t is,
    so decoding at t = 1000 gives exactly what it gives at t = 100 for the same cached content."""
    model = tiny_model()
    policy = make_policy("streaming", model, torch.tensor([8]), 0, sinks=2, window=4)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 6, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 6, 2, 8, generator=g, dtype=torch.float64)
    outs = []
    for t in (100, 1000):
        lc = LayerCache()
        lc.append(k, v, torch.tensor([[0, 1, t - 3, t - 2, t - 1, t]]), torch.ones(1, 6, dtype=torch.bool))
        br = policy.branches(torch.tensor([[t]]), torch.ones(1, 1, dtype=torch.bool), lc)
        assert br[0].q_pos.item() == 5 and br[1].q_pos.item() == 5
        outs.append(attend(model, q, lc.k, lc.v, br, 8 ** -0.5)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


FUSED_CASES = [
    ("full", {}), ("streaming", dict(sinks=3, window=6)), ("streaming", dict(sinks=0, window=5)),
    ("lm_infinite", dict(n_global=3, train_len=7)), ("dca", dict(train_len=10, chunk_size=6, local_window=3)),
    ("dca", dict(train_len=8, chunk_size=3, local_window=0)),
]


@pytest.mark.parametrize("name, opts", FUSED_CASES)
@torch.no_grad()
def test_fused_prefill_equals_materialised_path(name, opts):
    """The dense kernel-call form of each policy (unpadded prefill / perplexity) == its materialised rule."""
    model = tiny_model()
    ids = torch.stack(prompts([31, 31], seed=8))
    _, valid = prompt_layout(ids, None)
    assert make_policy(name, model, valid.sum(1), 0, **opts).dense_parts(2, 31, ids.device) is not None
    fused = policy_forward(model, ids, policy=name, fused=True, **opts)
    materialised = policy_forward(model, ids, policy=name, fused=False, q_chunk=8, **opts)
    torch.testing.assert_close(fused, materialised, **TOL)
    out_f = generate(model, ids, 6, policy=name, fused=True, **opts)
    assert torch.equal(out_f, generate(model, ids, 6, policy=name, fused=False, **opts))


@pytest.mark.parametrize("name, opts", [
    ("full", {}), ("streaming", dict(sinks=2, window=6)), ("lm_infinite", dict(n_global=2, train_len=7)),
    ("dca", dict(train_len=8, chunk_size=5, local_window=2)),
])
@torch.no_grad()
def test_token_nll_whole_forward_equals_teacher_forced_decoding(name, opts):
    from seqpar.inference import token_nll

    model = tiny_model()
    ids = torch.stack(prompts([30, 30], seed=9))
    whole = token_nll(model, ids, policy=name, **opts)
    assert whole.shape == (2, 29) and whole.dtype == torch.float64
    for p in (1, 12):
        torch.testing.assert_close(token_nll(model, ids, policy=name, prefill=p, **opts), whole, **TOL)
    ref = torch.nn.functional.cross_entropy(model.logits(model(ids, torch.arange(30).expand(2, 30)))[:, :-1]
                                            .transpose(1, 2), ids[:, 1:], reduction="none")
    if name == "full":
        torch.testing.assert_close(whole, ref, **TOL)
    else:  # the policies change the attention beyond their windows / chunk sizes
        assert not torch.allclose(whole, ref)


@torch.no_grad()
def test_h2o_is_scored_by_decoding_only():
    from seqpar.inference import token_nll

    model = tiny_model()
    ids = torch.stack(prompts([24], seed=2))
    with pytest.raises(ValueError, match="token by token"):
        token_nll(model, ids, policy="h2o")
    full = token_nll(model, ids, prefill=10)
    roomy = token_nll(model, ids, policy="h2o", prefill=10, heavy=1.0, recent=1.0)  # budget 20 >= 23 - ... keeps all
    small = token_nll(model, ids, policy="h2o", prefill=10, heavy=0.1, recent=0.1)  # 1 + 1 tokens
    torch.testing.assert_close(roomy[:, :18], full[:, :18], **TOL)  # until the 20-token budget binds
    assert not torch.allclose(small[:, 10:], full[:, 10:])
    with pytest.raises(ValueError, match="prefill"):
        token_nll(model, ids, prefill=0)
