"""Tiny random Hugging Face models of every supported family, saved with `save_pretrained`."""

import transformers as tf

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-5)

FAMILIES = {
    # GQA 2, head_dim 24 != 64/4, untied head, llama3 rope scaling.
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # MQA with tied embeddings and attention biases on all four projections.
    "llama_tied_mqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True)),
    # A sliding window shorter than the test sequences.
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=8.0)),
}


def make_hf_model(family: str, seed: int = 0):
    import torch

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    # Random norms and biases, so a swapped or missing one cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model
