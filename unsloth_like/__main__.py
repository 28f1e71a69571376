"""``python -m unsloth_like ...`` runs the command line (see ``unsloth_like.cli``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
