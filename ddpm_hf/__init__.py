"""ddpm-hf: train Denoising Diffusion Probabilistic Models (Ho et al. 2020) with diffusers and Accelerate.

Where things happen:
    config.py     every hyper-parameter (a dataclass), presets, YAML/CLI parsing
    data.py       datasets -> decoded uint8 tensor -> batches in [-1, 1] on the training device
    models.py     the UNet architectures and the DDPMScheduler
    losses.py     the forward process q(x_t | x_0) and the training objective
    training.py   the Accelerate loop: where the model learns, is checkpointed and saved
    sampling.py   `ddpm-hf sample`: images from a saved pipeline
"""

__version__ = "0.1.0"
