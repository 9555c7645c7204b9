"""What goes to and comes from disk: the sketched-directory format (`sketched_dir`), codebook files
(`codebooks`), loading any model source (`loading`: HF directory, GGUF, sketched directory,
built-in name, with codebooks or a LoRA adapter on top); `write_json_atomic` for results (atomic,
umask-honouring). PEFT adapters are written by `sketchtune_jax.train.adapters` (beside the LoRA
layers they fill); exporting to safetensors lives in `converters`."""

from sketchtune_jax._utils.fileio import write_json_atomic

__all__ = ["write_json_atomic"]
