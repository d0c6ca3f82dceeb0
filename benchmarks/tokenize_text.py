"""Tokenizing a large plain-text corpus for the text recipe: a generated corpus (The Verdict's
paragraphs shuffled into 1 GB of 100 text files), tokenized into the recipe's cached token files, then
a second run that finds them in the cache.

Each run is its own process, so the peak memory it reports is its own (resident set, including the
interpreter, torch and tiktoken).

    python benchmarks/tokenize_text.py [--mb 1024]
"""

from __future__ import annotations

import argparse
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

FILES = 100


def write_corpus(directory: Path, megabytes: int) -> int:
    """FILES text files of shuffled paragraphs; returns the bytes written."""
    from finetune.datasets import THE_VERDICT, bundled

    paragraphs = [p for p in bundled(THE_VERDICT).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng, per_file, written = random.Random(0), megabytes * 2**20 // FILES, 0
    for i in range(FILES):
        parts, size = [], 0
        while size < per_file:
            paragraph = f"{rng.randrange(10**6)}. {rng.choice(paragraphs)}\n\n"
            parts.append(paragraph)
            size += len(paragraph.encode())
        data = "".join(parts).encode()
        (directory / f"part-{i:03d}.txt").write_bytes(data)
        written += len(data)
    return written


def measure(corpus: str, cache: str) -> None:
    """In its own process: the recipe's tokenization (or cache lookup); prints one JSON object."""
    from finetune.data.corpus import find_sources, tokenized
    from finetune.model.tokenizer import get_tokenizer

    get_tokenizer()  # load the BPE files before timing
    start = time.perf_counter()
    data = tokenized(find_sources([corpus], None), "text", 0.1, Path(cache))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": sum(data.manifest["tokens"].values()), "peak_mib": peak_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="corpus size in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, cache = Path(tmp) / "corpus", Path(tmp) / "cache"
        corpus.mkdir()
        size = write_corpus(corpus, args.mb) / 2**20
        print(f"# text corpus: {FILES} files, {size:,.0f} MiB; {cpu_name()}", file=sys.stderr)
        print("| run | tokens | seconds | MiB/s | peak RSS MiB |")
        print("| --- | --- | --- | --- | --- |")
        for run in ("first (tokenize)", "second (cache)"):
            r = in_own_process(__file__, "--measure", str(corpus), str(cache))
            if isinstance(r, str):
                print(f"| {run} | failed: {r} | | | |")
                continue
            print(f"| {run} | {r['tokens']:,} | {r['seconds']:.1f} | {size / r['seconds']:,.1f} | {r['peak_mib']:,.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(*sys.argv[2:4])
    else:
        main()
