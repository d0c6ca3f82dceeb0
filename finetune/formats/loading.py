"""Load GPT-2 weights from the Hugging Face hub, a local checkpoint directory, or a book `.pth` file.

Tensors are read one at a time (safetensors and mmap'd torch files) and assigned into a model built
on the meta device, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from finetune.checkpoints.atomic import verify, write_directory
from finetune.checkpoints.interface import (
    MULTI_LABEL,
    REGRESSION,
    REWARD,
    SINGLE_LABEL,
    legacy_interface,
    read_export_interface,
)
from finetune.checkpoints.model_files import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    assemble,
    load_weights,
    model_files,
    read_config,
    read_meta,
    read_tensors,
    tensor_names,
    unreadable,
)
from finetune.checkpoints.run_directory import resolve, run_of
from finetune.errors import UserError
from finetune.formats.book import book_config, from_book
from finetune.formats.peft import HEAD, PEFT_WEIGHTS, is_peft_adapter, read_adapter
from finetune.formats.transformers import from_hf, read_hf_config
from finetune.model.classifier import GPTClassifier, Model
from finetune.model.gpt import GPT, PRESETS, GPTConfig
from finetune.model.lora import LoRALinear, lora_layers, merged_model, wrap_layers

HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SEQUENCE_CLASSIFIER = "GPT2ForSequenceClassification"


def build_model(name: str, init: str = "pretrained", dropout: float = 0.0) -> Model:
    """The model a recipe or command asks for: pretrained weights, or a random init of the same shape.

    `name` is a preset (`gpt2`, …, `gpt2-tiny`), a hub id, a checkpoint directory, a PEFT adapter or a
    book `.pth`: a `GPT`, or the classifier a classifier checkpoint holds, with its adapters if it has any.
    `random` is GPT-2's initialisation (normal, std 0.02, tied head); `book` is the book's chapter 4
    `GPTModel`: PyTorch's default initialisation (embeddings N(0, 1)) and a separate output head.
    """
    if init in ("random", "book"):
        if name not in PRESETS:
            raise UserError(f"model.init={init} needs a preset name ({', '.join(PRESETS)}), got '{name}'")
        if init == "random":
            return GPT(GPTConfig.from_preset(name, dropout=dropout))
        model = GPT(GPTConfig.from_preset(name, dropout=dropout, tie_embeddings=False))
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        return model
    if init != "pretrained":
        raise UserError(f"model.init must be 'pretrained', 'random' or 'book', got '{init}'")
    return load_pretrained(name, dropout=dropout)


def load_pretrained(name_or_path: str | Path, *, config: GPTConfig | None = None, dropout: float = 0.0) -> Model:
    """A model with weights from a hub id (`gpt2` … `gpt2-xl`, or `owner/repo`), a transformers directory
    (`config.json` + `model.safetensors` or `pytorch_model.bin`; a `GPT2ForSequenceClassification` gives
    a classifier), a PEFT LoRA adapter directory, a book `GPTModel` `.pth` file, or a checkpoint saved
    by finetune (a run directory means the checkpoint that run kept). See `load_with_meta`."""
    return load_with_meta(name_or_path, config=config, dropout=dropout)[0]


def load_with_meta(
    name_or_path: str | Path, *, config: GPTConfig | None = None, dropout: float = 0.0
) -> tuple[Model, dict]:
    """The model `load_pretrained` gives, and what a command needs to use it: its task, shape and, for
    a classifier, its labels and input length (a finetune checkpoint records them; for others they
    come from the model: transformers' `id2label`, or `LABEL_i`, and the context length).

    `config` overrides the architecture read from the checkpoint (needed only for a book `.pth` whose
    shapes match no preset, since head counts cannot be read from shapes). `dropout` is a training
    setting, not part of a checkpoint.
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        path = _download(str(name_or_path))
    path = resolve(path)  # a run directory stands for the checkpoint it kept
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return _with_meta(_load_book(path, config, dropout))
        raise UserError(
            f"{path}: expected a checkpoint directory (config.json + model.safetensors) or a book .pth file"
        )
    if is_peft_adapter(path):
        model, meta = _load_peft(path, dropout)
        return model, meta | read_export_interface(path)
    if (path / ADAPTER_CONFIG).exists() or read_config(path).get("format") == FORMAT:
        model, meta = load_model(path, dropout=dropout)  # a GPT, or the classifier a recipe trained
        return model, legacy_interface(meta, path, run_of(path))
    raw = read_config(path)
    weights = _weights_file(path)
    config = replace(config or read_hf_config(raw, path / CONFIG_FILE), dropout=dropout)
    if SEQUENCE_CLASSIFIER not in (raw.get("architectures") or []):
        model, meta = _with_meta(_assemble(config, from_hf(_read_tensors(weights)), weights))
        return model, meta | read_export_interface(path)
    labels = _hf_labels(raw, path / CONFIG_FILE)
    tensors = _classifier_tensors(from_hf(_read_tensors(weights)), len(labels))
    model = assemble(lambda: GPTClassifier(GPT(config), len(labels)), tensors, weights)
    found = {"labels": labels, "problem_type": raw.get("problem_type") or SINGLE_LABEL}
    return _with_meta(model, found | read_export_interface(path))


def stored_meta(name_or_path: str | Path) -> dict:
    """What a local checkpoint, run directory or export records about itself (task, prompt style,
    generation defaults), read without its weights; {} for a preset, a hub id or a book .pth. A recipe
    that starts from a model reads its interface so, before any model is built."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return {}
    path = resolve(path)
    if not path.is_dir():
        return {}
    if is_peft_adapter(path):
        return {"task": "lm", **read_export_interface(path)}
    if (path / ADAPTER_CONFIG).exists() or read_config(path).get("format") == FORMAT:
        return legacy_interface(read_meta(path), path, run_of(path))
    raw = read_config(path)
    if SEQUENCE_CLASSIFIER in (raw.get("architectures") or []):
        return {"task": "classification"}
    return {"task": "lm", **read_export_interface(path)}


def _with_meta(model: Model, found: dict | None = None) -> tuple[Model, dict]:
    """What a finetune checkpoint would record about a model that came from elsewhere. `found`: what its
    files say about a classifier (labels, problem type, thresholds); an exported regression head already
    answers in the target's units."""
    meta = model.checkpoint_meta()
    if isinstance(model, GPTClassifier):
        found, count = found or {}, model.num_classes
        meta |= {
            "labels": found.get("labels") or [f"LABEL_{i}" for i in range(count)],
            "problem_type": found.get("problem_type", SINGLE_LABEL),
            "max_length": model.gpt.config.context_length,
            "keep": "start",
        }
        if meta["problem_type"] == MULTI_LABEL:
            meta["thresholds"] = found.get("thresholds") or [0.5] * count
        elif meta["problem_type"] == REWARD:
            meta["prompt_style"] = found.get("prompt_style")
        elif meta["problem_type"] == REGRESSION:
            meta |= {"target_mean": [0.0] * count, "target_std": [1.0] * count}
    return model, meta


def _hf_labels(raw: dict, where: Path) -> list[str]:
    id2label = raw.get("id2label") or {}
    try:
        count = len(id2label) or int(raw.get("num_labels", 2))
        return [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(count)]
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: bad id2label/num_labels ({e})") from e


def _classifier_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], num_labels: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' classifier in our names: its bias-free `score` is our head with a zero bias."""
    for name, t in tensors:
        if name == f"{HEAD}.weight":
            yield "head.weight", t
        elif name != "lm_head.weight":
            yield f"gpt.{name}", t
    yield "head.bias", torch.zeros(num_labels)


