"""The model card (ddpm_hf/model_card.py, templates/model_card.md.jinja): every kind of model renders from the one
template, its metadata round-trips through `ModelCard.load`, and the metadata tells the truth: the reference a FID
was measured against, KID and bits/dim, the model a run was fine-tuned from, the size it was trained at."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import ModelCard

import ddpm_hf.model_card as model_card
from ddpm_hf.config import config_from_dict
from ddpm_hf.model_card import build_model_card
from ddpm_hf.models import count_parameters
from ddpm_hf.run_folder import RunFolder
from ddpm_hf.training import save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "cow"]

# eval.json as `ddpm-hf evaluate --kid` against cifar10-test, then `ddpm-hf evaluate --metric nll` write it.
FID_RESULT = {
    "fid": 23.4567,
    "kid": 0.0123,
    "kid_std": 0.001,
    "num_samples": 1000,
    "scheduler": "ddim",
    "steps": 50,
    "nfe": 50,
    "seed": 0,
    "reference": "cifar10-test",
    "reference_details": {"spec": "cifar10-test", "dataset": "uoft-cs/cifar10", "split": "test", "num_images": 10000, "resolution": 32},
}
NLL_RESULT = {
    "bits_per_dim": 3.71234,
    "bits_per_dim_stderr": 0.0123,
    "num_images": 500,
    "dataset": "uoft-cs/cifar10",
    "split": "test",
    "timestep_stride": 1,
    "exact_sum_over_t": True,
    "seed": 0,
}


def make_run(path: Path, kind: str = "plain", evaluated: bool = False, sample_size: int = 16, **options) -> Path:
    """A run folder as training leaves it (training.save_pipeline, training_config.json): `kind` is plain, learned
    (learned_range variances), conditional (3 named classes) or finetuned (--init_from a Hub model)."""
    torch.manual_seed(0)
    conditional = kind == "conditional"
    unet = UNet2DModel(
        sample_size=sample_size,
        out_channels=6 if kind == "learned" else 3,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=len(NAMES) + 1 if conditional else None,
    )
    variance = "learned_range" if kind == "learned" else "fixed_small"
    save_pipeline(unet, DDPMScheduler(num_train_timesteps=100, variance_type=variance), str(path), class_names=NAMES if conditional else None)
    values = {"preset": "quickstart", "resolution": 16, "output_dir": str(path), "variance_type": variance}
    if conditional:
        values.update(class_conditional=True, label_dropout=0.1)
    if kind == "finetuned":
        values.update(init_from="google/ddpm-cifar10-32")
    RunFolder(path).write_training_config(config_from_dict(dict(values, **options)).to_json_dict())
    if evaluated:
        RunFolder(path).write_eval(FID_RESULT)
        RunFolder(path).write_eval(NLL_RESULT, section="nll")
    return path


# ---- every kind of card, rendered from the template ------------------------------------------------


@pytest.mark.parametrize("evaluated", [False, True], ids=["without-eval", "with-eval"])
@pytest.mark.parametrize("kind", ["plain", "learned", "conditional", "finetuned"])
def test_each_kind_of_card_renders_and_its_metadata_round_trips(tmp_path, kind, evaluated):
    run = make_run(tmp_path / "run", kind, evaluated)
    card = build_model_card(run, "alice/tiny")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.eval_results == card.data.eval_results
    assert loaded.text == card.text and loaded.text.startswith("\n# tiny\n\n") and loaded.text.endswith("\n")

    data, text = loaded.data, loaded.text
    assert data.library_name == "diffusers" and data.model_name == "tiny"
    if kind == "conditional":
        assert data.pipeline_tag is None  # the Hub has no class-conditional task: the tags are what its filters find
        assert {"class-conditional", "image-generation"} <= set(data.tags)
        assert "## Classes" in text and 'custom_pipeline="ddpm_class_conditional"' in text and "DDPMPipeline.from_pretrained(" not in text
    else:
        assert data.pipeline_tag == "unconditional-image-generation" and "class-conditional" not in data.tags
        assert 'custom_pipeline="ddpm_trajectory"' in text
    assert ("learns the reverse-process variances" in text) == (kind == "learned")
    assert ("DDIMPipeline.from_pretrained" in text) == (kind in ("plain", "finetuned"))
    assert (data.base_model, getattr(data, "base_model_relation", None)) == (("google/ddpm-cifar10-32", "finetune") if kind == "finetuned" else (None, None))
    if evaluated:
        assert [r.metric_type for r in data.eval_results] == ["fid", "kid", "bits_per_dim"]
        assert "## Evaluation" in text
    else:
        assert data.eval_results is None and "model-index" not in str(loaded) and "## Evaluation" not in text


def test_the_card_is_rendered_from_the_packaged_template(tmp_path, monkeypatch):
    assert model_card.TEMPLATE.is_file() and model_card.TEMPLATE.parent.parent == Path(model_card.__file__).parent
    template = tmp_path / "card.md.jinja"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ card.name }}: {{ card.training_rows[0][0] }}\n")
    monkeypatch.setattr(model_card, "TEMPLATE", template)
    card = build_model_card(make_run(tmp_path / "run"), "alice/tiny")
    assert card.text == "\n# tiny: Architecture" and card.data.library_name == "diffusers"  # Jinja drops the last newline


# ---- the metadata tells the truth -----------------------------------------------------------------


def test_fid_and_kid_name_the_reference_they_were_measured_against(tmp_path):
    # Trained on a local folder, evaluated against cifar10-test: the results name uoft-cs/cifar10, split test.
    (tmp_path / "imgs").mkdir()
    run = make_run(tmp_path / "run", dataset=str(tmp_path / "imgs"))
    RunFolder(run).write_eval({key: value for key, value in FID_RESULT.items() if key not in ("kid", "kid_std")})
    card = build_model_card(run, "alice/tiny")
    (fid,) = card.data.eval_results
    assert (fid.dataset_type, fid.dataset_name, fid.dataset_split) == ("uoft-cs/cifar10", "uoft-cs/cifar10", "test")
    (entry,) = card.data.to_dict()["model-index"][0]["results"]
    assert entry["dataset"] == {"name": "uoft-cs/cifar10", "type": "uoft-cs/cifar10", "split": "test"}
    assert "| FID | 23.46 | 1,000 | ddim 50 steps | 0 | cifar10-test (uoft-cs/cifar10, split test) | these weights |" in card.text

    # Trained on the built-in CIFAR-10 subset, evaluated against a local folder: not the training dataset.
    run = make_run(tmp_path / "run2")
    reference = str(tmp_path / "imgs")
    RunFolder(run).write_eval(dict(FID_RESULT, reference=reference, reference_details={"spec": reference, "dataset": reference, "split": "train"}))
    card = build_model_card(run, "alice/tiny")
    assert card.data.datasets == ["uoft-cs/cifar10"]  # what it was trained on
    assert [(r.metric_type, r.dataset_type, r.dataset_split) for r in card.data.eval_results] == [
        ("fid", "local:imgs", "train"),
        ("kid", "local:imgs", "train"),
    ]
    assert str(tmp_path) not in str(card)


def test_kid_and_bits_per_dim_are_results_and_rows(tmp_path):
    run = make_run(tmp_path / "run", evaluated=True)
    card = build_model_card(run, "alice/tiny")
    fid, kid, bpd = card.data.eval_results
    assert (kid.metric_type, kid.metric_value, kid.metric_name) == ("kid", 0.0123, "KID (1,000 samples, ddim 50 steps)")
    assert kid.metric_args == {"num_samples": 1000, "scheduler": "ddim", "steps": 50, "nfe": 50, "seed": 0, "kid_std": 0.001}
    assert (bpd.metric_type, bpd.metric_value, bpd.dataset_type, bpd.dataset_split) == ("bits_per_dim", 3.71234, "uoft-cs/cifar10", "test")
    assert bpd.metric_name == "Bits/dim (NLL bound, 500 images, variational bound, all T terms)"
    assert bpd.metric_args == {"num_images": 500, "timestep_stride": 1, "exact_sum_over_t": True, "seed": 0, "stderr": 0.0123}
    text = card.text
    assert "| KID | 0.01230 ± 0.00100 | 1,000 | ddim 50 steps | 0 | cifar10-test (uoft-cs/cifar10, split test) | these weights |" in text
    assert "| Bits/dim (NLL bound) | 3.7123 ± 0.0123 | 500 images | variational bound, all T terms | 0 | uoft-cs/cifar10, split test | these weights |" in text

    # The bound alone, with a stride, of a class-conditional model (whose bound is that of the null label).
    run = make_run(tmp_path / "cond", "conditional")
    RunFolder(run).write_eval(dict(NLL_RESULT, timestep_stride=10, exact_sum_over_t=False, split="train"), section="nll")
    card = build_model_card(run, "alice/cond")
    (bpd,) = card.data.eval_results
    assert (bpd.task_type, bpd.dataset_split) == ("class-conditional-image-generation", "train")
    assert "KL sum estimated every 10 timesteps, null label (the unconditional model)" in bpd.metric_name
    assert "| Bits/dim (NLL bound) | 3.7123 ± 0.0123 | 500 images |" in card.text and "| FID |" not in card.text


def test_a_fine_tuned_run_names_the_model_it_started_from(tmp_path):
    card = build_model_card(make_run(tmp_path / "hub", "finetuned"), "alice/tiny")
    assert (card.data.base_model, card.data.base_model_relation) == ("google/ddpm-cifar10-32", "finetune")
    assert "| Started from | [`google/ddpm-cifar10-32`](https://huggingface.co/google/ddpm-cifar10-32): fine-tuned from its weights |" in card.text

    # From a folder on this machine: "a local model", no base_model, and never the machine's path.
    (tmp_path / "base-run").mkdir()
    card = build_model_card(make_run(tmp_path / "local", init_from=str(tmp_path / "base-run")), "alice/tiny")
    assert card.data.base_model is None and "base_model" not in str(card)
    assert "| Started from | a local model (`base-run`, not on the Hub): fine-tuned from its weights |" in card.text
    assert str(tmp_path) not in str(card)

    # Not fine-tuned: no such row.
    assert "Started from" not in build_model_card(make_run(tmp_path / "new"), "alice/tiny").text


def test_the_card_states_the_size_the_model_was_trained_at(tmp_path):
    # A 32px model fine-tuned with --resolution 16, saved before training recorded that size in unet/config.json.
    run = make_run(tmp_path / "run", "finetuned", sample_size=32)
    text = build_model_card(run, "alice/tiny").text
    assert "| Architecture | `UNet2DModel`, 16x16x3 images, channels (8, 16), 1 residual block(s) per resolution" in text
    assert "(saved with `sample_size` 32: pipelines sample at 32x32), self-attention at 8x8 |" in text
    assert "(split train, 16px)" in text and "32x32x3" not in text

    # Saved at the size it was trained at: one size, no remark.
    text = build_model_card(make_run(tmp_path / "same"), "alice/tiny").text
    assert "16x16x3 images" in text and "(split train, 16px)" in text and "sample_size" not in text


def test_a_space_that_shows_the_model_is_linked(tmp_path):
    run = make_run(tmp_path / "run")
    card = build_model_card(run, "alice/tiny", space_id="alice/tiny-demo")
    assert "the Space [alice/tiny-demo](https://huggingface.co/spaces/alice/tiny-demo) runs this model." in card.text
    assert card.text.index("spaces/alice/tiny-demo") < card.text.index("## Training")  # near the top
    assert "huggingface.co/spaces" not in build_model_card(run, "alice/tiny").text


def test_the_parameter_count_comes_from_the_safetensors_headers(tmp_path):
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    expected = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(tmp_path / "one")
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert count_parameters(unet) == count_parameters(tmp_path / "one") == count_parameters(str(tmp_path / "sharded")) == expected


def test_a_fid_over_several_image_sets_shows_its_spread_and_heun_its_network_evaluations(tmp_path):
    """`ddpm-hf evaluate --repeats 3`: the FID row gives mean ± std (min), the sets and their seeds, and so do the
    metadata; a sampler that evaluates the network more often than it steps (Heun) shows both counts."""
    run = make_run(tmp_path / "run")
    sets = [{"seed": 0, "fid": 23.0}, {"seed": 1000, "fid": 24.0}, {"seed": 2000, "fid": 23.5}]
    result = dict(FID_RESULT, fid=23.5, fid_std=0.5, fid_min=23.0, repeats=3, sets=sets, scheduler="heun", steps=10, nfe=19)
    RunFolder(run).write_eval({key: value for key, value in result.items() if key not in ("kid", "kid_std")})
    card = build_model_card(run, "alice/tiny")
    row = "| FID | 23.50 ± 0.50 (min 23.00) | 3 sets of 1,000 | heun 10 steps (19 network evaluations) | 0, 1,000, 2,000 |"
    assert row in card.text and "mean ± standard deviation over 3 independent sets" in card.text
    (fid,) = card.data.eval_results
    assert fid.metric_value == 23.5 and fid.metric_name == "FID (mean of 3 sets of 1,000 samples, heun 10 steps (19 network evaluations))"
    assert (fid.metric_args["repeats"], fid.metric_args["fid_std"], fid.metric_args["fid_min"], fid.metric_args["nfe"]) == (3, 0.5, 23.0, 19)

    RunFolder(run).write_eval({key: value for key, value in FID_RESULT.items() if key not in ("kid", "kid_std")})  # one set
    text = build_model_card(run, "alice/tiny").text
    assert "| FID | 23.46 | 1,000 | ddim 50 steps | 0 |" in text and "independent sets" not in text
