"""User-error types, in a leaf module that imports nothing from seqpar.

Kept apart from ``seqpar.config`` so that any module (``seqpar.ops.rope``, the models, the data
pipeline) can raise a configuration error without importing the config, and the config can import
those modules' choice lists and checks without an import cycle. ``seqpar.config`` re-exports
:class:`ConfigError`, so ``from seqpar.config import ConfigError`` keeps working.
"""


class ConfigError(ValueError):
    """A user-fixable configuration mistake; the message is one sentence naming the field and the fix.

    A ``ValueError`` so that code catching bad values in general (and older callers) still catches it;
    ``train.py`` turns it into one ``error:`` line and exit code 2.
    """
