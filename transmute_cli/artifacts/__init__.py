"""What a run writes and reads back.

- ``patch``: a ``ThoughtPatch``'s safetensors file, the compatibility check, ``combine``
- ``merge``: a patch folded into the weights (the vector by least squares where there is no bias)
- ``checkpoint``: the patched checkpoint or PEFT adapter, written and verified
- ``lora``: a patch as LoRA pairs
- ``gguf_export``, ``llamacpp``: GGUF outputs, checked in llama.cpp itself
- ``diff``, ``diffstats``: two patches or checkpoints compared layer by layer
- ``outputs``: atomic writes (no half-written output, no lost file)
"""
