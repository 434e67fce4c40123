"""Tests for FID/KID (ddpm_hf/fid.py), the bits/dim bound (ddpm_hf/nll.py) and `ddpm-hf evaluate`, `fid` and `fid-stats`
(ddpm_hf/evaluation.py, evaluation_cli.py, evaluation_sweeps.py).

The Inception network runs at roughly 3-10 images/s on two CPU cores, so every test that needs it feeds it a
few dozen images at most, and the tests of what surrounds it (sampling, eval.json, sweep files) use a stand-in
(tests/inception_stand_in.py); the 50k-image calibration lives in scripts/fid_calibration.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from inception_stand_in import stand_in_inception
from PIL import Image

from ddpm_hf import evaluation, evaluation_cli, evaluation_sweeps, fid, nll
from ddpm_hf.cli import OneLineErrorParser
from ddpm_hf.errors import UserError
from ddpm_hf.losses import DDPMLoss
from ddpm_hf.models import build_unet
from ddpm_hf.sampling import make_sampler, resolve_sampler

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
needs_cifar10 = pytest.mark.skipif(not (CIFAR10 / "test-00000-of-00001.parquet").is_file(), reason="needs ../shared/data/cifar10")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Statistics are cached under DDPM_HF_CACHE: keep each test's cache to itself."""
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def inception_stand_in(monkeypatch):
    """Tests of what surrounds the network (sampling, eval.json, sweep files) run on tests/inception_stand_in.py."""
    monkeypatch.setattr(fid, "load_inception", stand_in_inception)


def cli(*argv: str) -> None:
    """Run `ddpm-hf <argv>` through this module's own subcommands."""
    parser = OneLineErrorParser(prog="ddpm-hf")
    evaluation_cli.add_cli(parser.add_subparsers(dest="command", parser_class=OneLineErrorParser))
    args = parser.parse_args(list(argv))
    args.func(args)


def cifar_images(count: int, resolution: int = 32) -> torch.Tensor:
    """Real CIFAR-10 training images from the subset shipped with the package."""
    return fid.load_dataset_images("builtin:cifar10-1k", "train", resolution, max_images=count, progress=False)


def noise_images(count: int, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    x = torch.randn(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def save_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def tiny_pipeline(folder: Path, num_train_timesteps: int = 20) -> Path:
    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet("tiny", 16), scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps)).save_pretrained(folder)
    return folder


def random_covariance(rng, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / (rank or dim)


# ---------------------------------------------------------------------------------------------
# The Frechet distance and the statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_features", [500, 40])  # 40 < 64 dimensions: a singular covariance
def test_fid_of_a_feature_set_against_itself_is_zero(num_features):
    features = np.random.default_rng(0).standard_normal((num_features, 64)) * 3 + 1
    stats = fid.statistics_of_features(features)
    assert fid.fid_from_statistics(stats, stats) == pytest.approx(0.0, abs=1e-8 * np.trace(stats.sigma))
    # A different feature set is far from it, so 0 is not what the function always returns.
    other = fid.statistics_of_features(np.random.default_rng(1).standard_normal((num_features, 64)) * 3 + 1.5)
    assert fid.fid_from_statistics(stats, other) > 1.0


def test_frechet_distance_matches_the_closed_form_of_commuting_gaussians():
    # Sigma_1 = Q diag(a) Q^T, Sigma_2 = Q diag(b) Q^T commute: d^2 = ||mu_1 - mu_2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    a, b = rng.uniform(0.1, 4.0, 50), rng.uniform(0.1, 4.0, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_a_direct_float64_reference():
    # Non-commuting full-rank covariances: d^2 = ||mu_1 - mu_2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm.
    rng = np.random.default_rng(1)
    s1, s2 = random_covariance(rng, 30), random_covariance(rng, 30)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_distance_is_robust_to_nearly_singular_covariances():
    # Rank-5 covariances in 40 dimensions (as with fewer images than features): finite, >= 0, and the
    # same as with a tiny ridge added, where the matrices are well conditioned.
    rng = np.random.default_rng(2)
    s1, s2 = random_covariance(rng, 40, rank=5), random_covariance(rng, 40, rank=5)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    ridge = 1e-10 * np.eye(40)
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(fid.frechet_distance(mu1, s1 + ridge, mu2, s2 + ridge), rel=1e-6)


def test_fid_of_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -0.5, 0.0])
    a, b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
    x = rng.standard_normal((200_000, 4)) * np.sqrt(a) + mu1
    y = rng.standard_normal((200_000, 4)) * np.sqrt(b) + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    measured = fid.fid_from_statistics(fid.statistics_of_features(x), fid.statistics_of_features(y))
    assert measured == pytest.approx(expected, rel=0.02)


