"""Hugging Face Llama import/export: ``config.json`` + safetensors (one file, or shards + index).

Only local directories are read or written (no hub access). Weights need no permutation: seqpar's
RoPE uses HF's rotate_half convention (``seqpar.ops.rope``), so q/k projections map one to one, and
the logits of :class:`~seqpar.models.llama.Llama` match ``transformers.LlamaForCausalLM`` (tested).

Name map (seqpar <-> HF): ``tok_embeddings`` <-> ``model.embed_tokens``; ``layers.{i}.attention.wq/wk/wv/wo``
<-> ``model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj``; ``feed_forward.w1/w3/w2`` <->
``mlp.gate_proj/up_proj/down_proj``; ``attention_norm`` / ``ffn_norm`` <-> ``input_layernorm`` /
``post_attention_layernorm``; ``norm`` <-> ``model.norm``; ``output`` <-> ``lm_head`` (absent when tied).

``rope_scaling`` is read from ``rope_scaling`` + ``rope_theta`` (transformers 4 files) or
``rope_parameters`` (transformers 5) with HF's defaults filled in (``original_max_position_embeddings``
from ``max_position_embeddings``), and written in the transformers 4 form, which both versions read.
Every problem with a directory raises :class:`HFCheckpointError` naming the file and the field.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional, Union

import torch

from seqpar.config import ModelConfig
from seqpar.errors import ConfigError
from seqpar.models.llama import Llama

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied verbatim from a source checkpoint on export (tokenizer, generation defaults).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "generation_config.json")
_LEAF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
         "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
         "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
         "ffn_norm": "post_attention_layernorm"}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


class HFCheckpointError(ConfigError):
    """A Hugging Face checkpoint directory that cannot be used; the message names the file and field."""


def hf_name(key: str) -> str:
    """seqpar state-dict key -> HF key (``layers.0.attention.wq.weight`` -> ``model.layers.0.self_attn.q_proj.weight``).

    Wrapper components (activation checkpointing, torch.compile) are dropped first.
    """
    key = _WRAPPERS.sub("", key)
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.match(key)
    if m is None or m.group(2) not in _LEAF:
        raise KeyError(f"no Hugging Face name for seqpar parameter {key!r}")
    return f"model.layers.{m.group(1)}.{_LEAF[m.group(2)]}.weight"


# ---- config.json <-> ModelConfig ------------------------------------------------------------------
def read_hf_config(path: str) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    if not os.path.isdir(path):
        raise HFCheckpointError(f"Hugging Face checkpoint directory {path!r} does not exist (model.init_from / --checkpoint).")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise HFCheckpointError(f"{file} is missing: a Hugging Face checkpoint needs config.json next to its safetensors.")
    try:
        with open(file) as f:
            return json.load(f)
    except ValueError as e:
        raise HFCheckpointError(f"{file} is not valid JSON ({e}).") from e


def _hf_rope(hf: dict, file: str) -> tuple[float, Optional[dict]]:
    """``(rope_theta, rope_scaling)`` with HF's implicit defaults made explicit."""
    params = hf.get("rope_parameters")
    if params:  # transformers 5
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFCheckpointError(f"{file}: partial_rotary_factor={scaling['partial_rotary_factor']} is not supported "
                                "(seqpar rotates every head feature).")
    scaling.pop("partial_rotary_factor", None)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type, **scaling}
    max_pos = hf.get("max_position_embeddings")
    if rope_type == "dynamic":
        # HF's dynamic NTK grows from max_position_embeddings and ignores any other original length.
        if max_pos is None:
            raise HFCheckpointError(f"{file}: rope_scaling type 'dynamic' needs max_position_embeddings.")
        scaling["original_max_position_embeddings"] = max_pos
    elif rope_type in ("yarn", "llama3"):
        original = hf.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings", max_pos))
        if original is None:
            raise HFCheckpointError(f"{file}: rope_scaling.original_max_position_embeddings (or max_position_embeddings) "
                                    f"is required for rope_type={rope_type!r}.")
        scaling["original_max_position_embeddings"] = original
        if rope_type == "yarn" and scaling.get("factor") is None and max_pos is not None:
            scaling["factor"] = max_pos / original  # HF infers the YaRN factor from the two lengths
    return float(theta), scaling


