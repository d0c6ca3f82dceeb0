"""Commands that use a model, whatever trained it: `generate`, `chat`, `respond`, `classify`, `predict`,
`serve`, `merge` and `export`. Each reads the model and the interface stored with it
(`finetune.inference.loading`), never a recipe. Parsing needs nothing heavy; torch is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli.options import BF16_HELP, STYLE_HELP, positive_int
from finetune.errors import UserError

MODEL_HELP = (
    "a run directory, any of its checkpoints, a merged model, a transformers or PEFT export, a hub id, "
    "a preset or a book .pth"
)


def add_commands(commands) -> None:
    gen = commands.add_parser("generate", help="continue a prompt with a GPT-2 model")
    gen.add_argument("--model", default="gpt2", help=MODEL_HELP)
    gen.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=positive_int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--bf16", action="store_true", help=BF16_HELP)
    gen.set_defaults(func=run_generate)

    chat = commands.add_parser("chat", help="talk to an instruction-tuned or chat model, one message per line")
    chat.add_argument("model", help=MODEL_HELP)
    chat.add_argument("--prompt-style", help=STYLE_HELP + " (default here: alpaca)")
    chat.add_argument("--system", help="a system message opening the conversation (a chat format's)")
    chat.add_argument("--bf16", action="store_true", help=BF16_HELP)
    chat.set_defaults(func=run_chat)

    res = commands.add_parser("respond", help="write responses to instructions (a file, or a run's test split again)")
    res.add_argument("model", help=MODEL_HELP)
    res.add_argument(
        "--data",
        help="instruction records (JSON list, JSONL, CSV, Parquet) with 'instruction' and "
        "optionally 'input' and 'output' (default: the run's test split, from its "
        "responses.jsonl)",
    )
    res.add_argument("--out", help="output JSONL (default: RUN_DIR/responses.jsonl, or responses-<data>.jsonl)")
    res.add_argument("--max-new-tokens", type=positive_int)
    res.add_argument("--batch-size", type=positive_int, default=8)
    res.add_argument("--prompt-style", help=STYLE_HELP + " (default here: alpaca)")
    res.add_argument("--bf16", action="store_true", help=BF16_HELP)
    res.set_defaults(func=run_respond)

    cls = commands.add_parser(
        "classify", help="label texts with a trained classifier (or score replies with a reward model)"
    )
    cls.add_argument("checkpoint", help="run directory, checkpoint or export of a classifier")
    cls.add_argument(
        "--text", action="append", required=True, help="a text to classify; a reward model's instruction (repeatable)"
    )
    cls.add_argument("--response", action="append", help="a reward model: the response to the --text of the same place")
    cls.set_defaults(func=run_classify)

    pred = commands.add_parser(
        "predict", help="classify every text of a file: one CSV row per input with every class's probability"
    )
    pred.add_argument("checkpoint", help="run directory, checkpoint or export of a classifier")
    pred.add_argument("--data", required=True, help="CSV, TSV, JSON, JSONL, Parquet or raw label<TAB>text file")
    pred.add_argument("--out", required=True, help="CSV file to write (must not exist)")
    pred.add_argument(
        "--text-field",
        help="column holding the text (default: the run's data.text_field, or 'text'); a reward model reads "
        "'instruction' (or this), 'input' and 'response', as in responses.jsonl",
    )
    pred.add_argument(
        "--format", choices=["csv", "tsv", "json", "jsonl", "parquet", "raw"], help="default: from the extension"
    )
    pred.add_argument("--delimiter", help="CSV/TSV field separator")
    pred.add_argument("--batch-size", type=positive_int, default=32)
    pred.set_defaults(func=run_predict)

    srv = commands.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a page to try it at /")
    srv.add_argument("model", help=MODEL_HELP)
    srv.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    srv.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    srv.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests naming this host (repeatable; * for any): on a loopback address only "
        "loopback names are answered, against DNS rebinding",
    )
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API request")
    srv.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together")
    srv.add_argument("--prompt-style", help=STYLE_HELP + " (default here: plain, the message continued as text)")
    srv.add_argument("--bf16", action="store_true", help=BF16_HELP)
    srv.set_defaults(func=run_serve)

    merge = commands.add_parser(
        "merge",
        help="fold a run's adapter (LoRA, or the layers a partial fine-tune trained) into its base: "
        "a plain finetune checkpoint (for other tools: finetune export)",
    )
    merge.add_argument("run_dir", help="run directory or adapter checkpoint directory")
    merge.add_argument("out_dir", help="new directory for model.safetensors + config.json")
    merge.set_defaults(func=run_merge)

    exp = commands.add_parser(
        "export",
        help="write a model for transformers (merged), peft (a LoRA run's adapter), or llama.cpp and Ollama (GGUF)",
    )
    exp.add_argument("source", help="run or checkpoint directory (gguf: " + MODEL_HELP + ")")
    exp.add_argument("out_dir", help="new directory to write")
    exp.add_argument(
        "--format",
        choices=["transformers", "peft", "gguf"],
        default="transformers",
        help="transformers: a model from_pretrained loads, adapters merged in; peft: the LoRA adapter on its "
        "base; gguf: model.gguf for llama.cpp and an Ollama Modelfile beside it",
    )
    exp.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="gguf: the weight matrices' type")
    exp.set_defaults(func=run_export)


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from finetune.inference.generate import generate
    from finetune.inference.loading import load_for_use
    from finetune.model.tokenizer import EOT_ID, encode, get_tokenizer

    if args.seed is not None:
        torch.manual_seed(args.seed)
    loaded = load_for_use(args.model, args.init, args.bf16)
    if loaded.classifier:
        raise UserError(f"{args.model}: a classifier; generate needs a language model (use finetune classify)")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = encode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue")
    out = generate(
        loaded.language_model,
        [prompt],
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        EOT_ID,
        generator,
    )[0]
    print(get_tokenizer().decode([t for t in out[len(prompt) :] if t != EOT_ID]))


def _instruction_model(args: argparse.Namespace, command: str):
    """A language model prompted in its own style, or --prompt-style, or (neither) the book's alpaca."""
    from finetune.inference.loading import load_language_model

    return load_language_model(args.model, command, args.bf16, args.prompt_style or "alpaca")


