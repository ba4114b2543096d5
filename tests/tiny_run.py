"""A tiny training configuration shared by the trainer tests of every tier (unit, e2e): 2 layers of width 64,
64-token rows of the embedded corpus on the CPU, so a step takes milliseconds."""
from seqpar.config import (CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimConfig,
                           TrainConfig)


def tiny_config(run_dir, steps=12, every=0, **train) -> Config:
    """``steps`` steps into ``run_dir``, a checkpoint every ``every`` steps (0: none); ``train`` overrides
    TrainConfig fields (e.g. ``compile=True``)."""
    return Config(
        model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
        data=DataConfig(max_bytes=400_000),
        optim=OptimConfig(lr=3e-3, warmup_steps=3),
        train=TrainConfig(**{"seq_len": 64, "batch_size": 4, "steps": steps, "eval_every": 0, "device": "cpu", **train}),
        logging=LoggingConfig(log_every=1, run_dir=str(run_dir), progress=False),
        checkpoint=CheckpointConfig(every=every, keep_last=2),
    )
