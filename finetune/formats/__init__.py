"""Models in other tools' files: loading from the hub, a directory or the book's `.pth`; the transformers,
PEFT and GGUF layouts; the book's state-dict names; `finetune export` and its model card.
"""
