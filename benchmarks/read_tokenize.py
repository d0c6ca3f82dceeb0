"""Reading and tokenizing a large classification file: a generated CSV of support tickets (quoted
fields with commas, 6 classes) read by the classification recipe's reader (pandas), every row checked,
then tokenized the recipe's way (chunks of rows on a thread per core), beside tiktoken's
`encode_ordinary_batch` (one thread-pool task per row) and one `encode_ordinary` call per row.

Each measurement runs in its own process, so its peak memory is its own.

    python benchmarks/read_tokenize.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/ is this script's directory
    cpu_name,
    in_own_process,
    peak_mib,
)

WORDS = ("invoice charge refund payment card parcel courier delivery tracking return exchange label error crash "
         "login password email profile quote discount pricing please help my order today the again thanks").split()
TEAMS = ("billing", "shipping", "returns", "technical", "account", "sales")


def write_csv(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ticket_id", "body", "team"])
        for i in range(rows):
            body = " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
            writer.writerow([i, f"Hello, {body}, thanks" if i % 4 == 0 else body, TEAMS[i % len(TEAMS)]])


def measure(path: str, how: str) -> None:
    """In its own process: read + check every row, then tokenize; prints one JSON object."""
    from finetune.recipes.labelled_data import ClassificationData, read_labelled

    from finetune.data.classification_inputs import tokenize
    from finetune.data.tables import read_table
    from finetune.model.tokenizer import get_tokenizer

    get_tokenizer()  # load the BPE files before timing
    start = time.perf_counter()
    table = read_table(path)
    rows = read_labelled(table, ClassificationData(text_field="body", label_field="team"))
    read_s = time.perf_counter() - start
    texts = [text for _, text, _ in rows]
    start = time.perf_counter()
    if how == "recipe":
        ids = tokenize(texts)
    elif how == "tiktoken-batch":
        ids = get_tokenizer().encode_ordinary_batch(texts)
    else:
        encode = get_tokenizer().encode_ordinary
        ids = [encode(text) for text in texts]
    tokenize_s = time.perf_counter() - start
    print(json.dumps({"rows": len(ids), "tokens": sum(map(len, ids)), "read_s": read_s, "tokenize_s": tokenize_s,
                      "peak_mib": peak_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tickets.csv"
        write_csv(path, args.rows)
        size = path.stat().st_size / 2**20
        print(f"{args.rows:,} rows, {size:,.0f} MiB CSV; {cpu_name()}", file=sys.stderr)
        print("| tokenization | rows | tokens | read + check (s) | tokenize (s) | rows/s overall | tokenize MB/s | peak MiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for how in ("recipe", "tiktoken-batch", "per-row"):
            r = in_own_process(__file__, "--measure", str(path), how)
            if isinstance(r, str):
                print(f"| {how} | failed: {r} |")
                continue
            total = r["read_s"] + r["tokenize_s"]
            print(f"| {how} | {r['rows']:,} | {r['tokens']:,} | {r['read_s']:.1f} | {r['tokenize_s']:.1f} | "
                  f"{r['rows'] / total:,.0f} | {size / r['tokenize_s']:.1f} | {r['peak_mib']:,.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
