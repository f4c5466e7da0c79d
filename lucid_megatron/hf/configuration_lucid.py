"""Hugging Face configuration of a LUCID causal LM (Llama-shaped; LUCID or softmax attention per layer).

Self-contained: exported model directories carry a copy of this file (``trust_remote_code=True``).
"""

from transformers import PretrainedConfig


# The RoPE types the Megatron model computes the same way (lucid_megatron/model/rope.py).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class LucidConfig(PretrainedConfig):
    model_type = "lucid"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        position_embedding="rope",
        rope_theta=10000.0,
        rope_parameters=None,
        lucid_layers=None,
        lucid_eps=1e-6,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if position_embedding not in ("rope", "none"):
            raise ValueError(f"position_embedding={position_embedding!r}; allowed: 'rope', 'none'")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        # transformers' form ({"rope_type", "rope_theta", "factor", ...}), which its rotary initialisers read;
        # None: plain RoPE with rope_theta.  transformers fills in rope_type and rope_theta (standardisation).
        self.rope_parameters = dict(rope_parameters) if rope_parameters else None
        # 1-based numbers of the layers with LUCID attention (Megatron's numbering); the others use softmax.
        self.lucid_layers = list(range(1, num_hidden_layers + 1)) if lucid_layers is None else list(lucid_layers)
        self.lucid_eps = lucid_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type={rope_type!r}; allowed: {', '.join(map(repr, ROPE_TYPES))}")
        self.rope_theta = self.rope_parameters["rope_theta"]  # one value, wherever it was given
