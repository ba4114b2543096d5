"""The model's injected context-parallel attention for each ``parallel.cp_comm`` mode, and ``auto``'s choice.

``attn_fn(q, k, v, *, causal=False, softmax_scale=None, mask=None) -> out [B, L, H, D]`` on sequence shards,
whatever the mode: ``ring`` (:mod:`.ring_attention`), ``allgather`` (:mod:`.allgather`), ``ulysses``
(:mod:`.ulysses`, over the whole cp group) or ``hybrid`` (:mod:`.hybrid`: Ulysses over ``parallel.ulysses``
consecutive cp ranks, ring across). ``auto`` asks the cost model (:mod:`.cost`, predictions from measured
kernel rates and link bandwidths) for the fastest mode this run's shapes and groups can use.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

from seqpar.ops.attention import Mask
from seqpar.parallel.allgather import allgather_attention
from seqpar.parallel.hybrid import HYBRID_LAYOUTS, hybrid_attention
from seqpar.parallel.ring_attention import make_ring_attn_fn
from seqpar.parallel.ulysses import check_shapes, kv_replication, ulysses_attention

# The one list of cp_comm names: seqpar.config imports it to validate parallel.cp_comm.
CP_MODES = ("ring", "allgather", "ulysses", "hybrid")
CP_COMM_CHOICES = (*CP_MODES, "auto")


def make_cp_attn_fn(mode: str, *, group=None, ulysses_group=None, ring_group=None, layout: str = "zigzag",
                    backend: str = "auto", validate: str = "always",
                    allgather_slices: Optional[int] = None,
                    ulysses_chunks: Optional[int] = None) -> Callable[..., Tensor]:
    """The attention function of ``mode`` (one of :data:`CP_MODES`) on shards of ``layout``.

    ``group``: the cp group (ring, allgather, ulysses); ``ulysses_group`` / ``ring_group``: the hybrid's 2-D
    cp group (:func:`seqpar.parallel.mesh.cp_subgroups`). ``validate`` as in
    :func:`~seqpar.parallel.ring_attention.make_ring_attn_fn` (``"first"``: the cross-rank shape check once
    per shape signature); ``allgather_slices`` / ``ulysses_chunks``: the all-gather mode's pipelined K/V head
    slices and the Ulysses mode's head chunks (None: their defaults). Raises ValueError for an unknown mode or a
    hybrid without its groups.
    """
    if mode not in CP_MODES:
        raise ValueError(f"parallel.cp_comm={mode!r} is not one of {list(CP_COMM_CHOICES)}; "
                         "parallel.cp_comm=ring works for every shape.")
    if validate not in ("always", "first", "never"):
        raise ValueError(f"validate={validate!r} is not one of ['always', 'first', 'never'].")
    if mode == "ring":
        return make_ring_attn_fn(group, layout=layout, backend=backend, validate=validate)
    if mode == "hybrid" and (ulysses_group is None or ring_group is None):
        raise ValueError("parallel.cp_comm=hybrid needs the Ulysses and ring groups of the 2-D cp group (set "
                         "parallel.ulysses=U > 1; the mesh creates them), or use parallel.cp_comm=ring.")
    seen: set = set()

    def attn_fn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
                mask: Optional[Mask] = None) -> Tensor:
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, bool(causal))
        check = validate == "always" or (validate == "first" and key not in seen)
        causal = causal if mask is None else False  # a Mask carries its own causality
        kw = dict(causal=causal, mask=mask, softmax_scale=softmax_scale, layout=layout, backend=backend)
        if mode == "hybrid":
            out = hybrid_attention(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, validate=check, **kw)
        else:
            if check:
                check_shapes(q, k, v, group, layout, causal, mask)
            if mode == "ulysses":
                out = ulysses_attention(q, k, v, group=group, validate=False, slices=ulysses_chunks, **kw)
            else:
                out = allgather_attention(q, k, v, group=group, validate=False, slices=allgather_slices, **kw)
        seen.add(key)
        return out

    return attn_fn


def usable_modes(cp: int, ulysses: int, n_heads: int, layout: str) -> list:
    """The modes a run with these groups and heads can use (ring and allgather always)."""
    modes = ["ring", "allgather"]
    if n_heads % cp == 0:
        modes.append("ulysses")
    if 1 < ulysses < cp and cp % ulysses == 0 and n_heads % ulysses == 0 and layout in HYBRID_LAYOUTS:
        modes.append("hybrid")
    return modes


def choose_mode(cfg: Any, world_gpus_per_node: int = 8) -> str:
    """``parallel.cp_comm`` resolved for ``cfg`` (a seqpar Config, read by attribute): ``auto`` is the mode with
    the smallest PREDICTED attention time (:func:`seqpar.parallel.cost.mode_time`) among :func:`usable_modes`
    (hybrid at the configured ``parallel.ulysses``). Deterministic, so every rank chooses the same.

    Raises ConfigError naming ``model.n_heads`` / ``parallel.ulysses`` when a chosen ulysses/hybrid cannot
    split the heads (with a mode that would work)."""
    from seqpar.errors import ConfigError

    p, m = cfg.parallel, cfg.model
    mode = p.cp_comm
    if mode in ("ulysses", "hybrid"):
        u = p.cp if mode == "ulysses" else p.ulysses
        try:
            kv_replication(m.n_heads, m.kv_heads, u)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return mode
    if mode != "auto":
        return mode
    if p.cp == 1:
        return "ring"
    from seqpar.parallel.cost import calib_for, mode_time, run_shape

    shape, cluster = run_shape(cfg, p.cp, world_gpus_per_node)
    cal = calib_for(p, shape, cluster)
    times = {md: mode_time(md, shape, cluster, cal, ulysses=p.ulysses if md == "hybrid" else None)["time"]
             for md in usable_modes(p.cp, p.ulysses, m.n_heads, getattr(cfg, "layout", p.layout))}
    return min(times, key=lambda md: (times[md], CP_MODES.index(md)))


def allgather_slices(cfg: Any, world_gpus_per_node: int = 8) -> int:
    """``parallel.allgather_slices`` resolved: 0 (auto) is the cost model's best count for this run's shape
    (:func:`seqpar.parallel.cost.best_slices`; deterministic, so every rank resolves the same)."""
    from seqpar.parallel.cost import calib_for, run_shape

    return calib_for(cfg.parallel, *run_shape(cfg, cfg.parallel.cp, world_gpus_per_node)).slices


def cp_attn_fn(cfg: Any, mesh) -> Callable[..., Tensor]:
    """The training run's attention over ``mesh`` (cp > 1) for ``cfg`` (``parallel.cp_comm``, layout, backend);
    shapes are fixed per run, so the cross-rank shape check runs once per shape signature."""
    p = cfg.parallel
    return make_cp_attn_fn(choose_mode(cfg), group=mesh.cp_group, ulysses_group=mesh.ulysses_group,
                           ring_group=mesh.ring_group, layout=cfg.layout, backend=p.attention_backend, validate="first",
                           allgather_slices=allgather_slices(cfg), ulysses_chunks=p.ulysses_chunks)
