"""Long-context evaluation: passkey retrieval and perplexity vs context length, each writing a table
(markdown + JSON) and a PNG plot.

CLIs: ``python -m seqpar.eval.passkey``, ``python -m seqpar.eval.perplexity``, and
``python -m seqpar.eval.export`` (run directory -> Hugging Face directory). Library use:
``seqpar.eval.passkey.evaluate_passkey``, ``seqpar.eval.perplexity.evaluate_perplexity`` and
``seqpar.eval.common.load_model`` (submodules are not imported here, so ``python -m`` runs them cleanly).
"""
