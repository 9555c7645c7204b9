"""sketchtune-jax: fine-tunable sketches of Llama/Mistral models in JAX (SketchTune, ICML 2025).

The entry points, in the order a user meets them::

    import sketchtune_jax as st

    loaded = st.load_any("smollm2-135m")                     # HF dir, GGUF, sketched dir or built-in name
    calib = st.calibration_windows("wiki.txt", loaded.tokenizer, nsamples=32, seq_len=512)
    st.sketch_model(loaded.model, calib, st.SketchSettings(bits=4, groups_per_row=4))
    st.save_sketched(loaded.model, loaded.config, loaded.tokenizer, "smol-int4")
    train, val = st.build_batches("math.json", loaded.tokenizer, batch_size=8, seq_len=512)
    st.finetune(loaded.model, train, st.TrainConfig(lr=8e-5, epochs=1), "runs/math")
    st.perplexity(loaded.model, loaded.tokenizer, text)

Directory-to-directory jobs, as the command line runs them: `sketch_to_dir`, `heal_to_dir`,
`finetune_to_dir`; export to safetensors is `converters.export_hf`. Everything else lives in the sub-packages, one concern each: `sketch`
(the layer-by-layer sketcher and the maths on one matrix), `train` (trainer, healing, LoRA,
QLoRA, LoftQ), `data`, `eval`, `io` (file formats and loading), `parallel` (meshes, several
processes), `models`, `jobs`; kernels are in `pallas_kernels`, format converters in `converters`.
"""

from sketchtune_jax import data, eval, io, jobs, models, parallel, sketch, train
from sketchtune_jax.data.batches import build_batches
from sketchtune_jax.data.calibration import calibration_windows
from sketchtune_jax.eval.perplexity import perplexity
from sketchtune_jax.eval.tasks import evaluate_task
from sketchtune_jax.io.loading import load_any
from sketchtune_jax.io.sketched_dir import save_sketched
from sketchtune_jax.jobs import finetune_to_dir, heal_to_dir, sketch_to_dir
from sketchtune_jax.layers import Codebook, SketchedLinear
from sketchtune_jax.models import LlamaForCausalLM
from sketchtune_jax.models.generate import generate_text
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model
from sketchtune_jax.train import TrainConfig, finetune
from sketchtune_jax.train.heal import HealSettings
from sketchtune_jax.train.lora import LoraSettings, apply_lora

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "HealSettings",
    "LlamaForCausalLM",
    "LoraSettings",
    "SketchSettings",
    "SketchedLinear",
    "TrainConfig",
    "apply_lora",
    "build_batches",
    "calibration_windows",
    "data",
    "eval",
    "evaluate_task",
    "finetune",
    "finetune_to_dir",
    "generate_text",
    "heal_to_dir",
    "io",
    "jobs",
    "load_any",
    "models",
    "parallel",
    "perplexity",
    "save_sketched",
    "sketch",
    "sketch_model",
    "sketch_to_dir",
    "train",
]
