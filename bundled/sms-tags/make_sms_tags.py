"""Writes sms-tags.jsonl: the bundled SMS Spam Collection's messages with several labels each, the
multi-label preset's data. `spam` is the collection's own label; the other four are read off the text
by rule, so they are right by construction (a model learns them from the words, not from the rule):
`phone_number` (a run of 5 or more digits), `link` (www., http or .com), `question` (a `?`) and
`shouting` (a word of 3 or more capital letters). 2,500 messages in a seeded random order, duplicates
dropped. `python bundled/sms-tags/make_sms_tags.py` rewrites the file byte for byte."""

import json
import random
import re
from pathlib import Path

SEED, RECORDS = 20261203, 2500
SOURCE = Path(__file__).parent.parent / "sms-spam-collection" / "SMSSpamCollection"
RULES = {
    "phone_number": re.compile(r"\d{5,}"),
    "link": re.compile(r"www\.|http|\.com\b", re.IGNORECASE),
    "question": re.compile(r"\?"),
    "shouting": re.compile(r"\b[A-Z]{3,}\b"),
}


def records() -> list[dict]:
    messages = {}
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        messages.setdefault(text, label)
    texts = sorted(messages)
    random.Random(SEED).shuffle(texts)
    rows = []
    for text in texts[:RECORDS]:
        labels = ["spam"] if messages[text] == "spam" else []
        labels += [name for name, rule in RULES.items() if rule.search(text)]
        rows.append({"text": text, "labels": labels})
    return rows


if __name__ == "__main__":
    path = Path(__file__).with_name("sms-tags.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in records()), encoding="utf-8")
    print(f"wrote {path}")
