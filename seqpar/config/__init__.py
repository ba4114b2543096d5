"""Typed configuration for seqpar: immutable values, validated once, derived values as properties.

Library code takes these frozen dataclasses. The command-line edge (``seqpar/cli.py``) composes the
YAML groups under ``conf/`` (mirroring these classes) with ``key=value`` overrides and builds them, so
every ``__post_init__`` check below runs on the final values. Nothing here writes to a field: a field
holds what the user wrote (``n_kv_heads=None`` stays ``None``) and a property gives the effective value
(``ModelConfig.kv_heads``, ``ModelConfig.ffn_dim``, ``Config.tokenizer_dir``), so a config printed or
saved is the one the user gave, and no later stage can see half-derived state. Values that need files
(an HF checkpoint's shape, the tokenizer's vocabulary) are filled in once, before training, by
``seqpar.train.resolve.resolve_config``, which returns a new Config.

Choice lists come from the modules that implement the choices (one source of truth), and every check
raises :class:`~seqpar.errors.ConfigError` with one sentence that names the field and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from seqpar.config.checks import check
from seqpar.config.data import DataConfig
from seqpar.config.model import LoRAConfig, ModelConfig, check_architecture
from seqpar.config.parallel import DIST_BACKENDS, ParallelConfig
from seqpar.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from seqpar.errors import ConfigError
from seqpar.parallel.layout import required_multiple

# ConfigError is re-exported: tests and users import it from here.
__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DIST_BACKENDS", "LoRAConfig", "LoggingConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig"]


@dataclass(frozen=True)
class Config:
    """The whole run: one frozen value per group, checked across groups here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        check_architecture(self)  # the model options against seq_len, cp, doc_mask, lora (seqpar.models.build)
        check(
            self.data.tokenizer != "hf" or bool(self.tokenizer_dir),
            "data.tokenizer=hf needs data.tokenizer_path or model.init_from "
            "(a Hugging Face checkpoint directory with tokenizer.json).",
        )
        check(
            self.data.pose_target_len == 0 or self.data.pose_target_len >= self.train.seq_len,
            f"data.pose_target_len={self.data.pose_target_len} must be >= train.seq_len={self.train.seq_len} "
            "(PoSE simulates a LONGER target context inside the training window), or 0 to turn PoSE off.",
        )
        check(
            self.layout != "docs" or self.data.doc_mask,
            "parallel.layout=docs balances packed documents under the document mask; set data.doc_mask=true "
            "or pick another parallel.layout (zigzag balances a plain causal mask).",
        )
        check(
            not self.lora.s2_attn or self.parallel.cp == 1,
            "lora.s2_attn=true needs parallel.cp=1: ring attention has no group (document-id) masks yet; "
            "use full attention under ring (lora.s2_attn=false), which LongLoRA's LoRA+ also trains with.",
        )
        if self.lora.s2_attn:
            group = int(self.lora.s2_group_ratio * self.train.seq_len)
            check(
                group >= 2 and group % 2 == 0,
                f"lora.s2_group_ratio={self.lora.s2_group_ratio} x train.seq_len={self.train.seq_len} gives "
                f"S2-Attn groups of {group} tokens; it must be an even number >= 2 (the shift is half a group).",
            )
        check(
            not self.train.deterministic or self.parallel.attention_backend in ("triton", "torch"),
            f"train.deterministic=true needs parallel.attention_backend=triton (or torch), not "
            f"{self.parallel.attention_backend}: the SDPA kernels' backward is not reproducible bit for bit.",
        )
        check(
            self.logging.profile_at <= self.train.steps,
            f"logging.profile_at={self.logging.profile_at} is past train.steps={self.train.steps}: no step would be "
            f"profiled; set logging.profile_at between 1 and {self.train.steps} (0: no profiling).",
        )
        cp, layout = self.parallel.cp, self.layout
        need = required_multiple(cp, layout)  # the layout module's rule, so config and sharding agree
        check(
            self.train.seq_len % need == 0,
            f"train.seq_len={self.train.seq_len} is not divisible by {need} "
            f"(parallel.layout={layout} with cp={cp} needs a multiple of {need}); "
            f"use seq_len={need * max(1, round(self.train.seq_len / need))}.",
        )

    @property
    def layout(self) -> str:
        """The sequence layout the run shards with: ``parallel.layout``, or for ``auto``: ``docs`` when packed
        documents train under the document mask on ``cp > 1`` with dense attention and a mode that takes it (it
        balances the documents' cost over the ring: on 2 x H200 at 128k, zigzag left one rank 2.4x the attention
        time of the other), ``contiguous`` for MEGALODON (its state passes rank to rank), else ``zigzag``."""
        p, m = self.parallel, self.model
        if p.layout != "auto":
            return p.layout
        if p.cp > 1 and m.arch == "megalodon":
            return "contiguous"
        if (p.cp > 1 and self.data.doc_mask and m.arch == "llama" and m.attention == "dense"
                and p.cp_comm != "hybrid" and self.train.seq_len % required_multiple(p.cp, "docs") == 0):
            return "docs"
        return "zigzag"

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """For ``data.tokenizer=hf``: the directory whose tokenizer.json is read, ``data.tokenizer_path``
        or else the checkpoint being extended (``model.init_from``); None for the other tokenizers."""
        if self.data.tokenizer != "hf":
            return None
        return self.data.tokenizer_path or self.model.init_from
