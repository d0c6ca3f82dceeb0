"""Preference tuning with Direct Preference Optimization (Rafailov et al., 2023; the book's chapter 7 bonus).

config -> data (instruction/input with a `chosen` and a `rejected` response, prompted in the
instruct recipe's prompt style, split 85/10/5 in file order as the book does) -> model (the start
checkpoint, typically an instruct run; its LoRA adapter merged in, so a LoRA run here trains a new
one) -> reference (the start, frozen: its log-probabilities of every pair are computed once, kept in
the run directory, and no second model is held while training) -> train (the DPO loss, optionally
plus the chosen response's next-token loss) -> evaluate (loss and TRL's rewards/logps metrics) ->
report (test-split responses, as the instruct recipe writes them, and the curves).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from finetune.recipe_api import (
    GPT,
    Float,
    ModelSection,
    Recipe,
    RunConfig,
    Section,
    Setup,
    eval_loader,
    evaluate_splits,
    language_model,
    lora_layers,
    merged_model,
    plot_curves,
    read_responses,
    sequence_logprobs,
    split_records,
    write_file_atomic,
)
from finetune.recipes.instruct import (
    GenerationSection,
    InstructData,
    model_interface,
    response_markdown,
    test_responses,
)
from finetune.recipes.preference_pairs import (
    Collate,
    Encoded,
    PackedCollate,
    Pair,
    encode_pairs,
    packed_pairs,
    read_pairs,
)

REFERENCE_FILE = "reference_logps.safetensors"
SPLITS = ("train", "val", "test")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# -- config -------------------------------------------------------------------------------------


class PreferenceData(InstructData):
    path: str | None = Field(
        None, description="JSON list, JSONL, CSV or Parquet file; null = the book's 1,100 preference records"
    )
    chosen_field: str = Field("chosen", description="the preferred response")
    rejected_field: str = Field("rejected", description="the dispreferred response")
    output_field: str = Field("chosen", description="the reference the test responses are scored against")
    mask_prompt: Literal[True] = Field(True, description="DPO compares responses: the prompt never counts")
    packing: bool = Field(
        False,
        description="lay training pairs' responses end to end in rows of up to max_length tokens, each pair in "
        "one row (positions restart, attention stays within each response); train.batch_size then counts rows",
    )


class DPOSection(Section):
    beta: Float = Field(0.1, gt=0.0, description="how far the policy may move from the reference")
    logprob_reduction: Literal["sum", "mean"] = Field(
        "sum",
        description="a response's log-probability: summed over its tokens (the paper, TRL) or averaged "
        "per token (the book's notebook)",
    )
    sft_weight: Float = Field(
        0.0,
        ge=0.0,
        description="adds this times the chosen response's mean next-token "
        "loss (against the likelihood of both responses collapsing)",
    )


class DPOConfig(RunConfig):
    recipe: Literal["dpo"] = "dpo"
    output_dir: str = "runs/dpo"
    model: ModelSection = ModelSection(name="runs/instruct")
    data: PreferenceData = PreferenceData()
    dpo: DPOSection = DPOSection()
    generation: GenerationSection = GenerationSection()


# -- the loss -------------------------------------------------------------------------------------


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per pair, from (pairs, 2) log-probabilities (chosen, rejected) of the policy and the reference:
    the loss -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) and TRL's metrics."""
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "loss": -F.logsigmoid(margin),
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/margins": margin,
        "rewards/accuracies": (margin > 0).to(margin.dtype),
        "logps/chosen": policy[:, 0],
        "logps/rejected": policy[:, 1],
    }


