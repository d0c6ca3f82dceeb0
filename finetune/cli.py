"""The `finetune` command. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from finetune.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from finetune import build_model
    from finetune.generate import generate
    from finetune.tokenizer import EOT_ID, encode, get_tokenizer

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = build_model(args.model, args.init)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = encode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue")
    out = generate(
        model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p, EOT_ID, generator
    )[0]
    print(get_tokenizer().decode([t for t in out[len(prompt) :] if t != EOT_ID]))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="continue a prompt with a GPT-2 model")
    gen.add_argument("--model", default="gpt2", help="preset, hub id, checkpoint directory or book .pth")
    gen.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"finetune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    return 0
