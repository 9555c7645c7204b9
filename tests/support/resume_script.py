"""Train the tiny model for a few steps with checkpoints; run by test_train's kill-and-resume test.

usage: python tests/support/resume_script.py OUT_DIR [--sleep SECONDS_PER_BATCH] [--method sketch|lora]

``lora`` trains rank-2 adapters with dropout (so the dropout RNG must resume too) on a
tiny dense Llama and writes ``OUT_DIR/adapter``; ``sketch`` trains the tiny sketched model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from tiny_lm import TinyCausalLM  # noqa: E402

from sketchtune_jax.data.batches import BucketedBatches, DataPosition  # noqa: E402
from sketchtune_jax.data.records import TokenizedExample  # noqa: E402
from sketchtune_jax.train import TrainConfig, finetune  # noqa: E402


class SlowBatches(BucketedBatches):
    """Sleeps before each batch so a test can kill the run between checkpoints."""

    sleep = 0.0

    def iterate(self, start=DataPosition(), *, epochs=None):
        for item in super().iterate(start, epochs=epochs):
            time.sleep(self.sleep)
            yield item


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--method", choices=("sketch", "lora"), default="sketch")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(24):
        n = int(rng.integers(6, 30))
        mask = np.zeros(n, np.int32)
        mask[n // 2 :] = 1
        examples.append(TokenizedExample(rng.integers(0, 64, n).astype(np.int32), mask, n // 2))
    batches = SlowBatches(examples, 4, seq_len=32, pad_id=0, seed=1, pad_multiple=16)
    batches.sleep = args.sleep
    config = TrainConfig(
        lr=3e-3,
        schedule="cosine",
        warmup_steps=2,
        epochs=2,
        grad_accum=2,
        batch_size=4,
        seq_len=32,
        save_every=2,
        keep_checkpoints=2,
        seed=1,
    )
    if args.method == "sketch":
        result = finetune(TinyCausalLM(), batches, config, args.out_dir, progress=False)
    else:
        from flax import nnx

        from sketchtune_jax.models import LlamaForCausalLM, ModelConfig
        from sketchtune_jax.train.lora import LoraSettings
        from sketchtune_jax.train.methods import FinetuneMethod

        dense = LlamaForCausalLM(
            ModelConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
            ),
            rngs=nnx.Rngs(0),
        )
        method = FinetuneMethod("lora", lora=LoraSettings(rank=2, alpha=4.0, dropout=0.1))
        result = finetune(
            method.prepare(dense),
            batches,
            config,
            args.out_dir,
            progress=False,
            wrt=method.wrt,
            save_result=method.result_writer(),
        )
    print(f"resumed_from={result.resumed_from} step={result.step}", flush=True)


if __name__ == "__main__":
    main()
