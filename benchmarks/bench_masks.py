"""Masked ring attention on GPUs: packed documents and sliding windows, time and effective TFLOP/s.

Run (2 GPUs; world sizes 1 and 2):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node=2 benchmarks/bench_masks.py --out benchmarks/results \\
        [--seqs 131072,262144,524288] [--world-sizes 1,2] [--window 4096] [--no-torch-cp]

bf16, batch 1, 32 heads, head_dim 128, fwd+bwd, median of CUDA-event timings; the slowest rank counts.
Masks and layouts (seqpar ring, backend auto):
* ``causal``: the plain causal mask on zigzag (the dense baseline);
* ``docs``: packed stdlib documents (byte tokenizer, the trainer's packing: BOS doc EOS ...), causal +
  document mask, on the ``docs`` layout (cost-balanced) and on ``zigzag`` (for the imbalance);
* ``window``: causal sliding window ``--window`` on ``contiguous`` (ring stops after ceil(W / M) steps).
Effective TFLOP/s = FLOPs of the VISIBLE pairs only (4 * D * H * pairs * 3.5 for fwd+bwd) / world size /
time; ``vs dense`` = effective TFLOP/s / the causal row's TFLOP/s at the same length and world size
(target >= 0.8: a masked step is about as much faster as its work is smaller). ``imbalance`` = max / mean
of the visible pairs per rank (``seqpar.parallel.visible_pairs_per_rank``). For the window, ``vs blocks``
= time / ((S / W) x the time of one dense W x W block on one GPU, / world size) (target <= 1.25 at 512k).
``torch_cp_flex``: torch's experimental context parallel with FlexAttention and the same mask (its
per-document load balancer), where it runs; a failure is recorded as the row's status.
Writes ``masks_<device>_x<N>_<date>.json``, ``.md`` and ``_time.png`` (time vs length per mask) under ``--out``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/report.py
from bench_ring import time_fwd_bwd  # noqa: E402  (CUDA-event timing shared with the ring benchmark)
from report import environment, group_series, line_plot, markdown_table, stem, write_outputs  # noqa: E402
from seqpar.ops import Mask  # noqa: E402
from seqpar.parallel import ring_attention, ring_work, shard_sequence, visible_pairs_per_rank  # noqa: E402

HEADS, HEAD_DIM = 32, 128


def stdlib_doc_ids(seq_len: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """``[batch, seq_len]`` document ids of packed stdlib documents as the trainer packs them (byte
    tokenizer: a document of n bytes is n + 2 tokens with BOS/EOS), shuffled by ``seed``."""
    from seqpar.data.corpus import stdlib_documents

    lengths = [len(d.encode("utf-8")) + 2 for d in stdlib_documents()]
    rows = []
    for b in range(batch):
        order = list(range(len(lengths)))
        random.Random(seed + b).shuffle(order)
        ids, doc = [], 0
        while len(ids) < seq_len:
            ids += [doc] * lengths[order[doc % len(order)]]
            doc += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def mask_for(kind: str, seq_len: int, window: int, doc_ids=None) -> Mask:
    if kind == "causal":
        return Mask(causal=True)
    if kind == "docs":
        return Mask(causal=True, doc_ids=doc_ids if doc_ids is not None else stdlib_doc_ids(seq_len))
    if kind == "window":
        return Mask(causal=True, window=window)
    raise ValueError(f"unknown mask kind {kind!r}")


def visible_flops(pairs: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    """fwd+bwd FLOPs of ``pairs`` visible (query, key) pairs: QK^T and PV (2 x 2 D each), x3.5 with backward."""
    return 4.0 * head_dim * heads * pairs * 3.5


def plan_rows(seqs, world_sizes, window: int, torch_cp: bool) -> list[dict]:
    """The benchmark's rows (mask, layout, method, length, world size) before timing."""
    rows = []
    for seq in seqs:
        for ws in world_sizes:
            # the masked rows run on the kernel auto picks for them (Triton: cuDNN/flash take no masks), so the
            # dense baseline is the causal row on Triton; the cuDNN causal row shows the fastest dense kernel
            combos = [("causal", "zigzag", "auto"), ("causal", "zigzag", "triton"), ("docs", "docs", "auto"),
                      ("docs", "zigzag", "auto"), ("window", "contiguous", "auto")]
            for kind, layout, backend in combos:
                if ws == 1 and kind == "docs" and layout != "docs":
                    continue  # one rank holds the whole sequence: the layouts differ only in the ring
                rows.append(dict(mask=kind, layout=layout, method="ring", backend=backend, seq=seq, ws=ws))
            if torch_cp and ws > 1:
                for kind in ("causal", "docs", "window"):
                    rows.append(dict(mask=kind, layout="ptrr", method="torch_cp_flex", backend="flex", seq=seq, ws=ws))
    return rows


