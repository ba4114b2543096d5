"""The architecture options' names (a leaf: ``seqpar.config`` validates against them, ``seqpar.models.build``
builds them, and neither imports the other). What each option is: :mod:`seqpar.models.build`."""

ATTENTIONS = ("dense", "longformer", "bigbird", "blocksparse", "performer", "linformer", "reformer")
ARCHS = ("llama", "infini", "megalodon")
# Options that are masks on the shared kernels: they run through the ring and the document mask.
MASK_ATTENTIONS = ("dense", "longformer", "bigbird", "blocksparse")
# Options whose attention never crosses a cp rank (chunks local to a shard) and whose sequential state passes
# between ranks instead: under parallel.cp > 1 they get plain local attention, not a context-parallel mode.
RANK_LOCAL_ATTENTION = ("megalodon",)
