"""Warp-specialized (WS) variants of the forward and dQ kernels on Hopper: selection, configs (v3).

Triton >= 3.4 runs a Hopper-specific automatic warp-specialization pass (``add_hopper_warpspec`` in
``make_ttgir`` for sm90) on loops marked ``tl.range(..., warp_specialize=True)``: a producer warp group
issues TMA loads and the compiler splits the dots' M dimension over two consumer warp groups ("data
partitioning"; ``num_warps=4`` per group: 384 threads, ``setmaxnreg`` rebalancing). The triton 3.2 config
knobs ``num_consumer_groups``/``num_buffers_warp_spec`` are gone; ``num_stages`` sets the buffer depth.
What triton 3.6 accepts, found by compiling for sm_90 on the CPU (NOTES-attention.md, v3):

* the loop's tiles must come by device-side TMA (``tl.make_tensor_descriptor``), and so must every tensor
  loaded before the loop and read inside it (row bounds, lse, delta): a pointer-loaded one makes the pass
  assert in ``WSLowerToken``;
* the warp-specialized loop must be the kernel's only loop (another loop feeding or following it fails a
  dominance assertion), so a WS kernel walks ``[lo, hi)`` in one masked loop instead of the plain
  kernels' masked/unmasked stages;
* the dK/dV kernel (K/V pointer-loaded before its loop, Q/dO by 4-D descriptors) does not pass: no WS
  variant; with ``num_warps=8`` the pass leaves a loop unspecialized.

A kernel's WS variant is the ``WARP_SPEC`` config constexpr (default False: the plain code, unchanged).
Selection, like the TMA mode, is per call (:func:`ws_mode`, part of the autotune key): ``SEQPAR_TRITON_WS``
or the launchers' ``ws`` argument. Nothing here touches a device or reads the environment at import.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from seqpar.ops.attention.triton.common import interpreting

WS_ENV = "SEQPAR_TRITON_WS"
# Whether auto mode (env unset) adds WS candidates to the autotuner on sm90+. Off until a GPU run shows
# they compile and win (benchmarks/bench_ws.py, NOTES-attention.md "v3"): a WS compile that fails
# inside the MLIR pass raises RuntimeError (or aborts), which the autotuner does not catch.
WS_AUTO = False


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": True}, num_warps=warps, num_stages=stages)


# The tutorial's Hopper WS shape: BLOCK_M 128 split over two consumer groups of num_warps=4 (m64 wgmma
# each); num_stages = K/V buffers of the producer. Spill-free under ptxas (sm_90a); unmeasured.
FWD_WS_CONFIGS = {
    64: [_cfg(128, 128, 4, 3), _cfg(128, 64, 4, 3)],
    128: [_cfg(128, 128, 4, 2), _cfg(128, 64, 4, 3)],
}
DQ_WS_CONFIGS = {
    64: [_cfg(128, 64, 4, 3), _cfg(128, 128, 4, 2)],
    128: [_cfg(128, 64, 4, 3), _cfg(128, 64, 4, 2)],
}


def triton_supports_ws() -> bool:
    """Triton >= 3.4 (Hopper WS pass, ``tl.range(warp_specialize=)``, device-side descriptors)."""
    import triton.language as tl
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 4) and hasattr(tl, "make_tensor_descriptor")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def env_ws(ws: Optional[bool]):
    """The caller's ``ws`` if given, else ``SEQPAR_TRITON_WS`` read now: "0" False, "1" True (WS only),
    "tune" (autotune WS and plain), unset/other None (auto: :data:`WS_AUTO`)."""
    if ws is not None:
        return ws
    env = os.environ.get(WS_ENV, "").strip().lower()
    return {"0": False, "1": True, "tune": "tune"}.get(env)


def descriptor_ok(t: torch.Tensor) -> bool:
    """A 2-D ``[S, D]`` descriptor per (batch, head) slice is legal: 16-byte aligned base and strides."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and max(t.shape) < 2 ** 31 and \
        all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])


def ws_mode(*tensors: torch.Tensor, ws: Optional[bool] = None) -> int:
    """0: plain kernels only; 1: autotune plain and WS candidates; 2: WS candidates only.

    WS needs sm90+, triton >= 3.4, 16-bit inputs and descriptor-legal tensors; never in the interpreter
    (its path stays exactly as before). ``ws=True`` (or ``SEQPAR_TRITON_WS=1``) forces WS where legal,
    ``False``/"0" turns it off, "tune" autotunes both, None/unset follows :data:`WS_AUTO`.
    """
    want = env_ws(ws)
    if want is False or (want is None and not WS_AUTO) or interpreting():
        return 0
    t0 = tensors[0]
    if not t0.is_cuda or t0.dtype not in (torch.float16, torch.bfloat16) or not triton_supports_ws():
        return 0
    if _capability(t0.device.index if t0.device.index is not None else torch.cuda.current_device())[0] < 9:
        return 0
    if not all(descriptor_ok(t) for t in tensors):
        return 0
    return 2 if want is True else 1


def with_ws(plain: list, ws_table: dict, args) -> list:
    """Candidates of one call: the plain list (no ``WARP_SPEC`` key: the kernels default it to False, so
    plain configs keep their names) and/or the WS list per ``args["ws_mode"]``.
    Small (untuned) problems take the first WS tile when WS is forced, else the plain default."""
    mode, d = args.get("ws_mode", 0), args["HEAD_DIM"]
    ws_list = ws_table.get(d, []) if args["Q"].dtype != torch.float32 else []
    if not mode or not ws_list:
        return plain
    if not args["tune_size"]:
        return ws_list[:1] if mode == 2 else plain[:1]
    return ws_list if mode == 2 else plain + ws_list


def all_ws(table: dict) -> list:
    seen = []
    for cfgs in table.values():
        seen += [c for c in cfgs if all(str(c) != str(s) for s in seen)]
    return seen
