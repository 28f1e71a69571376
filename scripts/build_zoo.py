"""Build every tiny zoo model into a directory and print what was built.

    python scripts/build_zoo.py [OUT_DIR]

Useful to carry ready-made models to a machine (e.g. a GPU box without the tokenizer-training
dependencies warmed up) or to inspect what the tests train on. OUT_DIR defaults to the user's
zoo cache (~/.cache/unsloth_like/zoo).
"""

from __future__ import annotations

import argparse
import json

from unsloth_like.testing.zoo import ZOO, zoo_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None)
    args = parser.parse_args()
    print(f"{'name':<10} {'params':>8}  {'directory'}")
    for name, spec in ZOO.items():
        directory = zoo_model_dir(name, args.out_dir)
        config = json.loads((directory / "config.json").read_text())
        size = (directory / "model.safetensors").stat().st_size / 4 / 1e6  # fp32 weights
        print(f"{name:<10} {size:>7.2f}M  {directory}  [{config['architectures'][0]}] {spec.notes}")


if __name__ == "__main__":
    main()
