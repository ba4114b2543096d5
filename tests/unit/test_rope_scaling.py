"""RoPE scalings: bit-exact parity with transformers' ROPE_INIT_FUNCTIONS, NTK closed form, errors
naming the field, and tables that depend only on each token's global position (ring layouts)."""
import math

import pytest
import torch

from seqpar.config import ConfigError, ModelConfig
from seqpar.ops.rope import compute_inv_freq, rope_cos_sin

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
YARN_DEEPSEEK = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
                 "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}
YARN_ATTN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "attention_factor": 0.9}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
LINEAR = {"rope_type": "linear", "factor": 4.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256}


def _hf(head_dim, theta, scaling, seq_len):
    """transformers' own (inv_freq, attention_factor) for the same scaling, config built locally."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_scaling = dict(scaling)
    max_pos = 2 * int(hf_scaling.get("original_max_position_embeddings", 2048))
    if hf_scaling["rope_type"] == "dynamic":
        # HF's dynamic NTK reads the trained length from max_position_embeddings, not from the dict.
        max_pos = hf_scaling.pop("original_max_position_embeddings")
    elif hf_scaling["rope_type"] == "yarn":
        max_pos = int(hf_scaling["factor"] * hf_scaling["original_max_position_embeddings"])
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                   rope_theta=theta, rope_scaling=hf_scaling, max_position_embeddings=max_pos)
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, None, seq_len=seq_len)


@pytest.mark.parametrize("scaling", [LINEAR, DYNAMIC, YARN, YARN_DEEPSEEK, YARN_ATTN, LLAMA3],
                         ids=["linear", "dynamic", "yarn", "yarn-mscale", "yarn-attn-factor", "llama3"])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_matches_transformers_bit_for_bit(scaling, head_dim, theta):
    # seq_len matters only for dynamic: below, at and above the trained length.
    for seq_len in (None, 100, 256, 1000, 4097):
        ref_inv, ref_scale = _hf(head_dim, theta, scaling, seq_len)
        inv, scale = compute_inv_freq(head_dim, theta, dict(scaling), seq_len=seq_len)
        # Same ops in the same order in float32: exact equality, not a tolerance.
        assert inv.dtype == torch.float32 and torch.equal(inv, ref_inv), (scaling, seq_len)
        assert scale == float(ref_scale)


def test_yarn_attention_scale_is_mscale():
    _, scale = compute_inv_freq(64, 10000.0, YARN)
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0, abs=0)  # YaRN's sqrt(1/t) = 0.1 ln(s) + 1


def test_ntk_closed_form_and_equals_dynamic_at_matching_length():
    d, theta, factor = 64, 10000.0, 4.0
    inv, scale = compute_inv_freq(d, theta, {"rope_type": "ntk", "factor": factor})
    base = theta * factor ** (d / (d - 2))
    ref = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    # float32 table vs float64 closed form: relative error of one float32 rounding of pow.
    torch.testing.assert_close(inv.double(), ref, rtol=1e-6, atol=0)
    assert scale == 1.0
    # Highest frequency unchanged (extrapolated); lowest one divided by exactly `factor` (interpolated).
    default, _ = compute_inv_freq(d, theta)
    assert inv[0] == default[0]
    # ratio at feature i is factor^(2i/(d-2)), i.e. factor at the last one; rel 1e-5: float32 tables.
    assert (default[-1] / inv[-1]).item() == pytest.approx(factor, rel=1e-5)
    # Dynamic NTK with factor f at length L has base theta * (f L / L0 - f + 1)^(d/(d-2)): L = L0 (a + f - 1) / f
    # gives the static NTK base for factor a.
    f, l0 = 2.0, 1024
    dyn, _ = compute_inv_freq(d, theta, {"rope_type": "dynamic", "factor": f, "original_max_position_embeddings": l0},
                              seq_len=int(l0 * (factor + f - 1) / f))
    assert torch.equal(dyn, inv)


def test_dynamic_is_default_within_trained_length():
    default, _ = compute_inv_freq(32, 10000.0)
    for seq_len in (None, 1, 256):
        assert torch.equal(compute_inv_freq(32, 10000.0, DYNAMIC, seq_len=seq_len)[0], default)
    assert not torch.equal(compute_inv_freq(32, 10000.0, DYNAMIC, seq_len=512)[0], default)


@pytest.mark.parametrize("scaling,field", [
    ({"rope_type": "bogus", "factor": 2.0}, "model.rope_scaling.rope_type"),
    ({"rope_type": "linear"}, "model.rope_scaling.factor"),
    ({"rope_type": "linear", "factor": 0.5}, "model.rope_scaling.factor"),
    ({"rope_type": "ntk", "factor": 0.99}, "model.rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 256}, "model.rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "model.rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": 2.0}, "model.rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "model.rope_scaling.original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": "big"}, "model.rope_scaling.factor"),
    ({"rope_type": "linear", "factor": float("nan")}, "model.rope_scaling.factor"),
])
def test_bad_scaling_names_the_field(scaling, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compute_inv_freq(64, 10000.0, scaling)
    # ... and already when the config is built, before any model exists.
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig(rope_scaling=scaling)


@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
def test_tables_follow_global_positions_under_every_layout(layout):
    # The shard's cos/sin must be the full sequence's cos/sin at the shard's GLOBAL positions: RoPE
    # depends only on the position tensor, which is sharded with the tokens.
    from seqpar.parallel.layout import shard_sequence

    inv, scale = compute_inv_freq(32, 10000.0, YARN)
    positions = torch.arange(64).expand(2, 64)
    cos, sin = rope_cos_sin(positions, inv, scale)  # [B, S, D/2]
    for rank in range(4):
        local = shard_sequence(positions, 1, layout=layout, rank=rank, world_size=4)
        c, s = rope_cos_sin(local, inv, scale)
        assert torch.equal(c, shard_sequence(cos, 1, layout=layout, rank=rank, world_size=4))
        assert torch.equal(s, shard_sequence(sin, 1, layout=layout, rank=rank, world_size=4))


def test_model_set_rope_scaling_recomputes_tables():
    from seqpar.models.llama import Llama

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2)
    model = Llama(cfg)
    model.set_rope_scaling(YARN)
    inv, scale = compute_inv_freq(16, 10000.0, YARN)
    assert torch.equal(model._rope_inv_freq(torch.device("cpu")), inv) and model.rope_attention_scale == scale
    assert cfg.rope_scaling is None and model.cfg.rope_scaling == YARN  # the caller's config is not mutated
    model.set_rope_scaling(DYNAMIC, seq_len=1024)
    assert torch.equal(model._rope_inv_freq(torch.device("cpu")), compute_inv_freq(16, 10000.0, DYNAMIC, 1024)[0])


@pytest.mark.parametrize("scaling", [LINEAR, DYNAMIC, YARN, LLAMA3, {"rope_type": "ntk", "factor": 2.0}],
                         ids=["linear", "dynamic", "yarn", "llama3", "ntk"])
def test_tables_are_real_when_the_model_is_built_on_meta(scaling):
    # The trainer builds big models under torch.device("meta"); the RoPE tables must still be real CPU tensors.
    from seqpar.models.llama import Llama

    with torch.device("meta"):
        model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, rope_scaling=scaling))
    inv = model._rope_inv_freq(torch.device("cpu"))
    assert inv.device.type == "cpu" and torch.equal(inv, compute_inv_freq(16, 10000.0, scaling)[0])
