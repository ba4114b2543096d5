"""seqpar's Triton attention backend: kernels (:mod:`.fwd`, :mod:`.bwd`), launchers (:mod:`.fwd`,
:mod:`.bwd_launch`), shared helpers and environment (:mod:`.common`), autograd and the functional
ring-ready API (:mod:`.function`). Importing this package imports nothing from triton; its modules do."""
