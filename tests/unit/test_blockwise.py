"""BPT memory: the blockwise MLP and the chunked loss keep O(chunk) activations, whatever the sequence length.

Measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for backward
passes through the pack hook; we sum the bytes of the distinct storages that are neither parameters
nor the op's own inputs (which the caller holds anyway). Activation-checkpointing policies are
checked the same way on the whole model, and all of them give the plain model's numbers (float64).
"""
import pytest
import torch
import torch.nn.functional as F

from seqpar.config import ModelConfig
from seqpar.models import Llama
from seqpar.models.blockwise import BlockwiseFeedForward, apply_blockwise_ffn
from seqpar.models.llama import FeedForward
from seqpar.ops.loss import chunked_cross_entropy
from seqpar.models import default_attention
from seqpar.models.checkpointing import AC_MODES, apply_ac, selective_policy

DIM, HIDDEN, VOCAB, CHUNK = 32, 128, 97, 16
TOL = dict(atol=1e-12, rtol=1e-10)  # float64: only the summation order of chunked work differs


def saved_bytes(fn, keep=()):
    """Run ``fn()`` and return ``(bytes of saved-for-backward storages not in keep, fn's output)``."""
    skip = {t.untyped_storage().data_ptr() for t in keep}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _ffn_and_loss(seq_len, *, blockwise):
    torch.manual_seed(0)
    ffn = FeedForward(DIM, HIDDEN).double()
    if blockwise:
        ffn = BlockwiseFeedForward.from_feed_forward(ffn, CHUNK)
    head = torch.randn(VOCAB, DIM, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, seq_len, DIM, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, seq_len))
    keep = [x, labels, head, *ffn.parameters()]

    def run():
        h = ffn(x)  # [1, S, DIM]
        if blockwise:
            return chunked_cross_entropy(h, head, labels, chunk_size=CHUNK)[0]
        return F.cross_entropy((h @ head.t()).flatten(0, 1), labels.flatten(), reduction="sum")

    nbytes, loss = saved_bytes(run, keep)
    # The MLP output h is an input of the loss: count it apart (it is O(S * dim), not O(S * hidden or vocab)).
    return nbytes, loss, (x, head, ffn)


def test_ffn_and_loss_activations_do_not_grow_with_sequence_length():
    short, _, _ = _ffn_and_loss(64, blockwise=True)
    long, _, _ = _ffn_and_loss(1024, blockwise=True)
    plain_short, _, _ = _ffn_and_loss(64, blockwise=False)
    plain_long, _, _ = _ffn_and_loss(1024, blockwise=False)
    # The measurement does see activations: the plain MLP + full logits grow 16x with 16x the tokens.
    assert plain_long >= 15 * plain_short > 0, (plain_short, plain_long)
    # BPT: the only tensor kept is the MLP output h [S, DIM] that feeds the loss (the loss keeps views
    # of it), nothing of size S x HIDDEN or S x VOCAB.
    assert short <= 64 * DIM * 8 and long <= 1024 * DIM * 8, (short, long)
    assert long - short == (1024 - 64) * DIM * 8, (short, long)
    assert long < plain_long / 10


def test_blockwise_ffn_and_chunked_loss_match_plain_values_and_gradients():
    for seq_len in (37, 64):  # 37: chunks do not divide the sequence
        _, loss_b, (x_b, head_b, ffn_b) = _ffn_and_loss(seq_len, blockwise=True)
        _, loss_p, (x_p, head_p, ffn_p) = _ffn_and_loss(seq_len, blockwise=False)
        torch.testing.assert_close(loss_b, loss_p, **TOL)
        loss_b.backward()
        loss_p.backward()
        for a, b in [(x_b, x_p), (head_b, head_p), *zip(ffn_b.parameters(), ffn_p.parameters())]:
            torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_apply_blockwise_keeps_parameter_names_and_objects():
    model = Llama(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, ffn_hidden=HIDDEN))
    before = dict(model.named_parameters())
    assert apply_blockwise_ffn(model, 8) == 2
    assert all(isinstance(layer.feed_forward, BlockwiseFeedForward) for layer in model.layers)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="chunk_size"):
        BlockwiseFeedForward(DIM, HIDDEN, 0)


