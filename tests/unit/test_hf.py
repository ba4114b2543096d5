"""Hugging Face Llama interop: logits match transformers' LlamaForCausalLM both ways (small random models
written to tmp dirs, no hub), config round trip, sharded/single files, and errors naming file and field."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from seqpar.config import ConfigError, LoRAConfig, ModelConfig  # noqa: E402
from seqpar.models.hf import (HFCheckpointError, load_hf, model_config_from_hf, read_hf_config,  # noqa: E402
                              resolve_init_from, save_hf)
from seqpar.models.llama import Llama  # noqa: E402
from seqpar.models.lora import LoRALinear, apply_lora  # noqa: E402

SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}
# HF's LlamaRMSNorm computes its statistic in float32 even for float64 models (seqpar keeps float64), so
# float64 logits agree to float32 rounding of the norm (~1e-7 relative), not to 1e-15.
F64 = dict(rtol=1e-5, atol=1e-6)


def _hf_model(tmp_path, scaling=None, tie=False, shard=None, name="hf"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, rope_theta=1000.0, rope_scaling=dict(scaling) if scaling else None, tie_word_embeddings=tie,
        max_position_embeddings=32 if scaling and scaling["rope_type"] == "dynamic" else 128)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.uniform_(0.5, 1.5)
    path = str(tmp_path / name)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model, path


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _our_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model.logits(model(tokens, positions))


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_import_matches_transformers_logits(tmp_path, kind):
    shard = "40KB" if kind in ("none", "yarn") else None  # both the sharded (index) and single-file layouts
    hf, path = _hf_model(tmp_path, SCALINGS[kind], shard=shard)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json" if shard else "model.safetensors"))
    ours = load_hf(path, dtype=torch.float64)
    tokens = torch.randint(0, 101, (2, 96), generator=torch.Generator().manual_seed(1))  # past the trained 32
    if kind == "dynamic":
        ours.set_rope_scaling(ours.cfg.rope_scaling, seq_len=96)  # HF grows dynamic NTK to the current length
    torch.testing.assert_close(_our_logits(ours, tokens), _hf_logits(hf, tokens), **F64)


def test_tied_embeddings_and_float32(tmp_path):
    hf, path = _hf_model(tmp_path, tie=True)
    ours = load_hf(path)
    assert ours.output is None and ours.cfg.tie_embeddings
    tokens = torch.randint(0, 101, (1, 40))
    # float32 both sides: different attention kernels (blockwise online softmax vs eager) round differently.
    torch.testing.assert_close(_our_logits(ours, tokens), _hf_logits(hf.float(), tokens), rtol=1e-4, atol=1e-5)


def test_export_loads_in_transformers_with_merged_lora(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      rope_scaling=SCALINGS["yarn"])
    ours = Llama(cfg).double()
    apply_lora(ours, LoRAConfig(rank=4))
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    files = save_hf(ours, str(tmp_path / "out"), max_shard_bytes=60_000)
    assert "model.safetensors.index.json" in files and any(f.startswith("model-00002-of-") for f in files)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float64).eval()
    tokens = torch.randint(0, 101, (2, 80))
    torch.testing.assert_close(_hf_logits(hf, tokens), _our_logits(ours, tokens), **F64)
    # Round trip of the config: same ModelConfig back (max_position_embeddings derived = 4 x 32).
    back = model_config_from_hf(read_hf_config(str(tmp_path / "out")))
    assert back.rope_scaling == cfg.rope_scaling and back.max_position_embeddings == 128
    assert (back.dim, back.n_layers, back.n_heads, back.kv_heads, back.ffn_dim, back.vocab_size) == (64, 2, 4, 2, 96, 101)


def test_resave_keeps_format_and_side_files(tmp_path):
    _, path = _hf_model(tmp_path, SCALINGS["llama3"])
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")
    model = load_hf(path)
    files = save_hf(model, str(tmp_path / "again"), source=path)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    a, b = read_hf_config(path), read_hf_config(str(tmp_path / "again"))
    assert b["bos_token_id"] == a["bos_token_id"] and b["max_position_embeddings"] == a["max_position_embeddings"]
    again = load_hf(str(tmp_path / "again"))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_dynamic_scaling_round_trips_through_max_position_embeddings(tmp_path):
    _, path = _hf_model(tmp_path, SCALINGS["dynamic"])
    model = load_hf(path)
    assert model.cfg.rope_scaling == {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}
    save_hf(model, str(tmp_path / "again"))
    out = read_hf_config(str(tmp_path / "again"))
    assert out["max_position_embeddings"] == 32 and "original_max_position_embeddings" not in out["rope_scaling"]


def test_init_from_takes_the_shape_and_keeps_requested_scaling(tmp_path):
    _, path = _hf_model(tmp_path)
    cfg = resolve_init_from(ModelConfig(init_from=path, rope_scaling=SCALINGS["yarn"]))
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.rope_theta) == (64, 2, 101, 1000.0)
    assert cfg.rope_scaling == SCALINGS["yarn"] and cfg.init_from == path
    assert resolve_init_from(ModelConfig(init_from=path)).rope_scaling is None


def _edit_config(path, **changes):
    cfg = read_hf_config(path)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(HFCheckpointError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFCheckpointError, match="config.json is missing"):
        load_hf(str(tmp_path / "empty"))
    _, path = _hf_model(tmp_path, shard="40KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.rename(os.path.join(path, victim), os.path.join(path, victim + ".bak"))
    with pytest.raises(HFCheckpointError, match=f"{victim} is listed in model.safetensors.index.json but missing"):
        load_hf(path)
    os.rename(os.path.join(path, victim + ".bak"), os.path.join(path, victim))
    _edit_config(path, num_key_value_heads=4)
    with pytest.raises(HFCheckpointError, match=r"k_proj.weight.*shape \[32, 64\].*num_key_value_heads=4"):
        load_hf(path)
    _edit_config(path, num_key_value_heads=2, num_hidden_layers=3)
    with pytest.raises(HFCheckpointError, match=r"missing tensors \['model.layers.2"):
        load_hf(path)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(HFCheckpointError, match=r"unexpected tensors \['model.layers.1"):
        load_hf(path)
    for change, field in [({"model_type": "gpt2"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "model.rope_scaling.factor"),
                          ({"rope_scaling": {"rope_type": "mystery"}}, "model.rope_scaling.rope_type")]:
        # rope_parameters (transformers 5) would take precedence over the legacy rope_scaling edited here.
        _edit_config(path, **{"num_hidden_layers": 2, "model_type": "llama", "hidden_act": "silu",
                              "rope_scaling": None, "rope_parameters": None, "rope_theta": 1000.0, **change})
        with pytest.raises(HFCheckpointError, match=field.replace(".", r"\.")):
            load_hf(path)
    _edit_config(path, rope_scaling=None)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with open(tmp_path / "bin" / "config.json", "w") as f:
        json.dump(read_hf_config(path), f)
    with pytest.raises(HFCheckpointError, match=r"neither model.safetensors nor .*pytorch_model.bin"):
        load_hf(str(tmp_path / "bin"))
    assert issubclass(HFCheckpointError, ConfigError)  # train.py prints it as one `error:` line
