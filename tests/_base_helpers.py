"""Tiny pretrained bases for fine-tuning tests: a random ``LlamaForCausalLM`` and a BPE tokenizer with a
ChatML chat template, written by ``transformers`` itself (``save_pretrained``) as a hub checkpoint would be."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["The capital of France is Paris.", "Two plus two is four.", "def add(a, b):\n    return a + b\n",
        "Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog."] * 10


def make_base(folder: Path, *, chat: bool = True, seed: int = 0, width: int = 64, layers: int = 2,
              tie: bool = False, eos: str | None = None, rope: dict | None = None) -> Path:
    """A tiny random Llama base in ``folder`` (config, safetensors, tokenizer files): the shape of a real one.

    ``eos="</s>"`` makes a TinyLlama-style base: ``</s>`` ends text and there is no ``<|endoftext|>`` at all."""
    import transformers  # lazy: transformers imports in seconds; only the tests that build a base need it

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] if eos == "</s>" else SPECIALS
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = eos or ("<|im_end|>" if chat else "<|endoftext|>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=None, pad_token=eos)
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 8, hidden_size=width,
                                   intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                                   tie_word_embeddings=tie, eos_token_id=fast.eos_token_id,
                                   **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder
