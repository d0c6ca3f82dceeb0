"""Everything a recipe may import from the toolkit, in one place: the interface it implements, the trainer's
task contract, and the readers, model parts, loaders, checkpoint helpers, generation and metrics the bundled
recipes are built from. A recipe that imports only these names keeps working when the toolkit's insides
move; `tests/test_structure.py` holds the bundled recipes to it. docs/contributing.md shows a whole recipe.
"""

from __future__ import annotations

from finetune.checkpoints.atomic import write_file_atomic, write_text_atomic
from finetune.checkpoints.interface import (
    MULTI_LABEL,
    REGRESSION,
    REWARD,
    SINGLE_LABEL,
    TASKS,
    Generation,
    interface_meta,
)
from finetune.config import (
    FinetuneSection,
    Float,
    ModelSection,
    RunConfig,
    SamplingSection,
    Section,
    TrainSection,
)
from finetune.data.classification_inputs import Collate, Encoded, Example, by_length, tokenize, truncate
from finetune.data.classification_inputs import encode as encode_examples
from finetune.data.conversations import (
    Conversation,
    ConversationTokens,
    Screening,
    encode_screened,
    message_text,
    read_conversations,
)
from finetune.data.corpus import (
    Corpus,
    TextFormat,
    Windows,
    collate_windows,
    default_cache_dir,
    find_sources,
    tokenized,
)
from finetune.data.files import read_json_object, read_text
from finetune.data.packing import Row, pack, packed_batch
from finetune.data.prompts import can_converse, check_single_turn_style, check_style, stop_strings
from finetune.data.records import Record, read_fields, read_records, split_records
from finetune.data.tables import Format, Table, read_table
from finetune.errors import UserError
from finetune.evals.classification import classification_metrics, multilabel_metrics
from finetune.evals.generation import read_responses, reference_metrics
from finetune.evals.plots import plot_confusion, plot_curves
from finetune.evals.regression import regression_metrics
from finetune.formats.loading import build_model, stored_meta
from finetune.inference.generate import Decoded, decode, generate
from finetune.inference.loading import load_classifier
from finetune.inference.predict import exchanges, predict
from finetune.inference.respond import prompt_tokens, reply, respond, write_replies, write_responses
from finetune.model.classifier import GPTClassifier
from finetune.model.gpt import GPT, GPTConfig
from finetune.model.lora import adapters_disabled, lora_layers, merged_model
from finetune.model.losses import IGNORE, sequence_logprobs, token_logprobs
from finetune.model.tokenizer import EOT_ID, encode, get_tokenizer
from finetune.training.features import CachedFeatures, CollateFeatures, cache_splits
from finetune.training.next_token import NextTokenTask, perplexity_table
from finetune.training.recipe import SPLITS, Recipe, Setup, evaluate_splits, language_model
from finetune.training.trainer import Examples, RolloutTask, Task, eval_loader

__all__ = [
    # the interface a recipe implements, and what the trainer asks of its task
    "Recipe",
    "Setup",
    "Task",
    "RolloutTask",
    "SPLITS",
    "evaluate_splits",
    "language_model",
    "eval_loader",
    "Examples",
    "NextTokenTask",
    "perplexity_table",
    "CachedFeatures",
    "CollateFeatures",
    "cache_splits",
    # its config: a RunConfig subclass with sections of its own
    "RunConfig",
    "Section",
    "ModelSection",
    "TrainSection",
    "FinetuneSection",
    "SamplingSection",
    "Float",
    # what a trained model is (Setup.meta): the tasks the toolkit can use, a language model's interface
    "TASKS",
    "SINGLE_LABEL",
    "MULTI_LABEL",
    "REGRESSION",
    "REWARD",
    "Generation",
    "interface_meta",
    "check_style",
    "check_single_turn_style",
    "can_converse",
    "stop_strings",
    # data: tables and records, texts for a classifier, text corpora
    "read_table",
    "Table",
    "Format",
    "Record",
    "read_records",
    "read_conversations",
    "Conversation",
    "ConversationTokens",
    "Screening",
    "encode_screened",
    "message_text",
    "read_fields",
    "split_records",
    "read_text",
    "read_json_object",
    "Collate",
    "Encoded",
    "Example",
    "encode_examples",
    "tokenize",
    "pack",
    "packed_batch",
    "Row",
    "truncate",
    "by_length",
    "Corpus",
    "TextFormat",
    "Windows",
    "collate_windows",
    "default_cache_dir",
    "find_sources",
    "tokenized",
    # the model and its parts
    "GPT",
    "GPTConfig",
    "GPTClassifier",
    "build_model",
    "stored_meta",
    "lora_layers",
    "merged_model",
    "adapters_disabled",
    "IGNORE",
    "sequence_logprobs",
    "token_logprobs",
    "EOT_ID",
    "encode",
    "get_tokenizer",
    # using the model: generation (and its log-probabilities, for reinforcement learning), responses,
    # a trained classifier's predictions (a reward model)
    "generate",
    "decode",
    "Decoded",
    "load_classifier",
    "predict",
    "exchanges",
    "respond",
    "reply",
    "prompt_tokens",
    "write_responses",
    "write_replies",
    # files written whole or not at all; metrics and plots
    "write_text_atomic",
    "write_file_atomic",
    "classification_metrics",
    "multilabel_metrics",
    "regression_metrics",
    "read_responses",
    "reference_metrics",
    "plot_confusion",
    "plot_curves",
    # bad input
    "UserError",
]