def masked_work(row: dict, window: int, doc_ids=None) -> dict:
    """Host-side columns of a row: visible pairs (total and per rank), imbalance, ring steps and calls."""
    mask = mask_for(row["mask"], row["seq"], window, doc_ids)
    layout = row["layout"] if row["method"] == "ring" else "zigzag"
    per_rank = visible_pairs_per_rank(mask, layout, row["ws"], row["seq"])
    work = ring_work(mask, layout, row["ws"], row["seq"] // row["ws"]) if row["method"] == "ring" else {}
    mean = sum(per_rank) / len(per_rank)
    return dict(pairs=sum(per_rank), pairs_per_rank=per_rank, imbalance=max(per_rank) / mean if mean else None,
                steps=work.get("steps"), calls=work.get("calls"))


def _ring_step(row, mask, group, device):
    ws, seq, layout = row["ws"], row["seq"], row["layout"]
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(1, seq, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
    ids = mask.doc_ids
    r, n = (dist.get_rank(group), ws) if group is not None else (0, 1)
    # ws=1: the whole sequence on this GPU (a ring of one), not this rank's shard of the launched world
    sh = lambda t: shard_sequence(t, 1, rank=r, world_size=n, layout=layout, doc_ids=ids) if n > 1 else t
    q, k, v = (sh(mk()).requires_grad_() for _ in range(3))
    dout = sh(mk())  # a real gradient: `.sum().backward()` feeds a stride-0 tensor of ones some kernels read faster
    dev_mask = Mask(causal=mask.causal, window=mask.window, doc_ids=None if ids is None else ids.to(device))
    from seqpar.parallel.ring_plan import build_plan

    be = row.get("backend", "auto")
    plan = build_plan(q, k, mask=dev_mask, causal=False, layout=layout, rank=r, world_size=n, backend=be)
    return (lambda: ring_attention(q, k, v, group=group, mask=dev_mask, layout=layout, validate=False,
                                   plan=plan, backend=be)), (q, k, v), dout


def _torch_cp_step(row, mask, mesh, device):
    """torch's experimental context parallel + FlexAttention (block mask sharded by its PTRR balancer)."""
    from torch.distributed.tensor.experimental._attention import (_context_parallel_shard, _ContextParallel,
                                                                  _PTRRLoadBalancer)
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq, ids = row["seq"], None if mask.doc_ids is None else mask.doc_ids[0].to(device)

    def mask_mod(b, h, qi, ki):
        ok = qi >= ki
        if mask.window is not None:
            ok = ok & (qi - ki <= mask.window)
        if ids is not None:
            ok = ok & (ids[qi] == ids[ki])
        return ok

    class Flex(torch.nn.Module):
        def forward(self, q, k, v, block_mask):
            return flex_attention(q, k, v, block_mask=block_mask)

    module = parallelize_module(Flex(), mesh, _ContextParallel(seq_dim=2,
                                                               attention_type=_ContextParallel.AttentionType.FLEX))
    block_mask = create_block_mask(mask_mod, 1, 1, seq, seq, device=device, _compile=True)  # no [S, S] tensor
    mk = lambda: torch.randn(1, HEADS, seq, HEAD_DIM, device=device, dtype=torch.bfloat16)
    q, k, v, bm = _context_parallel_shard(mesh, [mk(), mk(), mk(), block_mask], [2, 2, 2, 2],
                                          load_balancer=_PTRRLoadBalancer(block_mask, row["ws"]))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = torch.compile(module)
    return (lambda: fn(q, k, v, block_mask=bm)), (q, k, v), torch.randn_like(q)


def block_ms(window: int, device, warmup: int, iters: int) -> float:
    """One dense W x W block (fwd+bwd) on one GPU, on the kernel the window rows use (Triton): the unit of
    the window's linear-time target."""
    from seqpar.ops import attention

    q, k, v = (torch.randn(1, window, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return time_fwd_bwd(lambda: attention(q, k, v, backend="triton"), (q, k, v), torch.randn_like(q), warmup, iters)


def derive(rows: list, window: int, t_block: float | None) -> list:
    """Effective TFLOP/s, ``vs dense`` (against the causal row) and ``vs blocks`` (window rows)."""
    for r in rows:
        ms = r.get("ms")
        r["tflops"] = visible_flops(r["pairs"]) / r["ws"] / (ms * 1e-3) / 1e12 if ms else None
    dense = {(r["seq"], r["ws"], r["method"], r.get("backend", "auto")): r["tflops"] for r in rows
             if r["mask"] == "causal"}
    for r in rows:  # the same kernel's causal row (seqpar: Triton; torch CP: its own Flex row, else the ring's)
        own = (r["seq"], r["ws"], r["method"], "flex" if r["method"] != "ring" else "triton")
        base = dense.get(own) or dense.get((r["seq"], r["ws"], "ring", "triton"))
        r["vs_dense"] = r["tflops"] / base if r.get("tflops") and base else None
        if r["mask"] == "window" and r.get("ms") and t_block:
            r["vs_blocks"] = r["ms"] / (r["seq"] / window * t_block / r["ws"])
    return rows


COLUMNS = [("mask", "mask", ""), ("layout", "layout", ""), ("method", "method", ""), ("kernel", "backend", ""),
           ("tokens", "seq", ","),
           ("GPUs", "ws", ""), ("ms", "ms", ".1f"), ("eff. TFLOP/s/GPU", "tflops", ".1f"), ("vs dense", "vs_dense", ".2f"),
           ("imbalance", "imbalance", ".3f"), ("ring steps", "steps", ""), ("vs blocks", "vs_blocks", ".2f"),
           ("status", "status", "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seqs", default="131072,262144,524288")
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-torch-cp", action="store_true")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    seqs = [int(s) for s in a.seqs.split(",")]
    wss = [w for w in (int(x) for x in a.world_sizes.split(",")) if w <= world]
    groups = {w: dist.new_group(list(range(w))) for w in wss}  # every rank creates every group
    rows = plan_rows(seqs, wss, a.window, not a.no_torch_cp)
    docs = {seq: stdlib_doc_ids(seq) for seq in seqs}
    t_block = block_ms(a.window, device, a.warmup, a.iters)
    meta = environment()
    name = stem("masks", meta, world)
    for row in rows:
        row.update(masked_work(row, a.window, docs[row["seq"]] if row["mask"] == "docs" else None))
        if rank < row["ws"]:
            mask = mask_for(row["mask"], row["seq"], a.window, docs.get(row["seq"]))
            try:
                if row["method"] == "ring":
                    step, leaves, dout = _ring_step(row, mask, groups[row["ws"]] if row["ws"] > 1 else None, device)
                else:
                    from torch.distributed.device_mesh import init_device_mesh

                    step, leaves, dout = _torch_cp_step(row, mask, init_device_mesh("cuda", (row["ws"],)), device)
                row["ms"] = time_fwd_bwd(step, leaves, dout, a.warmup, a.iters)
            except Exception as exc:  # noqa: BLE001  (a row that fails is reported, the run goes on)
                row["ms"], row["status"] = None, ("OOM" if "out of memory" in str(exc).lower()
                                                  else f"{type(exc).__name__}: {exc}"[:200])
            torch.cuda.empty_cache()
        ms = torch.tensor([row.get("ms") or float("nan")], device=device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank (nan: failed somewhere)
        row["ms"] = None if ms.isnan().item() else ms.item()
        row.setdefault("status", "ok" if row["ms"] else "failed")
        if rank == 0:  # after every row: a run cut short keeps what it measured
            done = derive([r for r in rows if "status" in r], a.window, t_block)
            print({k: row.get(k) for k in ("mask", "layout", "backend", "seq", "ws", "ms", "status")}, flush=True)
            write_outputs(a.out, name, meta, {"rows": done, "window": a.window, "block_ms": t_block},
                          markdown_table(done, COLUMNS))
    derive(rows, a.window, t_block)
    if rank == 0:
        md = markdown_table(rows, COLUMNS)
        write_outputs(a.out, name, meta, {"rows": rows, "window": a.window, "block_ms": t_block}, md)
        line_plot(os.path.join(a.out, name + "_time.png"),
                  group_series(rows, lambda r: f"{r['mask']} {r['layout']} {r['method']} x{r['ws']}", "seq", "ms"),
                  xlabel="total tokens", ylabel="fwd+bwd ms", title="masked ring attention", logx=True)
        print(md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
