"""Sampling: the one place that decides which sampler runs, and the one loop that runs it.

* `make_sampler(scheduler, name, steps, spacing, solver_order, karras_sigmas)` turns the trained noise schedule into
  a diffusers scheduler for sampling, one of SAMPLER_KINDS: ddpm (Ho et al. 2020, Alg. 2), ddim (Song et al. 2021,
  eta = 0), dpmsolver (DPM-Solver++(2M), Lu et al. 2022), unipc (Zhao et al. 2023), deis (Zhang & Chen 2023), and
  euler / heun on Karras et al. (2022)'s sigmas; "auto" is ddpm with all T steps and unipc with fewer (`AUTO_RULE`). It refuses
  the combinations where diffusers' schedulers misbehave (tests/test_samplers_exact.py shows each). The training
  grids, in-training FID, `ddpm-hf sample`, `ddpm-hf evaluate` and `ddpm-hf visualize reverse` all choose through it;
  `accepted_steps(scheduler, name)` lists the step counts K it takes, as intervals (what the Space and the demo offer).
* `ReverseProcess(unet, sampler, seed, indices)` is the reverse chain they all run, one batch: iterated, it yields a
  `ReverseStep` (x_t and the predicted x_0) per network evaluation. `generate_images(unet, sampler, ...)` runs it
  over this process's share of the images (uint8, batch by batch), handing each step to `on_step` if asked.
* `compile_for_sampling(unet)`: torch.compile for sampling, with a warning and the eager UNet where compiling fails.
* `ddpm-hf sample`: a grid (and optionally one file per image) from a saved pipeline, folder or Hub id.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .arguments import bounded, is_hub_id, local_path_or_hub_id, output_file
from .arguments import device as device_type
from .compilation import out_of_memory_in, warn_compile_failed
from .conditioning import (
    check_guidance,
    class_ids,
    class_names_of,
    guided_model_output,
    is_conditional_index,
    labels_in_blocks,
    num_classes,
)
from .distributed import DEFAULT_TIMEOUT_S, leave_process_group
from .errors import UserError
from .models import LEARNED_VARIANCES
from .run_folder import RunFolder


@dataclass(frozen=True)
class SamplerKind:
    """What a sampler name stands for: a diffusers scheduler class, set up as its paper describes it."""

    scheduler_class: str  # in diffusers
    title: str  # what it is, with its paper
    order: int  # the order of its global error in the step size h at its default solver order (error ~ h^order)
    stochastic: bool = False  # a step adds fresh noise (drawn from each image's own generator)
    solver_orders: tuple[int, ...] = ()  # the --solver_order it takes, the default first (empty: none)
    karras_sigmas: bool | None = None  # its default for --karras_sigmas; None: it has no Karras sigmas
    options: tuple[tuple[str, object], ...] = ()  # fixed scheduler settings

    @property
    def default_solver_order(self) -> int | None:
        return self.solver_orders[0] if self.solver_orders else None


SAMPLER_KINDS = {
    "ddpm": SamplerKind("DDPMScheduler", "ancestral sampling, Ho et al. (2020) Alg. 2 (strided when K < T)", order=1, stochastic=True),
    "ddim": SamplerKind("DDIMScheduler", "DDIM, Song, Meng & Ermon (2021), deterministic (eta = 0)", order=1),
    "dpmsolver": SamplerKind(
        "DPMSolverMultistepScheduler",
        "DPM-Solver++(2M), Lu et al. (2022), multistep in the data prediction",
        order=2,
        solver_orders=(2, 1, 3),
        karras_sigmas=False,
        options=(("algorithm_type", "dpmsolver++"), ("variance_type", None)),  # it is given the mean part
    ),
    "unipc": SamplerKind(
        "UniPCMultistepScheduler", "UniPC (bh2), Zhao et al. (2023), multistep predictor-corrector", order=3, solver_orders=(2, 1, 3), karras_sigmas=False
    ),
    "deis": SamplerKind(
        "DEISMultistepScheduler", "DEIS (log-rho), Zhang & Chen (2023), multistep exponential integrator", order=2, solver_orders=(2, 1, 3), karras_sigmas=False
    ),
    "euler": SamplerKind("EulerDiscreteScheduler", "Euler on Karras et al. (2022)'s sigmas (rho = 7)", order=1, karras_sigmas=True),
    "heun": SamplerKind("HeunDiscreteScheduler", "Heun on Karras et al. (2022)'s sigmas, their Alg. 1", order=2, karras_sigmas=True),
}
SAMPLERS = tuple(SAMPLER_KINDS)
SAMPLER_CHOICES = ("auto", *SAMPLERS)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
STOCK_PIPELINE_SAMPLERS = ("ddpm", "ddim", "dpmsolver")  # what `load_pipeline` can hand to diffusers' DDPMPipeline / DDIMPipeline
STEPS_HINT = "e.g. 50 for ddim, 20 for dpmsolver, unipc or deis, 10 for heun"


@dataclass
class Sampler:
    """A diffusers scheduler set up for sampling, and what it was chosen as."""

    scheduler: object  # a diffusers scheduler (SAMPLER_KINDS[name].scheduler_class), its timesteps set for `steps`
    name: str  # one of SAMPLERS (never "auto")
    steps: int  # K, the number of denoising steps asked for: the sampler's own steps (Heun evaluates twice per step); 0 before set_steps
    timestep_spacing: str
    solver_order: int | None = None  # multistep solvers' order (dpmsolver, unipc, deis)
    karras_sigmas: bool = False

    @property
    def kind(self) -> SamplerKind:
        return SAMPLER_KINDS[self.name]

    @property
    def nfe(self) -> int:
        """Network evaluations per image: K for every sampler but Heun (2K - 1: its last step is an Euler step).
        Classifier-free guidance runs each evaluation on a doubled batch but does not count twice."""
        return len(self.scheduler.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether a step adds fresh noise (drawn from each image's own generator)."""
        return self.kind.stochastic

    @property
    def reads_variance(self) -> bool:
        """Whether the scheduler takes a learned-variance UNet's 2C channels (only DDPM samples with the variance);
        every other sampler is given the mean part, the first C."""
        return self.name == "ddpm" and self.scheduler.config.get("variance_type") in LEARNED_VARIANCES

    @property
    def takes_every_step_count(self) -> bool:
        """Whether `set_steps` refuses no K of 1..T whatever the schedule: Karras sigmas that diffusers keeps as
        fractional timesteps (euler, heun; the multistep solvers round theirs) strictly decrease, so the K of them
        differ, and neither 'leading' spacing nor `check_sampler_spacing` concerns them."""
        return self.karras_sigmas and self.name in FRACTIONAL_KARRAS_TIMESTEPS

    def set_steps(self, steps: int) -> None:
        """Set the diffusers scheduler's timesteps for K = `steps` (1 to T), or raise the UserError of a K where it
        misbehaves: the cheap `check_sampler_spacing` first, then `check_timesteps_of` on the timesteps diffusers
        gives. `make_sampler` and `accepted_steps` both check a step count here. (A refused K leaves the timesteps
        set and `steps` as it was: set another.)"""
        T = self.scheduler.config.num_train_timesteps
        check_sampler_spacing(self.name, steps, T, self.timestep_spacing, self.scheduler.config.get("variance_type", "fixed_small"))
        self.scheduler.set_timesteps(steps)
        check_timesteps_of(self.scheduler, self.name, steps, self.timestep_spacing, self.karras_sigmas)
        self.steps = steps

    def describe(self) -> str:
        details = [f"order {self.solver_order}"] if self.solver_order not in (None, self.kind.default_solver_order) else []
        details += ["Karras sigmas"] if self.karras_sigmas else []
        details += [f"{self.nfe} network evaluations"] if self.nfe != self.steps else []
        return f"{self.name} {self.steps} steps" + (f" ({', '.join(details)})" if details else "")


