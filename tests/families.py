"""Tiny random models of the families people deploy on small boxes (issue 17's table), built
from transformers' own config classes, each with the features that set its family apart
switched on at a size a test can afford. Nothing here touches the network."""

from __future__ import annotations

# A window much shorter than the test prompts, so the sliding-window layers actually drop
# keys (a window of 4096 would make them full attention at test lengths).
SLIDING_WINDOW = 8
COMMON = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _llama3(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, rope_parameters=rope, tie_word_embeddings=True, **COMMON)
    return LlamaForCausalLM(config)


def _qwen2(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, num_hidden_layers=2, tie_word_embeddings=False, **COMMON))


def _qwen3(vocab_size):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32, not hidden_size / heads = 16: an explicit head_dim must be read, not derived
    config = Qwen3Config(vocab_size=vocab_size, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True, **COMMON)
    return Qwen3ForCausalLM(config)


def _gemma2(vocab_size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Soft-caps low enough to bend these tiny models' scores (50 / 30 never bind at this size);
    # query_pre_attn_scalar 24, not head_dim 16, so a scale taken from head_dim shows.
    config = Gemma2Config(vocab_size=vocab_size, num_hidden_layers=2, head_dim=16, sliding_window=SLIDING_WINDOW,
                          query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                          **COMMON)
    return Gemma2ForCausalLM(config)


def _gemma3(vocab_size):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # 6 layers: 5 sliding-window (rope base 10k) then 1 global (rope base 1M), as in gemma-3-1b
    config = Gemma3TextConfig(vocab_size=vocab_size, num_hidden_layers=6, head_dim=16, sliding_window=SLIDING_WINDOW,
                              query_pre_attn_scalar=24, **COMMON)
    assert config.layer_types.count("full_attention") == 1 and config.tie_word_embeddings
    return Gemma3ForCausalLM(config)


# longrope's switch: transformers rotates with the long factors once a forward reaches this
# position (Phi-3-mini-128k: 4096 of 131072); max_position_embeddings 128 makes the factor 2,
# the attention factor sqrt(1 + ln 2 / ln 64) = 1.080 on cos and sin.
ORIGINAL_MAX = 64


def _phi3_config(vocab_size, **kwargs):
    from transformers import Phi3Config

    # original_max_position_embeddings at the top level: Phi3Config's own (default 4096)
    # overrides the rope parameters' copy (transformers' standardize_rope_params)
    return Phi3Config(vocab_size=vocab_size, num_hidden_layers=2, original_max_position_embeddings=ORIGINAL_MAX,
                      **COMMON, **kwargs)


def _phi3(vocab_size):
    from transformers import Phi3ForCausalLM

    # Phi-3-mini-128k's longrope over whole heads (8 frequencies), with Phi-3-mini-4k's window
    # on every layer; q/k/v and gate/up stored fused (qkv_proj, gate_up_proj)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0], "long_factor": [1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0]}
    config = _phi3_config(vocab_size, rope_parameters=rope, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    return Phi3ForCausalLM(config)


def _phi4_mini(vocab_size):
    from transformers import Phi3ForCausalLM

    # Phi-4-mini: model_type phi3, 0.75 of each 16-wide head rotates (6 frequencies), the last
    # 4 dims pass through; tied embeddings
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
    config = _phi3_config(vocab_size, rope_parameters=rope, tie_word_embeddings=True)
    assert config.rope_parameters["original_max_position_embeddings"] == ORIGINAL_MAX
    return Phi3ForCausalLM(config)


def _smollm3(vocab_size):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    config = SmolLM3Config(vocab_size=vocab_size, num_hidden_layers=4, tie_word_embeddings=True, **COMMON)
    assert config.no_rope_layers == [1, 1, 1, 0]  # every 4th layer without rotary embedding
    return SmolLM3ForCausalLM(config)


def _mistral(vocab_size):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=vocab_size, num_hidden_layers=2, sliding_window=SLIDING_WINDOW,
                           tie_word_embeddings=False, **COMMON)
    return MistralForCausalLM(config)


BUILDERS = {
    "llama3": _llama3, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3,
    "phi3": _phi3, "phi4-mini": _phi4_mini, "smollm3": _smollm3, "mistral-sw": _mistral,
}
FAMILIES = tuple(BUILDERS)


def make_family_model(family: str, vocab_size: int, seed: int = 0):
    """A float32 model of ``family`` in eval mode. Matrices are scaled up and the output rows
    given unequal lengths (log-normal, as a trained vocabulary's are): random init gives
    near-uniform logits whose top two tie within rounding, a trained model's first choice
    stands out (here it leads its runner-up by ~0.5 of the logits' rms, median, against
    ~0.1 without). Every norm weight is moved away from its identity value (1, or 0 for
    Gemma's ``(1 + w)`` norms), so a norm applied with the wrong offset, or not at all,
    changes the logits."""
    import torch

    torch.manual_seed(seed)
    model = BUILDERS[family](vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
            elif "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
            else:  # biases (Qwen2's q/k/v)
                p.copy_(0.5 * torch.randn_like(p))
        rows = model.get_output_embeddings().weight  # the embedding table too, where tied
        rows.mul_(torch.exp(0.5 * torch.randn(rows.shape[0], 1)))
    return model.eval()
