"""Tests for the Hub-uploadable class-conditional pipeline with classifier-free guidance,
pipelines/ddpm_class_conditional.py.

The pipeline is loaded the way users load it, through
`DiffusionPipeline.from_pretrained(..., custom_pipeline=..., trust_remote_code=True)`, with tiny random UNets whose
`num_class_embeds` is K + 1 (the last id is the null label). The references below are sampling loops written here from
the paper's formula (Ho & Salimans 2022): eps = (1 + w) eps(x, c) - w eps(x, null), with w = guidance_scale - 1, using
two separate UNet calls.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "ddpm_class_conditional.py"
NAMES = ["cat", "dog", "cow"]
K, C, SIZE = len(NAMES), 3, 8
NULL = K  # the null ("no label") class id: num_class_embeds - 1
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _unet(out_channels: int = C, num_class_embeds: int | None = K + 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=C,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    ).eval()
    if out_channels == 2 * C:
        with torch.no_grad():  # a variance part clearly away from 0, so that how it is used shows in the images
            unet.conv_out.bias[C:] = 0.7
    return unet


def _gens(seeds) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _save_conditional(path: Path, unet: UNet2DModel, scheduler, class_names=NAMES) -> Path:
    """A conditional model folder as the training side can write it: a stock DDPMPipeline folder whose
    model_index.json carries the class names as a top-level "id2label" entry (DiTPipeline's convention)."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    if class_names is not None:
        index = json.loads((path / "model_index.json").read_text())
        index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
        (path / "model_index.json").write_text(json.dumps(index))
    return path


def _load(path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    return _save_conditional(tmp_path_factory.mktemp("cond"), _unet(), DDPMScheduler(num_train_timesteps=100))


@pytest.fixture(scope="module")
def loaded(saved_dir):
    return _load(saved_dir)


@pytest.fixture(scope="module")
def pipeline_class(loaded):
    return type(loaded)


def _pipe(pipeline_class, unet, scheduler, class_names=NAMES):
    pipe = pipeline_class(unet=unet, scheduler=scheduler, id2label=dict(enumerate(class_names)) if class_names is not None else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _ForwardCounter:
    """Records the batch size and class labels of every UNet forward."""

    def __init__(self, unet):
        self.calls: list[tuple[int, list[int]]] = []
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        labels = kwargs.get("class_labels")
        self.calls.append((sample.shape[0], None if labels is None else labels.tolist()))

    def remove(self):
        self._handle.remove()


@torch.no_grad()
def _reference(unet, scheduler, ids, seeds, guidance_scale=1.0, steps=STEPS, eta=None, scheduler_gets="auto", variance_from="cond"):
    """Independent sampling loop: initial noise of image i from generator i, two UNet calls (cond, null) per step when
    guided, guidance in the paper's form with w = guidance_scale - 1.

    scheduler_gets: "mean" gives the scheduler the first C channels, "all" the whole (2C-channel) output.
    variance_from: which pass's variance channels a learned-variance output keeps ("cond" or "uncond").
    """
    gens = _gens(seeds)
    x = torch.cat([torch.randn((1, C, SIZE, SIZE), generator=g) for g in gens]) * scheduler.init_noise_sigma
    labels = torch.tensor(ids)
    nulls = torch.full_like(labels, NULL)
    w = guidance_scale - 1.0
    scheduler.set_timesteps(steps)
    step_kw = {"generator": gens}
    if eta is not None:
        step_kw["eta"] = eta
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        cond = unet(x_in, t, class_labels=labels).sample
        if guidance_scale == 1.0:
            out = cond
        else:
            uncond = unet(x_in, t, class_labels=nulls).sample
            mean = (1 + w) * cond[:, :C] - w * uncond[:, :C]
            variance = (cond if variance_from == "cond" else uncond)[:, C:]
            out = torch.cat([mean, variance], dim=1)
        if scheduler_gets == "mean":
            out = out[:, :C]
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------- loading and config


def test_loads_custom_class_from_local_file(loaded):
    assert type(loaded).__name__ == "DDPMClassConditionalPipeline"
    assert type(loaded).__module__.startswith("diffusers_modules.")  # loaded as a dynamic module, not imported
    assert isinstance(loaded.unet, UNet2DModel) and isinstance(loaded.scheduler, DDPMScheduler)
    assert set(loaded.components) == {"unet", "scheduler"}
    assert loaded.class_names == NAMES and loaded.config.id2label == {str(i): name for i, name in enumerate(NAMES)}
    assert loaded.num_classes == K and loaded.null_class_id == NULL


def test_local_custom_code_needs_trust_remote_code(saved_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline=str(PIPELINE_FILE))


def test_class_names_round_trip_through_model_index(loaded, tmp_path):
    """class_names are a pipeline config entry: save_pretrained writes them in model_index.json, from_pretrained
    passes them back."""
    loaded.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["id2label"] == {str(i): name for i, name in enumerate(NAMES)}
    assert index["_class_name"] == "DDPMClassConditionalPipeline"
    again = _load(tmp_path / "saved")
    assert again.class_names == NAMES

    # changed names are saved too, and None removes them
    loaded2 = type(loaded)(**loaded.components, **loaded.parameters)
    loaded2.set_class_names(["a", "b", "c"])
    loaded2.save_pretrained(tmp_path / "renamed")
    assert _load(tmp_path / "renamed").class_names == ["a", "b", "c"]
    loaded2.set_class_names(None)
    loaded2.save_pretrained(tmp_path / "unnamed")
    assert _load(tmp_path / "unnamed").class_names is None
    assert loaded.class_names == NAMES  # the other pipeline is untouched


def test_folder_without_class_names_takes_ids(tmp_path):
    pipe = _load(_save_conditional(tmp_path / "m", _unet(), DDPMScheduler(num_train_timesteps=100), class_names=None))
    assert pipe.class_names is None
    assert pipe([2, 0], num_inference_steps=2, output_type="np").images.shape == (2, SIZE, SIZE, C)
    with pytest.raises(ValueError, match="no class names"):
        pipe(["cat"], num_inference_steps=2)


def test_file_shipped_inside_repo_folder_loads_by_name(saved_dir, tmp_path):
    """The layout for a Hub repo: the .py at the repo root, selected by file stem or by model_index.json."""
    repo = tmp_path / "repo"
    shutil.copytree(saved_dir, repo)
    shutil.copy(PIPELINE_FILE, repo / "ddpm_class_conditional.py")

    by_name = DiffusionPipeline.from_pretrained(repo, custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    assert type(by_name).__name__ == "DDPMClassConditionalPipeline" and by_name.class_names == NAMES

    index = json.loads((repo / "model_index.json").read_text())
    index["_class_name"] = ["ddpm_class_conditional", "DDPMClassConditionalPipeline"]
    (repo / "model_index.json").write_text(json.dumps(index))
    by_index = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
    assert type(by_index).__name__ == "DDPMClassConditionalPipeline" and by_index.class_names == NAMES


def test_stock_ddpm_pipeline_of_unconditional_folder_is_unaffected(pipeline_class, tmp_path):
    """With the custom module loaded, diffusers' own DDPMPipeline still loads and samples an unconditional model
    exactly as before; and this pipeline refuses that model with a clear error."""
    unet = _unet(num_class_embeds=None)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "uncond")

    stock = DDPMPipeline.from_pretrained(tmp_path / "uncond")
    assert type(stock) is DDPMPipeline
    stock.set_progress_bar_config(disable=True)
    direct = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
    direct.set_progress_bar_config(disable=True)
    got = stock(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    expected = direct(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    np.testing.assert_array_equal(got, expected)

    with pytest.raises(ValueError, match="num_class_embeds"):
        _load(tmp_path / "uncond")
    with pytest.raises(ValueError, match="not class-conditional"):
        pipeline_class(unet=unet, scheduler=scheduler)


# ---------------------------------------------------------------- labels


def test_names_and_ids_are_equivalent(loaded):
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    by_id = loaded([0, 2, 1], generator=_gens([1, 2, 3]), **kw).images
    by_name = loaded(["cat", "cow", "dog"], generator=_gens([1, 2, 3]), **kw).images
    mixed = loaded(["cat", 2, "dog"], generator=_gens([1, 2, 3]), **kw).images
    as_tensor = loaded(torch.tensor([0, 2, 1]), generator=_gens([1, 2, 3]), **kw).images
    torch.testing.assert_close(by_name, by_id, rtol=0, atol=0)
    torch.testing.assert_close(mixed, by_id, rtol=0, atol=0)
    torch.testing.assert_close(as_tensor, by_id, rtol=0, atol=0)
    # a single label, name or id
    single = loaded("cow", generator=_gens([2]), **kw).images
    torch.testing.assert_close(single, loaded(2, generator=_gens([2]), **kw).images, rtol=0, atol=0)
    assert loaded.class_ids(["dog", 0, np.int64(2)]) == [1, 0, 2]


def test_the_label_changes_the_image(loaded):
    """Same noise, different class: different image (the equivalence above is not vacuous)."""
    kw = dict(num_inference_steps=3, output_type="pt")
    a = loaded(["cat"], generator=_gens([5]), **kw).images
    b = loaded(["dog"], generator=_gens([5]), **kw).images
    assert not torch.allclose(a, b, atol=1e-3)


def test_unknown_name_and_out_of_range_ids_raise(loaded):
    with pytest.raises(ValueError, match=r"Unknown class name 'zebra'.*\['cat', 'dog', 'cow'\]"):
        loaded(["cat", "zebra"], num_inference_steps=1)
    for bad in (K, -1, 10):  # K is the null label, not a class
        with pytest.raises(ValueError, match=rf"Class id {bad} is out of range.*ids 0\.\.{K - 1}"):
            loaded([0, bad], num_inference_steps=1)
    with pytest.raises(ValueError, match="int \\(class id\\) or a str"):
        loaded([1.5], num_inference_steps=1)
    with pytest.raises(ValueError, match="empty"):
        loaded([], num_inference_steps=1)


def test_class_names_are_checked(pipeline_class, loaded):
    with pytest.raises(ValueError, match="exactly the class ids 0..2"):
        pipeline_class(unet=loaded.unet, scheduler=loaded.scheduler, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    with pytest.raises(ValueError, match="distinct"):
        pipeline_class(unet=loaded.unet, scheduler=loaded.scheduler, id2label={0: "a", 1: "b", 2: "a"})
    with pytest.raises(ValueError, match="exactly the class ids 0..2"):
        pipeline_class(unet=loaded.unet, scheduler=loaded.scheduler, id2label={0: "a", 1: "b", 3: "c"})
    with pytest.raises(ValueError, match="exactly one name per class"):
        loaded.set_class_names(["a", "b", "c", "d"])
    assert loaded.class_names == NAMES


def test_num_images_per_label_and_generator_list(pipeline_class, loaded):
    pipe = _pipe(pipeline_class, loaded.unet, DDPMScheduler.from_config(loaded.scheduler.config))
    counter = _ForwardCounter(pipe.unet)
    try:
        out = pipe(["cat", "cow"], num_images_per_label=2, guidance_scale=1.0, num_inference_steps=2, generator=_gens([0, 1, 2, 3]), output_type="pt")
    finally:
        counter.remove()
    assert out.images.shape == (4, C, SIZE, SIZE)
    assert counter.calls == [(4, [0, 0, 2, 2])] * 2
    with pytest.raises(ValueError, match="one per image"):
        pipe(["cat", "cow"], num_images_per_label=2, num_inference_steps=1, generator=_gens([0, 1]))


def test_per_image_generators_make_images_independent_of_the_batch(loaded):
    """Image i depends only on generator i: the same image alone or within a batch."""
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    batch = loaded(["cat", "dog", "cow"], generator=_gens([7, 8, 9]), **kw).images
    alone = loaded(["dog"], generator=_gens([8]), **kw).images
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- guidance


def test_guidance_scale_one_is_plain_conditional_sampling_with_one_pass_of_batch_b(pipeline_class, loaded):
    unet, config = loaded.unet, loaded.scheduler.config
    pipe = _pipe(pipeline_class, unet, DDPMScheduler.from_config(config))
    counter = _ForwardCounter(unet)
    try:
        got = pipe(["dog", "cat"], guidance_scale=1.0, num_inference_steps=STEPS, generator=_gens([3, 4]), output_type="pt").images
    finally:
        counter.remove()
    assert counter.calls == [(2, [1, 0])] * STEPS
    expected = _reference(unet, DDPMScheduler.from_config(config), [1, 0], [3, 4], guidance_scale=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


SCHEDULERS = {
    "ddpm": (DDPMScheduler, None),
    "ddim": (DDIMScheduler, 0.0),
    "ddim_eta1": (DDIMScheduler, 1.0),
    "dpmsolver++": (DPMSolverMultistepScheduler, None),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_guidance_matches_two_pass_formula_with_one_batched_forward(pipeline_class, loaded, name):
    scheduler_cls, eta = SCHEDULERS[name]
    unet, config = loaded.unet, loaded.scheduler.config
    pipe = _pipe(pipeline_class, unet, scheduler_cls.from_config(config))
    ids, seeds = [2, 0, 1], [11, 12, 13]
    counter = _ForwardCounter(unet)
    try:
        got = pipe(ids, guidance_scale=3.0, num_inference_steps=STEPS, generator=_gens(seeds), eta=eta or 0.0, output_type="pt").images
    finally:
        counter.remove()
    # exactly one UNet forward per step, of batch 2B: the class ids, then B null ids
    assert counter.calls == [(6, ids + [NULL] * 3)] * STEPS

    expected = _reference(unet, scheduler_cls.from_config(config), ids, seeds, guidance_scale=3.0, eta=eta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # guidance changes the images (the comparison is not vacuous)
    unguided = _reference(unet, scheduler_cls.from_config(config), ids, seeds, guidance_scale=1.0, eta=eta)
    assert not torch.allclose(got, unguided, atol=1e-3)


def test_guidance_scale_zero_is_unconditional(loaded):
    """s = 0 (w = -1) keeps only the null-label prediction: the class no longer matters."""
    kw = dict(guidance_scale=0.0, num_inference_steps=3, output_type="pt")
    a = loaded(["cat"], generator=_gens([4]), **kw).images
    b = loaded(["cow"], generator=_gens([4]), **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- learned variance


@pytest.fixture(scope="module")
def learned_unet():
    return _unet(out_channels=2 * C)


def _learned_config():
    return DDPMScheduler(num_train_timesteps=100, variance_type="learned_range").config


def test_learned_variance_ddpm_guides_mean_and_keeps_conditional_variance(pipeline_class, learned_unet):
    config = _learned_config()
    pipe = _pipe(pipeline_class, learned_unet, DDPMScheduler.from_config(config))
    ids, seeds = [0, 2], [21, 22]
    got = pipe(ids, guidance_scale=3.0, num_inference_steps=STEPS, generator=_gens(seeds), output_type="pt").images
    expected = _reference(learned_unet, DDPMScheduler.from_config(config), ids, seeds, guidance_scale=3.0, scheduler_gets="all")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the variance channels matter: the null pass's variance, or a fixed variance, give other images
    other_variance = _reference(learned_unet, DDPMScheduler.from_config(config), ids, seeds, guidance_scale=3.0, scheduler_gets="all", variance_from="uncond")
    fixed_config = DDPMScheduler.from_config(config, variance_type="fixed_small").config
    fixed = _reference(learned_unet, DDPMScheduler.from_config(fixed_config), ids, seeds, guidance_scale=3.0, scheduler_gets="mean")
    assert not torch.allclose(got, other_variance, atol=1e-4)
    assert not torch.allclose(got, fixed, atol=1e-4)

    # unguided: the conditional output, all 2C channels
    got1 = pipe(ids, guidance_scale=1.0, num_inference_steps=STEPS, generator=_gens(seeds), output_type="pt").images
    expected1 = _reference(learned_unet, DDPMScheduler.from_config(config), ids, seeds, guidance_scale=1.0, scheduler_gets="all")
    torch.testing.assert_close(got1, expected1, rtol=1e-5, atol=1e-5)

    # a fixed-variance DDPM scheduler samples from the guided mean alone
    pipe.scheduler = DDPMScheduler.from_config(fixed_config)
    got_fixed = pipe(ids, guidance_scale=3.0, num_inference_steps=STEPS, generator=_gens(seeds), output_type="pt").images
    torch.testing.assert_close(got_fixed, fixed, rtol=1e-5, atol=1e-5)


def test_learned_range_scheduler_with_fixed_variance_unet_raises(pipeline_class, loaded):
    pipe = _pipe(pipeline_class, loaded.unet, DDPMScheduler.from_config(_learned_config()))
    with pytest.raises(ValueError, match="fixed_small"):
        pipe(["cat"], num_inference_steps=1)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_learned_variance_other_schedulers_get_the_guided_mean(pipeline_class, learned_unet, scheduler_cls):
    """DDIM has no learned variance: it gets the first C channels. DPM-Solver++ built from a learned_range config
    drops the variance itself; the pipeline gives it the first C channels, which is the same."""
    config = _learned_config()
    pipe = _pipe(pipeline_class, learned_unet, scheduler_cls.from_config(config))
    ids, seeds = [1, 2], [31, 32]
    counter = _ForwardCounter(learned_unet)
    try:
        got = pipe(ids, guidance_scale=3.0, num_inference_steps=STEPS, generator=_gens(seeds), output_type="pt").images
    finally:
        counter.remove()
    assert counter.calls == [(4, ids + [NULL] * 2)] * STEPS
    expected = _reference(learned_unet, scheduler_cls.from_config(config), ids, seeds, guidance_scale=3.0, scheduler_gets="mean")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if scheduler_cls is DPMSolverMultistepScheduler:
        assert pipe.scheduler.config.variance_type == "learned_range"
        whole = _reference(learned_unet, scheduler_cls.from_config(config), ids, seeds, guidance_scale=3.0, scheduler_gets="all")
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- output


def test_output_types(loaded):
    kw = dict(class_labels=["cat", "dog"], num_inference_steps=2, guidance_scale=2.0)
    pil = loaded(generator=_gens([0, 1]), output_type="pil", **kw).images
    arr = loaded(generator=_gens([0, 1]), output_type="np", **kw).images
    pt = loaded(generator=_gens([0, 1]), output_type="pt", **kw).images
    default = loaded(generator=_gens([0, 1]), **kw).images

    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (SIZE, SIZE) and im.mode == "RGB" for im in pil + default)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, SIZE, SIZE, C) and arr.dtype == np.float32
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, C, SIZE, SIZE)
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))

    tup = loaded(generator=_gens([0, 1]), output_type="np", return_dict=False, **kw)
    assert isinstance(tup, tuple) and len(tup) == 1
    np.testing.assert_array_equal(tup[0], arr)

    with pytest.raises(ValueError, match="output_type"):
        loaded(output_type="latent", **kw)


def test_caller_latents(loaded):
    pipe = type(loaded)(**loaded.components, **loaded.parameters)
    pipe.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = _gens([5, 6])
    latents = torch.cat([torch.randn((1, C, SIZE, SIZE), generator=x) for x in g])
    from_latents = pipe(["cat", "dog"], guidance_scale=2.0, latents=latents, num_inference_steps=3, output_type="pt").images
    from_gens = pipe(["cat", "dog"], guidance_scale=2.0, generator=_gens([5, 6]), num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(from_latents, from_gens, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\)"):
        pipe(["cat", "dog"], latents=latents[:1], num_inference_steps=1)


def test_stock_diffusers_loads_a_saved_conditional_folder_without_a_warning(tmp_path):
    """Issue 24 item 5: diffusers checks every init argument against the pipeline's annotation, and read
    `dict[int | str, str]` as not matching the id2label of model_index.json ("Expected types for id2label ...")."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    from ddpm_hf.conditioning import make_conditional_pipeline_folder

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    folder = _save_conditional(tmp_path / "model", _unet(), DDPMScheduler(num_train_timesteps=100), class_names=None)
    make_conditional_pipeline_folder(str(folder), NAMES)  # as training saves it: model_index.json names the file beside it
    library_logger, records = logging.getLogger("diffusers"), Records()  # diffusers' loggers do not propagate to the root
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    library_logger.addHandler(records)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    finally:
        library_logger.removeHandler(records)
        diffusers_logging.set_verbosity(verbosity)
    assert type(pipe).__name__ == "DDPMClassConditionalPipeline" and pipe.class_names == NAMES
    assert records.messages == []


@pytest.mark.parametrize("name", ["ddim", "dpmsolver", "unipc", "deis", "euler", "heun"])
def test_every_sampler_guides_a_learned_variance_model_as_the_engine_does(pipeline_class, learned_unet, name):
    """The pipeline with make_sampler's scheduler, per-image generators and guidance makes `ddpm-hf sample`'s images
    (generate_images) for every sampler: the guided mean part goes to every scheduler but DDPM's."""
    from ddpm_hf.distributed import item_generators
    from ddpm_hf.sampling import gather_images, make_sampler

    trained = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range", timestep_spacing="trailing")
    sampler = make_sampler(trained, name, 4, **({} if name in ("euler", "heun") else {"timestep_spacing": "trailing"}))
    labels = [2, 0, 1]
    ours = gather_images(learned_unet, sampler, 3, seed=9, batch_size=3, class_labels=labels, guidance_scale=2.5)
    pipe = _pipe(pipeline_class, learned_unet, type(sampler.scheduler).from_config(sampler.scheduler.config))
    images = pipe(labels, guidance_scale=2.5, num_inference_steps=4, generator=item_generators(9, range(3)), output_type="pt").images
    assert (ours.int() - (images.clamp(0, 1) * 255).round().to(torch.uint8).int()).abs().max() <= 1, name
