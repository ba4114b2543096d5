"""Sparse attention patterns as masks: Longformer, BigBird, Sparse Transformer "fixed".

Each pattern is a :class:`~seqpar.ops.Mask`, so it runs on the reference and Triton kernels (tile skipping
from the block layout) and through ring attention (``ring_plan`` skips invisible ring steps) with no attention
code of its own. The Mask rule is ``documents AND causal AND (window OR sink) AND block_sparse``; what each
paper's pattern becomes under it:

* **Longformer** (Beltagy et al. 2020, Sec. 3.1, "Sliding Window" + "Global Attention"): keys at most ``w`` back
  = ``Mask(window=w)``. A global token sees every key and is seen by every query. In a causal LM a global
  token at the start of a document is exactly a *sink* (seen by every later query of its document; its own row
  is full because everything before it is inside the sinks), so ``model.sinks=g`` gives g global tokens per
  document, exact at token level. NOT expressible: global tokens elsewhere (a column of keys visible from
  outside their window AND a full row, while the window stays token-level: the Mask intersects block_sparse
  with the window instead of uniting them), and bidirectional global tokens (a global row must see keys to
  its right past the window): ``ModelConfig`` refuses the latter; for the former use ``bigbird`` (global
  blocks) at block granularity. Dilated windows (Sec. 3.1) are not built.
* **BigBird** (Zaheer et al. 2020, Sec. 2 and App. D, "blockified" BIGBIRD-ITC): blocks of ``b`` tokens; a
  query block sees ``w`` sliding blocks, ``g`` global blocks (the first ones; seen by all, seeing all) and
  ``r`` random blocks. Causal (as the paper's autoregressive decoder, App. D): sliding blocks ``i-w//2..i``,
  random blocks drawn among the earlier blocks not already visible, token-level causality inside the diagonal
  block. One layout per ``model.sparse_seed`` (the paper draws per head; one Mask per forward serves every
  head and layer here).
* **Sparse Transformer, fixed pattern** (Child et al. 2019, Sec. 4.2, eq. for A(1), A(2), "merged" head):
  ``A1 = {j : floor(j/l) == floor(i/l)}``, ``A2 = {j : j mod l in [l-c, l)}``, union, causal. With ``c | l``
  both sets are unions of c-token blocks, so the block layout (block size c) is exact. The "strided" pattern
  (``(i - j) mod l == 0``) is a diagonal, not a block set: not built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqpar.ops.attention.mask import Mask
from seqpar.models.llama import AttnFn, Llama


def bigbird_layout(n_blocks: int, *, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
                   seed: int = 0, causal: bool = True) -> Tensor:
    """BigBird's block layout ``visible [n_blocks, n_blocks]`` bool (Zaheer et al. 2020, App. D).

    Rows are drawn in order from one generator seeded with ``seed``, and a row's random blocks are chosen
    among blocks that do not depend on ``n_blocks`` when causal, so the layout of a shorter sequence is the
    top-left corner of a longer one's (evaluation at other lengths keeps the training pattern).
    """
    vis = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    half = window_blocks // 2
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_blocks):
        lo, hi = max(0, i - half), (i + 1 if causal else min(n_blocks, i + half + 1))
        vis[i, lo:hi] = True
        vis[i, :global_blocks] = True  # global columns: seen by every query block
        if i < global_blocks:
            vis[i, :] = True  # global rows: see every key block (causality is applied at token level)
        cand = torch.nonzero(~vis[i, :i if causal else n_blocks]).flatten()
        if random_blocks and len(cand):
            vis[i, cand[torch.randperm(len(cand), generator=gen)[:random_blocks]]] = True
    if causal:
        vis &= torch.ones_like(vis).tril()
    return vis


def fixed_layout(n_blocks: int, *, stride: int = 128, summary: int = 32, causal: bool = True) -> Tensor:
    """Sparse Transformer's fixed pattern on blocks of ``summary`` tokens: ``visible [n_blocks, n_blocks]`` bool.

    Block ``i`` covers tokens ``[i c, (i+1) c)``; it sees block ``j`` when both lie in the same stride-block of
    ``l`` tokens (A1) or block ``j`` is the last c tokens of its stride-block (A2, the "summary" cells).
    """
    per = stride // summary  # blocks per stride-block
    i = torch.arange(n_blocks)
    same = (i[:, None] // per) == (i[None, :] // per)  # A1
    summary_col = ((i + 1) % per == 0)[None, :].expand(n_blocks, n_blocks)  # A2
    vis = same | summary_col
    return vis & torch.ones_like(vis).tril() if causal else vis


class MaskedLlama(Llama):
    """The Llama decoder with the pattern of ``model.attention`` as its Mask (every layer and head).

    Args as :class:`Llama`, plus ``cp``: ranks sharing one sequence; the block layout must cover the GLOBAL
    length, ``doc_ids.shape[1]`` when documents are given, else the local length times ``cp``.
    """

    def __init__(self, cfg, attn_fn: Optional[AttnFn] = None, *, cp: int = 1):
        super().__init__(cfg, attn_fn)
        self.cp = cp
        self._global_len: Optional[int] = None
        self._layouts: dict = {}  # n_blocks -> visible (CPU; tiny: one bool per pair of blocks)
        self._device = torch.device("cpu")

    def block_layout(self, seq_len: int) -> Optional[tuple]:
        """``(block_size, visible)`` for a global sequence of ``seq_len`` tokens, or None (no block layout)."""
        c = self.cfg
        if c.attention == "bigbird":
            size = c.sparse_block
        elif c.attention == "blocksparse":
            size = c.sparse_summary
        else:
            return None
        if seq_len % size:
            raise ValueError(f"model.attention={c.attention} lays the sequence out in blocks of {size} tokens; the "
                             f"global length {seq_len} is not a multiple: pad or change the length.")
        n = seq_len // size
        if n not in self._layouts:
            if c.attention == "bigbird":
                self._layouts[n] = bigbird_layout(n, window_blocks=c.bigbird_window_blocks,
                                                  global_blocks=c.bigbird_global_blocks,
                                                  random_blocks=c.bigbird_random_blocks, seed=c.sparse_seed,
                                                  causal=c.causal)
            else:
                self._layouts[n] = fixed_layout(n, stride=c.sparse_stride, summary=c.sparse_summary, causal=c.causal)
        return size, self._layouts[n]

    def attention_mask(self, doc_ids: Optional[Tensor]) -> Mask:
        c = self.cfg
        layout = self.block_layout(self._global_len)
        if layout is not None:  # on the activations' device: the Triton kernel reads it there every call
            layout = (layout[0], layout[1].to(self._device))
        return Mask(causal=c.causal, window=c.window, sinks=c.sinks if c.window is not None else 0,
                    doc_ids=doc_ids, block_sparse=layout)

    def forward(self, tokens: Tensor, positions: Tensor, *, doc_ids: Optional[Tensor] = None) -> Tensor:
        """As :meth:`Llama.forward`; the pattern's Mask replaces the plain causal one."""
        self._global_len = doc_ids.shape[1] if doc_ids is not None else tokens.shape[1] * self.cp
        self._device = tokens.device
        return super().forward(tokens, positions, doc_ids=doc_ids)
