from seqpar.train.trainer import Trainer, lr_multiplier, run

__all__ = ["Trainer", "lr_multiplier", "run"]
