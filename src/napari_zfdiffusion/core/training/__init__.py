"""What every training command shares: the one training loop (:mod:`.loop`: EMA, DDP under torchrun,
atomic checkpoints, exact resume) and random crops of 2D images and masks (:mod:`.patches`)."""
