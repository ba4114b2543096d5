"""``build_model(model_cfg)``: every architecture option behind the Llama interface.

``model.attention`` picks how a token attends, ``model.arch`` the block architecture; each returns a
:class:`~seqpar.models.llama.Llama` (or a subclass) with ``forward(tokens, positions, *, doc_ids) -> hidden``,
``logits(hidden)`` and ``loss(hidden, labels)``, so the trainer, evaluation and tests treat them alike.

* ``dense``: the Llama model as it is (causal softmax attention, ``model.window``/``model.sinks`` as set).
* ``longformer``, ``bigbird``, ``blocksparse``: masks (:mod:`seqpar.models.sparse_patterns`) on the same
  attention kernels and the ring: no attention code of their own, any ``parallel.cp``.
* ``performer`` (:mod:`seqpar.models.performer`), ``linformer`` (:mod:`seqpar.models.linformer`), ``reformer``
  (:mod:`seqpar.models.reformer`: LSH attention only),
  ``arch=infini`` (:mod:`seqpar.models.infini`): their own attention modules, one process per sequence (cp=1).
* ``arch=megalodon`` (:mod:`seqpar.models.megalodon`): its own blocks (CEMA, timestep norm, chunk-wise attention
  through the injected ``attn_fn`` under a Mask), one process per sequence (cp=1).

The choice lists live in :mod:`seqpar.models.options` (``seqpar.config`` validates against them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from seqpar.config import ModelConfig
    from seqpar.models.llama import AttnFn, Llama

from seqpar.models.options import ARCHS, ATTENTIONS, MASK_ATTENTIONS  # noqa: F401  (re-exported)


def build_model(model_cfg: ModelConfig, attn_fn: Optional[AttnFn] = None, *, cp: int = 1) -> Llama:
    """The model ``model_cfg`` describes.

    Args:
        model_cfg: the ``model`` section (``vocab_size`` set).
        attn_fn: the softmax attention to inject (``seqpar.ops.attention`` when None; ring attention under
            cp); Performer and Linformer use it not at all / for their projected keys, Infini-attention for
            the local attention inside each segment.
        cp: how many ranks share one sequence (block-sparse layouts span the GLOBAL length ``S_local * cp``).

    Raises:
        ConfigError: an option that cannot be built as asked (also raised by ``ModelConfig`` itself).
    """
    from seqpar.models.llama import Llama

    c = model_cfg
    if c.arch == "megalodon":
        from seqpar.models.megalodon import Megalodon

        return Megalodon(c, attn_fn)
    if c.arch == "infini":
        from seqpar.models.infini import InfiniLlama

        return InfiniLlama(c, attn_fn)
    if c.attention == "performer":
        from seqpar.models.performer import PerformerLlama

        return PerformerLlama(c, attn_fn)
    if c.attention == "reformer":
        from seqpar.models.reformer import ReformerLlama

        return ReformerLlama(c, attn_fn)
    if c.attention == "linformer":
        from seqpar.models.linformer import LinformerLlama

        return LinformerLlama(c, attn_fn)
    if c.attention == "dense" and c.causal:
        return Llama(c, attn_fn)
    from seqpar.models.sparse_patterns import MaskedLlama

    return MaskedLlama(c, attn_fn, cp=cp)
