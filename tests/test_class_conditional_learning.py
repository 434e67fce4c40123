"""Learning, class-conditional: a tiny model trained with --class_conditional on three generated shapes makes, for
each class it is asked for, that class's shape, and the class names travel with the saved pipeline.

A model that ignored its label could only draw a shape at random (one in three per class): the check below asks
for nearly all samples of every class, which it cannot pass. The images come from an image folder with one
sub-folder per class, so the labels are a ClassLabel column whose names are the folder names.
"""

import numpy as np
import pytest
import torch
from PIL import Image

R = 8  # 8x8 shapes: enough to tell three apart, cheap enough for a CPU test
CLASSES = ("bar", "disc", "split")  # the folder names, in the order datasets assigns ids (sorted)


def _prototypes():
    yy, xx = np.mgrid[0:R, 0:R]
    bar = np.where(yy < R // 2, 230, 25)  # top half bright
    disc = np.where((yy - (R - 1) / 2) ** 2 + (xx - (R - 1) / 2) ** 2 < R * R / 12.8, 230, 25)
    split = np.where(xx < R // 2, 230, 25)  # left half bright
    return np.stack([bar, disc, split]).astype(np.uint8)


def _standardise(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def _nearest_class(images, prototypes):
    """For each sample (N x R x R x 3 in [0, 1]), the class whose shape it correlates with most (grey levels)."""
    return (_standardise(images.mean(-1)) @ _standardise(prototypes).T).argmax(1)


@pytest.mark.slow
def test_samples_of_each_class_show_that_class(tmp_path, micro_unet_config, train_in_process):
    from diffusers import DiffusionPipeline

    prototypes = _prototypes()
    rng = np.random.default_rng(0)
    for name, prototype in zip(CLASSES, prototypes):
        folder = tmp_path / "shapes" / "train" / name
        folder.mkdir(parents=True)
        for copy in range(6):  # a little noise, so that each class is a distribution, not one image
            noisy = np.clip(prototype.astype(np.int16) + rng.integers(-12, 13, prototype.shape), 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([noisy] * 3, -1)).save(folder / f"{copy}.png")

    output = tmp_path / "run"
    train_in_process(
        preset="quickstart",
        dataset=str(tmp_path / "shapes"),
        class_conditional=True,
        output_dir=str(output),
        resolution=R,
        model_config=micro_unet_config,
        random_flip=False,  # a flip would turn one class into another
        train_batch_size=18,
        learning_rate=4e-3,
        lr_warmup_steps=20,
        max_train_steps=500,
        ema_warmup=True,
        ema_decay=0.995,
        sample_every=0,
        checkpoint_every=0,
        logging_steps=100,
    )

    pipeline = DiffusionPipeline.from_pretrained(str(output), custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.class_names == list(CLASSES)
    per_class = 6
    images = pipeline(
        class_labels=list(CLASSES), num_images_per_label=per_class, num_inference_steps=250, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    found = _nearest_class(images, prototypes).reshape(len(CLASSES), per_class)
    hits = (found == np.arange(len(CLASSES))[:, None]).sum(1)
    assert (hits >= per_class - 1).all(), f"samples per asked class that show it: {dict(zip(CLASSES, hits.tolist()))} of {per_class}; classes found:\n{found}"
