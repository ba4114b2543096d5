"""LongLoRA: S2-Attn (pattern vs a dense reference, both implementations, no future leak) and LoRA
adapters (frozen base, trainable set, merge/unmerge, merged export)."""
import math

import pytest
import torch

from seqpar.config import ConfigError, LoRAConfig, ModelConfig
from seqpar.models.llama import Llama
from seqpar.models.lora import LoRALinear, apply_lora, merge_lora, merged_state_dict, trainable_state_dict, unmerge_lora
from seqpar.ops.s2attn import make_s2_attn_fn, s2_attention_with_lse, s2_group_ids


def _qkv(b=2, s=32, h=4, hkv=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g, dtype=dtype) for n in (h, hkv, hkv)]


def _dense_s2(q, k, v, group):
    """Reference: materialised mask per head half; causal and same group (shifted by G/2 for the second half)."""
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    pos = torch.arange(s)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    causal = pos[:, None] >= pos[None, :]
    masks = []
    for head in range(h):
        shift = group // 2 if head >= h // 2 else 0
        gid = (pos + shift) // group
        masks.append(causal & (gid[:, None] == gid[None, :]))
    scores = scores.masked_fill(~torch.stack(masks)[None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), scores.logsumexp(-1)


def _roll_s2(q, k, v, group):
    """The public LongLoRA recipe: roll the second half of the heads by -G/2, causal inside groups, roll
    back. The last group wraps the first G/2 tokens after the last ones: it leaks the future."""
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)

    def shift(x, sign):
        return torch.cat([x[:, :, : h // 2], x[:, :, h // 2:].roll(sign * group // 2, dims=1)], dim=2)

    q, k, v = shift(q, -1), shift(k, -1), shift(v, -1)
    fold = lambda x: x.reshape(b * s // group, group, h, d).transpose(1, 2)  # [B*S/G, H, G, D]
    out = torch.nn.functional.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True)
    return shift(out.transpose(1, 2).reshape(b, s, h, d), 1)


def test_group_ids_have_no_wraparound():
    pos = torch.arange(12)
    assert s2_group_ids(pos, 4, False).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # Shifted groups: [0,2) [2,6) [6,10) [10,12): non-decreasing, so causal + same-group never looks ahead.
    assert s2_group_ids(pos, 4, True).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


@pytest.mark.parametrize("s,group,h,hkv", [(32, 8, 4, 2), (32, 32, 4, 4), (30, 8, 4, 2), (32, 8, 6, 3), (32, 8, 4, 1)],
                         ids=["gqa", "one-group", "ragged", "odd-kv", "mqa"])
def test_matches_dense_reference_both_paths(s, group, h, hkv):
    q, k, v = _qkv(s=s, h=h, hkv=hkv)
    ref_out, ref_lse = _dense_s2(q, k, v, group)
    fast = s2_attention_with_lse(q, k, v, group_size=group, backend="torch")  # folded groups when G | S
    masked = s2_attention_with_lse(q, k, v, group_size=group, positions=torch.arange(s), backend="torch")
    for out, lse in (fast, masked):
        # float64 throughout: only summation order differs from the dense reference.
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)


def test_gradients_of_both_paths_agree():
    grads = []
    for positions in (None, torch.arange(32)):
        q, k, v = (t.requires_grad_() for t in _qkv())
        out, _ = s2_attention_with_lse(q, k, v, group_size=8, positions=positions, backend="torch")
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64, summation order only


def test_doc_ids_combine_with_groups():
    q, k, v = _qkv(s=16, h=2, hkv=2)
    docs = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    out, _ = s2_attention_with_lse(q, k, v, group_size=8, doc_ids=docs, backend="torch")
    # Token 5 opens document 1: in the unshifted head it sees only itself, so its output is its own value.
    torch.testing.assert_close(out[0, 5, 0], v[0, 5, 0], rtol=0, atol=1e-12)


def _perturb_future(fn, t, s=32):
    """Outputs of ``fn`` before position ``t`` with and without a change of q/k/v at positions >= t."""
    q, k, v = _qkv(s=s)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t:] += 10.0
    return fn(q, k, v)[:, :t], fn(q2, k2, v2)[:, :t]


@pytest.mark.parametrize("t", [1, 4, 13, 28, 31])
def test_no_future_leak(t):
    for positions in (None, torch.arange(32)):
        fn = lambda q, k, v: s2_attention_with_lse(q, k, v, group_size=8, positions=positions, backend="torch")[0]
        before, after = _perturb_future(fn, t)
        assert torch.equal(before, after), f"S2-Attn output before {t} depends on tokens >= {t}"


def test_roll_based_s2_leaks_and_the_test_catches_it():
    # The public recipe: with t in the first G/2 tokens (wrapped into the last group), earlier outputs change.
    before, after = _perturb_future(lambda q, k, v: _roll_s2(q, k, v, 8), t=2)
    assert not torch.equal(before, after)


def test_model_with_s2_attention_does_not_leak():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2),
                  attn_fn=make_s2_attn_fn(8, backend="torch")).double()
    tokens = torch.randint(0, 64, (1, 32))
    positions = torch.arange(32)[None]
    base = model.logits(model(tokens, positions))
    for t in (3, 17):
        changed = tokens.clone()
        changed[0, t:] = (changed[0, t:] + 1) % 64
        logits = model.logits(model(changed, positions))
        assert torch.equal(logits[:, :t], base[:, :t])
        assert not torch.equal(logits[:, t], base[:, t])


