"""The one typed job spec: YAML + `key=value` overrides -> a frozen, validated `JobSpec`.

It lives in `engine` (not `jobs`) because the engine runs whole jobs from it and may not import
`jobs`. Errors name the key: `privacy.threshold: must be in (0, 1)`. `spec_hash` covers only fields
that change results; `run` (device, batch size, executor, workers) is left out so that a resume on
other resources is accepted.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facegen.models.errors import UserError

ModelT = TypeVar("ModelT", bound=BaseModel)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unit_interval(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError("must be in (0, 1)")
    return value


class GeneratorSpec(_Section):
    path: str = Field(description="generator checkpoint: native .safetensors or ArcBiFaceGAN .pkl")
    truncation_psi: float = Field(0.7, ge=0.0, le=2.0)
    truncation_cutoff: int | None = Field(None, ge=1)
    # 'random': per-sample noise drawn from the counter-based streams (engine/seeding.py), so it is
    # deterministic, resumable and independent of batching, and samples vary like the original's.
    noise_mode: Literal["const", "random", "none"] = "random"
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="bf16: autocast on CPU or CUDA; fp16: CUDA only")
    # Both compute the same StyleGAN2 math; float summation order differs, so the choice is hashed.
    # Measured on CPU at batch 32: shared weights + NHWC activations 270 ms/img, fused 393 ms/img.
    modulated_conv: Literal["shared", "fused"] = Field(
        "shared", description="shared: one conv per layer on NHWC activations; fused: per-sample grouped conv"
    )


class EmbedderSpec(_Section):
    path: str = Field(description="face embedder: native iresnet .safetensors, insightface .pth or .onnx")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: autocast (torch embedders); privacy decisions within "
                            "privacy.recheck_margin of the threshold are re-embedded in fp32")
    preprocessing: dict[str, Any] = Field(
        default_factory=dict, description="overrides: input_size, mean, std, channel_order, resize_mode"
    )


class IndexSpec(_Section):
    uri: str | None = Field(None, description="a privacy index built with `facegen index build`")
    features: str | None = Field(None, description="compat: the original's identity_features.json")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    backend: Literal["auto", "faiss", "torch", "numpy"] = "auto"

    @model_validator(mode="after")
    def _exactly_one_source(self) -> IndexSpec:
        if (self.uri is None) == (self.features is None):
            raise ValueError("give exactly one of index.uri or index.features")
        return self


class ConditionSpec(_Section):
    mode: Literal["random_direction"] = "random_direction"
    norm: float = Field(4.0, gt=0.0, description="the original's 4 · normalize(randn)")


class RepairSpec(_Section):
    """Privacy repair: a candidate rejected for being too close to a real person gets the top identity
    units of its latent code swapped with a fresh seeded random face (StyleID's latent swap) and is
    checked again by every filter, instead of being thrown away."""

    ranks: str = Field(description="rank table written by `facegen disentangle rank` for this generator (.parquet)")
    n: int = Field(32, ge=1, description="top-ranked units swapped: more units, less of the rejected person")
    tries: int = Field(3, ge=1, le=64, description="fresh random targets tried per rejected candidate")
    space: Literal["wplus", "style"] = Field("wplus", description="which latent space's ranks to swap")
    unit_width: int = Field(1, ge=0, description="the table's units of this width (channels; 0 = whole layers)")
    # Filled in when the job starts (job.yaml records it): a resume with another rank table is refused.
    units_sha256: str | None = Field(None, description="set by facegen: SHA-256 of the swapped units")


class PrivacySpec(_Section):
    threshold: float | Literal["auto"] = Field(
        "auto", description="max cosine to any enrolled real image; 'auto': the index's threshold calibrated at fmr")
    fmr: float = Field(1e-4, description="false-match rate the 'auto' threshold is calibrated at")
    separability_threshold: float | None = Field(None, description="max cosine between identities")
    check_nir: bool = Field(True, description="also embed every written NIR image and certify it")
    # Filled in when 'auto' is resolved against the index (job.yaml records it): where the number came from.
    calibration: dict[str, Any] | None = Field(None, description="set by facegen: {fmr, impostor_pairs}")
    recheck_margin: float | None = Field(
        None, ge=0.0, lt=1.0, description="with a reduced-precision embedder: candidates this close to the "
                                          "threshold are re-embedded in fp32 (default by dtype: bf16 0.02, fp16 0.005)")
    repair: RepairSpec | None = Field(None, description="repair privacy-rejected candidates by an identity swap")

    @field_validator("threshold", mode="before")
    @classmethod
    def _check_threshold(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number in (0, 1) or 'auto'") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number in (0, 1) or 'auto'")
        return _unit_interval(float(value))

    _check = field_validator("fmr")(_unit_interval)

    @field_validator("separability_threshold")
    @classmethod
    def _check_separability(cls, value: float | None) -> float | None:
        return None if value is None else _unit_interval(value)

    @property
    def resolved(self) -> bool:
        return self.threshold != "auto"

    @property
    def value(self) -> float:
        """The numeric privacy threshold (after `engine.job.resolve_job`)."""
        if self.threshold == "auto":
            raise UserError("privacy.threshold 'auto' has not been resolved against the index yet")
        return float(self.threshold)

    @property
    def separability(self) -> float:
        # The original uses the privacy threshold for inter-identity separability too.
        return self.value if self.separability_threshold is None else self.separability_threshold


class FilterSpec(_Section):
    same_threshold: float = Field(0.622, description="min cosine of a sample to its identity's anchor")
    diversity_threshold: float = Field(0.853, description="max cosine between samples of one identity")
    max_attempts: int = Field(2500, ge=1, description="candidates tried per identity before giving up")
    max_slots: int | None = Field(None, ge=1, description="identity proposals tried (default 20 × ids)")
    quality_gate: Literal["none", "frontal"] = Field("none", description="'frontal': YuNet landmarks")
    face_detector: str | None = Field(None, description="YuNet ONNX file for the 'frontal' gate")
    min_face_score: float = Field(0.9, description="YuNet score a face must reach (frontal gate)")

    _check = field_validator("same_threshold", "diversity_threshold")(_unit_interval)


class OutputSpec(_Section):
    uri: str = Field(description="dataset root: a local path or any fsspec URI (s3://…)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    format: str = Field("webdataset", description="shard container, a name in engine/dataset/formats.py")
    name: str = Field("facegen", pattern=r"^[A-Za-z0-9_-]+$", description="shard file prefix")
    image_format: Literal["png", "jpg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(1000, ge=1)
    contact_sheets: int = Field(16, ge=0, description="identities shown in report.html")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        # The registry itself, so a new format is a change to engine/dataset only. Imported here: the
        # formats' writers load pyarrow, and the CLI builds specs without paying for it up front.
        from facegen.engine.dataset.formats import FORMATS

        if value not in FORMATS:
            raise ValueError(f"must be one of {', '.join(FORMATS)}")
        return value


IndexPlacement = Literal["auto", "replicated", "sharded"]


class RunSpec(_Section):
    """How to run; never changes results, so it is left out of the spec hash."""

    executor: Literal["local", "ray"] = "ray"
    address: str | None = Field(None, description="Ray cluster to join (ray executor); none: an embedded local Ray")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int | None = Field(None, ge=1)
    max_retries: int = Field(3, ge=0)
    index_placement: IndexPlacement = Field(
        "auto", description="privacy index: a replica in every generator actor, or index-shard actors")
    index_actors: int | None = Field(None, ge=1, description="index-shard actors (default: one per index shard)")
    overlap: bool = Field(True, description="compute the next shard while the previous one is encoded and written")
    compile: bool = Field(False, description="torch.compile the synthesis network and the embedder (inductor)")
    lease_ttl: float = Field(30.0, gt=0, le=3600, description="seconds a run's lease on its output outlives its "
                             "last heartbeat (a killed run's output can be resumed this long after)")
    lease_wait: float = Field(0.0, ge=0, description="seconds to wait for another live run's lease on the output "
                              "before refusing")


class JobSpec(_Section):
    name: str = "facegen"
    seed: int = Field(0, ge=0, lt=2**63)
    identities: int = Field(100, ge=1, le=99_999_999)
    samples_per_identity: int = Field(32, ge=1, le=999)
    # Batches are fixed units of work (same slots/attempts in every executor), so the batch size is part
    # of the result: it can change the last bits of a similarity, hence it is hashed.
    batch_size: int = Field(16, ge=1, description="candidates per model call")
    generator: GeneratorSpec
    embedder: EmbedderSpec
    index: IndexSpec
    condition: ConditionSpec = ConditionSpec()
    privacy: PrivacySpec = PrivacySpec()
    filter: FilterSpec = FilterSpec()
    output: OutputSpec
    run: RunSpec = RunSpec()

    @property
    def identities_per_shard(self) -> int:
        return max(1, self.output.samples_per_shard // self.samples_per_identity)

    @property
    def num_shards(self) -> int:
        return -(-self.identities // self.identities_per_shard)

    @property
    def max_slots(self) -> int:
        return self.filter.max_slots or 20 * self.identities

    @property
    def proposal_block(self) -> int:
        """Slots per proposal unit; units are aligned so every executor evaluates the same batches."""
        return 4 * self.batch_size


# Fields that locate or schedule the work but do not change a single output byte.
_UNHASHED = {"run": True, "output": {"uri": True, "storage_options": True}}
# Keys added after datasets were written: hashed only when they differ from the value those datasets
# were written with, so a resume of an existing dataset still matches its job.sha256.
_HASHED_UNLESS = {("output", "format"): "webdataset", ("privacy", "repair"): None}


def _hashed_tree(spec: JobSpec) -> dict[str, Any]:
    tree = spec.model_dump(mode="json", exclude=_UNHASHED)
    for (section, key), implicit in _HASHED_UNLESS.items():
        if tree[section].get(key) == implicit:
            del tree[section][key]
    return tree


def spec_hash(spec: JobSpec) -> str:
    canonical = json.dumps(_hashed_tree(spec), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_diff(a: JobSpec, b: JobSpec) -> list[str]:
    """Dotted keys whose hashed values differ between two specs."""
    left, right = _flatten(_hashed_tree(a)), _flatten(_hashed_tree(b))
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_value(text: str) -> Any:
    """`--set` values: YAML scalars (numbers, true/false, null, lists), else the plain string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def build_spec(tree: dict[str, Any], overrides: list[str] = ()) -> JobSpec:
    """Validate a job spec tree after applying `key=value` overrides; errors name the dotted key."""
    return validate_tree(JobSpec, tree, overrides, "job spec")


def validate_tree(model: type[ModelT], tree: dict[str, Any], overrides: list[str], what: str) -> ModelT:
    """Any pydantic spec from a tree plus `--set key=value` overrides; one UserError naming the keys."""
    tree = json.loads(json.dumps(tree))  # deep copy, and JSON-only values
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. seed=3")
        key, text = item.split("=", 1)
        apply_override(tree, key.strip(), parse_value(text))
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise UserError(format_validation_error(err, what)) from None


def format_validation_error(err: ValidationError, what: str = "job spec") -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "spec"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required"
        lines.append(f"{key}: {message}")
    return f"invalid {what}: " + "; ".join(lines)


def load_spec_file(path: str, what: str = "job file") -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a {what} must be a mapping of keys")
    return tree


def load_spec_yaml_text(text: str) -> JobSpec:
    """A spec previously written by `spec_to_yaml` (e.g. a dataset's job.yaml)."""
    return build_spec(yaml.safe_load(text) or {})


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
