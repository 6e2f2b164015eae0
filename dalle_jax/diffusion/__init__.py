"""Gaussian diffusion in continuous time, in pure JAX: noise schedules written in
log-SNR (``schedules``), the eps / x0 / v parameterisations of the denoiser and the
loss weighting they imply (``parameterization``), and DDIM/DDPM sampling, DDIM
inversion and classifier-free guidance as single ``lax.scan`` loops that shard over
the batch (``sampler``). The denoiser is any callable ``(z, logsnr, cond) ->
prediction``; nothing here depends on a particular network."""