def run_chat(args: argparse.Namespace) -> None:
    """A conversation: each answer is to everything said so far, in the model's chat format (one instruction at a
    time for a style that holds one turn); /reset starts again."""
    from finetune.data.jinja_templates import CannotExpress
    from finetune.data.prompts import can_converse, split_user_text, user_message
    from finetune.inference.respond import reply

    loaded = _instruction_model(args, "chat")
    style = loaded.interface.prompt_style
    turns = can_converse(style)
    if args.system and not turns:
        raise UserError(f"--system: the prompt style {style!r} holds no system message; use a chat format")
    opening = [{"role": "system", "content": args.system}] if args.system else []
    print(
        "Type a message (optionally 'instruction || input'); "
        + ("/reset starts a new conversation; " if turns else "each is answered on its own; ")
        + "an empty line or Ctrl-D quits.",
        file=sys.stderr,
    )
    messages = list(opening)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = list(opening)
            print("(a new conversation)", file=sys.stderr)
            continue
        asked = [*(messages if turns else []), user_message(*split_user_text(line))]
        try:
            answer = reply(loaded.model, [asked], style, loaded.interface.generation)[0]
        except (UserError, CannotExpress) as e:  # a conversation too long for the context ends this turn only
            print(f"finetune: error: {e}" + ("; /reset starts a new conversation" if turns else ""), file=sys.stderr)
            continue
        print(answer)
        messages = [*asked, {"role": "assistant", "content": answer}]


