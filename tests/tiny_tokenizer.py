"""A tiny byte-level BPE tokenizer (vocab ~300, trained in memory in ~50 ms) for server tests.

Byte-level like SmolLM2's: an emoji is several tokens that decode to U+FFFD alone, which is what the
incremental detokenizer must handle. It has a chat template and an `<eos>` special token (id 0).
"""

from __future__ import annotations

from functools import cache

from server.tokenizer import Tokenizer

CORPUS = ["hello world", "the end of the story", "héllo wörld 你好", "stop here", "Hello, how are you?"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@cache
def tiny_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    hf.chat_template = CHAT_TEMPLATE
    return Tokenizer(hf)