def model_config_from_hf(hf: dict, *, file: str = CONFIG_FILE, **overrides) -> ModelConfig:
    """``ModelConfig`` for a parsed HF Llama ``config.json``; ``overrides`` replace fields (e.g. rope_scaling).

    Raises HFCheckpointError naming ``file`` and the field for anything seqpar's Llama cannot express.
    """
    if hf.get("model_type", "llama") != "llama":
        raise HFCheckpointError(f"{file}: model_type={hf.get('model_type')!r} is not supported; seqpar imports "
                                "Llama checkpoints (model_type 'llama').")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise HFCheckpointError(f"{file}: field {key!r} is missing.")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"{file}: {key}=true is not supported (seqpar's Llama has no biases).")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{file}: hidden_act={hf['hidden_act']!r} is not supported (seqpar uses SwiGLU/silu).")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise HFCheckpointError(f"{file}: head_dim={head_dim} x num_attention_heads={n_heads} != hidden_size={dim}; "
                                "seqpar needs head_dim = hidden_size / num_attention_heads.")
    theta, scaling = _hf_rope(hf, file)
    fields = dict(
        name=hf.get("_name_or_path") or "hf-llama", vocab_size=hf["vocab_size"], dim=dim,
        n_layers=hf["num_hidden_layers"], n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), max_position_embeddings=hf.get("max_position_embeddings"))
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFCheckpointError(f"{file}: {e}") from e


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, base: Optional[dict] = None) -> dict:
    """A transformers-4 style Llama ``config.json`` dict for ``cfg`` (fields of ``base`` kept unless
    seqpar defines them), readable by transformers 4 and 5."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    max_pos = cfg.max_position_embeddings
    if scaling is not None:
        original = scaling.get("original_max_position_embeddings")
        if scaling["rope_type"] == "dynamic":
            max_pos = original  # HF's dynamic NTK reads the original length from max_position_embeddings
            scaling.pop("original_max_position_embeddings")
        elif max_pos is None and original is not None:
            max_pos = int(original * float(scaling.get("factor", 1.0)))
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling", "dtype")}
    out.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "max_position_embeddings": max_pos or out.get("max_position_embeddings") or 2048,  # 2048: HF's default
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": str(dtype).replace("torch.", ""),
    })
    return out


# ---- safetensors ----------------------------------------------------------------------------------
def weight_files(path: str) -> dict[str, str]:
    """``{hf_key: file_name}`` of the checkpoint's safetensors (index json, or one model.safetensors)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise HFCheckpointError(f"{index} is not a safetensors index (needs a 'weight_map' object): {e}") from e
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, name)):
                raise HFCheckpointError(f"{os.path.join(path, name)} is listed in {INDEX_FILE} but missing; "
                                        "download or copy every shard.")
        return dict(weight_map)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    found = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
    raise HFCheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found or 'no weight files'}); "
                            "seqpar reads safetensors only: re-save with save_pretrained(..., safe_serialization=True).")


