"""Packing documents into fixed-length rows, and the resumable data-parallel batch iterator.

The stream is ``[BOS] doc_0 [EOS] [BOS] doc_1 [EOS] ...`` as one int32 array. Row ``i`` is the
window ``stream[i*S : i*S + S + 1]`` (S = seq_len): inputs ``row[:-1]``, targets ``row[1:]``.
Consecutive rows share one boundary token, so every token of the stream (bar the last ``N-1 mod S``
ones) is a target exactly once. A target that is a BOS gets label ``-100``: nothing in a document
predicts which document comes next. Every batch carries ``doc_ids`` (the GLOBAL ``[B, S]`` ids of
the row, non-decreasing): under ``data.doc_mask=true`` (the default, as Llama 3 trains) the trainer
hands them to the model, which masks attention at document boundaries, and positions restart at 0 in
each document (``data.position_ids=auto``); ``false`` lets a row attend across its documents.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from seqpar.config import ConfigError, DataConfig
from seqpar.data.corpus import iter_documents
from seqpar.data.tokenizer import BPETokenizer, ByteTokenizer, build_tokenizer, encode_corpus

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
# The train/val split uses this fixed seed, not train.seed, so that runs with different seeds are
# evaluated on the same documents and their val losses compare.
SPLIT_SEED = 20240613


@dataclass
class TokenStream:
    """Documents concatenated as ``[BOS] + tokens + [EOS]``.

    tokens: ``[N]`` int32; doc_starts: ``[D]`` int64, ascending index of each document's BOS
    (``doc_starts[0] == 0``); bos_id: the id at every ``doc_starts`` entry.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    bos_id: int

    def num_rows(self, seq_len: int) -> int:
        """Rows of ``seq_len + 1`` tokens (overlapping by one) that fit in the stream."""
        return max(0, (len(self.tokens) - 1) // seq_len)


def pack_documents(docs: Sequence[np.ndarray], bos_id: int, eos_id: int) -> TokenStream:
    """Concatenate token arrays ``docs[d]`` ``[n_d]`` into one :class:`TokenStream` (one copy each)."""
    lengths = np.fromiter((len(d) + 2 for d in docs), dtype=np.int64, count=len(docs))  # [D] with BOS/EOS
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    tokens[starts] = bos_id
    tokens[starts + lengths - 1] = eos_id
    for start, doc in zip(starts.tolist(), docs):
        tokens[start + 1 : start + 1 + len(doc)] = doc
    return TokenStream(tokens, starts, bos_id)


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint document indices ``(train_order, val_order)`` covering ``range(num_docs)``.

    The val set (``round(val_fraction * num_docs)`` documents, at least 1 when ``val_fraction > 0``
    and at least 1 left for train) depends only on ``num_docs``; train order is shuffled by ``seed``.
    Val keeps corpus order. The split counts documents, not tokens, so the val share of tokens varies.
    """
    n_val = 0
    if val_fraction > 0 and num_docs > 1:
        n_val = min(num_docs - 1, max(1, round(val_fraction * num_docs)))
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    val = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:])
    return train[np.random.default_rng(seed).permutation(len(train))], val


class PackedBatches:
    """Batches of packed rows for one data-parallel rank; resumable through ``state_dict``.

    Each epoch visits the rows in an order shuffled by ``(seed, epoch)``; global batch ``k`` is rows
    ``order[k*G : (k+1)*G]`` with ``G = batch_size * dp_size``, of which rank ``r`` takes every
    ``dp_size``-th from ``r``. The last ``num_rows mod G`` rows of an epoch's order are skipped
    (different ones each epoch). ``epoch``/``step`` are the same on every rank.

    Yields dicts of int64 tensors, each ``[batch_size, seq_len]``:
      tokens, labels (-100 where the target is a BOS), positions (``"sequence"``: 0..S-1;
      ``"document"``: offset inside the token's document, 0 at its BOS, carried across rows),
      doc_ids (index of the token's document in the stream).

    ``loop=True`` (train) runs forever. ``loop=False`` (val) stops after one epoch, and ``iter()``
    on it restarts from the first batch, so ``islice(val, n)`` sees the same n batches every eval.
    """

    def __init__(
        self,
        stream: TokenStream,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        loop: bool = True,
        position_ids: str = "sequence",
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        if position_ids not in ("sequence", "document"):
            raise ValueError(f"data.position_ids={position_ids!r} must be 'sequence' or 'document'.")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.dp_rank, self.dp_size, self.loop, self.position_ids = dp_rank, dp_size, loop, position_ids
        self.global_batch = batch_size * dp_size
        self.num_rows = stream.num_rows(seq_len)
        if self.num_rows < self.global_batch:
            need = self.global_batch * seq_len + 1
            raise ConfigError(
                f"train.seq_len={seq_len} x train.batch_size={batch_size} x parallel.dp={dp_size} needs {need:,} "
                f"tokens but the data has {len(stream.tokens):,}; lower train.seq_len or "
                "train.batch_size, or give more data (data.paths, data.max_bytes)."
            )
        self.steps_per_epoch = self.num_rows // self.global_batch
        self.epoch, self.step = 0, 0
        self._order: Optional[np.ndarray] = None  # row order of self._order_epoch
        self._order_epoch = -1

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def __iter__(self) -> "PackedBatches":
        if not self.loop:
            self.reset()
        return self

    def reset(self) -> None:
        """Go back to the first batch of epoch 0."""
        self.epoch, self.step = 0, 0

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            if not self.loop:
                raise StopIteration
            self.epoch, self.step = self.epoch + 1, 0
        g = self.global_batch
        rows = self._epoch_order()[self.step * g : (self.step + 1) * g][self.dp_rank :: self.dp_size]  # [B]
        self.step += 1
        return self.make_batch(rows)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            # Seeded by the pair, not seed + epoch, so run seed=1 epoch 1 != run seed=2 epoch 0.
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_rows)
            self._order_epoch = self.epoch
        return self._order

    def make_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors ``[len(rows), seq_len]`` for the given row indices (see the class docstring)."""
        s = self.seq_len
        idx = np.asarray(rows, dtype=np.int64)[:, None] * s + np.arange(s + 1)  # [B, S+1] stream indices
        window = self.stream.tokens[idx].astype(np.int64)  # [B, S+1]
        labels = window[:, 1:].copy()  # [B, S]
        labels[labels == self.stream.bos_id] = IGNORE_INDEX
        doc_ids = np.searchsorted(self.stream.doc_starts, idx[:, :-1], side="right") - 1  # [B, S]
        if self.position_ids == "document":
            positions = idx[:, :-1] - self.stream.doc_starts[doc_ids]
        else:
            positions = np.tile(np.arange(s, dtype=np.int64), (len(idx), 1))  # writable, unlike broadcast_to
        out = {"tokens": window[:, :-1], "labels": labels, "positions": positions, "doc_ids": doc_ids}
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in out.items()}

    def state_dict(self) -> dict:
        """Position in the stream (identical on all dp ranks) plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "dp_size": self.dp_size,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off.

        Raises:
            ConfigError: the state was saved with another seed, shape, dp size or corpus (a run directory
                whose config.yaml could not say so first, e.g. one written by an older seqpar).
        """
        names = {"seed": "train.seed", "seq_len": "train.seq_len", "batch_size": "train.batch_size",
                 "dp_size": "parallel.dp", "num_rows": "the data config (data.*)"}
        for key, name in names.items():
            if state[key] != getattr(self, key):
                keep = (f", or keep these weights and restart the data stream with checkpoint.allow_changes=[{name}]"
                        if name.startswith("train.") else "")
                raise ConfigError(
                    f"cannot resume this run's data stream: {name} gives {key}={getattr(self, key)} but the "
                    f"checkpoint was saved with {state[key]}; resume with the same value, give the new run its own "
                    f"logging.run_dir{keep}.")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def build_data(
    cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
    tokenizer=None,
) -> tuple[PackedBatches, Optional[PackedBatches], Union[ByteTokenizer, BPETokenizer]]:
    """Read, tokenize, split and pack the corpus ``cfg`` names; the trainer's one data entry point.

    Every rank builds the same streams (deterministic) and takes its own rows, so no communication.

    Args:
        cfg: data config. seq_len: tokens per row (global, before context-parallel sharding).
        batch_size: rows per dp rank per step. seed: train row/document order.
        dp_rank, dp_size: this rank's data-parallel coordinate.
        tokenizer: one already built for ``cfg`` (``seqpar.train.resolve.load_tokenizer``, which the
            config's resolution built to learn the vocabulary); None: build it here.
    Returns:
        ``(train, val, tokenizer)``: ``train`` loops forever; ``val`` makes one pass per ``iter()``
        and is ``None`` when ``val_fraction == 0`` or the val split cannot fill one global batch
        (a warning says so).
    Raises:
        ConfigError: the train split cannot fill one global batch (message names the fix);
        FileNotFoundError / ValueError: from the corpus (missing path, bad jsonl line).
    """
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, lambda: iter_documents(cfg))
    docs = encode_corpus(tokenizer, lambda: iter_documents(cfg), cfg.cache_dir)
    if not docs:
        raise ConfigError(f"data.source={cfg.source} yielded no non-empty document; check data.paths.")
    train_order, val_order = split_documents(len(docs), cfg.val_fraction, seed)

    def pack(order: np.ndarray) -> TokenStream:
        return pack_documents([docs[i] for i in order], tokenizer.bos_id, tokenizer.eos_id)

    kw = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    train = PackedBatches(pack(train_order), loop=True, position_ids=cfg.position_mode, **kw)
    val = None
    if len(val_order) > 0:
        val_stream = pack(val_order)
        if val_stream.num_rows(seq_len) >= batch_size * dp_size:
            val = PackedBatches(val_stream, loop=False, position_ids=cfg.position_mode, **kw)
        else:
            need = batch_size * dp_size * seq_len + 1
            warnings.warn(
                f"data.val_fraction={cfg.val_fraction} gives the val split {len(val_stream.tokens):,} tokens, "
                f"fewer than one global batch needs ({need:,}); validation is off: raise data.val_fraction.",
                stacklevel=2,
            )
    return train, val, tokenizer
