"""The one sampling engine (ddpm_hf.sampling.ReverseProcess / generate_images): its per-step observation API, the
host syncs its loop leaves (counted on the CPU), and compiling with a fallback to eager."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import MICRO_UNET
from diffusers import DDPMScheduler, UNet2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_hf import sampling
from ddpm_hf.distributed import item_generators
from ddpm_hf.sampling import SAMPLERS, ReverseProcess, Sampler, compile_for_sampling, gather_images, generate_images, make_sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_unet(**options) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{**MICRO_UNET, **options}, sample_size=8).eval()


# ---- observing every step ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_on_step_sees_every_network_evaluation_with_x_t_and_the_predicted_x0(name):
    unet = micro_unet()
    trained = DDPMScheduler(num_train_timesteps=50, clip_sample=False)
    sampler = make_sampler(trained, name, 4)
    seen = []
    images = gather_images(unet, sampler, 3, seed=2, batch_size=2, on_step=seen.append)

    assert [(s.step, s.num_steps, list(s.indices)) for s in seen] == [(k, sampler.nfe, [0, 1]) for k in range(sampler.nfe)] + [
        (k, sampler.nfe, [2]) for k in range(sampler.nfe)
    ]
    assert [s.t for s in seen[: sampler.nfe]] == [float(t) for t in sampler.scheduler.timesteps]
    first, last = seen[0], seen[sampler.nfe - 1]
    x_T = torch.cat([torch.randn((1, 3, 8, 8), generator=g) for g in item_generators(2, range(2))])
    scheduler = sampler.scheduler
    scheduler.set_timesteps(sampler.steps)
    torch.testing.assert_close(first.x_t, scheduler.scale_model_input(x_T * scheduler.init_noise_sigma, scheduler.timesteps[0]))
    # x0_hat of the first step is the network's (Ho et al. Eq. 15), whether or not the scheduler returns one
    abar = float(trained.alphas_cumprod[int(first.t)])
    with torch.no_grad():
        eps = unet(first.x_t, torch.tensor(first.t)).sample
    torch.testing.assert_close(first.pred_x0, (first.x_t - (1 - abar) ** 0.5 * eps) / abar**0.5, rtol=1e-4, atol=1e-4)
    if name != "deis":  # every other sampler ends at sigma = 0, where the output is the last step's x0_hat (DEIS: at t = 0)
        assert torch.equal(((last.pred_x0 / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8), images[:2])


def test_pred_x0_costs_nothing_unless_read(monkeypatch):
    """dpmsolver's step returns no x_0: it is computed only when a step's pred_x0 is read."""
    calls = []
    real = sampling.network_x0
    monkeypatch.setattr(sampling, "network_x0", lambda *args: calls.append(1) or real(*args))
    sampler = make_sampler(DDPMScheduler(num_train_timesteps=50), "dpmsolver", 3)
    steps = []
    list(generate_images(micro_unet(), sampler, 2, on_step=steps.append))
    assert calls == [] and len(steps) == 3
    steps[1].pred_x0, steps[1].pred_x0
    assert calls == [1]


def test_the_reverse_process_is_an_iterator_of_steps_then_the_images():
    """The demo's way in: one batch, step by step, then the very images `sample` makes."""
    unet, sampler = micro_unet(num_class_embeds=3), make_sampler(DDPMScheduler(num_train_timesteps=50), "ddpm", 3)
    process = ReverseProcess(unet, sampler, seed=5, indices=range(3), class_labels=[1, 1, 0], guidance_scale=2.0)
    with pytest.raises(RuntimeError, match="iterate"):
        process.images()
    assert [state.step for state in process] == [0, 1, 2]
    expected = gather_images(unet, sampler, 3, seed=5, batch_size=2, class_labels=[1, 1, 0], guidance_scale=2.0)
    assert torch.equal(process.images(), expected)
    assert torch.is_grad_enabled()  # the process turned gradients off only while it ran


# ---- host syncs --------------------------------------------------------------------------------------


class HostWaits(TorchDispatchMode):
    """What would make the host wait for a GPU, seen on the CPU with the "meta" device standing in for it: reading a
    device value on the host (`.item()`, `bool()`, `nonzero`) fails at once; copies are counted. PyTorch makes a
    copy from pageable host memory to the device, and any copy back, wait for the device (non_blocking=False)."""

    def __init__(self):
        super().__init__()
        self.to_device, self.to_host = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        on_device = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
        if on_device and name in ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.item"):
            raise AssertionError(f"the host reads a device value ({name}): a sync on a GPU")
        if name == "aten._to_copy":
            source, target = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
            if source == "cpu" and target == "meta":
                self.to_device.append(tuple(args[0].shape))
            elif source == "meta" and target == "cpu":  # the images at the end of a batch: stand-ins of their shape
                self.to_host.append(tuple(args[0].shape))
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


class StandIn(torch.nn.Module):
    """A network of a few ops for the counts below (the real UNet's hundreds of ops, seen one by one, take seconds)."""

    def __init__(self, classes: int | None):
        super().__init__()
        self.config = SimpleNamespace(sample_size=8, in_channels=3, num_class_embeds=None if classes is None else classes + 1)
        self.mix = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, t, class_labels=None):
        out = self.mix(x) * (t.float() / 50)
        if class_labels is not None:
            out = out + class_labels.float().view(-1, 1, 1, 1)
        return SimpleNamespace(sample=out)