class DPOTask:
    """The DPO loss summed over pairs, and its metrics (summed here, per pair in the logs)."""

    unit = "pairs"

    def __init__(self, beta: float, mean: bool, sft_weight: float) -> None:
        self.beta, self.mean, self.sft_weight = beta, mean, sft_weight

    def terms(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        pairs = batch["count"]
        packed = batch if "segments" in batch else None
        logps = sequence_logprobs(model, batch["input_ids"], batch["targets"], self.mean, packed)
        policy = torch.stack([logps[:pairs], logps[pairs:]], dim=1)
        terms = dpo_terms(policy, batch["reference"].to(policy.dtype), self.beta)
        if self.sft_weight:
            counts = batch["target_counts"][:pairs].to(logps.device)
            mean_logp = logps[:pairs] if self.mean else logps[:pairs] / counts.clamp(min=1)
            terms["sft_loss"] = -mean_logp
            terms["loss"] = terms["loss"] + self.sft_weight * terms["sft_loss"]
        return terms

    def loss(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {name: value.sum() for name, value in self.terms(model, batch).items()}

    def count(self, batch: dict) -> int:
        return batch["count"]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader, accelerator: Accelerator) -> dict:
        model.eval()
        names: list[str] = []
        total = None
        for batch in loader:
            with accelerator.autocast():
                terms = self.terms(model, batch)
            names = names or sorted(terms)
            sums = torch.stack(
                [terms[n].double().sum() for n in names]
                + [torch.tensor(float(batch["count"]), dtype=torch.float64, device=terms["loss"].device)]
            )
            total = sums if total is None else total + sums
        totals = accelerator.reduce(total, reduction="sum").tolist()
        pairs = totals[-1]
        return {**{n: v / pairs for n, v in zip(names, totals[:-1], strict=True)}, "pairs": int(pairs)}


# -- the reference ----------------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    encoded: list[Encoded],
    max_length: int,
    mean: bool,
    batch_size: int,
    accelerator: Accelerator,
    quiet: bool = True,
) -> torch.Tensor:
    """(pairs, 2) log-probabilities of the chosen and rejected responses under `model` as it is now,
    computed as training computes the policy's (the accelerator's device and autocast)."""
    was_training = model.training
    model.eval()
    loader = eval_loader([(e, None) for e in encoded], batch_size, Collate(max_length))
    found = []
    for batch in tqdm(loader, "reference", disable=quiet, leave=False):
        with accelerator.autocast():
            logps = sequence_logprobs(
                model, batch["input_ids"].to(accelerator.device), batch["targets"].to(accelerator.device), mean
            )
        n = batch["count"]
        found.append(torch.stack([logps[:n], logps[n:]], dim=1).cpu())
    model.train(was_training)
    return torch.cat(found)


def reference_for(
    config: DPOConfig, model, encoded: dict[str, list[Encoded]], max_length: int, accelerator: Accelerator, quiet: bool
) -> dict[str, torch.Tensor]:
    """The start model's log-probabilities of every split's pairs: computed once by the main process
    before the first step and kept in the run directory, where a resumed run (and `finetune eval`)
    finds them, so no second model is ever held."""
    path = Path(config.output_dir) / REFERENCE_FILE
    fingerprint = _fingerprint_of(config, encoded)
    with accelerator.main_process_first():
        if (
            path.is_file()
            and _stored_fingerprint(path) == fingerprint
            and (config.resume or not accelerator.is_main_process)
        ):
            return load_file(str(path))
        batch_size = config.train.eval_batch_size or config.train.batch_size
        mean = config.dpo.logprob_reduction == "mean"
        found = {
            split: reference_logps(model, pairs, max_length, mean, batch_size, accelerator, quiet)
            for split, pairs in encoded.items()
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, lambda tmp: save_file(found, str(tmp), metadata={"fingerprint": fingerprint}))
        return found


def stored_reference(config: DPOConfig, encoded: dict[str, list[Encoded]]) -> dict[str, torch.Tensor] | None:
    """A finished run's reference log-probabilities, if they were computed for this data and start."""
    path = Path(config.output_dir) / REFERENCE_FILE
    if path.is_file() and _stored_fingerprint(path) == _fingerprint_of(config, encoded):
        return load_file(str(path))
    return None


def _fingerprint_of(config: DPOConfig, encoded: dict[str, list[Encoded]]) -> str:
    """What the reference log-probabilities depend on: the start model, the data and how they are reduced."""
    import hashlib

    digest = hashlib.sha256(
        repr(
            {s: [(e.chosen, e.rejected, e.prompt_length) for e in pairs] for s, pairs in sorted(encoded.items())}
        ).encode()
    ).hexdigest()
    return repr((config.model.name, config.model.init, config.train.seed, config.dpo.logprob_reduction, digest))


