"""The benchmark report (HF + PEFT against ours; JSON, Markdown and PNG in benchmarks/):
``unsloth_like.bench.report``, also ``unsloth-like bench``. ``--help`` lists the options."""

from unsloth_like.bench.report import main

if __name__ == "__main__":
    raise SystemExit(main())
