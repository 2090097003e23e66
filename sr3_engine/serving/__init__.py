"""Serving: the scheduler that batches tiles of many requests into every denoiser call
(`scheduler`), the HTTP service around it (`http`) and its Ray Serve deployment (`ray_serve`)."""
