"""The command-line edge: compose ``conf/`` + ``key=value`` overrides with Hydra into a typed Config.

Hydra and OmegaConf live only here (and in ``train.py``); the library takes frozen dataclasses
(``seqpar.config``), and what OmegaConf needs to merge into them (a writable schema, ``{}`` for an
unset ``model.rope_scaling``) stays here too. Every user mistake becomes
:class:`~seqpar.errors.ConfigError` with one sentence naming the key.
"""
from __future__ import annotations

import os
from typing import Sequence

from seqpar.config import Config
from seqpar.errors import ConfigError

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


def _writable(node) -> None:
    """Clear OmegaConf's read-only flag on ``node`` and every container under it: a frozen dataclass
    becomes a read-only node, but YAML groups and overrides must merge into the schema."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    OmegaConf.set_readonly(node, False)
    if isinstance(node, DictConfig):
        children = [node._get_node(k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        children = [node._get_node(i) for i in range(len(node))]
    else:
        return
    for child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            _writable(child)


def schema():
    """The root schema as a writable OmegaConf node: every YAML group and override is merged into it, so
    unknown keys and wrong types fail before any of our code runs."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(Config)
    _writable(node)
    # An empty dict, not None: OmegaConf cannot merge a command-line dict (model.rope_scaling={...})
    # into a None node. _to_config turns an empty one back into None ("no scaling").
    node.model.rope_scaling = {}
    OmegaConf.set_struct(node.model.rope_scaling, False)  # its keys are the scaling type's, not a schema's
    return node


def register_configs() -> None:
    """Register :func:`schema` with Hydra's ConfigStore as ``seqpar_schema`` (``conf/config.yaml`` lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="seqpar_schema", node=schema())


def _to_config(node) -> Config:
    """Merged OmegaConf node -> Config; the dataclasses' checks run here, on the final values."""
    from omegaconf import OmegaConf

    if not node.model.rope_scaling:  # the schema's {} placeholder: no scaling
        node.model.rope_scaling = None
    return OmegaConf.to_object(node)


def _reraise(e: Exception):
    """A ConfigError raised inside OmegaConf (a dataclass check) as itself, anything else explained."""
    cause = e
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        raise cause from None
    raise ConfigError(_explain(e)) from e


def load_config(overrides: Sequence[str] = (), config_dir: str = CONF_DIR) -> Config:
    """Compose ``config.yaml`` with Hydra overrides (``key=value``, ``group=option``) and validate.

    Raises ConfigError naming the key for unknown keys, wrong types, unknown group options and
    every check in the dataclasses' ``__post_init__``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            dcfg = compose("config", overrides=list(overrides))
        return _to_config(dcfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra / OmegaConf: unknown key, wrong type, missing group option
        _reraise(e)


def load_config_file(path: str, overrides: Sequence[str] = ()) -> Config:
    """A saved ``config.yaml`` (a run directory's, see ``seqpar.train.resolve``) with ``key=value``
    overrides on top, checked like :func:`load_config`. Raises ConfigError naming the key."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(schema(), OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        return _to_config(merged)
    except ConfigError:
        raise
    except Exception as e:  # unknown key, wrong type
        _reraise(e)


def config_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, the form ``--cfg`` prints."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
