"""The ``data`` section: where tokens come from, how they are tokenized, packed and masked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from seqpar.config.checks import check, check_choice, check_positive

@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. ``source=stdlib`` is the embedded corpus (no download)."""

    source: str = "stdlib"  # stdlib | text | jsonl
    paths: List[str] = field(default_factory=list)  # files or globs for text / jsonl
    jsonl_field: str = "text"
    tokenizer: str = "byte"  # byte | bpe | hf (a checkpoint's tokenizer.json)
    tokenizer_path: Optional[str] = None  # hf: dir with tokenizer.json (None: model.init_from; Config.tokenizer_dir)
    bpe_vocab_size: int = 4096
    cache_dir: str = "~/.cache/seqpar"
    val_fraction: float = 0.01
    # sequence: 0..S-1 per packed row; document: reset at each document; auto: see `position_mode`
    position_ids: str = "auto"
    # Mask attention at document boundaries of the packed rows (Llama 3); false: a row attends across documents.
    doc_mask: bool = True
    max_bytes: Optional[int] = None  # cap on corpus size read (None: all)
    # PoSE (seqpar.data.pose): train windows of train.seq_len whose position ids skip to cover
    # pose_target_len (0: off) in pose_chunks contiguous chunks. Needs position_ids=sequence.
    pose_target_len: int = 0
    pose_chunks: int = 2

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("stdlib", "text", "jsonl"))
        check(self.pose_target_len >= 0, f"data.pose_target_len={self.pose_target_len} must be >= 0 (0: off).")
        check(self.pose_chunks >= 1, f"data.pose_chunks={self.pose_chunks} must be >= 1.")
        check(
            self.pose_target_len == 0 or self.position_ids in ("auto", "sequence"),
            "data.pose_target_len > 0 (PoSE) needs data.position_ids=sequence: PoSE rewrites the row's positions.",
        )
        check_choice("data.tokenizer", self.tokenizer, ("byte", "bpe", "hf"))
        check_choice("data.position_ids", self.position_ids, ("auto", "sequence", "document"))
        check(isinstance(self.doc_mask, bool), f"data.doc_mask={self.doc_mask!r} must be true or false.")
        check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in [0, 1).")
        check(
            self.source == "stdlib" or len(self.paths) > 0,
            f"data.source={self.source} needs data.paths (a list of files or globs), e.g. data.paths=[corpus.txt].",
        )
        check(self.bpe_vocab_size >= 260, f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 260.")
        if self.max_bytes is not None:
            check_positive("data.max_bytes", self.max_bytes)

    @property
    def position_mode(self) -> str:
        """``position_ids`` with ``auto`` resolved: document under doc_mask (Llama 3) unless PoSE, else sequence."""
        if self.position_ids != "auto":
            return self.position_ids
        return "document" if self.doc_mask and self.pose_target_len == 0 else "sequence"
