"""``python -m leukoscope`` (and ``torchrun -m leukoscope``) entry point."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
