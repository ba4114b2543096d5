from seqpar.train.schedule import lr_multiplier
from seqpar.train.trainer import Trainer, run

__all__ = ["Trainer", "lr_multiplier", "run"]
