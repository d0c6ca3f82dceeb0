"""Training: the recipe interface (the public API a recipe is written against, `finetune.training.api`),
the registry of installed recipes, the one trainer, trainable parameters, trackers and the run report.
"""
