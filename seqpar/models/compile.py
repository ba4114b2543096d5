"""``train.compile``: fuse the element-wise parts of each block with ``torch.compile``.

What is compiled, per block: the two RMSNorms, RoPE on q and k, and the SwiGLU MLP (the whole
``FeedForward``, or with ``train.ffn_chunk`` the per-chunk MLP inside the recompute). Matmuls stay
cuBLAS calls inside the compiled graphs; attention (ring or local, a custom autograd function with
communication) is never compiled, so there is no graph break to manage and nothing of the ring's
overlap changes.

Why these and not the whole block: in eager mode every RMSNorm, RoPE and SwiGLU is a chain of
separate memory-bound kernels (an fp32 upcast, a square, a mean, a multiply, a cast, ...), and
autograd keeps several of their intermediates alive for backward. Compiled, each is one or two fused
kernels forward and backward, and AOTAutograd's min-cut partitioner saves the cheap inputs and
recomputes the element-wise middle in backward: the MLP keeps three hidden-sized tensors per token
instead of four (``silu(w1 x)`` is recomputed), the norms keep their input and one fp32 scalar per
token instead of an fp32 copy, RoPE keeps nothing but the shared cos/sin (tests/test_compile.py
counts the saved bytes). :func:`seqpar.train.dry_run.estimate_memory`
follows that accounting when ``train.compile`` is on.

Module identity and parameter names do not change (``nn.Module.compile`` compiles the call in place;
no ``_orig_mod``), so checkpoints, FSDP2 units, LoRA and the HF export are unaffected. Call it before
activation checkpointing and FSDP wrapping (:func:`seqpar.models.parallelize.parallelize` does).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seqpar.models.blockwise import BlockwiseFeedForward
from seqpar.models.llama import Attention, FeedForward, RMSNorm
from seqpar.ops.rope import apply_rope


def compile_model(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the norms, RoPE and MLPs of ``model`` in place; returns how many modules were compiled.

    Args:
        model: a :class:`~seqpar.models.llama.Llama` (any module tree holding its block modules).
        backend: ``torch.compile`` backend; ``inductor`` generates fused kernels (Triton on GPU, C++ on
            CPU); the tests use ``aot_eager`` to check the wiring without code generation.
    """
    rope = torch.compile(apply_rope, backend=backend)  # one compiled function shared by every layer
    count = 0
    for m in model.modules():
        if isinstance(m, BlockwiseFeedForward):
            # Compile the chunk MLP, not the chunking: the recompute (torch.utils.checkpoint) stays eager
            # around a compiled region, which is the combination torch supports without graph breaks.
            m._mlp = torch.compile(m._mlp, backend=backend)
        elif isinstance(m, (FeedForward, RMSNorm)):
            m.compile(backend=backend)
        elif isinstance(m, Attention):
            m.rope_fn = rope
        else:
            continue
        count += 1
    return count
