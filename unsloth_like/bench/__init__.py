"""Benchmarks that ship with the package: ``train_step`` (one variant's training steps, each in a
fresh process) and ``report`` (``unsloth-like bench``: HF + PEFT against ours over modes and
sequence lengths, written as JSON, Markdown and PNG plots)."""
