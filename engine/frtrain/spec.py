"""The `facegen train-fr` job spec: YAML + `key=value` overrides -> a frozen, validated `FRTrainSpec`.

Same conventions as the other specs: pydantic, `extra='forbid'`, errors that name the dotted key.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facegen.engine.spec import validate_tree
from facegen.engine.training.spec import OutputSpec, WorkersSpec
from facegen.models.iresnet import DEPTH_LAYERS

DEFAULT_STEPS = 1000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FRDataSpec(_Section):
    uri: str = Field(description="a generated dataset or a VIS/ NIR/ image folder (local path or any fsspec URI)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["vis", "nir", "both"] = Field("vis", description="which images train: VIS, NIR or both")
    image_size: int = Field(112, ge=16, description="FR input size (the backbone's input_size)")
    flip: bool = Field(True, description="random horizontal flips")
    follow: bool = Field(False, description="read the dataset while it is being generated")
    follow_timeout: float | None = Field(None, gt=0, description="seconds to wait for a new shard (null: forever)")
    poll_seconds: float = Field(2.0, gt=0, description="how often a follower looks for new shards")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per training worker")
    open_shards: int = Field(4, ge=1, description="shards each loader reads at once (identity mixing)")
    shuffle_buffer: int = Field(2048, ge=0, description="samples in each loader's shuffle buffer")


class ModelSpec(_Section):
    depth: int = Field(50, description=f"iResNet depth: one of {sorted(DEPTH_LAYERS)}")
    embedding_dim: int = Field(512, ge=1)
    base_width: int = Field(64, ge=8, description="channels of the first stage (64 = insightface's)")
    dropout: float = Field(0.0, ge=0, lt=1)
    fp16: bool = Field(False, description="fp16 autocast of the trunk on CUDA (as insightface)")

    @model_validator(mode="after")
    def _known_depth(self) -> ModelSpec:
        if self.depth not in DEPTH_LAYERS:
            raise ValueError(f"depth {self.depth} is not one of {sorted(DEPTH_LAYERS)}")
        return self


class HeadSpec(_Section):
    margin: Literal["arcface", "cosface"] = "arcface"
    scale: float = Field(64.0, gt=0, description="logit scale s")
    m: float | None = Field(None, ge=0, description="margin (default: 0.5 ArcFace, 0.4 CosFace)")
    sample_rate: float = Field(1.0, gt=0, le=1, description="partial FC: share of class centres per step")

    @property
    def margin_value(self) -> float:
        return self.m if self.m is not None else (0.5 if self.margin == "arcface" else 0.4)


class OptimSpec(_Section):
    batch_size: int = Field(128, ge=1, description="global batch (split across workers)")
    lr: float = Field(0.1, gt=0, description="SGD learning rate at batch_size (not rescaled)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    steps: int | None = Field(None, ge=1, description=f"training length in optimiser steps ({DEFAULT_STEPS} "
                              "when neither steps nor epochs is given)")
    epochs: float | None = Field(None, gt=0, description="or in epochs of the dataset")
    clip_grad_norm: float | None = Field(5.0, gt=0, description="backbone gradient clipping (as insightface)")

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("steps") is None and data.get("epochs") is None:
            return {**data, "steps": DEFAULT_STEPS}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> OptimSpec:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


class FRScheduleSpec(_Section):
    log_steps: int = Field(10, ge=1, description="steps between log lines")
    checkpoint_steps: int = Field(500, ge=1, description="steps between restart checkpoints")
    keep_checkpoints: int = Field(2, ge=1)


class FRTrainSpec(_Section):
    seed: int = Field(0, ge=0, lt=2**31)
    data: FRDataSpec
    output: OutputSpec
    model: ModelSpec = ModelSpec()
    head: HeadSpec = HeadSpec()
    optim: OptimSpec = OptimSpec()
    schedule: FRScheduleSpec = FRScheduleSpec()
    resume: str | None = Field(None, description="a train-fr run directory or checkpoint folder to continue")
    run: WorkersSpec = WorkersSpec()

    @model_validator(mode="after")
    def _batch_splits(self) -> FRTrainSpec:
        if self.optim.batch_size % self.run.num_workers:
            raise ValueError(f"optim.batch_size {self.optim.batch_size} must be a multiple of "
                             f"run.num_workers {self.run.num_workers}")
        if self.data.image_size % 16:
            raise ValueError(f"data.image_size {self.data.image_size} must be a multiple of 16 (iResNet)")
        return self


def build_fr_spec(tree: dict[str, Any], overrides: list[str] = ()) -> FRTrainSpec:
    return validate_tree(FRTrainSpec, tree, list(overrides), "train-fr spec")


def fr_spec_to_yaml(spec: FRTrainSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
