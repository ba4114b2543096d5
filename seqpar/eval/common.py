"""What the long-context evaluations share: loading a model, RoPE scaling variants, text, outputs.

A checkpoint argument is either a Hugging Face Llama directory (``config.json`` + safetensors, see
:mod:`seqpar.models.hf`) or a seqpar run directory (``<run_dir>/checkpoints/step-N``): its model
config comes from ``<run_dir>/config.yaml`` when the trainer wrote one, else from the same Hydra
overrides ``train.py`` took (``model=tiny model.dim=64 ...``). LoRA adapters found in a run
checkpoint are applied and merged, so the evaluated model is the fine-tuned one.

A scaling variant (``--scaling``) is ``checkpoint`` (the model's own), ``none``, ``TYPE:FACTOR``
(``yarn:4``, ``linear:4``, ``ntk:4``, ``dynamic:4``, ``llama3:4``; the original length is the
training length) or a JSON dict. Length-dependent scalings (dynamic) are recomputed per length.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from seqpar.config import Config, ConfigError
from seqpar.models.llama import Llama


@dataclass
class Loaded:
    """A model ready for evaluation, its tokenizer, the length it was trained at, and its source."""

    model: Llama
    tokenizer: object  # .encode(str) -> int array; .bos_id / .eos_id (None for a bare tokenizer.json)
    train_len: int
    source: str
    data: Optional[object] = None  # the run's DataConfig (its val split is the held-out text)


class JsonTokenizer:
    """A ``tokenizer.json`` shipped with an HF checkpoint (needs the ``tokenizers`` package)."""

    bos_id = eos_id = None

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def _run_config(run_dir: str, overrides: Sequence[str]) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        from omegaconf import OmegaConf

        from seqpar.config import register_configs

        register_configs()  # resets derived fields of the schema, as train.py does
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path),
                                 OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
        return OmegaConf.to_object(merged)
    from seqpar.cli import load_config

    return load_config(list(overrides))


def _latest_step_dir(run_dir: str) -> str:
    from seqpar.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        raise ConfigError(f"{run_dir} has no complete checkpoint under checkpoints/ (train with checkpoint.every > 0), "
                          "and no config.json of a Hugging Face checkpoint either.")
    return found[-1][1]


def _model_shapes(step_dir: str) -> dict[str, tuple]:
    """``{parameter name: shape}`` of the model in a checkpoint: a DCP folder (``.metadata``, the
    trainer's format, model under the ``model.`` prefix) or a legacy ``rank-0.pt``."""
    if os.path.isfile(os.path.join(step_dir, ".metadata")):
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(step_dir).read_metadata().state_dict_metadata
        return {k[len("model."):]: tuple(v.size) for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}
    part = os.path.join(step_dir, "rank-0.pt")
    if os.path.isfile(part):
        return {k: tuple(v.shape) for k, v in torch.load(part, map_location="cpu", weights_only=True)["model"].items()}
    raise ConfigError(f"{step_dir} is neither a DCP checkpoint (.metadata) nor has rank-0.pt.")


def _load_state(model: Llama, step_dir: str) -> None:
    if os.path.isfile(os.path.join(step_dir, ".metadata")):
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=step_dir)  # reads only the "model" entries
        model.load_state_dict(state["model"])
    else:
        model.load_state_dict(torch.load(os.path.join(step_dir, "rank-0.pt"), map_location="cpu",
                                         weights_only=True)["model"])


def load_model(checkpoint: str, overrides: Sequence[str] = (), device: str = "cpu") -> Loaded:
    """Load an HF directory or a seqpar run directory for evaluation (see the module docstring).

    Raises ConfigError (HFCheckpointError is one) naming the missing file or field.
    """
    from seqpar.data.tokenizer import ByteTokenizer, build_tokenizer

    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        from seqpar.models.hf import load_hf, read_hf_config

        model = load_hf(checkpoint, device=device)
        tok_file = os.path.join(checkpoint, "tokenizer.json")
        tokenizer = JsonTokenizer(tok_file) if os.path.isfile(tok_file) else ByteTokenizer()
        scaling = model.cfg.rope_scaling or {}
        train_len = int(scaling.get("original_max_position_embeddings")
                        or read_hf_config(checkpoint).get("max_position_embeddings") or 2048)
        return Loaded(model.eval(), tokenizer, train_len, checkpoint)
    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint!r} is neither a Hugging Face directory nor a run directory.")
    import dataclasses

    from seqpar.data.corpus import iter_documents
    from seqpar.models.lora import apply_lora, merge_lora

    cfg = _run_config(checkpoint, overrides)
    step_dir = _latest_step_dir(checkpoint)
    shapes = _model_shapes(step_dir)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or shapes["tok_embeddings.weight"][0])
    model = Llama(model_cfg)
    if any(k.endswith("lora_A") for k in shapes):
        lora = cfg.lora
        if lora.rank == 0:  # adapters in the checkpoint but no config: the rank is in the shapes
            lora = dataclasses.replace(lora, rank=next(v[0] for k, v in shapes.items() if k.endswith("lora_A")))
        apply_lora(model, lora)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = sorted(k for k in set(ours) | set(shapes) if ours.get(k) != shapes.get(k))
    if bad:
        raise ConfigError(f"{step_dir} does not fit the model config: {bad[0]} is {shapes.get(bad[0])} in the checkpoint "
                          f"but {ours.get(bad[0])} in the model ({len(bad)} mismatches); pass the run's overrides "
                          "(model.dim=..., model.n_layers=..., lora.rank=...) or train with a config.yaml in the run dir.")
    _load_state(model, step_dir)
    merge_lora(model)
    tokenizer = build_tokenizer(cfg.data, lambda: iter_documents(cfg.data))
    return Loaded(model.to(device).eval(), tokenizer, cfg.train.seq_len, checkpoint, cfg.data)


