"""Hand-written LoRA: closed-form math, merge/unmerge, training touches only adapters, adapter checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from finetune.recipes.classification import ClassificationTask
from finetune.recipes.text_head import encode_splits
from finetune.recipes.spam import RECIPE, SpamConfig
from safetensors.torch import load_file

from finetune import GPT, GPTConfig, load_pretrained
from finetune.checkpoints.atomic import write_directory
from finetune.data.classification_inputs import Collate
from finetune.model.classifier import GPTClassifier
from finetune.config import load_config
from finetune.errors import UserError
from finetune.model.lora import LoRALinear, apply_lora, merge_lora, unmerge_lora
from finetune.checkpoints.model_files import model_files
from finetune.training.trainable import parameter_counts
from finetune.training.accelerator import make_accelerator
from finetune.training.trainer import Trainer
from finetune.formats.loading import load_model
from tests.helpers import (
    classifier_for,
    cli,
    one_line_error,
    small_spam_file,
    tiny_spam_args,
)

ALL_BLOCK_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
IDX = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_zero_b_leaves_outputs_exactly_unchanged():
    base = tiny_gpt()
    with torch.no_grad():
        expected = base(IDX)
    lora = apply_lora(tiny_gpt(), rank=4, alpha=8, targets=ALL_BLOCK_LINEARS)
    with torch.no_grad():
        assert torch.equal(lora(IDX), expected)


def test_layer_matches_closed_form():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    layer = LoRALinear(base, rank=6, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 7, 48)
    W, b, A, B = (t.double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ (W + (12 / 6) * B @ A).T + b
    assert (layer(x).double() - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dropout, bias", [(0.0, True), (0.3, True), (0.0, False)])
def test_layer_gradients_equal_autograd_through_the_closed_form(dropout, bias):
    """The fused forward and backward (_LoRAProduct) against autograd through y = x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ,
    in float64, for the input, a base weight that is trained too, the bias and both adapters."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(48, 40, bias=bias), rank=6, alpha=12, dropout=dropout).double().train()
    layer.weight.requires_grad_(True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 7, 48, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, 40, dtype=torch.float64)
    wrt = [x, layer.weight, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])
    torch.manual_seed(1)
    ours = torch.autograd.grad(layer(x), wrt, upstream)
    torch.manual_seed(1)  # the same dropout mask
    dropped = torch.nn.functional.dropout(x, dropout) if dropout else x
    expected_y = torch.nn.functional.linear(x, layer.weight, layer.bias) + dropped @ layer.lora_A.T @ layer.lora_B.T * 2
    expected = torch.autograd.grad(expected_y, wrt, upstream)
    for got, want in zip(ours, expected, strict=True):
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_merge_matches_unmerged_and_unmerge_restores_w():
    model = apply_lora(tiny_gpt(), rank=4, alpha=8, targets=["all-linear"])
    randomize_lora(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged = model(IDX)
        merge_lora(model)
        merged = model(IDX)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert any(not torch.equal(p, original[n]) for n, p in model.named_parameters() if n in original)
    unmerge_lora(model)
    # W + d - d is not W bit for bit in floating point; it is within about one ulp of W.
    assert max((p - original[n]).abs().max().item() for n, p in model.named_parameters() if n in original) <= 1e-6
    with torch.no_grad():
        assert (model(IDX) - unmerged).abs().max().item() <= 1e-5


def test_tied_lm_head_is_refused_and_bad_arguments_are_named():
    with pytest.raises(UserError, match="tied"):
        apply_lora(tiny_gpt(), rank=4, alpha=8, targets=["lm_head"])
    with pytest.raises(UserError, match="valid targets: attn.qkv, attn.proj, mlp.fc, mlp.proj, head, lm_head, all-linear"):
        apply_lora(tiny_gpt(), rank=4, alpha=8, targets=["attn.query"])
    with pytest.raises(UserError, match="rank must be >= 1"):
        apply_lora(tiny_gpt(), rank=0, alpha=8, targets=ALL_BLOCK_LINEARS)
    with pytest.raises(UserError, match="matches no layer"):
        apply_lora(tiny_gpt(), rank=2, alpha=8, targets=["head"])  # an LM has no classification head


def test_gpt2_124m_counts_and_adapter_size(tmp_path):
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2")), num_classes=2)
    apply_lora(model, rank=16, alpha=16, targets=["all-linear"])
    trainable, total = parameter_counts(model)
    # Per block: qkv 16*(768+2304) + proj 16*(768+768) + fc and proj 2*16*(768+3072); head 16*(768+2).
    assert trainable == 12 * (49_152 + 24_576 + 2 * 61_440) + 12_320 == 2_371_616
    write_directory(tmp_path / "adapter", model_files(model, {"base": {"name": "gpt2", "init": "pretrained", "seed": 0}}))
    adapter = tmp_path / "adapter" / "adapter.safetensors"
    targets = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    expected = {f"gpt.blocks.{i}.{t}.lora_{m}" for i in range(12) for t in targets for m in "AB"}
    assert set(load_file(adapter)) == expected | {"head.lora_A", "head.lora_B", "head.weight", "head.bias"}
    # The trained tensors in fp32 and a JSON header of a few kB: 9.5 MB, nothing else.
    assert 4 * (2_371_616 + 2 * 768 + 2) < adapter.stat().st_size < 4 * (2_371_616 + 2 * 768 + 2) + 20_000
    apply_targets = apply_lora(GPT(GPTConfig.from_preset("gpt2")), rank=16, alpha=16, targets=ALL_BLOCK_LINEARS)
    assert parameter_counts(apply_targets)[0] == 12 * (49_152 + 24_576 + 2 * 61_440) == 2_359_296


def test_training_changes_only_adapters_and_train_modules_and_reloads_exactly(tmp_path):
    data_file = small_spam_file(tmp_path / "sms.tsv")
    config = load_config(SpamConfig, None, [
        f"data.path={data_file}", f"output_dir={tmp_path / 'run'}", "model.name=gpt2-tiny", "model.init=random",
        "finetune.trainable=lora", "lora.rank=4", "lora.alpha=8", "lora.train_modules=[head]", "lora.dropout=0.1",
        "train.epochs=1", "train.lr=1e-3", "data.max_length=32",
    ])
    accelerator = make_accelerator(config.train)
    torch.manual_seed(config.train.seed)
    model = classifier_for(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data, max_length = encode_splits(RECIPE.prepare(config), config, model.gpt.config.context_length)
    meta = {"labels": ["ham", "spam"], "max_length": max_length,
            "base": {"name": "gpt2-tiny", "init": "random", "seed": config.train.seed}}
    fit = Trainer(config, accelerator, model, ClassificationTask(["ham", "spam"]), data["train"], data["val"], Collate(), meta, quiet=True).fit()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == ("lora_" in name or name.startswith("head.")), name

    final = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    stored = load_file(final / "adapter.safetensors")
    assert set(stored) == {n for n in before if "lora_" in n or n.startswith("head.")}
    batch = Collate()([data["test"][i] for i in range(len(data["test"]))])
    with torch.no_grad():
        expected = model.eval()(batch["input_ids"], batch["attention_mask"])
    torch.save(batch, tmp_path / "batch.pt")
    script = (
        "import sys, torch; from finetune.formats.loading import load_model\n"
        "model, _ = load_model(sys.argv[1]); batch = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad(): torch.save(model.eval()(batch['input_ids'], batch['attention_mask']), sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(final), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
                   check=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
    assert fit.kept.name == "best"


def test_lora_run_eval_merge_and_reload(tmp_path, capsys):
    data_file = small_spam_file(tmp_path / "sms.tsv")
    out = tmp_path / "run"
    args = tiny_spam_args(data_file, out, "finetune.trainable=lora", "lora.rank=4", "lora.alpha=8",
                          "lora.targets=[all-linear]")
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert "parameters: 8,456 trainable of 3,341,514" in err
    metrics = json.loads((out / "metrics.json").read_text())
    code, printed, _ = cli(capsys, "eval", str(out), "--json")
    assert code == 0 and json.loads(printed)["test"] == metrics["test"]

    code, _, err = cli(capsys, "merge", str(out), str(tmp_path / "merged"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    adapted, _ = load_model(out / "best")
    merged = load_pretrained(tmp_path / "merged")
    batch = Collate()([(list(range(100, 120)), 0), (list(range(7, 15)), 1)])
    with torch.no_grad():
        diff = (adapted.eval()(batch["input_ids"], batch["attention_mask"]) - merged.eval()(batch["input_ids"], batch["attention_mask"]))
    assert diff.abs().max().item() <= 1e-5
    assert "not empty" in one_line_error(capsys, "merge", str(out), str(tmp_path / "merged"))
    assert "no adapter to merge" in one_line_error(capsys, "merge", str(tmp_path / "merged"), str(tmp_path / "again"))


def test_adapter_for_another_base_is_refused(tmp_path, capsys):
    data_file = small_spam_file(tmp_path / "sms.tsv")
    out = tmp_path / "run"
    assert cli(capsys, *tiny_spam_args(data_file, out, "finetune.trainable=lora", "lora.rank=2", "train.epochs=1"))[0] == 0
    best = out / "best"
    config = json.loads((best / "adapter_config.json").read_text())
    config["base"]["name"] = "gpt2"  # a random-init GPT-2 124M: another shape
    contents = {p.name: p.read_bytes() for p in best.iterdir() if p.name != "manifest.json"}
    contents["adapter_config.json"] = json.dumps(config).encode()
    write_directory(best, {name: (lambda path, data=data: path.write_bytes(data)) for name, data in contents.items()})
    assert "trained on a base of shape" in one_line_error(capsys, "classify", str(out), "--text", "hello")

    other = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny", n_embd=32)), 2)
    apply_lora(other, rank=2, alpha=16, targets=ALL_BLOCK_LINEARS)
    from finetune.checkpoints.model_files import load_weights

    with pytest.raises(UserError, match="shape mismatch"):
        load_weights(other, out / "best")


def test_lora_config_errors_exit_2(tmp_path, capsys):
    data_file = small_spam_file(tmp_path / "sms.tsv")
    for override, message in [("lora.rank=0", "override lora.rank"),
                              ("lora.targets=[attn.query]", "valid targets: attn.qkv"),
                              ("lora.train_modules=[nothing]", "lora.train_modules: 'nothing' matches no module")]:
        line = one_line_error(capsys, *tiny_spam_args(data_file, tmp_path / "out", "finetune.trainable=lora", override))
        assert message in line, line
