"""Launcher of the Triton backward kernels (:mod:`.bwd`): shape/stride/dtype checks, TMA mode, buffers.

TMA descriptors need triton's global-scratch allocator; the launcher installs a torch-backed one in
the launching thread if none is set (:func:`ensure_allocator`). Nothing touches a device at import.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton

from seqpar.ops.attention.mask import LocalMask
from seqpar.ops.attention.triton.bounds import (check_positions, col_bounds, layout_arg, mask_flags, mask_scalars,
                                                row_bounds)
from seqpar.ops.attention.triton.bwd import _attn_bwd_dkdv, _attn_bwd_preprocess, dkdv_candidates
from seqpar.ops.attention.triton.bwd_dq import _attn_bwd_dq, dq_candidates
from seqpar.ops.attention.triton.common import (check_triton_inputs, dot_precision, env_tma, interpreter_compat,
                                                interpreting, last_dim_contiguous, run_kernel, tune_size)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def tma_mode(*tensors: torch.Tensor, tma: Optional[bool] = None) -> int:
    """How the dK/dV kernel loads its Q/dO tiles: 0 pointers, 1 autotune pointers and TMA, 2 TMA only.

    TMA needs 16-byte aligned bases and strides, a unit last stride and sm90+ (or the interpreter,
    which emulates descriptors). ``tma=None`` (auto; default from ``SEQPAR_TRITON_TMA``, see
    :func:`.common.env_tma`) tunes both on sm90+ GPUs and uses pointers elsewhere, the interpreter
    included; ``True`` forces TMA where legal, ``False`` pointers. Never probes a device at import.
    """
    tma = env_tma(tma)
    if tma is False:
        return 0
    t0 = tensors[0]
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]) \
                or max(t.shape) >= 2 ** 31:
            return 0
    if interpreting() and t0.device.type == "cpu":
        return 2 if tma else 0
    if not t0.is_cuda or _capability(t0.device.index if t0.device.index is not None else torch.cuda.current_device())[0] < 9:
        return 0
    return 2 if tma else 1


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Device-side tensor descriptors need global scratch from triton's allocator (a per-thread context
    variable: autograd's backward thread has its own). Install a torch one unless one is set."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # private API moved: set ours (harmless, torch-backed)
        pass
    triton.set_allocator(_torch_scratch)



def _grad_buffer(acc: Optional[torch.Tensor], like: torch.Tensor, dtype: torch.dtype, name: str):
    """(buffer, accumulate?) for one gradient: the caller's fp32 running sum, or a fresh tensor."""
    if acc is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device), False
    if acc.shape != like.shape or acc.dtype != torch.float32 or acc.stride(-1) != 1:
        raise ValueError(f"{name} must be float32 {list(like.shape)} with unit last stride; got {acc.dtype} "
                         f"{list(acc.shape)}.")
    return acc, True



