"""Context extension end to end: a local HF checkpoint (weights + tokenizer.json) -> train.py-style run with
YaRN + LoRA on the checkpoint's own tokenizer -> the run really started from those weights."""
import json
import os

import pytest
import torch

from seqpar.config import CheckpointConfig, Config, DataConfig, LoggingConfig, LoRAConfig, ModelConfig, TrainConfig
from seqpar.data.tokenizer import HFTokenizer
from seqpar.models.hf import save_hf
from seqpar.models.llama import Llama
from seqpar.parallel.mesh import init_mesh
from seqpar.train import Trainer

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


def _hf_dir(tmp_path):
    """A tiny 'pretrained' checkpoint: byte-level BPE tokenizer.json with <s>/</s>, config.json, safetensors."""
    tk = tokenizers
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "the quick brown fox " * 50], trainer=trainer)
    path = tmp_path / "hf"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=448, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=1000.0))
    save_hf(model, str(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path), model


def test_hf_tokenizer_uses_the_checkpoint_specials(tmp_path):
    path, _ = _hf_dir(tmp_path)
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # special tokens come first in the trained vocabulary
    ids = tok.encode("the quick brown fox")
    assert ids.dtype.name == "int32" and tok.decode(ids) == "the quick brown fox"
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(path)


@pytest.mark.timeout(180)
def test_extend_from_hf_checkpoint_with_yarn_and_lora(tmp_path):
    torch.set_num_threads(1)
    path, pretrained = _hf_dir(tmp_path)
    cfg = Config(
        model=ModelConfig(init_from=path, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 32}),
        data=DataConfig(tokenizer="hf", max_bytes=300_000, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(seq_len=64, batch_size=2, steps=3, eval_every=0, device="cpu"),
        lora=LoRAConfig(rank=4),
        logging=LoggingConfig(run_dir=str(tmp_path / "run"), progress=False, log_every=1),
        checkpoint=CheckpointConfig(every=0),
    )
    assert cfg.data.tokenizer_path is None and cfg.tokenizer_dir == path  # defaults to the checkpoint directory
    trainer = Trainer(cfg, init_mesh(cfg.parallel, "cpu"))
    assert trainer.cfg.model.dim == 64 and trainer.cfg.model.vocab_size == 448  # shape from config.json
    ours = trainer.model.state_dict()
    for name, p in pretrained.state_dict().items():  # LoRA keeps the base weights under the same names
        torch.testing.assert_close(ours[name].float(), p.float(), rtol=0, atol=0)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    # LongLoRA+ defaults: adapters, embeddings and norms train; every projection's base weight is frozen.
    assert any("lora" in n for n in trainable) and "tok_embeddings.weight" in trainable and "norm.weight" in trainable
    assert not any(n.endswith((".wq.weight", ".w1.weight")) for n in trainable), trainable
    out = trainer.fit()
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # Tokens are the checkpoint's ids (< its 400-token vocabulary), not bytes.
    batch = next(iter(trainer.train_data))
    assert int(batch["tokens"].max()) < 400


def test_eval_reads_the_checkpoint_tokenizer(tmp_path):
    from seqpar.eval.common import load_model

    path, _ = _hf_dir(tmp_path)
    tok = load_model(path).tokenizer
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)  # the training tokenizer, specials too


def _tiny_base(tmp_path):
    """A 'trained' base run: its config (byte tokenizer, short rows) and a model of its resolved shape."""
    cfg = Config(
        model=ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1),
        data=DataConfig(max_bytes=200_000, cache_dir=str(tmp_path / "cache")),
        train=TrainConfig(seq_len=64, batch_size=2, steps=5, eval_every=0, device="cpu"),
        logging=LoggingConfig(run_dir=str(tmp_path / "base"), progress=False),
    )
    torch.manual_seed(0)
    return cfg, Llama(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=1))


@pytest.mark.timeout(180)
def test_demo_finetunes_through_the_trainer(tmp_path):
    from seqpar.config import ConfigError
    from seqpar.eval.demo import finetune, finetune_config
    from seqpar.models.lora import lora_layers

    torch.set_num_threads(1)
    base_cfg, base = _tiny_base(tmp_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = finetune_config(base_cfg, base.cfg, str(tmp_path / "ft"), scaling=yarn, steps=2, lr=1e-3, pose_target=256,
                          lora=LoRAConfig(rank=4, s2_attn=True))
    # The trainer starts from exactly the given weights (adapters aside), and refuses weights of another shape.
    trainer = Trainer(cfg, init_mesh(cfg.parallel, "cpu"), init_state=base.state_dict())
    ours = trainer.model.state_dict()
    for name, p in before.items():
        torch.testing.assert_close(ours[name], p, rtol=0, atol=0)
    wrong = {k: v for k, v in base.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ConfigError, match="norm.weight"):
        Trainer(cfg, init_mesh(cfg.parallel, "cpu"), init_state=wrong)

    out = finetune(base, cfg)
    assert torch.isfinite(torch.tensor(out["loss"]))
    for name, p in base.state_dict().items():  # the base model is left as it was
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    layers = lora_layers(out["model"])
    assert layers and all(m.merged for m in layers)  # adapters folded in: wq now differs from the base's
    assert not torch.equal(out["model"].state_dict()["layers.0.attention.wq.weight"],
                           before["layers.0.attention.wq.weight"])
    assert not out["model"].training and out["model"].cfg.rope_scaling == yarn
    saved = (tmp_path / "ft" / "config.yaml").read_text()  # a real trainer run: its config and metrics
    assert "pose_target_len: 256" in saved and (tmp_path / "ft" / "metrics.jsonl").is_file()


@pytest.mark.timeout(300)
def test_demo_cli_writes_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from seqpar.eval import demo

    torch.set_num_threads(1)
    out = tmp_path / "demo"
    # train_len 256: the shortest length that holds a byte-level passkey prompt.
    assert demo.main(["--out", str(out), "--train-len", "256", "--batch-size", "2", "--dim", "32", "--n-layers", "1",
                      "--n-heads", "2", "--base-steps", "2", "--ft-steps", "1", "--max-bytes", "200000",
                      "--ppl-tokens", "2048", "--passkey-samples", "1"]) == 0
    rows = json.loads((out / "perplexity.json").read_text())["rows"]
    assert {r["scaling"] for r in rows} == {"base/none", "base/linear", "base/ntk", "base/dynamic", "base/yarn",
                                            "ft/yarn", "ft/yarn+pose", "ft/longlora+yarn+pose"}
    for name in ("perplexity.md", "passkey.md", "perplexity.png", "passkey.png", "ft/yarn+pose/config.yaml"):
        assert (out / name).stat().st_size > 0
