"""Evaluation of the models: the numbers and figures in docs/, one module per model family.

Each module is a command with an explicit output folder ``--out DIR``: results go to
``DIR/results/`` and figures to ``DIR/images/``, so ``--out docs`` remakes the documentation's own.
The figures need matplotlib (``pip install 'napari-zfdiffusion[eval]'``). Run any of them with
``--help`` for the options; every default is the setting behind the published numbers.

* :mod:`.cascade`  depth cascade: depth-classifier accuracy, memorisation, samples through the stages
  ``python -m napari_zfdiffusion.evaluation.cascade --model zf-cascade-demo --threads 2 --out docs``
* :mod:`.volume`  volume generation: plane-to-plane agreement of generated volumes vs real stacks
  ``python -m napari_zfdiffusion.evaluation.volume --model runs/zf-volume-v --threads 1 --out docs``
* :mod:`.em`  latent diffusion patch models (EM, nuclei + masks): reconstruction, memorisation, statistics
  ``python -m napari_zfdiffusion.evaluation.em --model em-ldm-demo --threads 2 --out docs``
* :mod:`.seg`  segmentation U-Nets against a classical baseline, and the generated-to-real experiment
  ``python -m napari_zfdiffusion.evaluation.seg --run runs/seg --threads 2 --out docs``
* :mod:`.sampler_failure`  how often a sampler leaves a bright, noisy plane
  ``python -m napari_zfdiffusion.evaluation.sampler_failure --model zf-cascade-demo --threads 1 --out docs``
* :mod:`.cards`  MODEL_CARD.md of a model folder from these results (cascade, patch or seg)
  ``python -m napari_zfdiffusion.evaluation.cards cascade|patch|seg MODEL_DIR [--name N] ...``

The modules use only :mod:`napari_zfdiffusion.core` (no napari, no Qt); shared helpers live in
:mod:`._common`, and the metrics themselves (SSIM, nearest neighbours, ...) in :mod:`..core.metrics`.
"""
