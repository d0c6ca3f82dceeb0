"""Writes the chat preset's data from the bundled instruction data: conversations.jsonl (OpenAI's fine-tuning
format) and the same conversations in ShareGPT's shape, conversations-sharegpt.json.

The 1,100 instructions, in file order, are chained two by two into 550 two-turn conversations (records 1 and 2,
3 and 4, ...): each turn's user message is the instruction (and its input after a blank line), the assistant's
the reference output. Three in four conversations open with a system message, one of three in turn, so a model
sees conversations with and without one. `python bundled/conversations/make_conversations.py` rewrites both
files byte for byte."""

import json
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parent / "instruction-data" / "instruction-data.json"
SYSTEMS = [
    "You are a helpful assistant.",
    "Answer briefly and exactly.",
    "You are a patient tutor; answer the question asked.",
    None,
]


def conversations() -> list[list[dict]]:
    records = json.loads(SOURCE.read_text(encoding="utf-8"))
    out = []
    for i in range(0, len(records) - 1, 2):
        system = SYSTEMS[(i // 2) % len(SYSTEMS)]
        messages = [{"role": "system", "content": system}] if system else []
        for record in records[i : i + 2]:
            question = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
        out.append(messages)
    return out


def sharegpt(messages: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


if __name__ == "__main__":
    chats = conversations()
    lines = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats)
    (HERE / "conversations.jsonl").write_text(lines, encoding="utf-8")
    shared = json.dumps([sharegpt(m) for m in chats], ensure_ascii=False, indent=1) + "\n"
    (HERE / "conversations-sharegpt.json").write_text(shared, encoding="utf-8")
    print(f"{len(chats)} conversations written")
