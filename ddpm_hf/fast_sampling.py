"""Fast DDPM and DDIM sampling: the whole reverse chain on the device, no host sync per step.

The stock `DDPMPipeline` calls `scheduler.step()` once per timestep: each call looks the timestep up
in a host tensor, moves a host timestep to the device and (with a CPU generator) copies fresh host
noise to the device and waits for it. `FastSampler` instead

* precomputes every step's coefficients once, from the saved scheduler configuration, as device tensors;
* runs the UNet optionally under bf16 autocast, optionally `torch.compile`d, optionally captured in a CUDA
  graph per batch shape (CUDA only); the update x_t -> x_{t-1} is a handful of element-wise kernels;
* draws noise exactly as the stock pipelines do: `randn` of the same shape, in float32, from the same
  generator, in the same order (the initial x_T of a batch, then one draw per step that adds noise).
  A CPU generator with a CUDA device is read by a background thread into pinned memory and copied
  without blocking, so the GPU never waits for the host.

Hence, in float32 eager mode, `FastSampler(...).sample(n, generator=g)` returns the very images of
`DDPMPipeline(unet, scheduler)(n, generator=g, output_type="pt")` (and likewise DDIM with
`DDIMPipeline`), bit for bit on CPU; with `batch_size`, those of calling the stock pipeline once per
batch with one generator, as `ddpm_hf.sampling.generate_images` does. In bf16 (state and noise stay float32,
only the UNet runs in bf16) they agree up to bf16 rounding of the network's output.

    sampler = FastSampler(pipeline.unet, pipeline.scheduler, num_inference_steps=1000, dtype="bf16", compile="auto", cuda_graphs="auto")
    images = sampler.sample(1000, generator=torch.Generator("cpu").manual_seed(0))   # N x 3 x H x W in [0, 1]
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

METHODS = ("ddpm", "ddim")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Reverse-process variances whose step does not depend on the network's output (all the paper needs).
_DDPM_VARIANCES = ("fixed_small", "fixed_large", "fixed_small_log")


def _choice(value: Any, device: torch.device) -> bool:
    """True/False/'yes'/'no'/'auto' ('auto': on for CUDA only), as the training options."""
    if isinstance(value, bool):
        return value
    if value in ("yes", "true", "on"):
        return True
    if value in ("no", "false", "off", None):
        return False
    if value == "auto":
        return device.type == "cuda"
    raise ValueError(f"expected True, False, 'yes', 'no' or 'auto', got {value!r}")


# ---------------------------------------------------------------------------------------------
# The plan: timesteps and per-step coefficients, computed once
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingPlan:
    """Everything the chain needs, one entry per inference step (index i runs timestep timesteps[i]).

    DDPM (Ho et al. 2020, Eqs. 7 and 15), with abar the cumulative product of alphas:
        x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)     [epsilon; v and x0 parameterisations likewise]
        x  = c_x0 * clip(x0) + c_xt * x + noise_scale * z  (z drawn only where adds_noise)
    DDIM (Song et al. 2021, Eq. 12):
        x  = sqrt(abar_prev) * clip(x0) + direction * eps + noise_scale * z
    """

    method: str
    prediction_type: str
    timesteps: torch.Tensor  # int64 (N,)
    adds_noise: list[bool]  # host-side: which steps draw z (known in advance, so no sync)
    clip_range: float | None  # clamp x0 to [-r, r], or None
    sqrt_abar: torch.Tensor  # float32 (N,)
    sqrt_one_minus_abar: torch.Tensor
    coef_x0: torch.Tensor  # DDPM: c_x0; DDIM: sqrt(abar_prev)
    coef_xt: torch.Tensor  # DDPM: c_xt; DDIM: sqrt(1 - abar_prev - sigma^2), the coefficient of eps
    noise_scale: torch.Tensor
    use_clipped_model_output: bool = False

    def to(self, device: torch.device) -> SamplingPlan:
        tensors = {k: getattr(self, k).to(device) for k in ("timesteps", "sqrt_abar", "sqrt_one_minus_abar", "coef_x0", "coef_xt", "noise_scale")}
        return SamplingPlan(
            self.method,
            self.prediction_type,
            adds_noise=self.adds_noise,
            clip_range=self.clip_range,
            use_clipped_model_output=self.use_clipped_model_output,
            **tensors,
        )

    def __len__(self) -> int:
        return len(self.adds_noise)


def _scheduler_config(scheduler) -> dict:
    config = getattr(scheduler, "config", scheduler)
    return dict(config)


def _check_supported(config: dict, method: str) -> None:
    if config.get("thresholding"):
        raise UserError("the fast sampler does not implement dynamic thresholding (thresholding=True); use the stock pipeline.")
    if config.get("prediction_type", "epsilon") not in ("epsilon", "sample", "v_prediction"):
        raise UserError(f"unknown prediction_type {config.get('prediction_type')!r}.")
    if method == "ddpm" and config.get("variance_type", "fixed_small") not in _DDPM_VARIANCES:
        raise UserError(f"the fast sampler supports variance_type {', '.join(_DDPM_VARIANCES)}, not {config.get('variance_type')!r}; use the stock pipeline.")


def ddpm_plan(scheduler, num_inference_steps: int | None = None) -> SamplingPlan:
    """Coefficients of DDPMScheduler.step for each timestep of `set_timesteps(num_inference_steps)`.

    Every coefficient is computed with the same float32 operations, in the same order, as the
    scheduler computes it at that step, so the chain reproduces it exactly.
    """
    from diffusers import DDPMScheduler

    config = _scheduler_config(scheduler)
    _check_supported(config, "ddpm")
    schedule = DDPMScheduler.from_config(config)
    schedule.set_timesteps(num_inference_steps or config["num_train_timesteps"])
    timesteps = schedule.timesteps.to(torch.int64)
    abar, one = schedule.alphas_cumprod, torch.tensor(1.0)
    variance_type = config.get("variance_type", "fixed_small")
    rows: list[tuple] = []
    adds_noise = []
    for i, t in enumerate(timesteps.tolist()):
        prev_t = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
        abar_t = abar[t]
        abar_prev = abar[prev_t] if prev_t >= 0 else one
        beta_prod_t = 1 - abar_t
        beta_prod_prev = 1 - abar_prev
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        coef_x0 = (abar_prev ** (0.5) * beta_t) / beta_prod_t
        coef_xt = alpha_t ** (0.5) * beta_prod_prev / beta_prod_t
        # Variance of the step (Ho et al. Sec. 3.2): beta_t ("fixed_large") or beta-tilde_t ("fixed_small").
        beta_t_again = 1 - abar_t / abar_prev
        posterior = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t_again, min=1e-20)
        if variance_type == "fixed_small":
            scale = posterior**0.5
        elif variance_type == "fixed_large":
            scale = beta_t_again**0.5
        else:  # fixed_small_log: the scheduler multiplies the noise by exp(0.5 log var) directly
            scale = torch.exp(0.5 * torch.log(posterior))
        rows.append((abar_t ** (0.5), beta_prod_t ** (0.5), coef_x0, coef_xt, scale))
        adds_noise.append(t > 0)
    columns = [torch.stack([row[k] for row in rows]).float() for k in range(5)]
    return SamplingPlan(
        "ddpm",
        config.get("prediction_type", "epsilon"),
        timesteps,
        adds_noise,
        config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None,
        *columns,
    )


def ddim_plan(scheduler, num_inference_steps: int = 50, eta: float = 0.0, use_clipped_model_output: bool = False) -> SamplingPlan:
    """Coefficients of DDIMScheduler.step (as DDIMPipeline builds it from the saved configuration)."""
    from diffusers import DDIMScheduler

    config = _scheduler_config(scheduler)
    _check_supported(config, "ddim")
    schedule = DDIMScheduler.from_config(config)
    schedule.set_timesteps(num_inference_steps)
    timesteps = schedule.timesteps.to(torch.int64)
    abar, final = schedule.alphas_cumprod, schedule.final_alpha_cumprod
    stride = schedule.config.num_train_timesteps // num_inference_steps
    rows = []
    for t in timesteps.tolist():
        prev_t = t - stride
        abar_t = abar[t]
        abar_prev = abar[prev_t] if prev_t >= 0 else final
        beta_prod_t = 1 - abar_t
        beta_prod_prev = 1 - abar_prev
        variance = (beta_prod_prev / beta_prod_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance ** (0.5)
        direction = (1 - abar_prev - sigma**2) ** (0.5)
        rows.append((abar_t ** (0.5), beta_prod_t ** (0.5), abar_prev ** (0.5), direction, sigma))
    columns = [torch.stack([torch.as_tensor(row[k]) for row in rows]).float() for k in range(5)]
    clip = schedule.config.clip_sample_range if schedule.config.clip_sample else None
    return SamplingPlan(
        "ddim",
        schedule.config.prediction_type,
        timesteps,
        [eta > 0] * len(timesteps),
        clip,
        *columns,
        use_clipped_model_output=bool(use_clipped_model_output),
    )


def reverse_step(plan: SamplingPlan, i: int, x: torch.Tensor, model_output: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """x_{t_i} -> x_{t_{i+1}}: the scheduler's step, with the plan's device coefficients (no host sync)."""
    sqrt_abar, sqrt_one_minus = plan.sqrt_abar[i], plan.sqrt_one_minus_abar[i]
    if plan.prediction_type == "epsilon":
        x0 = (x - sqrt_one_minus * model_output) / sqrt_abar
        eps = model_output
    elif plan.prediction_type == "sample":
        x0 = model_output
        eps = (x - sqrt_abar * x0) / sqrt_one_minus if plan.method == "ddim" else None
    else:  # v_prediction
        x0 = sqrt_abar * x - sqrt_one_minus * model_output
        eps = sqrt_abar * model_output + sqrt_one_minus * x if plan.method == "ddim" else None
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
    if plan.method == "ddpm":
        x = plan.coef_x0[i] * x0 + plan.coef_xt[i] * x
    else:
        if plan.use_clipped_model_output:
            eps = (x - sqrt_abar * x0) / sqrt_one_minus
        x = plan.coef_x0[i] * x0 + plan.coef_xt[i] * eps
    if noise is not None:
        x = x + plan.noise_scale[i] * noise
    return x


# ---------------------------------------------------------------------------------------------
# Noise: the stock pipelines' draws, in their order
# ---------------------------------------------------------------------------------------------


class _NoiseStream:
    """Yields the float32 noise tensors of a whole sampling run, on `device`, in draw order.

    The draws happen where the generator lives (on the device when there is none), like diffusers'
    randn_tensor. Host draws bound for a CUDA device are made ahead by a thread into pinned memory.
    """

    def __init__(
        self, sizes: list[int], sample_shape: tuple, generator: torch.Generator | None, device: torch.device, prefetch: int = 3, threaded: bool | None = None
    ):
        self.sizes, self.shape, self.generator, self.device = sizes, tuple(sample_shape), generator, device
        self.draw_device = generator.device if generator is not None else device
        self.threaded = (self.draw_device.type == "cpu" and device.type == "cuda") if threaded is None else threaded
        self.pin = self.threaded and device.type == "cuda"
        self._iter: Iterator[torch.Tensor]
        if self.threaded:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="ddpm-noise", daemon=True)
            self._thread.start()
            self._iter = self._consume()
        else:
            self._iter = (torch.randn((n, *self.shape), generator=generator, device=self.draw_device, dtype=torch.float32).to(device) for n in sizes)

    def _produce(self):
        try:
            for n in self.sizes:
                if self._stop.is_set():
                    return
                buffer = torch.empty((n, *self.shape), dtype=torch.float32, pin_memory=self.pin)
                torch.randn((n, *self.shape), generator=self.generator, dtype=torch.float32, out=buffer)
                self._queue.put(buffer)
        except BaseException as e:  # surfaced in the consuming thread
            self._queue.put(e)

    def _consume(self):
        for _ in self.sizes:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item.to(self.device, non_blocking=True)

    def next(self) -> torch.Tensor:
        return next(self._iter)

    def close(self):
        if self.threaded:
            self._stop.set()
            while self._thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


class FastSampler:
    """Sample a UNet2DModel with a saved DDPM noise schedule, DDPM (ancestral) or DDIM.

    unet, scheduler   the pipeline's parts (`scheduler` may be a DDPMScheduler, a DDIMScheduler or its config)
    method            'ddpm' or 'ddim' (default: 'ddim' for a DDIMScheduler, else 'ddpm')
    num_inference_steps  default: T for DDPM, 50 for DDIM
    dtype             'fp32', or 'bf16' (the UNet under bf16 autocast; x_t, noise and the update stay float32)
    compile           torch.compile the UNet call ('auto': CUDA only); any compile failure warns and runs eager
    cuda_graphs       capture the UNet call in a CUDA graph per batch shape ('auto': CUDA only); on CPU a no-op
    channels_last     channels_last activations ('auto': CUDA only)

    `compile_status` and `cuda_graphs_status` say what was actually used, and why not.
    """

    def __init__(
        self,
        unet,
        scheduler,
        method: str | None = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "fp32",
        compile: Any = False,
        cuda_graphs: Any = False,
        channels_last: Any = "auto",
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ):
        from diffusers import DDIMScheduler

        if method is None:
            method = "ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm"
        if method not in METHODS:
            raise UserError(f"unknown sampling method {method!r}: choose one of {', '.join(METHODS)}.")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise UserError(f"unknown dtype {dtype!r}: choose fp32 or bf16.")
            dtype = DTYPES[dtype]
        if dtype not in (torch.float32, torch.bfloat16):
            raise UserError(f"dtype {dtype} is not supported: choose fp32 or bf16.")
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.unet = unet.to(self.device)
        self.dtype = dtype
        config = _scheduler_config(scheduler)
        if num_inference_steps is None:
            num_inference_steps = config["num_train_timesteps"] if method == "ddpm" else 50
        if not 0 < num_inference_steps <= config["num_train_timesteps"]:
            raise UserError(f"num_inference_steps {num_inference_steps} must be in 1..{config['num_train_timesteps']}.")
        plan = ddpm_plan(config, num_inference_steps) if method == "ddpm" else ddim_plan(config, num_inference_steps, eta, use_clipped_model_output)
        self.plan = plan.to(self.device)
        self.channels_last = _choice(channels_last, self.device)
        if self.channels_last:  # same values, NHWC layout: convolutions then need no layout change per call
            self.unet.to(memory_format=torch.channels_last)

        self.compile_status = "off"
        self._compiled = None
        if _choice(compile, self.device):
            try:
                self._compiled = torch.compile(self._forward, backend=compile_backend, mode=compile_mode, dynamic=False)
                self.compile_status = "pending (compiles at the first call)"
            except Exception as e:  # e.g. no compiler support on this platform or Python
                self._compile_failed(e)

        self.cuda_graphs_status = "off"
        self._use_graphs = _choice(cuda_graphs, self.device)
        if self._use_graphs and self.device.type != "cuda":
            self._use_graphs = False
            self.cuda_graphs_status = f"not used: CUDA graphs need a CUDA device, this sampler runs on {self.device.type}"
            if cuda_graphs not in ("auto",):  # asked for explicitly: say why it is off
                warnings.warn(f"cuda_graphs: {self.cuda_graphs_status}; sampling without them.", UserWarning, stacklevel=2)
        elif self._use_graphs:
            self.cuda_graphs_status = "on (captured per batch shape at first use)"
        self._graphs: dict[int, tuple] = {}
        self._graph_pool = None

    # ---- the UNet call ---------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16, cache_enabled=False):
            out = self.unet(x, t, return_dict=False)[0]
        return out.float()

    def _compile_failed(self, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        self.compile_status = f"failed, running eager: {type(error).__name__}: {first_line}"
        self._compiled = None
        warnings.warn(
            f"torch.compile of the UNet failed ({type(error).__name__}: {first_line}); sampling with the eager UNet instead.", RuntimeWarning, stacklevel=3
        )

    def _call_unet(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                out = self._compiled(x, t)
                self.compile_status = "on"
                return out
            except Exception as e:  # compile errors surface at the first call for each new shape
                self._compile_failed(e)
        return self._forward(x, t)

    def _graph_for(self, x: torch.Tensor, t: torch.Tensor):
        """(graph, static_x, static_t, static_out) for this batch shape, capturing it at first use."""
        key = x.shape[0]
        if key in self._graphs:
            return self._graphs[key]
        static_x, static_t = x.clone(), t.clone()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    self._call_unet(static_x, static_t)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_out = self._call_unet(static_x, static_t)
        except Exception as e:
            self._use_graphs = False
            self.cuda_graphs_status = f"failed, running without graphs: {type(e).__name__}: {str(e).strip()[:200]}"
            warnings.warn(f"CUDA graph capture of the UNet failed ({type(e).__name__}: {e}); sampling without CUDA graphs.", RuntimeWarning, stacklevel=3)
            return None
        self.cuda_graphs_status = "on"
        self._graphs[key] = (graph, static_x, static_t, static_out)
        return self._graphs[key]

    def model_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet's float32 output at inference step i (graph replay when captured)."""
        t = self.plan.timesteps[i]
        if self._use_graphs:
            captured = self._graph_for(x, t)
            if captured is not None:
                graph, static_x, static_t, static_out = captured
                static_x.copy_(x)
                static_t.copy_(t)
                graph.replay()
                return static_out
        return self._call_unet(x, t)

    # ---- sampling --------------------------------------------------------------------------------

    def sample_shape(self) -> tuple:
        """C x H x W of one image."""
        config = self.unet.config
        size = (config.sample_size, config.sample_size) if isinstance(config.sample_size, int) else tuple(config.sample_size)
        return (config.in_channels, *size)

    @torch.no_grad()
    def warmup(self, batch_size: int) -> None:
        """Compile and capture for this batch shape now, rather than inside the first `sample` call."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            self.model_output(torch.zeros((batch_size, *self.sample_shape()), device=self.device), 0)
        finally:
            self.unet.train(was_training)

    def noise_sizes(self, num_images: int, batch_size: int | None = None) -> list[int]:
        """The sizes of the noise draws, in order: per batch, x_T, then one per step that adds noise."""
        batch_size = batch_size or num_images
        sizes = []
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            sizes += [count] + [count] * sum(self.plan.adds_noise)
        return sizes

    @torch.no_grad()
    def sample(self, num_images: int, generator: torch.Generator | None = None, batch_size: int | None = None, output_type: str = "pt"):
        """Images in [0, 1]: 'pt' N x C x H x W float32 on the device, 'np' N x H x W x C on the host, or 'pil'."""
        if num_images <= 0:
            raise UserError("num_images must be positive.")
        if output_type not in ("pt", "np", "pil"):
            raise UserError(f"output_type {output_type!r}: choose pt, np or pil.")
        batch_size = min(batch_size or num_images, num_images)
        sample_shape = self.sample_shape()
        was_training = self.unet.training
        self.unet.eval()
        noise = _NoiseStream(self.noise_sizes(num_images, batch_size), sample_shape, generator, self.device)
        outputs = []
        try:
            for _ in range(0, num_images, batch_size):
                x = noise.next()
                for i in range(len(self.plan)):
                    model_output = self.model_output(x, i)
                    x = reverse_step(self.plan, i, x, model_output, noise.next() if self.plan.adds_noise[i] else None)
                outputs.append((x / 2 + 0.5).clamp(0, 1))
        finally:
            noise.close()
            self.unet.train(was_training)
        images = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if output_type == "pt":
            return images
        if output_type == "np":
            return images.cpu().permute(0, 2, 3, 1).numpy()
        return to_pil(images)


def to_pil(images: torch.Tensor) -> list:
    """[0, 1] N x C x H x W -> PIL images, rounded as diffusers' numpy_to_pil rounds (half to even)."""
    from PIL import Image

    array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    return [Image.fromarray(a) for a in array]


def fast_generate(pipeline, num_images: int, steps: int, seed: int, batch_size: int | None = None, **options) -> list:
    """`ddpm_hf.sampling.generate_images` with the fast sampler: PIL images, same seed -> same images (fp32)."""
    sampler = FastSampler(pipeline.unet, pipeline.scheduler, num_inference_steps=steps, **options)
    generator = torch.Generator("cpu").manual_seed(seed)
    return sampler.sample(num_images, generator=generator, batch_size=batch_size, output_type="pil")
