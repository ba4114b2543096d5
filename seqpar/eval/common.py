"""What the long-context evaluations share: loading a model, RoPE scaling variants, text, outputs.

A checkpoint argument is either a Hugging Face Llama directory (``config.json`` + safetensors, see
:mod:`seqpar.models.hf`) or a seqpar run directory (``<run_dir>/checkpoints/step-N``): its model
config comes from ``<run_dir>/config.yaml`` when the trainer wrote one, else from the same Hydra
overrides ``train.py`` took (``model=tiny model.dim=64 ...``). LoRA adapters found in a run
checkpoint are applied and merged, so the evaluated model is the fine-tuned one. The tokenizer is the
one the run trained with (``data.tokenizer``), or the HF directory's own
(:func:`~seqpar.data.tokenizer.checkpoint_tokenizer`: its tokenizer.json with BOS/EOS, bytes when it
has none), so held-out text is packed exactly as training packs it.

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
from seqpar.models.build import build_model
from seqpar.models.llama import Llama


@dataclass
class Loaded:
    """A model ready for evaluation, its tokenizer, the length it was trained at, and its source."""

    model: Llama
    tokenizer: object  # one of seqpar.data.tokenizer's: .encode(str) -> int array, .bos_id, .eos_id
    train_len: int
    source: str
    data: Optional[object] = None  # the run's DataConfig (its val split is the held-out text)


def _run_config(run_dir: str, overrides: Sequence[str]) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        from seqpar.cli import load_config_file

        return load_config_file(path, [o for o in overrides if "=" in o])
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
    """``{parameter name: shape}`` of the model in a trainer checkpoint: DCP's ``.metadata`` lists every
    tensor, the model's under the ``model.`` prefix. ConfigError for a folder that is not DCP."""
    if not os.path.isfile(os.path.join(step_dir, ".metadata")):
        raise ConfigError(f"{step_dir} is not a DCP checkpoint (no .metadata): the trainer writes its checkpoints "
                          "with torch.distributed.checkpoint; point --checkpoint at a run directory it wrote, or at "
                          "a Hugging Face directory.")
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(step_dir).read_metadata().state_dict_metadata
    return {k[len("model."):]: tuple(v.size) for k, v in meta.items() if k.startswith("model.") and hasattr(v, "size")}


def _load_model_state(model: Llama, step_dir: str) -> None:
    """Read only the ``model`` entries of a DCP checkpoint into ``model`` (one process, no group)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=step_dir)
    model.load_state_dict(state["model"])


def load_model(checkpoint: str, overrides: Sequence[str] = (), device: str = "cpu") -> Loaded:
    """Load an HF directory or a seqpar run directory for evaluation (see the module docstring).

    Raises ConfigError (HFCheckpointError is one) naming the missing file or field.
    """
    from seqpar.data.tokenizer import build_tokenizer, checkpoint_tokenizer

    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        from seqpar.models.hf import load_hf, read_hf_config

        model = load_hf(checkpoint, device=device)
        tokenizer = checkpoint_tokenizer(checkpoint)
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
    model = build_model(model_cfg)  # every model.attention / model.arch option, not only dense Llama
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
    _load_model_state(model, step_dir)
    merge_lora(model)
    tokenizer = build_tokenizer(cfg.data, lambda: iter_documents(cfg.data), directory=cfg.tokenizer_dir)
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
    ids = pack_documents([docs[i] for i in val], loaded.tokenizer.bos_id, loaded.tokenizer.eos_id).tokens
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


def load_from_args(args: argparse.Namespace) -> tuple[Loaded, int, list[int], dict]:
    """What every evaluation CLI starts from (the arguments of :func:`add_common_args`): the loaded
    model, its training length, the context lengths (default 1x, 2x, 4x) and ``{--scaling: rope_scaling}``."""
    loaded = load_model(args.checkpoint, args.overrides, args.device)
    train_len = args.train_len or loaded.train_len
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [train_len, 2 * train_len, 4 * train_len]
    scalings = {s: parse_scaling(s, loaded.model, train_len) for s in args.scaling or ["checkpoint"]}
    return loaded, train_len, lengths, scalings


def length_axis(ax, lengths: Sequence[int], train_len: Optional[int] = None) -> None:
    """A log2 context-length x axis ticked at exactly ``lengths``, the training length dashed."""
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=1, label="train length")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()  # log-axis minor labels would overprint the length ticks
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")


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
