"""What TED patches into the GPT: the MoE layer (router, dispatcher with DTD, experts) and
communication-aware checkpointing, on top of megatron.model and the parallel base
(megatron.parallel: topology, groups, accounted collectives). Nothing happens at import time:
the model is changed by one explicit call, `ted_patches.patch.apply_patches`."""
