"""Makes a small randomly initialised Llama checkpoint with its own tokenizer, in Hugging Face format.

The test machines cannot download weights, so tests, the demo and the benchmarks build one: a byte-level BPE
tokenizer trained on generated text (so any prompt encodes), and a ``LlamaForCausalLM`` with random weights
saved by transformers as safetensors. Same arguments and seed, same checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out up what "
         "about into them some could time these two may then do first any my now such like our over man me even "
         "most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long "
         "get here between both life being under never day same another know while last might us great old year "
         "code function return value model token request server cluster latency stream batch memory").split()


def make_tiny_llama(folder: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, intermediate_size: int = 0, vocab_size: int = 512,
                    max_position_embeddings: int = 1024, seed: int = 0, initializer_range: float = 0.1) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into ``folder``; returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(4000)]
    corpus += ["0123456789 ,.;:!?()[]{}<>=+-*/_'\"#@$%^&|~`\\ \n\t"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))

    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_position_embeddings, bos_token_id=bos, eos_token_id=eos,
                         initializer_range=initializer_range, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(folder))
    return folder
