"""`finetune export`: a run's model in the files the ecosystem reads.

- `transformers` (default): a directory `GPT2LMHeadModel` or `GPT2ForSequenceClassification` loads
  offline, with the tokenizer and a model card; adapters and partial fine-tunes are merged in.
  A model trained with a prompt style carries it as the tokenizer's `chat_template`, and every
  language model its generation defaults in generation_config.json (so does a PEFT export).
- `peft`: a LoRA run's adapter as `PeftModel.from_pretrained` reads it, on its base named by hub id or
  path (or written beside it, under `base/`, when no hub holds it).

Use `finetune merge` for a plain finetune checkpoint (to train on or serve with this toolkit);
`finetune export` for everything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.checkpoints.atomic import write_directory
from finetune.checkpoints.interface import (
    GENERATION_CONFIG,
    REGRESSION,
    REWARD,
    SINGLE_LABEL,
    STYLE_KEY,
    classifier_export_keys,
    generation_config,
)
from finetune.checkpoints.model_files import FORMAT, model_state, read_config
from finetune.checkpoints.run_directory import resolve, run_of
from finetune.data.prompts import chat_template
from finetune.errors import UserError
from finetune.formats.gguf import (
    GGUF_FILE,
    MODELFILE,
    gguf_module,
    modelfile,
    write_gguf,
)
from finetune.formats.loading import SEQUENCE_CLASSIFIER, hub_id, load_with_meta, rebuild_base
from finetune.formats.model_card import model_card
from finetune.formats.peft import (
    HEAD,
    PeftAdapter,
    adapter_files,
    is_peft_adapter,
    read_adapter,
)
from finetune.formats.transformers import (
    hf_config,
    hf_module,
    read_hf_config,
    to_hf,
    tokenizer_files,
)
from finetune.model.classifier import GPTClassifier, Model
from finetune.model.gpt import GPT
from finetune.model.lora import LoRALinear, lora_layers, merged_model

FORMATS = ("transformers", "peft", "gguf")
Files = dict[str, Callable[[Path], object]]


def export(source: Path, out: Path, fmt: str = "transformers", dtype: str = "f32") -> Path:
    """Write `source` (a run, a checkpoint, or any model finetune loads) to the new directory `out`;
    returns what was exported. `dtype`: the GGUF's matrices (f32, f16 or q8_0)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; export writes a new directory (choose another, or remove it first)")
    checkpoint = resolve(Path(source)) if Path(source).exists() else source  # else a hub id, or the loader's error
    if fmt != "gguf" and not Path(source).exists():
        raise UserError(f"{source}: no such run or checkpoint directory")
    model, meta = load_with_meta(checkpoint)
    run_dir = run_of(checkpoint) if Path(source).exists() else None
    if fmt == "transformers":
        files = _transformers_files(model, meta, run_dir, out)
    elif fmt == "peft":
        files = _peft_files(model, meta, run_dir, out)
    elif fmt == "gguf":
        files = _gguf_files(model, meta, dtype, (run_dir or Path(str(source))).name)
    else:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    write_directory(out, files)
    return checkpoint


# -- transformers --------------------------------------------------------------------------------


def _transformers_files(model: Model, meta: dict, run_dir: Path | None, out: Path) -> Files:
    model = merged_model(model)
    if isinstance(model, GPTClassifier):
        _check_pool(model)
        weight, ln_f_bias = folded_head(model, meta)
        state = {name: t for name, t in to_hf(_trunk_state(model.gpt)).items() if name != "lm_head.weight"}
        state |= {"transformer.ln_f.bias": ln_f_bias, f"{HEAD}.weight": weight}
        config = hf_config(model.gpt.config, SEQUENCE_CLASSIFIER, **_label_config(meta))
        usage, tag = _CLASSIFIER_USAGE, "text-classification"
    else:
        state = to_hf(_trunk_state(model))
        config = hf_config(model.config, "GPT2LMHeadModel")
        usage, tag = _LM_USAGE, "text-generation"
    card = model_card(
        meta,
        run_dir,
        library="transformers",
        base_model=_hub_base(meta),
        pipeline_tag=tag,
        usage=usage.replace("PATH", str(out)),
        notes=_notes(model, meta),
    )
    return {
        "model.safetensors": lambda path: save_file(state, str(path), metadata={"format": "pt"}),
        "config.json": _json(config),
        GENERATION_CONFIG: _json(generation_config(meta)),
        **_tokenizer(model, meta),
        "README.md": lambda path: path.write_text(card, encoding="utf-8"),
    }


def _tokenizer(model: Model, meta: dict) -> Files:
    """A classifier's tokenizer pads (transformers needs a pad token to batch) and truncates as it was trained;
    its config carries the classifier's problem type, labels and thresholds, which PEFT's files have no place
    for (finetune reads them back from there)."""
    if isinstance(model, GPTClassifier):
        return tokenizer_files(
            meta["max_length"],
            pad=True,
            truncation_side="left" if meta.get("keep") == "end" else "right",
            extra=classifier_export_keys(_exported_meta(meta)),
        )
    style = meta.get("prompt_style")
    extra = {"chat_template": chat_template(style), STYLE_KEY: style} if style else {}
    return tokenizer_files(model.config.context_length, pad=False, extra=extra)


