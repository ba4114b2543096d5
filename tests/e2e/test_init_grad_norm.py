"""benchmarks/init_grad_norm.py measures what it says: its per-kind norms add up to the total, the total is the
gradient norm torch computes for the same model and batch, and the torchtitan inits set the documented stds."""
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import init_grad_norm  # noqa: E402


def test_total_is_torchs_grad_norm_and_the_kinds_add_up():
    from seqpar.cli import load_config
    from seqpar.models.llama import Llama

    tokens = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(1))
    r = init_grad_norm.grad_norms("tiny", "seqpar", tokens, ["model.vocab_size=300"])
    assert math.isclose(r["total"], math.sqrt(sum(v * v for v in r["kinds"].values())), rel_tol=1e-9)
    torch.manual_seed(0)
    model = Llama(load_config(["model=tiny", "model.tie_embeddings=true", "model.vocab_size=300"]).model)
    model.init_weights()
    loss_sum, n = model.loss(model(tokens[:, :-1], torch.arange(32)[None]), tokens[:, 1:])
    (loss_sum / n).backward()
    expect = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert math.isclose(r["total"], float(expect), rel_tol=1e-5)
    assert {"wo", "w2", "wq"} <= set(r["kinds"])


def test_torchtitan_inits_set_the_documented_stds():
    from seqpar.cli import load_config
    from seqpar.models.llama import Llama

    cfg = load_config(["model=tiny", "model.tie_embeddings=false", "model.dim=256", "model.n_heads=4",
                       "model.vocab_size=300"]).model
    model = Llama(cfg)
    init_grad_norm._titan(model, cfg.dim, untied=True)
    assert abs(float(model.tok_embeddings.weight.detach().std()) - 1.0) < 0.05
    assert abs(float(model.output.weight.detach().std()) - cfg.dim ** -0.5 * 0.986) < 0.1 * cfg.dim ** -0.5  # 3-sigma cut
    last = len(model.layers) - 1
    want = 0.02 / math.sqrt(2 * (last + 1))
    assert abs(float(model.layers[last].feed_forward.w2.weight.detach().std()) - want * 0.986) < 0.1 * want
