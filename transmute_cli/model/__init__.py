"""The model: where it comes from and how it is loaded.

- ``sources``: the embedded aliases, local folders, .gguf files converted once into the cache, hub ids
- ``loading``: device, dtype and device maps; ``Loaded`` and ``load_model``; the weights' fingerprint
- ``families``: the per-family table of module names, and where a patch hooks in
- ``tokens``: token ids for the two passes, micro-batches
"""
