"""Long-context evaluation: passkey prompts and scoring, sliding-window perplexity bookkeeping, loading
run directories (DCP checkpoint, LoRA merged) and the CLIs writing table + PNG. No thresholds on model
quality: these check the measuring instruments, not a model."""
import json
import math
import os

import numpy as np
import pytest
import torch

from seqpar.config import ConfigError, LoRAConfig, ModelConfig
from seqpar.data.tokenizer import ByteTokenizer
from seqpar.eval.common import load_model, parse_scaling, run_cli
from seqpar.eval.passkey import NEEDLE, QUESTION, evaluate_passkey, passkey_min_length, passkey_prompt
from seqpar.eval.perplexity import _windows, evaluate_perplexity, sliding_window_nll
from seqpar.models.llama import Llama

TOK = ByteTokenizer()


def test_passkey_prompt_layout():
    for length in (passkey_min_length(TOK), 400, 1000):
        for depth in (0.0, 0.5, 1.0):
            ids, start = passkey_prompt(TOK, length, depth, "73519")
            text = TOK.decode(ids)
            assert len(ids) == length and start == length - 5
            assert text.endswith(QUESTION + "73519") and NEEDLE.format(key="73519") in text
    deep, _ = passkey_prompt(TOK, 1000, 1.0, "73519")
    shallow, _ = passkey_prompt(TOK, 1000, 0.0, "73519")
    needle = NEEDLE.format(key="73519")
    # depth 0: the needle right after the instructions; depth 1: right before the final filler cut + question.
    assert TOK.decode(shallow).index(needle) < TOK.decode(deep).index(needle)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(TOK, passkey_min_length(TOK) - 1, 0.5, "73519")


class _Oracle(torch.nn.Module):
    """'Predicts' the true next token (reads it from the input), or a constant token: checks the scorer."""

    def __init__(self, cheat: bool, vocab: int = 259):
        super().__init__()
        self.cheat, self.vocab = cheat, vocab
        self.scalings = []

    def set_rope_scaling(self, scaling, seq_len=None):
        self.scalings.append((scaling, seq_len))

    def forward(self, tokens, positions):
        nxt = torch.roll(tokens, -1, dims=1) if self.cheat else torch.full_like(tokens, ord("0"))
        return torch.nn.functional.one_hot(nxt, self.vocab).float()  # "hidden" = next-token one-hot

    def logits(self, hidden):
        return hidden


def test_passkey_scoring_and_variants():
    lengths, depths = [300, 600], [0.0, 1.0]
    scalings = {"none": None, "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 300}}
    oracle = _Oracle(cheat=True)
    rows = evaluate_passkey(oracle, TOK, scalings, lengths, depths, samples=3)
    assert len(rows) == 2 * 2 * 2 and all(r["accuracy"] == 1.0 and r["digit_accuracy"] == 1.0 for r in rows)
    # Every variant was set for every length (dynamic NTK needs the length).
    assert oracle.scalings == [(s, n) for s in scalings.values() for n in lengths]
    rows = evaluate_passkey(_Oracle(cheat=False), TOK, {"none": None}, lengths, depths, samples=3)
    assert all(r["accuracy"] == 0.0 for r in rows)  # keys are drawn from 10000..99999: never "00000"


def test_sliding_windows_score_the_same_targets_at_every_length():
    ids = np.arange(1000)
    lengths, stride = [64, 128, 256], 32
    first = max(lengths) - stride + 1
    targets = {}
    for c in lengths:
        inputs, labels = _windows(ids, c, stride, first)
        assert inputs.shape == labels.shape and inputs.shape[1] == c
        assert (inputs[:, 1:] == inputs[:, :-1] + 1).all()  # contiguous windows
        scored = labels[labels != -100]
        assert (scored == inputs[labels != -100] + 1).all()  # a label is the token after its input
        assert len(np.unique(scored)) == len(scored)  # each target once
        # Each scored target sees at least c - stride + 1 tokens of context inside its window.
        assert (np.nonzero(labels != -100)[1] >= c - stride).all()
        targets[c] = set(scored.tolist())
    assert targets[64] == targets[128] == targets[256] and min(targets[64]) == first


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2))
    with torch.no_grad():
        model.output.weight.zero_()  # all logits 0: every target costs exactly ln(V)
    ids = np.random.default_rng(0).integers(0, 64, 600)
    rows = evaluate_perplexity(model, ids, {"none": None, "ntk": {"rope_type": "ntk", "factor": 2.0}}, [64, 128],
                               stride=32, batch_size=3)
    for r in rows:
        assert r["tokens"] == rows[0]["tokens"] > 0
        assert r["nll"] == pytest.approx(math.log(64), rel=1e-6)  # fp32 logsumexp of zeros
    total, count = sliding_window_nll(model, ids, 64, 32, first_target=97, ignore_id=int(ids[100]))
    assert count == rows[0]["tokens"] - int((ids[97:97 + rows[0]["tokens"]] == ids[100]).sum())