# ---- LoRA ------------------------------------------------------------------------------------------
def _model(tie=False):
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie)).double()


def _forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 16), generator=g)
    return model.logits(model(tokens, torch.arange(16).expand(2, 16)))


def test_fresh_adapters_change_nothing_and_only_the_right_params_train():
    model = _model()
    before = _forward(model)
    base_keys = set(model.state_dict())
    params = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert torch.equal(_forward(model), before)  # B = 0 at init: exactly the base model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in dict(model.named_parameters()) if "lora_" in n or "norm" in n or "tok_embeddings" in n}
    assert sum(1 for n in names if "lora_" in n) == 2 * 4 * 2  # A and B on wq/wk/wv/wo of 2 layers
    assert len(params) == len(names)
    assert not any("feed_forward" in n or n.startswith("output") for n in names)
    assert set(model.state_dict()) - base_keys == {n for n in names if "lora_" in n}  # base keys unchanged
    lean = apply_lora(_model(), LoRAConfig(rank=2, train_embeddings=False, train_norms=False, targets=["wq", "w2"]))
    assert len(lean) == 2 * 2 * 2  # only adapters: A, B on two targets of two layers


def test_training_changes_only_trainable_params():
    model = _model()
    params = apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        tokens = torch.randint(0, 64, (2, 16))
        loss_sum, n = model.loss(model(tokens, torch.arange(16).expand(2, 16)), tokens)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert set(trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_merge_unmerge_and_merged_export():
    model = _model(tie=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["wq", "wk", "wv", "wo", "w1"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()  # a non-trivial update
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = _forward(model)
    merged_sd = merged_state_dict(model)
    assert not any("lora_" in k for k in merged_sd)
    plain = _model(tie=True)
    plain.load_state_dict(merged_sd)  # strict: exactly the base model's keys
    # float64: (x W + x A^T B^T s) vs x (W + s B A): reassociation only.
    torch.testing.assert_close(_forward(plain), adapted, rtol=1e-10, atol=1e-10)
    merge_lora(model)
    torch.testing.assert_close(_forward(model), adapted, rtol=1e-10, atol=1e-10)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(_forward(model), adapted, rtol=1e-10, atol=1e-10)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-12)  # add then subtract in float64


def test_bad_use_is_named():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="lora.targets"):
        LoRAConfig(rank=2, targets=["q_proj"])
    assert len(apply_lora(_model(), LoRAConfig(rank=0))) == len(list(_model().parameters()))  # rank 0: all train
