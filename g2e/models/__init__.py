"""Qwen2-VL in Flax NNX: the vision tower, the text decoder, LoRA/DoRA adapters, sharding rules
and Hugging Face checkpoints in and out. Nothing here depends on the rest of g2e.

One einsum alphabet for the whole package. Every shape in a docstring or comment, every einsum
string and every logical axis name (the names `sharding.DEFAULT_RULES` maps onto the mesh)
uses it:

  letter  logical axis                     what it counts
  B       batch                            examples in a batch
  L       length                           text positions
  D       embed (activations: act_embed)   text model width
  V       vocab                            vocabulary
  H       heads / vision_heads             query heads (decoder / vision tower)
  K       kv_heads                         key/value heads of the decoder
  E       head_dim                         width of one head
  F       mlp / vision_mlp                 MLP width (decoder / tower and merger)
  N       layers                           stacked layers of the decoder or the tower
  R       lora_rank                        rank of a LoRA/DoRA update
  P       patches                          vision patches of one example (padded)
  W       vision_embed (act_vision_embed)  vision tower width
  C       -                                values of one flattened patch (3*2*14*14 = 1176)
  M       -                                merged vision tokens, P // 4
  S       -                                the three of query, key and value
  Q       -                                positions picked per example (`logits_at`)
"""
