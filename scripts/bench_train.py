"""Training-step benchmark, upstream transformers + PEFT against ours: ``unsloth_like.bench.train_step``
(in the package, so that ``unsloth-like bench`` can run it too). ``--help`` lists the options."""

from unsloth_like.bench.train_step import main

if __name__ == "__main__":
    main()
