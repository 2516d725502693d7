"""Model sizes shared by the DiT benchmarks."""

# name -> (model overrides, batch, latent h, latent w, caption tokens)
SIZES = {
    # the first demo DiT (4.3M, dim 192) at 4x4 latents; configs/tiny.py:full (dim 384, 8x8
    # latents) has the calibration model's width and depth
    "tiny": (dict(in_channels=384, dim=192, n_layers=4, n_refiner_layers=1, n_heads=3, n_kv_heads=1,
                  multiple_of=64, cap_feat_dim=128, axes_dims=(16, 24, 24)), 16, 4, 4, 32),
    # the calibration model of docs/cpu_performance.md (16.7M params, 256 image + 64 caption tokens)
    "calib": (dict(in_channels=384, dim=384, n_layers=4, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
                   multiple_of=256, cap_feat_dim=256, axes_dims=(16, 24, 24)), 8, 16, 16, 64),
    # the official 2B block shapes (dim 2304, 24/8 heads, FFN 9216), 1 main layer + 1+1 refiners
    "2b_slice": (dict(n_layers=1, n_refiner_layers=1), 2, 16, 16, 64),
    # GPU sizes: the 2B block shapes (4 main layers, the official 2+2 refiners) at stage 1 (256 px,
    # 16x16 latents) and stage 3 (1024 px, 64x64 latents), with the recipe's 256 caption tokens
    "2b_256": (dict(n_layers=4, n_refiner_layers=2), 32, 16, 16, 256),
    "2b_1024": (dict(n_layers=4, n_refiner_layers=2), 4, 64, 64, 256),
}
