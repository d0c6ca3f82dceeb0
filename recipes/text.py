"""Training on plain text: continued pretraining, a style, a code base (the book's chapter 5).

config -> data (text files, a directory, a glob, or a text column of CSV/JSON/Parquet tables, tokenized
once into cached uint16 token files; train/val split by characters for one document, by documents for
several) -> model (GPT-2, pretrained or from a random init; full, last blocks or LoRA) -> train
(next-token loss on windows of `max_length` tokens every `stride` tokens, the book's GPTDatasetV1;
a sample continuation of `generation.prompt` at every evaluation) -> evaluate (loss and perplexity on
train and val) -> report (curves against steps and tokens seen, the last sample).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from finetune.datasets import THE_VERDICT, bundled
from finetune.recipe_api import (
    EOT_ID,
    Corpus,
    Float,
    ModelSection,
    NextTokenTask,
    Recipe,
    RunConfig,
    SamplingSection,
    Section,
    Setup,
    TextFormat,
    UserError,
    Windows,
    collate_windows,
    default_cache_dir,
    encode,
    evaluate_splits,
    find_sources,
    generate,
    get_tokenizer,
    interface_meta,
    perplexity_table,
    plot_curves,
    tokenized,
)

SPLITS = ("train", "val")

# -- config -------------------------------------------------------------------------------------


class TextData(Section):
    path: str | list[str] | None = Field(
        None,
        description="text file, directory (its .txt files), glob, or table file(s); a list of them; null = The Verdict",
    )
    format: TextFormat | None = Field(
        None, description="txt, csv, tsv, json, jsonl or parquet; null = from each file's extension (txt otherwise)"
    )
    text_field: str = Field("text", description="the column (or JSON key) holding the text, for tables")
    max_length: int | None = Field(None, ge=1, description="tokens per training window; null = the model's context")
    stride: int | None = Field(None, ge=1, description="tokens between window starts; null = max_length (no overlap)")
    val_fraction: Float = Field(0.1, gt=0.0, lt=1.0)
    cache_dir: str | None = Field(None, description="where token files are kept; null = ~/.cache/finetune/tokens")

    @model_validator(mode="after")
    def _stride(self) -> TextData:
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise ValueError(
                f"stride {self.stride} > max_length {self.max_length} would skip text; use stride <= max_length"
            )
        return self


class SampleSection(SamplingSection):
    prompt: str = Field("Every effort moves you", description="continued at every evaluation, printed and logged")
    max_new_tokens: int = Field(50, ge=1)


class TextConfig(RunConfig):
    recipe: Literal["text"] = "text"
    output_dir: str = "runs/text"
    model: ModelSection = ModelSection(name="gpt2")
    data: TextData = TextData()
    generation: SampleSection = SampleSection()


Config = TextConfig


# -- data ---------------------------------------------------------------------------------------


def read_corpus(data: TextData) -> Corpus:
    """The configured text as cached token files; the main process tokenizes, the others wait and reuse."""
    paths = [data.path] if isinstance(data.path, str) else data.path or [str(bundled(THE_VERDICT))]
    sources = find_sources(paths, data.format)
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    with PartialState().main_process_first():
        return tokenized(sources, data.text_field, data.val_fraction, cache)


def windows(corpus: Corpus, max_length: int, stride: int) -> dict[str, Windows]:
    """Training windows of each split; a split too short for one window is refused."""
    found = {split: Windows(corpus.tokens(split), max_length, stride) for split in SPLITS}
    for split, data in found.items():
        if len(data) == 0:
            raise UserError(
                f"the {split} split has {len(data.tokens):,} tokens; data.max_length={max_length} needs at "
                f"least {max_length + 1}: add text, lower data.max_length, or change data.val_fraction"
            )
    return found


def window_shape(config: TextConfig, context: int) -> tuple[int, int]:
    max_length = config.data.max_length or context
    if max_length > context:
        raise UserError(
            f"data.max_length={max_length} is beyond the model's context of {context} tokens; "
            f"set data.max_length <= {context}"
        )
    stride = config.data.stride or max_length
    if stride > max_length:
        raise UserError(
            f"data.stride={stride} > data.max_length={max_length} would skip text; use stride <= max_length"
        )
    return max_length, stride


# -- the recipe ---------------------------------------------------------------------------------


class Text(Recipe[TextConfig, Corpus]):
    name, Config = "text", TextConfig

    def prepare(self, config: TextConfig) -> Corpus:
        return read_corpus(config.data)

    def setup(self, config: TextConfig, data: Corpus, model, accelerator: Accelerator, quiet: bool) -> Setup:
        max_length, stride = window_shape(config, model.config.context_length)
        splits = windows(data, max_length, stride)
        if accelerator.is_main_process:
            counts = data.manifest["tokens"]
            tqdm.write(
                f"text: {counts['train']:,} train and {counts['val']:,} val tokens (split by "
                f"{data.manifest['split']}), {len(splits['train']):,} windows of {max_length} every {stride}",
                file=sys.stderr,
            )

        def show_sample(model) -> dict:
            """The book's generate_and_print_sample: a continuation of the prompt, printed and logged."""
            text = continue_prompt(model, config)
            if not quiet:
                tqdm.write(f"sample: {text!r}", file=sys.stderr)
            return {"sample": text}

        meta = {
            "max_length": max_length,
            "stride": stride,
            **interface_meta(None, config.generation, config.train.seed),
        }
        return Setup(splits["train"], splits["val"], collate_windows, NextTokenTask(), meta, on_evaluate=show_sample)

    def evaluate(
        self,
        config: TextConfig,
        data: Corpus,
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        """Loss and perplexity over every window of each split."""
        found = windows(data, meta["max_length"], meta["stride"])
        batch_size = config.train.eval_batch_size or config.train.batch_size
        return evaluate_splits(
            NextTokenTask(),
            model,
            {s: (found[s], collate_windows) for s in splits if s in found},
            batch_size,
            accelerator,
        )

    def report(
        self, out: Path, config: TextConfig, data: Corpus, metrics: dict, history: list[dict], model, quiet: bool
    ) -> tuple[dict, list[str]]:
        """The kept model's continuation of the prompt; curves.png (loss against tokens seen)."""
        metrics["sample"] = {"prompt": config.generation.prompt, "text": continue_prompt(model, config)}
        metrics["data"] = {k: data.manifest[k] for k in ("split", "documents", "tokens")}
        plot_curves(history, out / "curves.png", seen="tokens")
        return metrics, ["curves.png"]

    def report_body(self, config: TextConfig, metrics: dict, out: Path) -> list[str]:
        return report_body(config, metrics)

    def summary_table(self, metrics: dict) -> str:
        rows = [perplexity_table(metrics, SPLITS)]
        if "sample" in metrics:
            rows.append(f"sample: {metrics['sample']['text']!r}")
        return "\n".join(rows)


RECIPE = Text()


def continue_prompt(model, config: TextConfig) -> str:
    """The prompt and its continuation (stopped at end-of-text), as the book prints it."""
    gen = config.generation
    prompt = encode(gen.prompt)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.train.seed)
    was_training = model.training
    out = generate(
        model.eval(), [prompt], gen.max_new_tokens, gen.temperature, gen.top_k, gen.top_p, EOT_ID, generator
    )[0]
    model.train(was_training)
    return get_tokenizer().decode([t for t in out if t != EOT_ID])


def report_body(config: TextConfig, metrics: dict) -> list[str]:
    data = metrics["data"]
    return [
        f"{data['tokens']['train']:,} train and {data['tokens']['val']:,} validation tokens, split by {data['split']}"
        " (the data sizes above count windows).",
        "",
        "## Sample",
        "",
        f"**Prompt:** {config.generation.prompt}",
        "",
        f"**Model:** {metrics['sample']['text']}",
        "",
    ]
