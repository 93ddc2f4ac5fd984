"""The per-image δ-optimisation's pieces below the stage: the objective (:mod:`.losses`) and where
each image starts (:mod:`.init`). The LightningModule is :mod:`seeing.stages.reconstruct`, built
for an ablation variant by :mod:`seeing.stages.variants`."""
