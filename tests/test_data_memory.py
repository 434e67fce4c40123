"""What each process holds of the decoded dataset (issue 20, item 7): one process per machine decodes into the cache
and every process maps that file; what goes on the device is bounded by the device's free memory, else batches are
gathered from the host through pinned memory; building the mirror images makes no transient copy of the dataset.
GPU behaviour is tested through its conditions: the free memory a device reports, the pinning asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import offline_env

from ddpm_hf import data


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))


_DECODE_ON_TWO_PROCESSES = """
import json, sys, time
import ddpm_hf.data as data
from ddpm_hf.distributed import leave_process_group, process_state

# gloo, as the ddpm-hf commands join a torchrun; a collective gives up after 6 s, as after --ddp_timeout
state = process_state("cpu", timeout_s=6)
opened, created = [], []
open_image, create_memory_map, resize = data.open_image, data._create_memory_map, data.resize_and_crop
data.open_image = lambda value: (opened.append(1), open_image(value))[1]
data._create_memory_map = lambda *args: (created.append(1), create_memory_map(*args))[1]
data.resize_and_crop = lambda image, size: (time.sleep(0.35), resize(image, size))[1]  # decoding outlasts that timeout
dataset = data.load_image_dataset("builtin:cifar10-1k").select(range(24))
decoded = data.decode_images(dataset, 8, progress=False, state=state)
report = dict(opened=len(opened), files_created=len(created), memory_mapped=decoded.memory_mapped, shape=list(decoded.images.shape))
report["checksum"] = int(decoded.images.long().sum())
json.dump(report, open(f"{sys.argv[1]}/rank{state.process_index}.json", "w"))
leave_process_group()
"""


def test_two_processes_decode_once_and_both_map_the_one_file(tmp_path):
    """The second process waits for the first one's decoding, even beyond the collectives' timeout (meant for a lost
    process, not for a first decode that takes hours), then maps the file it wrote."""
    script = tmp_path / "decode.py"
    script.write_text(_DECODE_ON_TWO_PROCESSES)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = offline_env(DDPM_HF_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["opened"] for r in reports] == [24, 0]  # the first process decodes every image, the other none
    assert [r["files_created"] for r in reports] == [1, 0]  # one full-size file, not one per process
    assert all(r["memory_mapped"] and r["shape"] == [24, 3, 8, 8] for r in reports)
    expected = data.decode_images(data.load_image_dataset("builtin:cifar10-1k").select(range(24)), 8, progress=False).images
    assert [r["checksum"] for r in reports] == [int(expected.long().sum())] * 2
    decoded_folder = tmp_path / "cache" / "decoded"
    assert len(list(decoded_folder.glob("*.npy"))) == 1 and not [p for p in os.listdir(decoded_folder) if "partial" in p]


def test_the_device_share_is_bounded_by_the_reported_free_memory_and_max_in_memory_gb():
    gb = 10**9
    assert data.device_placement(gb, True, free_bytes=80 * gb, max_gb=8) == data.DEVICE_WITH_FLIPS
    assert data.device_placement(gb, True, free_bytes=3 * gb, max_gb=8) == data.DEVICE  # 2 GB with flips > half of 3
    assert data.device_placement(gb, True, free_bytes=gb, max_gb=8) == data.HOST
    assert data.device_placement(gb, False, free_bytes=2 * gb, max_gb=8) == data.DEVICE
    assert data.device_placement(5 * gb, False, free_bytes=80 * gb, max_gb=4) == data.HOST  # the user's limit
    assert data.device_placement(5 * gb, True, free_bytes=80 * gb, max_gb=8) == data.DEVICE  # no room for the mirror images


def test_a_cuda_device_reports_its_own_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000_000_000, 80_000_000_000))
    assert data.free_memory(torch.device("cuda", 0)) == 3_000_000_000
    assert data.free_memory(torch.device("cpu")) > 0


@pytest.mark.parametrize("random_flip", [True, False])
def test_every_placement_gives_the_same_batches(monkeypatch, random_flip):
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    size = images.numel()
    batches = {}
    for free in (100 * size, 3 * size, size):  # room for the images and their mirror images, for the images only, for neither
        monkeypatch.setattr(data, "free_memory", lambda device, free=free: free)
        stream = data.ImageBatches(images, seed=1, random_flip=random_flip, device=torch.device("cpu"), labels=labels)
        torch.manual_seed(0)
        batches[stream.placement] = (stream.batch(7, 6), stream.batch_labels(7, 6))
    expected = [data.DEVICE_WITH_FLIPS, data.DEVICE, data.HOST] if random_flip else [data.DEVICE, data.HOST]
    assert sorted(batches) == sorted(expected)
    first = next(iter(batches.values()))
    for batch, batch_labels in batches.values():
        assert torch.equal(batch, first[0]) and torch.equal(batch_labels, first[1])


def test_mirror_images_are_written_without_a_transient_copy_of_the_dataset(monkeypatch):
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    monkeypatch.setattr(data, "MIRROR_CHUNK_BYTES", 8 * images[0].numel(), raising=False)
    flipped_rows = []
    flip = torch.Tensor.flip

    def counting_flip(tensor, *dims):
        flipped_rows.append(tensor.shape[0])
        return flip(tensor, *dims)

    monkeypatch.setattr(torch.Tensor, "flip", counting_flip)
    stream = data.ImageBatches(images, seed=0, random_flip=True, device=torch.device("cpu"))
    monkeypatch.undo()
    assert stream._with_flips is not None and sum(flipped_rows) == 40
    assert max(flipped_rows) <= 8  # at most one chunk exists twice at any time, never the whole dataset
    assert torch.equal(stream._with_flips[40:], images.flip(3)) and torch.equal(stream._with_flips[:40], images)


def test_host_batches_are_gathered_into_pinned_memory_for_an_accelerator(monkeypatch):
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    index = torch.tensor([4, 0, 2])
    asked, copies = [], []
    empty, to = torch.empty, torch.Tensor.to

    def recording_empty(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return empty(*args, **kwargs)  # this machine has no pinned memory allocator

    def recording_to(tensor, *args, **kwargs):
        copies.append(kwargs.get("non_blocking", False))
        return to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    on_the_accelerator = data.gather_rows(images, index, torch.device("meta"))  # an accelerator as far as pinning goes
    on_the_cpu = data.gather_rows(images, index, torch.device("cpu"))
    monkeypatch.undo()
    assert asked == [True, False] and copies == [True, False]  # pinned, and an asynchronous copy from it
    assert on_the_accelerator.device.type == "meta" and on_the_accelerator.shape == (3, 3, 2, 2)
    assert torch.equal(on_the_cpu, images[index])


def test_training_decodes_once_per_machine_and_bounds_what_goes_on_the_device(tmp_path, monkeypatch, micro_unet_config):
    from accelerate.state import AcceleratorState, GradientState
    from conftest import quick_options

    from ddpm_hf import training
    from ddpm_hf.config import config_from_dict

    decode, calls = data.decode_images, []
    monkeypatch.setattr(data, "decode_images", lambda *args, **kwargs: (calls.append(kwargs.get("state")), decode(*args, **kwargs))[1])
    monkeypatch.setattr(data, "free_memory", lambda device: 1000)  # a device with almost no room left
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        run = training.prepare_run(config_from_dict(quick_options(tmp_path / "run", micro_unet_config, max_train_samples=16)))
        assert len(calls) == 1 and calls[0] is run.accelerator.state  # decoded under the processes' coordination
        assert run.batches.placement == data.HOST and run.batches.batch(0, 4).shape == (4, 3, 16, 16)
        assert run.training_images.shape == (16, 3, 16, 16)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