def test_parse_scaling():
    model = Llama(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert parse_scaling("checkpoint", model, 256) == {"rope_type": "linear", "factor": 2.0}
    assert parse_scaling("none", model, 256) is None
    assert parse_scaling("yarn:4", model, 256) == {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 256}
    assert parse_scaling('{"rope_type": "ntk", "factor": 3}', model, 256) == {"rope_type": "ntk", "factor": 3}
    with pytest.raises(ConfigError, match="--scaling"):
        parse_scaling("yarn", model, 256)


def _run_dir_with_lora(tmp_path):
    """A run directory as the trainer writes it (DCP step folder + meta.json), holding LoRA adapters."""
    import torch.distributed.checkpoint as dcp

    from seqpar.models.lora import LoRALinear, apply_lora

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    step = tmp_path / "run" / "checkpoints" / "step-00000007"
    with pytest.warns(UserWarning):  # "no process group: single process" is expected
        dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=str(step))
    (step / "meta.json").write_text(json.dumps({"step": 7, "world_size": 1}))
    return str(tmp_path / "run"), model


def test_load_run_dir_merges_lora(tmp_path):
    run_dir, adapted = _run_dir_with_lora(tmp_path)
    overrides = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "lora.alpha=8"]
    loaded = load_model(run_dir, overrides)
    assert loaded.train_len == 256 and isinstance(loaded.tokenizer, ByteTokenizer)
    tokens = torch.randint(0, 320, (1, 20))
    pos = torch.arange(20)[None]
    with torch.no_grad():
        # fp32: merged W + s*B@A vs the two-matmul adapter path differ by rounding only.
        torch.testing.assert_close(loaded.model.logits(loaded.model(tokens, pos)),
                                   adapted.eval().logits(adapted(tokens, pos)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="does not fit the model config"):
        load_model(run_dir, ["model.dim=64"])


def test_load_run_dir_without_dcp_checkpoint_names_the_folder(tmp_path):
    # A committed step folder (meta.json) whose contents are not DCP, e.g. the pre-DCP rank-0.pt format.
    step = tmp_path / "run" / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    torch.save({"model": {}}, step / "rank-0.pt")
    with pytest.raises(ConfigError, match=r"step-00000003 is not a DCP checkpoint \(no \.metadata\)"):
        load_model(str(tmp_path / "run"), ["model.dim=32"])


def test_clis_write_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the [eval] extra
    pytest.importorskip("safetensors")  # save_hf writes the HF checkpoint the CLIs read
    from seqpar.eval import passkey, perplexity
    from seqpar.models.hf import save_hf

    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    save_hf(Llama(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_position_embeddings=256)), hf_dir)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    out = str(tmp_path / "out")
    assert perplexity.main(["--checkpoint", hf_dir, "--out", out, "--lengths", "64,128", "--text", str(text),
                            "--scaling", "none", "--scaling", "dynamic:2"]) == 0
    assert passkey.main(["--checkpoint", hf_dir, "--out", out, "--lengths", "256,512", "--depths", "0,1",
                         "--samples", "2", "--scaling", "checkpoint", "--scaling", "yarn:2"]) == 0
    for name, n_rows in (("perplexity", 4), ("passkey", 4 + 8)):  # passkey: means, then every cell
        for ext in ("md", "json", "png"):
            assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 0
        assert len(json.load(open(os.path.join(out, f"{name}.json")))["rows"]) == n_rows
    assert "| dynamic:2 | 128 |" in capsys.readouterr().out
    assert run_cli(perplexity.main, ["--checkpoint", str(tmp_path / "missing"), "--out", out]) == 2
    assert "error:" in capsys.readouterr().err