def _load_peft(directory: Path, dropout: float) -> tuple[Model, dict]:
    """A PEFT LoRA adapter on its base, in our LoRA layers: the same logits as `PeftModel`."""
    adapter = read_adapter(directory)
    base_path = Path(adapter.base).expanduser()
    if not base_path.is_absolute() and not base_path.exists() and (directory / base_path).exists():
        base_path = directory / base_path  # a base written beside the adapter
    try:
        base, meta = load_with_meta(base_path if base_path.exists() else adapter.base, dropout=dropout)
    except UserError as e:
        raise UserError(f"{directory / ADAPTER_CONFIG}: base_model_name_or_path: {e}") from e
    if lora_layers(base):
        raise UserError(
            f"{directory / ADAPTER_CONFIG}: the base '{adapter.base}' has adapters of its own; "
            "merge them first (finetune merge)"
        )
    model: Model
    if adapter.task == "lm":
        if not isinstance(base, GPT):
            raise UserError(f"{directory / ADAPTER_CONFIG}: a CAUSAL_LM adapter on the classifier '{adapter.base}'")
        model, prefix = base, ""
    else:
        if isinstance(base, GPTClassifier):
            classifier = base
        else:
            if "head.weight" not in adapter.saved:
                raise UserError(
                    f"{directory / PEFT_WEIGHTS}: a SEQ_CLS adapter without its '{HEAD}' layer, which "
                    f"transformers initialises at random; train it with modules_to_save=['{HEAD}']"
                )
            classifier = GPTClassifier(base, adapter.saved["head.weight"].shape[0])
            with torch.no_grad():
                classifier.head.bias.zero_()  # transformers' score layer has no bias
            meta = {}
        classifier.pool = "last_token"  # where transformers reads: the last token that is not padding
        model, prefix = classifier, "gpt."
    trunk = model.gpt if isinstance(model, GPTClassifier) else model
    if ("lm_head" in adapter.lora or "lm_head.weight" in adapter.saved) and trunk.config.tie_embeddings:
        raise UserError(
            f"{directory / PEFT_WEIGHTS}: the adapter changes lm_head, which this base ties to the token embedding"
        )
    layers = {name: name if name == "head" else prefix + name for name in adapter.lora}
    wrap_layers(model, list(layers.values()), adapter.rank, adapter.alpha, adapter.dropout)
    _copy_into(
        model,
        {f"{layers[m]}.lora_{ab}": t for m, pair in adapter.lora.items() for ab, t in zip("AB", pair, strict=True)},
        directory,
    )
    _copy_into(
        model, {name if name.startswith("head.") else prefix + name: t for name, t in adapter.saved.items()}, directory
    )
    for name, p in model.named_parameters():  # as PEFT trains it: the adapters and the modules saved whole
        p.requires_grad = "lora_" in name or name.removeprefix(prefix) in adapter.saved
    return _with_meta(model, {**meta, **read_export_interface(directory)})


