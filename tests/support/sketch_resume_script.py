"""Sketch a tiny random Llama with a work directory, then save its codebooks and codes.

    python tests/support/sketch_resume_script.py WORK_DIR OUT_NPZ [SLEEP_AFTER_EACH_LAYER]

Used by test_sketcher.py to kill a real process mid-sketch and resume it.
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from model_utils import random_ids, tiny_hf_model  # noqa: E402

from converters import from_state_dict  # noqa: E402
from sketchtune_jax._utils.module_paths import flat_arrays  # noqa: E402
from sketchtune_jax.layers import Codebook, Codes  # noqa: E402
from sketchtune_jax.models import ModelConfig  # noqa: E402
from sketchtune_jax.sketch.driver import SketchSettings, sketch_model  # noqa: E402


def main() -> None:
    work_dir, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    hf = tiny_hf_model("llama_gqa", num_hidden_layers=3)
    config = ModelConfig.from_hf(hf.config.to_dict())
    model = from_state_dict(config, hf.state_dict())
    calib = random_ids(8, 32, seed=3)
    sketch_model(
        model,
        calib,
        SketchSettings(bits=3, groups_per_row=2),
        work_dir=work_dir,
        batch_size=4,
        show_progress=False,
        on_layer_done=lambda i: time.sleep(pause),
    )
    np.savez(out, **flat_arrays(model, Codebook), **flat_arrays(model, Codes))


if __name__ == "__main__":
    main()