# "auto" with a step budget K (docs/evaluation.md, "The frontier", says where the numbers come from): with all T steps,
# ddpm, the paper's sampler, whose FID there (3.17 on CIFAR-10, Ho et al. 2020) beats the probability-flow ODE's limit
# (DDIM 4.04 at 1000 steps, Song et al. 2021, Table 1); with fewer, unipc, the lowest published FID at 5-20 NFE on
# CIFAR-10 (3.87 at 10 NFE, Zhao et al. 2023; DEIS about 4.2, DPM-Solver about 4.7, DDIM 13.36) and equal to the other
# ODE solvers as K grows, while strided ddpm falls far behind below T (9.99 at 100 steps, DDIM Table 1).
# With fewer steps "auto" also takes 'trailing' timesteps (unless a spacing is given): they start at t = T - 1 for any K
# (Lin et al. 2024, Table 2), where the multistep solvers' 'leading' stride, T // (K + 1), starts lower (t = 900 for
# K = 100 of 1000), which check_timesteps_of refuses on the cosine schedule.
AUTO_RULE = "ddpm with all T steps, unipc on 'trailing' timesteps with fewer"


def resolve_sampler(name: str, steps: int | None, num_train_timesteps: int, option: str = "--scheduler") -> tuple[str, int]:
    """(sampler, K) for a requested name ('auto' or one of SAMPLERS) and step count (None: T for ddpm); 'auto' picks by
    AUTO_RULE."""
    if name not in SAMPLER_CHOICES:
        raise UserError(f"{option} {name}: unknown sampler. Choose one of: {', '.join(SAMPLER_CHOICES)}.")
    if name == "auto":
        name = "ddpm" if steps is None or steps >= num_train_timesteps else "unipc"
    if steps is None:
        if name != "ddpm":
            raise UserError(f"{option} {name} needs --steps K ({STEPS_HINT}).")
        steps = num_train_timesteps
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"--steps {steps} must be between 1 and the model's T = {num_train_timesteps}.")
    return name, steps


def check_sampler_spacing(name: str, steps: int, num_train_timesteps: int, timestep_spacing: str, variance_type: str = "fixed_large") -> None:
    """Refuse the combinations where a diffusers scheduler misbehaves (measured by tests/test_samplers_exact.py):

    * DDPM with 'trailing' spacing and K < T ends at t = T/K - 1 > 0, where diffusers' DDPMScheduler still adds
      noise of variance beta_t for every variance but beta-tilde (which is 0 there): std ~0.3 of [-1, 1] units at
      K = 10 with fixed_large. The final image would stay noisy.
    * DDIM steps from t to t - T // K whatever the spacing (DDIMScheduler.step), while 'linspace' and (when K does not
      divide T) 'trailing' place the next timestep elsewhere: the chain evaluates the network at one noise level
      while its state is at another, an error that does not shrink with more steps."""
    T = num_train_timesteps
    if name == "ddpm" and timestep_spacing == "trailing" and steps < T and variance_type not in ("fixed_small", "fixed_small_log"):
        raise UserError(
            f"ddpm sampling with {steps} < T = {T} steps, timestep_spacing 'trailing' and variance {variance_type} leaves noise "
            "in the final image. Use timestep_spacing 'leading' or 'linspace', all T steps, or the ddim or dpmsolver sampler."
        )
    if name == "ddim" and steps < T and (timestep_spacing == "linspace" or (timestep_spacing == "trailing" and T % steps)):
        raise UserError(
            f"ddim with timestep_spacing '{timestep_spacing}' and {steps} steps of T = {T}: diffusers' DDIM steps from t to t - T // K, "
            f"which is not the next timestep of this spacing, so it samples at the wrong noise levels. Use timestep_spacing 'leading'"
            + (f", a K that divides {T}" if timestep_spacing == "trailing" else "")
            + ", or the dpmsolver, unipc or deis sampler."
        )


