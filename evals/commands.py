"""`finetune score`: reference metrics (ROUGE-L, exact match) and an optional LLM judge for a
responses.jsonl. Parsing needs nothing heavy; the scorers are imported when the command runs."""

from __future__ import annotations

import argparse

from finetune.errors import UserError


def add_commands(commands) -> None:
    score = commands.add_parser("score", help="score a responses.jsonl: ROUGE-L, exact match, optional LLM judge")
    score.add_argument("responses")
    score.add_argument("--judge-url", help="Ollama /api/chat or OpenAI-compatible /v1/chat/completions endpoint")
    score.add_argument("--judge-model", help="model name at that endpoint, e.g. llama3")
    score.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request")
    score.add_argument("--retries", type=int, default=2, help="retries after a timeout or server error")
    score.add_argument(
        "--reward-model", help="a reward model run or export: the mean reward of the responses and of the references"
    )
    score.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    score.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from finetune.checkpoints.atomic import write_text_atomic
    from finetune.data.prompts import format_conversation, format_prompt
    from finetune.evals.generation import read_responses, reference_metrics
    from finetune.evals.judge import JudgeClient, judge_all
    from finetune.progress import progress

    if bool(args.judge_url) != bool(args.judge_model):
        raise UserError("--judge-url and --judge-model go together")
    path = Path(args.responses)
    rows = read_responses(path)
    reference = reference_metrics([r["response"] for r in rows], [r["output"] for r in rows])
    summary = {k: v for k, v in reference.items() if k != "per_example"}
    per_example = [dict(r) for r in reference["per_example"]]
    if args.reward_model:
        rewards = reward_scores(args.reward_model, rows)
        summary |= {key: values.mean().item() for key, values in rewards.items()}
        summary["reward_win_rate"] = (rewards["reward"] > rewards["reward_reference"]).double().mean().item()
        for i, example in enumerate(per_example):
            example.update(reward=rewards["reward"][i].item(), reward_reference=rewards["reward_reference"][i].item())
    if args.judge_url:
        client = JudgeClient(args.judge_url, args.judge_model, timeout=args.timeout, retries=args.retries)
        items = [
            {
                "prompt": (
                    format_conversation(r.get("prompt_style") or "chatml", r["messages"])
                    if "messages" in r
                    else format_prompt(r.get("prompt_style") or "alpaca", r["instruction"], r.get("input", ""))
                ).rstrip(),
                "reference": r["output"],
                "response": r["response"],
            }
            for r in rows
        ]
        judged, records = judge_all(client, items, lambda it: progress(it, "judging"))
        summary.update(judged)
        for example, record in zip(per_example, records, strict=True):
            example.update(judge_score=record["score"], judge_error=record["error"])
        write_text_atomic(path.with_suffix(".judge.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(path.with_suffix(".scores.json"), json.dumps({**summary, "per_example": per_example}, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        line = f"n={summary['n']}  ROUGE-L={summary['rouge_l']:.4f}  exact match={summary['exact_match']:.2%}"
        if args.reward_model:
            line += (
                f"  reward={summary['reward']:.4f} (references {summary['reward_reference']:.4f}, "
                f"responses ahead {summary['reward_win_rate']:.2%})"
            )
        print(line)
        if args.judge_url:
            mean = "n/a" if summary["judge_mean"] is None else f"{summary['judge_mean']:.1f}"
            print(
                f"judge {args.judge_model}: mean {mean} over {summary['judge_scored']} scored, "
                f"{summary['judge_failed']} failed"
            )
        print(f"details in {path.with_suffix('.scores.json')}")


def reward_scores(model: str, rows: list[dict]) -> dict:
    """A reward model's scores of each response and of its reference, prompted in the model's style."""
    from finetune.checkpoints.interface import REWARD
    from finetune.inference.loading import load_classifier
    from finetune.inference.predict import exchanges, predict

    loaded = load_classifier(model)
    if loaded.interface.problem_type != REWARD:
        raise UserError(f"--reward-model {model}: a {loaded.interface.problem_type} model, not a reward model")
    if any("messages" in r for r in rows):
        raise UserError(
            f"--reward-model {model}: a reward model scores instruction and response rows, not conversations"
        )
    asked = [r["instruction"] for r in rows], [r.get("input", "") for r in rows]
    scored = {"reward": "response", "reward_reference": "output"}
    return {
        key: predict(
            loaded.classifier_model, loaded.meta, exchanges(loaded.meta, *asked, [r[field] for r in rows])
        ).values[:, 0]
        for key, field in scored.items()
    }
