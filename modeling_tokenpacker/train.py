"""`python -m modeling_tokenpacker.train ...`, the same as `tokenpacker-train` (modeling_tokenpacker/training/trainer.py)."""

from .training.trainer import main

if __name__ == "__main__":
    main()