def _exported_meta(meta: dict) -> dict:
    """A classifier's meta as its exports answer: a regression head gives the target's units (its
    standardisation is folded into the head, so transformers' logits are the predictions)."""
    meta = {"problem_type": SINGLE_LABEL, **meta}
    if meta["problem_type"] == REGRESSION:
        meta |= {"target_mean": [0.0] * meta["num_classes"], "target_std": [1.0] * meta["num_classes"]}
    return meta


def folded_head(model: GPTClassifier, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `score` has no bias. Ours, `W·ln_f(x) + b`, equals `W·ln_f'(x)` where `ln_f'` shifts
    ln_f's bias by the least-norm δ with `W·δ = b`: exact whenever the head's rows are independent
    (always, for fewer classes than hidden units, barring a degenerate head). A regression head is first
    scaled to the targets' units (`std·(W·h + b) + mean`). Returns W and ln_f's new bias."""
    weight = _effective_weight(model.head).detach().double().cpu()
    bias = model.head.bias.detach().double().cpu()
    if meta.get("problem_type") == REGRESSION:
        mean, std = (torch.tensor(meta[key], dtype=torch.float64) for key in ("target_mean", "target_std"))
        weight, bias = weight * std[:, None], bias * std + mean
    delta = torch.linalg.lstsq(weight, bias[:, None], driver="gelsd").solution[:, 0]
    if (weight @ delta - bias).abs().max() > 1e-6 * max(1.0, bias.abs().max().item()):
        raise UserError(
            "the classification head's rows are linearly dependent, so its bias cannot be moved into "
            "ln_f for transformers' bias-free score layer; this model cannot be exported exactly"
        )
    ln_f_bias = model.gpt.ln_f.bias.detach().double().cpu() + delta
    return weight.float().contiguous(), ln_f_bias.float().contiguous()


def _effective_weight(layer: torch.nn.Linear) -> torch.Tensor:
    if isinstance(layer, LoRALinear) and not layer.merged:
        return layer.weight.float() + layer.delta()
    return layer.weight


def _check_pool(model: GPTClassifier) -> None:
    if model.pool != "last_token":
        raise UserError(
            "model.pool=last_position reads padding positions, which transformers' "
            "GPT2ForSequenceClassification never does (it reads the last real token); train with "
            "model.pool=last_token to export this classifier"
        )


def _trunk_state(gpt: GPT) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in model_state(gpt).items()}


def _label_config(meta: dict) -> dict:
    labels = meta["labels"]
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": 50256,
        "problem_type": _hf_problem_type(meta),
    }


def _hf_problem_type(meta: dict) -> str:
    """transformers' name: a reward model is a one-output `regression` model there (as TRL's load), and its
    tokenizer config says `reward` for finetune."""
    problem_type = meta.get("problem_type", SINGLE_LABEL)
    return REGRESSION if problem_type == REWARD else problem_type


# -- gguf ----------------------------------------------------------------------------------------


def _gguf_files(model: Model, meta: dict, dtype: str, name: str) -> Files:
    if isinstance(model, GPTClassifier):
        raise UserError(
            "a classifier cannot be exported to GGUF: llama.cpp has no GPT-2 classification head "
            "(export it with --format transformers)"
        )
    gguf_module()  # a missing package is reported before anything is written
    model = merged_model(model)
    return {
        GGUF_FILE: lambda path: write_gguf(model, meta, path, dtype, name),
        MODELFILE: lambda path: path.write_text(modelfile(meta), encoding="utf-8"),
    }


# -- peft ----------------------------------------------------------------------------------------


def _peft_files(model: Model, meta: dict, run_dir: Path | None, out: Path) -> Files:
    if not lora_layers(model):
        raise UserError(
            "this checkpoint has no LoRA adapter (a full or partial fine-tune); export it with "
            "--format transformers, which merges the trained layers into the model"
        )
    classifier = isinstance(model, GPTClassifier)
    trunk = model.gpt if isinstance(model, GPTClassifier) else model
    prefix = "gpt." if classifier else ""
    lora = {
        name.removeprefix(prefix): (m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu())
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear) and name != "head"
    }
    if not lora:
        raise UserError(
            "only the classification head has LoRA layers, which PEFT saves whole (modules_to_save); "
            "export it with --format transformers"
        )
    modules = _modules_saved_whole(model, prefix)
    saved = {
        f"{m}.{p}": t.detach().float().cpu() for m in modules for p, t in trunk.get_submodule(m).named_parameters()
    }
    to_save = [hf_module(m) for m in modules]
    if isinstance(model, GPTClassifier):
        _check_pool(model)
        weight, ln_f_bias = folded_head(model, meta)
        saved |= {
            "head.weight": weight,
            "ln_f.weight": trunk.ln_f.weight.detach().float().cpu(),
            "ln_f.bias": ln_f_bias,
        }
        to_save = sorted(set(to_save) | {HEAD, "transformer.ln_f"})
    first = lora_layers(model)[0]
    base, files = _peft_base(meta, out)
    adapter = PeftAdapter(
        base, "classification" if classifier else "lm", first.rank, first.alpha, first.lora_dropout.p, lora, saved
    )
    usage = _PEFT_LM_USAGE
    if classifier:
        labels = {i: name for i, name in enumerate(meta["labels"])}
        usage = (
            _PEFT_CLASSIFIER_USAGE.replace("NUM_LABELS", str(len(labels)))
            .replace("ID2LABEL", repr(labels))
            .replace("PROBLEM_TYPE", repr(_hf_problem_type(meta)))
        )
    card = model_card(
        meta,
        run_dir,
        library="peft",
        base_model=base,
        pipeline_tag="text-classification" if classifier else "text-generation",
        usage=usage.replace("BASE", base).replace("PATH", str(out)),
        notes=_notes(model, meta),
    )
    generation = {} if classifier else {GENERATION_CONFIG: _json(generation_config(meta))}
    return {
        **files,
        **adapter_files(adapter, to_save, trunk.config.n_layer),
        **_tokenizer(model, meta),
        **generation,
        "README.md": lambda path: path.write_text(card, encoding="utf-8"),
    }


def _modules_saved_whole(model: torch.nn.Module, prefix: str) -> list[str]:
    """Trunk modules trained whole beside the adapters (`lora.train_modules`), by our name."""
    lora_names = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    trained = sorted(
        {
            name.rsplit(".", 1)[0]
            for name, p in model.named_parameters()
            if p.requires_grad and "lora_" not in name and name.startswith(prefix)
        }
    )
    for module in trained:
        if any(lora == module or lora.startswith(module + ".") for lora in lora_names):
            raise UserError(
                f"{module} trained whole and holds LoRA layers: PEFT cannot express that; export it "
                "with --format transformers"
            )
    return [m.removeprefix(prefix) for m in trained if m.startswith(prefix)]


def _peft_base(meta: dict, out: Path) -> tuple[str, Files]:
    """The base an adapter names: a hub id, a local transformers directory, or (when no hub or
    transformers directory holds it) the base written under `out/base/`."""
    base = meta["base"]
    name = base["name"]
    if base["init"] == "pretrained":
        while Path(name).expanduser().is_dir() and is_peft_adapter(Path(name).expanduser()):
            name = read_adapter(Path(name).expanduser()).base  # the run went on training that adapter
        path = Path(name).expanduser()
        found = hub_id(name)
        if found is not None:
            return found, {}
        if path.is_dir() and (path / "config.json").is_file() and read_config(path).get("format") != FORMAT:
            read_hf_config(read_config(path), path / "config.json")  # a transformers GPT-2 directory
            return str(path.resolve()), {}
    gpt = rebuild_base({**base, "name": name})
    gpt = merged_model(gpt.gpt if isinstance(gpt, GPTClassifier) else gpt)
    state, config = to_hf(_trunk_state(gpt)), hf_config(gpt.config, "GPT2LMHeadModel")
    return str((out / "base").resolve()), {
        "base/model.safetensors": lambda path: save_file(state, str(path), metadata={"format": "pt"}),
        "base/config.json": _json(config),
        **{f"base/{n}": w for n, w in tokenizer_files(gpt.config.context_length, pad=False).items()},
    }


def _hub_base(meta: dict) -> str | None:
    base = meta.get("base") or {}
    return hub_id(base["name"]) if base.get("init") == "pretrained" else None


def _notes(model: Model, meta: dict) -> list[str]:
    if not isinstance(model, GPTClassifier):
        return [
            "Exported with LoRA and partially trained layers merged in; greedy decoding gives the same "
            "tokens as `finetune generate`."
        ]
    return [
        f"The classifier reads the last real token of each text, trained on texts of up to {meta['max_length']} "
        "tokens: pass `truncation=True` to keep longer texts to that length, as `finetune classify` does.",
        "finetune's classification head has a bias and transformers' `score` layer has none: the bias is "
        "folded exactly into `transformer.ln_f.bias`, so this model's logits equal finetune's.",
    ]


def _json(value: dict) -> Callable[[Path], object]:
    return lambda path: path.write_text(json.dumps(value, indent=2) + "\n")


_LM_USAGE = """
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
ids = tokenizer("Every effort moves you", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
"""
_CLASSIFIER_USAGE = """
from transformers import pipeline

classify = pipeline("text-classification", model="PATH")
print(classify("You are a winner! Claim your prize now", truncation=True))
"""
_PEFT_LM_USAGE = """
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("BASE")
model = PeftModel.from_pretrained(base, "PATH")
"""
_PEFT_CLASSIFIER_USAGE = """
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

base = AutoModelForSequenceClassification.from_pretrained(
    "BASE", num_labels=NUM_LABELS, id2label=ID2LABEL, problem_type=PROBLEM_TYPE, pad_token_id=50256)
model = PeftModel.from_pretrained(base, "PATH")
"""
