"""Comparing runs: `finetune sweep` on Optuna and the `finetune runs` table."""
