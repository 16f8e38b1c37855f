"""`facegen audit`: re-embed every image of a dataset and check it against an index of real people.

Exit codes: 0 = the whole dataset is present and clean; 1 = violations; 2 = usage or input error
(nothing audited); 3 = the dataset is incomplete (what is there was audited and is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator

from facegen.jobs.common import add_storage_option
from facegen.models.errors import UserError

EXIT_CLEAN, EXIT_VIOLATIONS, EXIT_INCOMPLETE = 0, 1, 3


def register(subparsers: argparse._SubParsersAction) -> None:
    from facegen.jobs.embedder_options import add_preprocessing_flag

    p = subparsers.add_parser(
        "audit",
        help="independently check a dataset's privacy against an index of real identities",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Decode every image in DATASET's shards (VIS, and NIR when the dataset has it), embed it with "
            "--embedder (any model the index was built with, not necessarily the generator's), and report each "
            "sample's maximum cosine similarity to the enrolled real images.\n\n"
            "exit codes:\n"
            "  0  the whole dataset is present and no sample exceeds the threshold\n"
            "  1  at least one sample exceeds the threshold (a privacy violation)\n"
            "  2  usage or input error (bad flag, unreadable index/model/dataset, output not writable)\n"
            "  3  the dataset is incomplete (missing shards or report); what is there was audited"
        ),
    )
    p.add_argument("dataset", help="dataset location written by `facegen generate` or `facegen anonymize`")
    p.add_argument("--index", required=True, help="privacy index URI (built with the same --embedder)")
    p.add_argument("--embedder", required=True, help="embedder checkpoint (native, insightface .pth, .onnx)")
    add_preprocessing_flag(p)
    p.add_argument("--threshold", type=float,
                   help="violation threshold in (0, 1) (default: the threshold the dataset was certified at, from "
                        "its job.yaml or anonymise.json; without one, the index's threshold calibrated at --fmr)")
    p.add_argument("--fmr", type=float, default=1e-4,
                   help="FMR of the index's calibrated threshold when neither --threshold nor job.yaml give one")
    nir = p.add_mutually_exclusive_group()
    nir.add_argument("--nir", action="store_true", default=None,
                     help="require NIR images and audit them (default: audit NIR whenever present)")
    nir.add_argument("--no-nir", dest="nir", action="store_false", help="audit VIS images only")
    p.add_argument("--batch", type=int, default=64, help="images per embedder call")
    p.add_argument("--out", help="write per-sample results as parquet to this file (local or fsspec URI)")
    p.add_argument("--with-identities", action="store_true",
                   help="add each sample's nearest real identity to --out (information about real people: keep "
                        "it private)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_option(p, "the dataset, the index and --out")
    p.set_defaults(func=run)


@contextlib.contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Storage and credential failures as one message (no traceback, exit 2)."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{where}: {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - object-store clients raise their own types (botocore, ...)
        if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "fsspec"):
            raise UserError(f"{where}: {type(err).__name__}: {err}") from None
        raise


def _planned_shards(dataset, spec) -> int | None:
    from facegen.engine.identities import IDENTITIES_FILE, read_identities
    from facegen.engine.job import shards_for

    if spec is None or not dataset.exists(IDENTITIES_FILE):
        return None
    identities, _ = read_identities(dataset)
    return shards_for(spec, len(identities))


def _threshold(args, spec, index, anonymisation: dict | None = None) -> tuple[float, str]:
    from facegen.engine.index.compat import calibrated_threshold

    if args.threshold is not None:  # its range is checked before any work
        return args.threshold, "given (--threshold)"
    if spec is not None and spec.privacy.threshold != "auto":
        calibration = spec.privacy.calibration
        how = (f"calibrated at FMR {calibration['fmr']:g}" if calibration else "given") + ", from job.yaml"
        return float(spec.privacy.threshold), how
    if anonymisation is not None and anonymisation["threshold"] is not None:
        how = anonymisation.get("threshold_calibration") or "given"
        return float(anonymisation["threshold"]), f"{how}, from anonymise.json"
    fmr = spec.privacy.fmr if spec is not None else args.fmr
    chosen = calibrated_threshold(index.info, fmr, index.storage.uri, ("--threshold", "--fmr"))
    return chosen["threshold"], chosen["text"] + " (the index)"


def run(args: argparse.Namespace) -> int:
    from facegen.engine.anonymise.run import audit_plan
    from facegen.engine.audit import audit_dataset, write_audit
    from facegen.engine.index.compat import embedder_for_index
    from facegen.engine.index.search import PrivacyIndex
    from facegen.engine.spec import load_spec_yaml_text
    from facegen.engine.storage import Storage
    from facegen.jobs.common import parse_storage_options
    from facegen.jobs.embedder_options import preprocessing_flags, print_notes

    options = parse_storage_options(args.storage_option)
    explicit = preprocessing_flags(args)
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be positive")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold {args.threshold}: must be in (0, 1); cosine similarities above 1 do not "
                        "exist, so such a threshold would pass everything")
    target, name = None, None
    if args.out:  # checked before any work: a long audit must not fail at the very end
        folder, _, name = args.out.rstrip("/").rpartition("/")
        if not name:
            raise UserError(f"--out {args.out}: needs a file name")
        target = Storage(folder or ".", options)
        with storage_errors(f"--out {args.out}"):
            target.check_writable()
    with storage_errors(args.dataset):
        dataset = Storage(args.dataset, options)
        if not dataset.exists():
            raise UserError(f"{args.dataset}: dataset not found")
        spec = load_spec_yaml_text(dataset.read_text("job.yaml")) if dataset.exists("job.yaml") else None
        # `facegen anonymize` writes no job.yaml; its anonymise.json says what was planned and certified.
        anonymisation = audit_plan(dataset) if spec is None else None
    with storage_errors(args.index):
        index = PrivacyIndex.open(args.index, options)
    embedder = embedder_for_index(args.embedder, explicit, index.info)
    print_notes(embedder)
    threshold, source = _threshold(args, spec, index, anonymisation)
    with storage_errors(args.dataset):
        planned = _planned_shards(dataset, spec) if anonymisation is None else anonymisation["planned_shards"]
        empty = set() if anonymisation is None else anonymisation["empty_shards"]
        result = audit_dataset(dataset, index, embedder, threshold, include_nir=args.nir, batch_size=args.batch,
                               progress=True, planned_shards=planned, empty_shards=empty,
                               with_identities=args.with_identities)
    if target is not None:
        with storage_errors(f"--out {args.out}"):
            write_audit(result, target, name)
    summary = {**result.summary(), "threshold_source": source, "index_count": index.count}
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        worst = ("n/a" if summary["max_similarity"] is None
                 else f"{summary['max_similarity']:.6f} (at {summary['worst_key']})")
        nir = ("VIS and NIR" if summary["audited_nir"] else
               "VIS only (NIR present but not audited)" if summary["nir_present"] else "VIS (the dataset has no NIR)")
        print(f"audited {summary['samples']} samples, {nir}, against {index.count} enrolled images: "
              f"max similarity {worst}, threshold {threshold:.6g} ({source}), violations {summary['violations']}")
        for key in summary["violating_keys"][:20]:
            print(f"violation: {key}")
        for line in summary["missing"]:
            print(f"incomplete: {line}")
    if summary["violations"]:
        return EXIT_VIOLATIONS
    if summary["missing"]:
        print("facegen: the dataset is incomplete; the samples present were audited (exit 3)", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_CLEAN