def parse_scaling(spec: str, model: Llama, train_len: int) -> Optional[dict]:
    """One ``--scaling`` value -> a rope_scaling dict (or None); ConfigError for a malformed one."""
    if spec == "checkpoint":
        return dict(model.cfg.rope_scaling) if model.cfg.rope_scaling else None
    if spec == "none":
        return None
    if spec.startswith("{"):
        return json.loads(spec)
    rope_type, _, factor = spec.partition(":")
    if not factor:
        raise ConfigError(f"--scaling {spec!r}: use checkpoint, none, TYPE:FACTOR (e.g. yarn:4) or a JSON dict.")
    scaling = {"rope_type": rope_type, "factor": float(factor), "original_max_position_embeddings": train_len}
    if rope_type == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return scaling


def eval_text_stream(loaded: Loaded, text_file: Optional[str], max_tokens: int) -> np.ndarray:
    """Held-out token ids ``[<= max_tokens]``: ``text_file`` encoded, or the val split of the run's
    corpus (the embedded stdlib corpus for an HF checkpoint), documents packed with BOS/EOS."""
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            return loaded.tokenizer.encode(f.read())[:max_tokens].astype(np.int64)
    from seqpar.config import DataConfig
    from seqpar.data.corpus import iter_documents
    from seqpar.data.packing import pack_documents, split_documents

    # The val split depends only on the corpus (fixed split seed), not on train.seed: the run's own
    # data config gives exactly the documents it never trained on.
    data = loaded.data if loaded.data is not None else DataConfig()
    docs = [loaded.tokenizer.encode(d) for d in iter_documents(data)]
    _, val = split_documents(len(docs), data.val_fraction, seed=0)
    if loaded.tokenizer.bos_id is not None:
        ids = pack_documents([docs[i] for i in val], loaded.tokenizer.bos_id, loaded.tokenizer.eos_id).tokens
    else:
        sep = loaded.tokenizer.encode("\n\n")
        ids = np.concatenate([np.concatenate([docs[i], sep]) for i in val])
    return ids[:max_tokens].astype(np.int64)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="HF Llama directory or seqpar run directory")
    parser.add_argument("--out", required=True, help="output directory for the table (md, json) and the PNG")
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1x, 2x, 4x train length)")
    parser.add_argument("--scaling", action="append", default=None,
                        help="RoPE variant, repeatable: checkpoint | none | TYPE:FACTOR | JSON (default: checkpoint)")
    parser.add_argument("--train-len", type=int, default=None, help="training length (default: from the checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides for a run directory without config.yaml")


def lengths_arg(spec: Optional[str], train_len: int) -> list[int]:
    return [train_len, 2 * train_len, 4 * train_len] if not spec else [int(x) for x in spec.split(",")]


def write_results(out_dir: str, name: str, rows: list[dict], columns: list[str], meta: dict) -> str:
    """Write ``<name>.md`` (a table) and ``<name>.json`` (rows + meta) into ``out_dir``; return the table."""
    os.makedirs(out_dir, exist_ok=True)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    meta = {**meta, "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {name}\n\n{json.dumps(meta)}\n\n{table}\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return table


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the evaluation plots need matplotlib: pip install 'seqpar[eval]' (or matplotlib)") from e
    return plt


def run_cli(main, argv: Optional[Sequence[str]] = None) -> int:
    """Run an eval ``main``; user mistakes (missing file, bad field) end in one ``error:`` line, exit 2."""
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("SEQPAR_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