FRACTIONAL_KARRAS_TIMESTEPS = ("euler", "heun")  # the samplers whose Karras sigmas diffusers does not round to integer timesteps
LEADING_SIGNAL_LIMIT = 0.1  # how much more of the data's signal, sqrt(abar_t), than at T - 1 a chain's first step may leave


def check_timesteps_of(scheduler, name: str, steps: int, spacing: str, karras: bool) -> None:
    """Refuse the timesteps diffusers gives a sampler where they misbehave (tests/test_samplers_exact.py):

    * the same timestep twice in one chain (the Heun pair aside): the multistep solvers' 'leading' spacing divides T
      by K + 1 with an integer stride, which is 0 for K = T; their Karras sigmas are rounded to integer timesteps,
      several of which coincide near T - 1 on the cosine schedule, where sigma jumps. The network is then asked at
      one noise level for several, and DPMSolverMultistepScheduler's steps run past its sigmas.
    * a 'leading' chain whose first timestep leaves LEADING_SIGNAL_LIMIT more of the data's signal than t = T - 1:
      'leading' strides by floor(T / K), so a K that does not divide T can start far below T - 1 (K = 600 of 1000
      starts at 599), and with few steps the cosine schedule still holds much of the image there (Lin et al. 2024,
      "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Table 2). The chain takes pure noise for a
      sample that is not."""
    timesteps = [float(t) for t in scheduler.timesteps.tolist()]  # tolist: iterating the tensor costs ~1 µs a timestep
    distinct = len(set(timesteps))
    if distinct < steps:
        cause = "rounds its Karras sigmas to integer timesteps" if karras else f"divides the {spacing} spacing into integer timesteps"
        raise UserError(
            f"{name} with {steps} steps: diffusers' {type(scheduler).__name__} {cause}, and only {distinct} of them differ, so the network "
            "would be asked at one noise level for several. "
            + (
                "Use fewer steps, --karras_sigmas no, or the heun or euler sampler (whose timesteps are not rounded)."
                if karras
                else "Use fewer steps or timestep_spacing 'trailing'."
            )
        )
    if spacing == "leading":
        signal = scheduler.alphas_cumprod.double().sqrt()  # sqrt(abar_t): how much of x_0 is left in x_t
        first, T = round(timesteps[0]), scheduler.config.num_train_timesteps
        if signal[first] - signal[-1] > LEADING_SIGNAL_LIMIT and signal[-1] < LEADING_SIGNAL_LIMIT:  # a schedule that ends in noise
            other = {"ddpm": "'linspace'", "ddim": f"'trailing' with a K that divides {T}"}.get(name, "'trailing' or 'linspace'")
            raise UserError(
                f"{name} with {steps} steps and timestep_spacing 'leading' starts at t = {first} of T = {T}, where {float(signal[first]):.0%} of the "
                f"image's signal is left ({float(signal[-1]):.0%} at t = T - 1): the chain would take it for pure noise. "
                f"Use timestep_spacing {other}, or more steps."
            )


def make_sampler(
    scheduler,
    name: str = "auto",
    steps: int | None = None,
    timestep_spacing: str | None = None,
    solver_order: int | None = None,
    karras_sigmas: bool | None = None,
) -> Sampler:
    """A sampler that shares the trained noise schedule (betas, T, prediction type, variance) of `scheduler`:
    one of SAMPLER_KINDS, or "auto" (AUTO_RULE: ddpm when K is T or not given, unipc on 'trailing' timesteps when fewer).

    `timestep_spacing` (default: the model's) picks K of the T timesteps; with Karras sigmas (Karras et al. 2022,
    Eq. 5, rho = 7), sigma runs from sigma(T - 1) to sigma(0) and no spacing may be given. `solver_order` (multistep
    solvers, 1 to 3) and `karras_sigmas` (the solvers that have them) default to SAMPLER_KINDS'; a value that makes
    no sense for the sampler is a UserError, as are the step counts `Sampler.set_steps` refuses (`accepted_steps`
    lists the others)."""
    T = scheduler.config.num_train_timesteps
    timestep_spacing = auto_spacing(name, steps, T, timestep_spacing)
    name, steps = resolve_sampler(name, steps, T)
    sampler = sampler_without_steps(scheduler, name, timestep_spacing, solver_order, karras_sigmas)
    sampler.set_steps(steps)
    return sampler


def auto_spacing(name: str, steps: int | None, num_train_timesteps: int, timestep_spacing: str | None) -> str | None:
    """The spacing of a request: AUTO_RULE's 'trailing' when "auto" runs fewer than T steps and none is given."""
    if name == "auto" and timestep_spacing is None and (steps or num_train_timesteps) < num_train_timesteps:
        return "trailing"
    return timestep_spacing


