"""The `finetune` command: its entry point and one module per family of commands. Importing it loads no
torch, so `finetune --help` answers at once.
"""

from finetune.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
