"""What every diffusion model shares: the one sampling loop (:mod:`.sampling`), the conditioned
UNet (:mod:`.unet`) and the training objective (:mod:`.objective`)."""
