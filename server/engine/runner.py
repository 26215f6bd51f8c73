"""ModelRunner: the model, its paged KV cache, the batch builder and the compiled decode step.
A StepPlan in, logits out; and the writes into the cache that a plan asks for (a prefix-tuned
sequence's virtual K/V at admission). It runs on the engine thread only."""

from __future__ import annotations

import logging

import torch

from adapterserve.adapters.kinds import kind_for
from adapterserve.server.config import Settings
from adapterserve.server.engine.batch import BatchBuilder
from adapterserve.server.engine.scheduler import Sequence, StepPlan
from adapterserve.server.model.compiled import CompiledDecode, buckets_for, use_inductor_cache
from adapterserve.server.model.llama import KVCache, Transformer

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        settings: Settings,
        max_model_len: int,
        num_blocks: int,
        num_adapter_slots: int,
    ) -> None:
        self.model, self.settings = model, settings
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.args, num_blocks, settings.block_size, dtype, device)
        self.builder = BatchBuilder(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            block_size=settings.block_size,
            max_blocks_per_seq=-(-max_model_len // settings.block_size),
            trash_block=self.cache.trash_block,
            num_adapter_slots=num_adapter_slots,
            device=device,
        )
        self.compiled: CompiledDecode | None = None  # set by enable_compile
        self.warming = False  # compiling the decode step's shapes (before the engine is ready)

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits of the plan's rows, after the cache writes it asks for: decode-only steps
        through the compiled step when there is one (a failure there turns it off for good,
        with one warning, and the step runs eagerly: rewriting the same K/V slots is
        harmless)."""
        for seq in plan.prefix_writes:
            self.write_prefix(seq)
        compiled = self.compiled
        if compiled is not None and plan.num_decodes == len(plan.work):
            try:
                batch = self.builder.build(plan, compiled.pad_to(plan.num_decodes), dense=True)
                return compiled.forward(batch)
            except Exception:  # noqa: BLE001 - any compile or run failure: fall back to eager
                log.warning(
                    "the compiled decode step failed; running eagerly from now on", exc_info=True
                )
                self.compiled = None
        return self.model(self.builder.build(plan), self.cache)

    def write_prefix(self, seq: Sequence) -> None:
        """The admission step of the sequence's adapter kind over its first num_virtual cache
        slots (prefix tuning writes its virtual K/V there)."""
        slots = seq.cache_slots(range(seq.num_virtual), self.settings.block_size)
        flat = torch.tensor(slots, dtype=torch.long, device=self.cache.k.device)
        kind_for(seq.lease.kind).admit(seq.binding, self.cache, flat)

    def enable_compile(self) -> None:
        """Set up the compiled decode step (see server/model/compiled.py); `warm_up` compiles
        its shapes. On failure, stay eager and say so once."""
        device = self.cache.k.device
        use_inductor_cache(self.settings.cache_dir)
        buckets = buckets_for(device, self.settings.max_num_seqs)
        self.builder.full_width = buckets is not None  # captured graphs: fixed table width
        try:
            self.compiled = CompiledDecode(self.model, self.cache, self.builder, buckets)
        except Exception:  # noqa: BLE001 - a server that cannot compile still serves
            log.warning("compiling the decode step failed; serving eagerly", exc_info=True)

    def warm_up(self) -> None:
        """Compile every shape of the decode step now (before the engine is ready), not under
        the first streams; on failure, stay eager and say so once."""
        compiled = self.compiled
        if compiled is None:
            return
        self.warming = True
        try:
            count, seconds = compiled.warm_up()
        except Exception:  # noqa: BLE001 - a server that cannot compile still serves
            log.warning("compiling the decode step failed; serving eagerly", exc_info=True)
            self.compiled = None
            return
        finally:
            self.warming = False
        buckets = compiled.buckets
        log.info(
            "warmed %d compiled shapes in %.1f s (%s)",
            count,
            seconds,
            f"CUDA graphs for batch sizes {buckets}" if buckets else "dynamic batch size",
        )
