"""Learning: a tiny model trained briefly on two prototype images generates both prototypes.

Exact colours take far longer to learn than a CPU test can afford, so samples are judged by structure
(correlation of standardised grey images with each prototype) and mode coverage (both appear).
The same check applied to the untrained model must fail, or the test would prove nothing.
"""

import numpy as np
import pytest
import torch
from PIL import Image

R = 8  # prototypes are 8x8: enough for two shapes, cheap enough for a CPU test


def _prototypes():
    yy, xx = np.mgrid[0:R, 0:R]
    split = np.where(xx < R // 2, 230, 25)  # left half bright
    disc = np.where((yy - (R - 1) / 2) ** 2 + (xx - (R - 1) / 2) ** 2 < R * R / 12.8, 230, 25)  # a bright disc
    return np.stack([split, disc]).astype(np.uint8)


def _standardise(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def _match(images, prototypes):
    """Correlation of each sample (grey) with each prototype: samples x 2."""
    return _standardise(images.mean(-1)) @ _standardise(prototypes).T


def _samples(pipeline_dir, num_images=16, steps=250):
    """The paper's ancestral sampler on every 4th of the 1000 timesteps (the strided chain's own posterior steps), from
    the saved pipeline with stock diffusers: a quarter of the cost of all 1000, and the same check."""
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(str(pipeline_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=num_images, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
def test_tiny_model_learns_both_prototypes(tmp_path, micro_unet_config, train_in_process):
    prototypes = _prototypes()
    data = tmp_path / "prototypes"
    data.mkdir()
    for index, prototype in enumerate(prototypes):
        for copy in range(4):
            Image.fromarray(np.stack([prototype] * 3, -1)).save(data / f"{index}_{copy}.png")
    common = dict(
        preset="quickstart",
        dataset=str(data),
        resolution=R,
        model_config=micro_unet_config,
        random_flip=False,
        train_batch_size=16,
        learning_rate=4e-3,
        lr_warmup_steps=20,
        ema_warmup=True,
        ema_decay=0.995,
        sample_every=0,
        checkpoint_every=0,
        logging_steps=100,
    )
    train_in_process(
        output_dir=str(tmp_path / "untrained"), max_train_steps=1, learning_rate=1e-12, **{k: v for k, v in common.items() if k != "learning_rate"}
    )
    untrained = _match(_samples(tmp_path / "untrained"), prototypes)

    train_in_process(output_dir=str(tmp_path / "trained"), max_train_steps=400, **common)
    trained = _match(_samples(tmp_path / "trained"), prototypes)

    def learned(correlations):
        best = correlations.max(1)
        modes = np.bincount(correlations.argmax(1), minlength=2)
        return best.min() > 0.6 and modes.min() >= 3, f"best correlations {np.round(best, 2)}, samples per prototype {modes}"

    ok, detail = learned(trained)
    assert ok, detail
    ok, detail = learned(untrained)
    assert not ok, "the check passes for an untrained model: " + detail