def sampler_without_steps(scheduler, name: str, timestep_spacing: str | None, solver_order: int | None, karras_sigmas: bool | None) -> Sampler:
    """`make_sampler`'s sampler `name` (one of SAMPLERS) before its step count is set (steps 0): the options that do
    not depend on K checked, the diffusers scheduler built."""
    import diffusers

    kind = SAMPLER_KINDS[name]
    if solver_order is not None and solver_order not in kind.solver_orders:
        takes = f"takes --solver_order {min(kind.solver_orders)} to {max(kind.solver_orders)}" if kind.solver_orders else "has no --solver_order"
        raise UserError(f"--solver_order {solver_order}: {name} {takes}. Multistep solvers (dpmsolver, unipc, deis) take 1 to 3.")
    if karras_sigmas and kind.karras_sigmas is None:
        raise UserError(f"--karras_sigmas: {name} has no Karras sigmas (it steps through the trained timesteps). Use euler, heun, dpmsolver, unipc or deis.")
    karras = kind.karras_sigmas if karras_sigmas is None else bool(karras_sigmas)
    if karras and timestep_spacing is not None:
        raise UserError(
            f"--timestep_spacing {timestep_spacing} with Karras sigmas: their spacing is their own (sigma(T-1) to sigma(0), rho = 7). "
            "Drop --timestep_spacing, or turn Karras sigmas off (--karras_sigmas no)."
        )
    spacing = "linspace" if karras else timestep_spacing or scheduler.config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep_spacing {spacing}: choose one of {', '.join(TIMESTEP_SPACINGS)}.")
    order = kind.default_solver_order if solver_order is None else solver_order
    options = dict(kind.options, timestep_spacing=spacing)
    if kind.karras_sigmas is not None:
        options["use_karras_sigmas"] = karras
    if order is not None:
        options["solver_order"] = order
    # Without "_use_default_values", from_config keeps every value of the trained schedule: with it, the values the
    # trained scheduler took by default (beta_start, ...) become the new class's defaults (Heun's differ from DDPM's).
    trained = {key: value for key, value in scheduler.config.items() if key != "_use_default_values"}
    sampler = getattr(diffusers, kind.scheduler_class).from_config(trained, **options)
    return Sampler(scheduler=sampler, name=name, steps=0, timestep_spacing=spacing, solver_order=order, karras_sigmas=bool(karras))


def accepted_steps(
    scheduler, name: str = "auto", timestep_spacing: str | None = None, solver_order: int | None = None, karras_sigmas: bool | None = None
) -> list[tuple[int, int]]:
    """The step counts K that `make_sampler(scheduler, name, K, timestep_spacing, solver_order, karras_sigmas)`
    accepts, as inclusive intervals [(first, last), ...] in increasing order; empty when it refuses every K (options
    the sampler does not take, say). The set need not be one interval: a 'leading' K that does not divide T can
    start far below T - 1 (K = 501 .. 664 of T = 1000 on the linear schedule), and a 'trailing' ddim takes only the K
    that divide T.

    Each sampler's diffusers scheduler is built once (`from_config` costs milliseconds) and every K of 1..T goes
    through `Sampler.set_steps`, the check make_sampler runs, but where it takes every K (`takes_every_step_count`):
    diffusers maps Karras sigmas to timesteps one sigma at a time, ~35 us each, 16-20 s for all K of T = 1000."""
    T = scheduler.config.num_train_timesteps
    built: dict[tuple[str, str | None], Sampler | None] = {}  # "auto" chooses two samplers; None: one refused whatever K

    def takes(chosen: str, steps: int) -> bool:
        spacing = auto_spacing(name, steps, T, timestep_spacing)
        if (chosen, spacing) not in built:
            try:
                built[chosen, spacing] = sampler_without_steps(scheduler, chosen, spacing, solver_order, karras_sigmas)
            except UserError:
                built[chosen, spacing] = None
        sampler = built[chosen, spacing]
        if sampler is None or sampler.takes_every_step_count:
            return sampler is not None
        try:
            sampler.set_steps(steps)
        except UserError:
            return False
        return True

    return intervals_of([steps for steps in range(1, T + 1) if takes(resolve_sampler(name, steps, T)[0], steps)])


