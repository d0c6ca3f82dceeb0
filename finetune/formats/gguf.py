"""GGUF, the file llama.cpp and Ollama run: GPT-2's tensors in llama.cpp's names and its tokenizer, written
with the `gguf` package (maintained with llama.cpp; the `gguf` extra), and an Ollama Modelfile.

The tensor names and hyper-parameters are those llama.cpp's own `convert_hf_to_gguf.py` writes for
`GPT2LMHeadModel`; our nn.Linear weights are already (out, in), as llama.cpp wants them. A model trained
with a prompt style carries it as the file's `tokenizer.chat_template`, and in the Modelfile as TEMPLATE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from finetune.checkpoints.interface import interface_of
from finetune.data.prompts import chat_template, is_jinja, stop_strings, template
from finetune.errors import UserError
from finetune.model.gpt import GPT
from finetune.model.tokenizer import ASSETS, EOT, EOT_ID

DTYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"

_BLOCK = {  # ours -> llama.cpp's, in block `i`
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.qkv.weight": "attn_qkv.weight",
    "attn.qkv.bias": "attn_qkv.bias",
    "attn.proj.weight": "attn_output.weight",
    "attn.proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.fc.weight": "ffn_up.weight",
    "mlp.fc.bias": "ffn_up.bias",
    "mlp.proj.weight": "ffn_down.weight",
    "mlp.proj.bias": "ffn_down.bias",
}
_TOP = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError('--format gguf needs the gguf package: pip install "finetune-gpt2[gguf]"') from None
    return gguf


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Every tensor llama.cpp's GPT-2 reads, by its name; the output head always written (a tied one as a copy)."""
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    out = {}
    for name, t in state.items():
        if name in _TOP:
            out[_TOP[name]] = t
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[f"blk.{i}.{_BLOCK[rest]}"] = t
    out["output.weight"] = state["lm_head.weight"]
    return out


def write_gguf(model: GPT, meta: dict, path: Path, dtype: str, name: str) -> None:
    """The model as one GGUF file: weights (matrices in `dtype`; norms and biases in f32), hyper-parameters,
    the GPT-2 byte-level BPE tokenizer, and the chat template of its prompt style."""
    gguf = gguf_module()
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_eps)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    _add_tokenizer(writer, gguf, c.vocab_size)
    style = meta.get("prompt_style")
    if style:
        writer.add_chat_template(chat_template(style))
    for tensor_name, t in gguf_tensors(model).items():
        array = t.numpy()
        if array.ndim == 2 and dtype == "f16":
            writer.add_tensor(tensor_name, array.astype(np.float16))
        elif array.ndim == 2 and dtype == "q8_0" and array.shape[1] % 32 == 0:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                tensor_name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(tensor_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, gguf, vocab_size: int) -> None:
    """GPT-2's BPE as llama.cpp reads it: the byte-level token strings by id, the merges in rank order,
    `<|endoftext|>` as the control token that begins, ends and pads."""
    encoder = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * vocab_size
    for token, i in encoder.items():
        tokens[i] = token
    merges = [line for line in (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    types = [gguf.TokenType.NORMAL] * vocab_size
    types[EOT_ID] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)


def modelfile(meta: dict, gguf_name: str = GGUF_FILE) -> str:
    """An Ollama Modelfile: the GGUF, the prompt style as TEMPLATE (the user's message is the instruction),
    end-of-text and the model's stop strings as stops, its generation defaults as PARAMETERs."""
    interface = interface_of(meta)
    g = interface.generation
    lines = [f"FROM ./{gguf_name}"]
    if interface.prompt_style and is_jinja(interface.prompt_style):
        lines.append("# TEMPLATE: the model's own Jinja chat template is in model.gguf; Ollama needs it in Go's syntax")
    elif interface.prompt_style:
        lines.append(f'TEMPLATE """{ollama_template(interface.prompt_style)}"""')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    for stop in dict.fromkeys([EOT, *g.stop, *stop_strings(interface.prompt_style)]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines += [
        f"PARAMETER temperature {g.temperature:g}",
        f"PARAMETER num_predict {g.max_new_tokens}",
        f"PARAMETER num_ctx {meta['model']['context_length']}",
        f"PARAMETER seed {g.seed}",
    ]
    if g.top_k:
        lines.append(f"PARAMETER top_k {g.top_k}")
    if g.top_p:
        lines.append(f"PARAMETER top_p {g.top_p:g}")
    return "\n".join(lines) + "\n"


def ollama_template(style: str) -> str:
    """The style in Ollama's Go template language: the last user message (`.Prompt`) as the instruction."""
    t = template(style)
    before_input = t.before_input if not t.input_optional else ""  # a template's own text around an empty input
    for text in (t.head, before_input, t.before_response):
        if "{{" in text or '"""' in text:
            raise UserError(
                f"prompt style {style!r}: its text holds '{{{{' or '\"\"\"', which an Ollama TEMPLATE cannot hold"
            )
    return t.head + "{{ .Prompt }}" + before_input + t.before_response