def test_running_statistics_equal_numpy_mean_and_unbiased_covariance():
    features = np.random.default_rng(4).standard_normal((301, 16)) * 5 + 100  # a large offset: cancellation-prone
    running = fid.RunningStatistics()
    for start in range(0, 301, 64):
        running.update(torch.from_numpy(features[start : start + 64]))
    stats = running.result()
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.num_images == 301


def test_statistics_file_round_trip_and_protocol_check(tmp_path):
    rng = np.random.default_rng(5)
    stats = fid.FIDStatistics(
        mu=rng.standard_normal(2048),
        sigma=np.eye(2048),
        num_images=7,
        features=rng.standard_normal((3, 2048)).astype(np.float32),
        info={"protocol": fid.PROTOCOL},
    )
    stats.save(str(tmp_path / "s.npz"))
    loaded = fid.FIDStatistics.load(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.num_images == 7
    stats.info["protocol"] = "pytorch-fid_pil-bicubic"
    stats.save(str(tmp_path / "other.npz"))
    with pytest.raises(UserError, match="protocol"):
        fid.FIDStatistics.load(str(tmp_path / "other.npz"))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(6)
    x, y, z = rng.standard_normal((600, 32)), rng.standard_normal((600, 32)), rng.standard_normal((600, 32)) * 1.5 + 0.5
    same, _ = fid.kernel_inception_distance(x, y, num_subsets=20, subset_size=300)
    different, _ = fid.kernel_inception_distance(x, z, num_subsets=20, subset_size=300)
    assert abs(same) < 0.02
    assert different > 10 * max(abs(same), 1e-3)


# ---------------------------------------------------------------------------------------------
# The Inception input and features
# ---------------------------------------------------------------------------------------------


def test_resize_is_tf1_bilinear_without_half_pixel_offset():
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resized = fid.resize_for_inception(images, size=9).double()
    # The formula of TF1 resize_bilinear(align_corners=False), pixel by pixel.
    x = images.double()
    expected = torch.empty(2, 3, 9, 9, dtype=torch.float64)
    for i in range(9):
        sy = i * 5 / 9
        y0, wy = int(math.floor(sy)), sy - math.floor(sy)
        y1 = min(y0 + 1, 4)
        for j in range(9):
            sx = j * 4 / 9
            x0, wx = int(math.floor(sx)), sx - math.floor(sx)
            x1 = min(x0 + 1, 3)
            top = (1 - wx) * x[..., y0, x0] + wx * x[..., y0, x1]
            bottom = (1 - wx) * x[..., y1, x0] + wx * x[..., y1, x1]
            expected[..., i, j] = (1 - wy) * top + wy * bottom
    torch.testing.assert_close(resized, expected, atol=1e-3, rtol=0)
    # The half-pixel-centre convention (torch's align_corners=False) is a different resize.
    half_pixel = torch.nn.functional.interpolate(x, size=(9, 9), mode="bilinear", align_corners=False)
    assert (half_pixel - expected).abs().max() > 1.0


def test_inception_features_are_deterministic_and_independent_of_batch_size():
    images = cifar_images(4)
    extractor = fid.InceptionFeatures("cpu")
    together = extractor(images)
    assert together.shape == (4, fid.FEATURE_DIM)
    assert torch.isfinite(together).all() and (together >= 0).all()  # average-pooled ReLU activations
    torch.testing.assert_close(extractor(images), together, atol=0, rtol=0)
    one_by_one = torch.cat([extractor(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, together, atol=1e-4, rtol=1e-4)
    # Different images do have different features.
    assert (together[0] - together[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.float())


@pytest.mark.slow
@needs_cifar10
def test_fid_real_vs_noise_is_far_larger_than_real_vs_real():
    real = fid.load_dataset_images(str(CIFAR10), "test", 32, max_images=64, progress=False)
    extractor = fid.InceptionFeatures("cpu")
    features = {name: extractor(images) for name, images in (("a", real[:32]), ("b", real[32:]), ("noise", noise_images(32)))}
    stats = {name: fid.statistics_of_features(f) for name, f in features.items()}
    real_vs_real, real_vs_noise = fid.fid_from_statistics(stats["a"], stats["b"]), fid.fid_from_statistics(stats["a"], stats["noise"])
    # With 32 images per set FID is biased upwards (real vs real ~240, vs ~3 with 10k vs 50k), but noise is still far
    # farther (~520).
    assert real_vs_noise > 2 * real_vs_real and real_vs_noise > 350, (real_vs_real, real_vs_noise)
    # KID is unbiased: ~0 for two halves of the test set, large for noise.
    kid_real, _ = fid.kernel_inception_distance(features["a"].numpy(), features["b"].numpy(), num_subsets=1, subset_size=32)
    kid_noise, _ = fid.kernel_inception_distance(features["a"].numpy(), features["noise"].numpy(), num_subsets=1, subset_size=32)
    assert abs(kid_real) < 0.05 and kid_noise > 0.3, (kid_real, kid_noise)


# ---------------------------------------------------------------------------------------------
# `ddpm-hf fid` / `fid-stats` and the training-time evaluator
# ---------------------------------------------------------------------------------------------


def test_fid_stats_caches_and_fid_compares_folders_and_statistics(tmp_path, capsys):
    cli("fid-stats", "--dataset", "builtin:cifar10-1k", "--max_images", "4", "--resolution", "32", "--batch_size", "4", "--device", "cpu")
    cached = fid.stats_cache_path("builtin:cifar10-1k", "train", 32, max_images=4)
    assert os.path.isfile(cached) and cached.startswith(str(tmp_path / "cache"))
    assert "cached at" in capsys.readouterr().out
    cli("fid-stats", "--dataset", "builtin:cifar10-1k", "--max_images", "4", "--resolution", "32", "--device", "cpu")
    assert "already cached" in capsys.readouterr().out

    # The same 4 images as PNG files: FID against their cached statistics is ~0, against noise it is not.
    same = save_pngs(cifar_images(4), tmp_path / "same")
    noise = save_pngs(noise_images(4), tmp_path / "noise")
    cli("fid", str(same), cached, "--device", "cpu")
    out = capsys.readouterr().out
    assert float(out.split("FID:")[1].split()[0]) < 1e-2
    assert "(4 vs 4 images)" in out and "strongly biased" in out  # 4 < 2048 images: the caveat is printed
    cli("fid", str(noise), cached, "--device", "cpu")
    noise_fid = float(capsys.readouterr().out.split("FID:")[1].split()[0])
    assert noise_fid > 100, noise_fid


@pytest.mark.usefixtures("inception_stand_in")
def test_fid_evaluator_samples_in_eval_mode_and_is_reproducible():
    torch.manual_seed(0)
    unet = build_unet("tiny", 16).train()
    scheduler = DDPMScheduler(num_train_timesteps=20)
    evaluator = evaluation.FIDEvaluator(cifar_images(8, resolution=16), device="cpu", batch_size=8)
    modes = []
    unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    sampler = make_sampler(scheduler, "auto", 3)
    first = evaluator.fid_of(unet, sampler, num_samples=4, seed=1, batch_size=4)
    second = evaluator.fid_of(unet, sampler, num_samples=4, seed=1, batch_size=4)
    assert math.isfinite(first) and first > 0
    assert first == pytest.approx(second, rel=1e-6)
    assert modes and not any(modes) and unet.training  # sampled in eval mode, training mode restored
    assert len(modes) == 2 * 3  # auto: unipc with 3 steps (3 < T), twice


@pytest.mark.usefixtures("inception_stand_in")
def test_sweep_writes_table_plot_and_eval_json(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    reference = save_pngs(cifar_images(8, resolution=16), tmp_path / "reference")
    out = tmp_path / "out"
    cli(
        "evaluate",
        "--model",
        str(model),
        "--sweep",
        "ddpm:4,ddim:2",
        "--num_samples",
        "6",
        "--batch_size",
        "6",
        "--reference",
        str(reference),
        "--output",
        str(out),
        "--device",
        "cpu",
    )
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sampler"], int(r["steps"]), int(r["nfe"])) for r in rows] == [("ddpm", 4, 4), ("ddim", 2, 2)]
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert (out / "sweep.md").read_text().startswith("| sampler | steps | NFE | FID |")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "sweep.png") as plot:
        assert plot.size[0] > 300
    results = json.loads((out / "eval.json").read_text())["sweep"]["runs"]
    assert [r["scheduler"] for r in results] == ["ddpm", "ddim"]
    assert results[0]["reference_details"]["num_images"] == 8
    assert "| ddim | 2 | 2 |" in capsys.readouterr().out


@pytest.mark.usefixtures("inception_stand_in")
def test_evaluate_fid_writes_eval_json_into_the_model_folder(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model")
    reference = save_pngs(cifar_images(6, resolution=16), tmp_path / "reference")
    (model / "eval.json").write_text(json.dumps({"nll": {"bits_per_dim": 3.7}, "fid": 99.0, "kid": 1.0}))
    cli(
        "evaluate",
        "--model",
        str(model),
        "--num_samples",
        "4",
        "--scheduler",
        "dpmsolver",
        "--steps",
        "3",
        "--batch_size",
        "4",
        "--reference",
        str(reference),
        "--device",
        "cpu",
        "--kid",
    )
    result = json.loads((model / "eval.json").read_text())
    # The keys the model card reads (ddpm_hf/model_card.py), at the top level.
    assert result["fid"] > 0 and result["fid"] != 99.0 and math.isfinite(result["kid"])
    assert (result["num_samples"], result["scheduler"], result["steps"], result["nfe"]) == (4, "dpmsolver", 3, 3)
    assert result["reference"] == str(reference) and result["reference_details"]["num_images"] == 6
    assert result["protocol"] == fid.PROTOCOL and result["timing"]["sampling_and_features_seconds"] > 0
    assert result["nll"] == {"bits_per_dim": 3.7}  # other sections are kept
    out = capsys.readouterr().out
    assert "FID" in out and "strongly biased" in out  # 4 samples: the caveat is printed


def test_command_line_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="SAMPLER:STEPS"):
        evaluation_sweeps.parse_sweep("ddpm:1000,nonsense:10")
    with pytest.raises(UserError, match="needs --steps"):
        resolve_sampler("ddim", None, 1000)
    with pytest.raises(UserError, match="between 1 and"):
        resolve_sampler("ddpm", 2000, 1000)
    with pytest.raises(UserError, match="no such statistics file"):
        fid.FIDStatistics.load(str(tmp_path / "missing.npz"))
    with pytest.raises(UserError, match="holds 32x32 images"):
        fid.resolve_statistics("cifar10-train", resolution=64)
    # a missing path is named as the user gave it: a positional PATH_A, or --reference of `evaluate`
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(UserError, match=f"^argument PATH_A: {re.escape(missing)}: no such file or folder"):
        cli("fid", missing, missing)
    with pytest.raises(UserError, match=f"^--reference {re.escape(missing)}: no such file or folder"):
        evaluation.FIDEvaluator(missing, device="cpu")
    assert evaluation_sweeps.parse_sweep("ddpm:1000, ddim:50") == [("ddpm", 1000), ("ddim", 50)]
    assert evaluation_cli.default_output_dir("google/ddpm-cifar10-32") == "eval-google--ddpm-cifar10-32"
    assert evaluation_cli.default_output_dir(str(tmp_path)) == str(tmp_path)


def test_an_uncached_reference_alias_offline_says_how_to_cache_it(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        UserError,
        match=r"^--reference cifar10-train is uoft-cs/cifar10 \(train\), whose statistics are not cached\..*cannot reach.*ddpm-hf fid-stats --dataset PATH --split train --name uoft-cs/cifar10$",
    ):
        fid.resolve_statistics("cifar10-train", option="--reference")


# ---------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------


def test_discretized_gaussian_is_a_distribution_over_the_256_levels():
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.3, -4.0), (-1.0, -6.0), (0.999, -2.0), (5.0, -3.0)]:
        log_p = nll.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert torch.isfinite(log_p).all()
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # A narrow Gaussian centred on a level puts almost all its mass in that bin.
    centre = nll.discretized_gaussian_log_likelihood(x[100:101], x[100:101], torch.tensor([-7.0], dtype=torch.float64))
    assert centre.exp().item() > 0.99


def test_normal_kl_is_zero_for_equal_gaussians_and_matches_the_formula():
    m, lv = torch.tensor([0.3]), torch.tensor([-2.0])
    assert nll.normal_kl(m, lv, m, lv).item() == pytest.approx(0.0, abs=1e-7)
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    value = nll.normal_kl(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([math.log(4.0)]))
    assert value.item() == pytest.approx(math.log(2.0) + 2 / 8 - 0.5, rel=1e-6)


def test_timestep_stride_is_exact_for_one_and_unbiased_otherwise():
    assert nll.kl_timesteps(1000, 1) == [(t, 1.0) for t in range(1, 1000)]
    # Averaged over the random offset, every KL index t = 1..T-1 has total weight exactly 1.
    stride, total = 7, 100
    weight = np.zeros(total)
    for offset in range(stride):
        for t, w in nll.kl_timesteps(total, stride, offset=offset):
            weight[t] += w / stride
    np.testing.assert_allclose(weight[1:], 1.0)
    assert weight[0] == 0
    # ... at a fraction of the cost.
    assert len(nll.kl_timesteps(1000, 30, torch.Generator().manual_seed(0))) < 70


def test_default_bound_evaluates_every_timestep():
    unet = build_unet("tiny", 16)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1][0])))
    result = nll.bits_per_dim(unet, DDPMScheduler(num_train_timesteps=12), cifar_images(2, resolution=16), progress=False)
    assert sorted(calls) == list(range(12))  # the decoder at t = 0 and the 11 KL terms, once each
    assert result["exact_sum_over_t"] and result["num_images"] == 2
    parts = result["prior_bits_per_dim"] + result["kl_bits_per_dim"] + result["decoder_bits_per_dim"]
    assert result["bits_per_dim"] == pytest.approx(parts, rel=1e-9)


