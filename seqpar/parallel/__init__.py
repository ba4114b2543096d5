"""Everything that talks across ranks: layouts, the ring, ring attention, the Ulysses / all-gather / hybrid
context-parallel modes (and the mesh, in mesh.py)."""
from seqpar.parallel.allgather import allgather_attention, allgather_attention_with_lse
from seqpar.parallel.attention_fn import CP_COMM_CHOICES, CP_MODES, make_cp_attn_fn
from seqpar.parallel.hybrid import hybrid_attention, hybrid_attention_with_lse
from seqpar.parallel.layout import (
    LAYOUTS,
    check_divisible,
    docs_assignment,
    gather_shards,
    local_positions,
    rank_pieces,
    required_multiple,
    shard_sequence,
    unshard_sequence,
)
from seqpar.parallel.ring import RingComm
from seqpar.parallel.ring_attention import (
    make_ring_attn_fn,
    ring_attention,
    ring_attention_with_lse,
    validate_inputs,
)
from seqpar.parallel.ring_plan import build_plan, plan_step, ring_work, visible_pairs_per_rank
from seqpar.parallel.ulysses import ulysses_attention, ulysses_attention_with_lse

__all__ = [
    "CP_COMM_CHOICES",
    "CP_MODES",
    "LAYOUTS",
    "RingComm",
    "allgather_attention",
    "allgather_attention_with_lse",
    "build_plan",
    "check_divisible",
    "docs_assignment",
    "gather_shards",
    "hybrid_attention",
    "hybrid_attention_with_lse",
    "local_positions",
    "make_cp_attn_fn",
    "make_ring_attn_fn",
    "plan_step",
    "rank_pieces",
    "required_multiple",
    "ring_attention",
    "ring_attention_with_lse",
    "ring_work",
    "shard_sequence",
    "ulysses_attention",
    "ulysses_attention_with_lse",
    "unshard_sequence",
    "validate_inputs",
    "visible_pairs_per_rank",
]
