"""GPT-2's byte-pair encoding as a `tiktoken.Encoding`, built from files shipped with the package.

tiktoken's own `get_encoding("gpt2")` downloads these two files; we ship byte-identical copies
(from https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/) so it works offline, and
check them against the same SHA-256 sums tiktoken uses.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from finetune.errors import UserError

ASSETS = Path(__file__).parent.parent / "assets" / "gpt2"  # finetune/assets/gpt2
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"
EOT_ID = 50256


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(ASSETS / "vocab.bpe"),
            encoder_json_file=str(ASSETS / "encoder.json"),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"GPT-2 tokenizer files in {ASSETS} are missing or corrupt ({e}); reinstall finetune") from e
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257
    )


def encode(text: str) -> list[int]:
    """Text to ids; `<|endoftext|>` in the text is the end-of-text token, as in the book."""
    return get_tokenizer().encode(text, allowed_special={EOT})
