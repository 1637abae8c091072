"""The denoising networks: a diffusers ``UNet2DModel`` with our own conditioning around it.

One class serves every stage. Conditions enter in two ways:

* **embeddings** added to the timestep embedding: the depth class (with a learned *null* class
  for classifier-free guidance, index ``num_classes``) and, for super-resolution stages, the level
  of noise added to the low-res conditioning image (noise conditioning augmentation, as in Imagen
  and DeepFloyd IF);
* **channels** concatenated to the noisy input: the bilinearly upsampled low-res image
  (super-resolution) and, for volume models, the **previous plane** of the same volume
  (``prev_channels``). Whether a previous plane is given at all is a learned embedding
  (``has_prev``: 0 = none, i.e. the top plane or the dropped condition, with a zero image; 1 = given),
  so continuity can be dropped in training and guided separately from depth in sampling.

The class is a diffusers ``ModelMixin``/``ConfigMixin``, so ``save_pretrained`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``from_pretrained`` never unpickles.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# Sizes a user can pick for training. ``tiny`` is for tests; ``small`` is what a CPU can train;
# ``base`` is meant for a GPU.
SIZES: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention=(False, True)),
    "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
                  attention=(False, False, True, True)),
    # a third of small's parameters (1.6 M for an 8-channel latent): the bundled EM latent model
    "compact": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16,
                    attention=(False, False, True, True)),
    "base": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32,
                 attention=(False, False, True, True)),
}


class ZfUNet(ModelMixin, ConfigMixin):
    """UNet2DModel with depth-class, noise-level and channel conditioning."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        cond_channels: int = 0,
        out_channels: int = 1,
        num_classes: int = 0,
        noise_conditioning: bool = False,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
        attention: tuple[bool, ...] = (False, False, True, True),
        mid_attention: bool = True,
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        prev_channels: int = 0,
    ):
        super().__init__()
        if len(attention) != len(block_out_channels):
            raise ValueError("attention needs one flag per resolution level")
        emb_dim = block_out_channels[0] * 4
        conditioned = num_classes > 0 or noise_conditioning or prev_channels > 0
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels + cond_channels + prev_channels,
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            add_attention=mid_attention,
            dropout=dropout,
            class_embed_type="identity" if conditioned else None,
        )
        # One extra row: the learned null class used when the depth condition is dropped.
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        if noise_conditioning:
            self.noise_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
            self.noise_embedding = TimestepEmbedding(block_out_channels[0], emb_dim)
        else:
            self.noise_proj = self.noise_embedding = None
        # 0 = no previous plane, 1 = a previous plane is given. Zero at start, so a model warm-started
        # from a slice model (see add_prev_channel) predicts exactly what its parent did.
        self.prev_embedding = nn.Embedding(2, emb_dim) if prev_channels > 0 else None
        if self.prev_embedding is not None:
            nn.init.zeros_(self.prev_embedding.weight)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        prev: torch.Tensor | None = None,
        has_prev: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model's target (epsilon or v) for ``sample`` at ``timestep``.

        ``class_labels``: (B,) long, depth class or ``null_class``. ``cond``: (B, cond_channels, H, W).
        ``noise_level``: (B,) float in [0, 1], the augmentation level of ``cond``.
        ``prev``: (B, prev_channels, H, W), the previous plane (zeros where there is none) and
        ``has_prev``: (B,) long, 1 where a previous plane is given; both default to "none".
        """
        cfg = self.config
        if cfg.cond_channels:
            if cond is None or cond.shape[1] != cfg.cond_channels:
                raise ValueError(f"this model needs {cfg.cond_channels} conditioning channel(s)")
            sample = torch.cat([sample, cond.to(sample.dtype)], dim=1)
        if cfg.prev_channels:
            b = sample.shape[0]
            if prev is None:
                prev = sample.new_zeros((b, cfg.prev_channels, *sample.shape[2:]))
                has_prev = torch.zeros(b, dtype=torch.long, device=sample.device)
            elif has_prev is None:
                has_prev = torch.ones(b, dtype=torch.long, device=sample.device)
            sample = torch.cat([sample, prev.to(sample.dtype)], dim=1)
        elif prev is not None:
            raise ValueError("this model does not take a previous plane (it was not trained for volumes)")
        emb = None
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this model is depth-conditioned: pass class_labels")
            emb = self.class_embedding(class_labels)
        if self.noise_embedding is not None:
            if noise_level is None:
                raise ValueError("this model is noise-conditioned: pass noise_level")
            proj = self.noise_proj(noise_level.float() * 1000.0).to(self.noise_embedding.linear_1.weight.dtype)
            nemb = self.noise_embedding(proj)
            emb = nemb if emb is None else emb + nemb
        if self.prev_embedding is not None:
            pemb = self.prev_embedding(has_prev.long())
            emb = pemb if emb is None else emb + pemb
        if emb is not None:
            emb = emb.to(sample.dtype)
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=sample.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(sample.shape[0])
        return self.unet(sample, t, class_labels=emb).sample


def add_prev_channel(model: ZfUNet) -> ZfUNet:
    """A copy of a slice model that also takes the previous plane, predicting exactly what ``model`` does.

    The new input channel's weights and the ``has_prev`` embedding start at zero, so fine-tuning on
    consecutive planes (``train cascade --continuity --init-from``) starts from the parent model
    instead of from scratch.
    """
    if model.config.prev_channels:
        return model
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}  # drop diffusers bookkeeping
    new = ZfUNet.from_config({**config, "prev_channels": 1})
    state = model.state_dict()
    w = state["unet.conv_in.weight"]
    state["unet.conv_in.weight"] = torch.cat([w, w.new_zeros((w.shape[0], 1, *w.shape[2:]))], dim=1)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"prev_embedding.weight"}:
        raise ValueError(f"cannot extend this model: missing {missing}, unexpected {unexpected}")
    return new.to(w.device)


def build_model(kind: str, size: str = "small", *, resolution: int, num_classes: int,
                extra_cond_channels: int = 0, channels: int = 1, prev_channels: int = 0) -> ZfUNet:
    """A fresh model for one cascade stage.

    ``kind`` is ``base`` (depth-conditioned, attention at low resolutions), ``sr`` (takes the
    upsampled low-res image as a channel and its noise level; fully convolutional so it trains on
    crops and runs on the full image) or ``latent`` (``channels`` in and out: an autoencoder's
    latent space, attention at low resolutions).
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}': choose one of {', '.join(SIZES)}")
    s = dict(SIZES[size])
    attention = s.pop("attention")
    if kind in ("base", "latent"):
        return ZfUNet(sample_size=resolution, in_channels=channels, out_channels=channels,
                      cond_channels=extra_cond_channels, num_classes=num_classes,
                      attention=attention, mid_attention=True, prev_channels=prev_channels, **s)
    if kind == "sr":
        return ZfUNet(sample_size=resolution, cond_channels=1 + extra_cond_channels, num_classes=num_classes,
                      noise_conditioning=True, prev_channels=prev_channels, attention=tuple(False for _ in attention), mid_attention=False, **s)
    raise ValueError(f"unknown stage kind '{kind}'")
