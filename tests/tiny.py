"""Tiny models built from transformers' config classes and a byte-level BPE tokenizer trained
at test time: what the fixtures in conftest.py pack, and what tests and benches build
their own variants from. Nothing here touches the network."""

from __future__ import annotations

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Water boils at one hundred degrees, and the quick brown fox jumps over the lazy dog.",
    "Small boxes run small models: a Raspberry Pi, a Jetson, a laptop without a GPU.",
    "Quantization stores weights in eight or four bits instead of sixteen.",
    "Ünïcödé façade — naïve café, 東京, Ελληνικά and emoji 🚀 too.",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)



def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(kind: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=(kind == "llama"), bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; scale up so greedy decoding is decisive and
    # quantization error is visible but small, as in a trained model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()