@torch.no_grad()
def _copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise UserError(f"{directory / PEFT_WEIGHTS}: {name} has no place in the base model")
        if params[name].shape != t.shape:
            raise UserError(
                f"{directory / PEFT_WEIGHTS}: {name} has shape {tuple(t.shape)}, the base needs "
                f"{tuple(params[name].shape)}; the adapter was trained on another base"
            )
        params[name].copy_(t)


_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """`owner/name`, as the Hugging Face hub names repositories."""
    return bool(_HUB_REPO.fullmatch(name))


def hub_id(name: str) -> str | None:
    """The hub repository a model name stands for (a preset's, or `owner/name` that is no local path)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    return name if is_hub_id(name) and not Path(name).expanduser().exists() else None


def _download(name: str) -> Path:
    if name in PRESETS and name not in HUB_IDS:
        raise UserError(f"'{name}' has no pretrained weights; use a random init (model.init=random, or --init random)")
    repo = HUB_IDS.get(name, name)
    if not is_hub_id(repo):
        raise UserError(
            f"'{name}': no such file or directory, and not a hub id ({', '.join(HUB_IDS)}, or owner/name); "
            "pass a directory with config.json + model.safetensors or a book .pth file"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # the hub raises many types (offline, 404, auth); all mean the same to a user
        raise UserError(
            f"could not download '{repo}' from the Hugging Face hub ({type(e).__name__}); when offline, pass a local "
            "directory with config.json + model.safetensors, or use a random init (model.init=random, or --init random)"
        ) from e


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{directory}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        return read_tensors(path)
    try:
        return iter(_torch_load(path).items())
    except UserError:
        raise
    except Exception as e:  # corrupt or truncated files raise format-specific errors
        raise unreadable(path, e) from e


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, never unpickling code (weights_only), mmap'd when possible."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be mmap'd
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's training checkpoints
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def _load_book(path: Path, config: GPTConfig | None, dropout: float) -> GPT:
    try:
        state = _torch_load(path)
    except UserError:
        raise
    except Exception as e:  # corrupt or truncated files raise format-specific errors
        raise unreadable(path, e) from e
    if config is None:
        config = book_config(state, path)
    return _assemble(replace(config, dropout=dropout), from_book(state, config.n_embd), path)


def _assemble(config: GPTConfig, tensors: Iterator[tuple[str, torch.Tensor]], source: Path) -> GPT:
    return assemble(lambda: GPT(config), tensors, source)


def load_model(directory: Path, dropout: float = 0.0) -> tuple[Model, dict]:
    """Rebuild a model saved by finetune (full weights, or base + adapter), and its config, after
    checking its files against the manifest. `dropout` is a training setting, not part of the checkpoint."""
    directory = Path(directory)
    adapter = (directory / ADAPTER_CONFIG).exists()
    meta = read_meta(directory)
    verify(directory)
    if adapter:
        return _load_adapter_model(directory, dropout)
    build = _builder(meta, directory / CONFIG_FILE)
    config = replace(_gpt_config(meta, directory / CONFIG_FILE), dropout=dropout)
    return assemble(lambda: build(config), read_tensors(directory / MODEL_FILE), directory / MODEL_FILE), meta


def _gpt_config(meta: dict, where: Path):
    try:
        return GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: missing or bad 'model' entry ({e})") from e


def _builder(meta: dict, where: Path) -> Callable[[Model | GPTConfig], Model]:
    """A function GPT -> the model of this checkpoint's task (a GPTConfig gives a fresh trunk)."""

    def trunk(gpt: Model | GPTConfig) -> GPT:
        if isinstance(gpt, GPTClassifier):
            raise UserError(f"{where}: a language model's checkpoint on a classifier's base")
        return gpt if isinstance(gpt, GPT) else GPT(gpt)

    def classifier(model: Model | GPTConfig) -> GPTClassifier:
        if isinstance(model, GPTClassifier):  # a run that started from a classifier
            model.pool = pool
            return model
        return GPTClassifier(trunk(model), num_classes, pool)

    task = meta.get("task")
    if task == "lm":
        return trunk
    if task == "classification":
        try:
            num_classes, pool = meta["num_classes"], meta["pool"]
        except KeyError as e:
            raise UserError(f"{where}: classification checkpoint without {e}") from e
        return classifier
    raise UserError(f"{where}: unknown task {task!r}")


def rebuild_base(base: dict, dropout: float = 0.0) -> Model:
    """The model a run started from (`base_spec`): by name, or a random init re-made from the run's seed."""
    torch.manual_seed(base["seed"])
    return build_model(base["name"], base["init"], dropout)


def _load_adapter_model(directory: Path, dropout: float) -> tuple[Model, dict]:
    """Base model (by name, or re-made from its seed when it was a random init) + the trained tensors
    (LoRA layers and whatever trained beside them, or the trained layers of a partial fine-tune)."""
    where = directory / ADAPTER_CONFIG
    meta = read_config(directory, ADAPTER_CONFIG)
    try:
        base, adapter = meta["base"], meta["adapter"]
        expected = _gpt_config(meta, where)
        gpt = rebuild_base(base, dropout)
        if base.get("merged") and lora_layers(gpt):
            gpt = merged_model(gpt)  # the run started from the base with its adapter folded in
    except KeyError as e:
        raise UserError(f"{where}: missing entry {e}") from e
    shape = (gpt.gpt if isinstance(gpt, GPTClassifier) else gpt).config
    if replace(shape, dropout=0.0) != replace(expected, dropout=0.0):
        raise UserError(
            f"{where}: the adapter was trained on a base of shape {expected.to_dict()}, "
            f"but '{base['name']}' has shape {shape.to_dict()}"
        )
    model = _builder(meta, where)(gpt)
    imported = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    if imported and not adapter["layers"]:
        merged_model(model)  # the run trained layers of the imported adapter's merged model
    elif imported != adapter["layers"] and imported:
        raise UserError(f"{where}: the base '{base['name']}' has LoRA layers other than the adapter's")
    elif adapter["layers"] and not imported:
        wrap_layers(model, adapter["layers"], adapter["rank"], adapter["alpha"], adapter["dropout"])
    stored = tensor_names(directory / ADAPTER_FILE)
    for name, p in model.named_parameters():  # as in training: adapters and the modules trained beside them
        p.requires_grad = "lora_" in name or name in stored
    load_weights(model, directory)
    return model, meta


def merge_adapter(source: Path, out: Path) -> Path:
    """Fold the adapter of a checkpoint (or of a run's kept checkpoint) into its base: a stand-alone
    model.safetensors + config.json in `out`. Returns the checkpoint that was merged."""
    source = resolve(Path(source))
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory for the merged checkpoint")
    if not (source / ADAPTER_CONFIG).exists():
        raise UserError(f"{source}: no adapter to merge (it is already a plain checkpoint)")
    model, meta = load_model(source)
    # No "base" or "adapter": the result stands alone. The model's own entries are written afresh.
    kept = {k: v for k, v in meta.items() if k not in ("base", "adapter", "format", *model.checkpoint_meta())}
    write_directory(out, model_files(merged_model(model), kept))
    return source
