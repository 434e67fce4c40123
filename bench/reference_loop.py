"""The reference the speed targets are measured against: a loop that does, per step, what the diffusers
`train_unconditional.py` example does. Written here from its description, not copied from it.

Per step: a batch from a `torch.utils.data.DataLoader` (0 workers, shuffled) over a `datasets.Dataset`
whose `set_transform` (here `with_transform`, its non-mutating twin) runs per-sample PIL transforms (RGB, resize the short side, center crop, random
horizontal flip, to tensor, normalise to [-1, 1]); noise and timesteps; `DDPMScheduler.add_noise`; the
UNet under Accelerate's autocast; MSE loss; backward; grad-norm clipping to 1; AdamW (PyTorch's default
implementation); the LR scheduler; diffusers' `EMAModel` with foreach=False; `loss.item()` and a
tensorboard log every step; no torch.compile.

The transforms use torchvision when it is importable (as the example does) and otherwise an equivalent
written with PIL and numpy (`--ref_transforms pil`); torchvision cannot be installed beside the torch
build of the development machines. Both do the same per-sample work.

Run as a script it is also the "minimal diffusers-example-like" training script of bench/startup.py:

    python bench/reference_loop.py --dataset builtin:cifar10-1k --model tiny --batch 16 --steps 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SHARED_CIFAR10 = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10")
CARRIED_CIFAR10 = os.path.join(REPO_ROOT, ".whl", "cifar10")  # one shard carried to a GPU machine (bench/README.md)


def default_dataset() -> str:
    """Real CIFAR-10 when this checkout has it beside it (or a carried shard), else the built-in 1k subset."""
    for path in (SHARED_CIFAR10, CARRIED_CIFAR10):
        if os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path)):
            return os.path.normpath(path)
    return "builtin:cifar10-1k"


# ---------------------------------------------------------------------------------------------
# Per-sample transforms
# ---------------------------------------------------------------------------------------------


class PILTransforms:
    """Resize(short side, bilinear) -> CenterCrop -> RandomHorizontalFlip -> ToTensor -> Normalize(0.5, 0.5),
    one image at a time, with PIL and numpy (the flip coin comes from torch's RNG, as torchvision's)."""

    def __init__(self, resolution: int, random_flip: bool = True):
        self.resolution, self.random_flip = resolution, random_flip

    def __call__(self, image):
        import numpy as np
        import torch
        from PIL import Image

        r = self.resolution
        width, height = image.size
        if min(width, height) != r:
            if width <= height:
                size = (r, int(r * height / width))
            else:
                size = (int(r * width / height), r)
            image = image.resize(size, Image.Resampling.BILINEAR)
            width, height = image.size
        if (width, height) != (r, r):
            left, top = int(round((width - r) / 2.0)), int(round((height - r) / 2.0))
            image = image.crop((left, top, left + r, top + r))
        if self.random_flip and torch.rand(1).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.array(image, dtype=np.uint8, copy=True)
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)
        return (tensor - 0.5) / 0.5


def make_transforms(resolution: int, kind: str = "auto", random_flip: bool = True):
    """('torchvision' | 'pil', callable PIL image -> 3 x R x R tensor in [-1, 1])."""
    if kind in ("auto", "torchvision"):
        try:
            from torchvision import transforms

            return "torchvision", transforms.Compose(
                [
                    transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                    transforms.CenterCrop(resolution),
                    transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
                    transforms.ToTensor(),
                    transforms.Normalize([0.5], [0.5]),
                ]
            )
        except ImportError:
            if kind == "torchvision":
                raise
    return "pil", PILTransforms(resolution, random_flip)


def make_dataloader(dataset, resolution: int, batch_size: int, image_column: str | None = None, transforms: str = "auto"):
    """(transforms kind, DataLoader): set_transform with per-sample transforms, 0 workers, shuffled."""
    import torch

    from ddpm_hf.data import find_image_column

    column = find_image_column(dataset, image_column)
    kind, augment = make_transforms(resolution, transforms)

    def transform_images(examples):
        return {"input": [augment(image.convert("RGB")) for image in examples[column]]}

    dataset = dataset.with_transform(transform_images)
    return kind, torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so that another Accelerator can be made in this process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class ReferenceLoop:
    """Model, optimizer, EMA, data and Accelerator of one reference run; `run(steps)` trains and times."""

    def __init__(
        self,
        dataset,
        model: str = "tiny",
        resolution: int = 32,
        batch_size: int = 16,
        precision: str = "no",
        device: str | None = None,
        transforms: str = "auto",
        seed: int = 0,
        logging_dir: str | None = None,
        model_config: str | None = None,
    ):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from ddpm_hf.models import build_unet

        reset_accelerate()
        self._tmp = None
        if logging_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ddpm-ref-")
            logging_dir = self._tmp.name
        self.accelerator = Accelerator(
            mixed_precision=precision,
            log_with="tensorboard",
            cpu=device == "cpu",
            project_config=ProjectConfiguration(project_dir=logging_dir, logging_dir=os.path.join(logging_dir, "logs")),
        )
        set_seed(seed)
        self.model = build_unet(model, resolution, model_config)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.transforms, self.dataloader = make_dataloader(dataset, resolution, batch_size, transforms=transforms)
        self.lr_scheduler = get_scheduler("cosine", optimizer=self.optimizer, num_warmup_steps=500, num_training_steps=100_000)
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.dataloader, self.lr_scheduler
        )
        self.ema = EMAModel(
            self.accelerator.unwrap_model(self.model).parameters(),
            decay=0.9999,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=3 / 4,
            model_cls=UNet2DModel,
            model_config=self.accelerator.unwrap_model(self.model).config,
            foreach=False,
        )
        self.ema.to(self.accelerator.device)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
        self.accelerator.init_trackers("reference")
        self.global_step = 0
        self._iterator = iter(self.dataloader)

    def _next_batch(self):
        try:
            return next(self._iterator)
        except StopIteration:  # a new epoch
            self._iterator = iter(self.dataloader)
            return next(self._iterator)

    def step(self) -> int:
        """One optimizer step; returns the number of images it trained on."""
        import torch
        import torch.nn.functional as F

        accelerator, model = self.accelerator, self.model
        model.train()
        clean_images = self._next_batch()["input"].to(self.weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=self.weight_dtype, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device).long()
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if accelerator.sync_gradients:
            self.ema.step(model.parameters())
            self.global_step += 1
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0], "step": self.global_step, "ema_decay": self.ema.cur_decay_value}
        accelerator.log(logs, step=self.global_step)
        return bsz

    def run(self, steps: int) -> tuple[int, float]:
        """(images, seconds) of `steps` steps, timed between device syncs."""
        import torch

        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start, images = time.perf_counter(), time.process_time(), 0
        for _ in range(steps):
            images += self.step()  # loss.item() inside: every step ends with a sync
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        self.last_cpu_seconds = time.process_time() - cpu_start  # this process's CPU time: robust to other load on a shared CPU
        return images, time.perf_counter() - start

    def close(self):
        self.accelerator.end_training()
        if self._tmp is not None:
            self._tmp.cleanup()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="default: ../shared/data/cifar10 if present, else builtin:cifar10-1k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default="tiny", help="ddpm-cifar10 or tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cpu to force the CPU")
    parser.add_argument("--ref_transforms", default="auto", choices=["auto", "torchvision", "pil"])
    args = parser.parse_args(argv)

    from ddpm_hf.data import load_image_dataset

    dataset = load_image_dataset(args.dataset or default_dataset(), args.split)
    loop = ReferenceLoop(dataset, args.model, args.resolution, args.batch, args.precision, args.device, args.ref_transforms)
    images, seconds = loop.run(args.steps)
    loop.close()
    print(f"reference loop: {args.steps} steps, {images / seconds:.1f} img/s ({loop.transforms} transforms)")


if __name__ == "__main__":
    main()
