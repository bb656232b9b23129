"""Tiny Hugging Face models built from configs (no download), for the README's examples and the tests.

Each stands for a ``from_pretrained(...)`` call: the same classes, a few thousand parameters.
Needs ``transformers``.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_chameleon", "tiny_emu3", "tiny_emu3_vocab", "tiny_janus", "tiny_llama"]


def tiny_llama(seed: int = 0, vocab_size: int = 64):
    """A 2-layer ``LlamaForCausalLM`` (hidden 32), weights from ``torch.manual_seed(seed)``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def tiny_chameleon(seed: int = 0):
    """A 2-layer ``ChameleonForConditionalGeneration`` (Chameleon / Anole's class), hidden 32.

    Ids: ``<s>`` 1, 16 image codes 4..19, ``<image>`` 20, ``<racm3:break>`` 21 (the begin-of-image
    marker, ``model.config.vocabulary_map["<racm3:break>"]``), ``<eoss>`` 22, text 23..42.
    """
    import transformers

    torch.manual_seed(seed)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i in range(16):  # Chameleon names image codes IMGIMG<digits as letters A-J>Z
        vocab["IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(i)) + "Z"] = 4 + i
    for name in ("<image>", "<racm3:break>", "<eoss>", *(f"t{i}" for i in range(20))):
        vocab[name] = len(vocab)
    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=32, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, vocabulary_map=vocab, vq_config=vq,
                                       pad_token_id=3)
    return transformers.ChameleonForConditionalGeneration(cfg)


def tiny_emu3_vocab() -> dict:
    """The vocabulary of ``tiny_emu3`` (ids listed there)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "<|image start|>": 5, "<|image token|>": 6,
             "<|image end|>": 7, "<|extra_200|>": 8, "<|extra_201|>": 9, "*": 10}
    for name in (*(str(d) for d in range(10)), *(f"<|visual token{i:06d}|>" for i in range(16)),
                 *(f"t{i}" for i in range(10))):
        vocab[name] = len(vocab)
    return vocab


def tiny_emu3(seed: int = 0):
    """A 2-layer ``Emu3ForConditionalGeneration``, hidden 32; ``model.config.vocabulary_map`` names the ids.

    Ids: ``<s>`` 1, ``<|image start|>`` 5, ``<|image token|>`` 6, ``<|image end|>`` 7, the end-of-line
    ``<|extra_200|>`` 8, ``*`` 10, digits ``"0"``..``"9"`` 11..20, 16 visual tokens
    ``<|visual token000000|>``.. 21..36, text ``t0``..``t9`` 37..46.
    """
    import transformers

    vocab = tiny_emu3_vocab()
    vq = dict(embed_dim=4, num_embeddings=16, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, attn_resolutions=[], out_channels=3, in_channels=3, temporal_downsample_factor=4)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=3,
                bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.Emu3ForConditionalGeneration(
        transformers.Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vocab))


def tiny_janus(seed: int = 0):
    """A 2-layer ``JanusForConditionalGeneration`` (text hidden 32, vocabulary 64), generating 2x3-token
    images from a 20-code VQ; ``<image>`` is 63 and ids 1 / 0 are bos / pad."""
    import transformers

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16,
                  projection_dim=32, num_image_tokens=6, depth=1)
    vq = dict(embed_dim=4, num_embeddings=20, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, num_patches=2, projection_dim=32, image_token_embed_dim=32, num_hidden_layers=1)
    torch.manual_seed(seed)
    return transformers.JanusForConditionalGeneration(
        transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=63))
