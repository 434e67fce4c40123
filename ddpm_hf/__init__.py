"""ddpm-hf: train Denoising Diffusion Probabilistic Models (Ho et al. 2020) with diffusers and Accelerate.

The core, in the order data flows (read these first):
    config.py       every training option as plain data (a dataclass with each option's bounds), presets
                    (diffusers_example_options.py: the diffusers example's option names mapped onto ours)
    data.py         where data flows in: dataset -> decoded uint8 tensor -> batches in [-1, 1] on the device
    models.py       the UNet architectures and the DDPMScheduler (models and schedulers stay separate)
    losses.py       the forward process q(x_t | x_0) and the objectives: L_simple, L_hybrid and L_vlb
    training.py     where the model learns: the Accelerate loop, checkpoints, the saved pipeline
    run_folder.py   what a run leaves on disk (OUTPUT_DIR) and the one reader/writer of each file there
    files.py        the cache folder (decoded datasets, FID statistics, the Inception network) and atomic writes
    sampling.py     the one sampler factory and sampling loop; `ddpm-hf sample`
                    (compilation.py: torch.compile's failures, for sampling and training alike)
    conditioning.py class-conditional models: labels, classifier-free guidance, the pipeline they are saved as
    distributed.py  heavy work split over Accelerate's processes: chunks by index, per-item seeds, merging

The tools around a trained pipeline (`ddpm-hf COMMAND`, registered in cli.py):
    evaluation.py   what `ddpm-hf evaluate` computes, spread over processes: EvaluateOptions (a field per
                    option), FIDEvaluator and fid_result (also training's --eval_every), the bound's run; beside it
        evaluation_cli.py        `evaluate`, `fid`, `fid-stats`: the command line, what they print and write
        evaluation_sweeps.py     FID against the sampler, NFE (the frontier) or guidance scale: table, plot
        evaluation_per_class.py  per-class FID: labelled reference images and the statistics of each class
        fid.py                   Inception features, statistics, FID and KID, reference sets (aliases resolved)
        inception_weights.py     where the Inception network file comes from
        nll.py                   the terms of the variational bound, in bits/dim
    hub.py          `push` and pushes during training: the pre-flight check, the background pusher, retries,
                    snapshots (repo_contents.py: what a repo holds, without the machine's paths; model_card.py:
                    the card, from templates/model_card.md.jinja; space.py: the model's Space, `push --space`)
    demo.py         `demo`: the model in the browser, sampled through the engine while the page shows x_t and x_0;
                    the page is space_app/app.py, the Space's own app (diffusers, torch and gradio only)
    visualize.py    `visualize`, the loss and progress figures (mistakes.py: the tutorial's four mistakes)
    arguments.py    what an option's value may be: bounds, kinds of path, Hub id or local path

Heavy packages (diffusers, datasets, accelerate, transformers, matplotlib) are imported inside the functions
that use them, not at the top of a module: `ddpm-hf --help`, a bad option or a config check then answers in
about a second instead of the several seconds those imports take.
"""

__version__ = "0.1.0"
