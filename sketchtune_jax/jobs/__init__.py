"""Whole jobs from files to files, as the command line runs them; each checks its inputs and outputs
before any work, writes atomically, and resumes after an interruption: `sketch_to_dir`,
`heal_to_dir`, `finetune_to_dir` (and `loftq_to_dir`)."""

from sketchtune_jax.jobs.finetune import finetune_to_dir, loftq_to_dir
from sketchtune_jax.jobs.heal import heal_to_dir
from sketchtune_jax.jobs.sketch import sketch_to_dir

__all__ = ["finetune_to_dir", "heal_to_dir", "loftq_to_dir", "sketch_to_dir"]