def count_host_waits(unet, name: str, **options) -> tuple[HostWaits, Sampler]:
    sampler, unet = make_sampler(DDPMScheduler(num_train_timesteps=50), name, 3), unet.to("meta")
    with HostWaits() as waits:
        batches = [indices for indices, _ in generate_images(unet, sampler, 3, batch_size=2, **options)]
    assert batches == [range(0, 2), range(2, 3)]
    return waits, sampler


def expected_copies_in(sampler: Sampler, conditional: bool) -> int:
    """Per batch: the timesteps, x_T (and the labels) in, then the noise of each ancestral step with t > 0."""
    return 2 + conditional + (sum(int(t) > 0 for t in sampler.scheduler.timesteps) if sampler.stochastic else 0)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "guided"])
def test_the_loop_never_waits_for_the_device_but_for_each_batchs_inputs_output_and_ddpm_noise(name, conditional):
    """Issue 20: with the timesteps on the device, every diffusers step read them back on the host (DDPMScheduler
    several times per step, before it drew its noise), so the device idled while the host drew each image's noise.
    Now a batch copies its timesteps, x_T (and labels) in and its images out, and the only copy inside the loop is
    the noise DDPMScheduler draws from the images' CPU generators (after the network call is queued), besides what
    diffusers' UniPCMultistepScheduler copies itself: its few coefficients (torch.tensor(..., device=...)) each step."""
    options = {"class_labels": [0, 1, 2], "guidance_scale": 2.0} if conditional else {}
    waits, sampler = count_host_waits(StandIn(3 if conditional else None), name, **options)
    images = [shape for shape in waits.to_device if len(shape) == 4]  # x_T and DDPM's noise
    small = [shape for shape in waits.to_device if len(shape) < 4]  # timesteps, labels, and UniPC's few coefficients
    assert len(images) + len(small) == 2 * expected_copies_in(sampler, conditional) + (2 * 4 * sampler.nfe if name == "unipc" else 0), waits.to_device
    assert len(images) == 2 * (expected_copies_in(sampler, conditional) - 1 - conditional)
    assert all(shape == (sampler.nfe,) or math.prod(shape) <= 3 for shape in small), small
    assert waits.to_host == [(2, 3, 8, 8), (1, 3, 8, 8)]


def test_the_unet_itself_adds_no_host_wait():
    waits, sampler = count_host_waits(micro_unet(num_class_embeds=4), "ddpm", class_labels=[0, 1, 2], guidance_scale=2.0)
    assert len(waits.to_device) == 2 * expected_copies_in(sampler, True) and len(waits.to_host) == 2


# ---- compiling ----------------------------------------------------------------------------------------


NO_TRITON = "Cannot find a working triton installation."  # what inductor raises on a GPU machine without Triton


def failing_backend(error: BaseException):
    def backend(graph_module, example_inputs):
        raise error

    return backend


def test_compile_for_sampling_falls_back_to_eager_when_compiling_fails():
    """A machine without Triton (or a C++ compiler): the backend fails at the first call; sampling goes on eagerly,
    with one warning, and makes the eager images. (A stand-in network: Dynamo takes seconds to trace a UNet.)"""
    network, sampler = StandIn(None), make_sampler(DDPMScheduler(num_train_timesteps=50), "ddim", 2)
    compiled = compile_for_sampling(network, backend=failing_backend(RuntimeError(NO_TRITON)))
    assert compiled.config is network.config and list(compiled.parameters()) == list(network.parameters())
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*working triton.*without compiling") as caught:
        images = gather_images(compiled, sampler, 2, seed=1, batch_size=2)
    assert len(caught) == 1
    assert torch.equal(images, gather_images(network, sampler, 2, seed=1, batch_size=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on: no second attempt, no second warning
        gather_images(compiled, sampler, 2, seed=1, batch_size=2)


def test_compile_for_sampling_raises_out_of_memory_and_model_errors_as_themselves():
    network, x, t = StandIn(None), torch.zeros(1, 3, 8, 8), torch.tensor(1)
    out_of_memory = compile_for_sampling(network, backend=failing_backend(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            out_of_memory(x, t)
        with pytest.raises(RuntimeError, match="channels") as error:  # a wrong input is the model's error, not a compile failure
            compile_for_sampling(network, backend="eager")(torch.zeros(1, 5, 8, 8), t)
    assert "torch.compile failed" not in str(error.value)


def test_sample_compile_falls_back_when_compiling_fails(tmp_path, monkeypatch):
    """`ddpm-hf sample --compile` where torch.compile itself refuses (e.g. a Python it does not support yet): a
    warning, then the eager images."""
    from diffusers import DDPMPipeline
    from PIL import Image

    from ddpm_hf.cli import main

    def unsupported(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    DDPMPipeline(unet=micro_unet(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "model")
    arguments = ["sample", "--model", str(tmp_path / "model"), "--scheduler", "ddim", "--steps", "2", "--num_images", "2", "--device", "cpu"]
    main([*arguments, "--out", str(tmp_path / "eager.png")])
    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*not supported"):
        main([*arguments, "--compile", "--out", str(tmp_path / "compiled.png")])
    assert Image.open(tmp_path / "compiled.png").tobytes() == Image.open(tmp_path / "eager.png").tobytes()
