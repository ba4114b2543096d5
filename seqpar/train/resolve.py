"""Resolve a Config once, before training: the values that need files, filled in one place.

Two model fields cannot be known from the YAML alone:

* ``model.init_from``: a Hugging Face checkpoint's ``config.json`` fixes the shape (dim, layers, heads,
  vocabulary, rope_theta); the user's ``rope_scaling`` / ``max_position_embeddings`` are kept
  (:func:`seqpar.models.hf.resolve_init_from`);
* ``model.vocab_size=None``: the tokenizer's size rounded up to 64, or, when given, a check that it
  covers every tokenizer id.

:func:`resolve_config` returns a NEW fully-resolved :class:`Config` (configs are frozen); ``train.py``
calls it before the mesh exists (a dry run too), and it is what ``<run_dir>/config.yaml`` records
(:func:`write_config`), which ``seqpar.eval`` reads back. It is idempotent, so the Trainer can apply it
to a config built in code without changing a resolved one; nothing after it rewrites the config.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from seqpar.config import Config, ModelConfig
from seqpar.data.corpus import iter_documents
from seqpar.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from seqpar.errors import ConfigError

def load_tokenizer(cfg: Config):
    """The tokenizer ``cfg`` names: byte, BPE (trained once per corpus and cached on disk under
    ``data.cache_dir``, so a second call loads the file) or the ``tokenizer.json`` in
    :attr:`Config.tokenizer_dir`.

    Raises:
        FileNotFoundError: a missing corpus file or tokenizer.json (the message names the key to fix).
        ImportError: ``bpe`` / ``hf`` without the ``tokenizers`` package.
    """
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()  # nothing to read
    return build_tokenizer(cfg.data, lambda: iter_documents(cfg.data), directory=cfg.tokenizer_dir)


def _tokenizer_vocab(cfg: Config) -> int:
    """The number of ids the run's tokenizer produces."""
    if not cfg.train.dry_run:
        return load_tokenizer(cfg).vocab_size
    # A dry run reads no corpus and trains nothing: it sizes a cluster run from a login node.
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer().vocab_size
    if cfg.data.tokenizer == "hf":
        return HFTokenizer(os.path.expanduser(cfg.tokenizer_dir)).vocab_size
    return cfg.data.bpe_vocab_size  # BPE trains to at most this many ids, specials included


def resolve_vocab(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """``model`` with ``vocab_size`` covering ``tokenizer_vocab`` ids.

    ``vocab_size=None`` becomes ``tokenizer_vocab`` rounded up to a multiple of 64 (a tensor-core
    friendly output projection); a given one is checked. Raises ConfigError naming ``model.vocab_size``.
    """
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=64 * math.ceil(tokenizer_vocab / 64))
    if model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} ids; set model.vocab_size=null (automatic) or >= {tokenizer_vocab}.")
    return model


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with the HF checkpoint's shape (``model.init_from``) and the vocabulary filled in.

    Returns ``cfg`` itself when nothing changes (an already resolved config), else a new Config.
    Raises ConfigError (HFCheckpointError is one) naming the field or file; FileNotFoundError for a
    missing corpus file or tokenizer.json.
    """
    model = cfg.model
    if model.init_from:  # context extension: the checkpoint's config.json fixes the shape
        from seqpar.models.hf import resolve_init_from

        model = resolve_init_from(model)
    model = resolve_vocab(model, _tokenizer_vocab(cfg))
    return cfg if model == cfg.model else dataclasses.replace(cfg, model=model)


def write_config(cfg: Config, run_dir: Optional[str] = None) -> str:
    """Write ``cfg`` as ``<run_dir>/config.yaml`` (default ``logging.run_dir``): every field by its YAML
    key, the user's values plus what :func:`resolve_config` filled in, atomically (tmp + rename). ``seqpar.eval``
    reads it back (``seqpar.cli.load_config_file``). The trainer writes it only after
    :func:`seqpar.train.run_dir.check_same_run` agreed. Returns the path."""
    import yaml

    run_dir = run_dir or cfg.logging.run_dir
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = f"{path}.tmp{os.getpid()}"  # written whole, then renamed: a reader never sees half a file
    with open(tmp, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
