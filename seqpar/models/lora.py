"""LoRA adapters for LongLoRA-style context extension (Hu et al. 2021; Chen et al. 2023).

:func:`apply_lora` swaps the targeted ``nn.Linear`` projections of a :class:`~seqpar.models.llama.Llama`
for :class:`LoRALinear` (same ``weight`` Parameter, so state-dict keys, checkpoints and the HF name map
are unchanged; adapters add ``<name>.lora_A`` / ``<name>.lora_B``) and freezes everything but the
adapters and, as LongLoRA found necessary for long contexts, optionally the embeddings and norms.

``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with ``A [r, in]`` (Kaiming-uniform, as PEFT) and
``B [out, r]`` (zeros), so a freshly adapted model computes exactly what the base model did.
:func:`merge_lora` folds ``(alpha / r) B A`` into ``W`` for export/inference; :func:`unmerge_lora`
takes it back out to continue training.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import ConfigError, LoRAConfig
from seqpar.models.llama import RMSNorm

_ATTENTION = ("wq", "wk", "wv", "wo")
_FFN = ("w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``(alpha / rank) * B @ A``.

    Args: in_features, out_features, bias as ``nn.Linear``; rank ``r > 0``; alpha: scale numerator;
    dropout: on the adapter's input only. Shapes: x ``[..., in]`` -> ``[..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise ValueError(f"LoRA rank={rank} must be > 0 (lora.rank).")
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing layer, SHARING its weight/bias Parameters (no copy of the base weight)."""
        w = linear.weight
        # Build on meta (no allocation of a throwaway base weight), then adopt the real Parameters.
        new = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None,
                  device="meta", dtype=w.dtype)
        new.weight = w
        new.bias = linear.bias
        new.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=w.dtype))
        new.reset_lora_parameters()
        return new

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as nn.Linear/PEFT, B = 0: the update starts at exactly zero.
        Also the re-init path after ``to_empty`` for a model adapted on the meta device."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) * B @ A``: ``[out, in]``, the update :meth:`merge` adds to ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:
            return y
        # Two thin matmuls ([..., in] -> [..., r] -> [..., out]) instead of materialising B @ A.
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (idempotent); forward then skips the adapter."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (idempotent), up to float rounding of ``weight``'s dtype."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _named_targets(model: nn.Module, targets: Iterable[str]):
    """``(parent_module, attr_name)`` of every targeted projection of every layer."""
    for layer in model.layers:
        for name in targets:
            if name in _ATTENTION:
                yield layer.attention, name
            elif name in _FFN:
                yield layer.feed_forward, name
            else:
                raise ConfigError(f"lora.targets has {name!r}; pick from {list(_ATTENTION + _FFN)}.")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Adapt ``model`` in place for LoRA fine-tuning and return the trainable parameters.

    With ``cfg.rank == 0`` nothing changes and every parameter is returned (full fine-tuning).
    Otherwise every ``cfg.targets`` projection becomes a :class:`LoRALinear`, all parameters are
    frozen except the adapters, ``tok_embeddings`` (``cfg.train_embeddings``; with tied embeddings
    that is also the LM head) and every RMSNorm weight (``cfg.train_norms``).

    Call before wrapping with FSDP/DDP and before building the optimizer (and before loading a
    checkpoint that contains adapters). Raises ConfigError when the model is already adapted.
    """
    if cfg.rank == 0:
        return [p for p in model.parameters() if p.requires_grad]
    for parent, name in _named_targets(model, cfg.targets):
        lin = getattr(parent, name)
        if isinstance(lin, LoRALinear):
            raise ConfigError("apply_lora was called on a model that already has LoRA adapters.")
        setattr(parent, name, LoRALinear.from_linear(lin, cfg.rank, cfg.alpha, cfg.dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        elif cfg.train_norms and isinstance(module, RMSNorm):
            module.weight.requires_grad_(True)
    if cfg.train_embeddings:
        model.tok_embeddings.weight.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (export, inference speed)."""
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight (resume training)."""
    for m in lora_layers(model):
        m.unmerge()


def reset_lora(model: nn.Module) -> None:
    """Re-initialise every adapter (after ``to_empty`` when LoRA was applied on the meta device)."""
    for m in lora_layers(model):
        m.reset_lora_parameters()


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in and no ``lora_*`` keys, computed
    out of place (the model is left as it is): what an exporter writes.

    ``dtype``: cast floating tensors (None keeps them). Keys are those of the un-adapted model.
    """
    state = {}
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if leaf == "weight" and module_name in lora and not lora[module_name].merged:
            value = value + lora[module_name].delta_weight().to(value.dtype)
        state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return state


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that training changes (adapters, and embeddings/norms when trainable): a small
    adapter checkpoint to ship on top of the base model."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}
