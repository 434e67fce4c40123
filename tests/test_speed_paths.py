"""The fast paths (issue 5) fall back cleanly where unsupported and give the plain path's results.

Sampling: FastSampler reproduces the stock DDPMPipeline / DDIMPipeline images bit for bit in fp32 for the
same generator; compile falls back with a warning when torch.compile fails and matches when it works;
CUDA graphs are a no-op on CPU; bf16 autocast runs on CPU. Training: bf16 autocast, channels_last and
compile="yes" run on CPU. The CUDA-only tests (no host sync per step, graphs == eager) run where a GPU is.
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET, quick_options

from ddpm_hf.errors import UserError
from ddpm_hf.fast_sampling import FastSampler, _NoiseStream, ddpm_plan, fast_generate

STEPS = 8


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, **MICRO_UNET).eval()


def ddpm_scheduler(**overrides):
    from diffusers import DDPMScheduler

    options = dict(num_train_timesteps=100, variance_type="fixed_large", clip_sample=True, prediction_type="epsilon")
    options.update(overrides)
    return DDPMScheduler(**options)


def stock(pipeline_class, unet, scheduler, batch, seed, **kwargs):
    pipeline = pipeline_class(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    images = pipeline(batch_size=batch, generator=generator, output_type="pt", **kwargs).images
    return images, generator


# ---- sampling: equal to the stock pipelines -------------------------------------------------------


@pytest.mark.parametrize(
    "variance_type, prediction_type, spacing",
    [("fixed_large", "epsilon", "leading"), ("fixed_small", "v_prediction", "trailing"), ("fixed_small_log", "sample", "linspace")],
)
def test_fast_ddpm_reproduces_stock_pipeline_bit_for_bit(unet, variance_type, prediction_type, spacing):
    from diffusers import DDPMPipeline

    scheduler = ddpm_scheduler(variance_type=variance_type, prediction_type=prediction_type, timestep_spacing=spacing)
    expected, stock_generator = stock(DDPMPipeline, unet, scheduler, 3, seed=7, num_inference_steps=STEPS)
    generator = torch.Generator().manual_seed(7)
    images = FastSampler(unet, scheduler, num_inference_steps=STEPS).sample(3, generator=generator)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images, expected)
    # The same noise draws, no more and no fewer: both generators end in the same state.
    assert torch.equal(generator.get_state(), stock_generator.get_state())


def test_full_chain_with_the_projects_scheduler(unet):
    """All T steps with the scheduler a training run saves (linear betas, fixed_large, clipping)."""
    from diffusers import DDPMPipeline

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.models import build_scheduler

    scheduler = build_scheduler(config_from_dict({"output_dir": "unused", "num_train_timesteps": 40, "sample_steps": 10}))
    expected, _ = stock(DDPMPipeline, unet, scheduler, 2, seed=1, num_inference_steps=40)
    images = FastSampler(unet, scheduler).sample(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, expected)
    plan = ddpm_plan(scheduler)
    assert len(plan) == 40 and plan.timesteps.tolist() == list(range(39, -1, -1))
    assert plan.adds_noise == [True] * 39 + [False]  # no noise at t = 0


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_fast_ddim_reproduces_ddim_pipeline(unet, eta):
    from diffusers import DDIMPipeline, DDIMScheduler

    scheduler = ddpm_scheduler()
    ddim = DDIMScheduler.from_config(scheduler.config)
    expected, _ = stock(DDIMPipeline, unet, ddim, 2, seed=3, num_inference_steps=5, eta=eta)
    sampler = FastSampler(unet, ddim, num_inference_steps=5, eta=eta)  # method inferred from the scheduler class
    assert sampler.plan.method == "ddim"
    assert torch.equal(sampler.sample(2, generator=torch.Generator().manual_seed(3)), expected)


def test_batches_give_what_sampling_generate_gives(unet, tmp_path):
    """With batch_size, the images `ddpm-hf sample --batch_size` makes without --fast (one generator for all
    batches); PIL output rounds as diffusers does."""
    from diffusers import DDPMPipeline

    from ddpm_hf.sampling import generate_images, make_sampler, to_pil

    pipeline = DDPMPipeline(unet=unet, scheduler=ddpm_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    sampler = make_sampler(pipeline.scheduler, "ddpm", STEPS)
    expected = [image for batch in generate_images(unet, sampler, 5, seed=11, batch_size=2) for image in to_pil(batch)]
    images = fast_generate(pipeline, 5, STEPS, seed=11, batch_size=2)
    assert len(images) == 5
    for got, want in zip(images, expected):
        assert got.size == want.size and got.mode == want.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_device_generator_none_uses_the_global_rng_like_stock(unet):
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline(unet=unet, scheduler=ddpm_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    expected = pipeline(batch_size=2, num_inference_steps=STEPS, output_type="np").images
    torch.manual_seed(5)
    images = FastSampler(unet, pipeline.scheduler, num_inference_steps=STEPS).sample(2, output_type="np")
    assert images.shape == (2, 8, 8, 3) and np.array_equal(images, expected)


def test_threaded_noise_stream_draws_the_same_sequence():
    """The host-noise thread used for CUDA devices yields exactly the direct draws, in order, and stops cleanly."""
    sizes = [3, 3, 2, 2, 2]
    direct = _NoiseStream(sizes, (1, 4, 4), torch.Generator().manual_seed(2), torch.device("cpu"))
    threaded = _NoiseStream(sizes, (1, 4, 4), torch.Generator().manual_seed(2), torch.device("cpu"), prefetch=1, threaded=True)
    assert threaded.threaded and not direct.threaded
    for n in sizes:
        a, b = direct.next(), threaded.next()
        assert a.shape == (n, 1, 4, 4) and torch.equal(a, b)
    threaded.close()
    early = _NoiseStream([1] * 50, (1, 4, 4), torch.Generator().manual_seed(2), torch.device("cpu"), prefetch=1, threaded=True)
    early.next()
    early.close()  # a producer blocked on a full queue must not keep the thread alive
    assert not early._thread.is_alive()


def test_unet_mode_is_restored_and_unsupported_configs_are_refused(unet):
    unet.train()
    FastSampler(unet, ddpm_scheduler(), num_inference_steps=2).sample(1)
    assert unet.training
    unet.eval()
    with pytest.raises(UserError, match="thresholding"):
        FastSampler(unet, ddpm_scheduler(thresholding=True))
    with pytest.raises(UserError, match="variance_type"):
        FastSampler(unet, ddpm_scheduler(variance_type="learned_range"))
    with pytest.raises(UserError, match="num_inference_steps"):
        FastSampler(unet, ddpm_scheduler(), num_inference_steps=101)
    with pytest.raises(UserError, match="dtype"):
        FastSampler(unet, ddpm_scheduler(), dtype="fp16")


# ---- sampling: fast paths on CPU ------------------------------------------------------------------


def test_compile_failure_warns_and_falls_back_to_eager(unet, monkeypatch):
    plain = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS).sample(2, generator=torch.Generator().manual_seed(0))

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InductorError: no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile of the UNet failed"):
        images = sampler.sample(2, generator=torch.Generator().manual_seed(0))
    assert sampler.compile_status.startswith("failed, running eager: RuntimeError")
    assert torch.equal(images, plain)

    def refusing_compile(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refusing_compile)
    with pytest.warns(RuntimeWarning, match="not supported on this Python"):
        sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, compile="yes")
    assert torch.equal(sampler.sample(2, generator=torch.Generator().manual_seed(0)), plain)


def test_compiled_unet_call_matches_plain(unet):
    """A real torch.compile (Dynamo tracing; the 'eager' backend skips minutes of C++ code generation on CPU)."""
    plain = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS).sample(2, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, compile=True, compile_backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        images = sampler.sample(2, generator=torch.Generator().manual_seed(4))
    assert sampler.compile_status == "on"
    torch.testing.assert_close(images, plain, rtol=0, atol=1e-5)


@pytest.mark.slow  # the real inductor compile: about half a minute on 2 quiet cores
def test_inductor_compiled_sampling_matches_plain(unet):
    plain = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS).sample(2, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, compile=True)
    images = sampler.sample(2, generator=torch.Generator().manual_seed(4))
    if sampler.compile_status != "on":  # falling back is allowed; then the result is the plain one
        assert sampler.compile_status.startswith("failed")
    torch.testing.assert_close(images, plain, rtol=0, atol=1e-4)


def test_cuda_graphs_on_cpu_is_a_clean_no_op(unet):
    plain = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS).sample(2, generator=torch.Generator().manual_seed(9))
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, cuda_graphs=True)
    assert sampler.cuda_graphs_status.startswith("not used: CUDA graphs need a CUDA device")
    assert torch.equal(sampler.sample(2, generator=torch.Generator().manual_seed(9)), plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, cuda_graphs="auto", compile="auto")  # both off on CPU, silently
    assert auto.compile_status == "off" and not auto._use_graphs
    assert torch.equal(auto.sample(2, generator=torch.Generator().manual_seed(9)), plain)


def test_bf16_sampling_on_cpu_is_finite_and_close_to_fp32(unet):
    fp32 = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS).sample(4, generator=torch.Generator().manual_seed(2))
    sampler = FastSampler(unet, ddpm_scheduler(), num_inference_steps=STEPS, dtype="bf16")
    bf16 = sampler.sample(4, generator=torch.Generator().manual_seed(2))
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert 0 <= bf16.min() and bf16.max() <= 1
    difference = (bf16 - fp32).abs()
    assert difference.max() > 0  # it did run in bf16
    assert difference.max() < 0.1 and difference.mean() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_per_step_and_graphs_match_eager(unet):
    device = torch.device("cuda")
    model = unet.to(device)
    try:
        eager = FastSampler(model, ddpm_scheduler(), num_inference_steps=STEPS, channels_last="no")
        expected = eager.sample(4, generator=torch.Generator(device).manual_seed(0))
        graphs = FastSampler(model, ddpm_scheduler(), num_inference_steps=STEPS, cuda_graphs=True, channels_last="no")
        graphs.warmup(4)
        assert graphs.cuda_graphs_status == "on"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            images = graphs.sample(4, generator=torch.Generator(device).manual_seed(0))  # device noise: nothing waits for the host
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
        # A CPU generator on a CUDA device: the same images as the stock pipeline with that generator.
        from diffusers import DDPMPipeline

        stock_images, _ = stock(DDPMPipeline, model, ddpm_scheduler(), 4, seed=1, num_inference_steps=STEPS)
        fast = FastSampler(model, ddpm_scheduler(), num_inference_steps=STEPS, channels_last="no").sample(4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(fast, stock_images, rtol=0, atol=1e-5)
    finally:
        unet.to("cpu")


# ---- training: fast paths on CPU ------------------------------------------------------------------


def _losses(output_dir):
    with open(os.path.join(output_dir, "loss_history.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_bf16_training_step_on_cpu(tmp_path, micro_unet_config, train_in_process):
    result = train_in_process(**quick_options(tmp_path / "bf16", micro_unet_config, mixed_precision="bf16", max_train_steps=2, logging_steps=1))
    losses = _losses(result.output_dir)
    assert result.step == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert os.path.isfile(os.path.join(result.output_dir, "unet", "diffusion_pytorch_model.safetensors"))


def test_channels_last_training_matches_contiguous(tmp_path, micro_unet_config, train_in_process):
    options = dict(max_train_steps=2, logging_steps=1, dropout=0.0)
    plain = _losses(train_in_process(**quick_options(tmp_path / "nchw", micro_unet_config, channels_last="no", **options)).output_dir)
    nhwc = _losses(train_in_process(**quick_options(tmp_path / "nhwc", micro_unet_config, channels_last="yes", **options)).output_dir)
    np.testing.assert_allclose(nhwc, plain, rtol=1e-4)


def test_training_with_compile_yes_runs_on_cpu(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    """compile="yes" goes through torch.compile on CPU too (Dynamo with the 'eager' backend here, to keep
    it to seconds) and trains like the plain run."""
    import functools

    options = dict(max_train_steps=2, logging_steps=1, dropout=0.0)
    plain = _losses(train_in_process(**quick_options(tmp_path / "plain", micro_unet_config, compile="no", **options)).output_dir)
    calls = []
    real_compile = torch.compile

    def eager_compile(*args, **kwargs):
        calls.append(kwargs)
        return real_compile(*args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(eager_compile))
    torch._dynamo.reset()
    compiled = _losses(train_in_process(**quick_options(tmp_path / "compiled", micro_unet_config, compile="yes", **options)).output_dir)
    assert calls, "compile='yes' did not call torch.compile"
    np.testing.assert_allclose(compiled, plain, rtol=1e-4)
