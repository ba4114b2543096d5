"""Tokenizers with one interface: ``encode(str) -> int32 array``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``.

``ByteTokenizer`` needs nothing and is exact for any text. ``BPETokenizer`` wraps Hugging Face
``tokenizers`` (optional dependency, imported lazily), trained on the corpus and cached as JSON.
``HFTokenizer`` is a pretrained checkpoint's ``tokenizer.json``. A run's tokenizer comes from its
config (:func:`build_tokenizer`), a checkpoint directory's from :func:`checkpoint_tokenizer`.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from seqpar.config import DataConfig
from seqpar.data.corpus import corpus_fingerprint


def _as_int_list(ids) -> list[int]:
    """Accept a list, numpy array or torch tensor of ids (any integer dtype)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258; ``vocab_size`` = 259.

    PAD is never produced by the packer (rows are cut from a continuous stream); it is reserved so
    that callers padding variable-length prompts (generation, eval) have an id the model knows.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ids ``[len(text.encode('utf-8'))]`` int32, no special tokens added."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` on each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """ids (list/array/tensor) -> text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        arr = np.asarray(_as_int_list(ids), dtype=np.int64)
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# Bump when the training recipe below changes, so stale cached vocabularies are not reused.
_BPE_RECIPE_VERSION = "1"


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ImportError(
            "data.tokenizer=bpe/hf needs the Hugging Face 'tokenizers' package; "
            "run `pip install tokenizers` (or `pip install seqpar[bpe]`), or set data.tokenizer=byte."
        ) from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) backed by a ``tokenizers.Tokenizer``.

    Byte-level means every string is encodable (no unknown token) and decode(encode(s)) == s.
    BOS, EOS, PAD are the three ids after the learned vocabulary and live only here, not in the HF
    tokenizer: registered there, a literal "<|bos|>" in the corpus would be encoded as a real BOS.
    """

    def __init__(self, tokenizer, cache_key: Optional[str] = None) -> None:
        self._tok = tokenizer
        self._base = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self._base, self._base + 1, self._base + 2
        self.cache_key = cache_key  # names the pretokenized-stream cache (see encode_corpus)

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train a byte-level BPE of at most ``vocab_size`` ids, specials included."""
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size - 3,  # room for BOS, EOS, PAD
            # All 256 byte symbols up front, so text unseen in training still encodes.
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Load a tokenizer saved by :meth:`save`; ``cache_key`` hashes the file's bytes."""
        tk = _import_tokenizers()
        raw = Path(path).read_bytes()
        # Keyed by content, not name: a retrained vocabulary must not reuse a stale encoded stream.
        return cls(tk.Tokenizer.from_str(raw.decode("utf-8")), cache_key=hashlib.sha256(raw).hexdigest()[:16])

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON atomically (concurrent ranks may save the same file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self._base + 3

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ids ``[n]`` int32, no special tokens added."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` on each text, in parallel threads inside ``tokenizers``."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        """ids (list/array/tensor) -> text; special ids are dropped."""
        return self._tok.decode([i for i in _as_int_list(ids) if 0 <= i < self._base])


class HFTokenizer:
    """The ``tokenizer.json`` of a Hugging Face checkpoint directory, for extending a pretrained model.

    BOS/EOS are the checkpoint's own (``config.json``'s ``bos_token_id``/``eos_token_id``, else the
    ``tokenizer_config.json`` token strings), so packed documents look like the model's pretraining.
    """

    def __init__(self, directory: str):
        tk = _import_tokenizers()
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.tokenizer=hf needs {path}; point data.tokenizer_path (or model.init_from) "
                                    "at a Hugging Face checkpoint directory that has tokenizer.json.")
        self._tok = tk.Tokenizer.from_file(path)
        raw = Path(path).read_bytes()
        self.cache_key = hashlib.sha256(raw).hexdigest()[:16]
        self.bos_id, self.eos_id = self._special_ids(directory)
        self.pad_id = self.eos_id

    def _special_ids(self, directory: str) -> tuple[int, int]:
        model_cfg = _read_json(os.path.join(directory, "config.json"))
        tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
        ids = {}
        for name in ("bos", "eos"):
            v = model_cfg.get(f"{name}_token_id")
            ids[name] = v[0] if isinstance(v, list) and v else v
            if ids[name] is None:  # else the token string tokenizer_config.json names
                tok = tok_cfg.get(f"{name}_token")
                tok = tok.get("content") if isinstance(tok, dict) else tok
                ids[name] = self._tok.token_to_id(tok) if isinstance(tok, str) else None
        missing = [n for n in ("bos", "eos") if ids[n] is None]
        if missing:
            raise ValueError(f"{directory}: no {' / '.join(missing)} token id in config.json or tokenizer_config.json "
                             "(data.tokenizer=hf and evaluation pack documents with them); add bos_token_id and "
                             "eos_token_id to config.json.")
        return int(ids["bos"]), int(ids["eos"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # encode / encode_batch: BPETokenizer's (both wrap a tokenizers.Tokenizer in self._tok).
    encode = BPETokenizer.encode
    encode_batch = BPETokenizer.encode_batch

    def decode(self, ids) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=True)


def _read_json(path: str) -> dict:
    """The JSON object in ``path``, or ``{}`` when there is no such file (HF side files are optional)."""
    import json

    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def checkpoint_tokenizer(directory: str):
    """The tokenizer a Hugging Face checkpoint directory carries, for evaluating or exporting it.

    ``tokenizer.json`` present: :class:`HFTokenizer` (with the checkpoint's BOS/EOS, as ``data.tokenizer=hf``
    trains with). Absent: :class:`ByteTokenizer`, the tokenizer of a byte-level seqpar run exported by
    ``seqpar.eval.export`` (which has no tokenizer.json to write). Raises ImportError without the
    ``tokenizers`` package when tokenizer.json is there; ValueError when its BOS/EOS ids are unknown.
    """
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(directory)
    return ByteTokenizer()


def bpe_cache_path(cfg: DataConfig, corpus_id: str) -> Path:
    """``<cache_dir>/tokenizers/bpe-<hash>.json``, keyed by corpus identity, vocab size and recipe."""
    key = hashlib.sha256(f"{corpus_id}|{cfg.bpe_vocab_size}|{_BPE_RECIPE_VERSION}".encode()).hexdigest()[:16]
    return Path(os.path.expanduser(cfg.cache_dir)) / "tokenizers" / f"bpe-{key}.json"


def build_tokenizer(cfg: DataConfig, documents_fn: Callable[[], Iterator[str]], directory: Optional[str] = None):
    """The tokenizer ``cfg.tokenizer`` names.

    Args:
        cfg: data config; for ``bpe``, ``bpe_vocab_size`` and ``cache_dir`` are used.
        documents_fn: zero-argument callable returning the corpus documents; called only when a BPE
            vocabulary must be trained (cache miss), by one process per ``cache_dir``. The tokenizer
            sees the val documents too, as is usual; it learns merges, not the val loss.
        directory: for ``hf``, the checkpoint directory with tokenizer.json (``Config.tokenizer_dir``:
            ``data.tokenizer_path``, else ``model.init_from``); None: ``data.tokenizer_path``.
    Returns:
        ``ByteTokenizer``, ``BPETokenizer`` or ``HFTokenizer``.
    Raises:
        ImportError: ``bpe`` without the ``tokenizers`` package (message says how to fix).
        TimeoutError: another process held the training lock for over an hour (stale lock file).
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "hf":
        tok = HFTokenizer(os.path.expanduser(directory or cfg.tokenizer_path))
        # The encoded-stream cache is keyed by vocabulary AND corpus (BPE's key gets the corpus through
        # its file name; here the vocabulary comes from the checkpoint, so add the corpus explicitly).
        tok.cache_key = hashlib.sha256(f"{tok.cache_key}|{corpus_fingerprint(cfg)}".encode()).hexdigest()[:16]
        return tok
    _import_tokenizers()  # fail before any corpus work

    path = bpe_cache_path(cfg, corpus_fingerprint(cfg))
    _train_once(path, lambda: BPETokenizer.train(documents_fn(), cfg.bpe_vocab_size))
    # Everyone loads the file, the trainer too: all ranks must use byte-identical vocabularies, and
    # HF BPE training is not guaranteed deterministic (tokenizers issue #1794).
    return BPETokenizer.load(path)


def _train_once(path: Path, train_fn: Callable[[], BPETokenizer], timeout_s: float = 3600.0) -> None:
    """Make ``path`` exist, training at most once across the processes that share ``cache_dir``.

    An ``O_EXCL`` lock file elects the trainer; the others poll for the finished JSON. (Nodes that
    do not share ``cache_dir`` each train their own: point data.cache_dir at a shared filesystem.)
    """
    lock = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:.0f}s for {path} while {lock} exists; if no other run is training "
                    "this BPE tokenizer (data.cache_dir), delete the lock file and retry."
                ) from None
            time.sleep(0.2)
            continue
        try:
            if not path.is_file():  # another process may have finished between our check and the lock
                train_fn().save(path)
        finally:
            os.close(fd)
            os.unlink(lock)


def encode_documents(tokenizer, documents: Iterable[str], chunk: int = 256) -> list[np.ndarray]:
    """Token arrays ``[n_d]`` int32 per document; batched so BPE can use its thread pool."""
    out: list[np.ndarray] = []
    buf: list[str] = []
    for doc in documents:
        buf.append(doc)
        if len(buf) == chunk:
            out.extend(tokenizer.encode_batch(buf))
            buf = []
    if buf:
        out.extend(tokenizer.encode_batch(buf))
    return out


def encode_corpus(
    tokenizer, documents_fn: Callable[[], Iterator[str]], cache_dir: Optional[str]
) -> list[np.ndarray]:
    """:func:`encode_documents` over ``documents_fn()``, cached for tokenizers with a ``cache_key``.

    BPE encodes ~1 MB/s per core (the stdlib corpus: ~10 s on 2 cores), so its token stream is kept
    in ``<cache_dir>/streams/<cache_key>.npz``; the key hashes the vocabulary file, whose name hashes
    the corpus. Byte
    encoding is faster than reading such a cache, so it is never cached.
    """
    key = getattr(tokenizer, "cache_key", None)
    if key is None or cache_dir is None:
        return encode_documents(tokenizer, documents_fn())
    path = Path(os.path.expanduser(cache_dir)) / "streams" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            flat, lengths = z["tokens"], z["lengths"]
        return np.split(flat, np.cumsum(lengths)[:-1])
    docs = encode_documents(tokenizer, documents_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the tmp name
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        np.savez(f, tokens=flat, lengths=np.array([len(d) for d in docs], dtype=np.int64))
    os.replace(tmp, path)  # atomic: ranks racing on a cold cache write identical files
    return docs
