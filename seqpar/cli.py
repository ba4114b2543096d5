"""The command-line edge: compose ``conf/`` + ``key=value`` overrides with Hydra into a typed Config.

Hydra and OmegaConf live only here (and in ``train.py``); the library takes plain dataclasses.
Every user mistake becomes :class:`~seqpar.config.ConfigError` with one sentence naming the key.
"""
from __future__ import annotations

import os
from typing import Sequence

from seqpar.config import Config, ConfigError, register_configs

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _explain(err: BaseException) -> str:
    """One sentence from a Hydra / OmegaConf error chain, naming the key and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, MissingConfigException) and getattr(e, "missing_cfg_file", None):
            group = os.path.dirname(e.missing_cfg_file)
            return (f"there is no config '{e.missing_cfg_file}'; choose {group}= one of {e.options}."
                    if group and e.options else f"there is no config '{e.missing_cfg_file}'.")
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None) or "?"
            if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
                return (f"unknown config key '{key}'; check its spelling "
                        "(python train.py --cfg prints every key and its value).")
            msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
            return f"config key '{key}': {msg}; give a value of the type the key takes."
    return str(chain[-1]).splitlines()[0] if chain else "invalid configuration"


def load_config(overrides: Sequence[str] = (), config_dir: str = CONF_DIR) -> Config:
    """Compose ``config.yaml`` with Hydra overrides (``key=value``, ``group=option``) and validate.

    Raises ConfigError naming the key for unknown keys, wrong types, unknown group options and
    every check in the dataclasses' ``__post_init__``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            dcfg = compose("config", overrides=list(overrides))
        return OmegaConf.to_object(dcfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra / OmegaConf: unknown key, wrong type, missing group option
        cause = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise ConfigError(_explain(e)) from e


def config_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
