"""Instance-level reconstruction: per-image layer corrections on top of an encoder's latent.

* :mod:`.losses` — the per-image objective (pixel L1, VGG relu4_2 L1, delta penalty);
* :mod:`.deltas` — the ``stage=reconstruct`` LightningModule (:class:`~.deltas.Reconstructor`);
* :mod:`.stage` — building it from config (variants a-f: where to start, what to optimise);
* :mod:`.targets`, :mod:`.init` — the target images and the starting latents;
* :mod:`.direct_encoder` — ablations b/c: an image -> latent encoder trained end to end;
* :mod:`.report` — missing classes, IoU, correlations and figures.
"""
