"""The per-step callback of pipelines/ddpm_class_conditional.py (`callback_on_step_end`, as in ddpm_trajectory.py):
what it hands over is the reverse process of ddpm-hf's own engine (sampling.ReverseProcess), step by step."""

from __future__ import annotations

import pytest
import torch
from test_demo import CLASSES, save_model

from ddpm_hf.distributed import item_generators
from ddpm_hf.sampling import ReverseProcess, make_sampler


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver", "euler"])  # x_0 from the scheduler, from the pipeline; Karras sigmas
def test_the_callback_hands_over_the_engines_x_t_and_predicted_x_0_at_every_step(sampler, tmp_path, one_thread):
    from diffusers import DiffusionPipeline

    folder = save_model(tmp_path / "cond")
    pipeline = DiffusionPipeline.from_pretrained(folder, custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    steps, seed, labels, guidance = 5, 3, [1, 1, 2], 2.0
    made = make_sampler(pipeline.scheduler, sampler, steps)
    pipeline.scheduler = made.scheduler
    seen = []

    def callback(pipe, step_index, timestep, tensors):
        assert pipe is pipeline and set(tensors) == {"x_t", "pred_x0"}
        # x_t as the network sees it at the next step (Karras-sigma schedulers keep it scaled by sqrt(1 + sigma^2))
        seen.append((step_index, float(timestep), pipe.scheduler.scale_model_input(tensors["x_t"], timestep), tensors["pred_x0"].clone()))

    images = pipeline(
        labels, guidance_scale=guidance, num_inference_steps=steps, generator=item_generators(seed, range(3)), output_type="pt", callback_on_step_end=callback
    ).images

    engine = ReverseProcess(pipeline.unet, make_sampler(pipeline.scheduler, sampler, steps), seed, range(3), labels, guidance)
    states = [(state.step, state.t, state.x_t.clone(), state.pred_x0.clone()) for state in engine]
    assert [(i, t) for i, t, _, _ in seen] == [(i, t) for i, t, _, _ in states] and len(seen) == steps
    for (_, _, _, pred_x0), (_, _, _, engine_pred_x0) in zip(seen, states, strict=True):
        torch.testing.assert_close(pred_x0, engine_pred_x0, rtol=1e-5, atol=1e-5)
    for (_, _, x_t, _), (_, _, engine_next_x_t, _) in zip(seen[:-1], states[1:], strict=True):  # x_t after step i = input of step i + 1
        torch.testing.assert_close(x_t, engine_next_x_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1][2], engine.x_0, rtol=1e-5, atol=1e-5)  # after the last step: the final sample
    torch.testing.assert_close(images, (seen[-1][2] / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)  # which the images are made of
    assert not torch.allclose(seen[0][3], seen[-1][3], atol=1e-3)  # the prediction moves: the checks above are not vacuous


def test_a_callback_that_returns_x_t_replaces_the_sample(tmp_path, one_thread):
    from diffusers import DDIMScheduler, DiffusionPipeline

    folder = save_model(tmp_path / "cond")
    pipeline = DiffusionPipeline.from_pretrained(folder, custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)

    def zero_last(pipe, step_index, timestep, tensors):
        return {"x_t": torch.zeros_like(tensors["x_t"])} if step_index == 2 else None

    images = pipeline(CLASSES[0], num_inference_steps=3, output_type="pt", callback_on_step_end=zero_last).images
    torch.testing.assert_close(images, torch.full((1, 3, 16, 16), 0.5))
