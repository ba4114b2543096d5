"""Data pipeline: corpus -> tokenizer -> packed rows -> per-dp-rank batches.

The trainer calls :func:`build_data`; the rest is exported for tests, tools and notebooks.
"""
from seqpar.data.corpus import corpus_fingerprint, iter_documents, resolve_paths, stdlib_documents
from seqpar.data.packing import (
    IGNORE_INDEX,
    PackedBatches,
    TokenStream,
    build_data,
    pack_documents,
    split_documents,
)
from seqpar.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    checkpoint_tokenizer,
    encode_corpus,
    encode_documents,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "IGNORE_INDEX",
    "PackedBatches",
    "TokenStream",
    "build_data",
    "build_tokenizer",
    "checkpoint_tokenizer",
    "corpus_fingerprint",
    "encode_corpus",
    "encode_documents",
    "iter_documents",
    "pack_documents",
    "resolve_paths",
    "split_documents",
    "stdlib_documents",
]
