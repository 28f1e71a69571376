"""Saving finetuned models: LoRA merged into the base weights, shard by shard (``merge``), and
the user-facing ``save_pretrained_merged`` with its checks and atomic writes (``merged``)."""
