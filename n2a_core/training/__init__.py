"""Training machinery: everything `n2a train` runs and generation never needs.

run               `n2a train` end to end: data, stage 1, latent cache, stage 2, one run folder
autoencoder_stage stage 1: the autoencoder's losses routed to its optimizers, latent-scale export
diffusion_stage   stage 2: the denoiser (and a trainable conditioner) on cached latents
objective         the stage-2 loss (DDPM target, min-SNR weighting, condition dropout) and the EMA
loop              the one training loop both stages run: accumulation, precision, logs, resume
batching          data source -> train/val splits -> batches, with a resumable, rank-aware order
latent_cache      autoencoder latents encoded once and reused by stage 2
distributed       several processes (torchrun): ranks, collectives, DDP helpers
evaluate          `n2a eval-autoencoder`: reconstruction quality of a trained autoencoder
"""