def intervals_of(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """Increasing whole numbers as inclusive intervals of consecutive ones: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    intervals = []
    for number in numbers:
        if intervals and number == intervals[-1][1] + 1:
            intervals[-1] = (intervals[-1][0], number)
        else:
            intervals.append((number, number))
    return intervals


@dataclass
class ReverseStep:
    """One network evaluation of a reverse process, as `ReverseProcess` yields it and `generate_images(on_step=...)`
    hands it over: the images' x_t as the network saw it and the x_0 it predicts from it.

    `x_t` is in the DDPM (variance-preserving) scale of every sampler, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    (the network's input, whatever scale a scheduler keeps its own state in), on the sampling device. `pred_x0` is
    computed the first time it is read: the scheduler's own x_0 where its step returns one (DDPM and DDIM clip it
    if the model's scheduler clips), otherwise the network's,
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (or its v / x_0 form): nothing is spent on it unread."""

    step: int  # 0 .. num_steps - 1, the network evaluation this is
    num_steps: int  # the sampler's NFE per image (Sampler.nfe)
    t: float  # the timestep the network was given (fractional for Karras sigmas)
    indices: Sequence[int]  # the images of this batch (global indices: image i depends only on (seed, i))
    x_t: torch.Tensor  # B x C x H x W
    _pred_x0: torch.Tensor | None = field(default=None, repr=False)
    _compute_pred_x0: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def pred_x0(self) -> torch.Tensor:
        if self._pred_x0 is None:
            self._pred_x0 = self._compute_pred_x0()
        return self._pred_x0


def network_x0(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """The x_0 the network predicts from x_t at timestep t, from its mean output (eps, v or x_0, the model's
    `prediction_type`), Ho et al. (2020) Eq. 15 and its v / x_0 forms. abar_t of a fractional t (Karras sigmas)
    is interpolated in log sigma, as diffusers' schedulers place such a t."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "sample":
        return model_output
    abar = scheduler.alphas_cumprod.double()
    low = min(int(math.floor(t)), len(abar) - 1)
    if t == low:
        abar_t = float(abar[low])
    else:  # sigma = sqrt((1 - abar) / abar) interpolated in log space between the two integer timesteps
        log_sigma = 0.5 * torch.log((1 - abar) / abar)
        weight = t - low
        abar_t = float(torch.sigmoid(-2 * ((1 - weight) * log_sigma[low] + weight * log_sigma[low + 1])))
    if prediction_type == "epsilon":
        return (x_t - math.sqrt(1 - abar_t) * model_output) / math.sqrt(abar_t)
    if prediction_type == "v_prediction":
        return math.sqrt(abar_t) * x_t - math.sqrt(1 - abar_t) * model_output
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample.")


def check_labels_fit(unet, class_labels, guidance_scale: float) -> int | None:
    """K, the classes of a class-conditional `unet` (None: unconditional, which takes no labels and no guidance)."""
    classes = num_classes(unet)
    if classes is None and (class_labels is not None or guidance_scale != 1.0):
        raise UserError("class labels and guidance need a class-conditional model, but this one is unconditional.")
    return classes


class ReverseProcess:
    """The reverse process of `sampler` for the images `indices` of `seed`, one batch: iterate it to run it (one
    `ReverseStep` per network evaluation), then `x_0` (model range, on the device) and `images()` hold the result.

        process = ReverseProcess(unet, make_sampler(pipeline.scheduler, "ddim", 50), seed=0, indices=range(4))
        for state in process:
            if state.step % 10 == 0:
                show(state.x_t, state.pred_x0)
        grid = process.images()  # uint8: what `ddpm-hf sample --scheduler ddim --steps 50 --seed 0 --num_images 4` makes

    Image i depends only on (seed, i): its x_T and every noise a stochastic sampler adds come from its own CPU
    generator (`distributed.item_generators`), whatever the batch it is in. A class-conditional UNet makes image i
    of class `class_labels[k]` (k its place in `indices`; default: class i mod K, as `generate_images`) with
    classifier-free guidance scale `guidance_scale`. `autocast_dtype` (e.g. torch.bfloat16) runs the UNet under
    autocast; the sampler's arithmetic stays in the UNet's parameter dtype. The caller sets eval mode.

    No step reads a value of the device on the host: the scheduler gets its timesteps on the CPU and the network
    its own device copy, so the host queues the next network call while the device computes. The one exception
    is DDPM's noise, which diffusers' DDPMScheduler draws from the images' CPU generators inside `step` and copies
    to the device: the host draws it while the network runs, and waits only for that copy. (UniPCMultistepScheduler's
    step also copies a few coefficients to the device, in diffusers' code.)
    """

    def __init__(
        self,
        unet,
        sampler: Sampler,
        seed: int,
        indices: Sequence[int],
        class_labels: Sequence[int] | None = None,
        guidance_scale: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
    ):
        classes = check_labels_fit(unet, class_labels, guidance_scale)
        if classes is not None and class_labels is None:
            class_labels = [i % classes for i in indices]  # conditioning.balanced_labels: image i is of class i mod K
        if class_labels is not None and len(class_labels) != len(indices):
            raise ValueError(f"class_labels holds {len(class_labels)} labels for {len(indices)} images: give one per image.")
        self.unet, self.sampler, self.seed, self.indices = unet, sampler, seed, indices
        self.class_labels, self.guidance_scale, self.autocast_dtype = class_labels, guidance_scale, autocast_dtype
        self.x_0: torch.Tensor | None = None

    @torch.no_grad()  # on a generator: grad mode is off while it runs, and back as it was while the caller holds a step
    def __iter__(self) -> Iterator[ReverseStep]:
        from .distributed import item_generators

        unet, sampler, scheduler = self.unet, self.sampler, self.sampler.scheduler
        parameter = next(unet.parameters())
        device, dtype = parameter.device, parameter.dtype
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = unet.config.in_channels
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else contextlib.nullcontext()
        generators = item_generators(self.seed, self.indices)
        step_arguments = {"generator": generators} if sampler.stochastic else {"eta": 0.0} if sampler.name == "ddim" else {}
        labels = torch.tensor(self.class_labels).to(device) if self.class_labels is not None else None

        scheduler.set_timesteps(sampler.steps)  # on the CPU: step() then reads no device value; also resets multistep state
        if hasattr(scheduler, "set_begin_index"):  # the chain starts at the first timestep: no search for it, which
            scheduler.set_begin_index(0)  # picks the second of two equal timesteps (Karras sigmas on a cosine schedule)
        network_timesteps = scheduler.timesteps.to(device)  # one copy per batch; a 0-d device tensor per call keeps a compiled UNet's graph
        x = torch.cat([torch.randn((1, channels, height, width), generator=g) for g in generators]).to(device, dtype)
        x = x * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            with autocast:
                t_in = network_timesteps[k]
                model_output = unet(x_in, t_in).sample if labels is None else guided_model_output(unet, x_in, t_in, labels, self.guidance_scale)
                model_output = model_output.to(dtype)
            mean = model_output[:, :channels]  # a learned-variance UNet's 2C channels: mean part, then variance
            output = scheduler.step(model_output if sampler.reads_variance else mean, t, x, **step_arguments)
            x0 = getattr(output, "pred_original_sample", None)
            yield ReverseStep(
                k, len(scheduler.timesteps), float(t), self.indices, x_in, x0,
                (lambda mean=mean, x_in=x_in, t=float(t): network_x0(scheduler, mean, x_in, t)) if x0 is None else None,
            )  # fmt: skip
            x = output.prev_sample
        self.x_0 = x

    def images(self) -> torch.Tensor:
        """The result as uint8 B x C x H x W on the CPU, quantised as a PNG would be."""
        if self.x_0 is None:
            raise RuntimeError("iterate the ReverseProcess first: it has not run yet.")
        return ((self.x_0.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def generate_images(
    unet,
    sampler: Sampler,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "Sampling",
    state=None,
    autocast_dtype: torch.dtype | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    on_step: Callable[[ReverseStep], None] | None = None,
) -> Iterator[tuple[range | None, torch.Tensor | None]]:
    """The reverse process of `sampler`, for this process's share of images 0 .. num_images - 1.

    Yields one (indices, images) pair per round (ddpm_hf/distributed.py): uint8 B x C x H x W on the CPU,
    quantised as a PNG would be, or (None, None) when this process has no chunk in that round, so that callers
    may meet the other processes after every round. Image i depends only on (seed, i) (`ReverseProcess`), whatever
    the batch size, the process count or the process that makes it. `state` is an Accelerate PartialState (None:
    one process); `autocast_dtype` e.g. torch.bfloat16 runs the UNet under autocast, the scheduler in float32.
    `unet` is put in eval mode meanwhile. `on_step(ReverseStep)`, if given, sees every network evaluation of every
    batch (x_t and the predicted x_0 of its images) as it happens.

    A class-conditional UNet makes image i of class `class_labels[i]` (default: every class equally often,
    `conditioning.balanced_labels`) with classifier-free guidance scale `guidance_scale` (conditioning.py: one
    forward pass of 2B images per step when it is not 1).
    """
    from tqdm.auto import tqdm

    from .distributed import items_in_round, rounds

    if num_images < 1 or batch_size < 1:
        raise UserError(f"the number of images ({num_images}) and --batch_size ({batch_size}) must be positive.")
    process_index, num_processes = (state.process_index, state.num_processes) if state is not None else (0, 1)
    check_labels_fit(unet, class_labels, guidance_scale)  # here too: a process may have no batch to find out on
    if class_labels is not None and len(class_labels) != num_images:
        raise ValueError(f"class_labels holds {len(class_labels)} labels for {num_images} images: give one per image.")
    was_training = unet.training
    unet.eval()
    try:
        with tqdm(total=num_images, desc=desc, unit="img", disable=not progress or process_index != 0) as bar:
            for round_index, indices in enumerate(rounds(num_images, batch_size, process_index, num_processes)):
                if indices is None:
                    yield None, None
                    continue
                labels = [class_labels[i] for i in indices] if class_labels is not None else None
                process = ReverseProcess(unet, sampler, seed, indices, labels, guidance_scale, autocast_dtype)
                for step in process:
                    if on_step is not None:
                        on_step(step)
                yield indices, process.images()
                bar.update(items_in_round(num_images, batch_size, num_processes, round_index))
    finally:
        unet.train(was_training)


SAMPLING_GOES_ON = "sampling goes on without compiling, which is slower."


def compile_for_sampling(unet, backend="inductor", mode: str | None = None):
    """`torch.compile(unet, backend=backend, mode=mode)` for sampling, falling back to `unet` itself (eager) with a
    warning if compiling fails: no Triton or C++ compiler, an unsupported platform, a Dynamo or backend error.

    torch.compile works at the first call, so the returned module catches the failure there (and at any later
    recompilation) and from then on runs `unet` eagerly. Only compilation failures fall back: an out-of-memory
    error is raised as itself, and an error of the model (a wrong input, say) as Dynamo reports it. The module
    reads like `unet` (`config`, `parameters()`, `eval()`) for `generate_images` and its callers."""
    try:
        compiled = torch.compile(unet, backend=backend, mode=mode)
    except RuntimeError as error:  # e.g. a Python version Dynamo does not support yet
        warn_compile_failed(error, SAMPLING_GOES_ON)
        return unet
    return CompiledOrEager(unet, compiled)


class CompiledOrEager(torch.nn.Module):
    """`compiled` (torch.compile of `unet`) until compiling fails, then `unet`: see `compile_for_sampling`."""

    def __init__(self, unet, compiled):
        super().__init__()
        self.unet, self.compiled = unet, compiled

    @property
    def config(self):
        return self.unet.config

    def forward(self, *args, **kwargs):
        from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, InvalidBackend, Unsupported

        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except (BackendCompilerFailed, InternalTorchDynamoError, InvalidBackend, Unsupported) as error:
                out_of_memory = out_of_memory_in(error)
                if out_of_memory is not None:
                    raise out_of_memory from None
                warn_compile_failed(error, SAMPLING_GOES_ON)
                self.compiled = None
        return self.unet(*args, **kwargs)


def to_pil(images_uint8: torch.Tensor) -> list:
    """uint8 N x C x H x W -> PIL images."""
    from PIL import Image

    array = images_uint8.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a) for a in array]


def gather_images(unet, sampler: Sampler, num_images: int, seed: int, batch_size: int, state=None, **options) -> torch.Tensor | None:
    """All `num_images` images, uint8 N x C x H x W in index order, on the main process (None on the others);
    every process samples its share (`generate_images`)."""
    from .distributed import gather_objects

    parts = []
    for indices, images in generate_images(unet, sampler, num_images, seed, batch_size, state=state, **options):
        gathered = gather_objects((indices, images), state) if state is not None else [(indices, images)]
        parts += [part for part in gathered if part[0] is not None]
    if state is not None and not state.is_main_process:
        return None
    return torch.cat([images for _, images in sorted(parts, key=lambda part: part[0].start)])


def sample_grid(unet, scheduler, num_images: int, steps: int, seed: int, sampler: str = "auto", batch_size: int | None = None, state=None):
    """A PIL grid of `num_images` samples from `unet` with a fixed seed (the training grids), on the main process.
    A class-conditional UNet gets one row per class, class 0 at the top, of ceil(num_images / K) images each."""
    from diffusers.utils import make_image_grid

    chosen = make_sampler(scheduler, sampler, steps)
    classes, labels = num_classes(unet), None
    shape = grid_shape(num_images)
    if classes is not None:
        per_class = math.ceil(num_images / classes)
        num_images, shape = classes * per_class, (classes, per_class)
        labels = labels_in_blocks(range(classes), num_images)
    processes = state.num_processes if state is not None else 1
    images = gather_images(unet, chosen, num_images, seed, batch_size or math.ceil(num_images / processes), state=state, class_labels=labels)
    return None if images is None else make_image_grid(to_pil(images), *shape)


def grid_shape(num_images: int) -> tuple[int, int]:
    rows = int(math.sqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def load_pipeline(model: str, scheduler: str = "ddpm", device: str | None = None, revision: str | None = None, steps: int | None = None):
    """A stock diffusers pipeline from a folder or Hub id, its scheduler replaced by `make_sampler(scheduler)`:
    `DDPMPipeline` for ddpm and dpmsolver, `DDIMPipeline` for ddim (which passes eta)."""
    from diffusers import DDIMPipeline, DDPMPipeline

    if scheduler not in SAMPLER_CHOICES:
        raise UserError(f"--scheduler {scheduler}: unknown sampler. Choose one of: {', '.join(SAMPLER_CHOICES)}.")
    if os.path.isdir(model) and not RunFolder(model).has_pipeline():
        raise UserError(f"--model {model} is a folder but not a saved pipeline (no model_index.json). Point it at a training OUTPUT_DIR.")
    if not os.path.isdir(model) and not is_hub_id(model):
        raise UserError(f"--model {model}: no such folder. Give a training OUTPUT_DIR or a Hub id like user/name.")
    try:
        index = DDPMPipeline.load_config(model, revision=revision)
        if is_conditional_index(index):
            # Its model_index.json names the custom pipeline file; here only its parts are needed, no code from the repo.
            from diffusers import DDPMScheduler, UNet2DModel

            unet = UNet2DModel.from_pretrained(model, subfolder="unet", revision=revision, use_safetensors=True)
            pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision))
        else:
            pipeline = DDPMPipeline.from_pretrained(model, revision=revision, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: could not load a pipeline ({str(e).splitlines()[0]}). Give a training OUTPUT_DIR or a Hub id.") from None
    if scheduler != "ddpm" or steps is not None:
        chosen = make_sampler(pipeline.scheduler, scheduler, steps)
        if chosen.name not in STOCK_PIPELINE_SAMPLERS:
            raise UserError(
                f"the stock DDPMPipeline cannot run {chosen.name}: it neither scales the model input nor passes only the arguments this "
                f"scheduler's step takes. Use `ddpm-hf sample --scheduler {chosen.name}` (ddpm_hf.sampling.ReverseProcess) or the custom pipeline "
                "ddpm_trajectory.py."
            )
        if chosen.name != "ddpm" and pipeline.unet.config.out_channels == 2 * pipeline.unet.config.in_channels:
            raise UserError(
                f"the stock pipelines cannot run {chosen.name} on a learned-variance model (its UNet has 2C output channels). "
                "Use `ddpm-hf sample --scheduler ...` or the uploaded custom pipeline ddpm_trajectory.py."
            )
        pipeline_class = DDIMPipeline if chosen.name == "ddim" else DDPMPipeline
        pipeline = pipeline_class(unet=pipeline.unet, scheduler=chosen.scheduler)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipeline.to(device)


def model_class_names(model: str, revision: str | None = None) -> list[str] | None:
    """The class names of a class-conditional pipeline (folder or Hub id), from its model_index.json's id2label."""
    from diffusers import DDPMPipeline

    return class_names_of(DDPMPipeline.load_config(model, revision=revision))


def run_sample(args) -> None:
    """`ddpm-hf sample`, on every process of a torchrun / `accelerate launch` run: each samples its share, the main
    process writes the grid (and the single images)."""
    import time

    from diffusers.utils import make_image_grid

    from .distributed import process_device, process_state

    started = time.time()
    state = process_state(args.device, args.ddp_timeout)
    device = str(process_device(args.device, state))
    with state.main_process_first():  # a Hub download happens once
        pipeline = load_pipeline(args.model, device=device, revision=args.revision)
    sampler = sampler_from_arguments(pipeline.scheduler, args)
    guidance_scale = check_guidance(pipeline.unet, args.guidance_scale, args.class_labels)
    labels, shape, chosen_classes = None, grid_shape(args.num_images), ""
    classes = num_classes(pipeline.unet)
    if classes is not None:  # the classes share the images in blocks, one row per class when they divide evenly
        names = model_class_names(args.model, args.revision)
        ids = class_ids(args.class_labels.split(",") if args.class_labels else range(classes), classes, names)
        if args.num_images < len(ids):
            raise UserError(f"--num_images {args.num_images} is fewer than the {len(ids)} classes asked for: give at least {len(ids)}, one per class.")
        labels = labels_in_blocks(ids, args.num_images)
        if args.num_images % len(ids) == 0:
            shape = (len(ids), args.num_images // len(ids))
        shown = [names[i] if names else str(i) for i in dict.fromkeys(ids)]
        chosen_classes = f", classes {','.join(shown)}, guidance scale {guidance_scale:g}"
    unet = compile_for_sampling(pipeline.unet) if args.compile else pipeline.unet
    batch_size = args.batch_size or math.ceil(args.num_images / state.num_processes)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    images = gather_images(
        unet, sampler, args.num_images, args.seed, batch_size, state=state, autocast_dtype=autocast_dtype, progress=True,
        class_labels=labels, guidance_scale=guidance_scale,
    )  # fmt: skip
    if state.is_main_process:
        pictures = to_pil(images)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        make_image_grid(pictures, *shape).save(args.out)
        if args.save_individual:
            stem = os.path.splitext(args.out)[0]
            os.makedirs(stem, exist_ok=True)
            for i, picture in enumerate(pictures):
                picture.save(os.path.join(stem, f"{i:05d}.png"))
        processes = f"{state.num_processes} process{'es' if state.num_processes > 1 else ''}"
        print(
            f"wrote {args.out} ({args.num_images} images{chosen_classes}, {sampler.describe()}, seed {args.seed}, {processes}, {time.time() - started:.0f} s)"
        )
    leave_process_group()


def add_sampler_arguments(parser, steps_help: str) -> None:
    """The options of `make_sampler`, for every command that samples: --scheduler, --steps, --timestep_spacing,
    --solver_order and --karras_sigmas (read back by `sampler_from_arguments`)."""
    names = ", ".join(f"{name} ({kind.title})" for name, kind in SAMPLER_KINDS.items())
    parser.add_argument("--scheduler", default="ddpm", choices=SAMPLER_CHOICES, help=f"The sampler: {names}; or auto ({AUTO_RULE}).")
    parser.add_argument("--steps", type=bounded(int, ge=1), default=None, help=steps_help)
    parser.add_argument("--timestep_spacing", default=None, choices=TIMESTEP_SPACINGS, help="Which K of the T timesteps (default: the model's).")
    parser.add_argument(
        "--solver_order", type=bounded(int, ge=1), default=None, help="Order of the multistep solvers dpmsolver, unipc and deis: 1 to 3 (default 2)."
    )
    parser.add_argument(
        "--karras_sigmas",
        default=None,
        choices=["yes", "no"],
        help="Karras et al. (2022)'s noise levels, sigma(T-1) to sigma(0) with rho = 7: euler and heun use them unless 'no'; "
        "dpmsolver, unipc and deis with 'yes'.",
    )


def sampler_from_arguments(scheduler, args, steps: int | None = None) -> Sampler:
    """`make_sampler` with the options `add_sampler_arguments` added (`steps` overrides --steps)."""
    karras = None if args.karras_sigmas is None else args.karras_sigmas == "yes"
    return make_sampler(scheduler, args.scheduler, steps or args.steps, args.timestep_spacing, args.solver_order, karras)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="Generate a grid of images from a saved pipeline (folder or Hub id).")
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR or Hub id (user/name).")
    parser.add_argument("--num_images", type=bounded(int, ge=1), default=16)
    add_sampler_arguments(parser, steps_help=f"Denoising steps K of the sampler (default: T for ddpm; the others need it, {STEPS_HINT}).")
    parser.add_argument("--seed", type=bounded(int, ge=0), default=0)
    parser.add_argument(
        "--class_labels",
        default=None,
        help="Class-conditional models: comma-separated class names or ids, e.g. cat,dog or 3,5; they share --num_images in order, "
        "one row each (default: every class).",
    )
    parser.add_argument(
        "--guidance_scale",
        type=bounded(float, ge=0),
        default=None,
        help="Class-conditional models: classifier-free guidance scale s = 1 + w (Ho & Salimans' w): 1 is plain conditional sampling "
        "(the default), 0 unconditional, larger values follow the class more closely.",
    )
    parser.add_argument("--batch_size", type=bounded(int, ge=1), default=None, help="Images per forward pass (default: all at once).")
    parser.add_argument("--out", type=output_file, default="samples.png", help="Where to write the grid (PNG).")
    parser.add_argument("--save_individual", action="store_true", help="Also write each image into a folder named after --out.")
    parser.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: run the UNet under bf16 autocast (GPUs; the chain stays float32).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet first (pays off for thousands of images on a GPU).")
    parser.add_argument("--ddp_timeout", type=bounded(int, ge=1), default=DEFAULT_TIMEOUT_S, help="Seconds a process waits for the others before all exit.")
    parser.set_defaults(func=run_sample)