def _stored_fingerprint(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint")


# -- the recipe ---------------------------------------------------------------------------------


class DPO(Recipe[DPOConfig, dict]):
    name, Config = "dpo", DPOConfig
    merge_start = True  # the start's adapter is folded in: it is the reference, and a LoRA run trains a new one
    metric_names = ("loss", *METRICS)
    headline_metric = "rewards/accuracies"

    def prepare(self, config: DPOConfig) -> dict[str, list[Pair]]:
        pairs = read_pairs(config.data, config.data.output_field)
        return split_records(pairs, config.data.train_fraction, config.data.test_fraction)

    def build_model(self, config: DPOConfig, data: dict) -> GPT:
        model = language_model(config)
        return merged_model(model) if lora_layers(model) else model

    def setup(
        self, config: DPOConfig, data: dict[str, list[Pair]], model, accelerator: Accelerator, quiet: bool
    ) -> Setup:
        context = model.config.context_length
        max_length = min(config.data.max_length or context, context)
        encoded = {split: encode_pairs(data[split], config.data.prompt_style, max_length) for split in SPLITS}
        reference = reference_for(config, model.to(accelerator.device), encoded, max_length, accelerator, quiet)
        if accelerator.is_main_process:
            tqdm.write(
                f"preference pairs: {len(encoded['train']):,} train, {len(encoded['val']):,} val, "
                f"{len(encoded['test']):,} test; the start model's log-probabilities of them are in "
                f"{Path(config.output_dir) / REFERENCE_FILE}",
                file=sys.stderr,
            )
        examples = {split: list(zip(encoded[split], reference[split], strict=True)) for split in SPLITS}
        meta = {"max_length": max_length, **model_interface(config)}
        train: list = examples["train"]
        val: list = examples["val"]
        collate: Collate | PackedCollate = Collate(max_length)
        if config.data.packing:  # validation pairs one per row, so they read as unpacked ones do
            train, val = packed_pairs(examples["train"], max_length), [[e] for e in examples["val"]]
            collate = PackedCollate(max_length)
        return Setup(train, val, collate, task_of(config), meta, reuse={"examples": examples})

    def evaluate(
        self,
        config: DPOConfig,
        data: dict[str, list[Pair]],
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        """The DPO metrics of each split, against the start model's log-probabilities (kept in the run
        directory; computed again from the start checkpoint if they are gone)."""
        examples = reuse.get("examples")
        if examples is None:
            encoded = {
                split: encode_pairs(data[split], config.data.prompt_style, meta["max_length"]) for split in SPLITS
            }
            reference = stored_reference(config, encoded)
            if reference is None:
                start = self.build_model(config, data).to(accelerator.device)
                reference = {
                    split: reference_logps(
                        start,
                        encoded[split],
                        meta["max_length"],
                        config.dpo.logprob_reduction == "mean",
                        config.train.eval_batch_size or config.train.batch_size,
                        accelerator,
                    )
                    for split in SPLITS
                }
                del start
            examples = {split: list(zip(encoded[split], reference[split], strict=True)) for split in SPLITS}
        batch_size = config.train.eval_batch_size or config.train.batch_size
        return evaluate_splits(
            task_of(config),
            model,
            {s: (examples[s], Collate(meta["max_length"])) for s in splits},
            batch_size,
            accelerator,
        )

    def report(
        self,
        out: Path,
        config: DPOConfig,
        data: dict[str, list[Pair]],
        metrics: dict,
        history: list[dict],
        model,
        quiet: bool,
    ) -> tuple[dict, list[str]]:
        """Responses to the test split (scored against the chosen ones); curves.png."""
        test_responses(model, [p.record for p in data["test"]], config, out, metrics, quiet)
        plot_curves(history, out / "curves.png", metric=["rewards/margins", "rewards/accuracies"])
        return metrics, ["responses.jsonl", "curves.png"]

    def report_body(self, config: DPOConfig, metrics: dict, out: Path) -> list[str]:
        return report_body(config, metrics, read_responses(out / "responses.jsonl"))

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<8}{'loss':>8}{'margin':>9}{'accuracy':>10}{'chosen':>9}{'rejected':>10}"]
        for split in ("train", "val", "test"):
            if split in metrics:
                m = metrics[split]
                rows.append(
                    f"{split:<8}{m['loss']:>8.4f}{m['rewards/margins']:>9.3f}{m['rewards/accuracies']:>10.1%}"
                    f"{m['rewards/chosen']:>9.3f}{m['rewards/rejected']:>10.3f}"
                )
        if "responses" in metrics:
            r = metrics["responses"]
            rows.append(f"test responses: ROUGE-L {r['rouge_l']:.3f} against the chosen ones (n={r['n']})")
        return "\n".join(rows)


RECIPE = DPO()


def task_of(config: DPOConfig) -> DPOTask:
    return DPOTask(config.dpo.beta, config.dpo.logprob_reduction == "mean", config.dpo.sft_weight)


def report_body(config: DPOConfig, metrics: dict, responses: list[dict]) -> list[str]:
    lines = [
        "## Preference metrics",
        "",
        f"beta {config.dpo.beta}, log-probabilities {config.dpo.logprob_reduction}med over response tokens"
        f"{f', sft_weight {config.dpo.sft_weight}' if config.dpo.sft_weight else ''}.",
        "",
        "| split | loss | " + " | ".join(METRICS) + " |",
        "| --- " * (len(METRICS) + 2) + "|",
    ]
    for split in ("train", "val", "test"):
        if split in metrics:
            lines.append(
                f"| {split} | {metrics[split]['loss']:.4f} | "
                + " | ".join(f"{metrics[split][m]:.4f}" for m in METRICS)
                + " |"
            )
    lines += ["", f"ln 2 = {math.log(2):.4f}: the loss of a policy equal to its reference."]
    return lines + response_markdown(metrics, responses)
