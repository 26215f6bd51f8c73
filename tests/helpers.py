"""Builders for tiny random models in Hugging Face format (same loading path as real models)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that served many adapters.",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Café, naïve, 日本語, emoji 🙂.",
    "def add(a, b):\n    return a + b\n",
] * 20


def make_tokenizer(path: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE (every byte is a token, so multi-byte text splits) and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def make_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    """Random-weight Llama (or Qwen2 with model_type='qwen2') saved as config.json + safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path)
    qwen = overrides.pop("model_type", "llama") == "qwen2"
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    )
    model = model_cls(config_cls(**cfg))
    with torch.no_grad():  # larger random weights than HF's init so that logits are not flat
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


class Stepper:
    """A Scheduler and a BatchBuilder over one paged KV cache, driven as Engine.step drives
    them: `step()` schedules and builds the batch (tests that run the model step by step)."""

    def __init__(
        self,
        args,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        budget: int,
        num_adapter_slots: int = 1,
        max_model_len: int = 512,
    ) -> None:
        from adapterserve.adapters.kinds import kind_for
        from adapterserve.adapters.spec import AdapterKind
        from adapterserve.server.engine.batch import BatchBuilder
        from adapterserve.server.engine.kv_cache import BlockAllocator
        from adapterserve.server.engine.scheduler import Scheduler
        from adapterserve.server.model.llama import KVCache

        self.cache = KVCache(args, num_blocks, block_size, torch.float32, "cpu")
        prefix = kind_for(AdapterKind.PREFIX)

        def admit_prefix(seq) -> None:  # prefix tuning's admission step, as the engine's
            slots = torch.tensor(seq.cache_slots(range(seq.num_virtual), block_size))
            prefix.admit(seq.binding, self.cache, slots)

        self.admit_prefix = admit_prefix
        self.scheduler = Scheduler(BlockAllocator(num_blocks, block_size), max_num_seqs, budget)
        self.builder = BatchBuilder(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(budget, max_model_len),
            block_size=block_size,
            max_blocks_per_seq=-(-max_model_len // block_size),
            trash_block=self.cache.trash_block,
            num_adapter_slots=num_adapter_slots,
            device=torch.device("cpu"),
        )

    def step(self):
        """(plan, batch), or None when nothing can run this step."""
        plan = self.scheduler.schedule()
        if plan is None:
            return None
        for seq in plan.prefix_writes:  # as the engine's ModelRunner does before a forward
            self.admit_prefix(seq)
        return plan, self.builder.build(plan)