def _model_run(policy, ffn_chunk, seq_len=64, n_layers=3, attn_fn=None):
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                              ffn_hidden=HIDDEN), attn_fn=attn_fn).double()
    apply_blockwise_ffn(model, ffn_chunk)
    apply_ac(model, policy)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    positions = torch.arange(seq_len).expand(2, seq_len)
    nbytes, loss = saved_bytes(lambda: model.loss(model(tokens, positions), tokens, chunk_size=CHUNK)[0],
                               [*model.parameters()])
    loss.backward()
    return nbytes, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_ac_policies_give_the_same_numbers_and_keep_less():
    ref_bytes, ref_loss, ref_grads = _model_run("none", 0)
    kept = {}
    for policy in ("none", "selective", "full"):
        for chunk in (0, 24):
            nbytes, loss, grads = _model_run(policy, chunk)
            kept[(policy, chunk)] = nbytes
            torch.testing.assert_close(loss, ref_loss, **TOL)
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], **TOL, msg=lambda m: f"{policy}/{chunk} {name}: {m}")
    assert kept[("none", 0)] == ref_bytes
    assert kept[("full", 0)] < kept[("selective", 0)] < kept[("none", 24)] < kept[("none", 0)], kept
    with pytest.raises(ValueError, match="train.ac"):
        apply_ac(Llama(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=4)), "some")


def test_selective_runs_attention_once_per_layer():
    """Under ring attention a recompute reruns the ring, communication included: selective must not."""
    calls = []

    def counting_attention(q, k, v, *, causal, softmax_scale):
        calls.append(q.shape)
        return default_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)

    runs = {}
    for policy in AC_MODES:
        calls.clear()
        _model_run(policy, 0, attn_fn=counting_attention)  # forward and backward
        runs[policy] = len(calls)
    assert runs == {"none": 3, "selective": 3, "full": 6}, runs  # 3 layers; full reruns each block once


def test_selective_keeps_what_the_dry_run_counts():
    """Per layer, selective keeps the block input h (non-reentrant checkpoint saves its regions' inputs
    through autograd, so the hooks see it) and exactly what the attention saves: q, k (after RoPE), v,
    out, lse; nothing from inside the recompute regions. seqpar.train.dry_run.estimate_memory counts
    ``a*dim + a*(dim + 2*kv) + a*dim + lse*heads`` bytes per token (a: bytes per activation; fp64 here)."""
    B, S, heads, kv = 2, 64, 4, 2 * (DIM // 4)  # n_kv_heads=2 of head_dim DIM/4
    per_layer = _model_run("selective", 0, n_layers=3)[0] - _model_run("selective", 0, n_layers=2)[0]
    lse_bytes = default_attention_lse_bytes(torch.zeros(1, dtype=torch.float64))
    assert per_layer == B * S * (8 * DIM + 8 * (DIM + 2 * kv) + 8 * DIM + lse_bytes * heads), per_layer
    # none keeps far more per layer (norms, projections, the MLP's hidden activations)
    none_per_layer = _model_run("none", 0, n_layers=3)[0] - _model_run("none", 0, n_layers=2)[0]
    assert none_per_layer > 3 * per_layer, (none_per_layer, per_layer)


def test_one_gpu_autocast_norm_keeps_its_fp32_product():
    """On one GPU bf16 comes from autocast over fp32 weights, so the residual stream is fp32: an RMSNorm keeps
    its input (the stream itself), the fp32 normed tensor (for the weight's gradient) and the bf16 cast its
    projection saves, 10 bytes per dim per token (+ an fp32 rstd), 4 more per dim than the dry run's bf16-stream
    count. seqpar.train.dry_run.estimate_memory adds those 4 bytes per norm on one GPU only (under FSDP the
    parameters themselves are bf16)."""
    from seqpar.config import Config, ModelConfig as MC, TrainConfig
    from seqpar.models.llama import RMSNorm
    from seqpar.train.dry_run import estimate_memory
    d, tokens = 64, 32
    norm, lin = RMSNorm(d), torch.nn.Linear(d, d, bias=False)
    x = torch.randn(1, tokens, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nb, _ = saved_bytes(lambda: lin(norm(x)), [*norm.parameters(), *lin.parameters()])
    weight_copy = 2 * d * d  # autocast's bf16 copy of lin.weight: a weight buffer, counted apart
    assert nb - weight_copy == (4 + 4 + 2) * d * tokens + 4 * tokens, nb
    cfg = Config(model=MC(name="t", dim=256, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=512, vocab_size=97),
                 train=TrainConfig(seq_len=512, batch_size=1))
    one, two = (estimate_memory(cfg, dp, 1)["activations"] for dp in (1, 2))
    assert one - two == 512 * (2 * 3 + 1) * 4 * 256  # two norms per layer and the final one


def default_attention_lse_bytes(x: torch.Tensor) -> int:
    """Bytes per lse element of the default attention for ``x``'s dtype (fp32 for half types, fp64 for fp64)."""
    q = x.new_zeros(1, 4, 1, 8).requires_grad_()
    from seqpar.ops import attention_with_lse

    return attention_with_lse(q, q, q, causal=True)[1].element_size()


def test_selective_policy_recomputes_compute_and_keeps_collectives():
    from torch.utils.checkpoint import CheckpointPolicy

    assert selective_policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert selective_policy(None, torch.ops.aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE
    assert selective_policy(None, torch.ops._c10d_functional.all_reduce.default) == CheckpointPolicy.MUST_SAVE
