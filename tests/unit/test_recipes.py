"""Per-model training recipes (issue 17): `model=llama3-1b` / `model=llama3-8b` bring their published optimizer
settings (conf/optim/llama3-*.yaml), the tiny preset keeps the CPU default, and overrides still win."""
import pytest

pytest.importorskip("hydra")

from seqpar.cli import load_config  # noqa: E402

LLAMA3 = dict(lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, warmup_steps=200, min_lr_ratio=0.1,
              grad_clip=1.0)


@pytest.mark.parametrize("model", ["llama3-1b", "llama3-8b"])
def test_model_preset_brings_its_recipe(model):
    cfg = load_config([f"model={model}"])
    assert cfg.model.name == model and cfg.model.init_std == 0.02
    assert {k: getattr(cfg.optim, k) for k in LLAMA3} == LLAMA3


def test_tiny_default_unchanged_and_overrides_win():
    tiny = load_config([])
    assert tiny.model.name == "tiny" and tiny.optim.lr == 3e-3 and tiny.optim.warmup_steps == 20
    assert load_config(["model=llama3-1b", "optim.lr=1e-4"]).optim.lr == 1e-4  # the command line wins
    assert load_config(["model=llama3-1b", "optim=adamw"]).optim.lr == 3e-3  # an explicit group choice wins
    # An experiment's optim.* lands on top of the model's recipe; the rest of the recipe stays.
    exp = load_config(["experiment=llama3-1b_cp2_64k"])
    assert exp.optim.warmup_steps == 50 and exp.optim.lr == 3e-4 and exp.optim.beta2 == 0.95
    assert load_config(["experiment=llama3-8b_1m_dryrun"]).optim.lr == 3e-4
    assert load_config(["experiment=cpu_cp2"]).optim.lr == 3e-3
