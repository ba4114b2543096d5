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
    assert cfg.data.tokenizer_path == path  # defaults to the checkpoint directory
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