def run_respond(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.data.conversations import holds_conversations
    from finetune.data.records import read_records
    from finetune.inference.respond import with_max_new_tokens, write_responses

    loaded = _instruction_model(args, "respond")
    run_dir = Path(args.model)
    is_run = (run_dir / "config.yaml").is_file()
    if args.data:
        source = Path(args.data)
        out = (run_dir if is_run else Path(".")) / f"responses-{source.stem}.jsonl"
    elif is_run and (run_dir / "responses.jsonl").is_file():
        source = out = run_dir / "responses.jsonl"
    else:
        raise UserError(f"{args.model} is not a run with a responses.jsonl (its test split); give --data FILE")
    generation = with_max_new_tokens(loaded.interface.generation, args.max_new_tokens)
    out = Path(args.out) if args.out else out
    style = loaded.interface.prompt_style
    if holds_conversations(source):
        count = _reply_to_conversations(loaded.model, source, style, generation, args.batch_size, out)
    else:
        setting = "--data" if args.data else str(source)
        records = read_records(source, need_output=False, setting=setting)
        write_responses(loaded.model, records, style, generation, args.batch_size, out, quiet=False)
        count = len(records)
    print(f"{count} responses written to {out}")


def _reply_to_conversations(model, source, style: str, generation, batch_size: int, out) -> int:
    """Replies to a file of conversations: a chat run's responses.jsonl (`messages` and the reference `output`),
    or conversations whose last message is the user's, or the assistant's reference."""
    from finetune.data.conversations import message_text, read_conversations
    from finetune.data.tables import read_table
    from finetune.evals.generation import read_responses
    from finetune.inference.respond import write_replies

    if {"messages", "output", "response"} <= set(read_table(source).frame.columns):  # a chat run's responses
        rows = read_responses(source)
        asked, references = [r["messages"] for r in rows], [r["output"] for r in rows]
    else:
        kept = read_conversations(source, None, None, strict=True, to_answer=True, setting="--data").kept
        asked = [c.messages[:-1] if c.messages[-1]["role"] == "assistant" else c.messages for c in kept]
        references = [message_text(c.messages[-1]) if c.messages[-1]["role"] == "assistant" else "" for c in kept]
    write_replies(model, asked, references, style, generation, batch_size, out, quiet=False)
    return len(asked)


def run_classify(args: argparse.Namespace) -> None:
    from finetune.checkpoints.interface import REWARD
    from finetune.inference.loading import load_classifier
    from finetune.inference.predict import exchanges, predict

    if any(not text.strip() for text in args.text):
        raise UserError("--text is empty; give a text to classify")
    loaded = load_classifier(args.checkpoint)
    texts = args.text
    if loaded.interface.problem_type == REWARD:
        if len(args.response or []) != len(texts):
            raise UserError(
                f"{args.checkpoint} is a reward model: give one --response per --text (got {len(args.response or [])} "
                f"for {len(texts)})"
            )
        texts = exchanges(loaded.meta, args.text, [""] * len(texts), args.response)
    elif args.response:
        raise UserError(f"{args.checkpoint} is not a reward model; --response scores replies with one")
    predictions = predict(loaded.classifier_model, loaded.meta, texts)
    replies = [f"\t{r}" for r in args.response] if args.response else [""] * len(texts)
    for text, answer, reply in zip(args.text, predictions.lines(), replies, strict=True):
        print(f"{answer}\t{text}{reply}")


def run_predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.inference.predict import predict_file

    rows = predict_file(
        Path(args.checkpoint),
        Path(args.data),
        Path(args.out),
        args.text_field,
        args.format,
        args.delimiter,
        args.batch_size,
    )
    print(f"{rows} predictions written to {args.out}")


def run_serve(args: argparse.Namespace) -> None:
    from finetune.serve.app import serve

    serve(
        args.model,
        args.init,
        args.host,
        args.port,
        args.api_key,
        args.bf16,
        args.max_batch,
        args.prompt_style,
        args.allow_host,
    )


def run_merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.formats.loading import merge_adapter

    source = merge_adapter(Path(args.run_dir), Path(args.out_dir))
    print(f"merged {source} into {args.out_dir} (model.safetensors + config.json)")


def run_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.formats.export import export

    source = export(Path(args.source), Path(args.out_dir), args.format, args.dtype)
    print(f"exported {source} to {args.out_dir} ({args.format}{f', {args.dtype}' if args.format == 'gguf' else ''})")
    if args.format == "gguf":
        name = Path(args.out_dir).resolve().name.lower()
        print(
            f"run it: ollama create {name} -f {Path(args.out_dir) / 'Modelfile'} && ollama run {name}\n"
            f"    or: llama-cli -m {Path(args.out_dir) / 'model.gguf'}"
        )
