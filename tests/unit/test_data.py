"""Data pipeline: corpus sources, tokenizers, packing invariants, dp sharding, resume, errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from seqpar.config import ConfigError, DataConfig
from seqpar.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    PackedBatches,
    build_data,
    build_tokenizer,
    iter_documents,
    pack_documents,
    split_documents,
)
from seqpar.data.corpus import cap_bytes

BOS, EOS = ByteTokenizer.bos_id, ByteTokenizer.eos_id


def _docs(n: int = 40, seed: int = 0) -> list[str]:
    """Documents of very different lengths (some shorter than a row, some spanning several)."""
    rng = np.random.default_rng(seed)
    return [f"doc {i} é✓: " + "abcdefgh"[i % 8] * int(rng.integers(1, 120)) for i in range(n)]


def _stream(n: int = 40):
    tok = ByteTokenizer()
    return pack_documents([tok.encode(d) for d in _docs(n)], BOS, EOS)


def _text_cfg(tmp_path, n: int = 40, **kw) -> DataConfig:
    for i, d in enumerate(_docs(n)):
        (tmp_path / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    return DataConfig(source="text", paths=[str(tmp_path / "*.txt")], **kw)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _row_ids(stream, batch, seq_len: int) -> np.ndarray:
    """Which stream rows a batch holds, recovered from document positions (needs position_ids=document)."""
    first = stream.doc_starts[batch["doc_ids"][:, 0].numpy()] + batch["positions"][:, 0].numpy()
    assert np.all(first % seq_len == 0)
    return first // seq_len


def test_byte_tokenizer_roundtrip_non_ascii():
    tok = ByteTokenizer()
    text = "plain ASCII, é, ß, 日本語, 🙂 and a NUL \x00"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor([BOS, *ids.tolist(), EOS, tok.pad_id])) == text  # specials dropped
    assert tok.vocab_size == 259 and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3


def test_pack_documents_layout():
    docs = [np.array([1, 2, 3], np.int32), np.array([], np.int32), np.array([9], np.int32)]
    s = pack_documents(docs, BOS, EOS)
    assert s.tokens.dtype == np.int32
    assert s.tokens.tolist() == [BOS, 1, 2, 3, EOS, BOS, EOS, BOS, 9, EOS]
    assert s.doc_starts.tolist() == [0, 5, 7]


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_rows_lose_and_duplicate_no_token(seq_len):
    s = _stream()
    it = PackedBatches(s, seq_len=seq_len, batch_size=1, seed=0, loop=False)
    b = it.make_batch(np.arange(it.num_rows))  # all rows, in stream order
    n = it.num_rows
    last = int(b["labels"][-1, -1])
    rebuilt = b["tokens"].reshape(-1).tolist() + [BOS if last == IGNORE_INDEX else last]
    assert rebuilt == s.tokens[: n * seq_len + 1].tolist()
    # Each label is the next input token (also across row ends), or -100 where that token is a BOS.
    nxt = torch.cat([b["tokens"].reshape(-1)[1:], torch.tensor(rebuilt[-1:])]).reshape(n, seq_len)
    assert torch.equal(torch.where(nxt == BOS, IGNORE_INDEX, nxt), b["labels"])
    assert n == (len(s.tokens) - 1) // seq_len and len(s.tokens) - (n * seq_len + 1) < seq_len


def test_labels_positions_doc_ids_invariants():
    s, seq_len = _stream(), 32
    it = PackedBatches(s, seq_len=seq_len, batch_size=4, seed=3, position_ids="document")
    for b in _take(it, 6):
        tokens, labels, pos, doc = (b[k] for k in ("tokens", "labels", "positions", "doc_ids"))
        assert all(v.shape == (4, seq_len) and v.dtype == torch.int64 for v in b.values())
        rows = _row_ids(s, b, seq_len)
        idx = rows[:, None] * seq_len + np.arange(seq_len + 1)  # [B, S+1] stream indices
        target_is_bos = torch.from_numpy(s.tokens[idx[:, 1:]] == BOS)
        assert torch.equal(labels == IGNORE_INDEX, target_is_bos)  # -100 exactly at BOS targets
        assert torch.equal(pos == 0, tokens == BOS)  # positions reset exactly at document starts
        same_doc = doc[:, 1:] == doc[:, :-1]
        assert torch.equal(~same_doc, tokens[:, 1:] == BOS)  # doc_ids change exactly at BOS
        assert torch.all((pos[:, 1:] == pos[:, :-1] + 1)[same_doc])
        # Positions carry over from the previous row: offset from the true document start.
        assert np.array_equal(pos.numpy(), idx[:, :-1] - s.doc_starts[doc.numpy()])
    seq = PackedBatches(s, seq_len=seq_len, batch_size=2, seed=3, position_ids="sequence")
    assert torch.equal(next(seq)["positions"], torch.arange(seq_len).expand(2, seq_len))


def test_epoch_visits_each_row_once_and_reshuffles():
    s, seq_len = _stream(), 16
    it = PackedBatches(s, seq_len=seq_len, batch_size=4, seed=0, position_ids="document")
    epochs = [np.concatenate([_row_ids(s, b, seq_len) for b in _take(it, len(it))]) for _ in range(2)]
    for rows in epochs:
        assert len(rows) == len(set(rows.tolist())) == len(it) * 4
    assert not np.array_equal(epochs[0], epochs[1]) and it.epoch == 1


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    cfg = _text_cfg(tmp_path, val_fraction=0.1)
    a = _take(build_data(cfg, seq_len=16, batch_size=4, seed=1)[0], 3)
    b = _take(build_data(cfg, seq_len=16, batch_size=4, seed=1)[0], 3)
    c = _take(build_data(cfg, seq_len=16, batch_size=4, seed=2)[0], 3)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_disjoint_and_cover_global_batch(dp_size):
    s, seq_len, bs = _stream(), 8, 2
    kw = dict(seq_len=seq_len, seed=5, position_ids="document")
    ranks = [PackedBatches(s, batch_size=bs, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)]
    single = PackedBatches(s, batch_size=bs * dp_size, **kw)
    for _ in range(3):
        per_rank = [_row_ids(s, next(r), seq_len) for r in ranks]
        union = np.concatenate(per_rank)
        assert len(set(union.tolist())) == bs * dp_size  # disjoint
        assert sorted(union.tolist()) == sorted(_row_ids(s, next(single), seq_len).tolist())  # cover


def test_state_dict_resume_yields_identical_batches():
    s = _stream()
    it = PackedBatches(s, seq_len=16, batch_size=4, seed=7, dp_rank=1, dp_size=2)
    _take(it, 2 * len(it) - 1)  # save late in epoch 1 (not 0), resume across the boundary into epoch 2
    assert it.epoch == 1
    state = it.state_dict()
    expected = _take(it, 3)
    fresh = PackedBatches(s, seq_len=16, batch_size=4, seed=7, dp_rank=1, dp_size=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(expected, _take(fresh, 3)) for k in x)
    other = PackedBatches(s, seq_len=32, batch_size=4, seed=7, dp_rank=1, dp_size=2)
    with pytest.raises(ConfigError, match=r"train.seq_len gives seq_len=32 but the checkpoint was saved with 16; .*"
                                          r"logging.run_dir, or .*checkpoint.allow_changes=\[train.seq_len\]"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"parallel.dp gives dp_size=1 .*own logging.run_dir\.$"):
        PackedBatches(s, seq_len=16, batch_size=4, seed=7, dp_rank=0, dp_size=1).load_state_dict(state)


def test_train_val_split_disjoint_and_val_repeatable(tmp_path):
    train_ids, val_ids = split_documents(100, 0.1, seed=0)
    assert len(val_ids) == 10 and set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(100))
    assert np.array_equal(split_documents(100, 0.1, seed=9)[1], val_ids)  # val set ignores train seed
    assert len(split_documents(100, 0.0, seed=0)[1]) == 0

    cfg = _text_cfg(tmp_path, n=80, val_fraction=0.25)
    train, val, tok = build_data(cfg, seq_len=8, batch_size=2, seed=0)

    def doc_texts(stream):
        bounds = list(stream.doc_starts) + [len(stream.tokens)]
        return {tok.decode(stream.tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])}

    tr, va = doc_texts(train.stream), doc_texts(val.stream)
    assert len(va) == 20 and tr.isdisjoint(va) and tr | va == set(_docs(80))
    assert val.loop is False and sum(1 for _ in val) == len(val)
    assert torch.equal(next(iter(val))["tokens"], next(iter(val))["tokens"])  # each pass restarts


def test_val_none_with_warning_when_too_small(tmp_path):
    cfg = _text_cfg(tmp_path, n=40, val_fraction=0.03)  # 1 short document of val
    with pytest.warns(UserWarning, match="data.val_fraction"):
        train, val, _ = build_data(cfg, seq_len=128, batch_size=4, seed=0)
    assert val is None and train is not None
    assert build_data(_text_cfg(tmp_path, val_fraction=0.0), seq_len=8, batch_size=2, seed=0)[1] is None


def test_stdlib_corpus_present_and_capped():
    total, first = 0, None
    for doc in iter_documents(DataConfig(source="stdlib", max_bytes=None)):
        first = first or doc
        total += len(doc.encode("utf-8"))
        if total > 1_000_000:
            break
    assert total > 1_000_000 and ("import" in first or "def " in first)
    capped = list(iter_documents(DataConfig(source="stdlib", max_bytes=50_000)))
    assert sum(len(d.encode("utf-8")) for d in capped) == 50_000
    cfg = DataConfig(max_bytes=200_000, val_fraction=0.0)
    train, _, tok = build_data(cfg, seq_len=128, batch_size=4, seed=0)
    assert tok.vocab_size == 259 and next(train)["tokens"].shape == (4, 128)


def test_cap_bytes_cuts_inside_multibyte_char_cleanly():
    assert list(cap_bytes(["ab", "", "é日x"], 5)) == ["ab", "é"]  # 2 + 2 bytes; "日" would cross
    assert list(cap_bytes(["abc"], None)) == ["abc"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in _docs(5)) + "\n\n", encoding="utf-8")
    assert list(iter_documents(DataConfig(source="jsonl", paths=[str(path)], jsonl_field="body"))) == _docs(5)


def test_error_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.paths.*nope.txt"):
        iter_documents(DataConfig(source="text", paths=[str(tmp_path / "nope.txt")]))
    with pytest.raises(FileNotFoundError, match="data.paths.*matches no file"):
        iter_documents(DataConfig(source="text", paths=[str(tmp_path / "*.md")]))


def test_error_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.paths file .*bad.jsonl.* line 2 "):
        list(iter_documents(DataConfig(source="jsonl", paths=[str(path)])))
    path.write_text('{"content": "ok"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 .*data.jsonl_field"):
        list(iter_documents(DataConfig(source="jsonl", paths=[str(path)])))


def test_error_seq_len_too_long_for_data(tmp_path):
    cfg = _text_cfg(tmp_path, n=5, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"train.seq_len=4096 .*train.batch_size"):
        build_data(cfg, seq_len=4096, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="parallel.dp=4"):
        PackedBatches(_stream(), seq_len=64, batch_size=16, seed=0, dp_size=4)


def test_bpe_missing_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install tokenizers.*data.tokenizer=byte"):
        build_tokenizer(DataConfig(tokenizer="bpe"), lambda: iter([]))


def test_bpe_tokenizer_trains_caches_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cache = tmp_path / "cache"
    cfg = _text_cfg(corpus, n=60, tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(cache), val_fraction=0.0)
    tok = build_tokenizer(cfg, lambda: iter_documents(cfg))
    n = tok.vocab_size
    assert 259 < n <= 300 and (tok.bos_id, tok.eos_id, tok.pad_id) == (n - 3, n - 2, n - 1)
    text = "doc 3 é✓: cccc 日本語 <|bos|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids.max() < tok.bos_id  # a literal "<|bos|>" is just text
    assert len(list((cache / "tokenizers").glob("bpe-*.json"))) == 1
    train, _, tok2 = build_data(cfg, seq_len=16, batch_size=2, seed=0)  # loads the cached vocabulary
    assert tok2.cache_key == tok.cache_key and np.array_equal(tok2.encode(text), ids)
    again, _, _ = build_data(cfg, seq_len=16, batch_size=2, seed=0)  # reads the cached token stream
    assert len(list((cache / "streams").glob("*.npz"))) == 1
    assert np.array_equal(again.stream.tokens, train.stream.tokens)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(_take(train, 2), _take(again, 2)) for k in x)


def test_doc_mask_defaults_to_document_positions():
    from seqpar.config import DataConfig

    assert DataConfig().doc_mask and DataConfig().position_mode == "document"
    assert DataConfig(doc_mask=False).position_mode == "sequence"
    assert DataConfig(position_ids="sequence").position_mode == "sequence"
    assert DataConfig(pose_target_len=64).position_mode == "sequence"  # PoSE writes its own positions
