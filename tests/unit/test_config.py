"""The config is an immutable value: user fields stay as written, derived values are properties, the
values that need files are resolved once (seqpar.train.resolve), and the Hydra edge (seqpar.cli) keeps
YAML keys, ``model.rope_scaling={...}`` overrides and the saved config.yaml round trip."""
import dataclasses

import pytest
import torch

from seqpar.cli import config_yaml, load_config, load_config_file
from seqpar.config import (Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig)
from seqpar.errors import ConfigError as LeafConfigError
from seqpar.train.resolve import load_tokenizer, resolve_config, resolve_vocab, write_config

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def test_config_error_is_one_type_from_the_leaf_module():
    assert ConfigError is LeafConfigError and issubclass(ConfigError, ValueError)


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel = ParallelConfig()


def test_derived_values_are_properties_and_fields_stay_as_written():
    m = ModelConfig(dim=128, n_heads=4)
    assert m.n_kv_heads is None and m.ffn_hidden is None  # nothing written back
    assert m.kv_heads == 4 and m.head_dim == 32
    assert m.ffn_dim == 384  # Llama rule: int(2 * 4 * 128 / 3) = 341 -> multiple of 64
    assert ModelConfig(dim=128, ffn_dim_multiplier=1.3).ffn_dim == 448  # int(1.3 * 341) = 443 -> 448
    explicit = ModelConfig(dim=128, n_heads=4, n_kv_heads=2, ffn_hidden=200)
    assert (explicit.kv_heads, explicit.ffn_dim) == (2, 200)
    # Replacing dim re-derives: there is no stale derived value to inherit.
    assert dataclasses.replace(m, dim=256).ffn_dim == 704


def test_rope_scaling_is_checked_at_config_time():
    assert ModelConfig(rope_scaling=YARN).rope_scaling == YARN
    with pytest.raises(ConfigError, match=r"model\.rope_scaling must be a dict"):
        ModelConfig(rope_scaling={})
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.factor"):
        ModelConfig(rope_scaling={"rope_type": "linear", "factor": 0.5})


def test_tokenizer_dir_defaults_to_the_checkpoint():
    hf = Config(model=ModelConfig(init_from="/ckpt"), data=DataConfig(tokenizer="hf"))
    assert hf.data.tokenizer_path is None and hf.tokenizer_dir == "/ckpt"
    own = Config(model=ModelConfig(init_from="/ckpt"), data=DataConfig(tokenizer="hf", tokenizer_path="/tok"))
    assert own.tokenizer_dir == "/tok"
    assert Config().tokenizer_dir is None  # byte
    with pytest.raises(ConfigError, match="data.tokenizer=hf needs data.tokenizer_path or model.init_from"):
        Config(data=DataConfig(tokenizer="hf"))


def test_choice_lists_come_from_their_modules():
    from seqpar.models.checkpointing import AC_MODES
    from seqpar.ops.attention.registry import BACKEND_NAMES
    from seqpar.parallel.fsdp import FSDP_MODES
    from seqpar.parallel.layout import LAYOUTS, required_multiple

    for b in BACKEND_NAMES:
        ParallelConfig(attention_backend=b)
    for mode in FSDP_MODES:
        ParallelConfig(fsdp=mode)
    for layout in LAYOUTS:
        cp = 4
        need = required_multiple(cp, layout)
        Config(parallel=ParallelConfig(cp=cp, layout=layout), train=TrainConfig(seq_len=need * 3))
    for ac in AC_MODES:
        TrainConfig(ac=ac)
    with pytest.raises(ConfigError, match="train.seq_len=100 is not divisible by 8"):
        Config(parallel=ParallelConfig(cp=4), train=TrainConfig(seq_len=100))


def test_auto_layout_balances_packed_documents():
    """parallel.layout=auto (the default): docs for packed documents under the document mask on cp > 1 with dense
    attention and a mode that takes it; zigzag otherwise; the run shards with Config.layout, the field stays auto."""
    def layout(cp=2, doc_mask=True, seq=4096, **kw):
        par = dict(cp=cp, **{k: v for k, v in kw.items() if k in ("cp_comm", "ulysses", "layout")})
        model = {k: v for k, v in kw.items() if k in ("attention", "window")}
        cfg = Config(parallel=ParallelConfig(**par), data=DataConfig(doc_mask=doc_mask), train=TrainConfig(seq_len=seq),
                     model=ModelConfig(**model))
        assert cfg.parallel.layout == kw.get("layout", "auto")
        return cfg.layout

    assert ParallelConfig().layout == "auto"
    assert layout() == "docs" and layout(cp=4, cp_comm="ulysses") == "docs" and layout(cp_comm="allgather") == "docs"
    assert layout(doc_mask=False) == "zigzag" and layout(cp=1) == "zigzag"
    assert layout(cp=4, ulysses=2, cp_comm="hybrid") == "zigzag"  # the hybrid splits zigzag / contiguous shards only
    assert layout(attention="longformer", window=64) == "zigzag"  # sparse patterns: tested on zigzag / striped
    assert layout(seq=4100) == "zigzag"  # 4 docs chunks per rank do not divide it; zigzag (2 per rank) does
    assert layout(layout="striped") == "striped"  # what the user wrote wins
    with pytest.raises(ConfigError, match="train.seq_len=4098 is not divisible by 4"):
        layout(seq=4098)  # neither docs (8) nor zigzag (4): the error names the layout actually used


