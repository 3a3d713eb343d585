"""Gateway, launcher and worker settings: `tessera.yaml` section `server`, `TESSERA_*` env.

Precedence (highest first): explicit values (CLI flags), `TESSERA_<FIELD>` environment
variables, the `server:` section of the YAML file named by `TESSERA_CONFIG` (default
`./tessera.yaml` when it exists), then the defaults below, which serve the embedded
SmolLM2 model on a small CPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from server.model_prep import SERVED_MODEL_NAME
from tessera_config import CONFIG_ENV, DEFAULT_CONFIG_FILE, TesseraSettings, config_file

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG_FILE", "ServerSettings", "TesseraSettings", "config_file"]

class ServerSettings(TesseraSettings):
    """Everything `tessera serve` needs: data, workers, gateway, limits."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="ignore")
    yaml_section: ClassVar[str] = "server"

    # --- data and model
    data_dir: Path = Field(Path("data"), description="Where prepared models, logs and state live.")
    model_path: Path | None = Field(
        None, description="A local model directory to serve instead of the embedded SmolLM2."
    )
    served_model_name: str = Field(SERVED_MODEL_NAME, description="Model id clients send.")

    # --- workers (vLLM OpenAI servers launched by `tessera serve`)
    workers: int | Literal["auto"] = Field(
        1, description="vLLM worker processes to launch; auto: one per group of "
        "gpus_per_worker visible GPUs on a CUDA host, one on a CPU host.",
    )  # fmt: skip
    gpus_per_worker: int = Field(
        1, ge=1, description="CUDA host: GPUs per worker (CUDA_VISIBLE_DEVICES); more than "
        "one is served with vLLM's tensor parallelism.",
    )  # fmt: skip
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="CUDA host: share of each GPU's memory for its workers, "
        "split evenly when several workers share a GPU.",
    )  # fmt: skip
    worker_host: str = Field("127.0.0.1", description="Interface the workers bind.")
    worker_base_port: int = Field(8100, description="First worker port; worker i uses base + i.")
    worker_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Already running workers to route to as well (comma separated in env).",
    )
    dtype: str = Field("float32", description="Worker dtype (float32 is fastest on AVX2 CPUs).")
    max_model_len: int = Field(8192, description="Context length the workers accept.")
    enforce_eager: bool = Field(True, description="Skip torch.compile at worker start.")
    kv_cache_space_gib: int = Field(2, description="VLLM_CPU_KVCACHE_SPACE per CPU worker.")
    worker_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra vLLM CLI arguments for every worker."
    )
    worker_start_timeout_s: float = Field(600.0, description="Give up on a worker start after.")

    # --- gateway
    host: str = Field("127.0.0.1", description="Interface the gateway binds.")
    port: int = Field(8000, description="Gateway port.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted API keys; empty = no authentication."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, description="Largest request body accepted.")
    max_messages: int = Field(512, description="Most chat messages in one request.")
    max_tokens_ceiling: int | None = Field(
        None, description="Largest max_tokens a client may ask for (None = the model's limit)."
    )
    max_concurrent_per_key: int = Field(
        0, description="Concurrent requests per API key (0 = unlimited); excess gets 429."
    )
    upstream_connect_timeout_s: float = Field(5.0, description="Connect timeout to a worker.")
    upstream_read_timeout_s: float = Field(
        600.0, description="Longest wait for worker bytes before a 504."
    )
    health_interval_s: float = Field(2.0, description="Seconds between worker health checks.")
    routing: Literal["least_outstanding", "prefix_affinity"] = Field(
        "least_outstanding",
        description="How a worker is chosen: fewest requests in flight, or the worker that "
        "holds the prompt's longest prefix in its KV cache (bounded by load).",
    )
    prefix_affinity_load_factor: float = Field(
        1.0, ge=1.0, description="prefix_affinity: a worker takes a request only while its "
        "in-flight requests stay within this factor of the mean (rounded up).",
    )
    metrics_require_key: bool = Field(
        False, description="Ask for an API key on /metrics too (its labels name worker URLs). "
        "Off by default so a Prometheus without credentials can scrape.",
    )
    upstream_max_connections: int = Field(
        1000, ge=1, description="Upstream connections in use at once; a request that finds "
        "none free within the connect timeout gets 503 gateway_overloaded.",
    )
    responses_store: bool = Field(
        False, description="Workers keep Responses-API answers (`store: true`) so that "
        "`previous_response_id`, `GET /v1/responses/{id}` and cancel work; the gateway routes "
        "those to the worker holding the response. vLLM keeps them in memory, unbounded.",
    )  # fmt: skip
    shutdown_grace_s: float = Field(30.0, description="In-flight requests get this long on stop.")
    log_level: str = Field("info", description="Gateway log level.")

    @field_validator("worker_urls", "api_keys", "worker_extra_args", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        # Env vars carry lists as "a,b"; YAML and CLI give real lists.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("workers")
    @classmethod
    def _workers_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("workers must be >= 0 or 'auto'")
        return value

    def local_worker_urls(self) -> list[str]:
        # The launcher resolves "auto" to a count before the gateway starts.
        count = self.workers if isinstance(self.workers, int) else 0
        return [
            f"http://{self.worker_host}:{self.worker_base_port + index}"
            for index in range(count)
        ]
