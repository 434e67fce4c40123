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
    conditioning.py class-conditional models: labels, classifier-free guidance, the pipeline they are saved as
    distributed.py  heavy work split over Accelerate's processes: chunks by index, per-item seeds, merging

The tools around a trained pipeline (`ddpm-hf COMMAND`, registered in cli.py):
    evaluation.py   `evaluate`, `fid`, `fid-stats` (fid.py: Inception features, inception_weights.py: where
                    the network file comes from; nll.py: bits/dim)
    hub.py          `push`, the model card and pushes during training
    visualize.py    `visualize`, the loss and progress figures (mistakes.py: the tutorial's four mistakes)
    arguments.py    what an option's value may be: bounds, kinds of path, Hub id or local path

Heavy packages (diffusers, datasets, accelerate, transformers, matplotlib) are imported inside the functions
that use them, not at the top of a module: `ddpm-hf --help`, a bad option or a config check then answers in
about a second instead of the several seconds those imports take.
"""

__version__ = "0.1.0"