def attention_bwd_launch(dout, q, k, v, out, lse, mask: LocalMask, *, softmax_scale: Optional[float], delta=None,
                         dq_acc=None, dk_acc=None, dv_acc=None, grad_dtype: torch.dtype = torch.float32,
                         dq_mode: str = "kernel", tma: Optional[bool] = None, autotune: bool = True,
                         tile_counts: Optional[torch.Tensor] = None):
    """Run the backward kernels. Shapes as in :func:`seqpar.ops.attention.triton.function.backward`.

    ``grad_dtype`` is the dtype of freshly allocated gradients (fp32 for the public API; the autograd
    path asks for the input dtype to skip a cast pass). ``dq_mode``: ``"kernel"`` (separate dQ kernel)
    or ``"atomic"`` (dQ added by the dK/dV kernel with fp32 atomics). ``tma``: see :func:`tma_mode`.
    ``autotune=False`` runs the first listed tile of each kernel. ``tile_counts`` (a test hook: int32
    ``[B * Hkv, cdiv(Sk, BLOCK_N)]``): filled with the (query tile, head) steps each dK/dV program loaded.
    """
    check_triton_inputs(q, k, v, mask)
    check_positions(mask, q.shape[1], k.shape[1])
    if interpreting():
        interpreter_compat()
    if dq_mode not in ("kernel", "atomic"):
        raise ValueError(f"dq_mode must be 'kernel' or 'atomic'; got {dq_mode!r}.")
    if (dk_acc is None) != (dv_acc is None):
        raise ValueError("dk_acc and dv_acc must be given together.")
    q, k, v, dout, out = (last_dim_contiguous(t) for t in (q, k, v, dout, out))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {list(q.shape)}; got {list(dout.shape)}, {list(out.shape)}.")
    if tuple(lse.shape) != (b, h, sq):
        raise ValueError(f"lse must be [batch, heads, seq_q]={[b, h, sq]}; got {list(lse.shape)}.")
    lse = lse.to(torch.float32).contiguous()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dot_prec = dot_precision(q.dtype)
    heads = dict(H=h, G=h // hkv, Sq=sq, Sk=sk)
    scalars = dict(zip(("q_offset", "k_offset", "q_stride", "k_stride", "window_left", "window_right"),
                       mask_scalars(mask)))
    flags = dict(HEAD_DIM=d, **mask_flags(mask), DOT_PREC=dot_prec)
    if delta is None:
        delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        if sq > 0 and b * h > 0:
            _attn_bwd_preprocess[(triton.cdiv(sq, 64), b * h)](
                out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2), h, sq, HEAD_DIM=d, BLOCK_M=64)
    else:
        delta = delta.to(torch.float32).contiguous()
    dk, acc_kv = _grad_buffer(dk_acc, k, grad_dtype, "dk_acc")
    dv, _ = _grad_buffer(dv_acc, v, grad_dtype, "dv_acc")
    if dq_mode == "atomic":  # atomics need an fp32 buffer that starts at zero (or the caller's sum)
        dq = dq_acc if dq_acc is not None else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _grad_buffer(dq, q, torch.float32, "dq_acc")
        acc_q = True
    else:
        dq, acc_q = _grad_buffer(dq_acc, q, grad_dtype, "dq_acc")
    if sq == 0 or sk == 0 or b * h == 0:  # nothing visible: zero gradients (accumulators untouched)
        for t, acc in ((dq, acc_q), (dk, acc_kv), (dv, acc_kv)):
            if not acc:
                t.zero_()
        return dq, dk, dv
    layout, bs_size, bs_n = layout_arg(mask, q.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    cols = col_bounds(mask, b, sq, sk, q.device)
    count = tile_counts is not None
    if count and (tile_counts.dtype != torch.int32 or not tile_counts.is_contiguous()):
        raise ValueError("tile_counts must be a contiguous int32 tensor [B * Hkv, number of key tiles].")
    scalars.update(bs_size=bs_size, bs_n=bs_n, qk_scale=scale * 1.4426950408889634, sm_scale=scale,
                   tune_size=tune_size(b, h, sq, sk, d))
    mode = tma_mode(q, dout, *([dq] if dq_mode == "atomic" else []), tma=tma)  # dQ: the TMA reduce target
    if mode and not interpreting():
        ensure_allocator()
    run_kernel(_attn_bwd_dkdv, lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), b * hkv), dkdv_candidates, autotune,
               (q, k, v, dout, lse, delta, dk, dv, dq, cols if cols is not None else dummy, layout,
                tile_counts if count else dummy,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2)),
               dict(**heads, **scalars, **flags, tma_mode=mode, ACCUMULATE=acc_kv, DQ_ATOMIC=dq_mode == "atomic",
                    COUNT=count))
    if dq_mode == "kernel":
        rows = row_bounds(mask, b, sq, sk, q.device)
        run_kernel(_attn_bwd_dq, lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h), dq_candidates, autotune,
                   (q, k, v, dout, lse, delta, dq, rows if rows is not None else dummy, layout,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                    dq.stride(0), dq.stride(1), dq.stride(2)),
                   dict(**heads, **scalars, **flags, ACCUMULATE=acc_q))
    elif dq_acc is None and grad_dtype != torch.float32:
        dq = dq.to(grad_dtype)
    return dq, dk, dv
