"""Training: the one loop every effdl trainer runs (``loop``), its checkpoint format (``checkpoint``), the seeded
batch order that makes resume exact (``batches``), and the language-model trainer on the embedded corpus (``lm``).

``effdl.core`` is the model side and imports nothing from here; serving and inference do not either.
"""
