"""sketchtune-jax: fine-tunable sketches of Llama/Mistral models in JAX (SketchTune, ICML 2025).

The public API, in the order a user meets it::

    import sketchtune_jax as st

    loaded = st.load_any("smollm2-135m")                     # HF dir, GGUF, sketched dir or built-in name
    calib = st.calibration_windows("wiki.txt", loaded.tokenizer, nsamples=32, seq_len=512)
    st.sketch_model(loaded.model, calib, st.SketchSettings(bits=4, groups_per_row=4))
    # or on all local devices: mesh=st.make_mesh("data=8") (samples split over data, rows over all)
    st.save_sketched(loaded.model, loaded.config, loaded.tokenizer, "smol-int4")
    train, val = st.build_batches("math.json", loaded.tokenizer, batch_size=8, seq_len=512)
    st.finetune(loaded.model, train, st.TrainConfig(lr=8e-5, epochs=1), "runs/math")

`st.heal` distils a sketch's codebooks from the dense model (see `sketchtune_jax.heal`);
`st.distributed.initialize` joins a run of several processes (hosts) before any JAX work.
"""

from sketchtune_jax import distributed
from sketchtune_jax.calibration import calibration_windows
from sketchtune_jax.checkpoint import is_sketched_dir, load_sketched, save_sketched
from sketchtune_jax.data import build_batches, format_prompt, load_instruction_data, sample_mixture
from sketchtune_jax.evaluation import evaluate_task, extract_answer
from sketchtune_jax.fileio import write_json_atomic
from sketchtune_jax.generate import generate, generate_text
from sketchtune_jax.heal import HealSettings, heal, heal_config
from sketchtune_jax.layers import Codebook, Codes, Linear, SketchedLinear
from sketchtune_jax.loading import load_any, model_info
from sketchtune_jax.lora import LoraSettings, apply_lora, auto_rank, load_adapter, merge_lora, save_adapter
from sketchtune_jax.methods import FinetuneMethod
from sketchtune_jax.models import KVCache, LlamaForCausalLM, ModelConfig, init_cache, stack_layers, unstack_layers
from sketchtune_jax.multiple_choice import evaluate_multiple_choice, parse_choices
from sketchtune_jax.perplexity import PerplexityResult, perplexity, read_text
from sketchtune_jax.sharding import make_mesh, process_rows, shard_batch, shard_model, shard_optimizer_state
from sketchtune_jax.sketcher import SketchSettings, partial_dir_for, sketch_model
from sketchtune_jax.streaming import assemble_sketch, sketch_streaming
from sketchtune_jax.train import (
    TrainConfig,
    finetune,
    load_codebooks,
    make_optimizer,
    save_codebooks,
    train_step,
    trainable_parameter_count,
)
from sketchtune_jax.workflows import finetune_to_dir, heal_to_dir, sketch_to_dir

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "Codes",
    "FinetuneMethod",
    "HealSettings",
    "KVCache",
    "Linear",
    "LlamaForCausalLM",
    "LoraSettings",
    "ModelConfig",
    "PerplexityResult",
    "SketchSettings",
    "SketchedLinear",
    "TrainConfig",
    "apply_lora",
    "assemble_sketch",
    "auto_rank",
    "build_batches",
    "calibration_windows",
    "distributed",
    "evaluate_multiple_choice",
    "evaluate_task",
    "extract_answer",
    "finetune",
    "finetune_to_dir",
    "format_prompt",
    "generate",
    "generate_text",
    "heal",
    "heal_config",
    "heal_to_dir",
    "init_cache",
    "is_sketched_dir",
    "load_adapter",
    "load_any",
    "load_codebooks",
    "load_instruction_data",
    "load_sketched",
    "make_mesh",
    "make_optimizer",
    "merge_lora",
    "model_info",
    "parse_choices",
    "partial_dir_for",
    "perplexity",
    "process_rows",
    "read_text",
    "sample_mixture",
    "save_adapter",
    "save_codebooks",
    "save_sketched",
    "shard_batch",
    "shard_model",
    "shard_optimizer_state",
    "sketch_model",
    "sketch_streaming",
    "sketch_to_dir",
    "stack_layers",
    "train_step",
    "trainable_parameter_count",
    "unstack_layers",
    "write_json_atomic",
]
