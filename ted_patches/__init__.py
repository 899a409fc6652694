"""Everything TED adds to the GPT: topology and groups, collectives with byte accounting, the MoE
layer (router, dispatcher, experts) and the optimizations. Nothing happens at import time: the
model is changed by one explicit call, `ted_patches.patch.apply_patches`."""
