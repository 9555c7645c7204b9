"""What goes to and comes from disk: the sketched-directory format (`sketched_dir`), loading any
model source (`loading`: HF directory, GGUF, sketched directory, built-in name; `hub`), codebook
files (`codebooks`) and PEFT adapters (`adapters`); `write_json_atomic` for results (atomic, umask-honouring).
Exporting to safetensors lives in `converters`."""

from sketchtune_jax._utils.fileio import write_json_atomic

__all__ = ["write_json_atomic"]
