"""What TED adds to Megatron's GPT: the MoE layer (router with its gate, dispatcher with DTD,
experts) and communication-aware checkpointing, on top of megatron.model and the parallel base
(megatron.parallel: topology, groups, accounted collectives). Nothing happens at import time:
a GPT-MoE is built by one explicit call, `ted_patches.build.build_model`."""