def test_compile_auto_is_on_for_cuda_runs_only():
    """train.compile=auto (the default): compiled on CUDA, eager on CPU; true/false win; the dry run's estimate
    plans a GPU run unless train.device=cpu, and counts the compiled activations accordingly."""
    from seqpar.train.dry_run import estimate_memory
    assert TrainConfig().compile == "auto" and load_config([]).train.compile == "auto"
    assert TrainConfig().compiled("cuda") and not TrainConfig().compiled("cpu")
    assert TrainConfig(compile=False).compiled("cuda") is False and TrainConfig(compile=True).compiled("cpu") is True
    for bad in ("yes", 1.0, None):
        with pytest.raises(ConfigError, match="train.compile=.* must be true, false or auto"):
            TrainConfig(compile=bad)
    act = lambda **kw: estimate_memory(Config(train=TrainConfig(seq_len=4096, **kw)), 1, 1)["activations"]
    assert act() == act(compile=True) < act(compile=False) == act(device="cpu")


def test_cli_keeps_yaml_keys_and_command_line_rope_scaling():
    cfg = load_config(["model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 64}"])
    assert cfg.model.rope_scaling == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64}
    plain = load_config([])
    assert plain.model.rope_scaling is None  # the schema's {} placeholder does not leak
    assert plain.model.n_kv_heads == 2 and plain.model.ffn_hidden is None  # as conf/model/tiny.yaml wrote them
    text = config_yaml(plain)
    for key in ("n_kv_heads:", "ffn_hidden:", "rope_scaling: null", "tokenizer_path:", "attention_backend:"):
        assert key in text, key


def test_resolve_fills_the_vocabulary_once_and_is_idempotent():
    cfg = Config(train=TrainConfig(seq_len=64, batch_size=2, device="cpu"))
    resolved = resolve_config(cfg)
    assert cfg.model.vocab_size is None  # the input is untouched
    assert resolved.model.vocab_size == 320  # byte tokenizer: 259 ids -> multiple of 64
    assert resolve_config(resolved) is resolved
    assert dataclasses.replace(resolved, model=cfg.model) == cfg  # nothing else changed
    with pytest.raises(ConfigError, match=r"model\.vocab_size=100 is smaller than the tokenizer's 259 ids"):
        resolve_vocab(ModelConfig(vocab_size=100), 259)
    assert load_tokenizer(cfg).vocab_size == 259


def test_resolve_takes_the_shape_of_an_hf_checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    from seqpar.models.hf import save_hf
    from seqpar.models.llama import Llama

    torch.manual_seed(0)
    save_hf(Llama(ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=1000.0)),
            str(tmp_path / "hf"))
    cfg = Config(model=ModelConfig(init_from=str(tmp_path / "hf"), rope_scaling=YARN),
                 train=TrainConfig(seq_len=64, batch_size=2, device="cpu"))
    resolved = resolve_config(cfg)
    m = resolved.model
    assert (m.dim, m.n_layers, m.kv_heads, m.vocab_size, m.rope_theta) == (64, 2, 2, 384, 1000.0)
    assert m.rope_scaling == YARN and cfg.model.dim == 128  # the requested scaling kept; input untouched
    assert resolve_config(resolved) is resolved


def test_saved_config_reads_back_equal(tmp_path):
    cfg = resolve_config(Config(model=ModelConfig(rope_scaling=YARN), train=TrainConfig(seq_len=64, device="cpu")))
    path = write_config(cfg, str(tmp_path))
    assert load_config_file(path) == cfg
    assert load_config_file(path, ["train.seq_len=128"]).train.seq_len == 128
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config_file(path, ["train.nonsense=1"])


ARCH_GROUP = {"longformer": ("attention", "longformer"), "bigbird": ("attention", "bigbird"),
              "blocksparse": ("attention", "blocksparse"), "reformer": ("attention", "reformer"),
              "performer": ("attention", "performer"), "infini": ("arch", "infini"), "megalodon": ("arch", "megalodon")}


@pytest.mark.parametrize("name", sorted(ARCH_GROUP))
def test_arch_group_selects_the_option_with_a_config_that_trains(name):
    """`arch=<name>` (conf/arch/) gives a valid training config with that option and builds on the meta device."""
    from seqpar.models import build_model

    cfg = resolve_config(load_config([f"arch={name}", "train.seq_len=4096"]))
    key, value = ARCH_GROUP[name]
    assert getattr(cfg.model, key) == value
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.num_params() > 0


def test_arch_linformer_is_refused_for_training_in_one_line():
    with pytest.raises(ConfigError, match="model.causal=true"):
        load_config(["arch=linformer"])
