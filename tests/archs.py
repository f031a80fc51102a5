"""Tiny random models of the architectures users bring, built from their transformers config
classes (no network): the same character tokenizer as tiny.py, hidden size 32, 2 layers, a few
small experts for the MoE ones."""

from __future__ import annotations

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=32)

# model_type -> extra config values. What each exercises (default targets):
ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {},        # q/k/v/o_proj
    "gemma": {}, "gemma2": {}, "gemma3_text": {},                 # gemma2: no sdpa, eager
    "olmo2": {}, "cohere": {}, "stablelm": {}, "starcoder2": {},
    "phi3": {},                                                   # fused qkv_proj + o_proj
    "phi": {},                                                    # q/k/v_proj + dense
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},            # out_proj; learned positions
    "gptj": {"rotary_dim": 4},                                    # attn.out_proj
    "gpt2": {},                                                   # Conv1D c_attn, c_proj (also in the MLP)
    "gpt_bigcode": {},
    "gpt_neox": {},                                               # query_key_value + dense
    "falcon": {"new_decoder_architecture": False},
    "bloom": {},                                                  # ALiBi: no position_ids, no sdpa
    "deepseek_v3": {**MOE, "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16,   # MLA projections
                    "num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "n_group": 1, "topk_group": 1},
    "mixtral": MOE, "qwen2_moe": MOE, "qwen3_moe": MOE,           # fused experts
    # Past the attention-only families: what carries a state across positions, MoE blocks with
    # shared experts, dense layers or routers beside the experts, and experts peft cannot wrap.
    "jamba": {**MOE, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,   # attention + Mamba
              "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 4},
    "lfm2": {"layer_types": ["conv", "full_attention"], "conv_L_cache": 3, "block_dim": 32,      # short convolutions
             "block_ff_dim": 64},
    "falcon_h1": {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,   # attention || Mamba2
                  "mamba_n_groups": 1, "mamba_chunk_size": 16, "head_dim": 8},
    "qwen3_next": {**MOE, "layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                   "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,  # linear attention
                   "linear_conv_kernel_dim": 4, "head_dim": 8, "decoder_sparse_step": 1},        # + shared expert
    "mamba2": {"num_heads": 4, "head_dim": 16, "state_size": 8, "n_groups": 1, "expand": 2,     # pure state-space
               "chunk_size": 16, "conv_kernel": 4},
    "recurrent_gemma": {"lru_width": 32, "attention_window_size": 16, "block_types": ["recurrent", "attention"],
                        "head_dim": 8},                                                          # temporal_block.q/k/v/o
    "glm4_moe": {**MOE, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
                 "head_dim": 8},                                                                 # dense MLP + shared experts
    "deepseek_v2": {**MOE, "first_k_dense_replace": 1, "n_shared_experts": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
                    "num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "n_group": 1, "topk_group": 1},
    "llama4_text": {**MOE, "intermediate_size_mlp": 64, "head_dim": 8, "interleave_moe_layer_step": 1},   # Linear router
    "olmoe": MOE,
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,                     # 2-D experts, Wqkv
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}},
}
# Families whose layers carry a state across positions: packing is refused (fullscale.packing).
STATEFUL = {"jamba", "lfm2", "falcon_h1", "qwen3_next", "mamba2", "recurrent_gemma"}


def make_arch(model_type: str, tokenizer=None, *, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny import make_tokenizer

    tokenizer = tokenizer or make_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **{**COMMON, **ARCHITECTURES[model_type]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_arch(model_type: str, path, *, seed: int = 0):
    """A tiny `model_type` model + tokenizer saved with save_pretrained, as a user's model directory."""
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    make_arch(model_type, tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
