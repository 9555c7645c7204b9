"""Fine-tune a sketched model on math word problems; evaluate on GSM8K, AQuA and MAWPS.

    python examples/finetune_math.py --out runs/math [--model smollm2-135m] [--max-steps 200]

Sketches the model once (INT4, 4 groups per row) into OUT/sketch unless --model is
already a sketch, fine-tunes only the codebooks on math_data.train.json (paper,
Table 8: AdamW, lr 8e-5, batch 16, linear schedule, 100 warmup steps), evaluates
before and after, and exports the dense model to OUT/dense. Stopped, it resumes
from OUT/run when started again with the same command.
"""

import argparse

from _pipeline import DATA, add_arguments, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, lr=8e-5, batch_size=16, max_new_tokens=256)
    args = parser.parse_args()
    math = DATA / "math"
    run(
        args,
        math / "math_data.train.json",
        [math / "gsm8k.test.json", math / "AQuA.test.json", math / "mawps.test.json"],
    )


if __name__ == "__main__":
    main()
