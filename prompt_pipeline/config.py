"""Pipeline settings (`tessera.yaml` section `pipeline`, env `TESSERA_PIPELINE_*`) and the
builder that turns them into the gateway's stages.

    pipeline:
      stages: [securitylingua]        # in order; empty = no stage
      on_failure: closed              # closed (503) | open (forward unchanged, counted)
      on_failure_per_stage: {}        # e.g. {securitylingua: open}
      securitylingua: {...}           # see SecurityLinguaSettings
      secom: {...}                    # see SecomSettings
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from prompt_pipeline.guard import FailureDecision, GuardedStage, UnavailableStage
from prompt_pipeline.stage import Stage
from tessera_config import TesseraSettings

logger = logging.getLogger("tessera.pipeline")

DEFAULT_SYSTEM_TEMPLATE = (
    "To help you recognise harmful requests, the user's underlying intention was extracted "
    "from their message: \"{intention}\". If this intention is malicious or harmful, do not "
    "follow it; reply with a brief refusal such as \"I'm sorry, I can't help with that.\" "
    "Otherwise answer the user normally."
)


class SecurityLinguaSettings(BaseModel):
    """One deployment's SecurityLingua stage (the paper's defaults where it has them)."""

    enabled: bool = Field(True, description="Off: the stage passes every request through.")
    artifact_dir: Path | None = Field(
        None, description="Trained extractor; None = the one shipped in the repository.")
    threshold: float = Field(0.5, ge=0.0, le=1.0,
                             description="Keep a word when P(keep) > threshold (paper: 0.5).")
    turns: Literal["latest", "all"] = Field(
        "latest", description="Extract from the latest user turn, or all user turns.")
    system_template: str = Field(
        DEFAULT_SYSTEM_TEMPLATE, description="Added to the system message; {intention}.")
    max_intention_words: int = Field(
        200, ge=1, description="Longest intention added to the system message (words).")
    mode: Literal["annotate", "block"] = Field(
        "annotate", description="block: also refuse when the harm classifier flags the "
        "extracted intention (requests it lets through are annotated).")
    harm_classifier: Path | None = Field(
        None, description="Harm classifier for block mode; None = the shipped one.")
    block_threshold: float = Field(0.5, ge=0.0, le=1.0)
    block_response: Literal["error", "refusal"] = Field(
        "error", description="error: OpenAI-shaped 400; refusal: a normal completion.")
    refusal_message: str = "I'm sorry, I can't help with that."
    quantize: Literal["auto", "none", "int8", "bf16"] = Field(
        "auto", description="Extractor precision. auto: bf16 where the CPU computes bf16 "
        "natively (AVX512-BF16 or AMX), else none (fp32); int8: dynamic int8 Linear layers. "
        "F1 of each: benchmarks/results/securitylingua_extraction.json.")
    max_chunk_tokens: int | None = Field(
        None, gt=2, le=512, description="Extractor chunk length at inference (pieces, [CLS] "
        "and [SEP] included); None = the length the artifact was trained with (the shipped "
        "one: 256).")
    # One thread: on the shared 2-core host, with other jobs busy, 2 torch threads made our
    # training steps ~15x slower than 1 (spin-waiting threads); run alone, 2 threads gain
    # only ~15% at 1K tokens (benchmarks/results/securitylingua_overhead.json).
    threads: int = Field(1, ge=1, description="torch threads for the classifiers.")


class SecomSettings(BaseModel):
    """Conversation memory (SeCom, issue 21): where it lives, who gets it, how it recalls."""

    db_path: Path | None = Field(
        None, description="SQLite file; None = <TESSERA_DATA_DIR or ./data>/secom/memory.sqlite3.")
    default_opt_in: bool = Field(
        False, description="Requests with a `user` but no conversation id use memory (under "
        "conversation 'default'). A conversation id always opts a request in.")
    opt_in_per_key: dict[str, bool] = Field(
        default_factory=dict, description="default_opt_in per API key (overrides it).")
    granularity: Literal["segment", "turn"] = "segment"
    method: Literal["bm25", "embedding", "fused"] = "fused"
    top_k: int | None = Field(3, ge=1)
    token_budget: int | None = Field(600, ge=1, description="Words of memory injected at most.")
    compressor_dir: Path | None = Field(
        None, description="Token-classifier artifact for compressed retrieval keys; None = "
        "keys are the units' own text.")
    compression_rate: float = Field(0.6, gt=0.0, le=1.0,
                                     description="Target rate: share of word pieces kept.")
    threads: int = Field(1, ge=1, description="torch threads for MiniLM.")
    segmenter: Literal["model_first", "embedding"] = Field(
        "model_first", description="Who segments a conversation after each write: the served "
        "model first (the paper's prompts, TextTiling where the reply does not parse; "
        "counted) or TextTiling only (no model call).")
    segmenter_prompts: list[Literal["batch", "incremental"]] = Field(
        default_factory=lambda: ["batch", "incremental"],
        description="model_first: the prompts tried in order before TextTiling.")
    segmenter_model: str | None = Field(
        None, description="Model that segments; None = the model the request named.")
    segmenter_max_tokens: int = Field(200, ge=1, description="Reply limit of a batch prompt.")
    segmenter_timeout_s: float = Field(60.0, gt=0, description="One segmentation call.")
    max_segment_exchanges: int = Field(
        24, ge=1, description="A segment this long is closed: bounds a write's work and the "
        "segmentation prompt.")

    def resolved_db_path(self) -> Path:
        if self.db_path is not None:
            return self.db_path
        return Path(os.environ.get("TESSERA_DATA_DIR", "data")) / "secom" / "memory.sqlite3"

    def opted_in_by_default(self, api_key: str | None) -> bool:
        return self.opt_in_per_key.get(api_key or "", self.default_opt_in)


class PipelineSettings(TesseraSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_PIPELINE_",
                                      env_nested_delimiter="__", extra="ignore")
    yaml_section: ClassVar[str] = "pipeline"

    stages: list[str] = Field(default_factory=list, description="Stage names, in order.")
    on_failure: FailureDecision = Field(
        "closed", description="When a stage fails: closed = 503, open = forward unchanged.")
    on_failure_per_stage: dict[str, FailureDecision] = Field(default_factory=dict)
    securitylingua: SecurityLinguaSettings = Field(default_factory=SecurityLinguaSettings)
    secom: SecomSettings = Field(default_factory=SecomSettings)

    def failure_decision(self, stage: str) -> FailureDecision:
        return self.on_failure_per_stage.get(stage, self.on_failure)


StageFactory = Callable[[PipelineSettings, CollectorRegistry, Counter | None], Stage]


def _securitylingua(settings: PipelineSettings, registry: CollectorRegistry,
                    flagged: Counter | None) -> Stage:
    from prompt_pipeline.securitylingua.stage import build_securitylingua_stage

    return build_securitylingua_stage(settings.securitylingua, registry, flagged)


def _secom(settings: PipelineSettings, registry: CollectorRegistry,
           flagged: Counter | None) -> Stage:
    from prompt_pipeline.secom.stage import build_secom_stage

    return build_secom_stage(settings.secom, registry)


STAGE_FACTORIES: dict[str, StageFactory] = {"securitylingua": _securitylingua,
                                            "secom": _secom}


def build_stages(settings: PipelineSettings, registry: CollectorRegistry,
                 flagged: Counter | None = None) -> list[Stage]:
    """The configured stages, each guarded by its failure decision. An unknown stage name is
    a config error (raised); a stage that fails to load is logged and, per its decision,
    fails every request (closed) or is skipped with a count (open)."""
    failures = Counter("tessera_pipeline_stage_failures", "Pipeline stage failures, by the "
                       "configured decision.", ["stage", "decision"], registry=registry)
    stages: list[Stage] = []
    for name in settings.stages:
        if name not in STAGE_FACTORIES:
            raise ValueError(f"unknown pipeline stage {name!r}; known: {sorted(STAGE_FACTORIES)}")
        decision = settings.failure_decision(name)
        try:
            stage: Stage = STAGE_FACTORIES[name](settings, registry, flagged)
        except Exception as exc:
            logger.error("pipeline stage %s could not be built (fail-%s): %r", name, decision,
                         exc)
            stage = UnavailableStage(name, repr(exc))
        logger.info("pipeline stage %s ready (on failure: %s)", name, decision)
        stages.append(GuardedStage(stage, decision, failures))
    return stages
