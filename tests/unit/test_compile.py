"""train.compile: compiled norms / RoPE / MLP give the eager model's numbers and keep fewer activations.

On CPU the wiring is checked with the ``aot_eager_decomp_partition`` backend: the same dynamo capture,
AOTAutograd decompositions and min-cut partitioner as inductor (so the same tensors are saved for
backward), without generating C++ code. The inductor path itself runs in the GPU benchmarks.
"""
import copy

import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.models import Llama
from seqpar.models.blockwise import apply_blockwise_ffn
from seqpar.models.compile import compile_model
from seqpar.models.llama import FeedForward, RMSNorm
from seqpar.models.checkpointing import apply_ac

from test_blockwise import saved_bytes

BACKEND = "aot_eager_decomp_partition"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(ffn_chunk=0, ac="none"):
    cfg = ModelConfig(name="t", dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=61)
    torch.manual_seed(0)
    model = Llama(cfg).double()
    apply_blockwise_ffn(model, ffn_chunk)
    return model


@pytest.mark.parametrize("ffn_chunk,ac", [(0, "none"), (8, "none"), (0, "selective"), (8, "full")])
def test_compiled_model_matches_eager(ffn_chunk, ac):
    eager = _model(ffn_chunk)
    compiled = copy.deepcopy(eager)
    assert compile_model(compiled, backend=BACKEND) == 2 * 2 + 1 + 2 * 2  # norms (2 per block + final), MLPs, attns
    apply_ac(eager, ac)
    apply_ac(compiled, ac)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: checkpoints and HF export
    torch.manual_seed(1)
    tokens = torch.randint(0, 61, (2, 21))
    positions = torch.arange(21).expand(2, 21) + 5
    labels = torch.randint(0, 61, (2, 21))
    losses = []
    for m in (eager, compiled):
        loss, n = m.loss(m(tokens, positions), labels, chunk_size=7)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-12, rtol=1e-12)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_compiled_mlp_and_norm_keep_fewer_activations():
    """The accounting of seqpar.train.dry_run with train.compile: the MLP keeps 3 hidden-sized tensors per
    token (eager keeps 4: silu(w1 x) is recomputed), the norm its input and an fp32 rstd (eager: an fp32
    copy (here fp32 input: none) and the output)."""
    tokens, dim, hidden = 64, 32, 128
    x = torch.randn(1, tokens, dim, requires_grad=True)
    for make, eager_bytes, compiled_bytes in (
            (lambda: FeedForward(dim, hidden), 4 * 4 * hidden * tokens, 3 * 4 * hidden * tokens),
            (lambda: RMSNorm(dim), (4 * dim + 4) * tokens, 4 * tokens)):
        torch.manual_seed(0)
        eager = make()
        compiled = copy.deepcopy(eager)
        compiled.compile(backend=BACKEND)
        keep = [x, *eager.parameters(), *compiled.parameters()]
        nb_eager, out_eager = saved_bytes(lambda: eager(x), keep)
        compiled(x)  # compile outside the measurement
        nb_compiled, out_compiled = saved_bytes(lambda: compiled(x), keep)
        torch.testing.assert_close(out_compiled, out_eager)
        assert nb_eager == eager_bytes, type(eager).__name__
        assert nb_compiled <= compiled_bytes, (type(eager).__name__, nb_compiled, compiled_bytes)


@pytest.mark.timeout(300)
def test_trainer_with_inductor_matches_eager(tmp_path):
    """train.compile=true through the real trainer and inductor (C++ kernels on CPU): the same losses as
    eager up to float32 rounding of fused element-wise code; a checkpoint is saved from the compiled model."""
    from seqpar.train import run
    from tiny_run import tiny_config as _cfg

    torch.set_num_threads(1)
    eager = run(_cfg(tmp_path / "eager", steps=4, every=4))["history"]
    compiled = run(_cfg(tmp_path / "compiled", steps=4, every=4, compile=True))["history"]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-4, abs=2e-4), (eager, compiled)
    assert (tmp_path / "compiled" / "checkpoints" / "step-00000004").is_dir()
