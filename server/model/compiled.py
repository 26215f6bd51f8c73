"""The compiled decode step: every transformer block through one torch.compile graph.

A decode step (every row one sequence's next token) runs the same ops whatever its rows hold:
the batch builder's persistent buffers, the adapter ops over every slot (kernels), attention and
KV writes as custom ops. So the step compiles once and is reused:
- *Regional*: the unit compiled is one block (`llama.run_block`), with fullgraph=True. A block
  takes its layer's state as arguments (cache views, adapter stacks), so every layer reuses the
  one graph and a model of any depth compiles in about the time of one layer. Embedding, RoPE
  angles, the final norm and the LM head run eagerly around it.
- *Batch sizes*: on CUDA, steps are padded to a bucket size (padding rows carry slot -1 and
  write their K/V into the trash block) and each bucket's whole step is captured as a CUDA
  graph, with the batch builder's buffers as its fixed inputs. On CPU there is nothing to
  capture: the batch dimension is marked dynamic, so one graph serves every size (0 and 1 are
  specialized by torch, so a single-row step is a second graph). Block tables are as wide as
  the step's longest context, a dynamic size too: a width of 1 (every context within one
  block) is its own graph again.
- *Warm-up*: `warm_up` compiles every one of these shapes (`warm_shapes`) on padding rows
  before the engine says it is ready; a shape first met under traffic compiled on the engine
  thread and froze every stream for seconds (BENCHMARKS.md, 'Figures quoted from the code'). Not warmed:
  the adapter variant, whose graph follows the pool's structure (the stacks that loaded
  adapters allocate), so the first decode with an adapter row after a start or a structure
  change still compiles under traffic, streams frozen meanwhile.
- *Variants*: a step with no adapter token runs no hook (one graph); a step with adapters runs
  every stack the pool holds (another). A change in the pool's structure (a stack allocated
  or grown) changes the traced code's guards: one recompile, then steady again.

The inductor cache lives under `cache_dir`, so a second start finds its compiled code. If
compiling fails, the engine falls back to eager with one warning (see `Engine`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch._dynamo

from adapterserve.server.model.batch import ForwardBatch
from adapterserve.server.model.llama import KVCache, Transformer, run_block

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs per compiled function: batch buckets x adapter variants x pools
CUDA_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def use_inductor_cache(cache_dir: Path) -> Path:
    """Compiled code goes to `cache_dir`/inductor (read by torch at each compile)."""
    folder = Path(cache_dir) / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def buckets_for(device: torch.device, max_num_seqs: int) -> tuple[int, ...] | None:
    """Padded batch sizes on CUDA (one captured graph each); None on CPU (dynamic size)."""
    if device.type != "cuda":
        return None
    sizes = [b for b in CUDA_BUCKETS if b < max_num_seqs]
    return (*sizes, max_num_seqs)


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= size)


class DummyBatches(Protocol):
    """What the compiled step needs of the engine's BatchBuilder (server/engine/batch.py):
    batches of padding rows to compile and capture ahead of traffic. They must fill the same
    buffers as the steps that follow: a captured CUDA graph replays over those tensors."""

    @property
    def max_decode_rows(self) -> int: ...

    @property
    def max_blocks_per_seq(self) -> int: ...

    def dummy(self, rows: int, width: int = 1) -> ForwardBatch: ...


class CompiledDecode:
    """Runs decode-only steps through the compiled blocks (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        builder: DummyBatches,
        buckets: tuple[int, ...] | None,
    ) -> None:
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
        )
        self.model, self.cache, self.builder, self.buckets = model, cache, builder, buckets
        compiled = torch.compile(run_block, fullgraph=True, dynamic=False if buckets else None)
        self.block_fn: Callable = compiled if buckets else dynamic_rows(compiled)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if cache.k.is_cuda else None

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of every row of a decode-only batch (built padded to a bucket when there are
        buckets: replayed as a CUDA graph on CUDA, a static-shape graph elsewhere)."""
        if self.buckets is None:
            mark_batch_dynamic(batch)
            return self.run(batch)
        if self.cache.k.is_cuda:
            return self.replay(batch)
        return self.run(batch)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.model
        return model.finish(
            model.run_layers(model.embed(batch), batch, self.cache, self.block_fn), batch
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """CUDA: the captured graph of this bucket and variant (captured on first use), replayed
        over the builder's buffers, which `batch` has just filled. Graphs share one memory pool
        (replays never overlap); those of an older pool structure are dropped."""
        structure = self.model.hooks.pool.structure if self.model.hooks is not None else -1
        key = (batch.num_tokens, batch.adapters is not None, structure)
        if key not in self.graphs:
            self.graphs = {k: v for k, v in self.graphs.items() if k[2] == structure}
            self.graphs[key] = self.capture(batch)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def capture(self, batch: ForwardBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (compiling, Triton autotuning, cuBLAS workspaces stay out
        of the graph), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self.run(batch)
        return graph, logits

    def pad_to(self, num_decodes: int) -> int | None:
        """The bucket a decode step of `num_decodes` rows is padded to (None: no padding)."""
        return None if self.buckets is None else bucket(num_decodes, self.buckets)

    def warm_shapes(self) -> list[tuple[int, int]]:
        """(rows, block table width) of every graph a no-adapter decode step can need. Buckets:
        one each (tables at full width). Dynamic: rows and width are symbolic sizes, but torch
        specializes a size of 1, so 1 or 2 rows by 1 or 2 table columns (a first decode past
        `block_size` tokens of context compiled anew)."""
        if self.buckets is not None:
            return [(size, 1) for size in self.buckets]
        rows = dict.fromkeys((1, min(2, self.builder.max_decode_rows)))
        widths = dict.fromkeys((1, min(2, self.builder.max_blocks_per_seq)))
        return [(r, w) for r in rows for w in widths]

    def warm_up(self) -> tuple[int, float]:
        """Compile (and on CUDA capture) the no-adapter step for each of `warm_shapes` on
        padding rows; returns how many shapes and the seconds it took."""
        started = time.perf_counter()
        shapes = self.warm_shapes()
        for rows, width in shapes:
            self.forward(self.builder.dummy(self.pad_to(rows) or rows, width))
        if self.cache.k.is_cuda:
            torch.cuda.synchronize()
        return len(shapes), time.perf_counter() - started


def dynamic_rows(block_fn: Callable) -> Callable:
    """`block_fn` with the row dimension of the tensors made per step (x, RoPE angles) marked
    dynamic before each call; the batch's own tensors are marked by mark_batch_dynamic."""

    def call(block, x, cos, sin, kv, step, adapting):
        for tensor in (x, cos, sin):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return block_fn(block, x, cos, sin, kv, step, adapting)

    return call


def mark_batch_dynamic(batch: ForwardBatch) -> None:
    """The batch dimension of every tensor a block reads is a symbolic size (CPU: one graph for
    every batch size). Block tables are as wide as the longest context: dynamic too."""
    for tensor in (
        batch.token_ids,
        batch.positions,
        batch.slot_mapping,
        batch.decode_context_lens,
        batch.logits_indices,
    ):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    torch._dynamo.maybe_mark_dynamic(batch.decode_block_tables, 0)
    torch._dynamo.maybe_mark_dynamic(batch.decode_block_tables, 1)
    if batch.adapters is not None:
        for tensor in (batch.adapters.slot_ids, batch.adapters.onehot, batch.adapters.base_rows):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
