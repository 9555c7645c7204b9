"""Fine-tune a sketched model on commonsense QA; evaluate on ARC-Easy, ARC-Challenge, OpenBookQA and BoolQ.

    python examples/finetune_commonsense.py --out runs/commonsense [--model smollm2-135m] [--max-steps 200]

Trains the codebooks on the union of the four training files (the paper's
Commonsense170K mix is a larger version; Table 8: lr 8e-5, batch 64, 2 epochs),
evaluates before and after, and exports the dense model to OUT/dense.
"""

import argparse
import json
from pathlib import Path

from _pipeline import DATA, add_arguments, run

from sketchtune_jax._utils.fileio import write_json_atomic

SETS = ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, lr=8e-5, batch_size=16, max_new_tokens=32)
    args = parser.parse_args()
    cs = DATA / "commonsense"
    mix = [r for name in SETS for r in json.loads((cs / f"{name}.train.json").read_text())]
    train_file = Path(args.out) / "commonsense_mix.train.json"
    write_json_atomic(train_file, mix)
    run(args, train_file, [cs / f"{name}.test.json" for name in SETS])


if __name__ == "__main__":
    main()
