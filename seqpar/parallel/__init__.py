"""Everything that talks across ranks: layouts, the ring, ring attention (and the mesh, in mesh.py)."""
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

__all__ = [
    "LAYOUTS",
    "RingComm",
    "build_plan",
    "check_divisible",
    "docs_assignment",
    "gather_shards",
    "local_positions",
    "make_ring_attn_fn",
    "plan_step",
    "rank_pieces",
    "required_multiple",
    "ring_attention",
    "ring_attention_with_lse",
    "ring_work",
    "shard_sequence",
    "unshard_sequence",
    "validate_inputs",
    "visible_pairs_per_rank",
]