@torch.no_grad()
def load_hf_weights(model: Llama, path: str) -> None:
    """Copy the checkpoint's weights into ``model`` (shape and dtype of ``model`` kept), shard by shard.

    ``model`` must have the shape of ``config.json`` (see :func:`model_config_from_hf`); LoRA-adapted
    models are fine (their base ``weight`` Parameters keep their names; adapters are left alone), and so
    are FSDP2-sharded ones (DTensor parameters: each rank copies its own shard; call on every rank).
    Raises HFCheckpointError naming the tensor and file for missing, unexpected or mis-shaped tensors.
    """
    from safetensors import safe_open

    files = weight_files(path)
    targets = {hf_name(k): (k, v) for k, v in model.state_dict().items() if "lora_" not in k}
    tied = model.output is None
    # Older exports carry rotary buffers; tied checkpoints may still store lm_head (HF ignores it then).
    ignored = {k for k in files if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")}
    missing = sorted(set(targets) - set(files))
    unexpected = sorted(set(files) - set(targets) - ignored)
    if missing or unexpected:
        raise HFCheckpointError(
            f"{path} does not match its config.json ({model.cfg.n_layers} layers, tie_word_embeddings={tied}): "
            f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected tensors "
            f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}.")
    by_file: dict[str, list[str]] = {}
    for key in targets:
        by_file.setdefault(files[key], []).append(key)
    for name, keys in sorted(by_file.items()):
        with safe_open(os.path.join(path, name), framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise HFCheckpointError(f"{os.path.join(path, name)} lacks tensor {key!r} that {INDEX_FILE} maps to it.")
                tensor = f.get_tensor(key)
                ours, param = targets[key]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise HFCheckpointError(
                        f"tensor {key!r} in {os.path.join(path, name)} has shape {list(tensor.shape)} but config.json "
                        f"(hidden_size={model.cfg.dim}, num_attention_heads={model.cfg.n_heads}, num_key_value_heads="
                        f"{model.cfg.kv_heads}, intermediate_size={model.cfg.ffn_dim}, vocab_size="
                        f"{model.cfg.vocab_size}) implies {list(param.shape)} for {ours}.")
                if hasattr(param, "device_mesh"):
                    # FSDP2 DTensor: every rank read the full tensor, so each keeps its own shard with no
                    # communication (src_data_rank=None).
                    from torch.distributed.tensor import distribute_tensor

                    tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh,
                                               param.placements, src_data_rank=None)
                param.copy_(tensor)


def load_hf(path: str, *, rope_scaling: Union[dict, None, str] = "checkpoint", attn_fn=None,
            dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu") -> Llama:
    """Build a :class:`Llama` from a local HF checkpoint directory.

    Args:
        path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
        rope_scaling: ``"checkpoint"`` keeps the file's rope_scaling; a dict (or None) replaces it.
        attn_fn: the model's attention (None: single-device default). dtype: cast parameters (None: fp32).
        device: where the model lives.
    Raises:
        HFCheckpointError: missing/invalid files or fields, naming them.
    """
    hf = read_hf_config(path)
    overrides = {} if rope_scaling == "checkpoint" else {"rope_scaling": rope_scaling}
    cfg = model_config_from_hf(hf, file=os.path.join(path, CONFIG_FILE), **overrides)
    with torch.device(device):
        model = Llama(cfg, attn_fn=attn_fn)
    load_hf_weights(model, path)
    return model.to(dtype) if dtype is not None else model


def resolve_init_from(cfg: ModelConfig) -> ModelConfig:
    """For ``model.init_from``: the model config of that HF checkpoint, keeping ``cfg.rope_scaling``
    (and ``cfg.max_position_embeddings``) when set, so an experiment only names the scaling.

    A new config (``cfg`` is frozen), built once by ``seqpar.train.resolve.resolve_config``; idempotent,
    so resolving a resolved config changes nothing. Raises HFCheckpointError naming the file and field.
    """
    hf = read_hf_config(cfg.init_from)
    overrides = {"init_from": cfg.init_from}
    if cfg.rope_scaling is not None:
        overrides["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.max_position_embeddings is not None:
        overrides["max_position_embeddings"] = cfg.max_position_embeddings
    return model_config_from_hf(hf, file=os.path.join(cfg.init_from, CONFIG_FILE), **overrides)


def save_hf(model: Llama, path: str, *, dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30,
            source: Optional[str] = None) -> list[str]:
    """Write ``model`` as an HF Llama checkpoint: config.json plus model.safetensors, or shards
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` past ``max_shard_bytes``.

    LoRA adapters are merged into the written weights (the model itself is not changed). ``source``:
    an HF directory whose extra config fields and tokenizer files are carried over. Returns the
    written file names. ``dtype`` casts the weights (None: as they are).
    """
    from safetensors.torch import save_file

    from seqpar.models.lora import merged_state_dict

    os.makedirs(path, exist_ok=True)
    state = {hf_name(k): v.detach().to("cpu").contiguous() for k, v in merged_state_dict(model, dtype).items()}
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(state):  # greedy by bytes, in a stable order
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    written = []
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})  # "pt": what transformers expects
        written.append(name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: written[i] for i, s in enumerate(shards) for k in s}}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        written.append(INDEX_FILE)
    base = read_hf_config(source) if source else None
    weight_dtype = next(iter(state.values())).dtype
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config_from_model(model.cfg, weight_dtype, base), f, indent=2, sort_keys=True)
    written.append(CONFIG_FILE)
    for name in _SIDE_FILES if source else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
            written.append(name)
    return written
