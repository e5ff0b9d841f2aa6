"""Learned codecs' shared parts: the fixed data split, shipped model bundles, training helpers.

The models themselves live beside them (``predictive`` for ``learned``, ``gan`` for ``gan``);
the codecs in :mod:`archive.codecs` only load a bundle and run it. Torch is needed for
training and for the GAN's decoder; ``learned`` runs on numpy alone.
"""