def _schedule() -> DDPMScheduler:
    # The paper's linear schedule rescaled to T = 50 (beta_t * 1000 / T), so that abar_T ~ e^-10 as with T = 1000.
    return DDPMScheduler(num_train_timesteps=50, beta_start=2e-3, beta_end=0.4)


@pytest.mark.slow
def test_bits_per_dim_is_lower_after_brief_training():
    torch.manual_seed(0)
    images = cifar_images(260, resolution=16)
    train_images, test_images = images[:256], images[256:]
    untrained = build_unet("tiny", 16)
    trained = build_unet("tiny", 16)
    trained.load_state_dict(untrained.state_dict())
    scheduler = _schedule()
    loss_fn = DDPMLoss(scheduler.alphas_cumprod)
    optimizer = torch.optim.Adam(trained.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    trained.train()
    for _ in range(20):
        batch = train_images[torch.randint(0, 256, (16,), generator=generator)].float() / 127.5 - 1
        loss = loss_fn(trained, batch, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    before = nll.bits_per_dim(untrained, scheduler, test_images, batch_size=4, seed=1, progress=False)
    after = nll.bits_per_dim(trained, scheduler, test_images, batch_size=4, seed=1, progress=False)
    for result in (before, after):
        assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    # ~13.5 -> ~7.5 bits/dim: the KL terms shrink most (the decoder term barely moves in 20 steps).
    assert after["bits_per_dim"] < before["bits_per_dim"] - 1.0, (before["bits_per_dim"], after["bits_per_dim"])
    assert after["kl_bits_per_dim"] < before["kl_bits_per_dim"]


def test_evaluate_nll_command_writes_eval_json(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "model", num_train_timesteps=30)
    out = tmp_path / "out"
    cli(
        "evaluate",
        "--model",
        str(model),
        "--metric",
        "nll",
        "--dataset",
        "builtin:cifar10-1k",
        "--split",
        "train",
        "--num_images",
        "3",
        "--timestep_stride",
        "5",
        "--output",
        str(out),
        "--device",
        "cpu",
    )
    result = json.loads((out / "eval.json").read_text())["nll"]
    assert result["num_images"] == 3 and result["timestep_stride"] == 5 and not result["exact_sum_over_t"]
    assert math.isfinite(result["bits_per_dim"]) and result["bits_per_dim"] > 0
    assert "bits/dim" in capsys.readouterr().out


def test_small_sets_take_the_exact_low_rank_route():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((20, 64)) + 0.3, rng.standard_normal((300, 64)) * 2
    small, large = fid.statistics_of_features(x), fid.statistics_of_features(y)
    assert small.factor is not None and large.factor is None  # 20 <= 64 < 300
    np.testing.assert_allclose(small.factor.T @ small.factor, small.sigma, atol=1e-12)
    direct = fid.frechet_distance(small.mu, small.sigma, large.mu, large.sigma)
    assert fid.fid_from_statistics(small, large) == pytest.approx(direct, rel=1e-9)
    assert fid.fid_from_statistics(large, small) == pytest.approx(direct, rel=1e-9)
    other = fid.statistics_of_features(rng.standard_normal((30, 64)))
    assert fid.fid_from_statistics(small, other) == pytest.approx(fid.frechet_distance(small.mu, small.sigma, other.mu, other.sigma), rel=1e-9)


def test_reference_aliases_are_resolved_in_one_place(tmp_path, capsys):
    """fid.resolve_reference names what a reference is for `evaluate`, `fid`, `fid-stats`, per-class FID and eval.json."""
    assert fid.resolve_reference("cifar10-test", "train") == fid.ReferenceSet("cifar10-test", "uoft-cs/cifar10", "test", 32, alias="cifar10-test")
    assert fid.resolve_reference("cifar10-train", resolution=32).resolution == 32
    plain = fid.resolve_reference("user/data", "validation", 16)
    assert plain == fid.ReferenceSet("user/data", "user/data", "validation", 16) and not plain.is_statistics and not plain.is_image_folder()
    assert fid.resolve_reference("stats.npz").is_statistics
    assert fid.resolve_reference(str(save_pngs(noise_images(1, 8), tmp_path / "folder"))).is_image_folder()
    # An alias holds images of its own size: the error says what to do where the size came from.
    with pytest.raises(
        UserError,
        match=r"^the reference cifar10-train holds 32x32 images but the images to compare are 16x16\. Pass --reference with a dataset or statistics at 16x16\.$",
    ):
        fid.resolve_reference("cifar10-train", resolution=16)  # evaluate: the model's image size
    with pytest.raises(UserError, match=r"Pass --reference with a dataset at 16x16\.$"):
        fid.resolve_reference("cifar10-train", resolution=16, labelled=True)  # per-class FID: statistics hold no classes
    for command in (["fid", "cifar10-train", str(tmp_path / "folder")], ["fid-stats", "--dataset", "cifar10-train"]):
        with pytest.raises(UserError, match=r"^(PATH_A|--dataset) cifar10-train holds 32x32 images; drop --resolution or pass the dataset itself\.$"):
            cli(*command, "--resolution", "16")
    # eval.json's reference_details of statistics that do not say where they come from: what the alias names.
    unnamed = fid.statistics_of_features(np.random.default_rng(0).standard_normal((3, 8)))
    details = evaluation._reference_description(unnamed, "cifar10-test", "train")
    assert (details["spec"], details["dataset"], details["split"], details["num_images"]) == ("cifar10-test", "uoft-cs/cifar10", "test", 3)


def test_evaluate_options_are_the_command_line_by_name():
    """`ddpm-hf evaluate`'s options become one EvaluateOptions with the same defaults; clashes are refused in Python too."""
    from ddpm_hf.cli import build_parser

    parser = build_parser()
    assert evaluation_cli.evaluate_options(parser.parse_args(["evaluate", "--model", "m"])) == evaluation.EvaluateOptions(model="m")
    options = evaluation_cli.evaluate_options(parser.parse_args(["evaluate", "--model", "m", "--sweep", "ddpm:10,ddim:5", "--guidance_scale", "2"]))
    assert options.sweep == [("ddpm", 10), ("ddim", 5)] and options.sweep_kind() is evaluation_sweeps.SAMPLER_SWEEP
    assert options.runs() == [evaluation.Run("ddpm", 10, 2.0), evaluation.Run("ddim", 5, 2.0)]
    options = evaluation.EvaluateOptions(model="m", scheduler="ddim", steps=4, guidance_sweep=[0, 1.5])
    assert options.sweep_kind() is evaluation_sweeps.GUIDANCE_SWEEP and options.runs() == [evaluation.Run("ddim", 4, 0.0), evaluation.Run("ddim", 4, 1.5)]
    assert evaluation.EvaluateOptions(model="m", guidance_scale=3).runs() == [evaluation.Run("ddpm", None, 3)]
    with pytest.raises(UserError, match="--guidance_sweep and --sweep cannot be combined"):
        evaluation.EvaluateOptions(model="m", sweep=[("ddim", 2)], guidance_sweep=[1.0])
    # --ddp_timeout is an option of every run, not of the bound: it comes before the groups' options.
    usage = parser._subparsers._group_actions[0].choices["evaluate"].format_usage()
    assert usage.index("--ddp_timeout") < usage.index("--num_samples") < usage.index("--timestep_stride")


def test_subcommands_are_registered_with_ddpm_hf():
    from ddpm_hf.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["evaluate", "--model", "m"]).func is evaluation_cli.run_evaluate
    assert parser.parse_args(["fid", "a", "b"]).func is evaluation_cli.run_fid
    assert parser.parse_args(["fid-stats", "--dataset", "d"]).func is evaluation_cli.run_fid_stats


def test_the_documented_calibration_is_the_recorded_run_of_todays_protocol():
    """README and docs/evaluation.md quote docs/fid_calibration.json (scripts/fid_calibration.py's output)."""
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "docs" / "fid_calibration.json").read_text())
    assert record["complete"] and record["num_features"] == {"test": 10000, "noise": 1000, "train": 50000}
    # Numbers of another protocol (network, resize, scaling) would not describe what the code computes now.
    assert record["protocol"] == fid.PROTOCOL and record["protocol_description"] == fid.PROTOCOL_DESCRIPTION
    rows = {
        "test 10k vs train 50k": f"{record['fid_test10000_vs_train50000']:.2f}",
        "random 10k of train vs train 50k": f"{record['fid_train_random10000_vs_train50000']:.2f}",
        "1,000 Gaussian-noise images vs train 50k": f"{record['fid_noise1000_vs_train50000']:.1f}",
    }
    assert float(rows["test 10k vs train 50k"]) < 10 and float(rows["random 10k of train vs train 50k"]) < 10
    assert float(rows["1,000 Gaussian-noise images vs train 50k"]) > 100
    for document in ("README.md", "docs/evaluation.md"):
        text = (root / document).read_text()
        for row, value in rows.items():
            assert f"| {row} | **{value}** |" in text, (document, row, value)


def test_the_small_sample_caveat_matches_the_sample_count(capsys):
    evaluation_cli.note_small_sample_bias(100)
    assert "fewer than 2048 images" in capsys.readouterr().out
    evaluation_cli.note_small_sample_bias(10_000)
    assert "compare only with FIDs of 10,000 samples" in capsys.readouterr().out
    evaluation_cli.note_small_sample_bias(50_000)
    assert capsys.readouterr().out == ""
