"""What builds a service, as plain data: the engine, the scheduler and the HTTP front's limits.

Kept apart from `serving.http` so that commands can parse settings without the web framework
installed, and so that Ray can ship settings to its replicas, which build their own service.
"""

from __future__ import annotations

import dataclasses
from ..io import DEFAULT_MAX_PIXELS
from ..runtime.engine import AUTO, SR3Engine, auto_device, engine_dtype
from .scheduler import SchedulerConfig

DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
DEFAULT_TIMEOUT = 600.0
DEFAULT_UPLOAD_TIMEOUT = 60.0
FUSED_MAX_GRAPHS = 64


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Limits of the HTTP front: upload bytes, the seconds an upload may take to arrive, decoded
    input pixels, the longest a request may take (seconds; a request's own `deadline` may only
    shorten it), the API key (None: none; never empty), and whether to warm up before
    reporting ready."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = DEFAULT_TIMEOUT
    api_key: str | None = None
    warm_up: bool = True

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; unset it to serve without one")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything that builds one service: the engine (model directory or bundled name,
    backend, device, precision (fp32, fp16, bf16 or auto), denoiser memory budget, backend options), the scheduler and
    the HTTP front. Plain data, so a Ray Serve replica can build its own from it."""

    model: str
    backend: str = "fused"
    device: str = "auto"
    dtype: str = AUTO
    max_memory: int | None = None
    backend_options: tuple[tuple[str, object], ...] = ()
    scheduler: SchedulerConfig = SchedulerConfig()
    service: ServiceConfig = ServiceConfig()

    def engine(self) -> SR3Engine:
        """The engine these settings describe (loads the model)."""
        dtype = engine_dtype(self.dtype)
        options = dict(self.backend_options)
        if self.backend == "fused":
            # A traced or captured denoiser per tile shape and batch size: keep every one of them.
            options.setdefault("max_graphs", FUSED_MAX_GRAPHS)
        device = auto_device() if self.device == "auto" else self.device
        return SR3Engine.from_pretrained(self.model, backend=self.backend, device=device,
                                         dtype=dtype, progress=False, max_memory=self.max_memory,
                                         backend_options=options)
