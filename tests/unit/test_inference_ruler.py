"""RULER tasks: every generated item is answerable from its context and within its length; the metric and the
effective length follow RULER's definitions; the evaluation runs every policy; the CLI writes its outputs."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

from seqpar.config import ModelConfig
from seqpar.data.tokenizer import ByteTokenizer
from seqpar.eval.ruler import effective_lengths, evaluate_ruler, parse_policy, run_cell
from seqpar.eval.ruler_tasks import TASKS, effective_length, make_item, string_match_all
from seqpar.models import Llama

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1000, 3000])
def test_items_are_answerable_and_fit(task, length):
    rng = np.random.default_rng(0)
    for _ in range(3):
        item = make_item(task, TOK, length, rng)
        assert item.task == task and len(item.ids) <= length and item.ids.dtype == np.int64
        assert len(item.ids) > 0.8 * length  # filled, not a short prompt labelled long
        text = TOK.decode(item.ids)
        assert item.answers and all(a in text for a in item.answers), (task, item.answers)
        assert item.max_new >= len(TOK.encode(" " + ", ".join(item.answers)))
        if task in ("niah_single", "niah_multikey"):
            (value,) = item.answers
            key = re.search(r"special magic number for (\w+) mentioned", text).group(1)
            assert f"One of the special magic numbers for {key} is: {value}." in text
        if task == "vt":  # the chain from the value reaches every answer, in order
            value = re.search(r"assigned the value (\d+)", text).group(1)
            assert f"VAR {item.answers[0]} = {value}." in text
            for a, b in zip(item.answers, item.answers[1:]):
                assert text.index(f"VAR {b} = VAR {a}.") > text.index(f"VAR {a} =")
        if task == "cwe":
            counts = Counter(re.findall(r"^\d+\. (\w+)$", text, flags=re.M))
            least_common_answer = min(counts[a] for a in item.answers)
            assert all(c < least_common_answer for w, c in counts.items() if w not in item.answers)
        if task == "fwe":
            words = text.split("words.\n", 1)[1].split("\nAnswer:")[0].split()
            top = [w for w, _ in Counter(words).most_common()]
            assert top[:3] == item.answers and Counter(words)[top[2]] > Counter(words)[top[3]]


def test_item_generation_is_seeded_and_bad_requests_raise():
    a = make_item("niah_multiquery", TOK, 900, np.random.default_rng(5))
    b = make_item("niah_multiquery", TOK, 900, np.random.default_rng(5))
    assert np.array_equal(a.ids, b.ids) and a.answers == b.answers
    with pytest.raises(ValueError, match="too short"):
        make_item("niah_single", TOK, 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown RULER task"):
        make_item("qa_1", TOK, 900, np.random.default_rng(0))


def test_string_match_all_and_effective_length():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("the NUMBERS are 123", ["123", "456", "Numbers"]) == pytest.approx(2 / 3)
    assert string_match_all("", ["1"]) == 0.0
    assert effective_length({1024: 0.9, 2048: 0.86, 4096: 0.5, 8192: 0.9}, 0.856) == 2048  # must *stay* above
    assert effective_length({1024: 0.5, 2048: 0.9}, 0.856) is None
    rows = [{"policy": "p", "task": "mean", "length": n, "score": s} for n, s in ((8, 1.0), (16, 0.2))]
    assert effective_lengths(rows, 0.5) == {"p": 8}


def test_parse_policy():
    assert parse_policy("full") == ("full", {})
    assert parse_policy("streaming:sinks=4,window=1020") == ("streaming", {"sinks": 4, "window": 1020})
    assert parse_policy("h2o:heavy=0.1,recent=0.2") == ("h2o", {"heavy": 0.1, "recent": 0.2})


@torch.no_grad()
def test_evaluation_runs_every_policy_and_scores_in_range():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, max_position_embeddings=512))
    policies = {"full": ("full", {}), "stream": ("streaming", dict(sinks=4, window=200)), "h2o": ("h2o", {}),
                "lmi": ("lm_infinite", {}), "dca": ("dca", {})}
    rows = evaluate_ruler(model, TOK, policies, ["niah_single", "cwe"], [800], samples=2)
    assert len(rows) == 5 * 3 and all(0.0 <= r["score"] <= 1.0 for r in rows)
    score, preds = run_cell(model, TOK, "niah_single", 800, 2, "full", {})
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)


def test_ruler_cli_writes_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("safetensors")
    from seqpar.eval import ruler
    from seqpar.models.hf import save_hf

    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    save_hf(Llama(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_position_embeddings=256)), hf_dir)
    out = str(tmp_path / "out")
    assert ruler.main(["--checkpoint", hf_dir, "--out", out, "--lengths", "700,900", "--tasks", "niah_single,vt",
                       "--samples", "2", "--policy", "full", "--policy", "streaming:sinks=4,window=128"]) == 0
    for ext in ("md", "json", "png"):
        assert os.path.getsize(os.path.join(out, f"ruler.{ext}")) > 0
    data = json.load(open(os.path.join(out, "ruler.json")))
    assert len(data["rows"]) == 2 * 2 * 3 and set(data["meta"]["effective_length"]) == {
        "full", "streaming:sinks=4,window=128"}
    assert "effective length" in capsys.readouterr().out
    assert ruler.run_cli(ruler.main, ["--checkpoint", hf_dir, "--out", out, "--lengths", "700",
                                      "--policy", "streaming:sinks=9,window=4"]) == 2
    assert "sinks=9" in capsys.readouterr().err


def test_policy_perplexity_cli_writes_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("safetensors")
    from seqpar.eval import policy_perplexity
    from seqpar.models.hf import save_hf

    torch.manual_seed(0)
    hf_dir = str(tmp_path / "hf")
    save_hf(Llama(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_position_embeddings=64)), hf_dir)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = str(tmp_path / "out")
    args = ["--checkpoint", hf_dir, "--out", out, "--lengths", "96,160", "--text", str(text), "--buckets", "4",
            "--policy", "full", "--policy", "streaming:sinks=4,window=28", "--policy", "lm_infinite"]
    assert policy_perplexity.main(args) == 0
    for ext in ("md", "json", "png"):
        assert os.path.getsize(os.path.join(out, f"policy_perplexity.{ext}")) > 0
    data = json.load(open(os.path.join(out, "policy_perplexity.json")))
    assert len(data["rows"]) == 2 * 3 and all(r["ppl"] > 1 for r in data["rows"])
    assert len(data["meta"]["by_position"]["160"]["full"]) == 4
    assert policy_perplexity.main(args[:10] + ["--policy", "h2o", "--prefill", "32"]) == 0
    assert policy_perplexity.run_cli(policy_perplexity.main, args[:10] + ["--policy", "h2o"]) == 2
    assert "token by token" in capsys.readouterr().err
