"""Writes arithmetic.jsonl: 3,000 different sums and differences of two whole numbers below 50 (of the
3,775 there are, in a seeded random order, so no question repeats across splits), each as an
instruction record with its `answer` column (what GRPO's rewards check) and an `output` that states it
in one of three ways, as answers written by people do: `36`, `The answer is 36.` or `19 + 17 = 36`.
Instruction tuning on `output` learns the sums and all three forms; a GRPO run that rewards the bare
number then has a format to learn as well as the arithmetic. Seeded, so the file is the same on every machine:
`python bundled/arithmetic/make_arithmetic.py` rewrites it byte for byte."""

import json
import random
from pathlib import Path

SEED, RECORDS, BELOW = 20261203, 3000, 50


def records() -> list[dict]:
    sums = [(f"What is {a} + {b}?", a + b) for a in range(BELOW) for b in range(BELOW)]
    differences = [(f"What is {a} - {b}?", a - b) for a in range(BELOW) for b in range(a + 1)]  # never negative
    questions = sums + differences
    random.Random(SEED).shuffle(questions)
    forms = ["{answer}", "The answer is {answer}.", "{sum} = {answer}"]
    rng = random.Random(SEED + 1)
    return [
        {
            "instruction": question,
            "input": "",
            "output": rng.choice(forms).format(answer=answer, sum=question.removeprefix("What is ").rstrip("?")),
            "answer": str(answer),
        }
        for question, answer in questions[:RECORDS]
    ]


if __name__ == "__main__":
    path = Path(__file__).with_name("arithmetic.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in records()))
    print(f"wrote {path}")
